"""What a "unit" is at a hook: the axis harvesting ranks and explanations talk about.

- ``[batch, pos, d]`` activations (``mlp.hook_post`` neurons, ``hook_sae_acts_post`` SAE latents,
  residual dimensions): unit ``i`` is index ``i`` of the last axis.
- ``[batch, pos, head, d_head]`` activations (``attn.hook_z`` and the other per-head vectors):
  unit ``h`` is head ``h`` and its activation at a position is the L2 norm of that head's vector
  there. For ``hook_z`` this is the size of what the head writes (before ``W_O``) at the query
  position: a head that copies nothing has a small norm, one that moves a token's information has
  a large one. Signed per-head scalars do not exist without a choice of direction, and the norm
  needs none.
- Attention patterns (``[batch, head, q, k]``) are pairs of positions, not per-token units, and are
  refused.
"""

from __future__ import annotations

import torch

HEAD_VECTOR_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result", "hook_rot_q", "hook_rot_k")
REDUCTIONS = ("auto", "last", "head_norm")


def resolve_reduction(hook_name: str, ndim: int, reduce: str = "auto") -> str:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    last = hook_name.rsplit(".", 1)[-1]
    if reduce == "auto":
        if ndim == 3:
            return "last"
        if ndim == 4 and last in HEAD_VECTOR_HOOKS:
            return "head_norm"
        raise ValueError(
            f"cannot harvest units at {hook_name!r}: its activation has {ndim} axes. Harvesting needs "
            "[batch, pos, unit] activations (MLP neurons, SAE latents, residual dims) or per-head vectors "
            f"[batch, pos, head, d_head] at {', '.join(HEAD_VECTOR_HOOKS)}; attention patterns are not per-token units."
        )
    if reduce == "last" and ndim != 3:
        raise ValueError(f"reduce='last' needs a [batch, pos, unit] activation at {hook_name!r}, got {ndim} axes")
    if reduce == "head_norm" and ndim != 4:
        raise ValueError(f"reduce='head_norm' needs a [batch, pos, head, d] activation at {hook_name!r}, got {ndim} axes")
    return reduce


def unit_activations(act: torch.Tensor, hook_name: str, reduce: str = "auto") -> torch.Tensor:
    """``[batch, pos, n_units]`` float32 activations of every unit at ``hook_name``."""
    how = resolve_reduction(hook_name, act.ndim, reduce)
    act = act.detach().float()
    if how == "head_norm":
        return act.norm(dim=-1)
    return act


def unit_kind(hook_name: str) -> str:
    """A short kind label: neuron, head, sae_latent, or 'dim' for anything else."""
    if hook_name.endswith("hook_sae_acts_post") or ".hook_sae_" in hook_name:
        return "sae_latent"
    last = hook_name.rsplit(".", 1)[-1]
    if last in HEAD_VECTOR_HOOKS:
        return "head"
    if hook_name.endswith("mlp.hook_post"):
        return "neuron"
    return "dim"


def unit_label(hook_name: str, unit: int) -> str:
    """The unit's name as `tdb_lens.attribution.nodes.Node` prints it where such a node exists
    (``L3.N1024``, ``L9.H9``, ``blocks.3.hook_resid_post:F123``), else ``{hook_name}[{unit}]``."""
    try:
        from ..attribution.nodes import Node
    except ImportError:  # pragma: no cover - the attribution package is optional here
        Node = None  # type: ignore[assignment]
    parts = hook_name.split(".")
    kind = unit_kind(hook_name)
    if Node is not None:
        try:
            if kind == "neuron" and parts[0] == "blocks":
                return str(Node.neuron(int(parts[1]), unit))
            if kind == "head" and parts[0] == "blocks" and parts[-1] == "hook_z":
                return str(Node.head(int(parts[1]), unit))
            if kind == "sae_latent":
                site = hook_name[: -len(".hook_sae_acts_post")] if hook_name.endswith(".hook_sae_acts_post") else hook_name
                return str(Node.sae_latent(site, unit))
        except Exception:  # a hook this Node version does not know: fall back to the plain label
            pass
    return f"{hook_name}[{unit}]"
