"""Act x grad ("estimated total effect", TDB) and write norms, for every node, from one forward and
one backward pass.

A node's estimated total effect is its activation times the gradient of the metric with respect
to it (summed over the activation's vector axis): the first-order change of the metric when the
node is removed, through every downstream path. Its write norm is the size of what it writes to
the residual stream (neurons ``|post| * ||W_out[n]||``, heads ``||z @ W_O[h]||``, SAE latents
``|a| * ||W_dec[f]||``, vectors their norm; attention pairs TDB's ``pattern[q,k] * ||v_k W_O[h]||``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .metrics import MetricLike, as_metric
from .runs import attached_saes, node_names, prepare, run_with_grads
from .scores import NodeScores

ALL_KINDS = ("embed", "resid", "head", "attn", "neuron", "mlp", "sae")


@dataclass
class ActGrad:
    """``effect`` (act x grad) and ``write_norm`` as `NodeScores`; ``metric`` per prompt."""

    effect: NodeScores
    write_norm: NodeScores
    metric: torch.Tensor

    def top(self, k: int = 20, kinds: Optional[Sequence[str]] = None):
        return self.effect.top(k, kinds)


def score_nodes(model, acts: dict, grads: dict, kinds: Sequence[str] = ALL_KINDS, include_pairs: bool = False,
                rows: Optional[slice] = None) -> tuple[NodeScores, NodeScores]:
    """(act x grad, write norm) `NodeScores` from recorded activations and their gradients.

    ``rows`` picks a slice of the batch of the gradients (the activations are sliced the same way).
    """
    r = slice(None) if rows is None else rows
    a = lambda n: acts[n][r]
    gr = lambda n: grads[n][r]
    eff, wn = NodeScores(title="act x grad"), NodeScores(title="write norm")
    L = model.cfg.n_layers
    kinds = set(kinds)
    if "embed" in kinds:
        eff.embed = (a("hook_embed") * gr("hook_embed")).sum(-1)
        wn.embed = a("hook_embed").norm(dim=-1)
        if "hook_pos_embed" in acts:
            eff.pos_embed = (a("hook_pos_embed") * gr("hook_pos_embed")).sum(-1)
            wn.pos_embed = a("hook_pos_embed").norm(dim=-1)
    if "resid" in kinds:
        names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
        eff.resid = torch.stack([(a(n) * gr(n)).sum(-1) for n in names], 1)
        wn.resid = torch.stack([a(n).norm(dim=-1) for n in names], 1)
    for fam, name in (("attn", "hook_attn_out"), ("mlp", "hook_mlp_out")):
        if fam in kinds:
            ns = [f"blocks.{l}.{name}" for l in range(L)]
            setattr(eff, fam, torch.stack([(a(n) * gr(n)).sum(-1) for n in ns], 1))
            setattr(wn, fam, torch.stack([a(n).norm(dim=-1) for n in ns], 1))
    if "head" in kinds:
        e, w, pe, pw = [], [], [], []
        for l in range(L):
            attn = model.blocks[l].attn
            z = a(f"blocks.{l}.attn.hook_z")
            e.append((z * gr(f"blocks.{l}.attn.hook_z")).sum(-1))
            W_O = attn.W_O.to(z.dtype)
            w.append(torch.einsum("bphd,hdm->bphm", z, W_O).norm(dim=-1))
            if include_pairs:
                pat = a(f"blocks.{l}.attn.hook_pattern")
                pe.append(pat * gr(f"blocks.{l}.attn.hook_pattern"))
                v = a(f"blocks.{l}.attn.hook_v").repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)
                vnorm = torch.einsum("bkhd,hdm->bhkm", v, W_O).norm(dim=-1)  # [b, H, k]
                pw.append(pat * vnorm[:, :, None, :])
        eff.head, wn.head = torch.stack(e, 1), torch.stack(w, 1)
        if include_pairs:
            eff.pair, wn.pair = torch.stack(pe, 1), torch.stack(pw, 1)
    if "neuron" in kinds:
        e, w = [], []
        for l in range(L):
            post = a(f"blocks.{l}.mlp.hook_post")
            e.append(post * gr(f"blocks.{l}.mlp.hook_post"))
            w.append(post.abs() * model.blocks[l].mlp.W_out.norm(dim=-1).to(post.dtype))
        eff.neuron, wn.neuron = torch.stack(e, 1), torch.stack(w, 1)
    if "sae" in kinds:
        for site, sae in attached_saes(model).items():
            n_lat, n_err = f"{site}.hook_sae_acts_post", f"{site}.hook_sae_error"
            if n_lat not in acts:
                continue
            lat = a(n_lat)
            eff.sae[site] = lat * gr(n_lat)
            wn.sae[site] = lat.abs() * sae.W_dec.norm(dim=-1).to(lat.dtype)
            if n_err in acts:
                err = a(n_err)
                eff.sae_error[site] = (err * gr(n_err)).sum(-1)
                wn.sae_error[site] = err.norm(dim=-1)
    for s in (eff, wn):
        for f in ("neuron", "head", "attn", "mlp", "resid", "embed", "pos_embed", "pair"):
            if getattr(s, f) is not None:
                setattr(s, f, getattr(s, f).detach())
    return eff, wn


def act_times_grad(
    model,
    input: Any,
    metric: MetricLike,
    attention_mask: Optional[torch.Tensor] = None,
    kinds: Sequence[str] = ALL_KINDS,
    include_pairs: bool = False,
    freeze_final_scale: bool = False,
) -> ActGrad:
    """Estimated total effect (act x grad) and write norm of every node of the given ``kinds``.

    ``kinds``: any of "embed", "resid", "head", "attn", "neuron", "mlp", "sae" (attached SAEs'
    latents and errors). ``include_pairs`` adds attention (query, key) pairs (slower: the pattern
    is materialised). One forward, one backward; values are per prompt.
    """
    metric = as_metric(metric)
    tokens, mask = prepare(model, input, attention_mask)
    names = node_names(model, kinds, include_pairs and "head" in kinds)
    values, acts, grads = run_with_grads(model, tokens, lambda logits, a: metric(logits), names, mask,
                                         freeze_final_scale=freeze_final_scale)
    eff, wn = score_nodes(model, acts, grads, kinds, include_pairs)
    return ActGrad(eff, wn, values)
