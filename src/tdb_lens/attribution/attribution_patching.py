"""Attribution patching: the first-order estimate of activation patching.

For every node: ``grad(metric at the corrupted run) . (clean activation - corrupted activation)``,
summed over the node's slice and averaged over the batch, from one clean forward pass and one
corrupted forward and backward pass. Normalised like activation patching (divided by
``metric(clean) - metric(corrupted)``), so the two are directly comparable; exact where the metric
is linear in the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from jaxtyping import Float

from .gradients import metric_objective, run_with_grads
from .inputs import MaskArg, PatchRuns
from .metrics import MetricLike
from .nodes import NodeLike
from .patch_core import prepare_node_patching


def attribution_patch(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    nodes: Sequence[NodeLike],
    normalise: bool = True,
    clean_mask: MaskArg = None,
    corrupted_mask: MaskArg = None,
    return_runs: bool = False,
) -> Union[Float[torch.Tensor, " n_nodes"], tuple[Float[torch.Tensor, " n_nodes"], PatchRuns]]:
    """Estimated effect of patching each node clean -> corrupted: ``[len(nodes)]``.

    Unnormalised values are ``metric(corrupted) + estimated change``, in the metric's units, as
    `activation_patch` returns with ``normalise=False``.
    """
    setup = prepare_node_patching(model, clean, corrupted, metric, nodes, clean_mask, corrupted_mask)
    runs, names = setup.runs, setup.names
    grun = run_with_grads(model, runs.corrupted, metric_objective(runs.metric), names, runs.corrupted_mask)
    runs.set_baselines(setup.clean_logits, grun.values)
    # a scalar metric: the gradient is already of the batch value
    b = 1 if grun.values.ndim == 0 else runs.batch
    with torch.no_grad():
        change = {n: grun.change(n, setup.clean_acts[n]) for n in names}  # per entry, then each node sums its slice
        out = torch.stack([n.select(change[n.hook_name]).reshape(runs.batch, -1).sum(-1).sum() / b
                           for n in setup.nodes]).float().cpu()
    return setup.result(out / runs.denominator() if normalise else out + runs.corrupted_value, return_runs)
