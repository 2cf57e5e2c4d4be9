"""Metrics: a number per prompt from the logits.

``metric(logits) -> [batch]``. Every analysis averages the per-prompt values over the batch when
it needs one number. Token arguments:

* an ``int`` (or token string with ``model``): one token, shared by every prompt;
* a list of ints: a set of tokens shared by every prompt (averaged);
* a 1-D tensor ``[batch]``: one token per prompt; a 2-D tensor / list of lists ``[batch, k]``:
  ``k`` tokens per prompt.

``pos`` is the position read: an int (default -1, the last) or a ``[batch]`` tensor of
per-prompt positions (e.g. the last real token of a right-padded batch).

When the logits have more rows than there are prompts (a patching sweep repeats the batch along
the batch axis) row ``r`` is prompt ``r % batch``; pass ``rows`` to say otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped

Logits = Float[torch.Tensor, "batch pos vocab"]
#: per-prompt metric values, or one number for a scalar-valued callable metric
Values = Float[torch.Tensor, "*batch"]
Rows = Optional[Int[torch.Tensor, " rows"]]

TokenSpec = Union[int, str, Sequence[int], Sequence[Sequence[int]], torch.Tensor]
PosSpec = Union[int, Sequence[int], torch.Tensor]


def _tokens(spec: TokenSpec, model=None) -> torch.Tensor:
    """Tokens as a ``[n_prompts or 1, k]`` int64 tensor."""
    if isinstance(spec, str):
        if model is None:
            raise ValueError(f"token {spec!r} given as text: pass model= so it can be tokenised, or pass its id")
        return torch.tensor([[model.to_single_token(spec)]])
    if isinstance(spec, bool):
        raise TypeError("tokens must be ints, lists or tensors, got a bool")
    if isinstance(spec, int):
        return torch.tensor([[spec]])
    if isinstance(spec, torch.Tensor):
        t = spec.long()
        if t.ndim == 0:
            return t.reshape(1, 1)
        if t.ndim == 1:
            return t[:, None]
        if t.ndim == 2:
            return t
        raise ValueError(f"token tensor must be 0-, 1- or 2-d, got shape {tuple(t.shape)}")
    items = list(spec)
    if not items:
        raise ValueError("empty token list")
    if all(isinstance(x, str) for x in items):
        if model is None:
            raise ValueError("tokens given as text: pass model= so they can be tokenised")
        return torch.tensor([[model.to_single_token(x) for x in items]])
    if all(isinstance(x, int) for x in items):
        return torch.tensor([items])
    rows = [list(x) if not isinstance(x, int) else [x] for x in items]  # type: ignore[call-overload]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("per-prompt token lists must all have the same length")
    return torch.tensor(rows)


def _rows_for(n_rows: int, n_prompts: int, rows: Optional[torch.Tensor], device) -> torch.Tensor:
    if rows is not None:
        return torch.as_tensor(rows, device=device).long()
    if n_prompts == 1:
        return torch.zeros(n_rows, dtype=torch.long, device=device)
    if n_rows % n_prompts:
        raise ValueError(f"the metric has per-prompt values for {n_prompts} prompts but the logits have {n_rows} rows")
    return torch.arange(n_rows, device=device) % n_prompts


class Metric:
    """Base class. Subclasses implement ``at_pos(logits_at_pos [rows, vocab], rows) -> [rows]``."""

    linear = False  # True when the metric is an affine function of the logits
    pos: Optional[torch.Tensor] = None  # [n_prompts or 1]; None = needs all positions

    def _set_pos(self, pos: PosSpec) -> None:
        p = torch.as_tensor(pos).long()
        if p.ndim > 1:
            raise ValueError(f"pos must be an int or a 1-D list of per-prompt positions, got shape {tuple(p.shape)}")
        self.pos = p.reshape(-1)

    def positions(self, n_rows: int, n_pos: int, rows: Rows = None, device: Optional[torch.device] = None
                  ) -> Int[torch.Tensor, " n_rows"]:
        """The (non-negative) position each row reads: ``[n_rows]``."""
        assert self.pos is not None
        pos = self.pos.to(device)
        r = _rows_for(n_rows, pos.numel(), rows, device)
        return pos[r] % n_pos

    def __call__(self, logits: Logits, rows: Rows = None) -> Values:
        """Per-row values ``[rows]`` from logits ``[rows, pos, vocab]``."""
        if logits.ndim != 3:
            raise ValueError(f"metric expects logits [batch, pos, vocab], got shape {tuple(logits.shape)}")
        p = self.positions(logits.shape[0], logits.shape[1], rows, logits.device)
        return self.at_pos(logits[torch.arange(logits.shape[0], device=logits.device), p], rows)

    def at_pos(self, logits: Float[torch.Tensor, "rows vocab"], rows: Rows = None) -> Float[torch.Tensor, " rows"]:
        raise NotImplementedError

    def value(self, logits: Logits) -> Float[torch.Tensor, ""]:
        """The batch mean, a scalar."""
        return self(logits).mean()


class LogitDiff(Metric):
    """TDB's logit difference: mean target logit minus mean distractor logit, per prompt."""

    linear = True

    def __init__(self, targets: TokenSpec, distractors: Optional[TokenSpec] = None, pos: PosSpec = -1, model=None):
        self.targets = _tokens(targets, model)
        self.distractors = None if distractors is None else _tokens(distractors, model)
        self._set_pos(pos)

    def at_pos(self, logits, rows=None):
        t = self.targets.to(logits.device)
        out = logits.gather(-1, t[_rows_for(len(logits), len(t), rows, logits.device)]).mean(-1)
        if self.distractors is not None:
            d = self.distractors.to(logits.device)
            out = out - logits.gather(-1, d[_rows_for(len(logits), len(d), rows, logits.device)]).mean(-1)
        return out

    def __repr__(self) -> str:
        d = None if self.distractors is None else self.distractors.tolist()
        return f"LogitDiff(targets={self.targets.tolist()}, distractors={d})"


class Logit(LogitDiff):
    """The mean logit of the target token(s)."""

    def __init__(self, targets: TokenSpec, pos: PosSpec = -1, model=None):
        super().__init__(targets, None, pos, model)


class LogProb(Metric):
    """Mean log-probability of the target token(s)."""

    def __init__(self, targets: TokenSpec, pos: PosSpec = -1, model=None):
        self.targets = _tokens(targets, model)
        self._set_pos(pos)

    def at_pos(self, logits, rows=None):
        t = self.targets.to(logits.device)
        lp = F.log_softmax(logits.float(), dim=-1).to(logits.dtype)
        return lp.gather(-1, t[_rows_for(len(logits), len(t), rows, logits.device)]).mean(-1)


class Prob(Metric):
    """Total probability of the target token(s)."""

    def __init__(self, targets: TokenSpec, pos: PosSpec = -1, model=None):
        self.targets = _tokens(targets, model)
        self._set_pos(pos)

    def at_pos(self, logits, rows=None):
        t = self.targets.to(logits.device)
        p = F.softmax(logits.float(), dim=-1).to(logits.dtype)
        return p.gather(-1, t[_rows_for(len(logits), len(t), rows, logits.device)]).sum(-1)


class CallableMetric(Metric):
    """Any ``fn(logits [batch, pos, vocab]) -> [batch]`` (per prompt) or a scalar.

    A scalar-valued function cannot be split per row: sweeps then call it once per patch on that
    patch's rows. ``linear=True`` declares it affine in the logits (used by direct effects).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], linear: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"a metric must be callable on logits, got {type(fn).__name__}")
        self.fn = fn
        self.linear = linear
        self.pos = None

    def __call__(self, logits, rows=None):
        out = self.fn(logits)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out, dtype=logits.dtype, device=logits.device)
        return out

    def __repr__(self) -> str:
        return f"CallableMetric({getattr(self.fn, '__name__', self.fn)!r})"


MetricLike = Union[Metric, Callable[[torch.Tensor], torch.Tensor]]


def as_metric(m: MetricLike) -> Metric:
    if isinstance(m, Metric):
        return m
    if callable(m):
        return CallableMetric(m)
    raise TypeError(f"a metric must be a Metric or a callable on logits, got {type(m).__name__}")


def per_group(metric: Metric, logits: Logits, group: int) -> Float[torch.Tensor, " n_groups"]:
    """Mean metric per consecutive group of ``group`` rows: ``[rows // group]``.

    Rows ``i*group .. (i+1)*group - 1`` are one patch's copy of the batch.
    """
    n = logits.shape[0] // group
    if metric.pos is not None or not isinstance(metric, CallableMetric):
        return metric(logits).reshape(n, group).mean(-1)
    out = []
    for i in range(n):
        v = metric(logits[i * group:(i + 1) * group])
        out.append(v.mean() if v.ndim else v)
    return torch.stack(out)


def last_token_positions(attention_mask: Optional[Shaped[torch.Tensor, "batch pos"]],
                         n_pos: Optional[int] = None) -> Int[torch.Tensor, " batch"]:
    """The last real position of each row of a right-padded batch (``pos=`` for the metrics)."""
    if attention_mask is None:
        if n_pos is None:
            raise ValueError("pass n_pos when there is no attention mask")
        return torch.tensor([n_pos - 1])
    return attention_mask.long().sum(-1) - 1


def logit_diff(logits: Logits, targets: TokenSpec, distractors: Optional[TokenSpec] = None,
               pos: PosSpec = -1) -> Float[torch.Tensor, " batch"]:
    """Per-prompt logit difference (functional form of `LogitDiff`)."""
    return LogitDiff(targets, distractors, pos)(logits)


def log_prob(logits: Logits, targets: TokenSpec, pos: PosSpec = -1) -> Float[torch.Tensor, " batch"]:
    return LogProb(targets, pos)(logits)


def prob(logits: Logits, targets: TokenSpec, pos: PosSpec = -1) -> Float[torch.Tensor, " batch"]:
    return Prob(targets, pos)(logits)
