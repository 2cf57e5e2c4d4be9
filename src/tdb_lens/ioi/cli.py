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
    p.add_argument("--no-minimality", action="store_true",
                   help="skip completeness and minimality (saves ~1 forward pass per head)")
    p.add_argument("--device", default=None, help="torch device (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


REPORT_FILES = ("report.json", "head_patching.png", "direct_effects.png", "detectors.png")


def check_args(args: argparse.Namespace) -> None:
    """Raise `UsageError` for the first bad argument (nothing loaded or written yet)."""
    from ..cli import UsageError

    if args.prompts < 1:
        raise UsageError(f"--prompts must be at least 1, got {args.prompts}")
    if args.max_heads < 1:
        raise UsageError(f"--max-heads must be at least 1, got {args.max_heads}")
    if not 0 < args.target <= 1:
        raise UsageError(f"--target must be in (0, 1], got {args.target}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.device is not None:
        check_device(args.device)
    check_out_dir(args.out, REPORT_FILES)


def check_device(spec: str) -> None:
    """A torch device this machine has, or `UsageError` saying what is wrong."""
    import torch

    from ..cli import UsageError

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {spec}: this machine has {n} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec}: only cpu, cuda and mps are supported")


def check_out_dir(out: str, ours: tuple[str, ...]) -> None:
    """``out`` must be creatable, or a directory that is empty or holds only files this command writes."""
    import os
    from pathlib import Path

    from ..cli import UsageError

    if not out or not out.strip():
        raise UsageError("--out is empty: give a folder for the report")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (it is created if missing)")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in ours and not p.name.endswith(".tmp"))
        if others:
            raise UsageError(f"--out {out} is not empty ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); "
                             "give a new or empty folder, or one holding an earlier report (overwritten)")
    parent = path.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: {parent} is not a writable folder")


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    check_args(args)
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
    from .. import distributed
    from .sharding import ShardedIOIContext  # under torchrun: the circuit metrics split the prompts over the ranks

    dist = distributed.init()
    report = run_ioi(model, args.prompts, args.seed, model_name=args.model, max_heads=args.max_heads,
                     target_faithfulness=args.target, with_minimality=not args.no_minimality,
                     progress=dist.progress(not args.quiet), context=ShardedIOIContext)
    if not dist.is_main:  # rank 0 prints and writes the report
        return 0
    print(format_report(report.json))
    paths = report.write(args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
