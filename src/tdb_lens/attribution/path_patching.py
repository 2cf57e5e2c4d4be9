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
from collections.abc import Sequence
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .activation_patching import _chunks, _normalise_positions, patch_hooks, setup_runs
from .metrics import MetricLike, per_group
from .nodes import Node, NodeLike, as_nodes


def _check_receivers(model, receivers: list[Node]) -> None:
    cfg = model.cfg
    for r in receivers:
        if r.kind != "head" or r.site not in ("q", "k", "v"):
            raise ValueError(f"receiver {r}: receivers are head inputs, e.g. 'L9.H9.q', 'L9.H9.k@5', 'L9.H9.v'")
        n = getattr(cfg, "n_key_value_heads", cfg.n_heads) if r.site in ("k", "v") else cfg.n_heads
        if r.layer >= cfg.n_layers or r.index >= n:
            raise ValueError(f"receiver {r}: the model has {cfg.n_layers} layers and {n} heads at {r.site} "
                             "(k / v receivers name the key/value head on a grouped-query model)")


def path_patch(
    model,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    senders: Sequence[NodeLike],
    receivers: Optional[Sequence[NodeLike]] = None,
    direction: str = "denoise",
    normalise: bool = True,
    clean_mask: Optional[torch.Tensor] = None,
    corrupted_mask: Optional[torch.Tensor] = None,
    batch_rows: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Effect of each sender through ``receivers`` (head q/k/v nodes; None = straight to the
    logits): ``[len(senders)]``, normalised as activation patching."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    runs = setup_runs(model, clean, corrupted, metric, clean_mask, corrupted_mask)
    B, P = runs.corrupted.shape
    send = [_normalise_positions(n, P) for n in as_nodes(senders)]
    recv = [] if receivers is None else [_normalise_positions(n, P) for n in as_nodes(receivers)]
    _check_receivers(model, recv)
    L = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    send_names = sorted({n.hook_name for n in send})
    recv_names = sorted({n.hook_name for n in recv})
    for n in send_names:
        if n not in model.hook_dict:
            raise KeyError(f"sender hook {n!r} is not in the model")
    if direction == "denoise":
        base, base_mask, src, src_mask = runs.corrupted, runs.corrupted_mask, runs.clean, runs.clean_mask
    else:
        base, base_mask, src, src_mask = runs.clean, runs.clean_mask, runs.corrupted, runs.corrupted_mask
    with torch.no_grad():
        base_logits, base_cache = model.run_with_cache(base, attention_mask=base_mask, names_filter=z_names)
        src_logits, src_cache = model.run_with_cache(src, attention_mask=src_mask, names_filter=send_names)
        clean_logits = base_logits if direction == "noise" else src_logits
        corr_logits = src_logits if direction == "noise" else base_logits
        runs.clean_value = float(runs.metric(clean_logits).float().mean())
        runs.corrupted_value = float(runs.metric(corr_logits).float().mean())
        out = torch.empty(len(send))
        per = max(1, batch_rows // B)
        for chunk in tqdm(_chunks(list(range(len(send))), per), desc="path patching", disable=not progress, leave=False):
            n = len(chunk)
            rep = base.repeat(n, 1)
            rep_mask = None if base_mask is None else base_mask.repeat(n, 1)
            freeze = [(name, (lambda v: lambda x, hook: v.repeat(n, 1, 1, 1))(base_cache[name])) for name in z_names]
            groups: dict[str, list[tuple[int, Node]]] = defaultdict(list)
            for j, i in enumerate(chunk):
                groups[send[i].hook_name].append((j, send[i]))
            sender_hooks = patch_hooks(groups, {k: src_cache[k] for k in groups}, B)
            recorded: dict[str, torch.Tensor] = {}

            def record(x, hook):
                recorded[hook.name] = x

            step1 = freeze + sender_hooks + [(r, record) for r in recv_names]
            with model.hooks(fwd_hooks=step1):
                logits = model(rep, attention_mask=rep_mask)
            if recv:
                by_name: dict[str, list[Node]] = defaultdict(list)
                for r in recv:
                    by_name[r.hook_name].append(r)

                def put(x, hook):
                    x = x.clone()
                    for r in by_name[hook.name]:
                        x[r.act_index()] = recorded[hook.name][r.act_index()]
                    return x

                with model.hooks(fwd_hooks=[(name, put) for name in by_name]):
                    logits = model(rep, attention_mask=rep_mask)
            out[torch.tensor(chunk)] = per_group(runs.metric, logits, B).float().cpu()
    return runs.normalise(out) if normalise else out
