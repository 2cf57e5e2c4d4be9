"""``tdb-lens debug``: serve the debugger's web app (default: the offline SmolLM2 on 127.0.0.1)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .app import create_app, needs_token, new_token


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdb-lens debug", description="Transformer Debugger's workflow in the browser.")
    p.add_argument("--model", default="smollm2-135m", help="model name, hub id, folder or .gguf (default: offline SmolLM2)")
    p.add_argument("--sae", action="append", default=[], metavar="DIR", help="an SAE to attach (repeatable)")
    p.add_argument("--db", default=None, metavar="STORE", help="explanation store (SQLite) for unit pages and search")
    p.add_argument("--harvest-dir", action="append", default=[], metavar="D",
                   help="a harvest directory, or a folder of them (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; others need the token)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="access token (default: random when --host is not loopback)")
    p.add_argument("--prompt", default="", help="the prompt the page opens with")
    return p


def build(args: argparse.Namespace):
    """``(app, token)`` for the parsed arguments (loads the model and SAEs)."""
    from ..loading import load
    from .investigation import Investigation

    model = load(args.model)
    saes = []
    if args.sae:
        from ..sae.loading import load_sae

        saes = [load_sae(d) for d in args.sae]
    inv = Investigation(model, args.prompt, saes=saes, store=args.db, harvest_dirs=args.harvest_dir)
    token = args.token or (new_token() if needs_token(args.host) else None)
    return create_app(inv, token), token


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    import uvicorn

    app, token = build(args)
    url = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"tdb-lens debug: open {url}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
