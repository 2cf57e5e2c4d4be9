"""The gradient runner every gradient-based analysis uses (act x grad, direct effects, trace
upstream, attribution patching, edge attribution patching, IOI).

`run_with_grads` runs one forward and one backward pass. Gradients are taken with
``torch.autograd.grad`` with respect to the recorded activations only, starting at the embedding
hook points, so it works alike on frozen (``requires_grad_(False)``) and unfrozen models and never
touches a parameter's ``requires_grad`` or ``.grad``. Its result, a `GradRun`, also holds the one
first-order estimate the patching analyses share: ``grad . (other activation - this activation)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import torch
from jaxtyping import Float

from ..hooks import HookPoint
from .inputs import Mask, Tokens, check_finite
from .metrics import MetricLike, as_metric

Objective = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class GradRun(NamedTuple):
    """``values`` (the objective per row, or a scalar), and ``{name: tensor}`` of ``acts`` and of
    ``grads`` (d sum(objective) / d activation; zeros where the objective does not depend on it).

    Unpacks as ``values, acts, grads``.
    """

    values: torch.Tensor
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]

    def shift(self, name: str, towards: Float[torch.Tensor, " *shape"]) -> Float[torch.Tensor, " *shape"]:
        """``towards - activation`` at ``name`` (e.g. clean minus corrupted)."""
        return towards.to(self.acts[name]) - self.acts[name]

    def change(self, name: str, towards: Float[torch.Tensor, " *shape"]) -> Float[torch.Tensor, " *shape"]:
        """First-order change of the objective, per entry, when the activation at ``name`` moves to
        ``towards``: ``grad * (towards - activation)`` (sum it over a node's slice)."""
        return self.grads[name] * self.shift(name, towards)


def _grad_source(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """Embedding hook of the gradient runner: on a frozen model nothing requires grad, so the
    embeddings become the leaves gradients start from (parameters are never touched)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def grad_source_hooks(model: Any) -> list:
    """Forward hooks that make every activation differentiable whatever the parameters'
    ``requires_grad``: each embedding hook point returns a leaf that requires grad."""
    return [(name, _grad_source) for name in model.find_hooks(component="embed")]


def freeze_scale_hook(model: Any) -> tuple:
    """A hook that detaches the final norm's scale, making the norm linear in its input for gradients."""
    return (model.hook_name("scale", component="ln_final"), lambda scale, hook: scale.detach())


def metric_objective(metric: MetricLike) -> Objective:
    """The objective ``metric(logits)`` per prompt, for `run_with_grads`."""
    m = as_metric(metric)

    def objective(logits: torch.Tensor, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(logits)

    return objective


def run_with_grads(
    model: Any,
    tokens: Tokens,
    objective: Objective,
    names: Sequence[str],
    attention_mask: Mask = None,
    fwd_hooks: Sequence = (),
    grad_names: Optional[Sequence[str]] = None,
    freeze_final_scale: bool = False,
    stop_at_layer: Optional[int] = None,
) -> GradRun:
    """One forward and one backward pass; works alike on frozen and unfrozen models and leaves
    every parameter's ``requires_grad`` and ``.grad`` as they were.

    ``objective(output, acts) -> [batch]`` (or a scalar); its sum is differentiated. ``output`` is
    the logits, or with ``stop_at_layer`` the residual stream the model returns there (e.g.
    ``n_layers``: the final residual, for objectives that unembed only some rows with
    ``model.logits_from_resid``). Activations at ``names`` are recorded after ``fwd_hooks`` ran;
    gradients are returned for ``grad_names`` (default: ``names``).
    """
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            acts[name] = x

        return hook

    hooks = grad_source_hooks(model) + list(fwd_hooks) + [(n, keep(n)) for n in names]
    if freeze_final_scale:
        hooks.insert(0, freeze_scale_hook(model))
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        out = model(tokens, attention_mask=attention_mask, stop_at_layer=stop_at_layer)
        values = objective(out, acts)
        check_finite(values, "the objective (metric) to differentiate")
        wanted = list(grad_names if grad_names is not None else names)
        missing = [n for n in wanted if n not in acts]
        if missing:
            raise KeyError(f"these activations were never computed in the forward pass: {missing[:5]}")
        grads = torch.autograd.grad(values.sum(), [acts[n] for n in wanted], allow_unused=True)
    grad_d = {n: (torch.zeros_like(acts[n]) if g is None else g) for n, g in zip(wanted, grads)}
    return GradRun(values.detach(), {n: a.detach() for n, a in acts.items()}, grad_d)
