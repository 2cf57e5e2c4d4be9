"""Scores against known results on a planted unit (a tiny GPT-2 neuron that fires exactly on city
names), with oracle simulators and judges: correlation, detection, fuzzing and the causal score;
the top-token baseline; prompts in Bills et al.'s format."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from _explain_planted import CITIES, PLANT_HOOK, PLANT_UNIT, planted_corpus, planted_model
from tdb_lens.explain.causal import CausalScorer
from tdb_lens.explain.explainer import TopTokensExplainer
from tdb_lens.explain.harvest import harvest
from tdb_lens.explain.prompts import explainer_messages, highlight, scale_acts, trim_window
from tdb_lens.explain.scoring import correlation_score, detection_score, fuzzing_score, pearson, score_all


class SetSimulator:
    """Predicts 1 on tokens whose word is in ``words`` (an oracle for the right set, a wrong one otherwise)."""

    name = "set"

    def __init__(self, words):
        self.words = set(words)

    def simulate(self, explanation, windows):
        return [[float(t.strip() in self.words) for t in w] for w in windows]


class CityJudge:
    """A perfect judge for 'cities': detection says yes when a city occurs; fuzzing says yes when
    every marked span is a city. ``always`` answers yes to everything instead."""

    def __init__(self, always=False):
        self.always = always

    def yes_probability(self, convs):
        out = []
        for c in convs:
            text = c[-1]["content"].split("\nText: ", 1)[1].rsplit("\n", 1)[0]  # the excerpt only
            if self.always:
                out.append(1.0)
            elif "<<" in text:
                spans = re.findall(r"<<(.*?)>>", text)
                out.append(float(bool(spans) and all(s.strip() in CITIES for s in spans)))
            else:
                out.append(float(any(re.search(rf"\b{c}\b", text) for c in CITIES)))
        return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, ids = planted_model()
    corpus = planted_corpus(model)
    res = harvest(model, corpus, PLANT_HOOK, tmp_path_factory.mktemp("h"), units=[PLANT_UNIT, 0], k=8, n_random=8,
                  n_sample=16, batch_size=16, progress=False)
    return model, corpus, res


def test_planted_unit_is_the_city_indicator(planted):
    model, corpus, res = planted
    rec = res.record(PLANT_UNIT)
    assert rec.stats["max"] == 1.0 and rec.label == "L0.N3"
    for toks, acts in zip(rec.top_tokens.tolist(), rec.top_acts.tolist()):
        for t, a in zip(toks, acts):
            assert a == float(model.tokenizer.id_to_token(t).strip() in CITIES)


def test_pearson_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert pearson(x.tolist(), (x + y).tolist()) == pytest.approx(np.corrcoef(x.numpy(), (x + y).numpy())[0, 1])
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant: 0, not NaN
    with pytest.raises(ValueError, match="equal lengths"):
        pearson([1, 2], [1])


def test_correlation_score_oracle_and_unrelated(planted):
    model, _, res = planted
    rec = res.record(PLANT_UNIT)
    good = correlation_score(SetSimulator(CITIES), "city names", rec, model.tokenizer)
    assert good.score == pytest.approx(1.0) and good.top == pytest.approx(1.0)
    assert good.n_top == 5 and len(good.true) == 10  # 5 top + 5 random windows, pooled
    bad = correlation_score(SetSimulator({".", ",", "the"}), "punctuation", rec, model.tokenizer)
    assert bad.score < 0.1
    flat_true = [v for r in bad.true for v in r]
    flat_sim = [v for r in bad.simulated for v in r]
    assert bad.score == pytest.approx(np.corrcoef(flat_true, flat_sim)[0, 1])


def test_detection_and_fuzzing_with_oracle_and_trivial_judges(planted):
    model, _, res = planted
    rec = res.record(PLANT_UNIT)
    det = detection_score(CityJudge(), "city names", rec, model.tokenizer)
    assert det.balanced_accuracy == 1.0 and det.n > 0 and 0 in det.labels and 1 in det.labels
    yes = detection_score(CityJudge(always=True), "city names", rec, model.tokenizer)
    assert yes.balanced_accuracy == 0.5  # all positives right, all negatives wrong
    fz = fuzzing_score(CityJudge(), "city names", rec, model.tokenizer)
    assert fz.balanced_accuracy == 1.0 and fz.labels.count(1) == fz.labels.count(0) > 0
    assert fuzzing_score(CityJudge(always=True), "city names", rec, model.tokenizer).balanced_accuracy == 0.5
    out = score_all("city names", rec, model.tokenizer, SetSimulator(CITIES), CityJudge(),
                    which=["correlation", "detection", "fuzzing"])
    assert out["correlation"] == pytest.approx(1.0) and out["detection"] == 1.0 and out["fuzzing"] == 1.0
    with pytest.raises(ValueError, match="needs a judge"):
        score_all("x", rec, model.tokenizer, SetSimulator(CITIES), None, which=["detection"])


def test_causal_score_against_manual_ablation(planted):
    model, _, res = planted
    rec = res.record(PLANT_UNIT)
    scorer = CausalScorer(model, PLANT_HOOK, SetSimulator(CITIES))
    tokens = torch.cat([rec.top_tokens[:5], rec.random_tokens[:5]])

    # independent reference: the KL of the next-token distribution with the neuron zeroed, by hand
    def zero(act, hook):
        act[..., PLANT_UNIT] = 0
        return act

    with torch.no_grad():
        clean = torch.log_softmax(model(tokens).double(), -1)
        abl = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[(PLANT_HOOK, zero)]).double(), -1)
    kl = (clean.exp() * (clean - abl)).sum(-1)
    torch.testing.assert_close(scorer.effects(tokens, PLANT_UNIT).double(), kl.clamp(min=0), rtol=1e-4, atol=1e-6)
    # one layer: the neuron only reaches its own position, so the effect is exactly where cities are
    is_city = torch.tensor([[float(model.tokenizer.id_to_token(t).strip() in CITIES) for t in row]
                            for row in tokens.tolist()])
    assert bool((kl[is_city == 0].abs() < 1e-9).all()) and bool((kl[is_city == 1] > 0).all())
    good = scorer.score("city names", rec)
    assert good.score == pytest.approx(pearson(is_city.flatten().tolist(), kl.flatten().tolist()), abs=1e-4)
    assert good.score > 0.5 and good.score == pytest.approx(good.oracle, abs=1e-6) and good.mean_effect > 0
    bad = CausalScorer(model, PLANT_HOOK, SetSimulator({".", ","})).score("punctuation", rec)
    assert bad.score < 0.1
    # a unit the model never uses (neuron 0 zeroed in W_out) scores 0 whatever the explanation
    with torch.no_grad():
        saved = model.blocks[0].mlp.W_out[0].clone()
        model.blocks[0].mlp.W_out[0] = 0
    try:
        dead = CausalScorer(model, PLANT_HOOK, SetSimulator(CITIES)).score("anything", res.record(0))
    finally:
        with torch.no_grad():
            model.blocks[0].mlp.W_out[0] = saved
    assert dead.score == 0.0 and dead.mean_effect == 0.0
    with pytest.raises(ValueError, match="zero' or 'mean"):
        CausalScorer(model, PLANT_HOOK, None, ablation="noise")
    with pytest.raises(KeyError):
        CausalScorer(model, "blocks.9.mlp.hook_post", None)


def test_top_token_baseline(planted):
    model, _, res = planted
    ex = TopTokensExplainer(model.tokenizer).explain(res.record(PLANT_UNIT))
    toks = ex.meta["tokens"]
    assert len(toks) == 4 and all(t in CITIES for t in toks)
    assert ex.text.startswith("tokens like ") and ex.explainer == "top-tokens"


def test_prompt_format_is_bills_et_al():
    assert scale_acts([[0.0, 0.5, 1.0], [-1.0, 0.25, 0.04]]) == [[0, 5, 10], [0, 2, 0]]
    assert scale_acts([[0.0, 0.0]]) == [[0, 0]]
    msgs = explainer_messages([["I", " love", " Paris"]], [[0.0, 0.2, 2.0]])
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert "<start>\nI\t0\n love\t1\n Paris\t10\n<end>" in msgs[-1]["content"]
    toks, acts = trim_window([str(i) for i in range(30)], [0.0] * 20 + [5.0] + [0.0] * 9, 8)
    assert len(toks) == 8 and "20" in toks and acts[toks.index("20")] == 5.0
    assert highlight(["a", " b", " c", " d"], [False, True, True, False]) == "a<< b c>> d"
