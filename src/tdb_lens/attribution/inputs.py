"""What the analyses take in: token inputs, clean / corrupted pairs with their baselines, the SAEs
spliced into a model, and position labels.

`PatchRuns` is the pair every patching front-end (activation, attribution, path patching and edge
attribution patching) works on; its `PatchRuns.denominator` is the one place that refuses to
normalise by ``metric(clean) - metric(corrupted) == 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int, Shaped

from .metrics import Metric, MetricLike, as_metric

Tokens = Int[torch.Tensor, "batch pos"]
#: a checked attention mask as the engine returns it (None: every position is real)
Mask = Optional[Int[torch.Tensor, "batch pos"]]
#: an attention mask as callers pass it: 0/1 integers or booleans
MaskArg = Optional[Shaped[torch.Tensor, "batch pos"]]


def prepare(model: Any, input: Any, attention_mask: MaskArg = None) -> tuple[Tokens, Mask]:
    """``(tokens [batch, pos], mask or None)`` from text, a list of texts or token ids (the engine's
    `prepare_input`)."""
    return model.prepare_input(input, attention_mask)


def str_tokens(model: Any, tokens: Int[torch.Tensor, " pos"]) -> Optional[list[str]]:
    """The tokens as strings, or None when the model has no tokenizer."""
    try:
        return list(model.to_str_tokens(tokens))
    except ValueError:  # no tokenizer
        return None


class NonFiniteMetricError(ValueError):
    """The metric an analysis differentiates or normalises by came out NaN or infinite."""


def check_finite(values: Shaped[torch.Tensor, "*shape"], what: str) -> None:
    """Raise `NonFiniteMetricError` naming the prompts whose ``values`` are NaN or infinite: every
    number an analysis derived from them would be too (a NaN weight, input or hook upstream)."""
    bad = ~torch.isfinite(values.detach().reshape(values.shape[0], -1) if values.ndim else values.detach()[None])
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(-1).nonzero().flatten().tolist()
        raise NonFiniteMetricError(f"{what} is not finite for prompt(s) {rows[:10]} (values "
                                   f"{values.detach().reshape(-1)[:4].tolist()}); look for NaN/Inf upstream "
                                   "(a hook, an input or the model's weights)")


@dataclass
class PatchRuns:
    """The clean and corrupted inputs of a patching experiment and their metric baselines."""

    clean: Tokens
    corrupted: Tokens
    clean_mask: Mask
    corrupted_mask: Mask
    metric: Metric
    clean_value: float
    corrupted_value: float

    @property
    def batch(self) -> int:
        return self.corrupted.shape[0]

    def denominator(self) -> float:
        """``metric(clean) - metric(corrupted)``; raises (before anything divides by it) when it is 0."""
        denom = self.clean_value - self.corrupted_value
        if abs(denom) < 1e-12:
            raise ValueError(f"metric(clean) == metric(corrupted) == {self.clean_value:.6g}: nothing to normalise by; "
                             "pass normalise=False")
        return denom

    def normalise(self, values: Float[torch.Tensor, "*n"]) -> Float[torch.Tensor, "*n"]:
        """Metric values as fractions of the way from corrupted (0) to clean (1)."""
        denom = self.denominator()
        return (values - self.corrupted_value) / denom

    def set_baselines(self, clean_logits: Float[torch.Tensor, "batch pos vocab"],
                      corrupted_metric: Float[torch.Tensor, "*b"]) -> None:
        """Record the batch-mean metric of the clean logits and of the corrupted run."""
        clean_metric = self.metric(clean_logits)
        check_finite(clean_metric, "the metric on the clean run")
        check_finite(corrupted_metric, "the metric on the corrupted run")
        self.clean_value = float(clean_metric.float().mean())
        self.corrupted_value = float(corrupted_metric.float().mean())


def setup_runs(model: Any, clean: Any, corrupted: Any, metric: MetricLike,
               clean_mask: MaskArg = None, corrupted_mask: MaskArg = None) -> PatchRuns:
    """Tokenise both inputs (they must have the same shape); baselines are filled in by the front-ends."""
    metric = as_metric(metric)
    tc, mc = prepare(model, clean, clean_mask)
    tx, mx = prepare(model, corrupted, corrupted_mask)
    if tc.shape != tx.shape:
        raise ValueError(f"clean tokens {tuple(tc.shape)} and corrupted tokens {tuple(tx.shape)} must have the same shape "
                         "(same batch size and length; pad or pick prompts of equal length)")
    return PatchRuns(tc, tx, mc, mx, metric, 0.0, 0.0)


def attached_saes(model: Any) -> dict:
    """``{hook_name: sae}`` of SAEs spliced into the model (empty when the SAE module is absent)."""
    try:
        from ..sae.attach import attached_saes as _attached
    except ImportError:  # pragma: no cover - SAE module not installed
        return {}
    return _attached(model)


def sae_hook_name(model: Any, host: str, site: str) -> str:
    """The name of hook site ``site`` (``"sae_acts_post"``, ``"sae_error"`` ...) of the SAE spliced at ``host``."""
    return model.hook_name(site, model.hook_layout(host).layer, host=host)
