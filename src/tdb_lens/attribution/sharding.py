"""Patching sweeps split over torchrun's ranks by prompt (data parallel), reduced to the 1-process numbers.

    from tdb_lens.attribution import activation_patch, LogitDiff
    from tdb_lens.attribution.sharding import sharded_patch

    scores = sharded_patch(activation_patch, model, clean, corrupted,
                           lambda rows: LogitDiff(io[rows], s[rows], pos=end[rows]), nodes)

Every rank tokenises the whole input (so padding and positions are those of the 1-process run),
takes its contiguous block of prompts (`tdb_lens.distributed.Dist.shard`), runs the front-end
(`activation_patch`, `attribution_patch`, `path_patch`, or anything with their
``(model, clean, corrupted, metric, ..., normalise=, clean_mask=, corrupted_mask=)`` signature)
unnormalised on those prompts, and the ranks add ``n_prompts x batch mean`` for every node and for the
clean and corrupted baselines (float64 all-reduce). Dividing by the total number of prompts gives the
batch means of the 1-process run, normalised the same way (0 = corrupted, 1 = clean). The metric
must therefore be a mean over prompts (every built-in metric is); ``metric_for_rows(rows)`` builds
it for the rows ``rows`` (a LongTensor of prompt indices), slicing any per-prompt targets and
positions. In a plain process the one rank takes every prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int

from ..distributed import Dist
from ..distributed import init as dist_init
from .inputs import prepare, setup_runs
from .metrics import MetricLike

__all__ = ["shard_rows", "sharded_patch", "reduce_means", "mean_over_rows"]


def shard_rows(n: int, dist: Optional[Dist] = None) -> Int[torch.Tensor, " n_r"]:
    """This rank's prompt indices ``[n_r]`` of ``n`` (contiguous, disjoint, in rank order)."""
    d = dist if dist is not None else dist_init()
    if n < d.world_size:
        raise ValueError(f"{n} prompts cannot be split over {d.world_size} ranks: give at least one prompt per rank")
    r = d.shard(n)
    return torch.arange(r.start, r.stop, dtype=torch.long)


def reduce_means(local_means: Float[torch.Tensor, "*shape"], n_local: int, n_total: int,
                 dist: Optional[Dist] = None) -> Float[torch.Tensor, "*shape"]:
    """Batch means over every rank's prompts from each rank's means over its ``n_local`` prompts
    (float64 sums; the result has ``local_means``' dtype)."""
    d = dist if dist is not None else dist_init()
    total = d.all_reduce(local_means.detach().to(torch.float64) * n_local)
    return (total / n_total).to(local_means.dtype)


def mean_over_rows(fn: Callable[[torch.Tensor], torch.Tensor], rows: Union[Int[torch.Tensor, " rows"], Sequence[int]],
                   shape: tuple[int, ...],
                   dist: Optional[Dist] = None) -> Float[torch.Tensor, "*shape"]:
    """The mean over ``rows`` of a per-row quantity, with ``rows`` split over the ranks.

    ``fn(part)`` returns the quantity's mean over the rows ``part`` (a LongTensor), shaped
    ``shape``; each rank calls it on its contiguous block of ``rows`` (a rank with no rows adds
    nothing and does not call it) and `reduce_means` weighs the blocks by their sizes (float64
    sums), so every rank gets the mean over all of ``rows`` as float32. In a plain process this is
    ``fn(rows)``."""
    d = dist if dist is not None else dist_init()
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if not d.distributed:
        return fn(rows)
    r = d.shard(len(rows))
    mine = rows[r.start:r.stop]
    if len(mine):
        local = fn(mine).detach().to("cpu", torch.float64)
        if tuple(local.shape) != tuple(shape):
            raise ValueError(f"fn returned shape {tuple(local.shape)} for {len(mine)} rows, expected {tuple(shape)}")
    else:
        local = torch.zeros(shape, dtype=torch.float64)
    return reduce_means(local, len(mine), len(rows), d).float()


def _baselines(model: Any, tokens: tuple, masks: tuple, metric: MetricLike) -> torch.Tensor:
    """``[metric(clean), metric(corrupted)]`` batch means on this rank's prompts."""
    runs = setup_runs(model, tokens[0], tokens[1], metric, masks[0], masks[1])
    with torch.no_grad():
        clean = model(runs.clean, attention_mask=runs.clean_mask)
        corrupted = model(runs.corrupted, attention_mask=runs.corrupted_mask)
    runs.set_baselines(clean, runs.metric(corrupted))
    return torch.tensor([runs.clean_value, runs.corrupted_value], dtype=torch.float64)


def sharded_patch(
    fn: Callable[..., torch.Tensor],
    model: Any,
    clean: Any,
    corrupted: Any,
    metric_for_rows: Callable[[torch.Tensor], MetricLike],
    *args: Any,
    normalise: bool = True,
    clean_mask: Optional[torch.Tensor] = None,
    corrupted_mask: Optional[torch.Tensor] = None,
    dist: Optional[Dist] = None,
    progress: bool = True,
    **kwargs: Any,
) -> Float[torch.Tensor, " n_nodes"]:
    """``fn(model, clean, corrupted, metric, *args, **kwargs)`` over every rank's prompts (module
    docstring); the same ``[n_nodes]`` on every rank. ``progress``: bars on rank 0 only."""
    d = dist if dist is not None else dist_init()
    tc, mc = prepare(model, clean, clean_mask)
    tx, mx = prepare(model, corrupted, corrupted_mask)
    if tc.shape != tx.shape:
        raise ValueError(f"clean tokens {tuple(tc.shape)} and corrupted tokens {tuple(tx.shape)} must have the same shape")
    n = tc.shape[0]
    rows = shard_rows(n, d)
    metric = metric_for_rows(rows)
    pick = (tc[rows], tx[rows]), (None if mc is None else mc[rows], None if mx is None else mx[rows])
    if "progress" in kwargs:
        raise TypeError("pass progress= once (sharded_patch shows bars on rank 0 only)")
    local = fn(model, pick[0][0], pick[0][1], metric, *args, normalise=False, clean_mask=pick[1][0],
               corrupted_mask=pick[1][1], **({"progress": d.progress(progress)} if _takes_progress(fn) else {}), **kwargs)
    base = _baselines(model, pick[0], pick[1], metric)
    values = reduce_means(torch.cat([local.detach().double().cpu().reshape(-1), base]), len(rows), n, d)
    out, (clean_v, corrupted_v) = values[:-2], values[-2:].tolist()
    if not normalise:
        return out.float().reshape(local.shape)
    denom = clean_v - corrupted_v
    if abs(denom) < 1e-12:
        raise ValueError(f"metric(clean) == metric(corrupted) == {clean_v:.6g} over all prompts: nothing to normalise "
                         "by; pass normalise=False")
    return ((out - corrupted_v) / denom).float().reshape(local.shape)


def _takes_progress(fn: Callable) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
