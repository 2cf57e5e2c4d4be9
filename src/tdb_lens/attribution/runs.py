"""Running the model for attribution: inputs, activations with gradients, the frozen final norm.

Gradients are taken with ``torch.autograd.grad`` with respect to the recorded activations only,
so no parameter's ``.grad`` is touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

from .metrics import Metric, as_metric


def prepare(model, input: Any, attention_mask: Optional[torch.Tensor] = None):
    """``(tokens [batch, pos], mask or None)`` from text, a list of texts or token ids."""
    return model.prepare_input(input, attention_mask)


def _grad_source(x: torch.Tensor, hook) -> torch.Tensor:
    """Embedding hook of the gradient runner: on a frozen model nothing requires grad, so the
    embeddings become the leaves gradients start from (parameters are never touched)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def grad_source_hooks(model) -> list:
    """Forward hooks that make every activation differentiable whatever the parameters'
    ``requires_grad``: each embedding hook point returns a leaf that requires grad."""
    return [(name, _grad_source) for name in model.find_hooks(component="embed")]


def n_layers(model) -> int:
    return model.cfg.n_layers


def freeze_scale_hook(name: str = "ln_final.hook_scale"):
    """A hook that detaches a norm's scale, making the norm linear in its input for gradients."""
    return (name, lambda scale, hook: scale.detach())


def frozen_final(model, resid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The final norm applied to ``resid`` with its scale fixed to ``scale`` (before the unembedding)."""
    ln = model.ln_final
    y = ln.normalize_stack(resid, scale)
    if getattr(ln, "weight", None) is not None:
        y = y * ln.weight
    if getattr(ln, "bias", None) is not None:
        y = y + ln.bias
    return y


def run_with_grads(
    model,
    tokens: torch.Tensor,
    objective,
    names: Sequence[str],
    attention_mask: Optional[torch.Tensor] = None,
    fwd_hooks: Sequence = (),
    grad_names: Optional[Sequence[str]] = None,
    freeze_final_scale: bool = False,
):
    """One forward and one backward pass; works alike on frozen and unfrozen models and leaves
    every parameter's ``requires_grad`` and ``.grad`` as they were.

    ``objective(logits, acts) -> [batch]`` (or a scalar); its sum is differentiated. Returns
    ``(values, acts, grads)``: the objective per row, and ``{name: tensor}`` of activations and of
    gradients (zeros where the objective does not depend on the activation) for ``names``.
    """
    acts: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        acts[hook.name] = x

    hooks = grad_source_hooks(model) + list(fwd_hooks) + [(n, keep) for n in names]
    if freeze_final_scale:
        hooks.insert(0, freeze_scale_hook())
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=attention_mask)
        values = objective(logits, acts)
        wanted = list(grad_names if grad_names is not None else names)
        missing = [n for n in wanted if n not in acts]
        if missing:
            raise KeyError(f"these activations were never computed in the forward pass: {missing[:5]}")
        inputs = [acts[n] for n in wanted]
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True)
    grad_d = {n: (torch.zeros_like(acts[n]) if g is None else g) for n, g in zip(wanted, grads)}
    return values.detach(), {n: a.detach() for n, a in acts.items()}, grad_d


def metric_objective(metric: Metric):
    metric = as_metric(metric)

    def objective(logits, acts):
        return metric(logits)

    return objective


def attached_saes(model) -> dict:
    """``{hook_name: sae}`` of SAEs spliced into the model (empty when the SAE module is absent)."""
    try:
        from ..sae.attach import attached_saes as _att
    except Exception:  # pragma: no cover - SAE module not installed
        return {}
    return _att(model)


def node_names(model, kinds: Iterable[str], include_pairs: bool = False) -> list[str]:
    """The hook names the per-node analyses record, in forward order."""
    kinds = set(kinds)
    out = []
    if "embed" in kinds:
        out.append("hook_embed")
        if "hook_pos_embed" in model.hook_dict:
            out.append("hook_pos_embed")
    for l in range(model.cfg.n_layers):
        if "resid" in kinds:
            out.append(f"blocks.{l}.hook_resid_pre")
        if "head" in kinds:
            out.append(f"blocks.{l}.attn.hook_z")
            if include_pairs:
                out += [f"blocks.{l}.attn.hook_pattern", f"blocks.{l}.attn.hook_v"]
        if "attn" in kinds:
            out.append(f"blocks.{l}.hook_attn_out")
        if "neuron" in kinds:
            out.append(f"blocks.{l}.mlp.hook_post")
        if "mlp" in kinds:
            out.append(f"blocks.{l}.hook_mlp_out")
    if "resid" in kinds:
        out.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    if "sae" in kinds:
        for site in attached_saes(model):
            out += [f"{site}.hook_sae_acts_post", f"{site}.hook_sae_error"]
    return out
