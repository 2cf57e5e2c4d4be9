"""TransformerLens' ``utils`` helpers that interpretability code imports most: ``get_act_name`` (with
its shorthands), ``to_numpy``, ``lm_cross_entropy_loss``, ``lm_accuracy``, ``test_prompt``,
``get_corner``, ``remove_batch_dim``, ``transpose``, ``Slice`` and ``gelu_new``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from .hooks.cache import apply_slice
from .hooks.names import get_act_name

__all__ = ["Slice", "gelu_new", "get_act_name", "get_corner", "lm_accuracy", "lm_cross_entropy_loss",
           "remove_batch_dim", "test_prompt", "to_numpy", "transpose"]


def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy array from a tensor (detached, on the CPU), an array, a list or a number."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise TypeError(f"to_numpy cannot convert {type(tensor).__name__}")


def lm_cross_entropy_loss(
    logits: Float[torch.Tensor, "batch pos d_vocab"],
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None,
    per_token: bool = False,
) -> Union[Float[torch.Tensor, ""], Float[torch.Tensor, "batch pos_minus_1"]]:
    """Next-token cross-entropy (the mean, or ``[batch, pos-1]`` with ``per_token``); padded targets
    (``attention_mask == 0``) are left out of the mean."""
    logp = F.log_softmax(logits.float(), dim=-1)[:, :-1]
    nll = -logp.gather(-1, tokens[:, 1:, None].long())[..., 0]
    if attention_mask is not None:
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
        if per_token:
            return nll * keep
        return (nll * keep).sum() / keep.sum()
    return nll if per_token else nll.mean()


def lm_accuracy(logits: Float[torch.Tensor, "batch pos d_vocab"], tokens: Int[torch.Tensor, "batch pos"],
                per_token: bool = False) -> torch.Tensor:
    """How often the top logit is the next token (the mean, or ``[batch, pos-1]`` booleans)."""
    correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    return correct if per_token else correct.float().mean()


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The first ``n`` entries along every axis (a `FactoredMatrix`'s corner of its product)."""
    if hasattr(tensor, "get_corner"):
        return tensor.get_corner(n)
    return tensor[tuple(slice(0, n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor[0]`` when the batch is one, else the tensor unchanged."""
    return tensor[0] if tensor.shape[0] == 1 else tensor


def transpose(tensor: Float[torch.Tensor, "... a b"]) -> Float[torch.Tensor, "... b a"]:
    """Swap the last two axes."""
    return tensor.transpose(-1, -2)


def gelu_new(x: Float[torch.Tensor, ...]) -> Float[torch.Tensor, ...]:
    """GPT-2's GELU (the tanh approximation)."""
    return F.gelu(x, approximate="tanh")


class Slice:
    """TransformerLens' ``Slice``: None (everything), an int (removes the axis), a ``(start, stop[,
    step])`` tuple, a slice, or a list / tensor of indices."""

    def __init__(self, input_slice: Any = None) -> None:
        if isinstance(input_slice, Slice):
            input_slice = input_slice.slice
        self.slice: Any = slice(*input_slice) if isinstance(input_slice, tuple) else input_slice

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``tensor`` indexed along ``dim`` (an int removes the axis)."""
        return apply_slice(tensor, self.slice, dim)

    def indices(self, max_ctx: Optional[int] = None) -> np.ndarray:
        """The indices this slice selects out of ``range(max_ctx)``."""
        if isinstance(self.slice, int):
            return np.array([self.slice])
        if max_ctx is None:
            raise ValueError("indices() of a slice needs max_ctx")
        return np.arange(max_ctx)[self.slice if self.slice is not None else slice(None)]

    def __repr__(self) -> str:
        return f"Slice({self.slice!r})"


def test_prompt(
    prompt: str,
    answer: Union[str, Sequence[str]],
    model: Any,
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: Optional[bool] = None,
    top_k: int = 10,
) -> Optional[list[dict[str, Any]]]:
    """Does ``model`` complete ``prompt`` with ``answer``? For each answer token: its rank, logit and
    probability, and the top ``top_k`` tokens (printed with ``print_details``, else returned)."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    rows: list[dict[str, Any]] = []
    for ans in answers:
        if prepend_space_to_answer and not ans.startswith(" "):
            ans = " " + ans
        prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
        answer_tokens = model.to_tokens(ans, prepend_bos=False)
        tokens = torch.cat([prompt_tokens, answer_tokens], dim=1)
        with torch.no_grad():
            logits = model(tokens)[0].float()
        probs = logits.softmax(-1)
        start = prompt_tokens.shape[1]
        for i, tid in enumerate(answer_tokens[0].tolist()):
            at = logits[start + i - 1]
            rank = int((at > at[tid]).sum())
            top = at.topk(top_k).indices.tolist()
            rows.append({"answer": ans, "token": model.to_string([tid]), "rank": rank, "logit": float(at[tid]),
                         "prob": float(probs[start + i - 1, tid]),
                         "top": [(model.to_string([t]), float(at[t]), float(probs[start + i - 1, t])) for t in top]})
    if not print_details:
        return rows
    print("Tokenized prompt:", model.to_str_tokens(prompt, prepend_bos=prepend_bos))
    for r in rows:
        print(f"Performance on answer token {r['token']!r}: rank {r['rank']}, logit {r['logit']:.2f}, "
              f"prob {100 * r['prob']:.2f}%")
        for k, (tok, lg, p) in enumerate(r["top"]):
            print(f"  top {k}th token: logit {lg:5.2f} prob {100 * p:5.2f}% token {tok!r}")
    return None
