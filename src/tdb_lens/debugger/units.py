"""Unit pages and search: what the debugger shows about one neuron, head or SAE latent.

A unit page holds the unit's harvested top-activating and random examples (token heat maps), its
stored explanations with their scores, its logit lens (the tokens its write up- and down-votes
through the final norm's weight and the unembedding) and its activations on the current prompt.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float

from ..attribution import Node
from ..explain.quantiles import ActivationQuantile, quantile_coverage
from ..sae.attach import attached_saes
from .columns import DebuggerError


def _harvests(inv) -> dict[str, Any]:
    """``{hook: HarvestResult}`` from the investigation's harvest dirs (each dir or its subfolders)."""
    if inv._harvests is None:
        from ..explain.harvest import load_harvest

        found: dict[str, Any] = {}
        for d in inv.harvest_dirs:
            d = Path(d)
            cands = [d] if (d / "manifest.json").exists() else sorted(p for p in d.iterdir() if (p / "manifest.json").exists()) \
                if d.is_dir() else []
            for c in cands:
                try:
                    h = load_harvest(c)
                except (FileNotFoundError, ValueError):
                    continue
                found.setdefault(h.hook, h)
        inv._harvests = found
    return inv._harvests


def unit_hook(node: Node) -> str:
    """The hook a unit is harvested at: a neuron's post-activation, a head's z, an SAE latent's activation."""
    return node.unit.with_site("z").hook_name if node.kind == "head" else node.unit.hook_name


def harvest_for(inv, node: Node):
    h = _harvests(inv).get(unit_hook(node))
    if h is None or node.index is None or node.index not in h.units:
        return None
    return h


def write_direction(inv, node: Node) -> Optional[Float[torch.Tensor, " d_model"]]:
    """The residual direction a unit writes: ``W_out[n]``, ``W_dec[f]``, or a head's write at its
    position on the current prompt (None where the unit writes no fixed residual direction)."""
    m = inv.model
    if node.kind == "neuron":
        return m.blocks[node.layer].mlp.W_out[node.index].detach().float()
    if node.kind == "sae_latent":
        sae = attached_saes(m).get(str(node.site))
        if sae is None or sae.W_dec.shape[-1] != m.cfg.d_model:
            return None
        return sae.W_dec[node.index].detach().float()
    if node.kind == "head":
        z_name = node.unit.with_site("z").hook_name
        tokens = inv._tokens(inv.prompt, "prompt")
        with torch.no_grad():
            _, cache = m.run_with_cache(tokens, names_filter=[z_name])
        pos = -1 if node.pos is None else node.pos
        return (cache[z_name][0, pos, node.index].float() @ m.blocks[node.layer].attn.W_O[node.index].float()).detach()
    return None


def logit_lens_of(inv, node: Node, k: int = 10) -> dict[str, list]:
    """Tokens the unit's write up- and down-votes: ``{"up": [(token, value)], "down": [...]}``."""
    d = write_direction(inv, node)
    if d is None:
        return {"up": [], "down": []}
    m = inv.model
    w = getattr(m.ln_final, "weight", None)
    with torch.no_grad():
        scores = ((d * w.float()) if w is not None else d) @ m.W_U.detach().float()
    up, down = scores.topk(k), (-scores).topk(k)
    tok = lambda i: m.tokenizer.id_to_token(int(i))
    return {"up": [(tok(i), float(v)) for v, i in zip(up.values, up.indices)],
            "down": [(tok(i), -float(v)) for v, i in zip(down.values, down.indices)]}


def activations_here(inv, node: Node) -> dict:
    """The unit's activation at every position of the current prompt (heads: the norm of z)."""
    unit = node.unit if node.kind != "head" else node.unit.with_site("z")
    tokens = inv._tokens(inv.prompt, "prompt")
    with torch.no_grad():
        _, cache = inv.model.run_with_cache(tokens, names_filter=[unit.hook_name])
    x = unit.select(cache[unit.hook_name])[0].float()  # [P] or [P, d_head]
    if x.ndim == 2:
        x = x.norm(dim=-1)
    return {"tokens": list(inv.model.to_str_tokens(tokens[0])), "values": x.tolist()}


@dataclass
class UnitPage:
    """Everything about one unit (see the module docstring)."""

    node: Node
    label: str
    activations: dict
    logit_lens: dict
    top_examples: list[dict] = field(default_factory=list)
    random_examples: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    explanations: list[dict] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"UnitPage({self.label}, {len(self.top_examples)} top examples, {len(self.explanations)} explanations)"

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["node"] = str(self.node)
        return d

    def __str__(self) -> str:
        lines = [f"unit {self.label} ({', '.join(self.sources) or 'no harvest or store entry'})"]
        if self.stats:
            lines.append("  " + ", ".join(f"{k} {v:.4g}" for k, v in self.stats.items() if isinstance(v, float)))
        for e in self.explanations:
            sc = ", ".join(f"{k} {v:.3f}" for k, v in e["scores"].items() if v is not None)
            lines.append(f"  explanation ({e['explainer']}): {e['text']!r}  [{sc}]")
        lines.append("  up-votes:   " + " ".join(repr(t) for t, _ in self.logit_lens["up"][:8]))
        lines.append("  down-votes: " + " ".join(repr(t) for t, _ in self.logit_lens["down"][:8]))
        acts = self.activations
        peak = max(range(len(acts["values"])), key=lambda i: acts["values"][i]) if acts["values"] else 0
        lines.append(f"  on this prompt: max {max(acts['values'], default=0):.3f} at {peak} {acts['tokens'][peak]!r}")
        for ex in self.top_examples[:5]:
            lines.append(f"  top {ex['max']:.3f}: {''.join(ex['tokens'])!r}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from .views import unit_page_html

        return unit_page_html(self)


def _examples(model, tokens: Any, acts: Any, n: int) -> list[dict]:
    out = []
    for t, a in list(zip(tokens, acts))[:n]:
        a = torch.as_tensor(a).float()
        ids = torch.as_tensor(t).reshape(-1).tolist()
        out.append({"tokens": [model.tokenizer.id_to_token(int(i)) for i in ids], "acts": a.tolist(),
                    "max": float(a.max()) if a.numel() else 0.0})
    return out


def unit_page(inv, node: Node, n_examples: int = 10) -> UnitPage:
    label = str(node.unit)
    page = UnitPage(node, label, activations_here(inv, node), logit_lens_of(inv, node))
    h = harvest_for(inv, node)
    if h is not None:
        rec = h.record(node.index)
        page.top_examples = _examples(inv.model, rec.top_tokens, rec.top_acts, n_examples)
        page.random_examples = _examples(inv.model, rec.random_tokens, rec.random_acts, n_examples)
        page.stats = {k: v for k, v in rec.stats.items() if isinstance(v, float) and not math.isnan(v)}
        page.sources.append(f"harvest {h.hook} ({quantile_coverage(h, rec.unit)})")
    if inv.store is not None:
        try:
            uid = inv.store.unit_id(label)
        except KeyError:
            uid = None
        if uid is not None:
            page.sources.append(f"store unit {uid}")
            page.explanations = [{"id": r.id, "text": r.text, "explainer": r.explainer, "scores": r.scores}
                                 for r in inv.store.explanations(unit_id=uid)]
            if not page.top_examples:
                rows = inv.store.examples(uid, "top")[:n_examples]
                page.top_examples = _examples(inv.model, [r["tokens"] for r in rows], [r["acts"] for r in rows], n_examples)
    return page


def activation_quantile(inv, node: Node, quantile: float) -> ActivationQuantile:
    """The ``quantile`` of the unit's activation over every token of its harvest, by `torch.quantile`'s
    linear interpolation: exact from the harvest's per-token tail when it covers ``quantile``, else
    over the tokens of its random windows (a uniform sample of windows), as the result says
    (`tdb_lens.explain.quantiles`, the rule)."""
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 < float(quantile) < 1:
        raise DebuggerError(f"quantile must be a number in (0, 1), e.g. 0.999; got {quantile!r}")
    if node.kind == "head":
        raise DebuggerError(f"{node.unit}: a head's harvest records the norm of its z, not a value to clamp to; "
                            "steer a head with a value")
    h = harvest_for(inv, node)
    if h is None:
        raise DebuggerError(f"no harvest for {node.unit}: give a steering value, or --harvest-dir with a harvest of "
                            f"{unit_hook(node)!r}")
    try:
        return h.quantile(node.index, float(quantile))
    except ValueError as e:
        raise DebuggerError(str(e)) from None


@dataclass
class SearchResults:
    query: str
    hits: list[dict]

    def __str__(self) -> str:
        lines = [f"search {self.query!r}: {len(self.hits)} hits"]
        lines += [f"  {h['similarity']:.3f}  {h['label']:<32} {h['text']!r}" for h in self.hits]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"query": self.query, "hits": self.hits}

    def __repr__(self) -> str:
        return f"SearchResults({self.query!r}, {len(self.hits)} hits)"

    def _repr_html_(self) -> str:
        from .views import search_html

        return search_html(self)


def search_units(inv, query: str, k: int = 10) -> SearchResults:
    from ..explain import search

    if inv.store is None:
        raise DebuggerError("no explanation store: start with --db STORE (or Investigation(store=...))")
    if not isinstance(query, str) or not query.strip():
        raise DebuggerError("search needs a non-empty query")
    store = getattr(inv.store, "current", lambda: inv.store)()  # the app's per-thread store: this thread's
    hits = search(store, query, k=k, embedder=inv.embedder)
    return SearchResults(query, [{"similarity": h.similarity, "label": h.label, "text": h.text,
                                  "explainer": h.row.explainer, "scores": h.row.scores} for h in hits])
