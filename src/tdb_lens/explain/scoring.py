"""Scores of an explanation against a unit's harvested activations.

- **correlation** (Bills et al. 2023): simulate the unit on its top windows and on random windows
  from the explanation alone; the score is the Pearson correlation between simulated and true
  activations over all their tokens pooled. ``top`` and ``random`` report the two halves alone.
  A constant simulation has correlation 0 (not NaN).
- **detection** (EleutherAI's delphi): a judge reads each window and the explanation and says
  whether the unit fires in it; a window is positive when its largest activation is at least
  ``pos_fraction`` of the unit's maximum. Windows: the top windows, the quantile sample (every
  activation level), and the random windows. Reported as balanced accuracy (and accuracy).
- **fuzzing** (delphi): for positive windows the judge sees the tokens where the unit fires
  marked ``<<...>>`` (correct) or as many other tokens marked (incorrect), and says whether the
  marks fit the explanation. Balanced accuracy over both versions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .explainer import windows_of
from .harvest import UnitRecord
from .prompts import detection_messages, fuzzing_messages


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if a.numel() != b.numel():
        raise ValueError(f"pearson needs equal lengths, got {a.numel()} and {b.numel()}")
    if a.numel() < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return 0.0 if float(den) == 0.0 else float((a * b).sum() / den)


@dataclass
class SimulationScore:
    score: float
    top: float
    random: float
    true: list[list[float]] = field(repr=False, default_factory=list)
    simulated: list[list[float]] = field(repr=False, default_factory=list)
    tokens: list[list[str]] = field(repr=False, default_factory=list)
    n_top: int = 0


def correlation_score(simulator, explanation: str, record: UnitRecord, tokenizer, n_top: int = 5,
                      n_random: int = 5) -> SimulationScore:
    top = windows_of(record, tokenizer, "top", n_top)
    rnd = windows_of(record, tokenizer, "random", n_random)
    wins = top + rnd
    if not wins:
        raise ValueError(f"unit {record.label} has no windows to score on")
    sim = simulator.simulate(explanation, [w[0] for w in wins])
    flat = lambda rows: [v for r in rows for v in r]
    true = [w[1] for w in wins]
    return SimulationScore(
        score=pearson(flat(true), flat(sim)),
        top=pearson(flat(true[: len(top)]), flat(sim[: len(top)])),
        random=pearson(flat(true[len(top):]), flat(sim[len(top):])),
        true=true, simulated=sim, tokens=[w[0] for w in wins], n_top=len(top),
    )


@dataclass
class JudgeScore:
    balanced_accuracy: float
    accuracy: float
    n: int
    labels: list[int] = field(repr=False, default_factory=list)
    p_yes: list[float] = field(repr=False, default_factory=list)


def _balanced(labels: list[int], preds: list[int]) -> tuple[float, float]:
    acc = sum(int(l == p) for l, p in zip(labels, preds)) / max(1, len(labels))
    rates = []
    for cls in (0, 1):
        idx = [i for i, l in enumerate(labels) if l == cls]
        if idx:
            rates.append(sum(int(preds[i] == cls) for i in idx) / len(idx))
    return (sum(rates) / len(rates) if rates else 0.0), acc


def _scored_windows(record: UnitRecord, tokenizer, n_top: int, n_sample: int, n_random: int):
    wins = windows_of(record, tokenizer, "top", n_top)
    samp = windows_of(record, tokenizer, "sample")
    # spread over the quantile bins: the highest bins first, round robin
    by_bin: dict[int, list] = {}
    for b, w in zip(record.sample_bins, samp):
        by_bin.setdefault(b, []).append(w)
    order: list = []
    while any(by_bin.values()) and len(order) < n_sample:
        for b in sorted(by_bin, reverse=True):
            if by_bin[b] and len(order) < n_sample:
                order.append(by_bin[b].pop(0))
    return wins + order + windows_of(record, tokenizer, "random", n_random)


def detection_score(judge, explanation: str, record: UnitRecord, tokenizer, n_top: int = 5, n_sample: int = 5,
                    n_random: int = 10, pos_fraction: float = 0.25) -> JudgeScore:
    peak = max(record.stats.get("max", 0.0), 1e-12)
    wins = _scored_windows(record, tokenizer, n_top, n_sample, n_random)
    labels = [int(max(a) >= pos_fraction * peak) for _, a in wins]
    p = judge.yes_probability([detection_messages(explanation, t) for t, _ in wins])
    bal, acc = _balanced(labels, [int(x > 0.5) for x in p])
    return JudgeScore(bal, acc, len(wins), labels, p)


def fuzzing_score(judge, explanation: str, record: UnitRecord, tokenizer, n_top: int = 5, n_sample: int = 5,
                  pos_fraction: float = 0.25, seed: int = 0) -> JudgeScore:
    peak = max(record.stats.get("max", 0.0), 1e-12)
    rng = random.Random(seed)
    convs, labels = [], []
    for toks, acts in _scored_windows(record, tokenizer, n_top, n_sample, 0):
        hot = [a >= pos_fraction * peak for a in acts]
        n_hot = sum(hot)
        if not n_hot or n_hot == len(toks):
            continue
        cold = [i for i, h in enumerate(hot) if not h]
        fake = set(rng.sample(cold, min(n_hot, len(cold))))
        convs.append(fuzzing_messages(explanation, toks, hot))
        labels.append(1)
        convs.append(fuzzing_messages(explanation, toks, [i in fake for i in range(len(toks))]))
        labels.append(0)
    if not convs:
        return JudgeScore(0.0, 0.0, 0)
    p = judge.yes_probability(convs)
    bal, acc = _balanced(labels, [int(x > 0.5) for x in p])
    return JudgeScore(bal, acc, len(convs), labels, p)


def score_all(explanation: str, record: UnitRecord, tokenizer, simulator=None, judge=None, causal=None,
              which: Optional[Sequence[str]] = None) -> dict:
    """Every score asked for, as ``{method: value}`` plus ``{method}_details``."""
    which = list(which or ["correlation"])
    out: dict = {}
    if "correlation" in which:
        if simulator is None:
            raise ValueError("correlation scoring needs a simulator")
        s = correlation_score(simulator, explanation, record, tokenizer)
        out["correlation"] = s.score
        out["correlation_details"] = {"top": s.top, "random": s.random, "simulated": s.simulated, "true": s.true}
        sim_for_causal = s
    else:
        sim_for_causal = None
    for name, fn in (("detection", detection_score), ("fuzzing", fuzzing_score)):
        if name in which:
            if judge is None:
                raise ValueError(f"{name} scoring needs a judge backend")
            j = fn(judge, explanation, record, tokenizer)
            out[name] = j.balanced_accuracy
            out[f"{name}_details"] = {"accuracy": j.accuracy, "n": j.n}
    if "causal" in which:
        if causal is None:
            raise ValueError("causal scoring needs a CausalScorer")
        c = causal.score(explanation, record, simulation=sim_for_causal)
        out["causal"] = c.score
        out["causal_details"] = {"oracle": c.oracle, "mean_effect": c.mean_effect, "n_positions": c.n_positions,
                                 "ablation": c.ablation}
    return out
