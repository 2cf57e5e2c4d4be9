import pytest
import torch

from _attribution_models import FAMILIES, make_model, tokens
from tdb_lens.attribution.direct_effects import direct_effects, logit_lens
from tdb_lens.attribution.metrics import Logit, LogitDiff, LogProb
from tdb_lens.attribution.nodes import Node


@pytest.fixture(params=FAMILIES)
def model(request):
    return make_model(request.param)


def test_direct_effects_sum_to_metric(model):
    toks = tokens()
    met = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([[4, 5], [6, 7], [8, 9]]))
    de = direct_effects(model, toks, met)
    want = met(model(toks)).detach()
    assert torch.allclose(de.metric, want, atol=1e-5)
    assert torch.allclose(de.total(), want, atol=1e-4)
    # layer outputs decompose into heads + bias and neurons + bias
    assert torch.allclose(de.attn, de.head.sum(-1) + de.attn_bias, atol=1e-5)
    assert torch.allclose(de.mlp, de.neuron.sum(-1) + de.mlp_bias, atol=1e-5)
    # the frozen-scale logit lens of the final residual is the metric minus the constant
    assert torch.allclose(de.resid[:, -1].sum(-1) + de.constant, want, atol=1e-4)
    assert torch.allclose(de.by_position().values.sum() + de.constant.mean(), want.mean(), atol=1e-4)


def test_direct_logit_attribution_matches_cache_logit_attrs(model):
    """Independent reference: ActivationCache.stack_head_results + logit_attrs (frozen final scale)."""
    toks = tokens(batch=2)
    _, cache = model.run_with_cache(toks)
    stack = cache.stack_head_results(pos_slice=-1)  # [L*H, b, d] (an integer pos_slice drops the axis)
    ref = cache.logit_attrs(stack, torch.tensor([5, 6]), torch.tensor([7, 8]), pos_slice=-1)  # [L*H, b]
    de = direct_effects(model, toks, LogitDiff(torch.tensor([5, 6]), torch.tensor([7, 8])))
    ours = de.head[:, :, -1, :].permute(1, 2, 0).reshape(-1, 2)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_direct_effect_lookup_by_node(model):
    toks = tokens(batch=2)
    de = direct_effects(model, toks, Logit(3))
    assert torch.equal(de[Node.head(1, 2, -1)], de.head[:, 1, -1, 2])
    assert torch.allclose(de["L0.N5"], de.neuron[:, 0, :, 5].sum(-1))
    grid = de.heads_grid()
    assert grid.values.shape == (2, 4) and grid.nodes[1, 2] == Node.head(1, 2)
    top = de.top(3)
    assert len(top) == 3 and all(isinstance(n, Node) for n, _ in top)


def test_nonlinear_metric_runs_and_gradient_is_frozen_scale(model):
    toks = tokens(batch=2)
    de = direct_effects(model, toks, LogProb(4))
    assert torch.allclose(de.metric, LogProb(4)(model(toks)).detach(), atol=1e-5)
    assert torch.isfinite(de.head).all()


def test_logit_lens_last_layer_is_model_metric(model):
    toks = tokens(batch=2)
    met = Logit(3)
    lens = logit_lens(model, toks, met)
    assert lens.values.shape == (model.cfg.n_layers + 1,)
    assert abs(float(lens.values[-1]) - float(met(model(toks)).mean())) < 1e-4
    logits = logit_lens(model, toks)
    assert torch.allclose(logits[-1], model(toks), atol=1e-4)
