"""Splicing SAEs into a small random GPT-2: the error term leaves the model unchanged, latent edits
flow downstream by exactly activation x decoder row, hooks on the host point still fire, detaching
restores the model bit for bit, and bad attaches change nothing."""

from __future__ import annotations

import pytest
import torch

from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2
from tdb_lens.sae import SAE, SAEConfig, add_sae, attached_saes, remove_sae, reset_saes, saes

HOOK = "blocks.0.hook_resid_post"
LATENTS = HOOK + ".hook_sae_acts_post"


@pytest.fixture(scope="module")
def model():
    m = HookedGPT2.from_config(GPT2Config(n_layers=2, n_heads=4, d_model=32, d_mlp=64, d_vocab=97, n_ctx=24), seed=1)
    m.eval()
    return m


@pytest.fixture(autouse=True)
def _clean(model):
    yield
    reset_saes(model)
    model.reset_hooks(including_permanent=True)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 97, (3, 12), generator=g)


def make_sae(arch="topk", d_in=32, d_sae=96, seed=0, **kw) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=8 if arch == "topk" else None, **kw))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0)
        sae.b_enc.normal_(0, 0.01)
        sae.W_dec.normal_(0, 0.05)
    return sae


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_error_term_leaves_logits_unchanged(model, tokens, arch):
    ref = model(tokens)
    ref_cached, _ = model.run_with_cache(tokens)  # hooks everywhere switch some kernels: compare like with like
    add_sae(model, make_sae(arch), HOOK)
    assert torch.equal(model(tokens), ref)  # bit for bit: the output is evaluated as x + (recons - clean recons)
    out, cache = model.run_with_cache(tokens)
    assert torch.equal(out, ref_cached)
    assert cache[LATENTS].shape == (3, 12, 96)
    torch.testing.assert_close(cache[HOOK + ".hook_sae_recons"] + cache[HOOK + ".hook_sae_error"],
                               cache[HOOK + ".hook_sae_input"], atol=1e-6, rtol=0)
    assert (cache[LATENTS] != 0).any()


def test_without_error_term_the_reconstruction_flows_on(model, tokens):
    sae = make_sae()
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK, "blocks.1.hook_resid_pre"])
    expected_next = sae.reconstruct(cache[HOOK])
    add_sae(model, sae, HOOK, use_error_term=False)
    _, cache2 = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(cache2["blocks.1.hook_resid_pre"], expected_next)


def test_ablating_one_latent_moves_the_residual_by_its_decoder_row(model, tokens):
    sae = make_sae()
    add_sae(model, sae, HOOK)
    _, cache = model.run_with_cache(tokens, names_filter=[LATENTS, "blocks.1.hook_resid_pre"])
    acts = cache[LATENTS]
    i = int((acts != 0).sum((0, 1)).argmax())

    def ablate(a, hook):
        a[..., i] = 0.0
        return a

    with model.hooks(fwd_hooks=[(LATENTS, ablate)]):
        _, cache2 = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    delta = cache2["blocks.1.hook_resid_pre"] - cache["blocks.1.hook_resid_pre"]
    expected = -acts[..., i:i + 1] * sae.W_dec[i].detach()
    assert (delta - expected).abs().max() < 1e-6
    assert expected.abs().max() > 1e-3  # the test is not vacuous


def test_latent_edit_via_run_with_hooks_changes_logits(model, tokens):
    add_sae(model, make_sae(), HOOK)
    ref = model(tokens)
    out = model.run_with_hooks(tokens, fwd_hooks=[(LATENTS, lambda a, hook: a * 3)])
    assert (out - ref).abs().max() > 1e-4


def test_host_hook_point_still_fires_on_the_sae_input(model, tokens):
    sae = make_sae()
    add_sae(model, sae, HOOK)
    bump = torch.randn(32)
    seen = {}

    def edit(a, hook):
        seen["name"] = hook.name
        return a + bump

    _, clean = model.run_with_cache(tokens, names_filter=[HOOK])
    with model.hooks(fwd_hooks=[(HOOK, edit)]):
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK + ".hook_sae_input"])
    assert seen["name"] == HOOK
    torch.testing.assert_close(cache[HOOK + ".hook_sae_input"], clean[HOOK] + bump)


def test_detaching_restores_the_model_exactly(model, tokens):
    ref = model(tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(model.hook_dict)
    sae = make_sae()
    model.add_sae(sae, HOOK)
    assert set(model.state_dict()) == set(state)  # the SAE is not a submodule
    assert model.attached_saes == {HOOK: sae}
    model.reset_saes()
    assert list(model.hook_dict) == names
    assert model.attached_saes == {}
    sd = model.state_dict()
    assert set(sd) == set(state) and all(torch.equal(sd[k], state[k]) for k in state)
    assert torch.equal(model(tokens), ref)
    # the SAE's hook points have their local names again
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"


def test_remove_by_name_and_by_object(model):
    a, b = make_sae(seed=1), make_sae(seed=2)
    add_sae(model, a, HOOK)
    add_sae(model, b, "blocks.1.hook_resid_pre")
    remove_sae(model, HOOK)
    assert list(attached_saes(model)) == ["blocks.1.hook_resid_pre"]
    remove_sae(model, b)
    assert attached_saes(model) == {}
    with pytest.raises(KeyError, match="no SAE attached"):
        remove_sae(model, HOOK)


def test_unknown_hook_name_suggests_close_matches(model):
    names = list(model.hook_dict)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        add_sae(model, make_sae(), "blocks.0.hook_resid_pots")
    assert list(model.hook_dict) == names


def test_width_mismatch_at_attach(model):
    names = list(model.hook_dict)
    with pytest.raises(ValueError, match="d_in=16"):
        add_sae(model, make_sae(d_in=16), HOOK)
    assert list(model.hook_dict) == names and attached_saes(model) == {}
    assert model.hook_dict[HOOK].splice is None


def test_width_mismatch_on_a_hook_of_unknown_width_fails_at_first_run(model, tokens):
    add_sae(model, make_sae(d_in=32), "blocks.0.attn.hook_pattern")  # [b, head, q, k]: width not known by name
    with pytest.raises(ValueError, match="d_in=32.*blocks.0.attn.hook_pattern"):
        model(tokens)


def test_mlp_and_hook_z_saes(model, tokens):
    ref = model(tokens)
    add_sae(model, make_sae(d_in=64), "blocks.1.mlp.hook_post")
    add_sae(model, make_sae(d_in=32, reshape_activations="hook_z"), "blocks.0.attn.hook_z")
    out, cache = model.run_with_cache(tokens)
    assert (out - ref).abs().max() < 1e-6
    assert cache["blocks.0.attn.hook_z.hook_sae_acts_post"].shape == (3, 12, 96)  # heads flattened, as SAELens does


def test_double_attach_is_refused(model):
    sae = make_sae()
    add_sae(model, sae, HOOK)
    with pytest.raises(ValueError, match="already has an SAE"):
        add_sae(model, make_sae(), HOOK)
    with pytest.raises(ValueError, match="already attached"):
        add_sae(model, sae, "blocks.1.hook_resid_pre")
    assert list(attached_saes(model)) == [HOOK]


def test_hook_name_from_config(model):
    sae = make_sae(hook_name=HOOK)
    add_sae(model, sae)
    assert sae.hook_name == HOOK and HOOK in attached_saes(model)


def test_saes_context_list_and_dict(model, tokens):
    a, b = make_sae(hook_name=HOOK, seed=3), make_sae(seed=4)
    with saes(model, [a]):
        assert list(attached_saes(model)) == [HOOK]
    assert attached_saes(model) == {}
    with model.saes({"blocks.1.hook_resid_pre": b, HOOK: a}):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("acts_post"))
        assert len(cache) == 2
    assert attached_saes(model) == {}


def test_saes_context_is_all_or_nothing(model):
    good, bad = make_sae(seed=5), make_sae(d_in=7)
    with pytest.raises(ValueError):
        with saes(model, {HOOK: good, "blocks.1.hook_resid_pre": bad}):
            pass
    assert attached_saes(model) == {} and model.hook_dict[HOOK].splice is None


def test_saes_context_detaches_on_error(model):
    with pytest.raises(RuntimeError):
        with saes(model, {HOOK: make_sae()}):
            raise RuntimeError("boom")
    assert attached_saes(model) == {}


def test_run_with_saes_replaces_activation(model, tokens):
    sae = make_sae()
    ref = model(tokens)
    out = model.run_with_saes(tokens, saes={HOOK: sae})
    assert (out - ref).abs().max() > 1e-5
    assert attached_saes(model) == {}


def test_device_mismatch_is_refused(model):
    sae = make_sae().to(torch.float64)
    add_sae(model, sae, HOOK)  # dtype differences are handled: the SAE casts
    remove_sae(model)
    meta = make_sae().to("meta")
    with pytest.raises(ValueError, match="sae.to"):
        add_sae(model, meta, HOOK)
    assert attached_saes(model) == {}


def test_float64_sae_keeps_model_dtype(model, tokens):
    ref = model(tokens)
    add_sae(model, make_sae().to(torch.float64), HOOK)
    out = model(tokens)
    assert out.dtype == ref.dtype and (out - ref).abs().max() < 1e-6
