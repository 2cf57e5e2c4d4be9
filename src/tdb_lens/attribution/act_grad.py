"""Act x grad ("estimated total effect", TDB) and write norms, for every node, from one forward and
one backward pass.

A node's estimated total effect is its activation times the gradient of the metric with respect
to it (summed over the activation's vector axis): the first-order change of the metric when the
node is removed, through every downstream path. Its write norm is the size of what it writes to
the residual stream (neurons ``|post| * ||W_out[n]||``, heads ``||z @ W_O[h]||``, SAE latents
``|a| * ||W_dec[f]||``, vectors their norm; attention pairs TDB's ``pattern[q,k] * ||v_k W_O[h]||``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float

from .gradients import metric_objective, run_with_grads
from .inputs import MaskArg, attached_saes, prepare, sae_hook_name
from .metrics import MetricLike
from .scores import NodeScores

ALL_KINDS = ("embed", "resid", "head", "attn", "neuron", "mlp", "sae")
# the hook site each per-layer node kind is recorded at
_KIND_SITE = {"resid": "resid_pre", "head": "z", "attn": "attn_out", "neuron": "post", "mlp": "mlp_out"}


def node_names(model: Any, kinds: Iterable[str], include_pairs: bool = False) -> list[str]:
    """The hook names the per-node analyses record for ``kinds``, in forward order."""
    kinds = set(kinds)
    out = model.find_hooks(component="embed") if "embed" in kinds else []
    for l in range(model.cfg.n_layers):
        for kind in ("resid", "head", "attn", "neuron", "mlp"):
            if kind in kinds:
                out.append(model.hook_name(_KIND_SITE[kind], l))
            if kind == "head" and kind in kinds and include_pairs:
                out += [model.hook_name("pattern", l), model.hook_name("v", l)]
    if "resid" in kinds:
        out.append(model.hook_name("resid_post", -1))
    if "sae" in kinds:
        for host in attached_saes(model):
            out += [sae_hook_name(model, host, "sae_acts_post"), sae_hook_name(model, host, "sae_error")]
    return out


@dataclass
class ActGrad:
    """``effect`` (act x grad) and ``write_norm`` as `NodeScores`; ``metric`` per prompt."""

    effect: NodeScores
    write_norm: NodeScores
    metric: Float[torch.Tensor, " batch"]

    def top(self, k: int = 20, kinds: Optional[Sequence[str]] = None) -> list:
        return self.effect.top(k, kinds)

    def __repr__(self) -> str:
        top = ", ".join(f"{n}: {v:+.3g}" for n, v in self.top(3))
        return f"ActGrad(metric {self.metric.float().mean():+.4g} over {self.metric.numel()} prompts; top {top})"

    def _repr_html_(self) -> str:
        return self.effect._repr_html_()


Getter = Callable[[str], torch.Tensor]


def _layer_stack(model: Any, site: str, fn: Callable[[str], torch.Tensor], final: bool = False) -> torch.Tensor:
    """``fn(hook name)`` for the hook site in every layer (and the final residual), stacked on axis 1."""
    names = [model.hook_name(site, l) for l in range(model.cfg.n_layers)]
    if final:
        names.append(model.hook_name("resid_post", -1))
    return torch.stack([fn(n) for n in names], 1)


def _vector_families(model: Any, kinds: set, a: Getter, gr: Getter, has: Callable[[str], bool],
                     eff: NodeScores, wn: NodeScores) -> None:
    """Embeddings, residuals and attention / MLP outputs: act . grad and the vector's norm."""
    dot, norm = (lambda n: (a(n) * gr(n)).sum(-1)), (lambda n: a(n).norm(dim=-1))
    if "embed" in kinds:
        for site in ("embed", "pos_embed"):  # the token embedding; the position embedding where there is one
            for name in model.find_hooks(component="embed", site=site):
                if has(name):
                    setattr(eff, site, dot(name))
                    setattr(wn, site, norm(name))
    if "resid" in kinds:
        eff.resid = _layer_stack(model, "resid_pre", dot, final=True)
        wn.resid = _layer_stack(model, "resid_pre", norm, final=True)
    for fam in ("attn", "mlp"):
        if fam in kinds:
            setattr(eff, fam, _layer_stack(model, _KIND_SITE[fam], dot))
            setattr(wn, fam, _layer_stack(model, _KIND_SITE[fam], norm))


def _head_families(model: Any, a: Getter, gr: Getter, include_pairs: bool, eff: NodeScores, wn: NodeScores) -> None:
    """Heads (z . grad, ``||z @ W_O[h]||``) and with ``include_pairs`` attention pairs (TDB's write norm)."""
    e, w, pe, pw = [], [], [], []
    for l in range(model.cfg.n_layers):
        attn = model.blocks[l].attn
        zn = model.hook_name("z", l)
        z = a(zn)
        e.append((z * gr(zn)).sum(-1))
        W_O = attn.W_O.to(z.dtype)
        w.append(torch.einsum("bphd,hdm->bphm", z, W_O).norm(dim=-1))
        if include_pairs:
            pn = model.hook_name("pattern", l)
            pat = a(pn)
            pe.append(pat * gr(pn))
            v = a(model.hook_name("v", l)).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)
            vnorm = torch.einsum("bkhd,hdm->bhkm", v, W_O).norm(dim=-1)  # [b, H, k]
            pw.append(pat * vnorm[:, :, None, :])
    eff.head, wn.head = torch.stack(e, 1), torch.stack(w, 1)
    if include_pairs:
        eff.pair, wn.pair = torch.stack(pe, 1), torch.stack(pw, 1)


def _unit_families(model: Any, kinds: set, a: Getter, gr: Getter, has: Callable[[str], bool],
                   eff: NodeScores, wn: NodeScores) -> None:
    """Neurons (``|post| * ||W_out[n]||``) and attached SAEs' latents and errors."""
    if "neuron" in kinds:
        e, w = [], []
        for l in range(model.cfg.n_layers):
            post = a(model.hook_name("post", l))
            e.append(post * gr(model.hook_name("post", l)))
            w.append(post.abs() * model.blocks[l].mlp.W_out.norm(dim=-1).to(post.dtype))
        eff.neuron, wn.neuron = torch.stack(e, 1), torch.stack(w, 1)
    if "sae" in kinds:
        for site, sae in attached_saes(model).items():
            n_lat, n_err = sae_hook_name(model, site, "sae_acts_post"), sae_hook_name(model, site, "sae_error")
            if not has(n_lat):
                continue
            lat = a(n_lat)
            eff.sae[site] = lat * gr(n_lat)
            wn.sae[site] = lat.abs() * sae.W_dec.norm(dim=-1).to(lat.dtype)
            if has(n_err):
                err = a(n_err)
                eff.sae_error[site] = (err * gr(n_err)).sum(-1)
                wn.sae_error[site] = err.norm(dim=-1)


def score_nodes(model: Any, acts: dict, grads: dict, kinds: Sequence[str] = ALL_KINDS, include_pairs: bool = False,
                rows: Optional[slice] = None) -> tuple[NodeScores, NodeScores]:
    """(act x grad, write norm) `NodeScores` from recorded activations and their gradients.

    ``rows`` picks a slice of the batch of the gradients (the activations are sliced the same way).
    """
    r = slice(None) if rows is None else rows
    a: Getter = lambda n: acts[n][r]
    gr: Getter = lambda n: grads[n][r]
    has = lambda n: n in acts
    eff, wn = NodeScores(title="act x grad"), NodeScores(title="write norm")
    ks = set(kinds)
    with torch.no_grad():  # scores, not graphs: the weights in the write norms may require grad
        _vector_families(model, ks, a, gr, has, eff, wn)
        if "head" in ks:
            _head_families(model, a, gr, include_pairs, eff, wn)
        _unit_families(model, ks, a, gr, has, eff, wn)
    return eff, wn


def act_times_grad(
    model: Any,
    input: Any,
    metric: MetricLike,
    attention_mask: MaskArg = None,
    kinds: Sequence[str] = ALL_KINDS,
    include_pairs: bool = False,
    freeze_final_scale: bool = False,
) -> ActGrad:
    """Estimated total effect (act x grad) and write norm of every node of the given ``kinds``.

    ``kinds``: any of "embed", "resid", "head", "attn", "neuron", "mlp", "sae" (attached SAEs'
    latents and errors). ``include_pairs`` adds attention (query, key) pairs (slower: the pattern
    is materialised). One forward, one backward; values are per prompt.
    """
    tokens, mask = prepare(model, input, attention_mask)
    names = node_names(model, kinds, include_pairs and "head" in kinds)
    grun = run_with_grads(model, tokens, metric_objective(metric), names, mask, freeze_final_scale=freeze_final_scale)
    eff, wn = score_nodes(model, grun.acts, grun.grads, kinds, include_pairs)
    return ActGrad(eff, wn, grun.values)
