"""Ablations as hooks: zero, mean and resample ablation of any set of nodes.

Each builder returns ``[(hook_name, fn), ...]`` (one hook per hook point), to pass as
``fwd_hooks`` to ``run_with_hooks`` / ``hooks()`` / ``generate``; they compose with each other and
with user hooks. A node with a position ablates that position; without one, every position.

Mean ablation replaces an activation by its mean over a reference dataset, per position (or over
all positions with ``per_position=False``). With ``groups`` the means are taken per group of
reference prompts (e.g. per IOI template) and each row of the ablated run uses its group's mean
(``target_groups``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int

from .inputs import MaskArg, prepare
from .nodes import Node, NodeLike, as_nodes

Hooks = list
#: hook name -> mean activation per group of reference prompts ``[n_groups, pos, ...]`` (from `compute_means`)
Means = dict[str, Float[torch.Tensor, " group *act"]]
GroupIds = Optional[Union[Sequence[int], Int[torch.Tensor, " n"]]]


def _by_hook(nodes: Sequence[NodeLike]) -> dict[str, list[Node]]:
    out: dict[str, list[Node]] = defaultdict(list)
    for n in as_nodes(nodes):
        out[n.hook_name].append(n)
    return out


def _replace_hook(nodes: list[Node], value_fn):
    """A hook setting each node's entries of the activation to ``value_fn(act)``'s."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:  # hook: the HookPoint running it
        value = value_fn(act).to(act.dtype).expand_as(act)
        act = act.clone()
        for n in nodes:
            idx = n.act_index(layout=hook.layout)
            act[idx] = value[idx]
        return act

    return hook


def zero_ablation_hooks(nodes: Sequence[NodeLike]) -> Hooks:
    """Set the nodes' activations to zero."""
    return [(name, _replace_hook(ns, lambda act: torch.zeros_like(act))) for name, ns in _by_hook(nodes).items()]


def compute_means(
    model: Any,
    reference: Any,
    hook_names: Sequence[str],
    attention_mask: MaskArg = None,
    groups: GroupIds = None,
    per_position: bool = True,
    batch_size: int = 64,
) -> Means:
    """Mean activation at each hook over the reference prompts: ``{name: [n_groups, pos, ...]}``
    (``[n_groups, 1, ...]`` without ``per_position``). Padded positions are left out; a position no
    prompt of a group reaches gets mean 0. Without ``groups`` there is one group."""
    tokens, mask = prepare(model, reference, attention_mask)
    N, P = tokens.shape
    g = torch.zeros(N, dtype=torch.long) if groups is None else torch.as_tensor(groups).long().cpu()
    if g.shape != (N,):
        raise ValueError(f"groups must give one group id per reference prompt ({N}), got shape {tuple(g.shape)}")
    if int(g.min()) < 0:
        raise ValueError("group ids must be >= 0")
    G = int(g.max()) + 1
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(G, P)
    names = list(hook_names)
    pos_axes = {name: _pos_axis(model, name) for name in names}
    with torch.no_grad():
        for s in range(0, N, batch_size):
            tk = tokens[s:s + batch_size]
            mk = None if mask is None else mask[s:s + batch_size]
            _, cache = model.run_with_cache(tk, attention_mask=mk, names_filter=names)
            w = (torch.ones(tk.shape) if mk is None else mk.float().cpu())
            onehot = torch.nn.functional.one_hot(g[s:s + batch_size], G).float()  # [b, G]
            counts += onehot.T @ w
            for name in names:
                a = cache[name].movedim(pos_axes[name], 1).float()  # [b, P, ...]
                wa = a * w.to(a.device).reshape(w.shape + (1,) * (a.ndim - 2))
                contrib = torch.einsum("bg,bp...->gp...", onehot.to(a.device), wa)
                sums[name] = contrib if name not in sums else sums[name] + contrib
    out = {}
    for name, t in sums.items():
        c = counts.to(t.device)
        if per_position:
            mean = t / c.clamp(min=1).reshape(c.shape + (1,) * (t.ndim - 2))
        else:
            mean = t.sum(1, keepdim=True) / c.sum(1).clamp(min=1).reshape((G, 1) + (1,) * (t.ndim - 2))
        out[name] = mean.movedim(1, pos_axes[name])
    return out


def _pos_axis(model: Any, name: str) -> int:
    """The (query) position axis of the activation at hook ``name``, from its layout."""
    axis = model.hook_layout(name).pos_axis
    if axis is None:
        raise ValueError(f"hook {name!r} has no position axis ({model.hook_layout(name)}): means are taken per position")
    return axis


def means_for_rows(means: Float[torch.Tensor, " group *m"], act: Float[torch.Tensor, " batch *a"],
                   target_groups: GroupIds, pos_axis: int = 1,
                   key_axis: Optional[int] = None) -> Float[torch.Tensor, " batch *m2"]:
    """The mean for each row of ``act`` (its group's, from `compute_means`): ``[batch, ...]``
    broadcastable to ``act``, cut to its positions (and keys, on ``key_axis``)."""
    G = means.shape[0]
    b = act.shape[0]
    if target_groups is None:
        if G != 1:
            raise ValueError(f"the means have {G} groups: pass target_groups (a group id per row of the ablated run)")
        tg = torch.zeros(b, dtype=torch.long)
    else:
        tg = torch.as_tensor(target_groups).long()
        if tg.numel() != b:
            if b % tg.numel():
                raise ValueError(f"target_groups has {tg.numel()} entries for a batch of {b}")
            tg = tg.repeat(b // tg.numel())
    m = means[tg.to(means.device)].to(act.device)
    P = act.shape[pos_axis]
    if m.shape[pos_axis] == 1:
        return m
    if m.shape[pos_axis] < P:
        raise ValueError(f"the means cover {m.shape[pos_axis]} positions but the input has {P}: "
                         "take means over prompts at least as long, or per_position=False")
    m = m.narrow(pos_axis, 0, P)
    if key_axis is not None and m.shape[key_axis] > act.shape[key_axis]:  # pattern / scores: the key axis too
        m = m.narrow(key_axis, 0, act.shape[key_axis])
    return m


def mean_ablation_hooks(
    model: Any,
    nodes: Sequence[NodeLike],
    reference: Any = None,
    means: Optional[Means] = None,
    groups: GroupIds = None,
    target_groups: GroupIds = None,
    per_position: bool = True,
    attention_mask: MaskArg = None,
) -> Hooks:
    """Replace the nodes' activations by their means over ``reference`` (or precomputed ``means``
    from `compute_means`). ``groups``: a group id per reference prompt; ``target_groups``: a group
    id per row of the run being ablated."""
    by = _by_hook(nodes)
    if means is None:
        if reference is None:
            raise ValueError("mean ablation needs reference prompts or precomputed means")
        means = compute_means(model, reference, list(by), attention_mask, groups, per_position)
    hooks = []
    for name, ns in by.items():
        if name not in means:
            raise KeyError(f"no mean for {name!r}; the means cover {list(means)[:5]}")
        lay = model.hook_layout(name)
        fn = (lambda m, pa, ka: lambda act: means_for_rows(m, act, target_groups, pa, ka))(
            means[name], _pos_axis(model, name), lay.key_axis)
        hooks.append((name, _replace_hook(ns, fn)))
    return hooks


def resample_ablation_hooks(
    model: Any,
    nodes: Sequence[NodeLike],
    source: Any,
    attention_mask: MaskArg = None,
    permutation: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> Hooks:
    """Replace the nodes' activations by those of another input: row ``i`` of the ablated run takes
    row ``permutation[i]`` of ``source`` (a seeded random permutation by default)."""
    by = _by_hook(nodes)
    tokens, mask = prepare(model, source, attention_mask)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=list(by))
    n = tokens.shape[0]
    perm = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if permutation is None
            else torch.as_tensor(permutation).long())

    def value_fn(name):
        src = cache[name][perm.to(cache[name].device)]

        def f(act):
            if act.shape[0] != src.shape[0] or act.shape[1:] != src.shape[1:]:
                raise ValueError(f"resample ablation at {name}: source activations {tuple(src.shape)} do not match "
                                 f"the run's {tuple(act.shape)} (same batch size and length needed)")
            return src

        return f

    return [(name, _replace_hook(ns, value_fn(name))) for name, ns in by.items()]


def ablate(model: Any, input: Any, nodes: Sequence[NodeLike], method: str = "zero", attention_mask: MaskArg = None,
           **kw: Any) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits of ``input`` with ``nodes`` ablated (``method`` "zero", "mean" or "resample"; ``kw`` go
    to the hook builder)."""
    tokens, mask = prepare(model, input, attention_mask)
    if method == "zero":
        hooks = zero_ablation_hooks(nodes)
    elif method == "mean":
        hooks = mean_ablation_hooks(model, nodes, **kw)
    elif method == "resample":
        hooks = resample_ablation_hooks(model, nodes, **kw)
    else:
        raise ValueError(f"method must be 'zero', 'mean' or 'resample', got {method!r}")
    with torch.no_grad():
        return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
