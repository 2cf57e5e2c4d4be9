"""``tdb-lens hooks``: print every hook point of a model and the shape of its activation."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tdb-lens hooks", description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="model name, directory or .gguf (default: %(default)s)")
    ap.add_argument("--text", default="Hello world", help="text to run to get the shapes")
    ap.add_argument("--layer", type=int, default=0, help="only show this block's hooks (and model-level ones)")
    args = ap.parse_args(argv)
    from .loading import load

    model = load(args.model)
    with torch.no_grad():
        _, cache = model.run_with_cache(args.text)
    for name, act in cache.items():
        if name.startswith("blocks.") and not name.startswith(f"blocks.{args.layer}."):
            continue
        print(f"{name:<40} {list(act.shape)}")
    print(f"({len(model.hook_dict)} hook points in all)")
    return 0
