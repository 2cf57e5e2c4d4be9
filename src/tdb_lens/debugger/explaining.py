"""The debugger's "explain and score this unit" action and its configured explainer.

`explain_unit` explains a harvested unit with the investigation's explainer (default: the offline
top-token baseline), scores the explanation with the explain pipeline's own scoring
(`tdb_lens.explain.scoring.score_all`: by default the correlation of the pipeline's default
offline simulator, the likelihood simulator on the investigated model, over the unit's top and
random harvested windows) and stores the explanation with its scores in one transaction.

`explaining_from_options` builds the explainer, simulator and judge from the same settings as
``tdb-lens explain`` (`tdb_lens.explain.cli.add_explainer_arguments`): ``top-tokens``, ``local``
(the investigated chat model, e.g. SmolLM2) or an OpenAI-compatible endpoint whose key is read
from an environment variable (never from a request, never shown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..attribution import Node
from .columns import DebuggerError


@dataclass
class Explaining:
    """What ``Investigation(explainer=, simulator=, judge=, scores=)`` holds, as built from options."""

    explainer: Any
    simulator: Any
    judge: Any
    scores: tuple[str, ...]


def check_explainer_options(options: dict) -> None:
    """A ValueError naming the first bad setting of `tdb_lens.explain.cli.explainer_options`'s fields
    (nothing is loaded)."""
    from ..explain.pipeline import LOCAL_EXPLAINERS, SCORE_METHODS, _is_endpoint

    specs = options.get("explainers", ())
    if len(specs) != 1:
        raise ValueError(f"--explainer: the debugger takes one explainer, got {len(specs)}: {', '.join(specs)}")
    spec = specs[0]
    if spec not in LOCAL_EXPLAINERS and not _is_endpoint(spec):
        from ..explain.endpoint import redact_userinfo

        raise ValueError(f"--explainer must be top-tokens, local, an http(s):// base URL or openai:MODEL@URL, got "
                         f"{redact_userinfo(spec)!r}")
    scores = tuple(options.get("scores", ("correlation",)))
    bad = [m for m in scores if m not in SCORE_METHODS]
    if bad or not scores:
        raise ValueError(f"--scores: unknown {bad}; choose from {','.join(SCORE_METHODS)}")
    for name in ("n_examples", "explain_tokens"):
        if options.get(name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {options[name]}")
    if options.get("simulator") == "json" and not _is_endpoint(spec):
        raise ValueError("--simulator json needs an OpenAI-compatible --explainer endpoint")
    if _is_endpoint(spec):  # the URL / openai:MODEL@URL form, as tdb-lens explain checks it (nothing is sent)
        from ..explain.backends import backend_from_spec

        backend_from_spec(spec, endpoint_model=options.get("explainer_model", "gpt-4o-mini"),
                          api_key_env=options.get("api_key_env", "OPENAI_API_KEY"))


def explaining_from_options(model, options: dict, model_name: str = "model") -> Explaining:
    """Explainer, simulator and judge from `tdb_lens.explain.cli.explainer_options`'s fields (one
    explainer), built by the explain pipeline's own functions; a ValueError names a bad setting."""
    from ..explain.pipeline import ExplainConfig, make_explainer, make_scorers

    check_explainer_options(options)
    scores = tuple(options.get("scores", ("correlation",)))
    # the causal scorer is bound to a hook: built per unit by `explain_unit`
    cfg = ExplainConfig(hook="", model=model_name, progress=False,
                        **dict(options, scores=tuple(m for m in scores if m != "causal") or ("correlation",)))
    explainer, backend = make_explainer(options["explainers"][0], cfg, model)
    simulator, judge, _, _ = make_scorers(cfg, model, [backend])
    return Explaining(explainer, simulator, judge, scores)


def default_simulator(inv):
    """The explain pipeline's default offline simulator (likelihood, on the investigated model), made once."""
    if inv.simulator is None:
        from ..explain.simulator import simulator_for

        sim = simulator_for(inv.model, "likelihood")
        sim.name = f"likelihood:{_model_name(inv.model)}"  # type: ignore[attr-defined]
        inv.simulator = sim
    return inv.simulator


def _model_name(model) -> str:
    return str(getattr(model.cfg, "model_name", None) or getattr(model, "name", None) or type(model).__name__)


def _finite(x: Any) -> Any:
    """NaN / inf as None (JSON has no NaN)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


@dataclass
class ExplainResult:
    """A stored explanation of one unit with its scores (``details``: each score's scalar parts, e.g.
    the correlation over the top and the random windows alone)."""

    unit: str
    explanation_id: int
    text: str
    explainer: str
    scorer: str
    scores: dict
    details: dict

    def as_dict(self) -> dict:
        """Every field, as JSON-ready plain values (what ``/api/explain`` returns)."""
        return asdict(self)

    def __str__(self) -> str:
        parts = []
        for m, v in self.scores.items():
            extra = ", ".join(f"{k} {x:.3f}" for k, x in self.details.get(m, {}).items() if isinstance(x, float))
            parts.append(f"{m} {'-' if v is None else format(v, '.3f')}" + (f" ({extra})" if extra else ""))
        return f"{self.unit} ({self.explainer}): {self.text!r}  [{'; '.join(parts)}; scored by {self.scorer or '-'}]"

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"


def explain_unit(inv, node: Node, explainer: Any = None) -> ExplainResult:
    """Explain a harvested unit, score the explanation (`score_all`, the investigation's ``scores``)
    and store the unit, the explanation and its scores in one transaction."""
    import torch

    from ..explain import TopTokensExplainer
    from ..explain.scoring import score_all
    from .units import harvest_for, unit_hook

    if inv.store is None:
        raise DebuggerError("no explanation store: start with --db STORE (or Investigation(store=...))")
    h = harvest_for(inv, node)
    if h is None:
        raise DebuggerError(f"{node.unit} was not harvested: give --harvest-dir with a harvest of {unit_hook(node)!r}")
    rec = h.record(node.index)
    if not rec.stats.get("max", 0.0) > 0:
        raise DebuggerError(f"{node.unit} never fired on the harvest's corpus: nothing to explain")
    ex = (explainer or inv.explainer or TopTokensExplainer(inv.model.tokenizer)).explain(rec)
    methods = list(inv.scores)
    simulator = default_simulator(inv) if {"correlation", "causal"} & set(methods) else None
    judge = inv.judge
    if {"detection", "fuzzing"} & set(methods) and judge is None:
        raise DebuggerError("detection and fuzzing scores need a judge (Investigation(judge=...) or an --explainer "
                            "endpoint / local chat model)")
    causal = None
    if "causal" in methods:
        from ..explain.causal import CausalScorer

        causal = CausalScorer(inv.model, unit_hook(node), simulator)
    with torch.no_grad():
        sc = score_all(ex.text, rec, inv.model.tokenizer, simulator, judge, causal, methods)
    scorer = ",".join(n for n in (getattr(simulator, "name", ""), getattr(judge, "name", "")) if n)
    store = getattr(inv.store, "current", lambda: inv.store)()  # the app's per-thread store: this thread's
    with store.transaction():  # the unit, the explanation and its scores: all of it or none of it
        uid = store.add_unit(rec, model=h.manifest.get("model", "model"), examples=True,
                             model_digest=h.manifest.get("model_digest") or None)
        eid = store.add_explanation(uid, ex, sc, scorer)
    return ExplainResult(str(node.unit), eid, ex.text, ex.explainer, scorer, {m: _finite(sc[m]) for m in methods},
                         {m: _summary(sc.get(f"{m}_details")) for m in methods})


def _summary(details: Optional[dict]) -> dict:
    """The scalar parts of a score's details (not the per-token simulations)."""
    return {k: _finite(v) for k, v in (details or {}).items() if isinstance(v, (int, float))}


def check_scores(scores: Sequence[str]) -> tuple[str, ...]:
    from ..explain.pipeline import SCORE_METHODS

    scores = tuple(scores)
    bad = [m for m in scores if m not in SCORE_METHODS]
    if bad or not scores:
        raise DebuggerError(f"scores: unknown {bad}; choose from {','.join(SCORE_METHODS)}")
    return scores
