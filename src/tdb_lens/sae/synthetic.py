"""Synthetic activations built from known sparse directions, to check that training finds them.

Each of ``n_features`` random unit directions in ``d_in`` dimensions is active independently with
probability ``p_active``, with a magnitude drawn uniformly from ``[min_magnitude, max_magnitude]``;
a vector is the sum of its active directions. A good SAE's decoder rows recover the directions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float

from .sae import SAE


class PlantedFeatures:
    def __init__(self, d_in: int = 48, n_features: int = 128, p_active: float = 0.03, batch_size: int = 1024,
                 min_magnitude: float = 0.5, max_magnitude: float = 1.5, seed: int = 0) -> None:
        # offset so the directions never share a random stream with torch.manual_seed(seed) (which
        # would make an SAE initialised under the same seed start at the answer)
        g = torch.Generator().manual_seed(seed + 0x5EED_F00D)
        dirs = torch.randn(n_features, d_in, generator=g)
        self.directions: Float[torch.Tensor, "n_features d_in"] = dirs / dirs.norm(dim=-1, keepdim=True)
        self.p_active, self.batch_size = p_active, batch_size
        self.min_magnitude, self.max_magnitude = min_magnitude, max_magnitude
        self.seed = seed
        self.batches_read = 0

    def batch(self, index: int) -> Float[torch.Tensor, "batch d_in"]:
        """Batch number ``index`` (the same every time it is asked for)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 0x0BA7C4)
        n, f = self.batch_size, self.directions.shape[0]
        active = torch.rand(n, f, generator=g) < self.p_active
        mags = torch.empty(n, f).uniform_(self.min_magnitude, self.max_magnitude, generator=g)
        return (active * mags) @ self.directions

    def __iter__(self) -> Iterator[Float[torch.Tensor, "batch d_in"]]:
        return self

    def __next__(self) -> Float[torch.Tensor, "batch d_in"]:
        b = self.batch(self.batches_read)
        self.batches_read += 1
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"batches_read": self.batches_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_read = int(state["batches_read"])


@torch.no_grad()
def recovered_fraction(sae: SAE, directions: Float[torch.Tensor, "n_features d_in"],
                       threshold: float = 0.9) -> tuple[float, Float[torch.Tensor, " n_features"]]:
    """Fraction of true directions whose best-matching decoder row has cosine >= ``threshold``,
    and each direction's best cosine."""
    W = sae.W_dec.detach().float()
    W = W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    D = directions.float() / directions.float().norm(dim=-1, keepdim=True)
    best = (D @ W.T).max(dim=-1).values
    return float((best >= threshold).float().mean()), best
