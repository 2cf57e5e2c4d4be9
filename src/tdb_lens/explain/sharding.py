"""A harvest split across torchrun's ranks (one machine or many), merged into the 1-process result.

    torchrun --nproc_per_node 2 my_harvest.py      # each rank: harvest_sharded(model, corpus, hook, "runs/h")

Rank ``r`` of ``n`` harvests the batches ``b`` of the corpus with ``b % n == r`` (a batch is a run
of whole windows, so a window never spans ranks; the split depends only on the batch size and the
world size) into its own harvest directory ``out_dir/rank-{r}-of-{n}/`` (an ordinary
`tdb_lens.explain.harvest` directory: manifest, corpus, state and window scores; nothing is shared
between ranks while they work). After a barrier, rank 0 merges the shards with
`tdb_lens.explain.harvest.load_harvest`; any later process can merge them with `load_sharded`.

The merge equals the 1-process harvest: the top-k keep the same windows with ties broken by window
index, the per-token tails the same tokens with ties broken by token index, the uniform samples use
per-(window, unit) priorities that do not depend on who saw the window, the random windows are
drawn from the seed, quantile edges come from every window's score; only the float64 sums behind
mean and std are added in another order.

A killed rank makes torchrun fail the job (non-zero exit; the other ranks are stopped). Running the
same command again (or torchrun's ``--max-restarts``) resumes every rank from its last complete
batch. A rerun with another world size is refused (its batches would overlap the old shards).

`consolidate` turns a finished sharded harvest into an ordinary one-directory harvest (one worker
holding every batch), which `harvest` with the same arguments reads back without running the
model (what ``tdb-lens explain`` does under torchrun).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from ..corpus import Corpus
from ..distributed import Dist
from ..distributed import init as dist_init
from .harvest import HarvestResult, harvest, load_harvest
from .harvest_state import _State

__all__ = ["harvest_sharded", "load_sharded", "shard_dirs", "shard_dir", "consolidate"]

_SHARD = re.compile(r"rank-(\d+)-of-(\d+)")


def shard_dir(out_dir: Union[str, os.PathLike], rank: int, world_size: int) -> Path:
    """The harvest directory of rank ``rank`` of ``world_size`` under ``out_dir``."""
    return Path(out_dir) / f"rank-{rank}-of-{world_size}"


def shard_dirs(out_dir: Union[str, os.PathLike]) -> tuple[int, list[Path]]:
    """``(world_size, [rank 0's dir, rank 1's dir, ...])`` of the sharded harvest in ``out_dir``
    (world size 0 and no dirs when there is none yet); raises when shards of two world sizes mix."""
    out = Path(out_dir)
    found: dict[int, list[tuple[int, Path]]] = {}
    if out.is_dir():
        for p in out.iterdir():
            m = _SHARD.fullmatch(p.name)
            if m and p.is_dir():
                found.setdefault(int(m.group(2)), []).append((int(m.group(1)), p))
    if not found:
        return 0, []
    if len(found) > 1:
        raise ValueError(f"{out} holds shards of harvests with {sorted(found)} ranks; keep one set (delete the others)")
    (world, dirs), = found.items()
    return world, [p for _, p in sorted(dirs)]


def harvest_sharded(model: Any, corpus: Corpus, hook: str, out_dir: Union[str, os.PathLike],
                    dist: Optional[Dist] = None, progress: bool = True, merge: bool = True,
                    **kwargs: Any) -> Optional[HarvestResult]:
    """Harvest this rank's shard of ``corpus`` into ``out_dir/rank-{r}-of-{n}`` (module docstring).

    ``dist``: the process's `tdb_lens.distributed.Dist` (default: `tdb_lens.distributed.init()`,
    rank 0 of 1 in a plain process, which harvests everything into ``rank-0-of-1``). ``kwargs`` are
    `tdb_lens.explain.harvest.harvest`'s (units, k, n_sample, n_random, n_quantiles, threshold, n_tail,
    batch_size, seed, reduce, checkpoint_every, model_name, identity); ``worker``/``n_workers`` are
    this function's to set. Returns the merged result on rank 0 (when ``merge``), None elsewhere.
    """
    for key in ("worker", "n_workers", "out_dir"):
        if key in kwargs:
            raise TypeError(f"harvest_sharded sets {key!r} itself (from the rank and world size); do not pass it")
    d = dist if dist is not None else dist_init()
    old_world, _ = shard_dirs(out_dir)
    if old_world and old_world != d.world_size:
        raise ValueError(f"{out_dir} holds a harvest sharded over {old_world} ranks, this run has {d.world_size}: "
                         f"run with --nproc_per_node/--nnodes giving {old_world} ranks to resume it, or use another directory")
    d.barrier()  # every rank has checked before any rank writes
    mine = shard_dir(out_dir, d.rank, d.world_size)
    # (harvest() also merges this rank's own shard on return: a small cost next to the forwards)
    harvest(model, corpus, hook, mine, worker=d.rank, n_workers=d.world_size, progress=d.progress(progress), **kwargs)
    d.barrier()  # every shard is complete
    if not (merge and d.is_main):
        return None
    return load_sharded(out_dir)


def load_sharded(out_dir: Union[str, os.PathLike]) -> HarvestResult:
    """Merge every rank's shard under ``out_dir`` into one `HarvestResult` (``complete`` says whether
    every batch is in)."""
    world, dirs = shard_dirs(out_dir)
    if not dirs:
        raise FileNotFoundError(f"{out_dir} holds no sharded harvest (no rank-R-of-N directories)")
    have = [p for p in dirs if (p / "manifest.json").exists()]
    if not have:
        raise FileNotFoundError(f"no shard under {out_dir} has started harvesting yet")
    return load_harvest(*have)


def consolidate(out_dir: Union[str, os.PathLike], dest: Union[str, os.PathLike]) -> HarvestResult:
    """Write the finished sharded harvest in ``out_dir`` to ``dest`` as a 1-worker harvest directory
    (manifest, corpus, ``worker-0-of-1`` with the merged state and every window-score file, the state
    written last), and return it loaded. ``dest`` must be new or hold no worker yet."""
    merged = load_sharded(out_dir)
    if not merged.complete:
        bs = merged.config.batch_size
        missing = sorted(set(range((merged.tokens.shape[0] + bs - 1) // bs)) - set(merged.done_batches))[:5]
        raise ValueError(f"the sharded harvest in {out_dir} is not finished (batches {missing}... missing): "
                         "run the same torchrun command again to complete it")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.glob("worker-*-of-*"))):
        raise ValueError(f"{dest} already holds a harvest worker (or is a file); consolidate into a new directory")
    _, dirs = shard_dirs(out_dir)
    wdir = dest / "worker-0-of-1"
    (wdir / "wmax").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.safetensors", "manifest.json"):  # the manifest last: it marks a harvest directory
        shutil.copyfile(dirs[0] / name, dest / name)
    state: Optional[_State] = None
    for shard in dirs:
        for worker in sorted(shard.glob("worker-*-of-*")):
            st = _State.load(worker / "state.safetensors")
            starts = {b * merged.config.batch_size for b in st.done}
            for f in (worker / "wmax").glob("*.safetensors"):
                if int(f.stem) in starts:
                    shutil.copyfile(f, wdir / "wmax" / f.name)
            if state is None:
                state = st
            else:
                state.merge(st)
    assert state is not None
    state.save(wdir / "state.safetensors")
    return load_harvest(dest)
