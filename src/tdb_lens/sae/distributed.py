"""Data-parallel SAE training over torchrun's ranks with `DistributedDataParallel` (gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 2 train.py     # train.py: train_sae_distributed(stream, sae_cfg, train_cfg, "runs/sae")

``train_cfg.batch_size`` is the **global** batch: each rank feeds ``batch_size / world_size``
activations a step (its own shard of the data: `rank_activation_store` gives each rank every
``world_size``-th token row, `RankSlice` each rank its block of a global batch stream). On top of
`tdb_lens.sae.training.SAETrainer`'s step, `DistributedSAETrainer`:

- wraps the loss in DDP, so the gradient is the global batch mean (each rank's loss is its local
  mean over an equal share), and every rank takes the same optimiser step;
- initialises the input scale and ``b_dec`` from the global first batch (gathered);
- keeps the dead-latent counters global: a latent fired if it fired on any rank, and the counter
  advances by the global batch (so AuxK sees the same dead latents everywhere);
- resamples dead latents (standard SAEs) from the gathered global batch, with the same generator;
- logs metrics of the global batch (means all-reduced, FVU from all-reduced sums);
- trains on the rank's device (`tdb_lens.distributed.Dist.device`: ``cuda:LOCAL_RANK`` under NCCL);
- writes checkpoints and the final SAE from rank 0 only (``out_dir`` must be on a filesystem every
  rank sees); a checkpoint records every rank's data position, and a rerun with the same world
  size resumes all of them (another world size is refused).

With a fixed seed, ``world_size`` ranks after K steps hold the parameters one process reaches on
the concatenated batches (within float rounding of the gradient sums). In a plain process it is
the ordinary trainer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Dist
from ..distributed import init as dist_init
from .activation_store import ActivationStore
from .config import SAEConfig, TrainConfig
from .sae import SAE
from .training import SAETrainer

__all__ = ["DistributedSAETrainer", "RankSlice", "rank_activation_store", "train_sae_distributed"]


class RankSlice:
    """This rank's block (`tdb_lens.distributed.Dist.shard`) of each batch of a global batch stream;
    ``state_dict``/``load_state_dict`` pass through to the stream."""

    def __init__(self, stream: Iterator[torch.Tensor], dist: Optional[Dist] = None) -> None:
        self.stream, self.dist = stream, dist if dist is not None else dist_init()

    def __iter__(self) -> RankSlice:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.stream)
        r = self.dist.shard(len(batch))
        return batch[r.start:r.stop]

    def state_dict(self) -> Any:
        return self.stream.state_dict() if hasattr(self.stream, "state_dict") else None

    def load_state_dict(self, state: Any) -> None:
        if hasattr(self.stream, "load_state_dict"):
            self.stream.load_state_dict(state)


def rank_activation_store(model: Any, hook_name: str, tokens: Int[torch.Tensor, "n_seq ctx"], batch_size: int,
                          dist: Optional[Dist] = None, seed: int = 0, **kwargs: Any) -> ActivationStore:
    """An `ActivationStore` over this rank's token rows (rows ``rank, rank + world, ...``) handing out
    ``batch_size / world_size`` activations a batch (``batch_size``: the global batch) and shuffling
    with its own seed (``seed + rank``)."""
    d = dist if dist is not None else dist_init()
    if batch_size % d.world_size:
        raise ValueError(f"the global batch size {batch_size} must be a multiple of the world size {d.world_size}")
    if len(tokens) < d.world_size:
        raise ValueError(f"{len(tokens)} token rows cannot be split over {d.world_size} ranks")
    return ActivationStore(model, hook_name, tokens[d.rank::d.world_size], batch_size=batch_size // d.world_size,
                           seed=seed + d.rank, **kwargs)


class _RankStates:
    """The trainer's data stream, whose saved state is every rank's (gathered before rank 0 saves)."""

    def __init__(self, stream: Iterator[torch.Tensor], dist: Dist) -> None:
        self.stream, self.dist = stream, dist
        self.gathered: Optional[list[Any]] = None

    def __iter__(self) -> _RankStates:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self.stream)

    def own_state(self) -> Any:
        return self.stream.state_dict() if hasattr(self.stream, "state_dict") else None

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.dist.world_size, "ranks": self.gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks") if isinstance(state, dict) else None
        if not isinstance(ranks, list) or state.get("world_size") != self.dist.world_size:
            was = state.get("world_size") if isinstance(state, dict) else "a plain run"
            raise ValueError(f"the checkpoint was written by a run on {was} ranks, this run has {self.dist.world_size}: "
                             "resume with the same number of ranks, or train into another directory")
        mine = ranks[self.dist.rank]
        if mine is not None and hasattr(self.stream, "load_state_dict"):
            self.stream.load_state_dict(mine)


class _StepLoss(torch.nn.Module):
    """The trainer's loss as a module, so that DDP sees the forward whose backward it reduces."""

    def __init__(self, trainer: DistributedSAETrainer) -> None:
        super().__init__()
        self.sae = trainer.sae
        self._trainer = [trainer]  # not a submodule

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        return SAETrainer._loss(self._trainer[0], x)


class DistributedSAETrainer(SAETrainer):
    """`SAETrainer` over every rank (module docstring); the same arguments plus ``dist``."""

    def __init__(self, sae: SAE, cfg: TrainConfig, activations: Iterator[Float[torch.Tensor, "batch d_in"]],
                 out_dir: Optional[str | os.PathLike] = None, resume: bool = True, progress: bool = True,
                 on_log: Optional[Callable[[dict], None]] = None, dist: Optional[Dist] = None) -> None:
        self.dist = dist if dist is not None else dist_init()
        d = self.dist
        if cfg.batch_size % d.world_size:
            raise ValueError(f"the global batch size {cfg.batch_size} must be a multiple of the world size {d.world_size}")
        self.local_batch = cfg.batch_size // d.world_size
        if d.device.type == "cuda" and torch.device(cfg.device) != d.device:
            cfg = dataclasses.replace(cfg, device=str(d.device))  # NCCL: each rank trains on its own GPU
        stream = _RankStates(activations, d) if d.distributed else activations
        super().__init__(sae, cfg, stream, out_dir, resume=resume, progress=d.progress(progress),
                         on_log=on_log if d.is_main else None)
        self._loss_module: Optional[torch.nn.Module] = None
        if d.distributed:
            dev = [d.device.index] if d.device.type == "cuda" else None
            self._loss_module = DistributedDataParallel(_StepLoss(self), device_ids=dev)

    # ---- data ---------------------------------------------------------------------------------
    def _check_local(self, x: torch.Tensor) -> None:
        if self.dist.distributed and len(x) != self.local_batch:
            raise ValueError(f"rank {self.dist.rank} got a batch of {len(x)} activations; with a global batch of "
                             f"{self.cfg.batch_size} over {self.dist.world_size} ranks each rank feeds {self.local_batch}")

    @torch.no_grad()
    def _initialize(self) -> None:
        """The single-process initialisation on the global first batch; this rank trains on its part."""
        local = next(self.activations).to(device=self.device, dtype=self.sae.dtype)
        self._check_local(local)
        first = self.dist.all_gather_rows(local)
        inner, self.activations = self.activations, iter([first])
        try:
            super()._initialize()
        finally:
            self.activations = inner
        self._pending = local

    def _next(self) -> torch.Tensor:
        x = super()._next()
        self._check_local(x)
        return x

    # ---- one step -----------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        if self._loss_module is None:
            return super()._loss(x)
        loss, stats, fired = self._loss_module(x)
        fired = self.dist.all_reduce(fired.to(torch.uint8), op="max").bool()
        return loss, self._global_stats(x, stats), fired

    @torch.no_grad()
    def _global_stats(self, x: torch.Tensor, stats: dict[str, float]) -> dict[str, float]:
        """Means over ranks (each is a mean over an equal share); FVU from all-reduced sums."""
        keys = sorted(k for k in stats if k != "fvu")
        xn = self.sae.normalize(x)[0].double()
        b = len(x)
        sums = torch.cat([torch.tensor([stats[k] * b for k in keys] + [stats["mse"] * b, float(xn.pow(2).sum()), b],
                                       dtype=torch.float64), xn.sum(0).cpu()])
        tot = self.dist.all_reduce(sums)
        n = float(tot[len(keys) + 2])
        out = {k: float(tot[i] / n) for i, k in enumerate(keys)}
        err_sq, sq = float(tot[len(keys)]), float(tot[len(keys) + 1])
        centred = sq - float(tot[len(keys) + 3:].pow(2).sum()) / n
        out["fvu"] = err_sq / max(centred, 1e-12)
        return out

    def train_step(self, x: Float[torch.Tensor, "batch d_in"]) -> dict[str, float]:
        stats = super().train_step(x)
        if self.dist.distributed:
            # the parent advanced the counters by this rank's batch; the global batch is world x larger
            with torch.no_grad():
                live = self.since_fired != 0
                extra = self.cfg.batch_size - len(x)
                self.since_fired[live] += extra
            stats["dead_fraction"] = float(self.dead_mask().float().mean())
            stats["loss"] = float(self.dist.all_reduce(torch.tensor([stats["loss"]], dtype=torch.float64))[0]
                                  / self.dist.world_size)
        return stats

    @torch.no_grad()
    def resample_dead(self, x: Float[torch.Tensor, "batch d_in"]) -> int:
        return super().resample_dead(self.dist.all_gather_rows(x))

    # ---- files --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        d = self.dist
        if isinstance(self.activations, _RankStates):
            self.activations.gathered = d.all_gather_object(self.activations.own_state())
        path = super().save_checkpoint() if d.is_main else Path()
        path = Path(d.broadcast_object(str(path) if d.is_main else None))
        d.barrier()
        return path

    def finalize(self) -> SAE:
        d = self.dist
        if d.is_main:
            out = super().finalize()
        else:
            out_dir, self.out_dir = self.out_dir, None
            try:
                out = super().finalize()
            finally:
                self.out_dir = out_dir
        d.barrier()  # the final SAE is on disk before any rank returns
        return out


def train_sae_distributed(activations: Iterator[Float[torch.Tensor, "batch d_in"]], sae_cfg: SAEConfig,
                          train_cfg: TrainConfig, out_dir: Optional[str | os.PathLike] = None, resume: bool = True,
                          progress: bool = True, sae: Optional[SAE] = None, dist: Optional[Dist] = None) -> SAE:
    """`tdb_lens.sae.training.train_sae` over every rank: ``activations`` is this rank's stream
    (``train_cfg.batch_size / world_size`` a batch); every rank returns the trained SAE."""
    if sae is None:
        torch.manual_seed(train_cfg.seed)
        sae = SAE(sae_cfg, device=train_cfg.device)
    return DistributedSAETrainer(sae, train_cfg, activations, out_dir, resume=resume, progress=progress,
                                 dist=dist).train()


def cli_rank_setup(args: Any, train_rows: torch.Tensor, out: Path) -> tuple[Dist, Any, torch.Tensor, Path]:
    """For ``tdb-lens sae train`` under torchrun: ``(dist, this rank's arguments, its token rows, where
    its cached activations go)``. Each rank reads every ``world_size``-th row, feeds ``batch_size /
    world_size`` activations a step, harvests ``harvest_tokens / world_size`` into its own
    ``OUT/activations-rank-R-of-N`` and shows no progress unless it is rank 0. In a plain process:
    the arguments as they are."""
    import copy

    d = dist_init()
    if not d.distributed:
        return d, args, train_rows, out
    from .cli import UsageError

    if args.batch_size % d.world_size:
        raise UsageError(f"--batch-size {args.batch_size} (the global batch) must be a multiple of the "
                         f"{d.world_size} ranks")
    if len(train_rows) < d.world_size:
        raise UsageError(f"{len(train_rows)} training rows cannot be split over {d.world_size} ranks")
    mine = copy.copy(args)
    mine.batch_size = args.batch_size // d.world_size
    if getattr(args, "harvest_tokens", None):
        mine.harvest_tokens = args.harvest_tokens // d.world_size
    mine.seed = args.seed + d.rank
    mine.quiet = args.quiet or not d.is_main
    return d, mine, train_rows[d.rank::d.world_size], out / f"activations-rank-{d.rank}-of-{d.world_size}"
