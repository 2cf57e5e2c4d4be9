"""`Labelled`: a tensor with named axes and a label for every index, that plots as a heatmap.

Every sweep (patching, attribution patching, direct effects, edge scores) returns one. Where the
entries are nodes, ``nodes`` holds the `Node` of each entry (same shape as ``values``), so
``result.top(5)`` answers in nodes.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..html import labelled_html
from .nodes import Node


@dataclass
class Labelled:
    """``values`` with ``axes`` (axis names) and ``labels`` (one list of strings per axis)."""

    values: torch.Tensor
    axes: tuple[str, ...]
    labels: tuple[list[str], ...]
    title: str = ""
    nodes: Optional[np.ndarray] = None  # object array of Node (or None) shaped like values
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = self.values.detach()
        self.axes = tuple(self.axes)
        self.labels = tuple(list(map(str, l)) for l in self.labels)
        if len(self.axes) != self.values.ndim or len(self.labels) != self.values.ndim:
            raise ValueError(f"Labelled: {self.values.ndim}-d values need {self.values.ndim} axes and label lists, "
                             f"got {len(self.axes)} axes and {len(self.labels)} label lists")
        for a, l, n in zip(self.axes, self.labels, self.values.shape):
            if len(l) != n:
                raise ValueError(f"Labelled: axis {a!r} has {n} entries but {len(l)} labels")
        if self.nodes is not None and tuple(self.nodes.shape) != tuple(self.values.shape):
            raise ValueError(f"Labelled: nodes shape {self.nodes.shape} != values shape {tuple(self.values.shape)}")

    # -- access -------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, item):
        return self.values[item]

    def node_values(self) -> dict[Node, float]:
        """``{node: value}`` for every entry that has a node."""
        if self.nodes is None:
            raise ValueError("this result has no nodes attached")
        flat = self.values.reshape(-1).tolist()
        return {n: v for n, v in zip(self.nodes.reshape(-1).tolist(), flat) if n is not None}

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[Any, float]]:
        """The ``k`` largest entries (by absolute value by default): ``[(node or label, value), ...]``."""
        flat = self.values.reshape(-1).float()
        key = flat.abs() if by_abs else flat
        k = min(k, flat.numel())
        idx = key.topk(k).indices.tolist()
        out = []
        for i in idx:
            if self.nodes is not None and self.nodes.reshape(-1)[i] is not None:
                name: Any = self.nodes.reshape(-1)[i]
            else:
                multi = np.unravel_index(i, tuple(self.values.shape))
                name = ", ".join(f"{a}={self.labels[d][j]}" for d, (a, j) in enumerate(zip(self.axes, multi)))
            out.append((name, float(flat[i])))
        return out

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        return f"Labelled({self.title!r}, {dims})"

    def _repr_html_(self) -> str:
        return labelled_html(self)

    # -- display ------------------------------------------------------------------------------
    def plot(self, ax=None, cmap: str = "RdBu", symmetric: bool = True, annotate: Optional[bool] = None, **kw):
        """A matplotlib figure: a heatmap for 2-D values (rows = first axis), bars for 1-D.

        Higher-dimensional values are plotted with all but the last axis flattened into rows.
        """
        import matplotlib.pyplot as plt

        v = self.values.float().cpu()
        fig = ax.figure if ax is not None else plt.figure(figsize=kw.pop("figsize", None))
        ax = ax if ax is not None else fig.add_subplot(111)
        if v.ndim == 0:
            v = v[None]
        if v.ndim == 1:
            ax.bar(range(len(v)), v.numpy())
            ax.set_xticks(range(len(v)))
            ax.set_xticklabels(self.labels[0], rotation=90, fontsize=7)
            ax.set_xlabel(self.axes[0])
        else:
            rows = self.labels[0]
            if v.ndim > 2:
                rows = [",".join(t) for t in np.array(np.meshgrid(*self.labels[:-1], indexing="ij")).reshape(v.ndim - 1, -1).T]
                v = v.reshape(-1, v.shape[-1])
            lim = float(v.abs().max()) if symmetric else None
            im = ax.imshow(v.numpy(), cmap=cmap, aspect="auto",
                           vmin=-lim if lim else None, vmax=lim if lim else None, **kw)
            fig.colorbar(im, ax=ax)
            ax.set_yticks(range(v.shape[0]))
            ax.set_yticklabels(rows, fontsize=7)
            ax.set_xticks(range(v.shape[1]))
            ax.set_xticklabels(self.labels[-1], rotation=90, fontsize=7)
            ax.set_ylabel(" x ".join(self.axes[:-1]))
            ax.set_xlabel(self.axes[-1])
            if annotate or (annotate is None and v.numel() <= 150):
                for i in range(v.shape[0]):
                    for j in range(v.shape[1]):
                        ax.text(j, i, f"{float(v[i, j]):.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(self.title)
        fig.tight_layout()
        return fig

    def to_html(self, digits: int = 3) -> str:
        """A self-contained HTML table, cells shaded blue (positive) / red (negative)."""
        v = self.values.float().cpu()
        if v.ndim == 1:
            v = v[None]
            rows, cols = [""], self.labels[0]
        elif v.ndim == 2:
            rows, cols = self.labels[0], self.labels[1]
        else:
            rows = [",".join(t) for t in np.array(np.meshgrid(*self.labels[:-1], indexing="ij")).reshape(v.ndim - 1, -1).T]
            cols = self.labels[-1]
            v = v.reshape(-1, v.shape[-1])
        lim = float(v.abs().max()) or 1.0
        out = [f"<table class='tdb-labelled'><caption>{html.escape(self.title)}</caption><tr><th></th>"]
        out += [f"<th>{html.escape(c)}</th>" for c in cols]
        out.append("</tr>")
        for r, row in zip(rows, v.tolist()):
            out.append(f"<tr><th>{html.escape(r)}</th>")
            for x in row:
                a = min(abs(x) / lim, 1.0)
                color = f"rgba(33,102,172,{a:.2f})" if x >= 0 else f"rgba(178,24,43,{a:.2f})"
                out.append(f"<td style='background:{color}'>{x:.{digits}f}</td>")
            out.append("</tr>")
        out.append("</table>")
        return "".join(out)


def node_grid(nodes: Sequence[Node], shape: Sequence[int]) -> np.ndarray:
    """An object array of nodes in the given shape (row-major)."""
    arr = np.empty(len(nodes), dtype=object)
    for i, n in enumerate(nodes):
        arr[i] = n
    return arr.reshape(tuple(shape))


def pos_labels(n_pos: int, str_tokens: Optional[Sequence[str]] = None) -> list[str]:
    """Labels of ``n_pos`` positions: ``"p:token"`` when the tokens are given (and as many), else ``"p"``."""
    if str_tokens is not None and len(str_tokens) == n_pos:
        return [f"{p}:{t}" for p, t in enumerate(str_tokens)]
    return [str(p) for p in range(n_pos)]
