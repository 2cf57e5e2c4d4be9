"""``tdb-lens``: the command line. Each subcommand lives with the code it runs.

A subcommand module has ``main(argv) -> int``; it checks every argument before doing work and
reports a user's mistake as one line on stderr with a non-zero exit (argparse's ``error()``, or a
`UsageError` that this dispatcher prints), never a traceback.
"""

from __future__ import annotations

import importlib
import sys


class UsageError(Exception):
    """A user's mistake in a command line: printed as ``tdb-lens <command>: error: <message>``, exit 2."""

SUBCOMMANDS = {
    "ioi": ("tdb_lens.ioi.cli", "reproduce the IOI circuit on a model (default: offline SmolLM2-135M)"),
    "sae": ("tdb_lens.sae.cli", "train or evaluate a sparse autoencoder on a model's activations"),
    "explain": ("tdb_lens.explain.cli", "harvest, explain, score and store explanations of units"),
    "hooks": ("tdb_lens.cli_hooks", "list a model's hook points with their shapes"),
    "debug": ("tdb_lens.debugger.cli", "serve the debugger (node table, trace, ablate, unit pages) in the browser"),
}


def usage() -> str:
    lines = ["usage: tdb-lens [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "tdb-lens <command> --help shows a command's options."]
    return "\n".join(lines)


def version() -> str:
    from . import __version__

    return f"tdb-lens {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        print(f"tdb-lens: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # this process is ours: keep freed memory for reuse (tdb_lens.allocator; TDB_LENS_KEEP_FREED_MEMORY=0 to opt out)
    from .allocator import keep_freed_memory_from_env

    keep_freed_memory_from_env()
    from .distributed_cli import run_under_torchrun  # None in a plain process

    status = run_under_torchrun(cmd, rest)
    if status is not None:
        return status
    module = importlib.import_module(SUBCOMMANDS[cmd][0])
    try:
        return int(module.main(rest) or 0)
    except UsageError as e:
        print(f"tdb-lens {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tdb-lens {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # ``python -m tdb_lens.cli``: run the package's module, whose UsageError the subcommands raise
    from tdb_lens.cli import main as package_main

    sys.exit(package_main())
