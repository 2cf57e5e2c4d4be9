"""Explanations with the real SmolLM2-135M-Instruct, offline: the planted city unit scored by the
likelihood simulator (true explanation >= 0.7, unrelated <= 0.2), the all-at-once simulator's KV
cache and batching against one uncached forward, the local judge (a padded batch equals
one-by-one), and `tdb-lens explain` end to end on MLP neurons and SAE latents: stored,
scored and searchable."""

from __future__ import annotations

import pytest
import torch

import tdb_lens
from _explain_planted import CITIES, PLANT_HOOK, PLANT_UNIT, planted_corpus, planted_model
from _explain_sae import quick_sae
from tdb_lens.explain.backends import LocalChatBackend
from tdb_lens.explain.corpus import build_corpus, default_corpus_path
from tdb_lens.explain.harvest import harvest
from tdb_lens.explain.prompts import detection_messages
from tdb_lens.explain.scoring import correlation_score
from tdb_lens.explain.simulator import AllAtOnceSimulator, LikelihoodSimulator

pytestmark = pytest.mark.slow

TRUE = "names of cities"
UNRELATED = ("numbers and arithmetic", "verbs in the past tense")


@pytest.fixture(scope="module")
def smol():
    m = tdb_lens.load("smollm2-135m").eval()
    yield m
    m.reset_saes()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, _ = planted_model()
    res = harvest(model, planted_corpus(model), PLANT_HOOK, tmp_path_factory.mktemp("h"), units=[PLANT_UNIT],
                  k=8, n_random=8, batch_size=16, progress=False)
    return model, res.record(PLANT_UNIT)


def test_planted_unit_true_vs_unrelated_explanation(smol, planted):
    pm, rec = planted
    sim = LikelihoodSimulator(smol)
    true = correlation_score(sim, TRUE, rec, pm.tokenizer)
    others = {e: correlation_score(sim, e, rec, pm.tokenizer).score for e in UNRELATED}
    print(f"\nplanted city unit, likelihood simulator: {TRUE!r} {true.score:.3f} (top {true.top:.3f}); "
          + ", ".join(f"{e!r} {v:.3f}" for e, v in others.items()))
    assert true.score >= 0.7
    assert max(others.values()) <= 0.2
    # the simulation is highest on the city tokens
    flat = [(s, t) for row_s, row_t in zip(true.simulated, true.tokens) for s, t in zip(row_s, row_t)]
    best = max(flat)[1]
    assert best.strip() in CITIES


def test_all_at_once_cache_and_batching_match_one_forward(smol):
    sim = AllAtOnceSimulator(smol, batch_size=2)
    wins = [["I", " love", " Paris"], [" We", " met", " in", " Rome", " and", " Tokyo", "."]]
    out = sim.simulate(TRUE, wins)
    for w, got in zip(wins, out):
        body, read_at = sim.encode_body(TRUE, w)
        ids = torch.tensor([sim.prefix_ids + body])
        with torch.no_grad():
            logits = smol(ids)[0].float()
        pos = torch.tensor(read_at) + len(sim.prefix_ids)
        ref = logits[pos][:, sim.value_ids].softmax(-1) @ sim.values
        torch.testing.assert_close(torch.tensor(got), ref, atol=2e-3, rtol=0)
        assert all(0 <= v <= sim.scale_max for v in got)


def test_local_judge_batch_equals_one_by_one(smol):
    backend = LocalChatBackend(smol)
    convs = [detection_messages(TRUE, ["We", " flew", " to", " Paris", "."]),
             detection_messages(TRUE, ["The", " soup", " was", " cold", " again", " tonight", "."])]
    both = backend.yes_probability(convs)  # one left-padded batch
    alone = [backend.yes_probability([c])[0] for c in convs]
    assert all(0.0 < p < 1.0 for p in both)
    assert both == pytest.approx(alone, abs=1e-4)


def test_cli_end_to_end_neurons_and_sae_latents(smol, tmp_path, capsys):
    """One MLP neuron explained by SmolLM2 (a short prompt: 3 windows, 8 tokens of answer) and by the
    top-token baseline, and one latent of a quickly trained SAE (see tests/_explain_sae.py) by the
    baseline; scored, stored, then found by search.
    (The 32 + 32 unit figures come from the same command with --units random:32 / active:32.)"""
    from tdb_lens.explain.cli import main
    from tdb_lens.explain.search import search
    from tdb_lens.explain.store import ExplanationStore
    from tdb_lens.sae.loading import save_sae

    corpus = build_corpus(smol, default_corpus_path(), ctx_len=16, n_windows=64, seed=0)
    sae = quick_sae(smol, corpus, layer=3, d_sae=1152, epochs=2)
    save_sae(sae, tmp_path / "sae")
    db = tmp_path / "e.db"
    common = ["--corpus", "fortunes", "--n-windows", "64", "--ctx-len", "16", "--k", "8", "--db", str(db),
              "--n-examples", "3", "--explain-tokens", "8", "--no-progress"]
    assert main(["--hook", "blocks.3.mlp.hook_post", "--units", "random:1", "--explainer", "local,top-tokens",
                 *common], model=smol) == 0
    assert main(["--hook", "blocks.3.hook_resid_post.hook_sae_acts_post", "--sae", str(tmp_path / "sae"),
                 "--units", "active:1", "--explainer", "top-tokens", *common], model=smol) == 0
    assert not smol.attached_saes  # the CLI took its SAE off again
    out = capsys.readouterr().out
    assert "mean llm:local:" in out and "mean top-tokens: correlation" in out
    with ExplanationStore(db) as store:
        rows = store.explanations()
        assert len(rows) == 3 and all(r.scores.get("correlation") is not None for r in rows)
        assert {r.kind for r in rows} == {"neuron", "sae_latent"}
        assert {r.explainer for r in rows} == {"llm:local:smollm2-135m", "top-tokens"}
        latent = next(r for r in rows if r.kind == "sae_latent")
        assert latent.label.startswith("blocks.3.hook_resid_post:F")
        assert store.examples(latent.unit_id, "top")  # examples stored with the unit
        for r in rows:
            print(f"{r.label:<32} {r.explainer:<28} {r.scores['correlation']:+.3f}  {r.text}")
        # every stored explanation is found by searching for its own text
        target = next(r for r in rows if r.explainer != "top-tokens")
        hit = search(store, target.text, k=1)[0]
        assert hit.text == target.text and hit.similarity > 0.99
