"""Circuits: edge attribution patching, and evaluating a circuit by mean-ablating everything else.

Graph. Senders: the embeddings ``E``, every head ``L{l}.H{h}`` (its write ``z @ W_O``) and every MLP
``L{l}.MLP``. Receivers: every head's query, key and value inputs ``L{l}.H{h}.q/.k/.v`` (on a
grouped-query model ``k`` / ``v`` are the key/value heads), every MLP's input ``L{l}.MLP`` and the
logits ``L{n-1}.R.post`` (the final residual). An edge goes from a sender to every receiver after it.

Edge attribution patching (Syed et al. 2023): ``score(u -> v) = (clean write of u - corrupted write
of u) . d metric / d (input of v)`` at the corrupted run, batch mean, from one clean and one
corrupted forward-and-backward pass (receivers' inputs are separated per head with
``set_use_split_qkv_input``, restored afterwards).

`evaluate_circuit` mean-ablates every head (``scope`` also "mlp" / "neuron") outside a set of nodes,
or every head-to-head / head-to-logits edge outside a set of edges, and reports
``faithfulness = metric(circuit) / metric(model)``. Means can be taken per group of reference
prompts (IOI: per template over the ABC prompts) with ``groups`` / ``target_groups``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..hooks import HookPoint
from .ablation import GroupIds, Means, compute_means, means_for_rows
from .gradients import GradRun, metric_objective, run_with_grads
from .inputs import MaskArg, prepare, setup_runs
from .metrics import MetricLike, as_metric
from .nodes import Node, NodeLike, as_node, as_nodes
from .results import Labelled

EdgeLike = Union[tuple[NodeLike, NodeLike], str]


@contextlib.contextmanager
def split_qkv(model: Any, on: bool = True) -> Iterator[Any]:
    """Temporarily switch per-head q/k/v inputs on (or off); restores each block's setting."""
    prev = [b.attn.use_split_qkv_input for b in model.blocks]
    try:
        for b in model.blocks:
            b.attn.use_split_qkv_input = on
        yield model
    finally:
        for b, p in zip(model.blocks, prev):
            b.attn.use_split_qkv_input = p


def logits_node(model: Any) -> Node:
    """The receiver standing for the logits: the final residual."""
    return Node.resid(model.cfg.n_layers - 1, site="post")


def graph_nodes(model: Any, include_mlps: bool = True) -> tuple[list[Node], list[Node], list[float], list[float]]:
    """(senders, receivers, sender depth, receiver depth); an edge needs sender depth < receiver depth."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    Hkv = getattr(cfg, "n_key_value_heads", H)
    senders, s_depth = [Node.embed()], [-1.0]
    receivers: list[Node] = []
    r_depth: list[float] = []
    for l in range(L):
        senders += [Node.head(l, h) for h in range(H)]
        s_depth += [float(l)] * H
        for site, n in (("q", H), ("k", Hkv), ("v", Hkv)):
            receivers += [Node.head(l, h, site=site) for h in range(n)]
            r_depth += [float(l)] * n
        if include_mlps:
            senders.append(Node.mlp_out(l))
            s_depth.append(l + 0.5)
            receivers.append(Node.mlp_out(l))
            r_depth.append(l + 0.5)
    receivers.append(logits_node(model))
    r_depth.append(float(L))
    return senders, receivers, s_depth, r_depth


@dataclass
class EdgeScores:
    """``scores`` ``[sender, receiver]`` (`Labelled`; 0 where there is no edge) and ``valid``."""

    scores: Labelled
    senders: list[Node]
    receivers: list[Node]
    valid: torch.Tensor

    def __repr__(self) -> str:
        top = ", ".join(f"{s}->{r}: {v:+.3g}" for (s, r), v in self.top(3))
        return f"EdgeScores({len(self.senders)} senders x {len(self.receivers)} receivers; top {top})"

    def _repr_html_(self) -> str:
        return self.scores._repr_html_()

    def top(self, k: int = 20, by_abs: bool = True) -> list[tuple[tuple[Node, Node], float]]:
        v = self.scores.values.masked_fill(~self.valid, 0.0)
        key = (v.abs() if by_abs else v).reshape(-1)
        idx = key.topk(min(k, int(self.valid.sum()))).indices.tolist()
        R = len(self.receivers)
        return [((self.senders[i // R], self.receivers[i % R]), float(v.reshape(-1)[i])) for i in idx]

    def get(self, sender: NodeLike, receiver: NodeLike) -> float:
        return float(self.scores.values[self.senders.index(as_node(sender)), self.receivers.index(as_node(receiver))])


def _eap_names(model: Any) -> tuple[list[str], list[str], list[str]]:
    """(embedding hooks, sender hooks, receiver hooks) of the edge graph."""
    L = model.cfg.n_layers
    emb = model.find_hooks(component="embed")
    send = emb + [model.hook_name("z", l) for l in range(L)] + [model.hook_name("mlp_out", l) for l in range(L)]
    recv = []
    for l in range(L):
        recv += [model.hook_name(f"{s}_input", l) for s in "qkv"]
        recv += [model.hook_name("resid_mid", l), model.hook_name("resid_post", l)]
    return emb, send, recv


def _eap_scores(model: Any, grun: GradRun, clean: Any, emb: list[str],
                include_mlps: bool) -> torch.Tensor:
    """``[sender, receiver]`` sums over batch and positions of (clean - corrupted write) . gradient."""
    L = model.cfg.n_layers
    ups = [sum(grun.shift(n, clean[n]) for n in emb)]
    downs = []
    for l in range(L):
        z, mlp = model.hook_name("z", l), model.hook_name("mlp_out", l)
        dz = grun.shift(z, clean[z])
        ups += list(torch.einsum("bphd,hdm->hbpm", dz, model.blocks[l].attn.W_O.to(dz.dtype)))
        for s in "qkv":
            downs += list(grun.grads[model.hook_name(f"{s}_input", l)].movedim(2, 0))
        if include_mlps:
            ups.append(grun.shift(mlp, clean[mlp]))
            downs.append(grun.grads[model.hook_name("resid_mid", l)] - grun.grads[model.hook_name("resid_post", l)])
    downs.append(grun.grads[model.hook_name("resid_post", L - 1)])
    U = torch.stack(ups).flatten(1)  # type: ignore[arg-type]
    D = torch.stack(downs).flatten(1)
    return (U @ D.T).float().cpu()


def edge_attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: MetricLike,
    include_mlps: bool = True,
    normalise: bool = True,
    clean_mask: MaskArg = None,
    corrupted_mask: MaskArg = None,
) -> EdgeScores:
    """Attribution-patching score of every edge (see the module docstring)."""
    runs = setup_runs(model, clean, corrupted, metric, clean_mask, corrupted_mask)
    emb, send_names, recv_names = _eap_names(model)
    with torch.no_grad():
        clean_logits, cc = model.run_with_cache(runs.clean, attention_mask=runs.clean_mask, names_filter=send_names)
    with split_qkv(model):
        grun = run_with_grads(model, runs.corrupted, metric_objective(runs.metric), send_names + recv_names,
                              runs.corrupted_mask, grad_names=recv_names)
    runs.set_baselines(clean_logits, grun.values)
    with torch.no_grad():
        scores = _eap_scores(model, grun, cc, emb, include_mlps) / (runs.batch if grun.values.ndim else 1)
    senders, receivers, sd, rd = graph_nodes(model, include_mlps)
    valid = torch.tensor(sd)[:, None] < torch.tensor(rd)[None, :]
    scores = scores.masked_fill(~valid, 0.0)
    if normalise:
        scores = scores / runs.denominator()
    lab = Labelled(scores, ("sender", "receiver"), ([str(n) for n in senders], [str(n) for n in receivers]),
                   title="edge attribution patching", meta={"clean": runs.clean_value, "corrupted": runs.corrupted_value})
    return EdgeScores(lab, senders, receivers, valid)


# --------------------------------------------------------------------------------------------
# circuit evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class CircuitResult:
    model_metric: float
    circuit_metric: float
    faithfulness: float
    ablated_metric: Optional[float] = None  # everything in scope ablated

    def __repr__(self) -> str:
        return (f"CircuitResult(faithfulness={self.faithfulness:.4f}, circuit={self.circuit_metric:.4f}, "
                f"model={self.model_metric:.4f}, all ablated={self.ablated_metric})")


# what each scope is made of: the hook site its nodes live at
_SCOPE_SITE = {"head": "z", "mlp": "mlp_out", "neuron": "post"}


def scope_hook_names(model: Any, scope: Sequence[str]) -> list[str]:
    """The hook points a circuit of ``scope`` ("head", "mlp", "neuron") ablates, layer by layer."""
    return [model.hook_name(_SCOPE_SITE[s], l) for l in range(model.cfg.n_layers) for s in scope]


def _keep_masks(model, nodes: list[Node], scope: Sequence[str], n_pos: int) -> dict[str, torch.Tensor]:
    """hook name -> bool mask of what the circuit keeps: heads ``[P, H]``, mlps ``[P]``, neurons ``[P, N]``."""
    masks: dict[str, torch.Tensor] = {}
    for l in range(model.cfg.n_layers):
        for s in ("head", "mlp", "neuron"):
            if s in scope:
                lay = model.hook_layout(model.hook_name(_SCOPE_SITE[s], l))
                units = () if lay.unit_axis is None else (lay.size(lay.axes[lay.unit_axis]),)
                masks[model.hook_name(_SCOPE_SITE[s], l)] = torch.zeros((n_pos, *units), dtype=torch.bool)
    for n in nodes:
        kind = {"head": "head", "mlp": "mlp", "neuron": "neuron"}.get(n.kind)
        if kind is None or kind not in scope or (n.kind == "head" and n.site != "z"):
            raise ValueError(f"circuit node {n}: with scope {tuple(scope)} the circuit is made of "
                             + ", ".join({"head": "heads (L3.H1 or L3.H1@5)", "mlp": "MLPs (L3.MLP)",
                                          "neuron": "neurons (L3.N7)"}[s] for s in scope))
        m = masks[n.hook_name]
        p = slice(None) if n.pos is None else n.pos % n_pos
        if n.kind == "mlp":
            m[p] = True
        else:
            m[p, n.index] = True
    return masks


def circuit_hooks(model: Any, means: Means, nodes: Sequence[NodeLike] = (), scope: Sequence[str] = ("head",),
                  target_groups: GroupIds = None, n_pos: Optional[int] = None, keep_all: bool = False) -> list:
    """Hooks mean-ablating everything in ``scope`` outside ``nodes`` (``keep_all``: nothing)."""
    ns = as_nodes(list(nodes))
    hooks = []
    cache_masks: dict[int, dict[str, torch.Tensor]] = {}

    def masks_for(P: int) -> dict[str, torch.Tensor]:
        if P not in cache_masks:
            cache_masks[P] = _keep_masks(model, ns, scope, P)
        return cache_masks[P]

    names = list(_keep_masks(model, ns, scope, n_pos or 1))
    for name in names:
        def hook(act, hook, name=name):
            if keep_all:
                return act
            keep = masks_for(act.shape[1])[name].to(act.device)
            keep = keep.reshape((1,) + tuple(keep.shape) + (1,) * (act.ndim - 1 - keep.ndim))
            mean = means_for_rows(means[name], act, target_groups)
            return torch.where(keep, act, mean.to(act.dtype))

        hooks.append((name, hook))
    return hooks


def _layer_and_index(node: Node) -> tuple[int, int]:
    if node.layer is None or node.index is None:
        raise ValueError(f"{node} is not a head")
    return node.layer, node.index


def _edge_plan(model, edges: Iterable[EdgeLike]) -> tuple[set[int], dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """(heads sending along some edge, (layer, site) -> kept [n_senders_before, n_recv_heads],
    kept-to-logits [n_heads_total]); heads are numbered ``layer * n_heads + head``."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    Hkv = getattr(cfg, "n_key_value_heads", H)
    final = logits_node(model)
    kept: dict[tuple[int, str], torch.Tensor] = {}
    for l in range(L):
        for side, n in (("q", H), ("k", Hkv), ("v", Hkv)):
            kept[(l, side)] = torch.zeros(l * H, n, dtype=torch.bool)
    to_logits = torch.zeros(L * H, dtype=torch.bool)
    in_edge: set[int] = set()
    for e in edges:
        if isinstance(e, str):
            if "->" not in e:
                raise ValueError(f"edge {e!r}: write edges as 'L0.H1->L3.H2.q' or (sender, receiver) pairs")
            pair: tuple[NodeLike, NodeLike] = tuple(e.split("->", 1))  # type: ignore[assignment]
        else:
            pair = e
        s, r = as_node(pair[0]), as_node(pair[1])
        if s.kind != "head" or s.site != "z" or s.pos is not None:
            raise ValueError(f"edge sender {s}: edge circuits are between heads (e.g. 'L0.H1'), without positions")
        s_layer, s_head = _layer_and_index(s)
        si = s_layer * H + s_head
        if r == final:
            to_logits[si] = True
        elif r.kind == "head" and r.site in ("q", "k", "v") and r.pos is None:
            r_layer, r_head = _layer_and_index(r)
            if s_layer >= r_layer:
                raise ValueError(f"edge {s}->{r}: the sender must be in an earlier layer than the receiver")
            kept[(r_layer, str(r.site))][si, r_head] = True
        else:
            raise ValueError(f"edge receiver {r}: receivers are head inputs ('L3.H2.q', '.k', '.v') or the logits ({final})")
        in_edge.add(si)
    return in_edge, kept, to_logits


def edge_circuit_hooks(model: Any, means: Means, edges: Iterable[EdgeLike], target_groups: GroupIds = None) -> list:
    """Hooks for an edge circuit (needs ``split_qkv``): heads that send along no edge are mean-ablated;
    along an edge outside the set, the receiver's input gets the sender's mean write instead of its
    actual one.
    Embeddings and MLPs are not in the edge graph: they read and write the residual as usual."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    alive_heads, kept, to_logits = _edge_plan(model, edges)
    deltas: list[torch.Tensor] = []  # per layer [b, P, H, d]: actual write - mean write

    def z_hook(l: int, name: str) -> Callable:
        def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            if l == 0:
                deltas.clear()
            mean = means_for_rows(means[name], act, target_groups).to(act.dtype)
            alive = torch.tensor([l * H + h in alive_heads for h in range(H)], device=act.device)
            act = torch.where(alive[None, None, :, None], act, mean)
            deltas.append(torch.einsum("bphd,hdm->bphm", act - mean, model.blocks[l].attn.W_O.to(act.dtype)))
            return act

        return hook

    def input_hook(l: int, side: str) -> Callable:
        def hook(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            if l == 0:
                return act
            D = torch.cat(deltas[:l], dim=2)  # [b, P, l*H, d]
            drop = (~kept[(l, side)]).to(act.dtype).to(act.device)  # [l*H, n_recv]
            return act - torch.einsum("bpud,ur->bprd", D, drop)

        return hook

    def logits_hook(act, hook):
        D = torch.cat(deltas, dim=2)
        drop = (~to_logits).to(act.dtype).to(act.device)
        return act - torch.einsum("bpud,u->bpd", D, drop)

    hooks = [(model.hook_name("z", l), z_hook(l, model.hook_name("z", l))) for l in range(L)]
    hooks += [(model.hook_name(f"{s}_input", l), input_hook(l, s)) for l in range(L) for s in "qkv"]
    hooks.append((model.hook_name("resid_post", L - 1), logits_hook))
    return hooks


def evaluate_circuit(
    model: Any,
    input: Any,
    metric: MetricLike,
    nodes: Optional[Sequence[NodeLike]] = None,
    edges: Optional[Iterable[EdgeLike]] = None,
    reference: Any = None,
    means: Optional[Means] = None,
    groups: GroupIds = None,
    target_groups: GroupIds = None,
    scope: Sequence[str] = ("head",),
    attention_mask: MaskArg = None,
    reference_mask: MaskArg = None,
    with_ablated: bool = True,
) -> CircuitResult:
    """Faithfulness of a circuit given as ``nodes`` (heads, optionally at positions; with ``scope``
    also MLPs / neurons) or as head ``edges`` ((sender, receiver) or ``"L0.H1->L3.H2.q"``; the logits
    receiver is ``L{n-1}.R.post``). Everything outside is replaced by its mean over ``reference``
    (default: ``input``), per group when ``groups`` / ``target_groups`` are given."""
    if (nodes is None) == (edges is None):
        raise ValueError("give exactly one of nodes= or edges=")
    metric = as_metric(metric)
    tokens, mask = prepare(model, input, attention_mask)
    names = scope_hook_names(model, scope if nodes is not None else ("head",))
    if means is None:
        ref = tokens if reference is None else reference
        rmask = (mask if reference is None else reference_mask)
        if reference is None and groups is None and target_groups is not None:
            groups = target_groups
        means = compute_means(model, ref, names, attention_mask=rmask, groups=groups)
    with torch.no_grad():
        full = float(metric(model(tokens, attention_mask=mask)).float().mean())
        if nodes is not None:
            hooks = circuit_hooks(model, means, nodes, scope, target_groups, tokens.shape[1])
            circ = float(metric(model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)).float().mean())
        else:
            with split_qkv(model):
                hooks = edge_circuit_hooks(model, means, edges, target_groups)  # type: ignore[arg-type]
                circ = float(metric(model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)).float().mean())
        abl = None
        if with_ablated:
            hooks = circuit_hooks(model, means, [], scope if nodes is not None else ("head",), target_groups, tokens.shape[1])
            abl = float(metric(model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)).float().mean())
    return CircuitResult(full, circ, circ / full if full != 0 else float("nan"), abl)
