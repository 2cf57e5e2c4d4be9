"""The debugger's API on the real SmolLM2-135M (offline GGUF): every column of the node table
against the attribution module, a trace through the query against hand-written hooks, and an
ablation against a hand-written hook."""

from __future__ import annotations

import pytest
import torch

from tdb_lens.attribution import LogitDiff, Node
from test_debugger_api import check_columns, close

pytestmark = pytest.mark.slow
PROMPT = "When Mary and John went to the store, John gave a drink to"
STATE = {"prompt": PROMPT, "target": " Mary", "distractor": " John"}


@pytest.fixture(scope="module")
def client(smollm2):
    from fastapi.testclient import TestClient

    from tdb_lens.debugger import Investigation
    from tdb_lens.debugger.app import create_app

    return TestClient(create_app(Investigation(smollm2)))


def test_smollm2_columns_equal_the_attribution_module(smollm2, client):
    r = client.post("/api/table", json=STATE)
    assert r.status_code == 200, r.text
    table = r.json()
    assert {"head", "neuron", "embed"} <= {row["family"] for row in table["rows"]}
    m = LogitDiff(smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John"))
    check_columns(smollm2, table, PROMPT, m)


def test_smollm2_trace_and_ablation_equal_hand_written_hooks(smollm2, client):
    target = Node.head(23, 3, 13, 9)
    r = client.post("/api/table", json=dict(STATE, trace={"node": str(target), "through": "q"}))
    assert r.status_code == 200, r.text
    table = r.json()
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x

    names = [f"blocks.{l}.{s}" for l in range(23) for s in ("mlp.hook_post", "attn.hook_pattern")]
    hooks = [(n, keep) for n in [*names, target.hook_name]]
    hooks += [(f"blocks.23.attn.hook_{s}", lambda x, hook: x.detach()) for s in ("k", "v")]
    with torch.enable_grad():
        smollm2.run_with_hooks(smollm2.to_tokens(PROMPT), fwd_hooks=hooks)
        value = acts[target.hook_name][0, 3, 13, 9]
        grads = dict(zip(names, torch.autograd.grad(value, [acts[n] for n in names])))
    assert close(table["objective"][0], float(value))
    checked = 0
    for row in table["rows"]:
        n = Node.parse(row["node"])
        if n.kind not in ("neuron", "head") or n.layer >= 23:
            continue
        i = (0, n.index, n.pos, n.key_pos) if n.kind == "head" else (0, n.pos, n.index)
        a, g = acts[n.hook_name].detach(), grads[n.hook_name]
        assert close(row["values"]["total_effect"][0], float(a[i] * g[i])), row
        checked += 1
    assert checked >= 10

    def zero_head(z, hook):
        z = z.clone()
        z[:, -1, 0] = 0
        return z

    r = client.post("/api/table", json=dict(STATE, interventions=[{"node": "L20.H0@-1"}]))
    assert r.status_code == 200, r.text
    m = LogitDiff(smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John"))
    with torch.no_grad():
        ref = m(smollm2.run_with_hooks(PROMPT, fwd_hooks=[("blocks.20.attn.hook_z", zero_head)]))
    assert close(r.json()["objective"][1], float(ref[0]))


def test_smollm2_explains_with_the_local_explainer(smollm2, tmp_path, monkeypatch):
    """``tdb-lens debug --explainer local``: SmolLM2 writes the explanation, the likelihood simulator
    on SmolLM2 scores it, and both are stored (what the store reads back equals the answer)."""
    from fastapi.testclient import TestClient

    import tdb_lens.loading
    from tdb_lens.debugger.cli import build, parser
    from tdb_lens.explain import ExplanationStore, build_corpus, harvest
    from test_debugger_support import TEXTS

    corpus = build_corpus(smollm2, TEXTS, ctx_len=16, n_windows=10, seed=0)
    harvest(smollm2, corpus, "blocks.3.mlp.hook_post", tmp_path / "h" / "l3", units=[1], k=5, n_sample=2, n_random=5,
            n_quantiles=2, batch_size=10, progress=False)
    monkeypatch.setattr(tdb_lens.loading, "load", lambda name: smollm2)
    app, _ = build(parser().parse_args(["--explainer", "local", "--db", str(tmp_path / "s.db"),
                                        "--harvest-dir", str(tmp_path / "h")]))
    r = TestClient(app).post("/api/explain", json=dict(STATE, node="L3.N1@2"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["explainer"] == "llm:local:smollm2-135m" and out["scorer"] == "likelihood:smollm2-135m"
    assert out["text"] and out["text"] != "(no explanation)"
    assert -1.0 <= out["scores"]["correlation"] <= 1.0
    with ExplanationStore(tmp_path / "s.db") as store:
        row = store.explanations(ids=[out["explanation_id"]])[0]
    assert row.text == out["text"] and row.explainer == out["explainer"]
    assert close(row.scores["correlation"], out["scores"]["correlation"])
