import pytest
import torch

from _attribution_models import FAMILIES, make_model, tokens
from tdb_lens.attribution.act_grad import act_times_grad
from tdb_lens.attribution.metrics import LogitDiff, LogProb
from tdb_lens.attribution.nodes import Node
from tdb_lens.attribution.trace import trace_upstream


@pytest.fixture(params=FAMILIES)
def model(request):
    return make_model(request.param)


def _grad_via_perturbation(model, toks, metric, hook_name):
    """Reference gradient: add a zero tensor that requires grad at the hook and differentiate."""
    _, cache = model.run_with_cache(toks, names_filter=hook_name)
    eps = torch.zeros_like(cache[hook_name], requires_grad=True)
    logits = model.run_with_hooks(toks, fwd_hooks=[(hook_name, lambda x, hook: x + eps)])
    (g,) = torch.autograd.grad(metric(logits).sum(), eps)
    return cache[hook_name], g


def test_act_grad_matches_autograd(model):
    toks = tokens()
    met = LogProb(torch.tensor([1, 2, 3]))
    ag = act_times_grad(model, toks, met, include_pairs=True)
    act, g = _grad_via_perturbation(model, toks, met, "blocks.0.mlp.hook_post")
    assert torch.allclose(ag.effect.neuron[:, 0], act * g, atol=1e-6)
    act, g = _grad_via_perturbation(model, toks, met, "blocks.0.attn.hook_z")
    assert torch.allclose(ag.effect.head[:, 0], (act * g).sum(-1), atol=1e-6)
    act, g = _grad_via_perturbation(model, toks, met, "blocks.0.attn.hook_pattern")
    assert torch.allclose(ag.effect.pair[:, 0], act * g, atol=1e-6)
    act, g = _grad_via_perturbation(model, toks, met, "blocks.1.hook_resid_pre")
    assert torch.allclose(ag.effect.resid[:, 1], (act * g).sum(-1), atol=1e-6)
    act, g = _grad_via_perturbation(model, toks, met, "hook_embed")
    assert torch.allclose(ag.effect.embed, (act * g).sum(-1), atol=1e-6)
    # no parameter gradients were left behind
    assert all(p.grad is None for p in model.parameters())


def test_write_norms(model):
    toks = tokens(batch=2)
    ag = act_times_grad(model, toks, LogitDiff(3, 4))
    _, cache = model.run_with_cache(toks)
    blk = model.blocks[1]
    z = cache["blocks.1.attn.hook_z"][:, 2, 3]
    assert torch.allclose(ag.write_norm.head[:, 1, 2, 3], (z @ blk.attn.W_O[3]).norm(dim=-1), atol=1e-5)
    post = cache["blocks.1.mlp.hook_post"][:, 4, 7]
    assert torch.allclose(ag.write_norm.neuron[:, 1, 4, 7], (post[:, None] * blk.mlp.W_out[7]).norm(dim=-1), atol=1e-5)
    assert torch.allclose(ag.write_norm.mlp[:, 0], cache["blocks.0.hook_mlp_out"].norm(dim=-1), atol=1e-5)


def test_first_order_estimate_matches_finite_difference(model):
    """act x grad of a neuron ~ metric(act) - metric(act scaled by 1 - eps), divided by eps."""
    toks = tokens(batch=2)
    met = LogitDiff(3, 4)
    ag = act_times_grad(model, toks, met)
    node = Node.neuron(0, 11, 5)
    eps = 1e-3

    def scale(x, hook):
        x = x.clone()
        x[node.act_index()] *= 1 - eps
        return x

    base = met(model(toks)).detach()
    moved = met(model.run_with_hooks(toks, fwd_hooks=[(node.hook_name, scale)])).detach()
    assert torch.allclose((base - moved) / eps, ag.effect[node], atol=1e-3, rtol=1e-2)


def test_trace_upstream_sides_sum_to_total(model):
    toks = tokens(batch=2)
    t = trace_upstream(model, toks, "L1.H2@5")
    for fam in ("head", "neuron", "embed", "attn", "mlp"):
        total = getattr(t.effect, fam)
        parts = sum(getattr(t.sides[s], fam) for s in "qkv")
        assert torch.allclose(parts, total, atol=1e-6), fam
    # upstream of layer 1 only (besides the target itself), and nothing after the target position
    other = t.effect.head[:, 1].clone()
    other[:, 5, 2] = 0
    assert torch.all(other == 0)
    assert torch.all(t.effect.neuron[:, 0, 6:] == 0)
    # the value is the head's write norm at position 5
    _, cache = model.run_with_cache(toks)
    want = (cache["blocks.1.attn.hook_z"][:, 5, 2] @ model.blocks[1].attn.W_O[2]).norm(dim=-1)
    assert torch.allclose(t.value, want, atol=1e-5)
    # pattern target: no value side
    tp = trace_upstream(model, toks, "L1.H0@5>2")
    assert torch.all(tp.sides["v"].head == 0)


def test_trace_neuron_matches_autograd(model):
    toks = tokens(batch=2)
    node = Node.neuron(1, 3, 4)
    t = trace_upstream(model, toks, node)
    _, cache = model.run_with_cache(toks, names_filter="blocks.0.mlp.hook_post")
    eps = torch.zeros_like(cache["blocks.0.mlp.hook_post"], requires_grad=True)
    acts = {}

    def grab(x, hook):
        acts["t"] = x

    model.run_with_hooks(toks, fwd_hooks=[("blocks.0.mlp.hook_post", lambda x, hook: x + eps), (node.hook_name, grab)])
    (g,) = torch.autograd.grad(node.select(acts["t"]).sum(), eps)
    assert torch.allclose(t.effect.neuron[:, 0], cache["blocks.0.mlp.hook_post"] * g, atol=1e-6)
