"""The SAE module: encode/decode against formulas written out independently in float64, hook points,
the error term, configuration checks and scale folding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdb_lens.sae import SAE, SAEConfig

SAE_HOOKS = ["hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output"]


def random_sae(arch="standard", d_in=12, d_sae=40, seed=0, **kw) -> SAE:
    torch.manual_seed(seed)
    k = 5 if arch == "topk" else None
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=kw.pop("k", k), **kw))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.2)
        sae.W_dec.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.5)
    return sae


def reference(sae: SAE, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Latents and reconstruction in numpy float64, from the definitions."""
    c = sae.cfg
    X = x.double().numpy()
    We, be = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    Wd, bd = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    mu, sd = np.zeros_like(X[..., :1]), np.ones_like(X[..., :1])
    if c.normalize_activations == "layer_norm":
        mu = X.mean(-1, keepdims=True)
        sd = (X - mu).std(-1, ddof=1, keepdims=True)
        X = (X - mu) / (sd + 1e-5)
    elif c.normalize_activations == "center":
        mu = X.mean(-1, keepdims=True)
        X = X - mu
    if c.apply_b_dec_to_input:
        X = X - bd
    pre = X @ We + be
    norms = np.linalg.norm(Wd, axis=-1)
    if c.rescale_acts_by_decoder_norm:
        pre = pre * norms
    if c.architecture == "standard":
        acts = np.maximum(pre, 0)
    elif c.architecture == "jumprelu":
        th = sae.threshold.detach().double().numpy()
        acts = np.where(pre > th, np.maximum(pre, 0), 0.0)
    else:
        acts = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1)[..., : c.k]
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    dec_in = acts / norms if c.rescale_acts_by_decoder_norm else acts
    recons = (dec_in @ Wd + bd) * sd + mu
    return acts, recons


CASES = [
    dict(arch="standard"), dict(arch="topk"), dict(arch="jumprelu"),
    dict(arch="topk", normalize_activations="layer_norm"), dict(arch="standard", apply_b_dec_to_input=False),
    dict(arch="topk", rescale_acts_by_decoder_norm=True), dict(arch="standard", normalize_activations="center"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_encode_decode_match_definitions(case):
    case = dict(case)
    sae = random_sae(case.pop("arch"), **case)
    x = torch.randn(3, 7, 12) * 2
    acts, recons = reference(sae, x)
    got_acts, got_recons = sae.encode_decode(x)
    np.testing.assert_allclose(got_acts.detach().numpy(), acts, atol=1e-5)
    np.testing.assert_allclose(got_recons.detach().numpy(), recons, atol=1e-5)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), acts, atol=1e-5)
    if sae.cfg.normalize_activations == "none":
        np.testing.assert_allclose(sae.decode(got_acts).detach().numpy(), recons, atol=1e-5)
    # the hooked forward without the error term is the reconstruction
    np.testing.assert_allclose(sae(x).detach().numpy(), recons, atol=1e-5)


def test_topk_keeps_at_most_k_latents():
    sae = random_sae("topk", k=5)
    acts = sae.encode(torch.randn(50, 12))
    assert int((acts != 0).sum(-1).max()) <= 5
    assert bool((acts >= 0).all())


def test_standalone_run_with_cache_has_saelens_hook_names():
    sae = random_sae("standard")
    x = torch.randn(4, 12)
    sae.use_error_term = True
    out, cache = sae.run_with_cache(x)
    assert sorted(cache.keys()) == sorted(SAE_HOOKS)
    assert cache["hook_sae_acts_post"].shape == (4, 40)
    torch.testing.assert_close(cache["hook_sae_recons"] + cache["hook_sae_error"], cache["hook_sae_output"])
    assert torch.equal(out, x)


def test_error_term_uses_clean_reconstruction_when_latents_are_edited():
    sae = random_sae("standard")
    sae.use_error_term = True
    x = torch.randn(6, 12)
    acts, recons = sae.encode_decode(x)
    i = int(acts.sum(0).argmax())

    def ablate(a, hook):
        a[..., i] = 0  # in place, as TransformerLens users often write it
        return a

    out = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", ablate)])
    expected = x - acts[:, i:i + 1] * sae.W_dec[i]
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=0)


def test_error_term_with_edited_input_uses_unedited_input():
    sae = random_sae("topk")
    sae.use_error_term = True
    x = torch.randn(5, 12)
    delta = torch.randn(12)
    out = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_input", lambda a, hook: a + delta)])
    expected = sae.reconstruct(x + delta) + (x - sae.reconstruct(x))
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=0)


def test_error_term_with_edited_pre_acts():
    sae = random_sae("jumprelu")
    sae.use_error_term = True
    x = torch.randn(5, 12)
    out = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_pre", lambda a, hook: a * 2)])
    xn = x
    pre = sae.pre_acts(xn) * 2
    expected = sae.decode(sae.activation(pre)) + (x - sae.reconstruct(x))
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=0)


def test_gradients_reach_latents_and_error_node():
    sae = random_sae("standard")
    sae.use_error_term = True
    x = torch.randn(4, 12, requires_grad=True)
    grads = {}

    def save(name):
        def fn(g, hook):
            grads[name] = g.clone()
        return fn

    with sae.hooks(bwd_hooks=[("hook_sae_acts_post", save("acts")), ("hook_sae_error", save("error"))]):
        out = sae(x)
        w = torch.randn(12)
        (out @ w).sum().backward()
    torch.testing.assert_close(grads["error"], w.expand(4, 12))
    torch.testing.assert_close(grads["acts"], (sae.W_dec @ w).expand(4, 40).detach())


def test_hook_z_reshape():
    sae = random_sae("standard", d_in=12, reshape_activations="hook_z")
    x = torch.randn(2, 3, 4, 3)  # [batch, pos, head, d_head]
    out = sae(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten(-2), sae.reconstruct(x.flatten(-2)))


def test_width_mismatch_is_a_clear_error():
    sae = random_sae("standard")
    with pytest.raises(ValueError, match="d_in=12"):
        sae(torch.randn(3, 13))


@pytest.mark.parametrize("bad", [
    dict(d_in=0, d_sae=4), dict(d_in=4, d_sae=8, architecture="gated"), dict(d_in=4, d_sae=8, architecture="topk"),
    dict(d_in=4, d_sae=8, architecture="topk", k=9), dict(d_in=4, d_sae=8, normalize_activations="whiten"),
    dict(d_in=4, d_sae=8, rescale_acts_by_decoder_norm=True), dict(d_in=4, d_sae=8, dtype="int8"),
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        SAEConfig(**bad)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_fold_input_scale_is_exact(arch):
    sae = random_sae(arch)
    x = torch.randn(20, 12)
    c = 3.7
    acts_scaled, recons_scaled = sae.encode_decode(x * c)
    folded = sae.clone()
    folded.fold_input_scale(c)
    acts, recons = folded.encode_decode(x)
    torch.testing.assert_close(acts, acts_scaled / c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recons, recons_scaled / c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.W_dec, sae.W_dec)


def test_constant_norm_rescale():
    sae = random_sae("standard", normalize_activations="constant_norm_rescale")
    x = torch.randn(5, 12) * 10
    coeff = math.sqrt(12) / x.norm(dim=-1, keepdim=True)
    acts, recons = sae.encode_decode(x)
    ref = random_sae("standard")
    ref.load_state_dict(sae.state_dict())
    a2, r2 = ref.encode_decode(x * coeff)
    torch.testing.assert_close(acts, a2)
    torch.testing.assert_close(recons, r2 / coeff)


def test_topk_forward_without_latent_hooks_decodes_sparsely_and_matches():
    sae = random_sae("topk")
    x = torch.randn(3, 7, 12)
    assert sae._sparse_decode_ok()
    fast = sae(x)
    torch.testing.assert_close(fast, sae.reconstruct(x), atol=1e-5, rtol=1e-5)
    _, cache = sae.run_with_cache(x)  # hooks on the latents: the dense path
    torch.testing.assert_close(cache["hook_sae_output"], fast, atol=1e-5, rtol=1e-5)
    sae.use_error_term = True
    assert torch.equal(sae(x), x)
    out = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_pre", lambda a, hook: a * 2)])
    expected = sae.decode(sae.activation(sae.pre_acts(x) * 2)) + (x - sae.reconstruct(x))
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=0)
    g = torch.randn(3, 7, 12)
    xg = x.clone().requires_grad_(True)
    (sae(xg) * g).sum().backward()  # gradients reach the input through the sparse decode
    assert xg.grad is not None and xg.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- architectures as classes


@pytest.mark.parametrize("arch, cls_name", [("standard", "StandardSAE"), ("topk", "TopKSAE"),
                                            ("jumprelu", "JumpReLUSAE")])
def test_sae_builds_the_architecture_class(arch, cls_name):
    import copy

    from tdb_lens.sae import architectures

    sae = random_sae(arch)
    cls = getattr(architectures, cls_name)
    assert type(sae) is cls and isinstance(sae, SAE) and cls.architecture == arch
    # a subclass built directly, a clone and a deep copy are the same class and compute the same
    direct = cls(SAEConfig.from_dict(sae.cfg.to_dict()))
    direct.load_state_dict(sae.state_dict())
    x = torch.randn(4, 12)
    for other in (direct, sae.clone(), copy.deepcopy(sae)):
        assert type(other) is cls
        torch.testing.assert_close(other.encode_decode(x)[1], sae.encode_decode(x)[1], atol=0, rtol=0)
    assert ("threshold" in dict(sae.named_parameters())) == (arch == "jumprelu")
    assert sorted(sae.state_dict()) == sorted(cls.param_names)


def test_a_class_refuses_another_architectures_config():
    from tdb_lens.sae.architectures import TopKSAE

    with pytest.raises(ValueError, match="TopKSAE needs architecture='topk'"):
        TopKSAE(SAEConfig(d_in=4, d_sae=8))


def test_topk_decodes_the_active_rows_only():
    """The sparse decode (one implementation, used by the hooked forward, training and AuxK) equals
    the dense product of the TopK latents with the decoder."""
    sae = random_sae("topk", d_sae=64)
    pre = torch.randn(2, 3, 64)
    vals, idx = pre.topk(5, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec
    torch.testing.assert_close(sae.decode_rows(idx, vals), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode_pre(pre), sae.decode_normalized(sae.activation(pre)), atol=1e-5, rtol=1e-5)


def test_dependencies_point_down():
    """Loading a model never imports the SAE package, and the SAE package never imports explain."""
    import subprocess
    import sys

    code = ("import sys, tdb_lens, tdb_lens.models, tdb_lens.models.engine; "
            "assert not [m for m in sys.modules if m.startswith('tdb_lens.sae')], 'models imported sae'; "
            "import tdb_lens.sae, tdb_lens.sae.cli, tdb_lens.sae.training, tdb_lens.sae.evaluation, "
            "tdb_lens.sae.corpus, tdb_lens.sae.loading, tdb_lens.sae.hub; "
            "bad = [m for m in sys.modules if m.startswith('tdb_lens.explain')]; assert not bad, bad; "
            "from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2; "
            "m = HookedGPT2.from_config(GPT2Config(n_layers=1, n_heads=1, d_model=4, d_mlp=8, d_vocab=10, n_ctx=4)); "
            "from tdb_lens.sae import SAE, SAEConfig; "
            "m.add_sae(SAE(SAEConfig(d_in=4, d_sae=8)), 'blocks.0.hook_resid_post'); "
            "assert list(m.attached_saes) == ['blocks.0.hook_resid_post']; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
