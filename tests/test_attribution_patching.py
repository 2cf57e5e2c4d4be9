import pytest
import torch

from _attribution_models import FAMILIES, make_model, tokens
from tdb_lens.attribution.activation_patching import activation_patch
from tdb_lens.attribution.attribution_patching import attribution_patch
from tdb_lens.attribution.metrics import CallableMetric, LogitDiff
from tdb_lens.attribution.nodes import Node
from tdb_lens.attribution.patching import patch_attn_out, patch_heads, patch_mlp_out, patch_neurons, patch_resid


@pytest.fixture(params=FAMILIES)
def model(request):
    return make_model(request.param)


def _pair():
    return tokens(3, 7, seed=1), tokens(3, 7, seed=2)


MET = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([[4, 5], [6, 7], [8, 9]]))
NODES = ([Node.head(l, h, p) for l in range(2) for h in range(4) for p in range(0, 7, 2)]
         + [Node.head(l, h) for l in range(2) for h in range(4)]
         + [Node.resid(l, p) for l in range(2) for p in range(7)]
         + ["L1.N5@3", "L1.H2@5>3", "L1.H1.q", "L1.H1.k@4", "L0.H1.v@6", "E@2", "L0.MLP@-1", "L1.R.post@2",
            "L1.H3.pattern@6", "L0.ATTN@4", "L1.R.mid"])


def _by_hand(model, clean, corr, metric, node, clean_mask=None, corr_mask=None):
    node = Node.parse(node) if isinstance(node, str) else node
    _, cc = model.run_with_cache(clean, attention_mask=clean_mask)

    def h(x, hook):
        x = x.clone()
        x[node.act_index()] = cc[node.hook_name][node.act_index()]
        return x

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corr, attention_mask=corr_mask, fwd_hooks=[(node.hook_name, h)])).mean())


def test_batched_patching_equals_one_patch_at_a_time(model):
    clean, corr = _pair()
    got = activation_patch(model, clean, corr, MET, NODES, normalise=False, progress=False, batch_rows=12)
    full = activation_patch(model, clean, corr, MET, NODES, normalise=False, progress=False, fast=False, batch_rows=12)
    assert torch.allclose(got, full, atol=1e-5)
    for i in (0, 5, len(NODES) - 9, len(NODES) - 1, len(NODES) - 4):
        assert abs(float(got[i]) - _by_hand(model, clean, corr, MET, NODES[i])) < 1e-5


def test_padded_batch_and_callable_metric(model):
    clean, corr = _pair()
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    met = LogitDiff(torch.tensor([1, 2, 3]), 4, pos=mask.sum(-1) - 1)
    got = activation_patch(model, clean, corr, met, NODES, normalise=False, progress=False, clean_mask=mask,
                           corrupted_mask=mask)
    for i in (1, 9, len(NODES) - 2):
        assert abs(float(got[i]) - _by_hand(model, clean, corr, met, NODES[i], mask, mask)) < 1e-5
    cm = CallableMetric(lambda lg: lg[:, -1, 3] - lg[:, 2, 4])  # reads two positions
    a = activation_patch(model, clean, corr, cm, NODES, normalise=False, progress=False)
    b = activation_patch(model, clean, corr, cm, NODES, normalise=False, progress=False, fast=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_patching_clean_into_clean_changes_nothing(model):
    clean, _ = _pair()
    base = float(MET(model(clean)).mean().detach())
    for method in (activation_patch, attribution_patch):
        extra = {"progress": False} if method is activation_patch else {}
        out = method(model, clean, clean, MET, NODES, normalise=False, **extra)
        assert torch.allclose(out, torch.full_like(out, base), atol=1e-5)


def test_normalisation_endpoints(model):
    clean, corr = _pair()
    L = model.cfg.n_layers
    # patching the whole final residual at every position gives the clean run exactly
    out = activation_patch(model, clean, corr, MET, [Node.resid(L - 1, site="post"), Node.embed()], progress=False)
    assert abs(float(out[0]) - 1) < 1e-5
    res = patch_resid(model, clean, corr, MET, progress=False)
    assert res.values.shape == (L, 7)
    # patching resid_pre of layer 0 at every position = clean run: the row sums are not 1, but the
    # last position of the last layer's resid_pre carries everything the metric reads except layer L-1
    assert res.nodes[1, 3] == Node.resid(1, 3)


def _fixed_scale(model):
    c = 0.7
    return [("ln_final.hook_scale", lambda s, hook: torch.full_like(s, c))]


def test_attribution_equals_activation_where_linear(model):
    """With the final norm's scale fixed the metric is linear in the final residual, in the last
    layer's MLP output and in its neurons: attribution patching is then exact."""
    clean, corr = _pair()
    L = model.cfg.n_layers
    nodes = ([Node.resid(L - 1, p, "post") for p in range(7)] + [Node.mlp_out(L - 1, p) for p in range(7)]
             + [Node.neuron(L - 1, n, 6) for n in range(0, 100, 7)] + [Node.mlp_out(L - 1)])
    for name, fn in _fixed_scale(model):
        model.add_perma_hook(name, fn)
    try:
        act = activation_patch(model, clean, corr, MET, nodes, progress=False)
        att = attribution_patch(model, clean, corr, MET, nodes)
    finally:
        model.reset_hooks(including_permanent=True)
    assert torch.allclose(act, att, atol=1e-4)


def test_sweeps_shapes_and_labels(model):
    clean, corr = _pair()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for method in ("activation", "attribution"):
        h = patch_heads(model, clean, corr, MET, method=method, progress=False)
        assert h.values.shape == (L, H) and h.nodes[1, 2] == Node.head(1, 2)
        hp = patch_heads(model, clean, corr, MET, by_pos=True, method=method, progress=False)
        assert hp.values.shape == (L, H, 7)
        for site in ("q", "k", "v", "pattern"):
            s = patch_heads(model, clean, corr, MET, site=site, method=method, progress=False)
            Hs = getattr(model.cfg, "n_key_value_heads", H) if site in ("k", "v") else H
            assert s.values.shape == (L, Hs)
        assert patch_attn_out(model, clean, corr, MET, method=method, progress=False).values.shape == (L, 7)
        assert patch_mlp_out(model, clean, corr, MET, method=method, progress=False).values.shape == (L, 7)
        n = patch_neurons(model, clean, corr, MET, layers=[1], neurons=range(10), pos=-1, method=method, progress=False)
        assert n.values.shape == (1, 10)
    fig = h.plot()
    assert fig is not None
    assert "<table" in hp.to_html()


def test_bad_inputs(model):
    clean, corr = _pair()
    with pytest.raises(ValueError):
        activation_patch(model, clean, corr[:, :5], MET, NODES[:2], progress=False)
    with pytest.raises(KeyError):
        activation_patch(model, clean, corr, MET, ["blocks.0.hook_resid_pre:F1@2"], progress=False)
    with pytest.raises(ValueError):
        activation_patch(model, clean, corr, MET, [Node.resid(0, 9)], progress=False)
