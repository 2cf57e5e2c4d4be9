"""Token rows for SAE training and evaluation, from the project's corpus module (`tdb_lens.corpus`).

``"fortunes"`` (or None) is Debian's fortune files (`tdb_lens.corpus.default_corpus_path`);
anything else is passed on to `tdb_lens.corpus.build_corpus` (a file, a folder, ``hf:NAME``).
Rows are shuffled with a seed and split once, so evaluation rows never appear in training.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from jaxtyping import Int

from ..corpus import build_corpus


def corpus_tokens(model: Any, source: Union[str, os.PathLike, None] = "fortunes", context_size: int = 128,
                  seed: int = 0) -> Int[torch.Tensor, "n context_size"]:
    """All ``[n, context_size]`` windows of a corpus for ``model`` (or a tokenizer), shuffled with ``seed``."""
    src = None if source in (None, "fortunes") else source
    return build_corpus(model, src, ctx_len=context_size, shuffle=True, seed=seed).tokens


def train_eval_split(tokens: Int[torch.Tensor, "n ctx"],
                     n_eval: int) -> tuple[Int[torch.Tensor, "n_train ctx"], Int[torch.Tensor, "n_eval ctx"]]:
    """(training rows, the last ``n_eval`` rows held out for evaluation)."""
    if not 0 <= n_eval < len(tokens):
        raise ValueError(f"cannot hold out {n_eval} of {len(tokens)} rows for evaluation")
    return tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval:]


def limit_rows(tokens: Int[torch.Tensor, "n ctx"], n_tokens: Optional[int]) -> Int[torch.Tensor, "m ctx"]:
    """The first rows holding at least ``n_tokens`` tokens (all of them when None)."""
    if n_tokens is None:
        return tokens
    n = max(1, -(-n_tokens // tokens.shape[1]))
    return tokens[:n]
