"""Evaluation metrics against SAEs whose answers are known: an exact (lossless) SAE, a zero SAE
(which is zero ablation), and a direct recomputation of the loss with the SAE spliced in."""

from __future__ import annotations

import pytest
import torch

from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2
from tdb_lens.sae import SAE, SAEConfig
from tdb_lens.sae.evaluation import evaluate_sae, plot_latent_density, reconstruction_metrics, summary

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return HookedGPT2.from_config(GPT2Config(n_layers=3, n_heads=2, d_model=16, d_mlp=32, d_vocab=50, n_ctx=16), seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(0))


def lossless_sae(d=16) -> SAE:
    """relu(x) - relu(-x) = x: latents [x+, x-], decoder [I; -I]."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_lossless_sae_scores_perfectly(model, tokens):
    m = evaluate_sae(model, lossless_sae(), tokens, HOOK, batch_size=4, progress=False)
    assert m["fvu"] < 1e-10 and abs(m["variance_explained"] - 1) < 1e-10
    assert abs(m["ce_loss_recovered"] - 1) < 1e-5
    assert m["kl_div"] < 1e-8
    assert m["l0"] == 16.0  # each coordinate is positive or negative: exactly one of its two latents fires
    assert m["n_tokens"] == 6 * 9
    clean = float(model(tokens, return_type="loss").detach())
    assert abs(m["ce_loss_clean"] - clean) < 1e-5


def test_zero_sae_is_zero_ablation(model, tokens):
    sae = lossless_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    m = evaluate_sae(model, sae, tokens, HOOK, batch_size=6, skip_positions=0, progress=False)
    assert abs(m["ce_loss_recovered"]) < 1e-6
    assert abs(m["ce_loss_with_sae"] - m["ce_loss_zero_ablation"]) < 1e-6


def test_metrics_match_a_direct_computation(model, tokens):
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=16, d_sae=40, architecture="topk", k=5))
    m = evaluate_sae(model, sae, tokens, HOOK, batch_size=4, skip_positions=0, progress=False)
    with torch.no_grad():
        loss_sae = float(model.run_with_saes(tokens, saes={HOOK: sae}, return_type="loss"))
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        x = cache[HOOK].reshape(-1, 16)
        acts, recons = sae.encode_decode(x)
    assert abs(m["ce_loss_with_sae"] - loss_sae) < 1e-5
    fvu = float((x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert abs(m["fvu"] - fvu) < 1e-5
    assert abs(m["l0"] - 5.0) < 1e-9
    density = (acts > 0).float().mean(0)
    torch.testing.assert_close(m["latent_density"], density)
    assert m["dead_fraction"] == float((density == 0).float().mean())
    r = reconstruction_metrics(sae, x, batch_size=7)
    assert abs(r["fvu"] - fvu) < 1e-5 and r["l0"] == m["l0"]
    assert "latent_density" not in summary(m)


def test_skip_positions_keeps_leading_positions(model, tokens):
    sae = lossless_sae()
    with torch.no_grad():
        sae.W_dec.zero_()  # reconstruction 0: splicing it in zeroes every position it covers

    def zero_after_first(x, hook):
        x = x.clone()
        x[:, 1:] = 0
        return x

    m = evaluate_sae(model, sae, tokens, HOOK, skip_positions=1, progress=False)
    with torch.no_grad():
        want = float(model.run_with_hooks(tokens, fwd_hooks=[(HOOK, zero_after_first)], return_type="loss"))
    assert abs(m["ce_loss_with_sae"] - want) < 1e-5
    assert abs(m["ce_loss_zero_ablation"] - want) < 1e-5
    assert m["n_tokens"] == 6 * 9


def test_density_plot(tmp_path):
    density = torch.cat([torch.zeros(5), torch.logspace(-4, -1, 95)])
    p = plot_latent_density(density, tmp_path / "d.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attached_sae_is_refused(model, tokens):
    sae = lossless_sae()
    model.add_sae(sae, HOOK)
    try:
        with pytest.raises(ValueError, match="detach"):
            evaluate_sae(model, sae, tokens, progress=False)
    finally:
        model.reset_saes()
