"""Path patching (Wang et al. 2022, appendix): the effect of a sender along paths into receivers.

For each sender (a head, an MLP output, a neuron, ...):

1. run the base input with every head's output (``hook_z``) frozen to its base value, except the
   sender, which takes its value from the other input; MLPs are recomputed. Record the receivers'
   ``q`` / ``k`` / ``v`` (or, with no receivers, the logits: the path into the residual stream);
2. run the base input again with only the receivers' ``q`` / ``k`` / ``v`` replaced by those
   records, and measure the metric.

``direction="denoise"`` (default) runs on the corrupted input and sends the clean value, matching
activation patching (0 = corrupted, 1 = clean); ``"noise"`` runs on the clean input and sends the
corrupted value, as the IOI paper does (then values near 1 mean no effect). Many senders share a
forward pass, one per block of batch rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ..hooks import HookPoint
from .inputs import MaskArg, PatchRuns, setup_runs
from .metrics import MetricLike, per_group
from .nodes import Node, NodeLike, as_nodes
from .patch_core import chunks, group_by_hook, hook_names, normalise_position, patch_hooks, resolve_nodes


def _check_receivers(model: Any, receivers: list[Node]) -> None:
    L = model.cfg.n_layers
    for r in receivers:
        if r.kind != "head" or r.site not in ("q", "k", "v"):
            raise ValueError(f"receiver {r}: receivers are head inputs, e.g. 'L9.H9.q', 'L9.H9.k@5', 'L9.H9.v'")
        n = None
        if r.hook_name in model.hook_dict:
            lay = model.hook_layout(r.hook_name)
            n = lay.size(lay.axes[lay.unit_axis]) if lay.unit_axis is not None else None
        if n is None or r.index >= n:
            raise ValueError(f"receiver {r}: the model has {L} layers and {n} heads at {r.site} "
                             "(k / v receivers name the key/value head on a grouped-query model)")


def _record_and_replay(model: Any, rep: torch.Tensor, rep_mask: Optional[torch.Tensor], step1: list,
                       recv: list[Node]) -> torch.Tensor:
    """Run ``step1`` hooks recording the receivers' inputs; then, with receivers, a second run with
    only those inputs replaced by the records. The logits of the last run."""
    recv_names = hook_names(recv)
    recorded: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            recorded[name] = x

        return hook

    with model.hooks(fwd_hooks=step1 + [(r, record(r)) for r in recv_names]):
        logits = model(rep, attention_mask=rep_mask)
    if not recv:
        return logits
    by_name: dict[str, list[Node]] = defaultdict(list)
    for r in recv:
        by_name[r.hook_name].append(r)

    def put(name: str) -> Callable:
        layout = model.hook_layout(name)

        def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            x = x.clone()
            for r in by_name[name]:
                idx = r.act_index(layout=layout)
                x[idx] = recorded[name][idx]
            return x

        return hook

    with model.hooks(fwd_hooks=[(name, put(name)) for name in by_name]):
        return model(rep, attention_mask=rep_mask)


def path_patch(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    senders: Sequence[NodeLike],
    receivers: Optional[Sequence[NodeLike]] = None,
    direction: str = "denoise",
    normalise: bool = True,
    clean_mask: MaskArg = None,
    corrupted_mask: MaskArg = None,
    batch_rows: int = 256,
    progress: bool = True,
) -> Float[torch.Tensor, " n_senders"]:
    """Effect of each sender through ``receivers`` (head q/k/v nodes; None = straight to the
    logits): ``[len(senders)]``, normalised as activation patching."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    runs = setup_runs(model, clean, corrupted, metric, clean_mask, corrupted_mask)
    B, P = runs.corrupted.shape
    send = resolve_nodes(model, senders, P, "sender")
    recv = [] if receivers is None else [normalise_position(r, P) for r in as_nodes(receivers)]
    _check_receivers(model, recv)
    z_names = model.find_hooks(site="z", component="attn")
    base, base_mask, src, src_mask = _base_and_source(runs, direction)
    with torch.no_grad():
        base_logits, base_cache = model.run_with_cache(base, attention_mask=base_mask, names_filter=z_names)
        src_logits, src_cache = model.run_with_cache(src, attention_mask=src_mask, names_filter=hook_names(send))
        clean_logits, corr_logits = (base_logits, src_logits) if direction == "noise" else (src_logits, base_logits)
        runs.set_baselines(clean_logits, runs.metric(corr_logits))
        out = torch.empty(len(send))
        for chunk in tqdm(chunks(list(range(len(send))), max(1, batch_rows // B)), desc="path patching",
                          disable=not progress, leave=False):
            n = len(chunk)
            rep = base.repeat(n, 1)
            rep_mask = None if base_mask is None else base_mask.repeat(n, 1)
            freeze = [(name, _frozen_to(base_cache[name], n)) for name in z_names]
            groups = group_by_hook([send[i] for i in chunk], range(n))
            step1 = freeze + patch_hooks(model, groups, {k: src_cache[k] for k in groups}, B)
            logits = _record_and_replay(model, rep, rep_mask, step1, recv)
            out[torch.tensor(chunk)] = per_group(runs.metric, logits, B).float().cpu()
    return runs.normalise(out) if normalise else out


def _frozen_to(value: torch.Tensor, n: int) -> Callable:
    """A hook replacing the activation by ``value`` repeated for ``n`` patches."""
    return lambda x, hook: value.repeat(n, *([1] * (value.ndim - 1)))


def _base_and_source(runs: PatchRuns, direction: str) -> tuple:
    """(base tokens, base mask, source tokens, source mask) for the direction."""
    if direction == "denoise":
        return runs.corrupted, runs.corrupted_mask, runs.clean, runs.clean_mask
    return runs.clean, runs.clean_mask, runs.corrupted, runs.corrupted_mask
