"""The ``provenance`` block every results file carries (when, on what, by which command), which the
README's figure check (tests/test_readme_figures.py) requires of every file the README links to."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Optional

import torch


def provenance(script: str, argv: Optional[list[str]] = None, note: str = "") -> dict:
    """``{"date", "machine", "command"}`` for a run of ``bench/{script}`` with ``argv`` (default: this
    process's arguments), the load averages at the time of the call included in ``machine``."""
    args = sys.argv[1:] if argv is None else list(argv)
    load = os.getloadavg()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    machine = (f"{os.cpu_count()} CPU cores{gpu}, {platform.platform()}, Python {platform.python_version()}, "
               f"torch {torch.__version__}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} when written")
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
           "command": " ".join(["python", f"bench/{script}", *args])}
    if note:
        out["note"] = note
    return out


def write_results(path: str, results: dict, script: str, argv: Optional[list[str]] = None) -> None:
    """Add the `provenance` block to ``results`` and write them as JSON to ``path`` (folders made)."""
    import json
    from pathlib import Path

    results["provenance"] = provenance(script, argv)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}", file=sys.stderr)
