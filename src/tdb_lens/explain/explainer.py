"""Explainers: from a unit's top-activating examples to a one-phrase explanation.

`LLMExplainer` shows a chat model (local or an endpoint, see `backends`) the unit's top windows in
Bills et al.'s format (token, tab, activation scaled 0..10) after one worked example and asks for
a short phrase. `TopTokensExplainer` is the non-LLM baseline: the tokens the unit fires on most.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from .harvest import UnitRecord
from .prompts import (
    EXPLANATION_PREFILL,
    LIST_PREFILL,
    PROMPT_VERSION,
    clean_explanation,
    explainer_messages,
    show_token,
    trim_window,
)


@dataclass
class Explanation:
    text: str
    explainer: str
    unit: Optional[int] = None
    hook: Optional[str] = None
    raw: Optional[str] = None
    meta: dict = field(default_factory=dict)
    #: what else decides the explanation besides the explainer's name (prompt version, examples
    #: shown ...): a store keeps one explanation per unit, explainer and settings
    settings: str = ""


def str_tokens(tokenizer, ids) -> list[str]:
    return [tokenizer.id_to_token(int(i)) for i in ids]


def windows_of(record: UnitRecord, tokenizer, which: str = "top", n: Optional[int] = None):
    """``(token strings, activations)`` of a record's ``top`` / ``random`` / ``sample`` windows."""
    toks = {"top": record.top_tokens, "random": record.random_tokens, "sample": record.sample_tokens}[which]
    acts = {"top": record.top_acts, "random": record.random_acts, "sample": record.sample_acts}[which]
    k = len(toks) if n is None else min(n, len(toks))
    return [(str_tokens(tokenizer, toks[i].tolist()), [float(a) for a in acts[i].tolist()]) for i in range(k)]


class LLMExplainer:
    """Explanations from a chat backend. ``style="fewshot"`` (default): Bills et al.'s format after
    one worked example, answer prefilled with "This unit responds to". ``style="list"``: no worked
    example; the prompt also names the strongest tokens and asks what they have in common, answer
    prefilled with "These tokens are" (what `for_local_model` picks: SmolLM2-135M copies the
    worked example's answer otherwise)."""

    STYLES = ("fewshot", "list")

    def __init__(self, backend, tokenizer, n_examples: int = 5, keep_tokens: Optional[int] = 16,
                 max_tokens: int = 24, nonzero_summary: bool = True, style: str = "fewshot") -> None:
        if style not in self.STYLES:
            raise ValueError(f"style must be one of {self.STYLES}, got {style!r}")
        if n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {n_examples}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.n_examples = n_examples
        self.keep_tokens = keep_tokens
        self.max_tokens = max_tokens
        self.nonzero_summary = nonzero_summary
        self.style = style
        self.prefill = EXPLANATION_PREFILL if style == "fewshot" else LIST_PREFILL
        self.name = f"llm:{getattr(backend, 'name', type(backend).__name__)}"
        self.settings = (f"prompt={PROMPT_VERSION} style={style} examples={n_examples} keep={keep_tokens} "
                         f"max_tokens={max_tokens} summary={int(nonzero_summary)}")

    @classmethod
    def for_local_model(cls, backend, tokenizer, **kw) -> LLMExplainer:
        return cls(backend, tokenizer, style=kw.pop("style", "list"), **kw)

    def messages(self, record: UnitRecord) -> list[dict]:
        wins = [trim_window(t, a, self.keep_tokens) for t, a in windows_of(record, self.tokenizer, "top", self.n_examples)]
        top = TopTokensExplainer(self.tokenizer, n_tokens=6, n_examples=self.n_examples).top_tokens(record) \
            if self.style == "list" else None
        return explainer_messages([w[0] for w in wins], [w[1] for w in wins], self.nonzero_summary,
                                  fewshot=self.style == "fewshot", top_tokens=top)

    def explain_many(self, records: Sequence[UnitRecord]) -> list[Explanation]:
        convs = [self.messages(r) for r in records]
        raws = self.backend.complete_many(convs, max_tokens=self.max_tokens, prefill=self.prefill)
        return [Explanation(clean_explanation(raw, self.prefill), self.name, r.unit, r.hook, raw, {"style": self.style},
                            self.settings) for r, raw in zip(records, raws)]

    def explain(self, record: UnitRecord) -> Explanation:
        return self.explain_many([record])[0]


class TopTokensExplainer:
    """Baseline: the ``n_tokens`` token strings with the largest summed activation (scaled by the
    unit's top activation) over the top windows, as ``tokens like "a", "b", "c"``."""

    name = "top-tokens"

    def __init__(self, tokenizer, n_tokens: int = 4, n_examples: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        self.n_tokens = n_tokens
        self.n_examples = n_examples
        self.settings = f"tokens={n_tokens} examples={n_examples}"

    def top_tokens(self, record: UnitRecord) -> list[str]:
        wins = windows_of(record, self.tokenizer, "top", self.n_examples)
        peak = max((a for _, acts in wins for a in acts), default=0.0)
        weight: dict[str, float] = defaultdict(float)
        if peak <= 0:
            return []
        for toks, acts in wins:
            for t, a in zip(toks, acts):
                if a > 0:
                    weight[show_token(t.strip() or t)] += a / peak
        return [t for t, _ in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))[: self.n_tokens]]

    def explain(self, record: UnitRecord) -> Explanation:
        toks = self.top_tokens(record)
        text = ("tokens like " + ", ".join(f'"{t}"' for t in toks)) if toks else "(never active)"
        return Explanation(text, self.name, record.unit, record.hook, meta={"tokens": toks}, settings=self.settings)

    def explain_many(self, records: Sequence[UnitRecord]) -> list[Explanation]:
        return [self.explain(r) for r in records]
