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
