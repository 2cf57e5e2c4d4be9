"""``tdb-lens debug``: serve the debugger's web app (default: the offline SmolLM2 on 127.0.0.1).

"Explain this unit" takes the same explainer, simulator and score settings as ``tdb-lens explain``
(default: the top-token baseline scored by the likelihood simulator on the model, offline):

    tdb-lens debug --db runs/e.db --harvest-dir runs/h --explainer local
    OPENAI_API_KEY=... tdb-lens debug --db runs/e.db --harvest-dir runs/h --explainer https://api.openai.com/v1 \
        --explainer-model gpt-4o-mini
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..explain.cli import add_explainer_arguments, explainer_options
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
    add_explainer_arguments(p, default_explainer="top-tokens", several=False)
    return p


def build(args: argparse.Namespace):
    """``(app, token)`` for the parsed arguments (loads the model and SAEs)."""
    from ..loading import load
    from .explaining import check_explainer_options, explaining_from_options
    from .investigation import Investigation

    options = explainer_options(args)
    check_explainer_options(options)  # before anything is loaded
    model = load(args.model)
    ex = explaining_from_options(model, options, args.model)
    saes = []
    if args.sae:
        from ..sae.loading import load_sae

        saes = [load_sae(d) for d in args.sae]
    inv = Investigation(model, args.prompt, saes=saes, store=args.db, harvest_dirs=args.harvest_dir,
                        explainer=ex.explainer, simulator=ex.simulator, judge=ex.judge, scores=ex.scores)
    token = args.token or (new_token() if needs_token(args.host) else None)
    return create_app(inv, token), token


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    import uvicorn

    try:
        app, token = build(args)
    except (ValueError, TypeError) as e:
        print(f"tdb-lens debug: error: {e}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"tdb-lens debug: open {url}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
