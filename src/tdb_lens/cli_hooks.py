"""``tdb-lens hooks``: print every hook point of a model with the shape and named axes of its activation."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .cli import UsageError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tdb-lens hooks", description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="model name, directory or .gguf (default: %(default)s)")
    ap.add_argument("--text", default="Hello world", help="text to run to get the shapes")
    ap.add_argument("--layer", type=int, default=0,
                    help="only show this block's hooks (and model-level ones); negative counts from the end")
    ap.add_argument("--all", action="store_true", help="show every block's hooks")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not args.text.strip():
        raise UsageError("--text is empty: give some text to run")
    import torch

    from .loading import load

    try:
        model = load(args.model)
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        print(f"tdb-lens hooks: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 1
    n_layers = int(model.cfg.n_layers)
    layer = args.layer + n_layers if args.layer < 0 else args.layer
    if not args.all and not 0 <= layer < n_layers:
        raise UsageError(f"--layer {args.layer}: the model has {n_layers} layers (0 to {n_layers - 1}, or -1 to -{n_layers})")
    with torch.no_grad():
        _, cache = model.run_with_cache(args.text)
    for name, act in cache.items():
        lay = model.hook_layout(name)
        if not args.all and lay.layer is not None and lay.layer != layer:
            continue
        print(f"{name:<44} {str(list(act.shape)):<20} [{', '.join(lay.axes)}]")
    print(f"({len(model.hook_dict)} hook points in all, {n_layers} layers)")
    return 0
