"""Errors raised when reading, writing or fetching SAEs, and the checks that raise them."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class SAEFormatError(ValueError):
    """A file is missing, corrupt, or does not describe an SAE tdb_lens can run."""


class SAEHubError(RuntimeError):
    """An SAE could not be fetched from the Hugging Face hub."""


def require_finite(tensors: Mapping[str, object], where: str) -> None:
    """Raise `SAEFormatError` naming the first floating-point tensor holding NaN or Inf."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = t[~torch.isfinite(t)]
            kinds = sorted({"NaN" if v != v else ("+Inf" if v > 0 else "-Inf") for v in bad[:1000].tolist()})
            raise SAEFormatError(f"{where}: tensor {name!r} holds {len(bad)} non-finite value(s) ({', '.join(kinds)}); "
                                 "an SAE's weights must be finite")
