"""``tdb-lens ioi``: reproduce the IOI circuit on a model and write a report.

    tdb-lens ioi                                   # offline SmolLM2-135M, 100 prompts, runs/ioi
    tdb-lens ioi --model gpt2 --prompts 200 --out runs/ioi-gpt2
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..loading import DEFAULT_MODEL


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdb-lens ioi", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model for tdb_lens.load: smollm2-135m (offline), gpt2, a hub id, a directory or a .gguf file")
    p.add_argument("--prompts", type=int, default=100, help="IOI prompts, spread evenly over the 15 templates x 2 orders")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (names, places, objects)")
    p.add_argument("--out", default="runs/ioi", help="folder for report.json and the heatmaps")
    p.add_argument("--max-heads", type=int, default=40, help="largest circuit the search may return")
    p.add_argument("--target", type=float, default=0.85, help="faithfulness the search aims for")
    p.add_argument("--no-minimality", action="store_true", help="skip completeness and minimality (saves ~1 forward pass per head)")
    p.add_argument("--device", default=None, help="torch device (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.prompts < 1:
        print(f"tdb-lens ioi: --prompts must be at least 1, got {args.prompts}", file=sys.stderr)
        return 2
    if not 0 < args.target <= 1:
        print(f"tdb-lens ioi: --target must be in (0, 1], got {args.target}", file=sys.stderr)
        return 2
    import torch

    from ..loading import load
    from .report import format_report, run_ioi

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load(args.model)
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        print(f"tdb-lens ioi: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 1
    if args.device:
        model = model.to(args.device)
    model.eval()
    report = run_ioi(model, args.prompts, args.seed, model_name=args.model, max_heads=args.max_heads,
                     target_faithfulness=args.target, with_minimality=not args.no_minimality, progress=not args.quiet)
    print(format_report(report.json))
    paths = report.write(args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
