"""Keep freed CPU memory for reuse instead of handing it back to the kernel (Linux, glibc).

Why: ``run_with_cache`` keeps every activation it records (1.9 GB for SmolLM2-135M at 8x128).
With glibc's default settings that memory is returned to the kernel when the cache is dropped,
and the next call page-faults all of it in again: about 475k minor faults per call, 0.3-0.7 s of
a 2.6-2.8 s call in idle runs on the machine where this was written (`bench/bench_llama.py`),
most of what caching costs over a plain forward.
PyTorch's CUDA caching allocator keeps freed GPU memory for the same reason; on CPU, PyTorch's
performance guide suggests preloading jemalloc or tcmalloc. This module gets the same effect from
glibc itself, at run time, with ``mallopt``:

* ``M_MMAP_MAX = 0``: every allocation comes from the heap (large tensors are not ``mmap``-ed and
  ``munmap``-ed on every call);
* ``M_TRIM_THRESHOLD = -1``: glibc never shrinks the heap by itself;
* ``M_TOP_PAD``: the heap grows in steps of ``top_pad_bytes``.

The cost: the process's resident memory stays at its peak (freed memory is reused by later
allocations, not returned). ``release_freed_memory()`` hands it back on demand
(``malloc_trim(0)``), and ``keep_freed_memory(False)`` restores trimming (glibc's static defaults;
glibc's dynamic thresholds cannot be restored within a process).

These settings are process-wide, so the library never changes them by itself: call
``keep_freed_memory()`` once (e.g. at the top of a notebook). The ``tdb-lens`` command turns it on
for its own process unless ``TDB_LENS_KEEP_FREED_MEMORY=0``. Elsewhere than glibc (macOS,
Windows, musl) the calls warn and return False.
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings
from typing import Optional

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
# glibc's static defaults (malloc/malloc.c), used by keep_freed_memory(False)
_GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
ENV_VAR = "TDB_LENS_KEEP_FREED_MEMORY"

_kept = False


def _libc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)  # the C library this process already uses
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


def _unsupported(what: str) -> bool:
    warnings.warn(f"{what}: needs glibc on Linux (this is {platform.system()} "
                  f"{platform.libc_ver()[0] or 'without glibc'}); nothing changed", RuntimeWarning, stacklevel=3)
    return False


def keep_freed_memory(enable: bool = True, top_pad_bytes: int = 64 * 2**20) -> bool:
    """Make glibc keep freed memory for reuse (``enable=True``) or return it again (``False``).

    Returns True when the settings were applied. Process-wide; see the module docstring.
    """
    global _kept
    libc = _libc()
    if libc is None:
        return _unsupported("keep_freed_memory")
    if not 0 <= top_pad_bytes < 2**31:
        raise ValueError(f"top_pad_bytes must be in [0, 2**31), got {top_pad_bytes}")
    settings = ({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1, M_TOP_PAD: top_pad_bytes} if enable
                else dict(_GLIBC_DEFAULTS))
    for param, value in settings.items():
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc mallopt({param}, {value}) failed")
    _kept = enable
    if not enable:
        libc.malloc_trim(ctypes.c_size_t(0))
    return True


def release_freed_memory() -> bool:
    """Return the memory glibc holds free to the kernel now (``malloc_trim(0)``).

    Returns True when glibc released something. Resident memory of live tensors is untouched.
    """
    libc = _libc()
    if libc is None:
        return _unsupported("release_freed_memory")
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory()`` is in effect in this process."""
    return _kept


def keep_freed_memory_from_env() -> bool:
    """What the ``tdb-lens`` command does at start: keep freed memory unless ``TDB_LENS_KEEP_FREED_MEMORY=0``."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on", ""):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {os.environ[ENV_VAR]!r}")
    libc = _libc()
    return False if libc is None else keep_freed_memory(True)
