"""Head detectors: induction, duplicate-token and previous-token scores on repeated random tokens
(the attention patterns the IOI paper uses to name the heads it finds)."""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float

from ..attribution.sharding import mean_over_rows
from ..distributed import Dist
from ..models.engine import HookedTransformer

__all__ = ["head_detector_scores"]


def head_detector_scores(model: HookedTransformer, n_seqs: int = 8, seq_len: int = 40, seed: int = 0,
                         dist: Optional[Dist] = None) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Induction, duplicate-token and previous-token scores ``[layer, head]`` on repeated random tokens.

    Each score is the mean attention, over the second repeat, to the position it names: the one
    after the previous occurrence of the current token (induction), that previous occurrence
    (duplicate token), or, over every position but the first, the previous position. Every rank of
    ``dist`` (default: this process alone) draws the same ``n_seqs`` sequences and scores its block."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None:
        seq_len = min(seq_len, n_ctx // 2)  # two repeats must fit the context
    g = torch.Generator().manual_seed(seed)
    lo = 1000 if model.cfg.d_vocab > 5000 else 0
    rand = torch.randint(lo, model.cfg.d_vocab - 1, (n_seqs, seq_len), generator=g)
    L = seq_len
    names = [model.hook_name("pattern", l) for l in range(model.cfg.n_layers)]
    q2, qa = torch.arange(L, 2 * L), torch.arange(1, 2 * L)

    def part(r: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.cat([rand[r], rand[r]], dim=1).to(model.device), names_filter=names)
        out = torch.zeros(3, model.cfg.n_layers, model.cfg.n_heads)
        for l, name in enumerate(names):
            p = cache[name].float()  # [b, h, q, k]
            out[0, l] = p[:, :, q2, q2 - L + 1].mean((0, 2)).cpu()  # induction
            out[1, l] = p[:, :, q2, q2 - L].mean((0, 2)).cpu()  # duplicate
            out[2, l] = p[:, :, qa, qa - 1].mean((0, 2)).cpu()  # previous
        return out

    out = mean_over_rows(part, torch.arange(n_seqs), (3, model.cfg.n_layers, model.cfg.n_heads),
                         Dist() if dist is None else dist)
    return {k: out[i].clone() for i, k in enumerate(("induction", "duplicate", "previous"))}
