"""Small self-contained HTML pieces (inline CSS, nothing fetched) that result objects of every
layer render themselves with: a signed colour scale, a heat-map grid with hover values, and the
heat map of any labelled tensor (`tdb_lens.attribution.Labelled`). The debugger's views
(`tdb_lens.debugger.views`) build on them.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float

CSS = """<style>
.tdbl{font-family:system-ui,sans-serif;font-size:12px;border-collapse:collapse;margin:4px 0}
.tdbl th,.tdbl td{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
.tdbl th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
.tdbl td.l{text-align:left;font-family:monospace}
.tdbl caption{text-align:left;font-weight:600;padding:4px 0}
.tdbl-tok{display:inline-block;padding:1px 2px;margin:1px 0;font-family:monospace;white-space:pre;border-radius:2px}
.tdbl-grid td{width:14px;height:14px;padding:0;border:1px solid #fff}
</style>"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def color(x: float, scale: float) -> str:
    """Blue for positive, red for negative, alpha by size relative to ``scale``."""
    if x is None or math.isnan(x) or scale <= 0:
        return "transparent"
    a = min(abs(x) / scale, 1.0)
    return f"rgba(33,102,172,{a:.2f})" if x >= 0 else f"rgba(178,24,43,{a:.2f})"


def grid_html(values: Float[torch.Tensor, "rows cols"], row_labels: Sequence[str], col_labels: Sequence[str],
              title: str = "", symmetric: bool = True, row_axis: str = "", col_axis: str = "") -> str:
    """A heat map: one small cell per entry, hover shows the row, column and value."""
    v = values.detach().float().cpu()
    s = float(v.abs().max()) if v.numel() else 0.0
    out = [CSS, f"<table class='tdbl tdbl-grid'><caption>{esc(title)}</caption><tr><th></th>"]
    out += [f"<th style='writing-mode:vertical-rl;font-weight:400'>{esc(c)}</th>" for c in col_labels]
    out.append("</tr>")
    for i, rl in enumerate(row_labels):
        out.append(f"<tr><th style='font-weight:400;text-align:right'>{esc(rl)}</th>")
        for j, cl in enumerate(col_labels):
            x = float(v[i, j])
            bg = color(x, s) if symmetric else f"rgba(33,102,172,{0 if s <= 0 else max(x, 0) / s:.2f})"
            tip = f"{row_axis} {rl} / {col_axis} {cl}: {x:.4f}"
            out.append(f"<td data-v='{x:.6g}' style='background:{bg}' title='{esc(tip)}'></td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def labelled_html(lab: Any, digits: int = 3) -> str:
    """A patching (or any `Labelled`) heat map: 2-D as a grid with hover values, 1-D as one row."""
    v = lab.values.detach().float().cpu()
    if v.ndim == 1:
        return grid_html(v[None], [""], lab.labels[0], lab.title, col_axis=lab.axes[0])
    if v.ndim > 2:
        rows = [",".join(t) for t in itertools.product(*lab.labels[:-1])]
        return grid_html(v.reshape(-1, v.shape[-1]), rows, lab.labels[-1], lab.title,
                         row_axis=" x ".join(lab.axes[:-1]), col_axis=lab.axes[-1])
    return grid_html(v, lab.labels[0], lab.labels[1], lab.title, row_axis=lab.axes[0], col_axis=lab.axes[1])
