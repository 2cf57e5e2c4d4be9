"""Activation patching, many patches per forward pass.

Each patch copies one node's clean activation into the corrupted run. A pass repeats the
corrupted batch once per patch along the batch axis (rows ``j*B .. j*B+B-1`` carry patch ``j``) and
one hook per hook point writes every patch's clean values into its rows at once (`patch_core`).

Patches are grouped by the first block they touch. A patch in block ``l`` at position ``s`` cannot
change anything before block ``l`` or before position ``s`` (attention is causal), so a pass starts
at block ``l`` from the corrupted run's residual at positions ``s..`` with the corrupted keys and
values of positions ``< s`` as a KV cache, and unembeds only the positions the metric reads. The
blocks and the unembedding are the engine's (``run_blocks``, ``logits_from_resid``), so the result is
the same as patching a full forward pass (``fast=False`` runs that, as a check).

Results are normalised: ``(metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))``
on batch means, so 0 = corrupted, 1 = clean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ..models.components import KVCache
from .inputs import MaskArg, PatchRuns
from .metrics import CallableMetric, MetricLike, per_group
from .nodes import Node, NodeLike
from .patch_core import chunks, group_by_hook, patch_hooks, prepare_node_patching, start_layer


@dataclass
class CorruptedRun:
    """What a pass starting inside the model reuses from the corrupted run: its logits, the
    residual entering every block (and the final one) and its keys and values."""

    logits: Float[torch.Tensor, "batch pos vocab"]
    resid: list[torch.Tensor]  # [batch, pos, d_model] entering block l; entry n_layers: the final residual
    kv: KVCache


def corrupted_run(model: Any, runs: PatchRuns) -> CorruptedRun:
    L = model.cfg.n_layers
    names = [model.hook_name("resid_pre", l) for l in range(L)] + [model.hook_name("resid_post", L - 1)]
    kv = KVCache.empty(L)
    logits, cache = model.run_with_cache(runs.corrupted, attention_mask=runs.corrupted_mask, names_filter=names,
                                         past_kv_cache=kv)
    return CorruptedRun(logits, [cache[n] for n in names], kv)


def activation_patch(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    nodes: Sequence[NodeLike],
    normalise: bool = True,
    clean_mask: MaskArg = None,
    corrupted_mask: MaskArg = None,
    batch_rows: int = 256,
    fast: bool = True,
    progress: bool = True,
    return_runs: bool = False,
    min_rows: int = 48,
) -> Union[Float[torch.Tensor, " n_nodes"], tuple[Float[torch.Tensor, " n_nodes"], PatchRuns]]:
    """Patch each node's clean activation into the corrupted run, one patch at a time.

    Returns ``[len(nodes)]`` (normalised unless ``normalise=False``). ``batch_rows`` bounds the rows
    of one forward pass (patches per pass <= ``batch_rows // batch``); patches starting at the same
    block and position share a pass, and neighbouring positions are merged into it until it has
    ``min_rows`` rows (a pass costs as much as its earliest start). Nodes without a position
    patch every position. A node's negative positions count from the end of the input.
    """
    setup = prepare_node_patching(model, clean, corrupted, metric, nodes, clean_mask, corrupted_mask)
    runs, node_list = setup.runs, setup.nodes
    B = runs.batch
    starts = [start_layer(model, n) for n in node_list]
    with torch.no_grad():
        base = corrupted_run(model, runs)
        runs.set_baselines(setup.clean_logits, runs.metric(base.logits))
        out = torch.empty(len(node_list))
        passes = plan_passes(node_list, starts, B, batch_rows, min_rows, fast)
        for layer, chunk in tqdm(passes, desc="activation patching", disable=not progress, leave=False):
            groups = group_by_hook([node_list[i] for i in chunk], range(len(chunk)))
            start = 0 if layer is None else min(node_list[i].pos or 0 for i in chunk)
            vals = _run_pass(model, runs, base, groups, setup.clean_acts, len(chunk), layer, start)
            out[torch.tensor(chunk)] = vals.float().cpu()
    return setup.result(runs.normalise(out) if normalise else out, return_runs)


def plan_passes(nodes: list[Node], starts: list[Optional[int]], B: int, batch_rows: int, min_rows: int,
                fast: bool) -> list[tuple[Optional[int], list[int]]]:
    """Passes as (start layer or None, node indices): nodes sorted by (start layer, position), a
    pass holding at most ``batch_rows // B`` patches of one start layer."""
    per = max(1, batch_rows // B)
    order = sorted(range(len(nodes)), key=lambda i: (-1 if starts[i] is None else starts[i], nodes[i].pos or 0,
                                                     nodes[i].sort_key()))
    key = lambda i: ((starts[i], nodes[i].pos or 0) if fast else (None, 0))
    passes: list[tuple[Optional[int], list[int]]] = []
    cur: list[int] = []
    cur_layer: Optional[int] = None
    i = 0
    while i < len(order):
        k = key(order[i])
        group = []
        while i < len(order) and key(order[i]) == k:
            group.append(order[i])
            i += 1
        if cur and (k[0] != cur_layer or len(cur) + len(group) > per):
            passes.append((cur_layer, cur))
            cur = []
        cur_layer = k[0]
        for piece in chunks(group, per):
            if cur and len(cur) + len(piece) > per:
                passes.append((cur_layer, cur))
                cur = []
            cur = cur + piece
            if len(cur) * B >= min_rows:
                passes.append((cur_layer, cur))
                cur = []
    if cur:
        passes.append((cur_layer, cur))
    return passes


def _start_cache(model: Any, base: CorruptedRun, layer: int, start: int, n: int,
                 rep_mask: Optional[torch.Tensor]) -> Optional[KVCache]:
    """The corrupted keys and values of positions ``< start`` (repeated per patch from ``layer`` on)."""
    if start == 0:
        return None
    L = model.cfg.n_layers
    cache = KVCache.empty(L)
    for l in range(L):
        k, v = base.kv.keys[l][:, :, :start], base.kv.values[l][:, :, :start]  # type: ignore[index]
        if l >= layer:
            k, v = k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)
        cache.keys[l], cache.values[l] = k, v
    if rep_mask is not None:
        cache.attention_mask = rep_mask[:, :start]
    return cache


def _run_pass(model: Any, runs: PatchRuns, base: CorruptedRun, groups: dict, sources: dict, n: int,
              layer: Optional[int], start: int) -> torch.Tensor:
    """Metric (batch mean) of each of the ``n`` patches of one pass."""
    B, P = runs.corrupted.shape
    metric = runs.metric
    rows = n * B
    rep_mask = None if runs.corrupted_mask is None else runs.corrupted_mask.repeat(n, 1)
    if layer is None:  # full forward pass
        with model.hooks(fwd_hooks=patch_hooks(model, groups, sources, B)):
            logits = model(runs.corrupted.repeat(n, 1), attention_mask=rep_mask)
        return per_group(metric, logits, B)
    resid = base.resid[layer][:, start:].repeat(n, 1, 1)
    cache = _start_cache(model, base, layer, start, n, rep_mask)
    ctx = model.make_context(rows, P - start, None if rep_mask is None else rep_mask[:, start:], cache, resid.device)
    with model.hooks(fwd_hooks=patch_hooks(model, groups, sources, B, start=start)):
        resid = model.run_blocks(resid, ctx, layer)
    if isinstance(metric, CallableMetric) or metric.pos is None:
        logits = model.logits_from_resid(resid)
        if start > 0:
            logits = torch.cat([base.logits[:, :start].repeat(n, 1, 1), logits], dim=1)
        return per_group(metric, logits, B)
    pos = metric.positions(rows, P, device=resid.device)  # absolute, per row
    r = torch.arange(rows, device=resid.device)
    late = pos >= start
    x = base.resid[-1].repeat(n, 1, 1)[r, pos]  # rows reading a position before `start` are unchanged
    x[late] = resid[r[late], pos[late] - start]
    logits = model.logits_from_resid(x[:, None])[:, 0]
    return metric.at_pos(logits).reshape(n, B).mean(-1)
