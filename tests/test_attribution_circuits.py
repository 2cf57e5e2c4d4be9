import pytest
import torch

from _attribution_models import make_model, tokens
from tdb_lens.attribution.activation_patching import activation_patch
from tdb_lens.attribution.attribution_patching import attribution_patch
from tdb_lens.attribution.circuits import edge_attribution_patching, evaluate_circuit, logits_node
from tdb_lens.attribution.metrics import LogitDiff
from tdb_lens.attribution.nodes import Node
from tdb_lens.attribution.path_patching import path_patch

FAMILIES = ["gpt2", "llama"]
MET = LogitDiff(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))


@pytest.fixture(params=FAMILIES, scope="module")
def model3(request):
    return make_model(request.param, n_layers=3)


def _pair():
    return tokens(4, 7, seed=1), tokens(4, 7, seed=2)


def _naive_path_patch(model, clean, corr, sender: Node, receivers: list[Node]):
    """Reference: one sender, two plain passes, no batching."""
    L = model.cfg.n_layers
    _, base = model.run_with_cache(corr)
    _, src = model.run_with_cache(clean)

    def freeze(x, hook):
        x = base[hook.name].clone()
        if hook.name == sender.hook_name:
            x[sender.act_index()] = src[hook.name][sender.act_index()]
        return x

    rec = {}
    hooks = [(f"blocks.{l}.attn.hook_z", freeze) for l in range(L)]
    if sender.hook_name not in [h for h, _ in hooks]:
        def send(x, hook):
            x = x.clone()
            x[sender.act_index()] = src[hook.name][sender.act_index()]
            return x
        hooks.append((sender.hook_name, send))
    hooks += [(r.hook_name, lambda x, hook: rec.__setitem__(hook.name, x)) for r in receivers]
    with torch.no_grad():
        logits = model.run_with_hooks(corr, fwd_hooks=hooks)
        if receivers:
            def put(x, hook):
                x = x.clone()
                for r in receivers:
                    if r.hook_name == hook.name:
                        x[r.act_index()] = rec[hook.name][r.act_index()]
                return x
            logits = model.run_with_hooks(corr, fwd_hooks=[(r.hook_name, put) for r in receivers])
    return float(MET(logits).mean())


def test_path_patching_matches_naive_reference(model3):
    clean, corr = _pair()
    senders = [Node.head(0, 1), Node.head(1, 2, 4), Node.mlp_out(0), Node.head(0, 3)]
    Hkv = getattr(model3.cfg, "n_key_value_heads", 4)
    receivers = [Node.head(2, 0, site="q"), Node.head(2, Hkv - 1, site="k"), Node.head(2, 1, 5, site="v")]
    got = path_patch(model3, clean, corr, MET, senders, receivers, normalise=False, progress=False, batch_rows=8)
    for i, s in enumerate(senders):
        assert abs(float(got[i]) - _naive_path_patch(model3, clean, corr, s, receivers)) < 1e-5
    got_logits = path_patch(model3, clean, corr, MET, senders, None, normalise=False, progress=False)
    for i, s in enumerate(senders):
        assert abs(float(got_logits[i]) - _naive_path_patch(model3, clean, corr, s, [])) < 1e-5


def test_path_to_logits_from_last_layer_is_activation_patching(model3):
    clean, corr = _pair()
    nodes = [Node.head(2, h) for h in range(4)] + [Node.head(2, 1, 6)]
    pp = path_patch(model3, clean, corr, MET, nodes, None, progress=False)
    ap = activation_patch(model3, clean, corr, MET, nodes, progress=False)
    assert torch.allclose(pp, ap, atol=1e-5)
    same = path_patch(model3, clean, clean, MET, nodes, [Node.head(2, 0, site="q")], normalise=False, progress=False)
    assert torch.allclose(same, torch.full_like(same, float(MET(model3(clean)).mean().detach())), atol=1e-5)
    with pytest.raises(ValueError):
        path_patch(model3, clean, corr, MET, nodes, ["L2.MLP"], progress=False)


def test_eap_scores_to_logits_sum_to_attribution_patching_of_final_resid(model3):
    clean, corr = _pair()
    es = edge_attribution_patching(model3, clean, corr, MET)
    j = es.receivers.index(logits_node(model3))
    total = es.scores.values[:, j].sum()
    ap = attribution_patch(model3, clean, corr, MET, [logits_node(model3)])
    assert abs(float(total) - float(ap[0])) < 1e-4
    # an MLP's input edges sum to attribution patching through that MLP's input
    assert not es.valid[es.senders.index(Node.head(2, 0)), es.receivers.index(Node.head(1, 0, site="q"))]
    assert es.valid[es.senders.index(Node.head(1, 0)), es.receivers.index(Node.mlp_out(1))]
    assert len(es.top(5)) == 5
    # split q/k/v mode is restored
    assert not any(b.attn.use_split_qkv_input for b in model3.blocks)


def test_eap_head_to_logits_is_its_direct_attribution_patch(model3):
    clean, corr = _pair()
    es = edge_attribution_patching(model3, clean, corr, MET, include_mlps=False)
    # reference: d metric / d final resid (corrupted) . delta of the head's write
    _, cc = model3.run_with_cache(clean)
    _, xc = model3.run_with_cache(corr)
    L = model3.cfg.n_layers
    x = xc[f"blocks.{L - 1}.hook_resid_post"].clone().requires_grad_(True)
    logits = model3.run_with_hooks(corr, fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", lambda a, hook: x)])
    (g,) = torch.autograd.grad(MET(logits).mean(), x)
    dz = cc["blocks.1.attn.hook_z"][:, :, 2] - xc["blocks.1.attn.hook_z"][:, :, 2]
    with torch.no_grad():
        gap = float(MET(model3(clean)).mean()) - float(MET(model3(corr)).mean())
        want = float((dz @ model3.blocks[1].attn.W_O[2] * g).sum()) / gap
    assert abs(es.get("L1.H2", logits_node(model3)) - want) < 1e-4


def test_circuit_evaluation_identities(model3):
    toks, ref = tokens(4, 7), tokens(8, 7, seed=5)
    L, H = model3.cfg.n_layers, model3.cfg.n_heads
    all_heads = [Node.head(l, h) for l in range(L) for h in range(H)]
    full = evaluate_circuit(model3, toks, MET, nodes=all_heads, reference=ref)
    assert abs(full.faithfulness - 1) < 1e-5
    empty_nodes = evaluate_circuit(model3, toks, MET, nodes=[], reference=ref)
    empty_edges = evaluate_circuit(model3, toks, MET, edges=[], reference=ref)
    assert abs(empty_nodes.circuit_metric - empty_nodes.ablated_metric) < 1e-6
    assert abs(empty_edges.circuit_metric - empty_nodes.circuit_metric) < 1e-5
    # a node circuit equals the edge circuit of all edges among its heads (and to the logits)
    S = [Node.parse(s) for s in ("L0.H1", "L1.H2", "L2.H0", "L2.H3")]
    Hkv = getattr(model3.cfg, "n_key_value_heads", H)
    edges = []
    for a in S:
        edges.append((a, logits_node(model3)))
        for b in S:
            if a.layer < b.layer:
                edges += [(a, Node.head(b.layer, b.index if s == "q" else b.index // (H // Hkv), site=s)) for s in "qkv"]
    rn = evaluate_circuit(model3, toks, MET, nodes=S, reference=ref)
    re_ = evaluate_circuit(model3, toks, MET, edges=edges, reference=ref)
    assert abs(rn.circuit_metric - re_.circuit_metric) < 1e-5
    # all edges = the model
    every = [(a, logits_node(model3)) for a in all_heads] + [
        (a, Node.head(l, h, site=s)) for a in all_heads for l in range(a.layer + 1, L) for s in "qkv"
        for h in range(H if s == "q" else Hkv)]
    assert abs(evaluate_circuit(model3, toks, MET, edges=every, reference=ref).faithfulness - 1) < 1e-5


def _keep_or_mean(keep, means):
    return lambda x, hook: torch.where(keep[None, ..., None], x, means)


def test_circuit_per_group_means_and_positions(model3):
    toks, ref = tokens(4, 7), tokens(8, 7, seed=5)
    groups, target = [0, 1] * 4, [1, 1, 0, 0]
    nodes = ["L0.H1@3", "L2.H2", "L1.MLP"]
    r = evaluate_circuit(model3, toks, MET, nodes=nodes, reference=ref, groups=groups, target_groups=target,
                         scope=("head", "mlp"))
    # reference: hand-built per-group means and torch.where hooks
    _, rc = model3.run_with_cache(ref)
    g = torch.tensor(groups)
    tg = torch.tensor(target)
    hooks = []
    for l in range(3):
        for name in (f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out"):
            a = rc[name]
            means = torch.stack([a[g == k].mean(0) for k in (0, 1)])[tg]
            keep = torch.zeros(a.shape[1:-1], dtype=torch.bool)
            if name == "blocks.0.attn.hook_z":
                keep[3, 1] = True
            if name == "blocks.2.attn.hook_z":
                keep[:, 2] = True
            if name == "blocks.1.hook_mlp_out":
                keep[:] = True
            hooks.append((name, _keep_or_mean(keep, means)))
    want = float(MET(model3.run_with_hooks(toks, fwd_hooks=hooks)).mean())
    assert abs(r.circuit_metric - want) < 1e-5
    with pytest.raises(ValueError):
        evaluate_circuit(model3, toks, MET, nodes=["L1.MLP"], reference=ref)  # MLP outside scope ("head",)
