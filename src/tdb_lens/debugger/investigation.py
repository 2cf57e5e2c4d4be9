"""`Investigation`: Transformer Debugger's loop as a Python object.

Hold a model (optionally with SAEs), one or two prompts and a target (and distractor) token; ask
for the node table, trace a node upstream (heads through their query, key or value), ablate or
steer nodes and look again: with one prompt and interventions every number shows the clean run
(left), the intervened run (right) and their difference; with two prompts (same length) the two
prompts side by side. Each request is one forward and one backward pass over the batch of both
sides. Unit pages read harvests (`tdb_lens.explain.harvest`) and the explanation store
(`tdb_lens.explain.store`); `search` searches explanations semantically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from jaxtyping import Int

from ..attribution import (
    LogitDiff,
    LogProb,
    Node,
    NodeLike,
    as_node,
    compute_means,
    mean_ablation_hooks,
    resample_ablation_hooks,
    steer_nodes,
    zero_ablation_hooks,
)
from ..explain.quantiles import ActivationQuantile
from ..sae.attach import add_sae, attached_saes
from .columns import KINDS, SIDES, DebuggerError, compute_columns, read_point
from .tables import LogitTable, NodeTable, logit_table, select_rows

MAX_TOKENS = 500
METHODS = ("zero", "mean", "resample")
STEER_MODES = ("clamp", "add", "scale")


@dataclass
class Intervention:
    """An ablation (``method`` zero / mean / resample) or a steering (``method`` clamp / add / scale, ``value``;
    ``quantile``: the harvest quantile the value was read from, when it was; ``basis``: how it was
    read, e.g. "q=0.999 of 1,234,567 tokens (exact)" or "q=0.5 of a sample of 640 tokens (...)")."""

    node: Node
    method: str = "zero"
    value: Optional[float] = None
    quantile: Optional[float] = None
    basis: Optional[str] = None

    def as_dict(self) -> dict:
        return {"node": str(self.node), "method": self.method, "value": self.value, "quantile": self.quantile,
                "basis": self.basis}


@dataclass
class TraceSpec:
    node: Node
    through: Optional[str] = None


def _gate_rows(fn, rows: torch.Tensor):
    """Wrap a hook so that it changes only the batch rows where ``rows`` is True."""

    def hook(act, hook):
        out = fn(act, hook)
        m = rows.to(act.device).reshape((-1,) + (1,) * (act.ndim - 1))
        return torch.where(m, out, act)

    return hook


def _detach(x, hook):
    """Block the gradient through this activation but keep it in the graph (what is computed from it
    still requires grad; its gradient there is exactly zero)."""
    return x.detach() + 0 * x


def target_value(model, node: Node, act: torch.Tensor) -> torch.Tensor:
    """What tracing ``node`` differentiates, per batch row: a neuron's / latent's / pair's value, or
    the norm of a head's write ``z @ W_O`` at its query position."""
    x = node.select(act)
    if node.kind == "head" and node.site == "z":
        x = (x @ model.blocks[node.layer].attn.W_O[node.index].to(x.dtype)).norm(dim=-1)
    return x.reshape(x.shape[0], -1).sum(-1)


@dataclass
class Investigation:
    """TDB's state: ``prompt`` (and optionally ``other_prompt``), ``target`` / ``distractor`` tokens,
    interventions and an optional trace. ``saes``: SAEs to attach (``[(hook, sae)]`` or SAEs with
    their own hook); ``store``: an `ExplanationStore` or its path; ``harvest_dirs``: harvest
    directories (or folders of them) for unit pages. ``explainer`` (default: the top-token baseline),
    ``simulator`` (default: the explain pipeline's likelihood simulator on ``model``), ``judge`` (a chat
    backend, for detection / fuzzing) and ``scores`` (`tdb_lens.explain.pipeline.SCORE_METHODS`) are what
    `explain` uses (`tdb_lens.debugger.explaining`)."""

    model: Any
    prompt: str = ""
    target: Optional[str] = None
    distractor: Optional[str] = None
    other_prompt: Optional[str] = None
    saes: Sequence[Any] = ()
    store: Any = None
    harvest_dirs: Sequence[Union[str, os.PathLike]] = ()
    kinds: Sequence[str] = KINDS
    k: int = 10
    reference: Optional[Sequence[str]] = None
    resample_source: Optional[str] = None
    embedder: Any = None
    interventions: list[Intervention] = field(default_factory=list)
    tracing: Optional[TraceSpec] = None
    max_tokens: int = MAX_TOKENS
    explainer: Any = None
    simulator: Any = None
    judge: Any = None
    scores: Sequence[str] = ("correlation",)

    def __post_init__(self) -> None:
        from .explaining import check_scores

        self.scores = check_scores(self.scores)
        for item in self.saes:
            hook, sae = item if isinstance(item, tuple) else (None, item)
            if sae not in attached_saes(self.model).values():
                add_sae(self.model, sae, hook)
        if isinstance(self.store, (str, os.PathLike)):
            from ..explain.store import ExplanationStore

            self.store = ExplanationStore(self.store)
        self._means: dict[tuple, torch.Tensor] = {}
        self._harvests: Optional[dict[str, Any]] = None

    # -- inputs --------------------------------------------------------------------------------
    def _tokens(self, text: str, what: str) -> Int[torch.Tensor, "1 pos"]:
        if not isinstance(text, str) or not text:
            raise DebuggerError(f"{what} must be a non-empty string")
        tokens = self.model.to_tokens(text)
        if tokens.shape[1] > self.max_tokens:
            raise DebuggerError(f"{what} is {tokens.shape[1]} tokens; at most {self.max_tokens} are allowed")
        return tokens

    def token_id(self, token: str, what: str = "target") -> int:
        try:
            return self.model.to_single_token(token)
        except (ValueError, KeyError) as e:
            raise DebuggerError(f"{what} {token!r} is not a single token ({e})") from None

    def metric(self):
        """The objective: logit(target) - logit(distractor) at the last position, or log P(target)."""
        if self.target is None:
            raise DebuggerError("set a target token first (Investigation(target=' Mary') or .set_target)")
        t = self.token_id(self.target)
        if self.distractor:
            return LogitDiff(t, self.token_id(self.distractor, "distractor"))
        return LogProb(t)

    def objective_name(self) -> str:
        if self.distractor:
            return f"logit({self.target!r}) - logit({self.distractor!r})"
        return f"log P({self.target!r})"

    def batch(self) -> tuple[Int[torch.Tensor, "batch pos"], Optional[str]]:
        """The tokens of both sides and what is compared (None, "prompts" or "interventions")."""
        left = self._tokens(self.prompt, "prompt")
        if self.other_prompt:
            right = self._tokens(self.other_prompt, "other prompt")
            if right.shape[1] != left.shape[1]:
                raise DebuggerError(f"the two prompts must have the same number of tokens, got {left.shape[1]} "
                                    f"and {right.shape[1]}")
            return torch.cat([left, right]), "prompts"
        if self.interventions:
            return left.repeat(2, 1), "interventions"
        return left, None

    def check_node(self, node: NodeLike, n_pos: Optional[int] = None) -> Node:
        """The node, if the model has it (and its positions fit ``n_pos`` tokens); else a `DebuggerError`."""
        try:
            n = as_node(node)
        except (ValueError, TypeError) as e:
            raise DebuggerError(str(e)) from None
        if n.hook_name not in self.model.hook_dict:
            raise DebuggerError(f"unknown node {n}: the model has no hook {n.hook_name!r}")
        P = n_pos if n_pos is not None else self._tokens(self.prompt, "prompt").shape[1]
        try:
            n.select(torch.empty(self.model.hook_layout(n.hook_name).shape_for(1, P)))
        except IndexError:
            raise DebuggerError(f"unknown node {n}: an index is out of range for this model and a {P}-token "
                                "prompt") from None
        return n

    # -- interventions -------------------------------------------------------------------------
    def ablate(self, node: NodeLike, method: str = "zero") -> Investigation:
        """Ablate ``node`` (zero, mean over the reference prompts, or resample from ``resample_source``)."""
        if method not in METHODS:
            raise DebuggerError(f"ablation method must be one of {METHODS}, got {method!r}")
        n = self.check_node(node)
        self.interventions = [i for i in self.interventions if i.node != n] + [Intervention(n, method)]
        return self

    def steer(self, node: NodeLike, value: Optional[float] = None, mode: str = "clamp",
              quantile: Optional[float] = None) -> Investigation:
        """Clamp / add to / scale ``node`` by ``value``; or, as Monitor does, by the ``quantile`` (in (0, 1),
        e.g. 0.999) of the unit's own harvested activations (`harvested_quantile`: exact from the
        harvest's per-token tail when it covers the quantile, else from its random windows; the
        intervention's ``basis`` says which); neither: by the unit's harvested maximum."""
        if mode not in STEER_MODES:
            raise DebuggerError(f"steering mode must be one of {STEER_MODES}, got {mode!r}")
        if value is not None and quantile is not None:
            raise DebuggerError("give a steering value or a quantile, not both")
        n = self.check_node(node)
        basis = None
        if quantile is not None:
            est = self.harvested_quantile(n, quantile)
            value, basis = est.value, est.describe()
        elif value is None:
            value = self.harvested_max(n)
        self.interventions = [i for i in self.interventions if i.node != n] + [
            Intervention(n, mode, float(value), None if quantile is None else float(quantile), basis)]
        return self

    def unablate(self, node: Optional[NodeLike] = None) -> Investigation:
        """Remove one node's intervention (ablation or steering), or all of them."""
        if node is None:
            self.interventions = []
        else:
            n = as_node(node)
            if not any(i.node == n for i in self.interventions):
                raise DebuggerError(f"{n} is not ablated or steered")
            self.interventions = [i for i in self.interventions if i.node != n]
        return self

    unsteer = unablate

    def _means_for(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        ref = list(self.reference) if self.reference else [self.prompt]
        key = lambda n: (tuple(ref), n)
        todo = [n for n in names if key(n) not in self._means]
        if todo:
            got = compute_means(self.model, ref, todo, per_position=False)
            self._means.update({key(n): v for n, v in got.items()})
        return {n: self._means[key(n)] for n in names}

    def intervention_hooks(self, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None) -> list:
        """Forward hooks applying every intervention (only to ``rows`` of the batch when given)."""
        hooks: list = []
        by_method: dict[str, list[Intervention]] = {}
        for i in self.interventions:
            by_method.setdefault(i.method, []).append(i)
        for method, items in by_method.items():
            nodes = [i.node for i in items]
            if method == "zero":
                hooks += zero_ablation_hooks(nodes)
            elif method == "mean":
                hooks += mean_ablation_hooks(self.model, nodes, means=self._means_for([n.hook_name for n in nodes]))
            elif method == "resample":
                if not self.resample_source:
                    raise DebuggerError("resample ablation needs resample_source (a prompt of the same length)")
                src = self._tokens(self.resample_source, "resample source")
                if src.shape[1] != tokens.shape[1]:
                    raise DebuggerError(f"the resample source has {src.shape[1]} tokens, the prompt {tokens.shape[1]}")
                hooks += resample_ablation_hooks(self.model, nodes, src.repeat(tokens.shape[0], 1),
                                                 permutation=list(range(tokens.shape[0])))
            else:
                hooks += list(steer_nodes(nodes, method, [float(i.value or 0.0) for i in items]))
        if rows is not None:
            hooks = [(name, _gate_rows(fn, rows)) for name, fn in hooks]
        return hooks

    # -- tracing -------------------------------------------------------------------------------
    def trace(self, node: NodeLike, through: Optional[str] = "q") -> NodeTable:
        """Make ``node`` the objective (heads: through their query, key or value) and return the table.

        Targets: a neuron's or latent's value, an attention pair's weight (``L3.H1@5>2``), or the norm
        of a head's write at a query position (``L3.H1@5``). A pair traced through ``v`` traces its
        head's write at the query position (the weight itself does not depend on the value)."""
        self.tracing = self._trace_spec(node, through)
        return self.node_table()

    def _trace_spec(self, node: NodeLike, through: Optional[str]) -> TraceSpec:
        n = self.check_node(node)
        if n.pos is None:
            raise DebuggerError(f"trace needs a node at a position, e.g. '{n}@-1'")
        is_head = n.kind == "head" and n.site in ("z", "pattern")
        if n.kind == "head" and not is_head:
            raise DebuggerError(f"trace a head by its output (L{n.layer}.H{n.index}@q) or an attention pair (@q>k)")
        if is_head and through not in SIDES + (None,):
            raise DebuggerError(f"through must be one of {SIDES} (or None for all), got {through!r}")
        if n.kind not in ("head", "neuron", "sae_latent"):
            raise DebuggerError(f"trace targets are heads, neurons and SAE latents, not {n.kind} nodes")
        if n.is_pair and through == "v":  # a pair's weight does not depend on the value: trace the head's output
            n = Node.head(n.layer, n.index, n.pos)  # type: ignore[arg-type]
        return TraceSpec(n, through if is_head else None)

    def untrace(self) -> Investigation:
        self.tracing = None
        return self

    # -- requests ------------------------------------------------------------------------------
    def _objective_and_hooks(self, tokens: torch.Tensor, compare: Optional[str]):
        rows = torch.tensor([False, True]) if compare == "interventions" else None
        hooks = self.intervention_hooks(tokens, rows) if self.interventions else []
        if self.tracing is None:
            metric = self.metric()
            return (lambda logits, acts: metric(logits)), hooks, read_point(self.model, None), [], True
        t = self.tracing
        if t.through is not None:
            hooks += [(self.model.hook_name(s, t.node.layer), _detach) for s in SIDES if s != t.through]
        obj = lambda logits, acts: target_value(self.model, t.node, acts[t.node.hook_name])
        return obj, hooks, read_point(self.model, t.node), [t.node.hook_name], False

    def node_table(self, k: Optional[int] = None, kinds: Optional[Sequence[str]] = None) -> NodeTable:
        """The node table: top-k and bottom-k nodes of every column (one forward + one backward)."""
        k = self.k if k is None else k
        tokens, compare = self.batch()
        obj, hooks, read, extra, freeze = self._objective_and_hooks(tokens, compare)
        cols = compute_columns(self.model, tokens, obj, kinds or self.kinds, hooks, read, freeze, extra)
        str_tokens = [list(self.model.to_str_tokens(row)) for row in tokens]
        rows = select_rows(cols, str_tokens, k, compare is not None)
        name = self.objective_name() if self.tracing is None else f"trace {self.tracing.node}" + (
            f" through {self.tracing.through}" if self.tracing.through else "")
        meta = {"interventions": [i.as_dict() for i in self.interventions],
                "trace": None if self.tracing is None else {"node": str(self.tracing.node), "through": self.tracing.through},
                "token_effects": _token_effects(cols)}
        table = NodeTable(rows, str_tokens, cols.objective.tolist(), name, compare, k, meta=meta)
        table.meta["logits"] = logit_table(self.model, cols.logits, 10, compare).as_dict()
        return table

    def logits(self, k: int = 10) -> LogitTable:
        """Top next tokens at the last position (both sides)."""
        tokens, compare = self.batch()
        rows = torch.tensor([False, True]) if compare == "interventions" else None
        hooks = self.intervention_hooks(tokens, rows) if self.interventions else []
        with torch.no_grad():
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        return logit_table(self.model, logits, k, compare)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a request needs, as plain values (what the web app keeps in the URL)."""
        return {"prompt": self.prompt, "other_prompt": self.other_prompt, "target": self.target,
                "distractor": self.distractor, "interventions": [i.as_dict() for i in self.interventions],
                "trace": None if self.tracing is None else {"node": str(self.tracing.node), "through": self.tracing.through}}

    def load_state(self, state: dict) -> Investigation:
        """Set prompts, target, interventions and trace from `state`'s dict (checked; unknown nodes refused;
        on an error the investigation is left as it was)."""
        saved = (self.prompt, self.other_prompt, self.target, self.distractor, list(self.interventions), self.tracing)
        try:
            return self._load_state(state)
        except Exception:
            (self.prompt, self.other_prompt, self.target, self.distractor, self.interventions, self.tracing) = saved
            raise

    def _load_state(self, state: dict) -> Investigation:
        self.prompt = state.get("prompt") or ""
        self.other_prompt = state.get("other_prompt") or None
        self.target = state.get("target") or None
        self.distractor = state.get("distractor") or None
        self.interventions, self.tracing = [], None
        for item in state.get("interventions") or []:
            method = item.get("method", "zero")
            if method in METHODS:
                self.ablate(item["node"], method)
            elif method in STEER_MODES:  # a quantile is re-read from the harvest (the value follows from it)
                q = item.get("quantile")
                self.steer(item["node"], item.get("value") if q is None else None, method, q)
            else:
                raise DebuggerError(f"unknown intervention method {method!r}; expected {METHODS + STEER_MODES}")
        tr = state.get("trace")
        if tr:
            self.tracing = self._trace_spec(tr["node"], tr.get("through"))
        return self

    # -- units ---------------------------------------------------------------------------------
    def harvested_max(self, node: Node) -> float:
        from .units import harvest_for

        h = harvest_for(self, node)
        if h is None:
            raise DebuggerError(f"no harvest for {node.unit}: give a steering value")
        return float(h.stats["max"][h.index_of(node.index)])

    def harvested_quantile(self, node: Node, quantile: float) -> ActivationQuantile:
        """The ``quantile`` of the unit's activations in its harvest (`units.activation_quantile`): the
        value, and whether it is exact (from the per-token tail) or from the random-window sample."""
        from .units import activation_quantile

        return activation_quantile(self, node, quantile)

    def unit(self, node: NodeLike):
        """The unit page of ``node``: harvested examples, explanations, logit lens, activations here."""
        from .units import unit_page

        return unit_page(self, self.check_node(node))

    def explain(self, node: NodeLike):
        """Explain the harvested unit of ``node``, score the explanation and store both (needs a store)."""
        from .explaining import explain_unit

        return explain_unit(self, self.check_node(node))

    def search(self, query: str, k: int = 10):
        """Explanations closest in meaning to ``query`` (needs a store)."""
        from .units import search_units

        return search_units(self, query, k)

    def attention(self, layer: int, head: int):
        """The attention pattern of one head on the left prompt (query x key)."""
        from .views import AttentionView

        n = self.check_node(Node.head(layer, head, site="pattern"))
        tokens = self._tokens(self.prompt, "prompt")
        with torch.no_grad():
            _, cache = self.model.run_with_cache(tokens, names_filter=[n.hook_name])
        return AttentionView(cache[n.hook_name][0, head].float(), list(self.model.to_str_tokens(tokens[0])), layer, head)

    def generate(self, max_new_tokens: int = 20) -> dict[str, str]:
        """Greedy continuations of the prompt without and with the interventions (Monitor's steering)."""
        tokens = self._tokens(self.prompt, "prompt")
        out = {"clean": self.model.generate(self.prompt, max_new_tokens=max_new_tokens, verbose=False)}
        if self.interventions:
            hooks = self.intervention_hooks(tokens)
            out["intervened"] = self.model.generate(self.prompt, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
        return out

    def __repr__(self) -> str:
        return (f"Investigation(prompt={self.prompt!r}, target={self.target!r}, distractor={self.distractor!r}, "
                f"interventions={[str(i.node) for i in self.interventions]}, "
                f"trace={None if self.tracing is None else str(self.tracing.node)})")


def _token_effects(cols) -> dict:
    """Per position and side: the token embedding's direct and total effect."""
    for fam in cols.families:
        if fam.name == "embed":
            return {c: fam.values[c].tolist() for c in ("direct_effect", "total_effect")}
    return {}
