"""Next-token choice for ``generate``: greedy, or sampling with temperature, top-k and top-p, after
checking every setting up front (a negative temperature would sample from the inverted distribution,
``top_k=0`` failed deep inside torch)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from jaxtyping import Float, Int

RETURN_TYPES = ("auto", "input", "str", "tokens")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_generate_args(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
    return_type: str,
) -> None:  # fmt: skip
    """Raise ValueError naming the first setting ``generate`` cannot honour (before any forward runs)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not _number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if do_sample and temperature == 0:
        raise ValueError("temperature=0 with do_sample=True: sampling needs temperature > 0; "
                         "for greedy decoding pass do_sample=False")  # fmt: skip
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {', '.join(map(repr, RETURN_TYPES))}, got {return_type!r}")


def next_token(
    logits: Float[torch.Tensor, "batch d_vocab"], do_sample: bool, temperature: float, top_k: Optional[int],
    top_p: Optional[float], gen: Optional[torch.Generator],
) -> Int[torch.Tensor, " batch"]:  # fmt: skip
    """The argmax, or a sample from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
    likely tokens and to the smallest set whose probability reaches ``top_p``."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # drop a token once the mass before it exceeds top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=gen)[:, 0].to(logits.device)
