"""Provenance and idempotence of `run_explain` / ``tdb-lens explain`` (issue 13): a harvest or a
store never mixes models (name plus weights digest), a rerun stores nothing twice, and a run
interrupted part-way leaves only complete explanations (with their scores) and resumes cleanly."""

from __future__ import annotations

import copy
import json
import sqlite3

import pytest
import torch

from _explain_planted import PLANT_HOOK, planted_corpus, planted_model
from tdb_lens.explain import ExplainConfig, harvest, model_identity, run_explain
from tdb_lens.explain.explainer import TopTokensExplainer
from tdb_lens.explain.store import ExplanationStore

TEXT = "\n\n".join(["We flew from Paris to Tokyo and then to Rome.", "The dog slept all day.",
                    "London, Berlin and Vienna are old cities.", "Nothing happened on Monday."] * 8)


@pytest.fixture(scope="module")
def models():
    """The planted model and a copy whose MLP input weights differ (same architecture and name)."""
    a, _ = planted_model()
    b, _ = planted_model()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        b.blocks[0].mlp.W_in.add_(torch.randn(b.blocks[0].mlp.W_in.shape, generator=g))
    return a, b


def config(tmp_path, **kw) -> ExplainConfig:
    corpus = tmp_path / "c.txt"
    if not corpus.exists():
        corpus.write_text(TEXT)
    base = dict(hook=PLANT_HOOK, units="0-11", model="planted", corpus=str(corpus), n_windows=12, ctx_len=12, k=4,
                explainers=("top-tokens",), db=str(tmp_path / "e.db"), progress=False)
    return ExplainConfig(**{**base, **kw})


def test_identity_digest(models):
    a, b = models
    ia, ib = model_identity(a, "planted"), model_identity(b, "planted")
    assert ia.name == ib.name and ia.digest != ib.digest and len(ia.digest) == 32
    assert model_identity(copy.deepcopy(a), "x").digest == ia.digest  # same weights, same digest
    with torch.no_grad():
        a.blocks[0].attn.W_O[0, 0, 0] += 1e-3
    assert model_identity(a).digest != ia.digest
    with torch.no_grad():
        a.blocks[0].attn.W_O[0, 0, 0] -= 1e-3


def test_harvest_dir_refuses_another_model(models, tmp_path):
    a, b = models
    corpus = planted_corpus(a)
    d = tmp_path / "h"
    harvest(a, corpus, PLANT_HOOK, d, units=[0, 3], k=4, batch_size=16, progress=False, model_name="planted")
    before = (d / "manifest.json").read_text()
    with pytest.raises(ValueError, match=r"holds a harvest of model 'planted' \(weights [0-9a-f]{12}\), not of "
                                         r"'planted' \(weights [0-9a-f]{12}\): harvest this model into another"):
        harvest(b, corpus, PLANT_HOOK, d, units=[0, 3], k=4, batch_size=16, progress=False, model_name="planted")
    assert (d / "manifest.json").read_text() == before
    assert json.loads(before)["model_digest"] == model_identity(a).digest
    # the same model resumes (nothing to do) and gives the same result
    res = harvest(a, corpus, PLANT_HOOK, d, units=[0, 3], k=4, batch_size=16, progress=False, model_name="planted")
    assert res.model.digest == model_identity(a).digest and res.record(3).kind == "neuron"


def test_two_models_on_one_store_keep_their_own_activations(models, tmp_path):
    """Model A then model B (other weights) on the same --db: each gets its own harvest and its own
    stored windows (issue 13: B's units were stored with A's activations, byte for byte)."""
    a, b = models
    run_explain(config(tmp_path, model="A"), a)
    run_explain(config(tmp_path, model="B"), b)
    ref_b = harvest(b, _corpus(b, tmp_path), PLANT_HOOK, tmp_path / "ref", units=[0],
                    k=4, batch_size=16, progress=False)
    with ExplanationStore(tmp_path / "e.db") as store:
        top_a = store.examples(store.unit_id(PLANT_HOOK, 0, model="A"), "top")
        top_b = store.examples(store.unit_id(PLANT_HOOK, 0, model="B"), "top")
        assert [e["acts"] for e in top_a] != [e["acts"] for e in top_b]
        want = ref_b.record(0)
        assert [e["window"] for e in top_b] == want.top_windows
        torch.testing.assert_close(torch.tensor([e["acts"] for e in top_b]), want.top_acts)
    assert len(list((tmp_path / "e-harvest").iterdir())) == 2
    # the same name with other weights is refused before any harvesting
    with pytest.raises(ValueError, match="holds units of a model named 'A' with other weights"):
        run_explain(config(tmp_path, model="A", units="0-2"), b)
    assert len(list((tmp_path / "e-harvest").iterdir())) == 2


def _corpus(model, tmp_path):
    from tdb_lens.corpus import build_corpus

    return build_corpus(model, str(tmp_path / "c.txt"), ctx_len=12, n_windows=12, seed=0)


def test_rerun_stores_nothing_twice(models, tmp_path, capsys):
    from tdb_lens.cli import main

    a, _ = models
    cfg = config(tmp_path)
    first = run_explain(cfg, a)
    assert first.new == 12 and first.reused == 0
    con = sqlite3.connect(tmp_path / "e.db")
    counts = [con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("units", "explanations", "scores")]
    assert counts == [12, 12, 12]
    again = run_explain(cfg, a)
    assert again.new == 0 and again.reused == 12 and [r.id for r in again.rows] == [r.id for r in first.rows]
    assert [con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("units", "explanations", "scores")] == counts
    con.close()
    # the command does the same (through the already loaded model)
    from tdb_lens.explain.cli import main as explain_main

    assert explain_main(["--hook", PLANT_HOOK, "--units", "0-11", "--model", "planted", "--corpus", str(tmp_path / "c.txt"),
                         "--n-windows", "12", "--ctx-len", "12", "--k", "4", "--explainer", "top-tokens", "--db",
                         str(tmp_path / "e.db"), "--no-progress"], model=a) == 0
    assert "0 new, 12 already stored" in capsys.readouterr().out
    assert main(["explain", "--db", str(tmp_path / "e.db"), "--list"]) == 0
    assert capsys.readouterr().out.count("top-tokens") == 12


def test_interrupted_run_leaves_complete_rows_and_resumes(models, tmp_path, monkeypatch):
    a, _ = models
    calls = {"n": 0}
    real = TopTokensExplainer.explain_many

    def dies_on_second_batch(self, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what a Ctrl-C (or a kill) between two batches looks like
        return real(self, records)

    monkeypatch.setattr(TopTokensExplainer, "explain_many", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_explain(config(tmp_path), a)
    con = sqlite3.connect(tmp_path / "e.db")
    assert con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 8  # the first batch, whole
    assert con.execute("SELECT COUNT(*) FROM explanations e WHERE NOT EXISTS (SELECT 1 FROM scores s "
                       "WHERE s.explanation_id = e.id)").fetchone()[0] == 0
    monkeypatch.setattr(TopTokensExplainer, "explain_many", real)
    rep = run_explain(config(tmp_path), a)
    assert rep.new == 4 and rep.reused == 8 and len(rep.rows) == 12
    assert con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 12
    assert con.execute("SELECT COUNT(DISTINCT unit_id) FROM explanations").fetchone()[0] == 12
    con.close()


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from _explain_planted import planted_model
from tdb_lens.explain import ExplainConfig, run_explain
from tdb_lens.explain.explainer import TopTokensExplainer

real, calls = TopTokensExplainer.explain_many, []

def dies_on_second_batch(self, records):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, records)

TopTokensExplainer.explain_many = dies_on_second_batch
model, _ = planted_model()
run_explain(ExplainConfig(**{cfg!r}), model)
"""


def test_sigkill_mid_run_then_rerun(models, tmp_path):
    """SIGKILL between two batches of explanations, then a rerun: every explanation once, each with
    its score (issue 13: duplicates and an explanation without its scores)."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    a, _ = models
    cfg = config(tmp_path)
    tests = str(Path(__file__).resolve().parent)
    script = KILLED_RUN.format(tests=tests, cfg=dataclasses.asdict(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(tests).parent / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    con = sqlite3.connect(tmp_path / "e.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 8
    rep = run_explain(cfg, a)
    assert rep.new == 4 and rep.reused == 8
    assert con.execute("SELECT COUNT(*) FROM explanations").fetchone()[0] == 12
    assert con.execute("SELECT COUNT(*) FROM explanations e WHERE (SELECT COUNT(*) FROM scores s "
                       "WHERE s.explanation_id = e.id) != 1").fetchone()[0] == 0
    con.close()


class Scale(torch.nn.Module):
    """A stand-in for an SAE: a module with weights spliced into a hook point."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x * self.w


def test_spliced_modules_are_part_of_a_harvest_not_of_the_model(models, tmp_path):
    """A harvest made with one SAE is not reused with another at the same place; the model's own
    identity (what a store checks) does not change when an SAE is spliced in."""
    from tdb_lens.explain.provenance import splice_digest

    a, _ = models
    corpus = planted_corpus(a)
    host = a.hook_dict["blocks.0.hook_resid_pre"]
    plain = model_identity(a, "planted")
    assert splice_digest(a) == ""
    try:
        host.set_splice(Scale(2.0))
        first = splice_digest(a)
        spliced = model_identity(a, "planted")
        assert (spliced.name, spliced.digest) == (plain.name, plain.digest) and spliced.spliced == first != ""
        harvest(a, corpus, PLANT_HOOK, tmp_path / "h", units=[0], k=4, batch_size=16, progress=False)
        host.set_splice(Scale(3.0))
        assert splice_digest(a) not in ("", first)
        with pytest.raises(ValueError, match="other modules spliced into the model"):
            harvest(a, corpus, PLANT_HOOK, tmp_path / "h", units=[0], k=4, batch_size=16, progress=False)
    finally:
        host.set_splice(None)
