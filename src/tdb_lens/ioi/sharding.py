"""IOI discovery split over torchrun's ranks by prompt, reduced to the 1-process numbers.

`ShardedIOIContext` is an `IOIContext` whose circuit metrics (``circuit_ld``, and through it
``faithfulness``, ``ablate_only``, completeness and minimality; ``circuit_attribution``) split their
prompts over the ranks, and whose ``dist`` is torchrun's (`tdb_lens.distributed.current`), so the
passes before the search that read it split too: head direct effects, attribution by position and
path patching into the name movers' queries by prompt, the head detectors by random sequence (every
rank draws the same ``n_seqs`` sequences from the seed and scores its block, so the union is the
1-process set). `tdb_lens.ioi.discover` and `tdb_lens.ioi.run_ioi` thus run data parallel from
start to end with no flag (``tdb-lens ioi`` under torchrun uses it). The free functions below do
the same for one call on a plain `IOIContext`; the passes take ``rows=`` / ``dist=`` themselves.

Every rank builds the same `IOIContext` (same prompts, ABC corruption and per-template means),
then evaluates its contiguous block of prompts (`tdb_lens.distributed.Dist.shard`); per-prompt
logit differences are gathered in prompt order, means are ``n_prompts x mean`` summed over ranks
in float64 (`tdb_lens.attribution.sharding.reduce_means`, `mean_over_rows`); a rank left without
prompts adds nothing. The functions mirror the context's methods (``ctx.circuit_ld``,
``ctx.faithfulness``, ``ctx.circuit_attribution``) and return the same numbers on every rank. In a
plain process the one rank takes every prompt.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float

from ..attribution.sharding import reduce_means, shard_rows
from ..distributed import Dist, current
from ..distributed import init as dist_init
from .discovery import Head, IOIContext

__all__ = ["ShardedIOIContext", "sharded_prompt_ld", "sharded_circuit_ld", "sharded_faithfulness",
           "sharded_circuit_attribution"]


def _dist(dist: Optional[Dist]) -> Dist:
    return dist if dist is not None else dist_init()


def sharded_prompt_ld(ctx: IOIContext, keep: Optional[set[Head]] = None,
                      dist: Optional[Dist] = None) -> Float[torch.Tensor, " batch"]:
    """Logit difference of every prompt ``[batch]``, in prompt order: the clean model's, or with
    every head outside ``keep`` mean-ablated (the paper's ablation) when ``keep`` is given."""
    d = _dist(dist)
    rows = shard_rows(len(ctx.clean.end), d)
    hooks = () if keep is None else ctx.ablation_hooks(set(keep), rows)
    local = ctx.run_ld(hooks, rows).detach().float().cpu()
    return d.all_gather_rows(local, n=len(ctx.clean.end))


def sharded_circuit_ld(ctx: IOIContext, keep: set[Head], dist: Optional[Dist] = None) -> float:
    """``ctx.circuit_ld(keep)`` with the prompts split over the ranks."""
    return float(sharded_prompt_ld(ctx, keep, dist).mean())


def sharded_faithfulness(ctx: IOIContext, circuit: set[Head], dist: Optional[Dist] = None) -> float:
    """``ctx.faithfulness(circuit)`` with the prompts split over the ranks."""
    return sharded_circuit_ld(ctx, circuit, dist) / float(ctx.clean_ld.mean())


def sharded_circuit_attribution(ctx: IOIContext, keep: set[Head],
                                dist: Optional[Dist] = None) -> tuple[float, Float[torch.Tensor, "layer head"]]:
    """``ctx.circuit_attribution(keep)`` with the prompts split over the ranks: the circuit's mean
    logit difference and the ``[layer, head]`` estimates (means over every prompt)."""
    d = _dist(dist)
    n = len(ctx.clean.end)
    rows = shard_rows(n, d)
    ld, est = ctx.circuit_attribution(set(keep), rows)
    flat = torch.cat([torch.tensor([ld], dtype=torch.float64), est.detach().double().reshape(-1)])
    total = reduce_means(flat, len(rows), n, d)
    return float(total[0]), total[1:].reshape(est.shape).to(est.dtype)


class ShardedIOIContext(IOIContext):
    """An `IOIContext` whose circuit metrics split their prompts over the ranks of
    `tdb_lens.distributed.current()` (module docstring); the ordinary context in a plain process."""

    @property
    def dist(self) -> Dist:
        """torchrun's ranks (`tdb_lens.distributed.current`): the passes of `tdb_lens.ioi.discovery` split over them."""
        return current()

    def _my_rows(self, rows: Optional[torch.Tensor]) -> tuple[Dist, torch.Tensor, torch.Tensor]:
        d = self.dist
        every = torch.arange(len(self.clean.end)) if rows is None else torch.as_tensor(rows).long().reshape(-1)
        r = d.shard(len(every))
        return d, every, every[r.start:r.stop]

    def circuit_ld(self, keep: set[Head], rows: Optional[torch.Tensor] = None) -> float:
        d, every, mine = self._my_rows(rows)
        if not d.distributed:
            return super().circuit_ld(keep, rows)
        local = (self.run_ld(self.ablation_hooks(set(keep), mine), mine).detach().float().cpu() if len(mine)
                 else torch.empty(0))
        return float(d.all_gather_rows(local, n=len(every)).mean())

    def circuit_attribution(self, keep: set[Head], rows: Optional[torch.Tensor] = None
                            ) -> tuple[float, Float[torch.Tensor, "layer head"]]:
        d, every, mine = self._my_rows(rows)
        if not d.distributed:
            return super().circuit_attribution(keep, rows)
        if len(mine):
            ld, est = super().circuit_attribution(keep, mine)
        else:
            ld, est = 0.0, torch.zeros(self.n_layers, self.n_heads)
        flat = torch.cat([torch.tensor([ld], dtype=torch.float64), est.detach().double().reshape(-1)])
        total = reduce_means(flat, len(mine), len(every), d)
        return float(total[0]), total[1:].reshape(est.shape).to(est.dtype)
