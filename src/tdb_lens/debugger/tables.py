"""Result objects of the debugger: the node table, the logit table and the token table.

Each holds plain numbers (left, and where there is a comparison right and diff = right - left),
prints as a text table and shows as HTML in Jupyter (`tdb_lens.debugger.views`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Float

from ..attribution import Node
from .columns import COLUMNS, Columns, family_values

SHORT = {"activation": "act", "write_magnitude": "write", "direct_effect": "direct", "total_effect": "act*grad"}


def _fmt(x: Optional[float], width: int = 9) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    return f"{x:+.3f}".rjust(width) if abs(x) < 1e4 else f"{x:+.2e}".rjust(width)


@dataclass
class NodeRow:
    """One row: the node, its token (query token for pairs) and key token, and per column
    ``[left]`` or ``[left, right]`` (diff = right - left)."""

    node: Node
    family: str
    token: str
    key_token: Optional[str]
    values: dict[str, list[float]]

    def value(self, column: str, side: str = "left") -> float:
        v = self.values[column]
        if side == "left":
            return v[0]
        if side == "right":
            return v[1]
        return v[1] - v[0]

    def as_dict(self) -> dict:
        return {"node": str(self.node), "family": self.family, "token": self.token, "key_token": self.key_token,
                "values": {c: [None if math.isnan(x) else x for x in v] for c, v in self.values.items()}}


@dataclass
class NodeTable:
    """The top-k and bottom-k nodes of every column (and side), one row per node."""

    rows: list[NodeRow]
    tokens: list[list[str]]
    objective: list[float]
    objective_name: str
    compare: Optional[str] = None  # None, "prompts" or "interventions"
    k: int = 10
    title: str = "node table"
    meta: dict = field(default_factory=dict)

    @property
    def sides(self) -> tuple[str, ...]:
        return ("left",) if self.compare is None else ("left", "diff", "right")

    def row(self, node) -> NodeRow:
        n = Node.parse(node)
        for r in self.rows:
            if r.node == n:
                return r
        raise KeyError(f"{n} is not in this table")

    def sorted(self, column: str = "total_effect", side: str = "left") -> list[NodeRow]:
        key = lambda r: -abs(r.value(column, side)) if not math.isnan(r.value(column, side)) else 0.0
        return sorted(self.rows, key=key)

    def as_dict(self) -> dict:
        return {"title": self.title, "objective_name": self.objective_name, "objective": self.objective,
                "compare": self.compare, "k": self.k, "tokens": self.tokens, "columns": list(COLUMNS),
                "rows": [r.as_dict() for r in self.sorted()], "meta": self.meta}

    def __str__(self) -> str:
        obj = " | ".join(f"{x:+.4f}" for x in self.objective)
        head = f"{self.title}: {self.objective_name} = {obj}  ({len(self.rows)} nodes, top/bottom {self.k} per column)"
        cols = [f"{SHORT[c]}{'' if s == 'left' else '.' + s}" for c in COLUMNS for s in self.sides]
        lines = [head, f"{'node':<28} {'token':<14} " + " ".join(c.rjust(9) for c in cols)]
        for r in self.sorted():
            tok = repr(r.token) if r.key_token is None else f"{r.token!r}<{r.key_token!r}"
            cells = [_fmt(r.value(c, s)) for c in COLUMNS for s in self.sides]
            lines.append(f"{str(r.node):<28} {tok[:14]:<14} " + " ".join(cells))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"NodeTable({self.objective_name}, {len(self.rows)} rows, compare={self.compare})"

    def _repr_html_(self) -> str:
        from .views import node_table_html

        return node_table_html(self)


def topk_flat(v: Float[torch.Tensor, " n"], k: int, largest: bool = True, chunk: int = 4096):
    """``(values, indices)`` of the ``k`` largest (smallest) entries of a long 1-D tensor: the
    extremes of each chunk, then of those (several times faster than one ``topk`` on CPU)."""
    n = v.numel()
    m = n // chunk * chunk
    if m <= chunk or k > chunk:
        r = v.topk(min(k, n), largest=largest)
        return r.values, r.indices
    a = v[:m].view(-1, chunk).topk(k, dim=1, largest=largest)
    vals = a.values.reshape(-1)
    idx = (a.indices + torch.arange(0, m, chunk)[:, None]).reshape(-1)
    if m < n:
        vals, idx = torch.cat([vals, v[m:]]), torch.cat([idx, torch.arange(m, n)])
    b = vals.topk(min(k, vals.numel()), largest=largest)
    return b.values, idx[b.indices]


def _extremes(values: torch.Tensor, k: int, nan_free: bool = False) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """``(value, index)`` of the ``k`` largest and the ``k`` smallest non-NaN entries."""
    if min(k, values.numel()) == 0:
        return [], []
    out = []
    for largest, fill in ((True, -math.inf), (False, math.inf)):
        v, i = topk_flat(values if nan_free else torch.nan_to_num(values, nan=fill), k, largest)
        out.append([(x, j) for x, j in zip(v.tolist(), i.tolist()) if math.isfinite(x)])
    return out[0], out[1]


def select_rows(cols: Columns, str_tokens: Sequence[Sequence[str]], k: int, compare: bool) -> list[NodeRow]:
    """Top-k and bottom-k of every column over all families together (and, comparing, of the
    right side and of the diff too): each family's own extremes, then the extremes of those."""
    sides = [0, 1] if compare else [0]
    chosen: dict[tuple[int, int], None] = {}
    for c in COLUMNS:
        for series in range(3 if compare else 1):
            tops: list[tuple[float, int, int]] = []
            bottoms: list[tuple[float, int, int]] = []
            for fi, fam in enumerate(cols.families):
                v = family_values(fam, c, series) if series < 2 else family_values(fam, c, 1) - family_values(fam, c, 0)
                t, b = _extremes(v, k, fam.nan_free)
                tops += [(x, fi, i) for x, i in t]
                bottoms += [(x, fi, i) for x, i in b]
            for _x, fi, i in sorted(tops, reverse=True)[:k] + sorted(bottoms)[:k]:
                chosen[(fi, i)] = None
    rows = []
    for fi, flat in chosen:
        fam = cols.families[fi]
        index = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), fam.shape))
        node = fam.make(index)
        pos = node.pos if node.pos is not None else 0
        vals = {c: [float(fam.values[c][s].reshape(-1)[flat]) for s in sides] for c in COLUMNS}
        rows.append(NodeRow(node, fam.name, str_tokens[0][pos],
                            None if node.key_pos is None else str_tokens[0][node.key_pos], vals))
    return rows


@dataclass
class LogitTable:
    """The most likely next tokens at the last position: token, logit and probability per side."""

    tokens: list[str]
    token_ids: list[int]
    logits: list[list[float]]  # per token: [left] or [left, right]
    probs: list[list[float]]
    compare: Optional[str] = None
    title: str = "next-token logits"

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"LogitTable({len(self.tokens)} tokens, top {self.tokens[0]!r}, compare={self.compare})"

    def __str__(self) -> str:
        lines = [self.title]
        for t, lg, p in zip(self.tokens, self.logits, self.probs):
            extra = "" if len(lg) == 1 else f"  -> {lg[1]:+.3f} ({p[1]:.3f}), diff {lg[1] - lg[0]:+.3f}"
            lines.append(f"  {t!r:<16} {lg[0]:+.3f} ({p[0]:.3f}){extra}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from .views import logit_table_html

        return logit_table_html(self)


def logit_table(model, logits: torch.Tensor, k: int = 10, compare: Optional[str] = None) -> LogitTable:
    """Top-``k`` tokens at the last position (of the left side, plus those of the right side when comparing)."""
    last = logits[:, -1].float()
    probs = last.softmax(-1)
    ids: dict[int, None] = {}
    for row in range(last.shape[0]):
        for i in last[row].topk(k).indices.tolist():
            ids[i] = None
    order = sorted(ids, key=lambda i: -float(last[0, i]))
    return LogitTable([model.tokenizer.id_to_token(int(i)) for i in order], order,
                      [[float(last[r, i]) for r in range(last.shape[0])] for i in order],
                      [[float(probs[r, i]) for r in range(last.shape[0])] for i in order], compare)
