"""Trace upstream (TDB): make one node's activation the target and attribute every upstream node
to it with act x grad.

Targets: a neuron, an SAE latent, an attention pair (``L3.H1@5>2``: the pattern entry), a head at
a query position (``L3.H1@5``: the size of its write ``z @ W_O``) or any vector node (its norm, or
its projection on ``direction``). For an attention target the attribution is split into the
query, key and value sides: upstream nodes reach the head only through its layer's q, k and v, so
``sides["q"] + sides["k"] + sides["v"] == effect``. The sides come from one forward and one backward
pass over the batch repeated three times, each copy letting gradient through one side only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from jaxtyping import Float

from .act_grad import ALL_KINDS, node_names, score_nodes
from .gradients import run_with_grads
from .inputs import MaskArg, prepare
from .nodes import Node, NodeLike, as_node
from .scores import NodeScores


@dataclass
class Trace:
    """``target``, its ``value`` per prompt, upstream ``effect`` and ``write_norm`` (`NodeScores`),
    and for attention targets ``sides`` = {"q", "k", "v"} -> `NodeScores`."""

    target: Node
    value: torch.Tensor
    effect: NodeScores
    write_norm: NodeScores
    sides: dict[str, NodeScores] = field(default_factory=dict)

    def top(self, k: int = 20, kinds: Optional[Sequence[str]] = None, side: Optional[str] = None):
        return (self.sides[side] if side else self.effect).top(k, kinds)

    def __repr__(self) -> str:
        top = ", ".join(f"{n}: {v:+.3g}" for n, v in self.top(3))
        sides = f", sides {sorted(self.sides)}" if self.sides else ""
        return f"Trace({self.target}, value {self.value.float().mean():+.4g}{sides}; top {top})"

    def _repr_html_(self) -> str:
        return self.effect._repr_html_()


def target_value(model: Any, node: Node, act: Float[torch.Tensor, "batch ..."],
                 direction: Optional[Float[torch.Tensor, " d"]] = None) -> Float[torch.Tensor, " batch"]:
    """The scalar per prompt that tracing ``node`` differentiates."""
    x = node.select(act)
    if node.kind == "head" and node.site == "z":
        x = x @ model.blocks[node.layer].attn.W_O[node.index].to(x.dtype)  # its write [b, (P,) d]
    if node.is_scalar or (node.is_pair and node.key_pos is None):
        return x.reshape(x.shape[0], -1).sum(-1)
    if direction is not None:
        v = x @ direction.to(x.device, x.dtype)
    else:
        v = x.norm(dim=-1)
    return v.reshape(v.shape[0], -1).sum(-1)


def trace_upstream(
    model: Any,
    input: Any,
    target: NodeLike,
    attention_mask: MaskArg = None,
    direction: Optional[Float[torch.Tensor, " d"]] = None,
    kinds: Sequence[str] = ALL_KINDS,
    include_pairs: bool = False,
    split_sides: bool = True,
) -> Trace:
    """Act x grad of every upstream node with ``target``'s activation as the objective."""
    t = as_node(target)
    tokens, mask = prepare(model, input, attention_mask)
    if t.hook_name not in model.hook_dict:
        raise KeyError(f"target {t}: hook {t.hook_name!r} is not in the model (attach the SAE first?)")
    names = node_names(model, kinds, include_pairs and "head" in kinds)
    grad_names = list(names)
    extra = [] if t.hook_name in names else [t.hook_name]
    b = tokens.shape[0]
    is_attn = t.kind == "head" and t.site in ("z", "result", "pattern", "scores")
    fwd_hooks: list = []
    reps = 1
    if is_attn and split_sides:
        reps = 3
        tokens = tokens.repeat(3, 1)
        mask = None if mask is None else mask.repeat(3, 1)
        row = torch.arange(3 * b, device=tokens.device) // b  # 0 = q side, 1 = k side, 2 = v side
        for side, i in (("q", 0), ("k", 1), ("v", 2)):
            keep = (row == i)[:, None, None, None]
            fwd_hooks.append((model.hook_name(side, t.layer),
                              (lambda k: lambda x, hook: torch.where(k, x, x.detach()))(keep)))

    def objective(logits, acts):
        return target_value(model, t, acts[t.hook_name], direction)

    values, acts, grads = run_with_grads(model, tokens, objective, names + extra, mask,
                                         fwd_hooks=fwd_hooks, grad_names=grad_names)
    if reps == 1:
        eff, wn = score_nodes(model, acts, grads, kinds, include_pairs)
        return Trace(t, values, eff, wn)
    sides = {}
    for side, i in (("q", 0), ("k", 1), ("v", 2)):
        sides[side], wn = score_nodes(model, acts, grads, kinds, include_pairs, rows=slice(i * b, (i + 1) * b))
        sides[side].title = f"act x grad ({side} side)"
    total = {n: sum(grads[n][i * b:(i + 1) * b] for i in range(3)) for n in grad_names}
    first = {n: a[:b] for n, a in acts.items()}
    eff, wn = score_nodes(model, first, total, kinds, include_pairs)
    return Trace(t, values[:b], eff, wn, sides)
