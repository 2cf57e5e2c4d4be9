"""Patching sweeps that return heatmaps: residual stream, attention / MLP outputs, heads, neurons.

Every sweep takes ``method="activation"`` (`activation_patch`, batched) or ``"attribution"``
(`attribution_patch`, one backward pass) and returns a `Labelled` of normalised effects
(0 = corrupted, 1 = clean) whose ``nodes`` name each entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from .activation_patching import activation_patch
from .attribution_patching import attribution_patch
from .metrics import MetricLike
from .nodes import HEAD_SITES, Node, NodeLike, as_nodes
from .results import Labelled, node_grid
from .runs import prepare

METHODS = ("activation", "attribution")


def patch_nodes(model, clean: Any, corrupted: Any, metric: MetricLike, nodes: Sequence[NodeLike],
                method: str = "activation", **kw) -> torch.Tensor:
    """Normalised effect of patching each node: ``[len(nodes)]`` (see `activation_patch`)."""
    if method == "activation":
        return activation_patch(model, clean, corrupted, metric, nodes, **kw)
    if method == "attribution":
        kw = {k: v for k, v in kw.items() if k not in ("batch_rows", "fast", "progress")}
        return attribution_patch(model, clean, corrupted, metric, nodes, **kw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _pos_labels(model, clean, n_pos: int, clean_mask=None) -> list[str]:
    try:
        toks, _ = prepare(model, clean, clean_mask)
        strs = model.to_str_tokens(toks[0])
        return [f"{p}:{s}" for p, s in enumerate(strs)]
    except Exception:
        return [str(p) for p in range(n_pos)]


def _sweep(model, clean, corrupted, metric, nodes: list[Node], shape, axes, labels, title, method, **kw) -> Labelled:
    vals = patch_nodes(model, clean, corrupted, metric, nodes, method, **kw)
    return Labelled(vals.reshape(shape), axes, labels, title=f"{title} ({method} patching)",
                    nodes=node_grid(nodes, shape), meta={"method": method})


def _n_pos(model, clean, kw) -> int:
    return prepare(model, clean, kw.get("clean_mask"))[0].shape[1]


def patch_resid(model, clean: Any, corrupted: Any, metric: MetricLike, site: str = "pre",
                method: str = "activation", **kw) -> Labelled:
    """The residual stream (``site`` "pre", "mid" or "post") at every layer and position: ``[layer, pos]``."""
    L, P = model.cfg.n_layers, _n_pos(model, clean, kw)
    nodes = [Node.resid(l, p, site) for l in range(L) for p in range(P)]
    return _sweep(model, clean, corrupted, metric, nodes, (L, P), ("layer", "pos"),
                  ([str(l) for l in range(L)], _pos_labels(model, clean, P, kw.get("clean_mask"))),
                  f"resid_{site}", method, **kw)


def patch_attn_out(model, clean: Any, corrupted: Any, metric: MetricLike, method: str = "activation", **kw) -> Labelled:
    """Each layer's attention output at each position: ``[layer, pos]``."""
    L, P = model.cfg.n_layers, _n_pos(model, clean, kw)
    nodes = [Node.attn_out(l, p) for l in range(L) for p in range(P)]
    return _sweep(model, clean, corrupted, metric, nodes, (L, P), ("layer", "pos"),
                  ([str(l) for l in range(L)], _pos_labels(model, clean, P, kw.get("clean_mask"))),
                  "attn_out", method, **kw)


def patch_mlp_out(model, clean: Any, corrupted: Any, metric: MetricLike, method: str = "activation", **kw) -> Labelled:
    """Each layer's MLP output at each position: ``[layer, pos]``."""
    L, P = model.cfg.n_layers, _n_pos(model, clean, kw)
    nodes = [Node.mlp_out(l, p) for l in range(L) for p in range(P)]
    return _sweep(model, clean, corrupted, metric, nodes, (L, P), ("layer", "pos"),
                  ([str(l) for l in range(L)], _pos_labels(model, clean, P, kw.get("clean_mask"))),
                  "mlp_out", method, **kw)


def patch_heads(model, clean: Any, corrupted: Any, metric: MetricLike, site: str = "z", by_pos: bool = False,
                method: str = "activation", **kw) -> Labelled:
    """Every head's ``site`` ("z" = output, "q", "k", "v", "pattern"): ``[layer, head]`` patching all
    positions, or ``[layer, head, pos]`` (query position) with ``by_pos``.

    On a grouped-query model ``k`` / ``v`` sweep the key/value heads.
    """
    if site not in HEAD_SITES or site == "scores":
        raise ValueError(f"site must be one of z, q, k, v, pattern, result, rot_q, rot_k; got {site!r}")
    L = model.cfg.n_layers
    H = getattr(model.cfg, "n_key_value_heads", model.cfg.n_heads) if site in ("k", "v", "rot_k") else model.cfg.n_heads
    if by_pos:
        P = _n_pos(model, clean, kw)
        nodes = [Node.head(l, h, p, site=site) for l in range(L) for h in range(H) for p in range(P)]
        return _sweep(model, clean, corrupted, metric, nodes, (L, H, P), ("layer", "head", "pos"),
                      ([str(l) for l in range(L)], [str(h) for h in range(H)],
                       _pos_labels(model, clean, P, kw.get("clean_mask"))), f"head {site} by position", method, **kw)
    nodes = [Node.head(l, h, site=site) for l in range(L) for h in range(H)]
    return _sweep(model, clean, corrupted, metric, nodes, (L, H), ("layer", "head"),
                  ([str(l) for l in range(L)], [str(h) for h in range(H)]), f"head {site}", method, **kw)


def patch_neurons(model, clean: Any, corrupted: Any, metric: MetricLike, layers: Optional[Sequence[int]] = None,
                  pos: Optional[int] = None, neurons: Optional[Sequence[int]] = None,
                  method: str = "activation", **kw) -> Labelled:
    """MLP neurons (``mlp.hook_post``) at ``pos`` (every position when None): ``[layer, neuron]``."""
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    neurons = list(range(model.cfg.d_mlp)) if neurons is None else list(neurons)
    nodes = [Node.neuron(l, n, pos) for l in layers for n in neurons]
    return _sweep(model, clean, corrupted, metric, nodes, (len(layers), len(neurons)), ("layer", "neuron"),
                  ([str(l) for l in layers], [str(n) for n in neurons]), "neurons", method, **kw)


def patch_node_list(model, clean: Any, corrupted: Any, metric: MetricLike, nodes: Sequence[NodeLike],
                    method: str = "activation", **kw) -> Labelled:
    """Any list of nodes: a 1-D `Labelled` labelled by the nodes' names."""
    ns = as_nodes(nodes)
    return _sweep(model, clean, corrupted, metric, ns, (len(ns),), ("node",), ([str(n) for n in ns],),
                  "nodes", method, **kw)
