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
from typing import Any, Optional

import torch

from .metrics import MetricLike, as_metric
from .results import Labelled
from .runs import attached_saes, frozen_final, prepare, run_with_grads
from .scores import NodeScores, _pos_labels


@dataclass
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

    def total(self) -> torch.Tensor:
        """Embeddings + every head + every neuron + biases + constant, per prompt ``[batch]``.

        Equals ``metric`` when the metric is affine in the logits."""
        t = self.embed.sum(-1) + self.head.sum((1, 2, 3)) + self.neuron.sum((1, 2, 3))  # type: ignore[union-attr]
        t = t + self.attn_bias.sum((1, 2)) + self.mlp_bias.sum((1, 2)) + self.constant  # type: ignore[union-attr]
        if self.pos_embed is not None:
            t = t + self.pos_embed.sum(-1)
        return t

    def by_position(self, str_tokens: Optional[Sequence[str]] = None) -> Labelled:
        """Everything written at each position (batch mean) ``[pos]``: it sums to total - constant."""
        v = self.embed + self.attn.sum(1) + self.mlp.sum(1)  # type: ignore[operator, union-attr]
        if self.pos_embed is not None:
            v = v + self.pos_embed
        v = v.float().mean(0)
        return Labelled(v, ("pos",), (_pos_labels(len(v), str_tokens),), title=f"{self.title} by position")


def direct_effects(
    model,
    input: Any,
    metric: MetricLike,
    attention_mask: Optional[torch.Tensor] = None,
    include_saes: bool = True,
) -> DirectEffects:
    """Direct effect of every node on ``metric`` from one forward and one backward pass.

    ``input``: text(s) or tokens ``[batch, pos]``. Returns per-prompt values (see `DirectEffects`).
    """
    metric = as_metric(metric)
    tokens, mask = prepare(model, input, attention_mask)
    L = model.cfg.n_layers
    final = f"blocks.{L - 1}.hook_resid_post"
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for l in range(L):
        names += [f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_attn_out",
                  f"blocks.{l}.mlp.hook_post", f"blocks.{l}.hook_mlp_out"]
    names += [final, "ln_final.hook_scale"]
    saes = attached_saes(model) if include_saes else {}
    saes = {s: sae for s, sae in saes.items() if sae.W_dec.shape[-1] == model.cfg.d_model}
    for s in saes:
        names += [f"{s}.hook_sae_acts_post", f"{s}.hook_sae_error"]
    values, acts, grads = run_with_grads(
        model, tokens, lambda logits, a: metric(logits), names, mask, grad_names=[final], freeze_final_scale=True
    )
    g = grads[final]  # [b, P, d]
    dot = lambda x: (x * g).sum(-1)
    head, neuron, attn, mlp, attn_b, mlp_b, resid = [], [], [], [], [], [], []
    for l in range(L):
        blk = model.blocks[l]
        W_O = blk.attn.W_O.to(g.dtype)  # [H, dh, d]
        gW = torch.einsum("bpm,hdm->bphd", g, W_O)
        head.append((acts[f"blocks.{l}.attn.hook_z"] * gW).sum(-1))
        neuron.append(acts[f"blocks.{l}.mlp.hook_post"] * (g @ blk.mlp.W_out.to(g.dtype).T))
        attn.append(dot(acts[f"blocks.{l}.hook_attn_out"]))
        mlp.append(dot(acts[f"blocks.{l}.hook_mlp_out"]))
        attn_b.append(g @ blk.attn.b_O.to(g.dtype))
        mlp_b.append(g @ blk.mlp.b_out.to(g.dtype))
        resid.append(dot(acts[f"blocks.{l}.hook_resid_pre"]))
    resid.append(dot(acts[final]))
    with torch.no_grad():
        scale = acts["ln_final.hook_scale"]
        zero_logits = model.unembed(frozen_final(model, torch.zeros_like(acts[final]), scale))
        constant = metric(zero_logits)
    out = DirectEffects(
        head=torch.stack(head, 1).detach(), neuron=torch.stack(neuron, 1).detach(),
        attn=torch.stack(attn, 1).detach(), mlp=torch.stack(mlp, 1).detach(),
        resid=torch.stack(resid, 1).detach(), embed=dot(acts["hook_embed"]).detach(),
        pos_embed=dot(acts["hook_pos_embed"]).detach() if "hook_pos_embed" in acts else None,
        attn_bias=torch.stack(attn_b, 1).detach(), mlp_bias=torch.stack(mlp_b, 1).detach(),
        constant=constant.detach(), metric=values, gradient=g.detach(), title="direct effect",
    )
    for s, sae in saes.items():
        W_dec = sae.W_dec.to(g.dtype)
        out.sae[s] = (acts[f"{s}.hook_sae_acts_post"] * (g @ W_dec.T)).detach()
        out.sae_error[s] = dot(acts[f"{s}.hook_sae_error"]).detach()
        out.sae_bias[s] = (g @ sae.b_dec.to(g.dtype)).detach()
    return out


def logit_lens(
    model,
    input: Any,
    metric: Optional[MetricLike] = None,
    attention_mask: Optional[torch.Tensor] = None,
    frozen_scale: bool = False,
):
    """The logit lens: the residual entering each layer (and the final one) through the final norm
    and the unembedding.

    With ``metric``: a `Labelled` ``[layer]`` of the batch-mean metric at each layer (the last entry
    is the model's own metric). Without: the logits ``[n_layers + 1, batch, pos, vocab]``.
    ``frozen_scale`` uses the final norm's scale from the real final residual (TransformerLens'
    ``accumulated_resid(apply_ln=True)``) instead of renormalising each layer's residual.
    """
    tokens, mask = prepare(model, input, attention_mask)
    L = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post", "ln_final.hook_scale"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        stack = torch.stack([cache[n] for n in names[:-1]])  # [L+1, b, P, d]
        if frozen_scale:
            normed = frozen_final(model, stack, cache["ln_final.hook_scale"])
        else:
            normed = model.ln_final(stack)
        if metric is None:
            return model.unembed(normed)
        m = as_metric(metric)
        vals = torch.stack([m(model.unembed(normed[i])).float().mean() for i in range(L + 1)])
    return Labelled(vals, ("layer",), ([f"L{l}.R" for l in range(L)] + ["final"],), title="logit lens")
