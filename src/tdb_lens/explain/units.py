"""What a "unit" is at a hook: the axis harvesting ranks and explanations talk about.

Read from the hook point's declared layout (`tdb_lens.hooks.layout.HookLayout`), never from its name:

- ``[batch, pos, d]`` activations (``mlp.hook_post`` neurons, ``hook_sae_acts_post`` SAE latents,
  residual dimensions): unit ``i`` is index ``i`` of the last axis.
- ``[batch, pos, head, d_head]`` activations (``attn.hook_z`` and the other per-head vectors):
  unit ``h`` is head ``h`` and its activation at a position is the L2 norm of that head's vector
  there. For ``hook_z`` this is the size of what the head writes (before ``W_O``) at the query
  position: a head that copies nothing has a small norm, one that moves a token's information has
  a large one. Signed per-head scalars do not exist without a choice of direction, and the norm
  needs none.
- Attention patterns (``[batch, head, query_pos, key_pos]``) are pairs of positions, not per-token
  units, and are refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from jaxtyping import Float

from ..hooks.layout import HookLayout

REDUCTIONS = ("auto", "last", "head_norm")
HEAD_AXES = ("head", "kv_head")
KINDS = ("neuron", "head", "sae_latent", "dim")


def resolve_reduction(layout: HookLayout, reduce: str = "auto", hook: str = "") -> str:
    """``"last"`` (units on the last axis of a ``[batch, pos, unit]`` activation) or ``"head_norm"``
    (per-head vectors ``[batch, pos, head, d]``, a unit's activation is the head's vector norm)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    where = f"{hook!r} ({layout})" if hook else str(layout)
    axes = layout.axes
    per_token = len(axes) == 3 and axes[:2] == ("batch", "pos")
    per_head = len(axes) == 4 and axes[:2] == ("batch", "pos") and axes[2] in HEAD_AXES
    if reduce == "auto":
        if per_token:
            return "last"
        if per_head:
            return "head_norm"
        raise ValueError(
            f"cannot harvest units at {where}: harvesting needs [batch, pos, unit] activations (MLP neurons, "
            "SAE latents, residual dims) or per-head vectors [batch, pos, head, d_head] (z, q, k, v, result); "
            "attention patterns are not per-token units.")
    if reduce == "last" and not per_token:
        raise ValueError(f"reduce='last' needs a [batch, pos, unit] activation, {where} is not one")
    if reduce == "head_norm" and not per_head:
        raise ValueError(f"reduce='head_norm' needs a [batch, pos, head, d] activation, {where} is not one")
    return reduce


def unit_activations(act: torch.Tensor, layout: HookLayout, reduce: str = "auto") -> Float[torch.Tensor, "batch pos unit"]:
    """``[batch, pos, n_units]`` float32 activations of every unit at a hook with this layout."""
    how = resolve_reduction(layout, reduce)
    act = act.detach().float()
    if how == "head_norm":
        return act.norm(dim=-1)
    return act


def unit_axis(layout: HookLayout, reduce: str = "auto") -> int:
    """The axis of the raw activation that indexes units (what an ablation writes to)."""
    return 2 if resolve_reduction(layout, reduce) == "head_norm" else len(layout.axes) - 1


def unit_kind(layout: HookLayout) -> str:
    """A short kind label: neuron, head, sae_latent, or 'dim' for anything else."""
    if layout.component == "sae":
        return "sae_latent"
    if len(layout.axes) == 4 and layout.axes[2] in HEAD_AXES:
        return "head"
    if layout.component == "mlp" and layout.site == "post":
        return "neuron"
    return "dim"


@dataclass(frozen=True)
class UnitSite:
    """Where a harvest's units live: hook name, kind and the layout facts their labels need.
    Stored in a harvest's manifest, so results can be labelled without the model."""

    hook: str
    kind: str = "dim"
    site: str = ""
    layer: Optional[int] = None
    host: Optional[str] = None

    @classmethod
    def of(cls, model, hook: str) -> UnitSite:
        lay = model.hook_layout(hook)
        return cls(hook, unit_kind(lay), lay.site, lay.layer, lay.host)

    @classmethod
    def from_dict(cls, d: Optional[dict], hook: str) -> UnitSite:
        if not d:
            return cls(hook)
        return cls(hook, d.get("kind", "dim"), d.get("site", ""), d.get("layer"), d.get("host"))

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self, unit: int) -> str:
        """The unit's name as `tdb_lens.attribution.nodes.Node` prints it where such a node exists
        (``L3.N1024``, ``L9.H9``, ``blocks.3.hook_resid_post:F123``), else ``{hook}[{unit}]``."""
        from ..attribution.nodes import Node

        try:
            if self.kind == "neuron" and self.layer is not None:
                return str(Node.neuron(self.layer, unit))
            if self.kind == "head" and self.layer is not None and self.site == "z":
                return str(Node.head(self.layer, unit))
            if self.kind == "sae_latent" and self.site == "sae_acts_post" and self.host:
                return str(Node.sae_latent(self.host, unit))
        except (ValueError, TypeError, KeyError):  # a site this Node version does not know: the plain label
            pass
        return f"{self.hook}[{unit}]"
