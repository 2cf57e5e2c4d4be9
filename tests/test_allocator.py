"""`tdb_lens.allocator`: freed memory is reused without page faults when kept, and handed back on demand.

The settings are process-wide, so each case runs in its own interpreter. The reference is the
kernel's own count of minor page faults (``getrusage``) and resident memory (``/proc/self/statm``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import tdb_lens
from tdb_lens import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="tdb_lens.allocator acts on glibc only (Linux)")

# a cache-like workload: 48 tensors of 4 MiB and one of 64 MiB (above glibc's 32 MiB mmap ceiling),
# written, dropped, then allocated and written again (5 rounds); faults of the last round and RSS measured
SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, torch
    from tdb_lens import allocator
    mode = sys.argv[1]
    if mode in ("keep", "keep_then_default"):
        assert allocator.keep_freed_memory()
    if mode == "keep_then_default":
        assert allocator.keep_freed_memory(False)
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def touch():
        ts = [torch.empty(2**20) for _ in range(48)] + [torch.empty(16 * 2**20)]
        for t in ts:
            t.fill_(1.0)
        return ts
    ts = touch(); peak = rss(); del ts
    after_free = rss()
    for _ in range(3):  # the heap settles (a block may land in not-yet-touched heap the first times)
        ts = touch(); del ts
    f0 = faults(); ts = touch(); again = faults() - f0; del ts
    released = allocator.release_freed_memory() if mode == "keep" else None
    print(json.dumps({"pages": (48 * 4 + 64) * 2**20 // page, "big_pages": 64 * 2**20 // page, "faults_again": again,
                      "peak": peak, "after_free": after_free, "after_release": rss(), "released": released,
                      "kept": allocator.freed_memory_kept()}))
""")


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_default_glibc_refaults_freed_memory():
    """The problem being solved: with glibc's defaults freed memory goes back to the kernel and is faulted in
    again. Always for a block above glibc's 32 MiB mmap ceiling; the 4 MiB blocks depend on glibc's
    dynamic thresholds (all of them re-faulted in most runs here)."""
    r = _run("default")
    assert r["faults_again"] > 0.95 * r["big_pages"], r
    assert r["after_free"] < r["peak"] - 128 * 2**20, r  # the 256 MiB went back to the kernel
    assert r["kept"] is False


@needs_glibc
def test_kept_memory_is_reused_without_faults_and_released_on_demand():
    r = _run("keep")
    assert r["kept"] is True
    assert r["faults_again"] < 0.02 * r["pages"], r
    assert r["after_free"] > r["peak"] - 16 * 2**20, r  # still resident after the tensors died
    assert r["released"] is True
    assert r["after_release"] < r["peak"] - 192 * 2**20, r  # malloc_trim gave it back


@needs_glibc
def test_keep_false_restores_trimming():
    r = _run("keep_then_default")
    assert r["kept"] is False
    assert r["after_free"] < r["peak"] - 128 * 2**20, r
    assert r["faults_again"] > 0.95 * r["pages"], r  # static 128 KiB mmap threshold: every block mmapped


def test_bad_arguments_and_env_values_are_named(monkeypatch):
    with pytest.raises(ValueError, match="top_pad_bytes"):
        allocator.keep_freed_memory(top_pad_bytes=-1)
    monkeypatch.setenv(allocator.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="TDB_LENS_KEEP_FREED_MEMORY must be 0 or 1"):
        allocator.keep_freed_memory_from_env()
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert allocator.keep_freed_memory_from_env() is False
    assert tdb_lens.keep_freed_memory is allocator.keep_freed_memory


def test_unsupported_platform_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    with pytest.warns(RuntimeWarning, match="needs glibc"):
        assert allocator.keep_freed_memory() is False
    with pytest.warns(RuntimeWarning, match="needs glibc"):
        assert allocator.release_freed_memory() is False
    assert allocator.freed_memory_kept() is False


@needs_glibc
def test_cli_process_keeps_freed_memory_unless_opted_out():
    # a real subcommand turns it on (its --help exits after that point)
    code = ("import sys, contextlib, io; from tdb_lens import cli, allocator\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(['hooks', '--help'])\n    except SystemExit:\n        pass\n"
            "print(allocator.freed_memory_kept())")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={k: v for k, v in os.environ.items() if k != allocator.ENV_VAR})  # unset = on
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, allocator.ENV_VAR: "0"})
    assert on.stdout.strip().splitlines()[-1] == "True", on.stderr
    assert off.stdout.strip().splitlines()[-1] == "False", off.stderr
