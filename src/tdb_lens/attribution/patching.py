"""Patching sweeps that return heatmaps: residual stream, attention / MLP outputs, heads, neurons.

Every sweep takes ``method="activation"`` (`activation_patch`, batched) or ``"attribution"``
(`attribution_patch`, one backward pass) and returns a `Labelled` of normalised effects
(0 = corrupted, 1 = clean) whose ``nodes`` name each entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from jaxtyping import Float

from .activation_patching import activation_patch
from .attribution_patching import attribution_patch
from .inputs import prepare, str_tokens
from .metrics import MetricLike
from .nodes import HEAD_SITES, Node, NodeLike, as_nodes
from .results import Labelled, node_grid, pos_labels

METHODS = ("activation", "attribution")


def patch_nodes(model: Any, clean: Any, corrupted: Any, metric: MetricLike, nodes: Sequence[NodeLike],
                method: str = "activation", **kw: Any) -> Float[torch.Tensor, " n_nodes"]:
    """Normalised effect of patching each node: ``[len(nodes)]`` (see `activation_patch`)."""
    if method == "activation":
        return activation_patch(model, clean, corrupted, metric, nodes, **kw)  # type: ignore[return-value]
    if method == "attribution":
        kw = {k: v for k, v in kw.items() if k not in ("batch_rows", "fast", "progress")}
        return attribution_patch(model, clean, corrupted, metric, nodes, **kw)  # type: ignore[return-value]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _positions(model: Any, clean: Any, kw: dict) -> tuple[int, list[str]]:
    """The number of positions of the clean input and their labels (with tokens when there is a tokenizer)."""
    toks = prepare(model, clean, kw.get("clean_mask"))[0]
    return toks.shape[1], pos_labels(toks.shape[1], str_tokens(model, toks[0]))


def _sweep(model: Any, clean: Any, corrupted: Any, metric: MetricLike, nodes: list[Node], shape: tuple,
           axes: tuple, labels: tuple, title: str, method: str, **kw: Any) -> Labelled:
    vals = patch_nodes(model, clean, corrupted, metric, nodes, method, **kw)
    return Labelled(vals.reshape(shape), axes, labels, title=f"{title} ({method} patching)",
                    nodes=node_grid(nodes, shape), meta={"method": method})


def _layer_pos_sweep(model: Any, clean: Any, corrupted: Any, metric: MetricLike, make: Any, title: str,
                     method: str, **kw: Any) -> Labelled:
    """One node per (layer, position): ``make(layer, pos)``."""
    L = model.cfg.n_layers
    P, labels = _positions(model, clean, kw)
    nodes = [make(l, p) for l in range(L) for p in range(P)]
    return _sweep(model, clean, corrupted, metric, nodes, (L, P), ("layer", "pos"),
                  ([str(l) for l in range(L)], labels), title, method, **kw)


def patch_resid(model: Any, clean: Any, corrupted: Any, metric: MetricLike, site: str = "pre",
                method: str = "activation", **kw: Any) -> Labelled:
    """The residual stream (``site`` "pre", "mid" or "post") at every layer and position: ``[layer, pos]``."""
    return _layer_pos_sweep(model, clean, corrupted, metric, lambda l, p: Node.resid(l, p, site), f"resid_{site}",
                            method, **kw)


def patch_attn_out(model: Any, clean: Any, corrupted: Any, metric: MetricLike, method: str = "activation",
                   **kw: Any) -> Labelled:
    """Each layer's attention output at each position: ``[layer, pos]``."""
    return _layer_pos_sweep(model, clean, corrupted, metric, Node.attn_out, "attn_out", method, **kw)


def patch_mlp_out(model: Any, clean: Any, corrupted: Any, metric: MetricLike, method: str = "activation",
                  **kw: Any) -> Labelled:
    """Each layer's MLP output at each position: ``[layer, pos]``."""
    return _layer_pos_sweep(model, clean, corrupted, metric, Node.mlp_out, "mlp_out", method, **kw)


def _n_units(model: Any, node: Node) -> int:
    """How many units (heads, key/value heads, neurons) the node's hook point has."""
    lay = node.hook_layout(model)
    n = None if lay.unit_axis is None else lay.size(lay.axes[lay.unit_axis])
    if n is None:
        raise ValueError(f"{node}: hook {node.hook_name!r} has no unit axis of known size ({lay})")
    return n


def patch_heads(model: Any, clean: Any, corrupted: Any, metric: MetricLike, site: str = "z", by_pos: bool = False,
                method: str = "activation", **kw: Any) -> Labelled:
    """Every head's ``site`` ("z" = output, "q", "k", "v", "pattern"): ``[layer, head]`` patching all
    positions, or ``[layer, head, pos]`` (query position) with ``by_pos``.

    On a grouped-query model ``k`` / ``v`` sweep the key/value heads.
    """
    if site not in HEAD_SITES or site == "scores":
        raise ValueError(f"site must be one of z, q, k, v, pattern, result, rot_q, rot_k; got {site!r}")
    L = model.cfg.n_layers
    H = _n_units(model, Node.head(0, 0, site=site))
    layers, heads = [str(l) for l in range(L)], [str(h) for h in range(H)]
    if by_pos:
        P, labels = _positions(model, clean, kw)
        nodes = [Node.head(l, h, p, site=site) for l in range(L) for h in range(H) for p in range(P)]
        return _sweep(model, clean, corrupted, metric, nodes, (L, H, P), ("layer", "head", "pos"),
                      (layers, heads, labels), f"head {site} by position", method, **kw)
    nodes = [Node.head(l, h, site=site) for l in range(L) for h in range(H)]
    return _sweep(model, clean, corrupted, metric, nodes, (L, H), ("layer", "head"), (layers, heads),
                  f"head {site}", method, **kw)


def patch_neurons(model: Any, clean: Any, corrupted: Any, metric: MetricLike, layers: Optional[Sequence[int]] = None,
                  pos: Optional[int] = None, neurons: Optional[Sequence[int]] = None,
                  method: str = "activation", **kw: Any) -> Labelled:
    """MLP neurons (``mlp.hook_post``) at ``pos`` (every position when None): ``[layer, neuron]``."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    neurons = list(range(_n_units(model, Node.neuron(0, 0)))) if neurons is None else list(neurons)
    nodes = [Node.neuron(l, n, pos) for l in layers for n in neurons]
    return _sweep(model, clean, corrupted, metric, nodes, (len(layers), len(neurons)), ("layer", "neuron"),
                  ([str(l) for l in layers], [str(n) for n in neurons]), "neurons", method, **kw)


def patch_node_list(model: Any, clean: Any, corrupted: Any, metric: MetricLike, nodes: Sequence[NodeLike],
                    method: str = "activation", **kw: Any) -> Labelled:
    """Any list of nodes: a 1-D `Labelled` labelled by the nodes' names."""
    ns = as_nodes(nodes)
    return _sweep(model, clean, corrupted, metric, ns, (len(ns),), ("node",), ([str(n) for n in ns],),
                  "nodes", method, **kw)
