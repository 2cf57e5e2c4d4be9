"""Quantiles of a unit's activation distribution over every harvested token (Monitor's steering
clamps a unit to an extreme quantile of its own activations, e.g. q = 0.999).

Definition: `torch.quantile`'s linear one (Hyndman-Fan type 7). Of ``N`` values sorted ascending
``x_0 <= ... <= x_{N-1}``, quantile ``q`` is ``lerp(x_lo, x_hi, r - lo)`` with ``r = q (N - 1)``,
``lo = floor(r)``, ``hi = ceil(r)`` (``r`` in float64 here).

**The rule.** A harvest keeps each unit's tail: its ``t = min(n_tail, N)`` largest token
activations over all ``N`` harvested tokens, i.e. the ascending ranks ``N - t .. N - 1``. Quantile
``q`` is *exact from the tail* when both neighbours are in it: ``floor(q (N - 1)) >= N - t``, that
is ``(1 - q)(N - 1) <= t - 1`` (q at least ``(N - t) / (N - 1)``; any q when ``N <= n_tail``).
Otherwise (a lower q, or a harvest without a tail: ``n_tail=0`` or one made before the tail
existed) the quantile is taken over the tokens of the harvest's random windows (``n_random`` x
``ctx_len`` tokens, a uniform sample of windows), and the result says so and why
(`ActivationQuantile.describe`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int

__all__ = ["ActivationQuantile", "exact_from_tail", "min_exact_quantile", "quantile_coverage", "unit_quantile"]


@dataclass(frozen=True)
class ActivationQuantile:
    """Quantile ``q`` of a unit's activation: ``value``; ``exact`` when read from the tail (over all
    ``n_tokens`` harvested tokens), else from a sample of ``n_used`` tokens for ``reason``."""

    q: float
    value: float
    exact: bool
    n_tokens: int
    n_used: int
    reason: str = ""

    def describe(self) -> str:
        if self.exact:
            return f"q={self.q:g} of {self.n_tokens:,} tokens (exact)"
        return f"q={self.q:g} of a sample of {self.n_used:,} tokens ({self.reason})"

    def __str__(self) -> str:
        return f"{self.value:.6g} ({self.describe()})"


def min_exact_quantile(n_tokens: int, n_tail: int) -> float:
    """The smallest q the tail of ``n_tail`` of ``n_tokens`` values answers exactly (0 when it holds all)."""
    t = min(n_tail, n_tokens)
    if t <= 0:
        return math.inf
    return 0.0 if t >= n_tokens else (n_tokens - t) / (n_tokens - 1)


def exact_from_tail(tail: Float[torch.Tensor, " t"], n_tokens: int, q: float) -> Optional[float]:
    """Quantile ``q`` of ``n_tokens`` values whose largest ones, descending, are ``tail`` (the module's
    rule); None when the tail does not hold both neighbours of rank ``q (n_tokens - 1)``."""
    t = int(tail.shape[0])
    if n_tokens < 1 or t < 1:
        return None
    r = float(q) * (n_tokens - 1)
    lo, hi = math.floor(r), math.ceil(r)
    if lo < n_tokens - t:
        return None
    vals = tail.to(torch.float64)
    v_lo, v_hi = vals[n_tokens - 1 - lo], vals[n_tokens - 1 - hi]  # descending: rank j is at N - 1 - j
    return float(torch.lerp(v_lo, v_hi, torch.tensor(r - lo, dtype=torch.float64)))


def _check_q(q: float) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < float(q) < 1:
        raise ValueError(f"quantile must be a number in (0, 1), e.g. 0.999; got {q!r}")
    return float(q)


def _valid_tail(values: Float[torch.Tensor, " t"], tokens: Int[torch.Tensor, " t"]) -> Float[torch.Tensor, " v"]:
    return values[tokens >= 0]


def unit_quantile(result: Any, unit: int, q: float) -> ActivationQuantile:
    """Quantile ``q`` of ``unit``'s activation in ``result`` (a `tdb_lens.explain.harvest.HarvestResult`):
    exact from the tail by the module's rule, else over its random windows' tokens (a ValueError
    when there are none)."""
    q = _check_q(q)
    i = result.index_of(unit)
    n = int(result.stats["n_tokens"])
    n_tail = int(result.config.n_tail)
    tail = _valid_tail(result.tail_values[i], result.tail_tokens[i]) if result.tail_values.shape[1] else None
    if tail is not None and tail.numel():
        value = exact_from_tail(tail, n, q)
        if value is not None:
            return ActivationQuantile(q, value, True, n, n)
        reason = (f"below q={min_exact_quantile(n, n_tail):.6g}, the lowest that the top {n_tail:,} "
                  f"of {n:,} tokens answer exactly")
    elif n_tail == 0:
        reason = "the harvest keeps no per-token tail (n_tail=0, or made by an older tdb_lens)"
    else:
        reason = "no token harvested yet"
    acts = result.random_acts[i].reshape(-1).float()
    acts = acts[~acts.isnan()]
    if not acts.numel():
        raise ValueError(f"the harvest of {result.hook} holds no random windows to take a quantile of "
                         f"({reason}): give a value")
    return ActivationQuantile(q, float(torch.quantile(acts, q)), False, n, int(acts.numel()), reason)


def quantile_coverage(result: Any, unit: int) -> str:
    """Which quantiles of ``unit`` the harvest answers exactly and what the rest come from, in words."""
    i = result.index_of(unit)
    n = int(result.stats["n_tokens"])
    n_sample = int((~result.random_acts[i].isnan()).sum())
    t = int((result.tail_tokens[i] >= 0).sum()) if result.tail_values.shape[1] else 0
    if t == 0:
        return f"quantiles from a sample of {n_sample:,} tokens (no per-token tail)"
    q_min = min_exact_quantile(n, t)
    if q_min == 0.0:
        return f"quantiles exact: all {n:,} tokens are in the tail"
    return f"quantiles exact for q >= {q_min:.6g} (top {t:,} of {n:,} tokens), below from a sample of {n_sample:,} tokens"
