"""The debugger's API on the tiny random GPT-2 (with an SAE): every column against the attribution
module's own results, traces and interventions against hand-written hooks, bad requests, the
access token, unit pages and search, and 8 concurrent clients against the sequential answers."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from tdb_lens.attribution import LogitDiff, Node, act_times_grad, direct_effects, trace_upstream
from tdb_lens.debugger import DebuggerError, Investigation
from tdb_lens.debugger.app import create_app, needs_token
from test_debugger_support import IOI, IOI_B, STATE, WordEmbedder, harvest_and_store, tiny_model

SITE = "blocks.0.hook_resid_post"
TOL = dict(atol=1e-5, rel_tol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tdb_lens.sae import SAE, SAEConfig

    model = tiny_model()
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=32))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
    tmp = tmp_path_factory.mktemp("dbg")
    hdir, store = harvest_and_store(model, tmp)
    inv = Investigation(model, saes=[(SITE, sae)], store=store, harvest_dirs=[hdir], embedder=WordEmbedder(),
                        resample_source=IOI_B)
    return model, inv


@pytest.fixture(scope="module")
def client(setup):
    from fastapi.testclient import TestClient

    return TestClient(create_app(setup[1]))


def close(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or math.isnan(b)
    return math.isclose(a, b, rel_tol=TOL["rel_tol"], abs_tol=TOL["atol"])


def metric(model):
    return LogitDiff(model.to_single_token(" Mary"), model.to_single_token(" John"))


def test_every_column_equals_the_attribution_module(setup, client):
    model, _ = setup
    r = client.post("/api/table", json=STATE)
    assert r.status_code == 200
    table = r.json()
    families = {row["family"] for row in table["rows"]}
    assert {"head", "neuron", "embed", "pos_embed", f"sae:{SITE}"} <= families
    check_columns(model, table, IOI, metric(model))


def check_columns(model, table: dict, prompt: str, m) -> None:
    """Every row's left values against act_times_grad / direct_effects / the cache (and, for the
    pairs' direct effects, the formula written out)."""
    ag = act_times_grad(model, prompt, m, kinds=("embed", "head", "neuron", "sae"), include_pairs=True,
                        freeze_final_scale=True)
    de = direct_effects(model, prompt, m)
    _, cache = model.run_with_cache(prompt)
    assert close(table["objective"][0], float(de.metric[0]))
    g = de.gradient[0]  # d metric / d final residual (final scale frozen)
    for row in table["rows"]:
        n, v = Node.parse(row["node"]), row["values"]
        assert close(v["total_effect"][0], float(ag.effect.get(n)[0])), row
        assert close(v["write_magnitude"][0], float(ag.write_norm.get(n)[0].detach())), row
        if n.kind == "head":  # an attention pair: pattern[q, k] (v_k W_O[h]) . gradient[q], written out here
            attn = model.blocks[n.layer].attn
            pat = cache[n.hook_name][0, n.index, n.pos, n.key_pos]
            kv = n.index // (attn.n_heads // attn.n_kv_heads)
            vk = cache[f"blocks.{n.layer}.attn.hook_v"][0, n.key_pos, kv]
            assert close(v["direct_effect"][0], float(pat * (vk @ attn.W_O[n.index].detach()) @ g[n.pos])), row
            assert close(v["activation"][0], float(pat)), row
        else:
            assert close(v["direct_effect"][0], float(de.get(n)[0])), row
            expect = None if n.kind in ("embed", "pos_embed") else float(n.select(cache[n.hook_name])[0])
            assert close(v["activation"][0], expect), row


def test_pair_direct_effects_add_up_to_each_heads(setup):
    """Summed over key positions, the pairs' direct effects are the head's (TDB's split of a head)."""
    from tdb_lens.debugger import compute_columns

    model, inv = setup
    m = metric(model)
    cols = compute_columns(model, model.to_tokens(IOI), lambda logits, acts: m(logits), kinds=("head",))
    pair_de = cols.families[0].values["direct_effect"][0].nan_to_num()  # [L, H, Q, K]; key > query: NaN
    de = direct_effects(model, IOI, m)
    torch.testing.assert_close(pair_de.sum(-1).permute(0, 2, 1), de.head[0], atol=1e-5, rtol=1e-5)


def manual_trace(model, target: Node, through: str, names):
    """act x grad of the target's value w.r.t. each name, gradient only through ``through``, and the
    gradient at the residual stream the head reads (hand-written hooks)."""
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x
        return x

    def detach(x, hook):
        return x.detach()

    read = f"blocks.{target.layer}.hook_resid_pre"
    others = [(f"blocks.{target.layer}.attn.hook_{s}", detach) for s in "qkv" if s != through]
    hooks = [(n, keep) for n in [*names, target.hook_name, read]] + others
    with torch.enable_grad():
        model.run_with_hooks(model.to_tokens(IOI), fwd_hooks=hooks)
        value = acts[target.hook_name][0, target.index, target.pos, target.key_pos]
        grads = torch.autograd.grad(value, [acts[n] for n in names] + [acts[read]], allow_unused=True)
    return {n: (acts[n].detach(), g) for n, g in zip([*names, read], grads)}


def test_trace_through_query_equals_manual_hooks(setup, client):
    model, _ = setup
    target = Node.head(1, 2, 14, 3)
    r = client.post("/api/table", json=dict(STATE, trace={"node": str(target), "through": "q"}))
    assert r.status_code == 200, r.text
    table = r.json()
    names = ["blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post", "hook_embed"]
    ref = manual_trace(model, target, "q", names)
    g_read = ref["blocks.1.hook_resid_pre"][1][0]
    lib = trace_upstream(model, IOI, target).sides["q"]  # the attribution module's split, another reference
    checked = 0
    for row in table["rows"]:
        n, v = Node.parse(row["node"]), row["values"]
        if n.kind == "neuron" and n.layer == 0:
            act, grad = ref["blocks.0.mlp.hook_post"]
            assert close(v["total_effect"][0], float(act[0, n.pos, n.index] * grad[0, n.pos, n.index]))
            assert close(v["total_effect"][0], float(lib.get(n)[0]))
            W_out = model.blocks[0].mlp.W_out[n.index].detach()
            assert close(v["direct_effect"][0], float(act[0, n.pos, n.index] * (W_out @ g_read[n.pos])))
            checked += 1
        elif n.kind == "head" and n.layer == 0:
            act, grad = ref["blocks.0.attn.hook_pattern"]
            i = (0, n.index, n.pos, n.key_pos)
            assert close(v["total_effect"][0], float(act[i] * grad[i]))
            checked += 1
        elif n.kind in ("neuron", "head"):  # layer 1 writes after the traced head reads: no direct effect
            assert v["direct_effect"][0] == 0.0
    assert checked >= 5
    assert close(table["objective"][0], manual_value(model, target))


def manual_value(model, target: Node) -> float:
    _, cache = model.run_with_cache(IOI)
    return float(cache[target.hook_name][0, target.index, target.pos, target.key_pos])


def run_metric(model, tokens, hooks) -> float:
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return float(metric(model)(logits)[0])


@pytest.mark.parametrize("method", ["zero", "mean", "resample", "clamp"])
def test_interventions_equal_manual_hooks(setup, client, method):
    model, _ = setup
    tokens = model.to_tokens(IOI)
    _, cache = model.run_with_cache(tokens)
    _, cache_b = model.run_with_cache(model.to_tokens(IOI_B))
    post = cache["blocks.0.mlp.hook_post"]
    value = {"zero": 0.0, "mean": float(post[0, :, 7].mean()), "resample": float(cache_b["blocks.0.mlp.hook_post"][0, -1, 7]),
             "clamp": 2.5}[method]

    def hand_written(x, hook):
        x = x.clone()
        x[:, -1, 7] = value
        return x

    iv = {"node": "L0.N7@-1", "method": method, "value": 2.5 if method == "clamp" else None}
    r = client.post("/api/table", json=dict(STATE, interventions=[iv]))
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["compare"] == "interventions"
    assert close(t["objective"][0], run_metric(model, tokens, []))
    assert close(t["objective"][1], run_metric(model, tokens, [("blocks.0.mlp.hook_post", hand_written)]))
    logits = client.post("/api/logits", json=dict(STATE, interventions=[iv])).json()
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", hand_written)])[0, -1]
    for tok_id, lg in zip(logits["token_ids"], logits["logits"]):
        assert close(lg[1], float(ref[tok_id]))


def test_ablating_a_head_changes_the_diff_column(setup, client):
    model, _ = setup
    t0 = client.post("/api/table", json=STATE).json()
    top = next(r for r in t0["rows"] if r["family"] == "head")
    t1 = client.post("/api/table", json=dict(STATE, interventions=[{"node": top["node"]}])).json()
    row = next(r for r in t1["rows"] if r["node"] == top["node"])
    assert row["values"]["activation"][1] == 0.0  # its own pattern entry is zero on the right
    assert row["values"]["activation"][0] == pytest.approx(top["values"]["activation"][0], abs=1e-6)


def test_two_prompts_equal_two_single_requests(client):
    both = client.post("/api/table", json=dict(STATE, other_prompt=IOI_B)).json()
    left = client.post("/api/table", json=STATE).json()
    right = client.post("/api/table", json=dict(STATE, prompt=IOI_B)).json()
    assert both["compare"] == "prompts"
    assert close(both["objective"][0], left["objective"][0]) and close(both["objective"][1], right["objective"][0])
    r_rows = {r["node"]: r for r in right["rows"]}
    common = [r for r in both["rows"] if r["node"] in r_rows]
    assert common
    for r in common:
        for c, v in r["values"].items():
            assert close(v[1], r_rows[r["node"]]["values"][c][0]), (r["node"], c)


@pytest.mark.parametrize("change, reason", [
    ({"interventions": [{"node": "L7.H2@-1"}]}, "unknown node L7.H2@-1"),
    ({"interventions": [{"node": "L0.N999@-1"}]}, "unknown node L0.N999@-1"),
    ({"interventions": [{"node": "L0.X@-1"}]}, "cannot parse node"),
    ({"interventions": [{"node": "L0.N1@-1", "method": "boil"}]}, "unknown intervention method"),
    ({"other_prompt": "Hello there"}, "same number of tokens"),
    ({"target": " Maryland Avenue"}, "is not a single token"),
    ({"prompt": "word " * 600}, "at most 500"),
    ({"trace": {"node": "L1.H2@14>3", "through": "x"}}, "through must be one of"),
    ({"trace": {"node": "L1.N3", "through": None}}, "needs a node at a position"),
])
def test_bad_requests_get_a_400_with_one_line(client, change, reason):
    r = client.post("/api/table", json=dict(STATE, **change))
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert reason in detail and "\n" not in detail


def test_bad_state_leaves_the_investigation_as_it_was(setup):
    _, inv = setup
    inv.load_state(STATE)
    before = inv.state()
    with pytest.raises(DebuggerError, match="unknown node"):
        inv.load_state(dict(STATE, prompt=IOI_B, interventions=[{"node": "L9.N1@0"}]))
    assert inv.state() == before
    with pytest.raises(DebuggerError):
        inv.ablate("L0.N9999@0")
    assert inv.state() == before


def test_no_file_paths_and_token_off_loopback(setup):
    from fastapi.testclient import TestClient

    plain = TestClient(create_app(setup[1]))
    assert plain.get("/").status_code == 200 and "node" in plain.get("/").text
    assert plain.get("/static/app.js").status_code == 200
    assert plain.get("/static/..%2F__init__.py").status_code == 404
    assert plain.get("/static/columns.py").status_code == 404
    assert needs_token("0.0.0.0") and needs_token("192.168.1.4") and not needs_token("127.0.0.1")
    guarded = TestClient(create_app(setup[1], token="s3cret"))
    assert guarded.get("/api/info").status_code == 403
    assert guarded.get("/api/info?token=wrong").status_code == 403
    assert guarded.get("/api/info", headers={"X-TDB-Token": "s3cret"}).status_code == 200
    assert guarded.get("/?token=s3cret").status_code == 200  # sets the cookie ...
    assert guarded.get("/api/info").status_code == 200  # ... which later requests carry


def test_unit_page_reads_harvest_store_and_prompt(setup, client):
    model, inv = setup
    r = client.post("/api/unit", json=dict(STATE, node="L0.N2@5"))
    assert r.status_code == 200, r.text
    u = r.json()
    assert u["label"] == "L0.N2"
    assert [e["text"] for e in u["explanations"]] == ["cities in Europe"]
    from tdb_lens.explain import load_harvest

    rec = load_harvest(inv.harvest_dirs[0] / "l0-post").record(2)
    assert u["top_examples"][0]["acts"] == pytest.approx(rec.top_acts[0].tolist())
    _, cache = model.run_with_cache(IOI)
    assert u["activations"]["values"] == pytest.approx(cache["blocks.0.mlp.hook_post"][0, :, 2].tolist(), abs=1e-6)
    d = model.blocks[0].mlp.W_out[2] * model.ln_final.weight
    best = int((d @ model.W_U).argmax())
    assert u["logit_lens"]["up"][0][0] == model.tokenizer.id_to_token(best)


def test_search_returns_the_store_search(setup, client):
    from tdb_lens.explain import search

    _, inv = setup
    r = client.post("/api/search", json={"query": "cities", "k": 2})
    assert r.status_code == 200
    hits = r.json()["hits"]
    ref = search(inv.store.current(), "cities", k=2, embedder=WordEmbedder())  # the app made it per-thread
    assert [h["label"] for h in hits] == [h.label for h in ref]
    assert hits[0]["label"] == "L0.N2"
    assert client.post("/api/search", json={"query": ""}).status_code == 422


def mixed_requests():
    ivs = [[], [{"node": "L0.N7@-1"}], [{"node": "L1.H2@14>3"}, {"node": "L0.N3@-1", "method": "mean"}]]
    reqs = []
    for i in range(25):
        iv = ivs[i % 3]
        kind = i % 5
        if kind == 0:
            reqs.append(("/api/table", dict(STATE, interventions=iv)))
        elif kind == 1:
            reqs.append(("/api/table", dict(STATE, trace={"node": "L1.H2@14>3", "through": "qkv"[i % 3]})))
        elif kind == 2:
            reqs.append(("/api/logits", dict(STATE, prompt=[IOI, IOI_B][i % 2], interventions=iv)))
        elif kind == 3:
            reqs.append(("/api/unit", dict(STATE, node=f"L0.N{i % 8}@3")))
        else:
            reqs.append(("/api/attention", dict(STATE, layer=i % 2, head=i % 4)))
    return reqs


def test_eight_concurrent_clients_get_the_sequential_answers(setup):
    """8 clients x 25 mixed requests against uvicorn on 127.0.0.1 (port 0): no server error and every
    response byte-equal to the same request made alone."""
    import httpx
    import uvicorn

    app = create_app(setup[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        for _ in range(600):
            if server.started:
                break
            threading.Event().wait(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        reqs = mixed_requests()
        with httpx.Client(base_url=base, timeout=300) as c:
            sequential = [c.post(p, json=b).content for p, b in reqs]
        results: dict[int, list] = {}

        def client(i):
            order = reqs[i % 5:] + reqs[:i % 5]  # each client its own order
            with httpx.Client(base_url=base, timeout=300) as c:
                results[i] = [(reqs.index((p, b)), c.post(p, json=b)) for p, b in order]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 8
        for i, got in results.items():
            assert len(got) == 25
            for j, resp in got:
                assert resp.status_code == 200, resp.text
                assert resp.content == sequential[j], (i, reqs[j][0])
    finally:
        server.should_exit = True
        th.join(timeout=30)


def test_debug_command_binds_loopback_and_needs_a_token_elsewhere(monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    import tdb_lens.loading
    from tdb_lens.cli import SUBCOMMANDS
    from tdb_lens.debugger.cli import build, parser

    assert SUBCOMMANDS["debug"][0] == "tdb_lens.debugger.cli"
    monkeypatch.setattr(tdb_lens.loading, "load", lambda name: tiny_model())
    args = parser().parse_args([])
    assert args.host == "127.0.0.1" and args.model == "smollm2-135m"
    app, token = build(args)
    assert token is None and TestClient(app).get("/api/info").status_code == 200
    app, token = build(parser().parse_args(["--host", "0.0.0.0", "--db", str(tmp_path / "s.db")]))
    assert token and len(token) >= 24
    c = TestClient(app)
    assert c.get("/api/info").status_code == 403
    assert c.get(f"/api/info?token={token}").json()["store"] is True


def test_explain_action_stores_the_baseline_explanation(setup, client):
    from tdb_lens.explain import TopTokensExplainer, load_harvest

    model, inv = setup
    r = client.post("/api/explain", json=dict(STATE, node="L0.N5@2"))
    assert r.status_code == 200, r.text
    rec = load_harvest(inv.harvest_dirs[0] / "l0-post").record(5)
    assert r.json()["text"] == TopTokensExplainer(model.tokenizer).explain(rec).text
    page = client.post("/api/unit", json=dict(STATE, node="L0.N5")).json()
    assert r.json()["text"] in [e["text"] for e in page["explanations"]]
    assert client.post("/api/explain", json=dict(STATE, node="L1.N5@2")).status_code == 400  # not harvested


def test_background_server_for_notebooks(setup):
    import httpx

    from tdb_lens.debugger.app import BackgroundServer

    srv = BackgroundServer(setup[1])
    try:
        assert srv.url.startswith("http://127.0.0.1:") and srv.token is None
        assert httpx.get(srv.url + "api/info", timeout=60).json()["n_layers"] == 2
        assert f"src='{srv.url}'" in srv._repr_html_()
    finally:
        srv.stop()
