"""The shared patching core: nodes resolved against a model and input, and hooks that write one
node's source values into the rows of a batched pass.

Activation patching (`activation_patching`), its first-order estimate (`attribution_patching`) and
path patching (`path_patching`) are thin front-ends over this module and `inputs.PatchRuns`; the
first two take the same arguments and start the same way (`prepare_node_patching`).

A batched pass repeats the base batch once per patch along the batch axis: rows ``j*B .. j*B+B-1``
carry patch ``j``, and one hook per hook point writes every patch's values into its rows at once.
Which axes hold positions and units comes from each hook point's `HookLayout`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch
from jaxtyping import Float

from ..hooks import HookPoint
from .inputs import MaskArg, PatchRuns, setup_runs
from .metrics import MetricLike
from .nodes import Node, NodeLike, as_nodes

R = TypeVar("R")


def normalise_position(node: Node, n_pos: int) -> Node:
    """``node`` with negative positions counted from the end of an input of ``n_pos`` positions."""
    if node.pos is None or (node.pos >= 0 and (node.key_pos is None or node.key_pos >= 0)):
        if node.pos is not None and node.pos >= n_pos:
            raise ValueError(f"{node}: position {node.pos} is outside the {n_pos} positions of the input")
        return node
    key = None if node.key_pos is None else node.key_pos % n_pos
    return node.at(node.pos % n_pos, key)


def resolve_nodes(model: Any, nodes: Sequence[NodeLike], n_pos: int, what: str = "node to patch") -> list[Node]:
    """Nodes with absolute positions, each checked to live at one of the model's hook points."""
    out = [normalise_position(n, n_pos) for n in as_nodes(nodes)]
    for name in sorted({n.hook_name for n in out}):
        if name not in model.hook_dict:
            raise KeyError(f"hook {name!r} (of a {what}) is not in the model")
    return out


def hook_names(nodes: Sequence[Node]) -> list[str]:
    """The distinct hook points of ``nodes``, sorted."""
    return sorted({n.hook_name for n in nodes})


def start_layer(model: Any, node: Node) -> Optional[int]:
    """The first block a patch of ``node`` touches (None: before the blocks, run everything)."""
    return model.hook_layout(node.hook_name).layer


@dataclass
class NodePatching:
    """What activation and attribution patching share before they differ: the tokenised pair (baselines
    not yet set), the nodes with absolute positions, their hook points and the clean run there."""

    runs: PatchRuns
    nodes: list[Node]
    names: list[str]  # the nodes' distinct hook points, sorted
    clean_logits: Float[torch.Tensor, "batch pos vocab"]
    clean_acts: dict[str, torch.Tensor]  # hook name -> the clean run's activation

    def result(self, values: R, return_runs: bool) -> R | tuple[R, PatchRuns]:
        """A front-end's return value: ``values``, or ``(values, runs)`` when ``return_runs``."""
        return (values, self.runs) if return_runs else values


def prepare_node_patching(model: Any, clean: Any, corrupted: Any, metric: MetricLike, nodes: Sequence[NodeLike],
                          clean_mask: MaskArg = None, corrupted_mask: MaskArg = None) -> NodePatching:
    """The shared argument handling of `activation_patch` and `attribution_patch`: both inputs tokenised
    (same shape), the nodes resolved against them, and one clean pass caching the nodes' hook points."""
    runs = setup_runs(model, clean, corrupted, metric, clean_mask, corrupted_mask)
    node_list = resolve_nodes(model, nodes, runs.corrupted.shape[1])
    names = hook_names(node_list)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(runs.clean, attention_mask=runs.clean_mask, names_filter=names)
    return NodePatching(runs, node_list, names, clean_logits, {n: cache[n] for n in names})


def group_by_hook(nodes: Sequence[Node], patch_of: Sequence[int]) -> dict[str, list[tuple[int, Node]]]:
    """hook name -> [(patch number, node)] for nodes patched in patches ``patch_of[i]``."""
    groups: dict[str, list[tuple[int, Node]]] = defaultdict(list)
    for j, node in zip(patch_of, nodes):
        groups[node.hook_name].append((j, node))
    return groups


def chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive pieces of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def _plans(model: Any, name: str, items: list[tuple[int, Node]], batch: int, start: int,
           src_rows: Optional[torch.Tensor], dev: torch.device) -> list[tuple[tuple, tuple]]:
    """(target index, source index) pairs writing each patch's node into its rows at hook ``name``."""
    layout = model.hook_layout(name)
    pos_axis = layout.pos_axis
    # patches with the same index layout (which entries are slices) are written together
    by_sig: dict[tuple, list] = defaultdict(list)
    for j, node in items:
        idx = node.act_index(layout=layout)[1:]
        by_sig[tuple(isinstance(i, slice) for i in idx)].append((j, idx))
    base = torch.arange(batch, device=dev) if src_rows is None else src_rows.to(dev)
    plans = []
    for sig, entries in by_sig.items():
        tgt: list[Any] = [torch.cat([j * batch + torch.arange(batch, device=dev) for j, _ in entries])]
        src: list[Any] = [base.repeat(len(entries))]
        for a, is_slice in enumerate(sig):
            if is_slice:  # every position (then the pass starts at 0), every key or a whole vector
                tgt.append(slice(None))
                src.append(slice(None))
                continue
            vals = torch.tensor([idx[a] for _, idx in entries], device=dev).repeat_interleave(batch)
            src.append(vals)
            tgt.append(vals - start if a + 1 == pos_axis else vals)
        plans.append((tuple(tgt), tuple(src)))
    return plans


def patch_hooks(model: Any, groups: dict[str, list[tuple[int, Node]]], sources: dict[str, torch.Tensor], batch: int,
                start: int = 0, src_rows: Optional[torch.Tensor] = None) -> list:
    """Forward hooks writing ``sources[hook][node's index]`` into rows ``j*batch ..`` of patch ``j``.

    ``groups``: hook name -> [(patch number j, node)]. Query positions in the hooked activation
    are offset by ``start`` (a pass that starts at position ``start``; a node without a position
    needs ``start == 0``). ``src_rows`` maps the ``batch`` rows of a patch to rows of the source
    (default: the same rows).
    """
    hooks = []
    for name, items in groups.items():
        src = sources[name]
        plans = _plans(model, name, items, batch, start, src_rows, src.device)

        def hook(act: torch.Tensor, hook: HookPoint, plans: list = plans, src: torch.Tensor = src) -> torch.Tensor:
            act = act.clone()
            for tgt, srcix in plans:
                act[tgt] = src[srcix].to(act.dtype)
            return act

        hooks.append((name, hook))
    return hooks
