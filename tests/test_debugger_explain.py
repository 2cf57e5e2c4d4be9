"""The debugger's "explain and score this unit" action, its configured explainer (the top-token
baseline, an OpenAI-compatible endpoint: the fake server of the explain tests) and steering by a
quantile of a unit's harvested activations, on the tiny random GPT-2.

References: the correlation written out here (the likelihood simulator's predictions on the
unit's top and random windows, then numpy's Pearson correlation), the store read back, the fake
server's own reply, `torch.quantile` of activations recomputed with ``run_with_cache`` and a
hand-written clamping hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdb_lens.attribution import LogitDiff
from tdb_lens.debugger import DebuggerError, Investigation
from tdb_lens.debugger.app import create_app
from test_debugger_support import HARVEST_HOOK, IOI, STATE, TEXTS, harvest_and_store, tiny_model
from test_explain_backends import FakeServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model()
    tmp = tmp_path_factory.mktemp("dbg-explain")
    hdir, store = harvest_and_store(model, tmp)
    inv = Investigation(model, IOI, target=" Mary", distractor=" John", store=store, harvest_dirs=[hdir])
    return model, inv, tmp


@pytest.fixture(scope="module")
def client(setup):
    from fastapi.testclient import TestClient

    return TestClient(create_app(setup[1]))


def record(inv, unit: int):
    from tdb_lens.explain import load_harvest

    return load_harvest(inv.harvest_dirs[0] / "l0-post").record(unit)


def correlation_by_hand(model, text: str, rec) -> tuple[float, float, float]:
    """The likelihood simulator on the top 5 and random 5 windows, then numpy's Pearson correlation
    (pooled, top alone, random alone)."""
    from tdb_lens.explain.simulator import LikelihoodSimulator

    tok = lambda ids: [model.tokenizer.id_to_token(int(i)) for i in ids]
    top = [(tok(t), a.tolist()) for t, a in list(zip(rec.top_tokens, rec.top_acts))[:5]]
    rnd = [(tok(t), a.tolist()) for t, a in list(zip(rec.random_tokens, rec.random_acts))[:5]]
    sim = LikelihoodSimulator(model).simulate(text, [w[0] for w in top + rnd])
    true = [w[1] for w in top + rnd]
    corr = lambda a, b: float(np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1])
    return corr(true, sim), corr(true[: len(top)], sim[: len(top)]), corr(true[len(top):], sim[len(top):])


def test_explain_scores_and_stores_in_one_go(setup, client):
    model, inv, _ = setup
    r = client.post("/api/explain", json=dict(STATE, node="L0.N5@2"))
    assert r.status_code == 200, r.text
    out = r.json()
    rec = record(inv, 5)
    pooled, top, rnd = correlation_by_hand(model, out["text"], rec)
    assert math.isclose(out["scores"]["correlation"], pooled, abs_tol=1e-6)
    assert math.isclose(out["details"]["correlation"]["top"], top, abs_tol=1e-6)
    assert math.isclose(out["details"]["correlation"]["random"], rnd, abs_tol=1e-6)
    assert out["scorer"].startswith("likelihood:") and out["explainer"] == "top-tokens"
    row = inv.store.current().explanations(ids=[out["explanation_id"]])[0]  # what the store holds
    assert row.text == out["text"] and math.isclose(row.scores["correlation"], pooled, abs_tol=1e-6)
    page = client.post("/api/unit", json=dict(STATE, node="L0.N5")).json()
    shown = [e for e in page["explanations"] if e["id"] == out["explanation_id"]]
    assert shown and math.isclose(shown[0]["scores"]["correlation"], pooled, abs_tol=1e-6)
    # the library's text and HTML unit pages show the score too
    lib = Investigation(model, IOI, store=inv.store.path, harvest_dirs=inv.harvest_dirs)
    assert f"correlation {pooled:.3f}" in str(lib.unit("L0.N5"))
    assert f"correlation {pooled:.3f}" in lib.unit("L0.N5")._repr_html_()


class Boom:
    name = "boom"

    def simulate(self, explanation, windows):
        raise RuntimeError("the simulator broke")


def test_a_failed_scoring_stores_nothing(setup):
    model, inv, tmp = setup
    from tdb_lens.explain import ExplanationStore

    store = ExplanationStore(tmp / "fail.db")
    bad = Investigation(model, IOI, store=store, harvest_dirs=inv.harvest_dirs, simulator=Boom())
    with pytest.raises(RuntimeError, match="the simulator broke"):
        bad.explain("L0.N6")
    assert store.explanations() == []
    with pytest.raises(DebuggerError, match="scores: unknown"):
        Investigation(model, IOI, scores=("correlation", "vibes"))
    with pytest.raises(DebuggerError, match="need a judge"):
        Investigation(model, IOI, store=store, harvest_dirs=inv.harvest_dirs, scores=("detection",)).explain("L0.N6")
    assert store.explanations() == []


def test_endpoint_explainer_from_the_command_line(setup, monkeypatch):
    """``tdb-lens debug --explainer URL``: the explanation is the server's text, scored and stored;
    the key goes from the environment to the server and nowhere else."""
    from fastapi.testclient import TestClient

    import tdb_lens.loading
    from tdb_lens.debugger.cli import build, parser

    model, inv, tmp = setup
    monkeypatch.setattr(tdb_lens.loading, "load", lambda name: model)
    monkeypatch.setenv("TDB_DEBUG_TEST_KEY", "sk-debug-secret-42")
    with FakeServer(reply=lambda body: "names of cities") as srv:
        args = parser().parse_args(["--db", str(tmp / "endpoint.db"), "--harvest-dir", str(inv.harvest_dirs[0]),
                                    "--explainer", srv.url, "--explainer-model", "fake-model",
                                    "--api-key-env", "TDB_DEBUG_TEST_KEY"])
        app, _ = build(args)
        c = TestClient(app)
        info = c.get("/api/info")
        r = c.post("/api/explain", json=dict(STATE, node="L0.N2@2"))
        assert r.status_code == 200, r.text
        assert srv.headers and all(h["Authorization"] == "Bearer sk-debug-secret-42" for h in srv.headers)
        assert {b["model"] for b in srv.requests} == {"fake-model"}
    out = r.json()
    assert out["text"] == "names of cities" and out["explainer"].startswith("llm:")
    pooled, _, _ = correlation_by_hand(model, "names of cities", record(inv, 2))
    assert math.isclose(out["scores"]["correlation"], pooled, abs_tol=1e-6)
    page = c.post("/api/unit", json=dict(STATE, node="L0.N2"))
    assert "names of cities" in page.text
    for resp in (info, r, page):
        assert "sk-debug-secret-42" not in resp.text


def test_bad_explainer_settings_fail_before_the_model_loads(monkeypatch, capsys):
    import tdb_lens.loading
    from tdb_lens.debugger.cli import main, parser
    from tdb_lens.explain.cli import build_parser

    def no_load(name):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tdb_lens.loading, "load", no_load)
    for argv, reason in ((["--explainer", "ftp://x"], "--explainer must be"), (["--explainer", "local,top-tokens"],
                         "takes one explainer"), (["--scores", "vibes"], "--scores: unknown"),
                         (["--simulator", "json"], "needs an OpenAI-compatible"),
                         (["--explainer", "openai:nourl"], "openai:MODEL@BASE_URL"),
                         (["--explainer", "http://user:sk-in-url@127.0.0.1:9/v1", "--scores", "vibes"], "--scores")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert reason in err and "sk-in-url" not in err
    # one set of explainer flags, shared with tdb-lens explain
    flags = lambda p: {s for a in p._actions for s in a.option_strings}
    shared = {"--explainer", "--n-examples", "--explain-tokens", "--explainer-model", "--api-key-env", "--simulator",
              "--scores"}
    assert shared <= flags(parser()) and shared <= flags(build_parser())
    assert parser().parse_args([]).explainer == "top-tokens" and build_parser().parse_args([]).explainer == "local"


def test_local_explainer_needs_a_chat_model(setup, monkeypatch, capsys):
    import tdb_lens.loading
    from tdb_lens.debugger.cli import main

    monkeypatch.setattr(tdb_lens.loading, "load", lambda name: setup[0])
    assert main(["--explainer", "local"]) == 2
    assert "no chat template" in capsys.readouterr().err


# ---- steering by quantile ----------------------------------------------------------------------
def activations(model, tokens: torch.Tensor, unit: int) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[HARVEST_HOOK])
    return cache[HARVEST_HOOK][..., unit].reshape(-1)


def clamped_metric(model, unit: int, value: float) -> float:
    def clamp(post, hook):
        post = post.clone()
        post[:, -1, unit] = value
        return post

    logits = model.run_with_hooks(model.to_tokens(IOI), fwd_hooks=[(HARVEST_HOOK, clamp)])
    return float(LogitDiff(model.to_single_token(" Mary"), model.to_single_token(" John"))(logits)[0])


def test_quantile_of_every_harvested_token(setup, client):
    """Quantiles the harvest's per-token tail covers are torch.quantile over every harvested token
    (recomputed), named exact; the steered run equals a hand-written clamping hook. Below the rule
    (a tail of 8 of 320 tokens answers q >= 0.978), the random windows' tokens are used, and named."""
    from tdb_lens.explain import build_corpus, harvest

    model, _, tmp = setup
    corpus = build_corpus(model, TEXTS, ctx_len=16, n_windows=20, seed=0)
    kw = dict(units=list(range(8)), k=4, n_sample=4, n_quantiles=2, batch_size=8, progress=False, model_name="tiny-gpt2")
    harvest(model, corpus, HARVEST_HOOK, tmp / "all" / "h", n_random=2, n_tail=8, **kw)
    inv = Investigation(model, IOI, target=" Mary", distractor=" John", harvest_dirs=[tmp / "all"])
    with torch.no_grad():
        acts = activations(model, corpus.tokens, 3)
        assert acts.numel() == 20 * 16
        for q in (0.98, 0.99, 0.999):
            expect = float(torch.quantile(acts.double(), q))
            inv.steer("L0.N3@-1", quantile=q)
            assert math.isclose(inv.interventions[-1].value, expect, rel_tol=1e-6, abs_tol=1e-7)
            assert inv.interventions[-1].basis == f"q={q:g} of 320 tokens (exact)"
            assert inv.interventions[-1].as_dict()["basis"] == inv.interventions[-1].basis
        table = inv.node_table(k=2)  # left: the clean run, right: the steered one
        clean = LogitDiff(model.to_single_token(" Mary"), model.to_single_token(" John"))(model(model.to_tokens(IOI)))
        assert math.isclose(table.objective[0], float(clean[0]), abs_tol=1e-5)
        assert math.isclose(table.objective[1], clamped_metric(model, 3, expect), abs_tol=1e-5)
        assert abs(table.objective[1] - table.objective[0]) > 1e-6  # the clamp changed something
        # below the rule: the sample of the random windows' tokens, and why
        from tdb_lens.explain import load_harvest

        h = load_harvest(tmp / "all" / "h")
        sample = activations(model, corpus.tokens[h.random_windows], 3)
        inv.steer("L0.N3@-1", quantile=0.9)
        iv = inv.interventions[-1]
        assert math.isclose(iv.value, float(torch.quantile(sample, 0.9)), rel_tol=1e-6, abs_tol=1e-7)
        assert iv.basis.startswith("q=0.9 of a sample of 32 tokens (below q=0.978")
    page = inv.unit("L0.N3")
    assert "quantiles exact for q >= 0.978056 (top 8 of 320 tokens), below from a sample of 32 tokens" in str(page)


def test_quantile_steering_through_the_app(setup, client):
    """The support harvest (320 tokens, the default tail of 256): q=0.999 is exact, torch.quantile over
    every token of the corpus recomputed; the app's reply names the basis."""
    from tdb_lens.explain import load_harvest

    model, inv, _ = setup
    h = load_harvest(inv.harvest_dirs[0] / "l0-post")
    with torch.no_grad():
        acts = activations(model, h.tokens, 4)
        expect = float(torch.quantile(acts.double(), 0.999))
        iv = {"node": "L0.N4@-1", "method": "clamp", "value": None, "quantile": 0.999}
        r = client.post("/api/table", json=dict(STATE, interventions=[iv]))
        assert r.status_code == 200, r.text
        t = r.json()
        assert math.isclose(t["meta"]["interventions"][0]["value"], expect, rel_tol=1e-6, abs_tol=1e-7)
        assert t["meta"]["interventions"][0]["basis"] == "q=0.999 of 320 tokens (exact)"
        assert math.isclose(t["objective"][1], clamped_metric(model, 4, expect), abs_tol=1e-5)
    # the state it returns (value and quantile) loads back: the quantile wins and gives the same value
    inv.load_state(dict(STATE, interventions=t["meta"]["interventions"]))
    assert inv.interventions[0].quantile == 0.999 and math.isclose(inv.interventions[0].value, expect, rel_tol=1e-6)


@pytest.mark.parametrize("iv, reason", [
    ({"node": "L0.N4@-1", "method": "clamp", "quantile": 1.0}, "quantile must be a number in (0, 1)"),
    ({"node": "L0.N4@-1", "method": "clamp", "quantile": 0.0}, "quantile must be a number in (0, 1)"),
    ({"node": "L0.N4@-1", "method": "clamp", "quantile": -0.5}, "quantile must be a number in (0, 1)"),
    ({"node": "L1.N4@-1", "method": "clamp", "quantile": 0.9}, "no harvest for L1.N4"),
    ({"node": "L1.N4@-1", "method": "clamp"}, "no harvest for L1.N4"),
    ({"node": "L0.H1@-1", "method": "clamp", "quantile": 0.9}, "steer a head with a value"),
])
def test_bad_quantile_steering_gets_a_400(setup, client, iv, reason):
    _, inv, _ = setup
    before = inv.state()
    r = client.post("/api/table", json=dict(STATE, interventions=[iv]))
    assert r.status_code == 400 and reason in r.json()["detail"], (r.status_code, r.json().get("detail"))
    assert inv.state() == before
    with pytest.raises(DebuggerError, match="a steering value or a quantile, not both"):
        inv.steer("L0.N4@-1", 2.0, quantile=0.9)
    for q in (float("nan"), True):
        with pytest.raises(DebuggerError, match=r"quantile must be a number in \(0, 1\)"):
            inv.steer("L0.N4@-1", quantile=q)
    with pytest.raises((DebuggerError, TypeError), match="quantile"):  # the library's check or the type checker's
        inv.steer("L0.N4@-1", quantile="0.9")  # type: ignore[arg-type]
    assert inv.state() == before
