"""SAEs on the real SmolLM2-135M (loaded offline from its GGUF file): the error term leaves the
logits bit-identical, ablating a latent moves the residual by its activation times its decoder row,
and a sae_lens-saved SAE gives the same latents when spliced in."""

from __future__ import annotations

import warnings

import pytest
import sae_lens
import torch

import tdb_lens
from tdb_lens.sae import SAE, SAEConfig, add_sae, load_sae, reset_saes

pytestmark = pytest.mark.slow
HOOK = "blocks.15.hook_resid_post"
LATENTS = HOOK + ".hook_sae_acts_post"


@pytest.fixture(scope="module")
def model():
    m = tdb_lens.load("smollm2-135m")
    m.eval()
    yield m
    reset_saes(m)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(["The quick brown fox jumps over the lazy dog because it was bored."])


def topk_sae(seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=576, d_sae=1152, architecture="topk", k=16))
    with torch.no_grad():
        sae.W_enc.normal_(0, 576 ** -0.5)
        sae.W_dec.mul_(5.0)  # latents of a few units times rows of norm 5: a visible edit
    return sae


def test_error_term_keeps_logits_and_ablation_is_exact(model, tokens):
    with torch.no_grad():
        ref = model(tokens)
        _, clean = model.run_with_cache(tokens, names_filter=["blocks.16.hook_resid_pre"])
        sae = topk_sae()
        add_sae(model, sae, HOOK)
        try:
            assert torch.equal(model(tokens), ref)
            _, cache = model.run_with_cache(tokens, names_filter=[LATENTS, "blocks.16.hook_resid_pre"])
            acts = cache[LATENTS]
            assert torch.equal(cache["blocks.16.hook_resid_pre"], clean["blocks.16.hook_resid_pre"])
            i = int((acts[0, 1:] > 0).sum(0).argmax())

            def ablate(a, hook):
                a[..., i] = 0
                return a

            with model.hooks(fwd_hooks=[(LATENTS, ablate)]):
                _, edited = model.run_with_cache(tokens, names_filter=["blocks.16.hook_resid_pre"])
                logits = model(tokens)
        finally:
            reset_saes(model)
    delta = edited["blocks.16.hook_resid_pre"] - clean["blocks.16.hook_resid_pre"]
    expected = -acts[..., i:i + 1] * sae.W_dec[i]
    assert expected.abs().max() > 0.1
    # the residual here has entries in the hundreds (float32 spacing ~1e-5 there)
    assert (delta - expected).abs().max() < 1e-4
    assert (logits - ref).abs().max() > 1e-3
    assert torch.equal(model(tokens), ref)  # detached: the model is back


def test_saelens_sae_on_smollm2(model, tokens, tmp_path):
    warnings.filterwarnings("ignore", module="sae_lens")
    c = sae_lens.TopKSAEConfig(d_in=576, d_sae=1152, k=16)
    theirs = sae_lens.SAE.from_dict(c.to_dict())
    with torch.no_grad():
        theirs.W_enc.normal_(0, 576 ** -0.5, generator=torch.Generator().manual_seed(0))
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        want = theirs.encode(cache[HOOK])
        add_sae(model, ours, HOOK)
        try:
            _, c2 = model.run_with_cache(tokens, names_filter=LATENTS)
        finally:
            reset_saes(model)
    assert (c2[LATENTS] - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max()))
