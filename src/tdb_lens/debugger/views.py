"""Self-contained HTML views (inline CSS and a few lines of inline JS, nothing fetched): the node
table (sortable, bars, left / diff / right), token heat maps, attention patterns (query x key with
token labels and hover values), the logit table, the logit lens, unit pages, search results and
patching heat maps (any `tdb_lens.attribution.Labelled`).

Every function returns an HTML string; the result classes' ``_repr_html_`` call them, so the views
show inline in JupyterLab, Notebook 7 and VS Code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float

from ..html import CSS, color, grid_html
from ..html import esc as _esc
from .columns import COLUMNS
from .tables import SHORT

_ids = itertools.count()



SORT_JS = """<script>
function tdblSort(th){var t=th.closest('table'),i=Array.prototype.indexOf.call(th.parentNode.children,th),
b=t.tBodies[0],r=Array.from(b.rows),d=th.dataset.dir==='d'?'a':'d';th.dataset.dir=d;
r.sort(function(x,y){var a=parseFloat(x.cells[i].dataset.v),c=parseFloat(y.cells[i].dataset.v);
if(isNaN(a))a=-Infinity;if(isNaN(c))c=-Infinity;if(isNaN(a+c)){a=x.cells[i].textContent;c=y.cells[i].textContent;
return d==='d'?(a<c?1:-1):(a<c?-1:1)}return d==='d'?Math.abs(c)-Math.abs(a):Math.abs(a)-Math.abs(c)});
r.forEach(function(x){b.appendChild(x)})}
</script>"""


def _bar_cell(x: Optional[float], scale: float) -> str:
    if x is None or math.isnan(x):
        return "<td data-v='NaN'>-</td>"
    w = 0 if scale <= 0 else min(abs(x) / scale, 1.0) * 100
    c = "#2166ac55" if x >= 0 else "#b2182b55"
    bg = f"background:linear-gradient(90deg,{c} {w:.0f}%,transparent {w:.0f}%)"
    return f"<td data-v='{x:.6g}' style='{bg}'>{x:+.3f}</td>"


def node_table_html(table) -> str:
    """The node table: one row per node, per column left (diff, right) with bars scaled per column."""
    sides = table.sides
    rows = table.sorted()
    scale = {}
    for c in COLUMNS:
        for s in sides:
            vals = [abs(r.value(c, s)) for r in rows if not math.isnan(r.value(c, s))]
            scale[(c, s)] = max(vals, default=0.0)
    obj = " | ".join(f"{x:+.4f}" for x in table.objective)
    out = [CSS, SORT_JS, f"<table class='tdbl' id='tdbl-{next(_ids)}'><caption>{_esc(table.title)}: "
           f"{_esc(table.objective_name)} = {obj}</caption><thead><tr><th onclick='tdblSort(this)'>node</th>"
           "<th onclick='tdblSort(this)'>token</th>"]
    for c in COLUMNS:
        for s in sides:
            label = SHORT[c] + ("" if len(sides) == 1 else f" {s}")
            out.append(f"<th onclick='tdblSort(this)' title='{_esc(c)}'>{_esc(label)}</th>")
    out.append("</tr></thead><tbody>")
    for r in rows:
        tok = repr(r.token) if r.key_token is None else f"{r.token!r} \u2190 {r.key_token!r}"
        out.append(f"<tr data-node='{_esc(r.node)}'><td class='l'>{_esc(r.node)}</td><td class='l'>{_esc(tok)}</td>")
        out += [_bar_cell(r.value(c, s), scale[(c, s)]) for c in COLUMNS for s in sides]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def token_heatmap_html(tokens: Sequence[str], values: Sequence[float], title: str = "",
                       scale: Optional[float] = None) -> str:
    """Tokens shaded by a value each (hover shows the value)."""
    vals = [float(v) for v in values]
    s = scale if scale is not None else max((abs(v) for v in vals if not math.isnan(v)), default=0.0)
    spans = [f"<span class='tdbl-tok' style='background:{color(v, s)}' title='{i}: {v:+.4f}'>{_esc(t)}</span>"
             for i, (t, v) in enumerate(zip(tokens, vals))]
    head = f"<div style='font-weight:600'>{_esc(title)}</div>" if title else ""
    return f"{CSS}<div class='tdbl-heat'>{head}{''.join(spans)}</div>"


@dataclass
class AttentionView:
    """One head's attention pattern (query x key) on a prompt."""

    pattern: Float[torch.Tensor, "query key"]
    tokens: list[str]
    layer: int
    head: int

    def _repr_html_(self) -> str:
        labels = [f"{i}:{t}" for i, t in enumerate(self.tokens)]
        return grid_html(self.pattern, labels, labels, f"L{self.layer}.H{self.head} attention (query x key)",
                         symmetric=False, row_axis="query", col_axis="key")

    def __repr__(self) -> str:
        return f"AttentionView(L{self.layer}.H{self.head}, {len(self.tokens)} tokens)"

    def __str__(self) -> str:
        lines = [f"L{self.layer}.H{self.head} attention: each query's top key"]
        for q, t in enumerate(self.tokens):
            k = int(self.pattern[q].argmax())
            lines.append(f"  {q:>3} {t!r:<14} -> {k:>3} {self.tokens[k]!r} ({float(self.pattern[q, k]):.3f})")
        return "\n".join(lines)


def logit_table_html(lt) -> str:
    two = lt.logits and len(lt.logits[0]) == 2
    head = "<tr><th>token</th><th>logit</th><th>prob</th>" + (
        "<th>logit right</th><th>prob right</th><th>diff</th>" if two else "") + "</tr>"
    out = [CSS, SORT_JS, f"<table class='tdbl'><caption>{_esc(lt.title)}</caption><thead>{head}</thead><tbody>"]
    s = max((abs(x) for row in lt.logits for x in row), default=0.0)
    for t, lg, p in zip(lt.tokens, lt.logits, lt.probs):
        cells = [f"<td class='l'>{_esc(repr(t))}</td>", _bar_cell(lg[0], s), f"<td>{p[0]:.3f}</td>"]
        if two:
            cells += [_bar_cell(lg[1], s), f"<td>{p[1]:.3f}</td>", _bar_cell(lg[1] - lg[0], s)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


@dataclass
class LogitLensView:
    """Per layer, the top tokens of the residual stream at one position read through the unembedding,
    and the objective token's probability."""

    layers: list[str]
    top: list[list[tuple[str, float]]]
    target: Optional[str] = None
    target_prob: Optional[list[float]] = None

    def _repr_html_(self) -> str:
        out = [CSS, "<table class='tdbl'><caption>logit lens</caption><tr><th>layer</th>"]
        if self.target_prob is not None:
            out.append(f"<th>P({_esc(repr(self.target))})</th>")
        out.append("<th>top tokens</th></tr>")
        for i, (name, top) in enumerate(zip(self.layers, self.top)):
            out.append(f"<tr><td class='l'>{_esc(name)}</td>")
            if self.target_prob is not None:
                out.append(_bar_cell(self.target_prob[i], 1.0))
            toks = " ".join(f"<span class='tdbl-tok' style='background:{color(p, 1.0)}' title='{p:.3f}'>"
                            f"{_esc(t)}</span>" for t, p in top)
            out.append(f"<td class='l'>{toks}</td></tr>")
        out.append("</table>")
        return "".join(out)

    def __repr__(self) -> str:
        return f"LogitLensView({len(self.layers)} layers, final top {self.top[-1][0][0]!r})"

    def __str__(self) -> str:
        return "\n".join(f"{n:<8} " + " ".join(f"{t!r}({p:.2f})" for t, p in top) for n, top in zip(self.layers, self.top))


def logit_lens_view(model, prompt: str, target: Optional[str] = None, pos: int = -1, k: int = 5) -> LogitLensView:
    """The logit lens of ``prompt`` at ``pos`` (each layer's residual through the final norm and unembedding)."""
    from ..attribution import logit_lens

    logits = logit_lens(model, prompt)[:, 0, pos].float()  # [L+1, vocab]
    probs = logits.softmax(-1)
    L = logits.shape[0] - 1
    names = [f"L{l}.R" for l in range(L)] + ["final"]
    top = []
    for row in probs:
        v, i = row.topk(k)
        top.append([(model.tokenizer.id_to_token(int(j)), float(p)) for p, j in zip(v, i)])
    tp = None if target is None else probs[:, model.to_single_token(target)].tolist()
    return LogitLensView(names, top, target, tp)


def unit_page_html(page) -> str:
    out = [CSS, f"<div class='tdbl-unit'><h3 style='margin:4px 0'>{_esc(page.label)}</h3>",
           f"<div>{_esc(', '.join(page.sources) or 'no harvest or store entry for this unit')}</div>"]
    if page.stats:
        out.append("<div>" + _esc(", ".join(f"{k} {v:.4g}" for k, v in page.stats.items())) + "</div>")
    for e in page.explanations:
        sc = ", ".join(f"{k} {v:.3f}" for k, v in e["scores"].items() if v is not None)
        out.append(f"<div class='tdbl-expl'><b>{_esc(e['explainer'])}</b>: {_esc(e['text'])} <i>{_esc(sc)}</i></div>")
    out.append(token_heatmap_html(page.activations["tokens"], page.activations["values"], "on this prompt"))
    for name in ("up", "down"):
        toks = " ".join(f"<span class='tdbl-tok'>{_esc(repr(t))} {v:+.2f}</span>" for t, v in page.logit_lens[name])
        out.append(f"<div><b>logit lens {name}</b>: {toks}</div>")
    peak = max((e["max"] for e in page.top_examples + page.random_examples), default=0.0)
    for title, exs in (("top-activating examples", page.top_examples), ("random examples", page.random_examples)):
        if exs:
            out.append(f"<div style='font-weight:600;margin-top:6px'>{title}</div>")
            out += [token_heatmap_html(e["tokens"], e["acts"], scale=peak) for e in exs]
    out.append("</div>")
    return "".join(out)


def search_html(res) -> str:
    out = [CSS, f"<table class='tdbl'><caption>search {_esc(repr(res.query))}</caption>"
           "<tr><th>similarity</th><th>unit</th><th>explanation</th><th>scores</th></tr>"]
    for h in res.hits:
        sc = ", ".join(f"{k} {v:.3f}" for k, v in h["scores"].items() if v is not None)
        out.append(f"<tr><td>{h['similarity']:.3f}</td><td class='l'>{_esc(h['label'])}</td>"
                   f"<td class='l'>{_esc(h['text'])}</td><td class='l'>{_esc(sc)}</td></tr>")
    out.append("</table>")
    return "".join(out)
