"""Run under ``torchrun`` or in a plain process with the same code: one helper around torch.distributed.

    from tdb_lens import distributed

    dist = distributed.init()          # a no-op (rank 0 of 1) in a plain process
    rows = dist.shard(len(prompts))    # this rank's contiguous block of a sequence
    total = dist.all_reduce(local_sum) # sum over ranks (the tensor itself in a plain process)
    for x in tqdm(..., disable=not dist.progress()):   # progress bars on rank 0 only
    dist.log.info("...")               # "[rank 1/2] ..." on every rank

`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``);
without it (a plain ``python`` process) it initialises nothing and returns rank 0 of 1. Under
torchrun it joins the process group (``env://`` rendezvous, which torchrun provides on one or many
machines), with the **NCCL** backend when every local rank has its own GPU and **gloo** otherwise,
puts each rank on one device (``cuda:LOCAL_RANK`` or the CPU) and gives each rank its share of the
CPU threads (``os.cpu_count() // LOCAL_WORLD_SIZE``, or ``OMP_NUM_THREADS`` when set, or the
``threads`` argument). Calling `init` again returns the same context.

Collectives (`Dist.all_reduce`, `Dist.all_gather_rows`, `Dist.all_gather_object`, `Dist.broadcast_object`,
`Dist.barrier`) are identity operations in a plain process, so a caller never branches on the world size.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as tdist

__all__ = ["Dist", "init", "current", "shutdown", "env_world", "rank_logger"]

_ENV_KEYS = ("RANK", "WORLD_SIZE")


def env_world() -> Optional[tuple[int, int, int, int]]:
    """``(rank, world_size, local_rank, local_world_size)`` from torchrun's environment, or None when
    this process was not started by torchrun (or a compatible launcher)."""
    if not all(k in os.environ for k in _ENV_KEYS):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (as torchrun sets them), "
                         f"got RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < max(1, local_world)):
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} "
                         f"LOCAL_WORLD_SIZE={local_world}; expected 0 <= RANK < WORLD_SIZE, 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE")
    return rank, world, local_rank, local_world


class _RankFilter(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.prefix
        return True


def rank_logger(rank: int, world_size: int, name: str = "tdb_lens.ranks") -> logging.Logger:
    """The ``name`` logger (its own, not propagating to ``tdb_lens``), printing ``[rank R/W] message``
    to stderr at INFO and above."""
    log = logging.getLogger(name)
    prefix = f"rank {rank}/{world_size}"
    if not any(getattr(h, "_tdb_rank", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(rank)s] %(message)s"))
        h._tdb_rank = True  # type: ignore[attr-defined]
        log.addHandler(h)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
        log.propagate = False
    for handler in log.handlers:
        if getattr(handler, "_tdb_rank", False):
            handler.filters = [_RankFilter(prefix)]
    return log


@dataclass
class Dist:
    """Where this process stands: rank, world size, device, backend (None in a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: Optional[int] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is up."""
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def log(self) -> logging.Logger:
        return rank_logger(self.rank, self.world_size)

    def progress(self, enabled: bool = True) -> bool:
        """Whether this rank shows progress bars: ``enabled`` on rank 0, never elsewhere."""
        return bool(enabled) and self.is_main

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)``: blocks are disjoint, in rank order, cover
        ``range(n)`` and differ in size by at most one (the first ``n % world`` ranks get one more)."""
        if n < 0:
            raise ValueError(f"cannot shard a negative count {n}")
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    # -- collectives (identities in a plain process) ------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A new tensor: ``tensor`` reduced over ranks (``op``: sum, max, min); on ``tensor``'s device."""
        ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
        if not self.distributed:
            return tensor.clone()
        work = tensor.detach().to(self.device, copy=True).contiguous()
        tdist.all_reduce(work, op=ops[op])
        return work.to(tensor.device)

    def all_gather_rows(self, local: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
        """Concatenate every rank's ``local [n_r, ...]`` in rank order (the inverse of `shard`):
        ``[sum n_r, ...]`` on every rank. ``n``: the total, checked when given."""
        if not self.distributed:
            out = local.clone()
        else:
            sizes = torch.zeros(self.world_size, dtype=torch.long, device=self.device)
            sizes[self.rank] = local.shape[0]
            tdist.all_reduce(sizes)
            width = int(sizes.max())
            pad = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=self.device)
            pad[: local.shape[0]] = local.detach().to(self.device)
            parts = [torch.empty_like(pad) for _ in range(self.world_size)]
            tdist.all_gather(parts, pad)
            out = torch.cat([p[: int(s)] for p, s in zip(parts, sizes.tolist())]).to(local.device)
        if n is not None and out.shape[0] != n:
            raise ValueError(f"gathered {out.shape[0]} rows from {self.world_size} ranks, expected {n}")
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (JSON-able values; pickled only between our own ranks)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (JSON-able values; pickled only between our own ranks)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]


_CURRENT: Optional[Dist] = None


def _pick_backend(local_world: int, backend: Optional[str]) -> str:
    backend = backend or os.environ.get("TDB_LENS_DIST_BACKEND") or None
    if backend is not None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl' (argument or TDB_LENS_DIST_BACKEND), got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA GPUs and torch.cuda.is_available() is False here; use 'gloo'")
        return backend
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world and tdist.is_nccl_available():
        return "nccl"
    return "gloo"


def _threads_for(local_world: int, threads: Optional[int]) -> int:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return threads
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def _attempt_store(timeout_s: float) -> tdist.Store:
    """The launcher's store (``env://`` rendezvous) under a prefix naming torchrun's restart attempt, so
    that a restarted job never reads the addresses its killed attempt published."""
    store, _, _ = next(tdist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"tdb_lens/attempt-{attempt}", store)


def init(threads: Optional[int] = None, backend: Optional[str] = None, timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group (module docstring); a no-op returning rank 0 of 1 in a plain process.

    ``threads``: CPU threads of this rank (default: its share of the cores; in a plain process the
    thread count is left alone unless given). ``backend``: force "gloo" or "nccl" (default: the
    ``TDB_LENS_DIST_BACKEND`` environment variable, else the choice above).
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = env_world()
    if world is None:
        if threads is not None:
            torch.set_num_threads(_threads_for(1, threads))
        _CURRENT = Dist(threads=threads)
        return _CURRENT
    rank, size, local_rank, local_world = world
    chosen = _pick_backend(local_world, backend)
    device = torch.device("cpu")
    if chosen == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    n_threads = _threads_for(local_world, threads)
    torch.set_num_threads(n_threads)
    owns = False
    if not tdist.is_initialized():
        kw: dict[str, Any] = {"backend": chosen, "timeout": timedelta(seconds=timeout_s)}
        if chosen == "nccl":
            kw["device_id"] = device
        tdist.init_process_group(store=_attempt_store(timeout_s), rank=rank, world_size=size, **kw)
        owns = True
    _CURRENT = Dist(rank, size, local_rank, local_world, chosen, device, n_threads, owns)
    return _CURRENT


def current() -> Dist:
    """The context `init` returned, or a plain rank-0-of-1 context when `init` was not called."""
    return _CURRENT if _CURRENT is not None else Dist()


def shutdown() -> None:
    """Leave the process group `init` joined (nothing otherwise); `init` may be called again after."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()
    _CURRENT = None
