"""Activation patching, many patches per forward pass.

Each patch copies one node's clean activation into the corrupted run. A pass repeats the
corrupted batch once per patch along the batch axis (rows ``j*B .. j*B+B-1`` carry patch ``j``) and
one hook per hook point writes every patch's clean values into its rows at once.

Patches are grouped by the first block they touch. A patch in block ``l`` at position ``s`` cannot
change anything before block ``l`` or before position ``s`` (attention is causal), so a pass starts
at block ``l`` from the corrupted run's residual at positions ``s..`` with the corrupted keys and
values of positions ``< s`` as a KV cache, and unembeds only the positions the metric reads. The
result is the same as patching a full forward pass (``fast=False`` runs that, as a check).

Results are normalised: ``(metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))``
on batch means, so 0 = corrupted, 1 = clean.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from ..models.components import KVCache
from .metrics import CallableMetric, Metric, MetricLike, as_metric, per_group
from .nodes import Node, NodeLike, as_nodes
from .runs import prepare


@dataclass
class PatchRuns:
    """The clean and corrupted inputs of a patching experiment and their metric baselines."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    clean_mask: Optional[torch.Tensor]
    corrupted_mask: Optional[torch.Tensor]
    metric: Metric
    clean_value: float
    corrupted_value: float

    @property
    def batch(self) -> int:
        return self.corrupted.shape[0]

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        denom = self.clean_value - self.corrupted_value
        if abs(denom) < 1e-12:
            raise ValueError(f"metric(clean) == metric(corrupted) == {self.clean_value:.6g}: nothing to normalise by; "
                             "pass normalise=False")
        return (values - self.corrupted_value) / denom


def setup_runs(model, clean: Any, corrupted: Any, metric: MetricLike,
               clean_mask: Optional[torch.Tensor] = None, corrupted_mask: Optional[torch.Tensor] = None) -> PatchRuns:
    metric = as_metric(metric)
    tc, mc = prepare(model, clean, clean_mask)
    tx, mx = prepare(model, corrupted, corrupted_mask)
    if tc.shape != tx.shape:
        raise ValueError(f"clean tokens {tuple(tc.shape)} and corrupted tokens {tuple(tx.shape)} must have the same shape "
                         "(same batch size and length; pad or pick prompts of equal length)")
    return PatchRuns(tc, tx, mc, mx, metric, 0.0, 0.0)


def _start_layer(node: Node) -> Optional[int]:
    """The first block a patch of ``node`` touches (None: the embeddings, run everything)."""
    if node.layer is not None:
        return node.layer
    if node.kind in ("sae_latent", "sae_error"):
        m = re.match(r"blocks\.(\d+)\.", node.site or "")
        return int(m.group(1)) if m else None
    return None


def _normalise_positions(node: Node, n_pos: int) -> Node:
    if node.pos is None or (node.pos >= 0 and (node.key_pos is None or node.key_pos >= 0)):
        if node.pos is not None and node.pos >= n_pos:
            raise ValueError(f"{node}: position {node.pos} is outside the {n_pos} positions of the input")
        return node
    key = None if node.key_pos is None else node.key_pos % n_pos
    return node.at(node.pos % n_pos, key)


def _pos_axis(node: Node) -> int:
    return 2 if node.is_pair else 1


def patch_hooks(groups: dict[str, list[tuple[int, Node]]], sources: dict[str, torch.Tensor], batch: int,
                start: int = 0, src_rows: Optional[torch.Tensor] = None) -> list:
    """Forward hooks writing ``sources[hook][node's index]`` into rows ``j*batch ..`` of patch ``j``.

    ``groups``: hook name -> [(patch number j, node)]. Query positions in the hooked activation
    are offset by ``start`` (a pass that starts at position ``start``; a node without a position
    needs ``start == 0``). ``src_rows`` maps the
    ``batch`` rows of a patch to rows of the source (default: the same rows).
    """
    hooks = []
    for name, items in groups.items():
        src = sources[name]
        # patches with the same index layout (which entries are slices) are written together
        by_sig: dict[tuple, list] = defaultdict(list)
        for j, node in items:
            idx = node.act_index()[1:]
            by_sig[tuple(isinstance(i, slice) for i in idx)].append((j, node, idx))
        plans = []
        dev = src.device
        base = torch.arange(batch, device=dev) if src_rows is None else src_rows.to(dev)
        for sig, entries in by_sig.items():
            tgt_rows = torch.cat([j * batch + torch.arange(batch, device=dev) for j, _, _ in entries])
            s_rows = base.repeat(len(entries))
            tgt, srcix = [tgt_rows], [s_rows]
            n_axes = len(sig)
            for a in range(n_axes):
                if sig[a]:  # a slice: every position (then the pass starts at 0) or every key
                    tgt.append(slice(None))
                    srcix.append(slice(None))
                    continue
                vals = torch.tensor([idx[a] for _, _, idx in entries], device=dev).repeat_interleave(batch)
                srcix.append(vals)
                tgt.append(vals - start if a + 1 == _pos_axis(entries[0][1]) else vals)
            plans.append((tuple(tgt), tuple(srcix)))

        def hook(act, hook, plans=plans, src=src):
            act = act.clone()
            for tgt, srcix in plans:
                act[tgt] = src[srcix].to(act.dtype)
            return act

        hooks.append((name, hook))
    return hooks


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def activation_patch(
    model,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    nodes: Sequence[NodeLike],
    normalise: bool = True,
    clean_mask: Optional[torch.Tensor] = None,
    corrupted_mask: Optional[torch.Tensor] = None,
    batch_rows: int = 256,
    fast: bool = True,
    progress: bool = True,
    return_runs: bool = False,
    min_rows: int = 48,
):
    """Patch each node's clean activation into the corrupted run, one patch at a time.

    Returns ``[len(nodes)]`` (normalised unless ``normalise=False``). ``batch_rows`` bounds the rows
    of one forward pass (patches per pass <= ``batch_rows // batch``); patches starting at the same
    block and position share a pass, and neighbouring positions are merged into it until it has
    ``min_rows`` rows (a pass costs as much as its earliest start). Nodes without a position
    patch every position. A node's negative positions count from the end of the input.
    """
    runs = setup_runs(model, clean, corrupted, metric, clean_mask, corrupted_mask)
    node_list = as_nodes(nodes)
    B, P = runs.corrupted.shape
    node_list = [_normalise_positions(n, P) for n in node_list]
    names = sorted({n.hook_name for n in node_list})
    for n in names:
        if n not in model.hook_dict:
            raise KeyError(f"hook {n!r} (of a node to patch) is not in the model")
    L = model.cfg.n_layers
    metric_ = runs.metric
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(runs.clean, attention_mask=runs.clean_mask, names_filter=names)
        kv = KVCache.empty(L)
        resid_names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
        corr_logits, corr_cache = model.run_with_cache(runs.corrupted, attention_mask=runs.corrupted_mask,
                                                       names_filter=resid_names, past_kv_cache=kv)
        runs.clean_value = float(metric_(clean_logits).float().mean())
        runs.corrupted_value = float(metric_(corr_logits).float().mean())
        sources = {n: clean_cache[n] for n in names}
        out = torch.empty(len(node_list))
        # plan passes: group by start layer, order by start position
        order = sorted(range(len(node_list)), key=lambda i: (
            -1 if _start_layer(node_list[i]) is None else _start_layer(node_list[i]),
            0 if node_list[i].pos is None else node_list[i].pos, node_list[i].sort_key()))
        passes = _plan_passes(node_list, order, B, batch_rows, min_rows, fast)
        for layer, chunk in tqdm(passes, desc="activation patching", disable=not progress, leave=False):
            groups: dict[str, list[tuple[int, Node]]] = defaultdict(list)
            for j, i in enumerate(chunk):
                groups[node_list[i].hook_name].append((j, node_list[i]))
            start = 0 if layer is None else min(0 if node_list[i].pos is None else node_list[i].pos for i in chunk)
            vals = _run_pass(model, runs, corr_cache, corr_logits, kv, groups, sources, len(chunk), layer, start)
            out[torch.tensor(chunk)] = vals.float().cpu()
    res = runs.normalise(out) if normalise else out
    return (res, runs) if return_runs else res


def _plan_passes(nodes: list[Node], order: list[int], B: int, batch_rows: int, min_rows: int,
                 fast: bool) -> list[tuple[Optional[int], list[int]]]:
    """Passes as (start layer or None, node indices), from nodes sorted by (layer, position)."""
    per = max(1, batch_rows // B)
    passes: list[tuple[Optional[int], list[int]]] = []
    key = lambda i: ((_start_layer(nodes[i]) if fast else None),
                     (0 if nodes[i].pos is None else nodes[i].pos) if fast else 0)
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
        for chunk in _chunks(group, per):
            if cur and len(cur) + len(chunk) > per:
                passes.append((cur_layer, cur))
                cur = []
            cur = cur + chunk
            if len(cur) * B >= min_rows:
                passes.append((cur_layer, cur))
                cur = []
    if cur:
        passes.append((cur_layer, cur))
    return passes


def _run_pass(model, runs: PatchRuns, corr_cache, corr_logits, kv: KVCache, groups, sources, n: int,
              layer: Optional[int], start: int) -> torch.Tensor:
    """Metric (batch mean) of each of the ``n`` patches of one pass."""
    B, P = runs.corrupted.shape
    metric = runs.metric
    mask = runs.corrupted_mask
    rows = n * B
    rep_mask = None if mask is None else mask.repeat(n, 1)
    if layer is None:  # full forward pass
        hooks = patch_hooks(groups, sources, B)
        with model.hooks(fwd_hooks=hooks):
            logits = model(runs.corrupted.repeat(n, 1), attention_mask=rep_mask)
        return per_group(metric, logits, B)
    L = model.cfg.n_layers
    hooks = patch_hooks(groups, sources, B, start=start)
    resid = corr_cache[f"blocks.{layer}.hook_resid_pre"][:, start:].repeat(n, 1, 1)
    cache = None
    if start > 0:
        cache = KVCache.empty(L)
        for l in range(L):
            k, v = kv.keys[l][:, :, :start], kv.values[l][:, :, :start]  # type: ignore[index]
            if l >= layer:
                k, v = k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)
            cache.keys[l], cache.values[l] = k, v
        if rep_mask is not None:
            cache.attention_mask = rep_mask[:, :start]
    ctx = model.make_context(rows, P - start, None if rep_mask is None else rep_mask[:, start:], cache, resid.device)
    with model.hooks(fwd_hooks=hooks):
        for blk in model.blocks[layer:]:
            resid = blk(resid, ctx)
    final_corr = corr_cache[f"blocks.{L - 1}.hook_resid_post"]
    if isinstance(metric, CallableMetric) or metric.pos is None:
        logits = model.unembed(model.ln_final(resid))
        if start > 0:
            logits = torch.cat([corr_logits[:, :start].repeat(n, 1, 1), logits], dim=1)
        return per_group(metric, logits, B)
    pos = metric.positions(rows, P, device=resid.device)  # absolute, per row
    r = torch.arange(rows, device=resid.device)
    late = pos >= start
    x = final_corr.repeat(n, 1, 1)[r, pos]  # rows reading a position before `start` are unchanged
    x[late] = resid[r[late], pos[late] - start]
    logits = model.unembed(model.ln_final(x[:, None]))[:, 0]
    return metric.at_pos(logits).reshape(n, B).mean(-1)
