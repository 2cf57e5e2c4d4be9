"""Attribution with an SAE spliced in: latents and error terms are nodes like any other."""

import pytest
import torch

from _attribution_models import make_model, tokens
from tdb_lens.attribution.act_grad import act_times_grad
from tdb_lens.attribution.activation_patching import activation_patch
from tdb_lens.attribution.direct_effects import direct_effects
from tdb_lens.attribution.metrics import LogitDiff
from tdb_lens.attribution.nodes import Node
from tdb_lens.attribution.steering import steer_nodes
from tdb_lens.attribution.trace import trace_upstream

SITE = "blocks.0.hook_mlp_out"


@pytest.fixture(params=["gpt2", "llama"])
def model_sae(request):
    from tdb_lens.sae import SAE, SAEConfig, add_sae

    m = make_model(request.param)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=32))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.01)
        sae.b_dec.normal_(0, 0.01)
    add_sae(m, sae, SITE)
    return m, sae


def test_sae_direct_effects_split_the_site(model_sae):
    m, sae = model_sae
    toks = tokens()
    de = direct_effects(m, toks, LogitDiff(3, 4))
    parts = de.sae[SITE].sum(-1) + de.sae_error[SITE] + de.sae_bias[SITE]
    assert torch.allclose(parts, de.mlp[:, 0], atol=1e-5)
    assert torch.allclose(de.total(), de.metric, atol=1e-4)
    assert de[f"{SITE}:F3@2"].shape == (3,)


def test_sae_act_grad_and_trace(model_sae):
    m, sae = model_sae
    toks = tokens()
    met = LogitDiff(3, 4)
    ag = act_times_grad(m, toks, met)
    name = f"{SITE}.hook_sae_acts_post"
    _, cache = m.run_with_cache(toks, names_filter=name)
    eps = torch.zeros_like(cache[name], requires_grad=True)
    logits = m.run_with_hooks(toks, fwd_hooks=[(name, lambda x, hook: x + eps)])
    (g,) = torch.autograd.grad(met(logits).sum(), eps)
    assert torch.allclose(ag.effect.sae[SITE], cache[name] * g, atol=1e-6)
    assert ag.write_norm.sae[SITE].shape == (3, 7, 32)
    # trace a latent: only layer-0 attention and earlier reach it
    lat = int(cache[name][0, 5].argmax())
    t = trace_upstream(m, toks, Node.sae_latent(SITE, lat, 5))
    assert torch.allclose(t.value, cache[name][:, 5, lat])
    assert torch.all(t.effect.head[:, 1] == 0) and torch.any(t.effect.head[:, 0] != 0)


def test_sae_latent_patching_and_steering(model_sae):
    m, sae = model_sae
    clean, corr = tokens(seed=1), tokens(seed=2)
    met = LogitDiff(3, 4)
    nodes = [f"{SITE}:F{i}@6" for i in range(5)] + [f"{SITE}:ERR@6", f"{SITE}:ERR"]
    a = activation_patch(m, clean, corr, met, nodes, normalise=False, progress=False)
    b = activation_patch(m, clean, corr, met, nodes, normalise=False, progress=False, fast=False)
    assert torch.allclose(a, b, atol=1e-5)
    name = f"{SITE}.hook_sae_acts_post"
    with m.hooks(fwd_hooks=steer_nodes([f"{SITE}:F2"], "clamp", 3.0, positions=[1]).hooks):
        _, c = m.run_with_cache(clean, names_filter=name)
    assert torch.all(c[name][:, 1, 2] == 3.0)
