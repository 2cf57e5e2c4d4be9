"""IOI metrics at each prompt's final position (END): logit difference, IO probability, accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .data import IOIBatch


def _end_logits(logits: torch.Tensor, batch: IOIBatch) -> torch.Tensor:
    """``[batch, vocab]`` logits at each prompt's END (``logits`` may already be ``[batch, vocab]``)."""
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (2, 3):
        raise ValueError(
            f"expected logits [batch, pos, vocab] (or [batch, vocab] at END), got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    if logits.shape[0] != len(batch):
        raise ValueError(f"logits have batch size {logits.shape[0]}, the IOI batch has {len(batch)} prompts")
    if logits.ndim == 2:
        return logits
    end = batch.end.to(logits.device)
    if int(end.max()) >= logits.shape[1]:
        raise ValueError(f"logits have {logits.shape[1]} positions, the batch needs END up to {int(end.max())}")
    return logits[torch.arange(logits.shape[0], device=logits.device), end]


def _pick(last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return last.gather(1, ids.to(last.device).view(-1, 1)).squeeze(1)


def logit_diff(logits: torch.Tensor, batch: IOIBatch, per_prompt: bool = False) -> torch.Tensor:
    """Logit of the IO name minus logit of the S name at END; mean over prompts unless ``per_prompt``."""
    last = _end_logits(logits, batch)
    diff = _pick(last, batch.io_token) - _pick(last, batch.s_token)
    return diff if per_prompt else diff.mean()


def io_probability(logits: torch.Tensor, batch: IOIBatch, per_prompt: bool = False) -> torch.Tensor:
    """Softmax probability of the IO name at END; mean over prompts unless ``per_prompt``."""
    last = _end_logits(logits, batch)
    prob = _pick(last.float().softmax(-1), batch.io_token)
    return prob if per_prompt else prob.mean()


def accuracy(logits: torch.Tensor, batch: IOIBatch, per_prompt: bool = False) -> torch.Tensor:
    """Whether IO's logit beats S's at END: bool ``[batch]`` if ``per_prompt``, else the fraction."""
    last = _end_logits(logits, batch)
    right = _pick(last, batch.io_token) > _pick(last, batch.s_token)
    return right if per_prompt else right.float().mean()
