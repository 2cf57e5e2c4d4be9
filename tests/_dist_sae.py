"""Run by tests/test_distributed_sae.py under torchrun (or plainly): train a small SAE on planted
features with the global batch split over the ranks; rank 0 writes the SAE to ``OUT``.

Arguments: OUT ARCH (topk | standard). Environment: ``DIE_RANK``/``DIE_AT``: that rank kills itself
(SIGKILL) when asked for its batch number DIE_AT (counting from 1).
"""

import os
import signal
import sys

from tdb_lens import distributed
from tdb_lens.sae.config import SAEConfig, TrainConfig
from tdb_lens.sae.distributed import RankSlice, train_sae_distributed
from tdb_lens.sae.synthetic import PlantedFeatures

GLOBAL_BATCH = 64
STEPS = 8


def configs(arch: str) -> tuple[SAEConfig, TrainConfig]:
    sae_cfg = SAEConfig(d_in=16, d_sae=48, architecture=arch, k=4 if arch == "topk" else None)
    train_cfg = TrainConfig(total_activations=STEPS * GLOBAL_BATCH, batch_size=GLOBAL_BATCH, lr=3e-3, log_every=1,
                            dead_after=2 * GLOBAL_BATCH, l1_coefficient=0.5, resample_every=3 if arch == "standard" else None,
                            resample_until=STEPS, checkpoint_every=3, keep_checkpoints=2, lr_decay_fraction=0.25,
                            warmup_steps=2, seed=0, init_b_dec="mean" if arch == "topk" else "zeros")
    return sae_cfg, train_cfg


def stream(arch: str) -> PlantedFeatures:
    """TopK: 40 planted features; standard: 3 (with b_dec at 0, latents pointing away from the cone
    of the data never fire and are resampled)."""
    if arch == "topk":
        return PlantedFeatures(d_in=16, n_features=40, p_active=0.08, batch_size=GLOBAL_BATCH, seed=1)
    return PlantedFeatures(d_in=16, n_features=3, p_active=0.5, batch_size=GLOBAL_BATCH, seed=1)


class Dying:
    def __init__(self, inner, rank: int):
        self.inner, self.rank, self.read = inner, rank, 0
        self.die_rank, self.die_at = int(os.environ.get("DIE_RANK", -1)), int(os.environ.get("DIE_AT", -1))

    def __iter__(self):
        return self

    def __next__(self):
        self.read += 1
        if self.rank == self.die_rank and self.read == self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def main(out: str, arch: str) -> None:
    d = distributed.init()
    sae_cfg, train_cfg = configs(arch)
    data = Dying(RankSlice(stream(arch), d), d.rank)
    train_sae_distributed(data, sae_cfg, train_cfg, out, progress=False)
    d.log.info("sae done")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
