"""Launch a test script under ``torchrun --standalone`` (gloo on CPU, one thread per rank)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240.0, extra_env: dict | None = None,
             torchrun_args: tuple[str, ...] = (), backend: str = "gloo") -> subprocess.CompletedProcess:
    """Run ``tests/{script}`` on ``nproc`` local ranks with ``backend`` (the CPU tests pin gloo, also
    where GPUs exist); returns the finished process (output captured)."""
    env = dict(os.environ)
    env["TDB_LENS_DIST_BACKEND"] = backend
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, str(HERE / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
