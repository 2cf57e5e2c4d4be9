"""Attribution patching: the first-order estimate of activation patching.

For every node: ``grad(metric at the corrupted run) . (clean activation - corrupted activation)``,
summed over the node's slice and averaged over the batch, from one clean forward pass and one
corrupted forward and backward pass. Normalised like activation patching (divided by
``metric(clean) - metric(corrupted)``), so the two are directly comparable; exact where the metric
is linear in the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from .activation_patching import _normalise_positions, setup_runs
from .metrics import MetricLike
from .nodes import NodeLike, as_nodes
from .runs import run_with_grads


def attribution_patch(
    model,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    nodes: Sequence[NodeLike],
    normalise: bool = True,
    clean_mask: Optional[torch.Tensor] = None,
    corrupted_mask: Optional[torch.Tensor] = None,
    return_runs: bool = False,
):
    """Estimated effect of patching each node clean -> corrupted: ``[len(nodes)]``.

    Unnormalised values are ``metric(corrupted) + estimated change``, in the metric's units, as
    `activation_patch` returns with ``normalise=False``.
    """
    runs = setup_runs(model, clean, corrupted, metric, clean_mask, corrupted_mask)
    node_list = [_normalise_positions(n, runs.corrupted.shape[1]) for n in as_nodes(nodes)]
    names = sorted({n.hook_name for n in node_list})
    for n in names:
        if n not in model.hook_dict:
            raise KeyError(f"hook {n!r} (of a node to patch) is not in the model")
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(runs.clean, attention_mask=runs.clean_mask, names_filter=names)
    values, acts, grads = run_with_grads(model, runs.corrupted, lambda logits, a: runs.metric(logits), names,
                                         runs.corrupted_mask)
    runs.clean_value = float(runs.metric(clean_logits).float().mean())
    runs.corrupted_value = float(values.float().mean())
    b = runs.batch
    with torch.no_grad():
        # per-activation products, then each node sums its slice
        prod = {n: grads[n] * (clean_cache[n] - acts[n]) for n in names}
        if values.ndim == 0:  # a scalar metric: the gradient is already of the batch value
            b = 1
        out = torch.stack([n.select(prod[n.hook_name]).reshape(prod[n.hook_name].shape[0], -1).sum(-1).sum() / b
                           for n in node_list]).float().cpu()
    res = out / (runs.clean_value - runs.corrupted_value) if normalise else out + runs.corrupted_value
    if normalise and abs(runs.clean_value - runs.corrupted_value) < 1e-12:
        raise ValueError("metric(clean) == metric(corrupted): nothing to normalise by; pass normalise=False")
    return (res, runs) if return_runs else res
