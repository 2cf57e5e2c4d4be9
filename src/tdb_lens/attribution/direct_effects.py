"""Direct effects (TDB) and the logit lens.

A node's *direct effect* is its write into the residual stream dotted with the gradient of the
metric at the final residual, the final norm's scale frozen. With the scale frozen the final norm
is affine, so for a metric affine in the logits (logit difference, a logit) the direct effects of
the embeddings, every head, every neuron and the biases, plus the constant (the metric of a zero
residual), add up to the metric exactly. Direct logit attribution is the special case where the
metric is a logit or a logit difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from jaxtyping import Float

from .act_grad import node_names
from .gradients import metric_objective, run_with_grads
from .inputs import MaskArg, attached_saes, prepare, sae_hook_name
from .metrics import MetricLike, as_metric
from .results import Labelled, pos_labels
from .scores import NodeScores


@dataclass(repr=False)  # NodeScores.__repr__: short, no tensor dump
class DirectEffects(NodeScores):
    """`NodeScores` of direct effects plus the terms that are not nodes.

    ``head`` / ``neuron``: each head's / neuron's write (``z @ W_O``, ``post * W_out``);
    ``attn`` / ``mlp``: whole layer outputs (heads + bias); ``attn_bias`` / ``mlp_bias``
    ``[batch, L, P]``; ``resid`` ``[batch, L+1, P]``: the residual entering each layer (row L: the
    final one), i.e. a frozen-scale logit lens; ``constant`` ``[batch]``; ``metric`` ``[batch]``:
    the model's actual metric; ``sae_bias[hook]`` ``[batch, P]``: an SAE's ``b_dec`` term.
    """

    attn_bias: Optional[torch.Tensor] = None
    mlp_bias: Optional[torch.Tensor] = None
    constant: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None
    sae_bias: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient: Optional[torch.Tensor] = None  # [batch, P, d_model] at the final residual

    def total(self) -> Float[torch.Tensor, " batch"]:
        """Embeddings + every head + every neuron + biases + constant, per prompt ``[batch]``.

        Equals ``metric`` when the metric is affine in the logits."""
        f = self.field
        t = f("embed").sum(-1) + f("head").sum((1, 2, 3)) + f("neuron").sum((1, 2, 3))
        t = t + f("attn_bias").sum((1, 2)) + f("mlp_bias").sum((1, 2)) + f("constant")
        if self.pos_embed is not None:
            t = t + self.pos_embed.sum(-1)
        return t

    def by_position(self, str_tokens: Optional[Sequence[str]] = None) -> Labelled:
        """Everything written at each position (batch mean) ``[pos]``: it sums to total - constant."""
        v = self.field("embed") + self.field("attn").sum(1) + self.field("mlp").sum(1)
        if self.pos_embed is not None:
            v = v + self.pos_embed
        v = v.float().mean(0)
        return Labelled(v, ("pos",), (pos_labels(len(v), str_tokens),), title=f"{self.title} by position")


def _layer_terms(model: Any, acts: dict, g: torch.Tensor) -> dict[str, Any]:
    """Per-layer direct effects through the gradient ``g`` at the final residual, stacked on axis 1."""
    dot = lambda x: (x * g).sum(-1)
    terms: dict[str, list] = {k: [] for k in ("head", "neuron", "attn", "mlp", "attn_bias", "mlp_bias", "resid")}
    for l in range(model.cfg.n_layers):
        blk = model.blocks[l]
        gW = torch.einsum("bpm,hdm->bphd", g, blk.attn.W_O.to(g.dtype))  # [b, P, H, dh]
        terms["head"].append((acts[model.hook_name("z", l)] * gW).sum(-1))
        terms["neuron"].append(acts[model.hook_name("post", l)] * (g @ blk.mlp.W_out.to(g.dtype).T))
        terms["attn"].append(dot(acts[model.hook_name("attn_out", l)]))
        terms["mlp"].append(dot(acts[model.hook_name("mlp_out", l)]))
        terms["attn_bias"].append(g @ blk.attn.b_O.to(g.dtype))
        terms["mlp_bias"].append(g @ blk.mlp.b_out.to(g.dtype))
        terms["resid"].append(dot(acts[model.hook_name("resid_pre", l)]))
    terms["resid"].append(dot(acts[model.hook_name("resid_post", -1)]))
    return {k: torch.stack(v, 1).detach() for k, v in terms.items()}


def direct_effects(
    model: Any,
    input: Any,
    metric: MetricLike,
    attention_mask: MaskArg = None,
    include_saes: bool = True,
) -> DirectEffects:
    """Direct effect of every node on ``metric`` from one forward and one backward pass.

    ``input``: text(s) or tokens ``[batch, pos]``. Returns per-prompt values (see `DirectEffects`).
    """
    metric = as_metric(metric)
    tokens, mask = prepare(model, input, attention_mask)
    final, scale_name = model.hook_name("resid_post", -1), model.hook_name("scale", component="ln_final")
    embeds = model.find_hooks(component="embed")
    saes = attached_saes(model) if include_saes else {}
    saes = {s: sae for s, sae in saes.items() if sae.W_dec.shape[-1] == model.cfg.d_model}
    sae_names = {s: (sae_hook_name(model, s, "sae_acts_post"), sae_hook_name(model, s, "sae_error")) for s in saes}
    names = embeds + node_names(model, ("resid", "head", "attn", "neuron", "mlp")) + [scale_name]
    names += [n for pair in sae_names.values() for n in pair]
    grun = run_with_grads(model, tokens, metric_objective(metric), names, mask, grad_names=[final],
                          freeze_final_scale=True)
    acts, g = grun.acts, grun.grads[final]  # g: [b, P, d]
    dot = lambda x: (x * g).sum(-1)
    with torch.no_grad():
        zero_logits = model.logits_from_resid(torch.zeros_like(acts[final]), norm_scale=acts[scale_name])
        constant = metric(zero_logits)
    pos_embed = model.find_hooks(component="embed", site="pos_embed")
    out = DirectEffects(
        **_layer_terms(model, acts, g), embed=dot(acts[model.hook_name("embed")]).detach(),
        pos_embed=dot(acts[pos_embed[0]]).detach() if pos_embed else None,
        constant=constant.detach(), metric=grun.values, gradient=g.detach(), title="direct effect",
    )
    for s, sae in saes.items():
        lat, err = sae_names[s]
        out.sae[s] = (acts[lat] * (g @ sae.W_dec.to(g.dtype).T)).detach()
        out.sae_error[s] = dot(acts[err]).detach()
        out.sae_bias[s] = (g @ sae.b_dec.to(g.dtype)).detach()
    return out


def logit_lens(
    model: Any,
    input: Any,
    metric: Optional[MetricLike] = None,
    attention_mask: MaskArg = None,
    frozen_scale: bool = False,
) -> Union[Labelled, Float[torch.Tensor, "layer batch pos vocab"]]:
    """The logit lens: the residual entering each layer (and the final one) through the final norm
    and the unembedding.

    With ``metric``: a `Labelled` ``[layer]`` of the batch-mean metric at each layer (the last entry
    is the model's own metric). Without: the logits ``[n_layers + 1, batch, pos, vocab]``.
    ``frozen_scale`` uses the final norm's scale from the real final residual (TransformerLens'
    ``accumulated_resid(apply_ln=True)``) instead of renormalising each layer's residual.
    """
    tokens, mask = prepare(model, input, attention_mask)
    L = model.cfg.n_layers
    resid_names = [model.hook_name("resid_pre", l) for l in range(L)] + [model.hook_name("resid_post", -1)]
    scale_name = model.hook_name("scale", component="ln_final")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=resid_names + [scale_name])
        stack = torch.stack([cache[n] for n in resid_names])  # [L+1, b, P, d]
        scale = cache[scale_name] if frozen_scale else None
        logits = (model.logits_from_resid(stack[i], norm_scale=scale) for i in range(L + 1))  # one layer at a time
        if metric is None:
            return torch.stack(list(logits))
        m = as_metric(metric)
        vals = torch.stack([m(x).float().mean() for x in logits])
    return Labelled(vals, ("layer",), ([f"L{l}.R" for l in range(L)] + ["final"],), title="logit lens")
