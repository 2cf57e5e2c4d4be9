"""`run_explain`: harvest a hook's units, explain them, score the explanations and store them —
what ``tdb-lens explain`` runs, as a library function.

    from tdb_lens.explain import ExplainConfig, run_explain

    report = run_explain(ExplainConfig(hook="blocks.3.mlp.hook_post", units="0-31", db="runs/e.db"))
    print(report.table())

Every setting is checked (`ExplainConfig.check`) before any model is loaded. The harvest directory
and the store record the model's identity (name plus weights digest) and refuse another model's
data. A rerun (or a run resumed after a kill) reuses the harvest, skips the explanations already
stored with every requested score, and stores nothing twice; each explanation is written with its
scores in one transaction.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..provenance import ModelIdentity, model_identity
from .harvest import HarvestResult, UnitRecord, harvest, n_units_at
from .store import ExplanationRow, ExplanationStore, format_table

SCORE_METHODS = ("correlation", "detection", "fuzzing", "causal")
SIMULATORS = ("auto", "likelihood", "all-at-once", "json")
LOCAL_EXPLAINERS = ("local", "top-tokens")
EXPLAIN_BATCH = 8  # explanations explained, scored and stored together (a kill loses at most one batch)


def check_units_spec(spec: str) -> None:
    """Check the syntax of a ``--units`` spec without a model (ranges are checked by `parse_units`)."""
    spec = spec.strip()
    if spec == "all":
        return
    if spec.startswith(("active:", "random:")):
        _count(spec, spec.split(":", 1)[0])
        return
    ranges = sorted((_unit_range(part.strip()) for part in spec.split(",")), key=lambda r: r.start)
    if any(r.start < prev.stop for prev, r in zip(ranges, ranges[1:])):
        raise ValueError(f"--units {spec!r} names a unit twice")


def _unit_range(part: str) -> range:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if m is None:
        raise ValueError(f"--units: cannot read {part!r} (use 0-31, 0,5,9, random:32, active:32 or all)")
    a, b = int(m.group(1)), int(m.group(2) or m.group(1))
    if b < a:
        raise ValueError(f"--units: {part!r} is an empty range (write low-high)")
    return range(a, b + 1)


def parse_units(spec: str, n_units: int, seed: int = 0) -> list[int]:
    """``0-31``, ``0,5,9``, ``3``, ``random:32`` (seeded), ``all``; checked against ``n_units``.
    (``active:N``, N random units among those that fire on the corpus, is resolved after harvesting.)"""
    spec = spec.strip()
    if spec == "all" or spec.startswith("active:"):
        if spec.startswith("active:"):
            _count(spec, "active")
        return list(range(n_units))
    if spec.startswith("random:"):
        n = _count(spec, "random")
        if not 1 <= n <= n_units:
            raise ValueError(f"--units {spec}: N must be in [1, {n_units}]")
        return sorted(random.Random(seed).sample(range(n_units), n))
    out: list[int] = []
    for part in spec.split(","):
        r = _unit_range(part.strip())
        if r.stop > n_units:
            raise ValueError(f"--units: {part.strip()!r} out of range, the hook has {n_units} units")
        out += list(r)
    bad = [u for u in out if not 0 <= u < n_units]
    if bad:
        raise ValueError(f"--units: {bad[:5]} out of range, the hook has {n_units} units")
    if len(set(out)) != len(out):
        raise ValueError(f"--units {spec!r} names a unit twice")
    return out


def _count(spec: str, what: str) -> int:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"--units {what}:N needs an integer N, got {spec!r}") from None
    if n < 1:
        raise ValueError(f"--units {spec}: N must be at least 1")
    return n


def _is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://", "openai:"))


@dataclass
class ExplainConfig:
    """Everything ``tdb-lens explain`` takes (see its ``--help``); ``check()`` validates it all."""

    hook: str
    units: str = "0-7"
    model: str = "smollm2-135m"
    sae: Optional[str] = None
    corpus: str = "fortunes"
    n_windows: int = 512
    ctx_len: int = 32
    batch_size: int = 16
    k: int = 20
    tail: int = 256  # largest token activations kept per unit (exact extreme quantiles); 0: none
    random_windows: int = 20  # random windows kept per unit (scoring; quantiles the tail does not cover)
    seed: int = 0
    explainers: tuple[str, ...] = ("local",)
    n_examples: int = 5
    explain_tokens: int = 24
    explainer_model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    simulator: str = "auto"
    scores: tuple[str, ...] = ("correlation",)
    db: str = "runs/explanations.db"
    harvest_dir: Optional[str] = None
    progress: bool = True

    def check(self) -> None:
        """Raise a ValueError naming the first bad setting (nothing is loaded or written)."""
        from .backends import backend_from_spec

        if not self.hook:
            raise ValueError("--hook is required (e.g. blocks.3.mlp.hook_post), unless --search or --list")
        for name, low in (("n_windows", 1), ("ctx_len", 2), ("batch_size", 1), ("k", 1), ("tail", 0), ("random_windows", 1),
                          ("n_examples", 1), ("explain_tokens", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        check_units_spec(self.units)  # syntax and counts; the range is checked on the model
        if not self.explainers:
            raise ValueError("--explainer names no explainer")
        for spec in self.explainers:
            if spec not in LOCAL_EXPLAINERS:
                if not _is_endpoint(spec):
                    from .endpoint import redact_userinfo

                    raise ValueError(f"--explainer must be local, top-tokens, an http(s):// base URL or "
                                     f"openai:MODEL@URL, got {redact_userinfo(spec)!r}")
                backend_from_spec(spec, endpoint_model=self.explainer_model, api_key_env=self.api_key_env)
        bad = [m for m in self.scores if m not in SCORE_METHODS]
        if bad or not self.scores:
            raise ValueError(f"--scores: unknown {bad}; choose from {','.join(SCORE_METHODS)}")
        if self.simulator not in SIMULATORS:
            raise ValueError(f"--simulator must be one of {SIMULATORS}, got {self.simulator!r}")
        if self.simulator == "json" and not any(_is_endpoint(s) for s in self.explainers):
            raise ValueError("--simulator json needs an OpenAI-compatible --explainer endpoint")
        _check_paths(self)


def _check_paths(cfg: ExplainConfig) -> None:
    db = Path(cfg.db) if cfg.db and cfg.db.strip() else None
    if db is None:
        raise ValueError("--db is empty: give the store's file path, e.g. runs/explanations.db")
    if db.is_dir():
        raise ValueError(f"--db {db} is a directory; give a file path such as {db}/explanations.db")
    if db.is_file() and db.stat().st_size and _head(db) != b"SQLite format 3\x00":
        raise ValueError(f"--db {db} exists and is not an SQLite database")
    _check_parent(db, "--db")
    if cfg.harvest_dir:
        hd = Path(cfg.harvest_dir)
        if hd.exists() and not hd.is_dir():
            raise ValueError(f"--harvest-dir {hd} is a file; give a directory")
        _check_parent(hd, "--harvest-dir")
    if cfg.sae and not Path(cfg.sae).exists():
        raise ValueError(f"--sae {cfg.sae}: no such file or directory")
    if cfg.corpus != "fortunes" and not cfg.corpus.startswith("hf:") and not Path(cfg.corpus).exists():
        raise ValueError(f"--corpus {cfg.corpus}: no such file or directory (use 'fortunes', a directory, "
                         "a .txt/.jsonl file or hf:NAME)")


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    p = path.resolve().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{flag} {path}: {p} is a file, so the path cannot be created")
    if not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {path}: {p} is not writable")


@dataclass
class ExplainReport:
    """What `run_explain` did: the stored rows of this run's units and explainers, and counts."""

    rows: list[ExplanationRow]
    n_units: int
    dead: list[str]
    new: int
    reused: int
    db: str
    model: ModelIdentity
    seconds: float
    methods: tuple[str, ...] = field(default=("correlation",))

    def table(self) -> str:
        return format_table(self.rows)

    def means(self) -> dict[str, dict[str, float]]:
        """``{explainer: {method: mean score}}`` over this run's rows (NaN scores left out)."""
        acc: dict[str, dict[str, list[float]]] = {}
        for r in self.rows:
            for m in self.methods:
                v = r.scores.get(m)
                if v is not None and not math.isnan(v):
                    acc.setdefault(r.explainer, {}).setdefault(m, []).append(v)
        return {name: {m: sum(v) / len(v) for m, v in per.items()} for name, per in acc.items()}

    def summary(self) -> str:
        lines = [f"{len(self.rows)} explanations of {self.n_units} units in {self.db} ({self.new} new, {self.reused} "
                 f"already stored; {self.seconds:.0f} s; model {self.model.short()})"]
        for name, mean in sorted(self.means().items()):
            lines.append(f"mean {name}: " + ", ".join(f"{m} {v:.3f}" for m, v in mean.items()))
        return "\n".join(lines)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_explain(config: ExplainConfig, model=None, log: Callable[[str], None] = _say) -> ExplainReport:
    """Harvest, explain, score and store (module docstring); ``model``: an already loaded model to
    use instead of loading ``config.model`` (an SAE in ``config.sae`` is attached for the run and
    removed after)."""
    config.check()
    t0 = time.time()
    if model is None:
        import tdb_lens

        model = tdb_lens.load(config.model).eval()
    attached = _attach_sae(model, config)
    try:
        return _run(config, model, log, t0)
    finally:
        if attached is not None:
            from ..sae import remove_sae

            remove_sae(model, attached)


def _attach_sae(model, config: ExplainConfig):
    if not config.sae:
        return None
    from ..hooks.names import spliced_hook_name
    from ..sae import add_sae, load_sae

    sae = load_sae(config.sae)
    sites = ("sae_acts_post", "sae_acts_pre", "sae_input", "sae_recons", "sae_error", "sae_output")
    hosts = [h for h in model.hook_dict for site in sites if spliced_hook_name(h, site) == config.hook]
    host = hosts[0] if hosts else sae.cfg.hook_name
    if not host:
        raise ValueError(f"the SAE in {config.sae} does not record its hook and {config.hook!r} is not the latent "
                         "hook of a model hook: use --hook HOST.hook_sae_acts_post")
    return add_sae(model, sae, host)


def _run(config: ExplainConfig, model, log: Callable[[str], None], t0: float) -> ExplainReport:
    from ..corpus import build_corpus, default_corpus_path

    model.hook_layout(config.hook)  # a KeyError naming close hook names
    ident = model_identity(model, config.model)
    units = parse_units(config.units, n_units_at(model, config.hook), config.seed)
    with ExplanationStore(config.db) as store:
        store.check_model(ident.name, ident.digest)  # refuse before any work
        source = default_corpus_path() if config.corpus == "fortunes" else config.corpus
        corpus = build_corpus(model, source, ctx_len=config.ctx_len, n_windows=config.n_windows, seed=config.seed)
        hdir = _harvest_dir(config, ident, corpus.fingerprint, units)
        log(f"harvesting {len(units)} units at {config.hook} over {corpus.n_windows} windows of {corpus.ctx_len} "
            f"tokens ({config.corpus}) into {hdir}")
        result = harvest(model, corpus, config.hook, hdir, units=units, k=config.k, batch_size=config.batch_size,
                         n_tail=config.tail, n_random=config.random_windows,
                         seed=config.seed, identity=ident, progress=config.progress)
        records, dead = _live_records(config, result, log)
        label = f"{config.corpus} ({corpus.n_windows}x{corpus.ctx_len}, seed {config.seed})"
        unit_ids = {r.unit: store.add_unit(r, ident.name, label, corpus.fingerprint, model_digest=ident.digest)
                    for r in records}
        ids, new, reused = _explain_and_store(config, model, store, records, unit_ids, log)
        rows = store.explanations(ids=ids)
    return ExplainReport(rows, len(records), dead, new, reused, str(config.db), ident, time.time() - t0,
                         tuple(config.scores))


def _harvest_dir(config: ExplainConfig, ident: ModelIdentity, fingerprint: str, units: list[int]) -> Path:
    """``--harvest-dir``, or a folder next to the store named after the hook, the model (name, weights
    digest, spliced modules' digest), the corpus, k and the units."""
    if config.harvest_dir:
        return Path(config.harvest_dir)
    db = Path(config.db)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ident.name).name)[:40] or "model"
    digest = hashlib.sha256(",".join(map(str, units)).encode()).hexdigest()[:12]
    sae = f"-sae{ident.spliced[:8]}" if ident.spliced else ""
    kept = f"k{config.k}-t{config.tail}-r{config.random_windows}"
    leaf = f"{config.hook}-{name}-{ident.digest[:12]}{sae}-{fingerprint}-{kept}-{digest}"
    return db.with_name(f"{db.stem}-harvest") / leaf


def _live_records(config: ExplainConfig, result: HarvestResult, log) -> tuple[list[UnitRecord], list[str]]:
    units = result.units
    if config.units.strip().startswith("active:"):
        units = _pick_active(config.units, result, config.seed)
    records = [result.record(u) for u in units]
    dead = [r.label for r in records if not r.stats.get("max", 0.0) > 0]
    if dead:
        log(f"skipping {len(dead)} units that never fire on this corpus: {', '.join(dead[:8])}"
            + (" ..." if len(dead) > 8 else ""))
    records = [r for r in records if r.stats.get("max", 0.0) > 0]
    if not records:
        raise ValueError("none of the units fires on this corpus: nothing to explain")
    return records, dead


def _pick_active(spec: str, result: HarvestResult, seed: int) -> list[int]:
    n = _count(spec.strip(), "active")
    alive = [u for i, u in enumerate(result.units) if float(result.stats["max"][i]) > 0
             and int(round(float(result.stats["window_density"][i]) * result.tokens.shape[0])) >= 2]
    if n > len(alive):
        raise ValueError(f"--units {spec}: only {len(alive)} units fire in at least two windows of the corpus")
    return sorted(random.Random(seed).sample(alive, n))


def _explain_and_store(config: ExplainConfig, model, store: ExplanationStore, records: list[UnitRecord],
                       unit_ids: dict[int, int], log) -> tuple[list[int], int, int]:
    from .scoring import score_all

    explainers = [make_explainer(spec, config, model) for spec in config.explainers]
    simulator, judge, causal, scorer_name = make_scorers(config, model, [b for _, b in explainers])
    ids: list[int] = []
    new = reused = 0
    for spec, (explainer, _) in zip(config.explainers, explainers):
        done = {r.unit for r in records if store.has_explanation(unit_ids[r.unit], explainer.name, explainer.settings,
                                                                 config.scores)}
        todo = [r for r in records if r.unit not in done]
        reused += len(done)
        ids += [store.explanation_id(unit_ids[u], explainer.name, explainer.settings) for u in sorted(done)]
        log(f"explaining {len(todo)} units with {explainer.name}" + (f" ({len(records) - len(todo)} already stored)"
                                                                        if len(todo) < len(records) else ""))
        for s in tqdm(range(0, len(todo), EXPLAIN_BATCH), desc=f"explain+score ({spec})", disable=not config.progress,
                      unit="batch"):
            part = todo[s:s + EXPLAIN_BATCH]
            for rec, ex in zip(part, explainer.explain_many(part)):
                with torch.no_grad():
                    sc = score_all(ex.text, rec, model.tokenizer, simulator, judge, causal, list(config.scores))
                ids.append(store.add_explanation(unit_ids[rec.unit], ex, sc, scorer_name))
                new += 1
    return ids, new, reused


def make_explainer(spec: str, config: ExplainConfig, model):
    """The explainer an ``--explainer`` spec names (``top-tokens``, ``local``, an endpoint URL) and the
    chat backend behind it (None for ``top-tokens``), as `run_explain` builds it."""
    from .backends import LocalChatBackend, backend_from_spec
    from .explainer import LLMExplainer, TopTokensExplainer

    if spec == "top-tokens":
        return TopTokensExplainer(model.tokenizer), None
    if spec == "local":
        local = LocalChatBackend(model, progress=config.progress)
        local.name = f"local:{config.model}"
        return LLMExplainer.for_local_model(local, model.tokenizer, n_examples=config.n_examples,
                                            max_tokens=config.explain_tokens), local
    backend = backend_from_spec(spec, endpoint_model=config.explainer_model, api_key_env=config.api_key_env)
    return LLMExplainer(backend, model.tokenizer, n_examples=config.n_examples, max_tokens=config.explain_tokens), backend


def make_scorers(config: ExplainConfig, model, backends: list):
    """``(simulator, judge, causal scorer, scorer name)`` for ``config.scores``, as `run_explain`
    builds them: the simulator of ``config.simulator`` (the likelihood simulator on ``model`` by
    default), the first endpoint among ``backends`` as the judge (else the local chat model)."""
    from .backends import LocalChatBackend
    from .simulator import simulator_for

    methods = set(config.scores)
    endpoint = next((b for b in backends if b is not None and hasattr(b, "request")), None)
    sim_kind = "likelihood" if config.simulator == "auto" else config.simulator
    simulator = None
    if {"correlation", "causal"} & methods:
        simulator = simulator_for(endpoint if sim_kind == "json" else model, sim_kind)
        if sim_kind != "json":
            simulator.name = f"{sim_kind}:{config.model}"  # type: ignore[attr-defined]
    judge = None
    if {"detection", "fuzzing"} & methods:
        judge = endpoint if endpoint is not None else LocalChatBackend(model)
        if endpoint is None:
            judge.name = f"local:{config.model}"
    causal = None
    if "causal" in methods:
        from .causal import CausalScorer

        causal = CausalScorer(model, config.hook, simulator)
    scorer_name = ",".join(n for n in (getattr(simulator, "name", ""), getattr(judge, "name", "")) if n)
    return simulator, judge, causal, scorer_name
