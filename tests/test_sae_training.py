"""Training: planted sparse directions are recovered (TopK + AuxK and ReLU + L1 + resampling), the
AuxK loss only trains dead latents, resampling re-initialises dead latents, checkpoints resume to
the same weights as an uninterrupted run, and the activation store streams a model's activations."""

from __future__ import annotations

import json

import pytest
import torch

from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2
from tdb_lens.sae import SAE, SAEConfig, TrainConfig
from tdb_lens.sae.activation_store import ActivationStore, stop_layer_for
from tdb_lens.sae.synthetic import PlantedFeatures, recovered_fraction
from tdb_lens.sae.training import SAETrainer, train_sae

# tiny matmuls: one thread avoids oversubscribing a shared machine (10x faster under load)
pytestmark = pytest.mark.usefixtures("one_thread")


def planted(seed=0):
    return PlantedFeatures(d_in=48, n_features=128, p_active=0.03, batch_size=256, seed=seed)


def test_topk_recovers_planted_features():
    data = planted()
    sae = train_sae(data, SAEConfig(d_in=48, d_sae=256, architecture="topk", k=8),
                    TrainConfig(total_activations=256 * 400, batch_size=256, lr=1e-2, dead_after=20_000),
                    progress=False)
    frac, best = recovered_fraction(sae, data.directions, 0.9)
    assert frac >= 0.9, f"recovered {frac:.2f}; worst cosines {best.sort().values[:5]}"
    x = data.batch(999_999)
    with torch.no_grad():
        acts, recons = sae.encode_decode(x)
    assert float((acts > 0).sum(-1).float().mean()) <= 8
    assert float((x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.25


def test_jumprelu_l0_recovers_planted_features():
    # measured (2026-12-04): 0.938 of the directions at cosine >= 0.9, L0 3.46, FVU 0.15 (the data
    # has 3.84 active features a vector); JumpReLU does not fix L0, so the L0 band is a real check
    data = planted(seed=2)
    sae = train_sae(data, SAEConfig(d_in=48, d_sae=256, architecture="jumprelu"),
                    TrainConfig(total_activations=256 * 800, batch_size=256, lr=1e-2, l0_coefficient=3.0,
                                jumprelu_bandwidth=0.1, dead_after=20_000), progress=False)
    frac, best = recovered_fraction(sae, data.directions, 0.9)
    assert frac >= 0.9, f"recovered {frac:.2f}; worst cosines {best.sort().values[:5]}"
    x = data.batch(999_999)
    with torch.no_grad():
        acts, recons = sae.encode_decode(x)
    assert 2.0 <= float((acts > 0).sum(-1).float().mean()) <= 6.0
    assert float((x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.25
    assert float(sae.threshold.detach().mean()) > 0.1  # learned: it starts at 0.01 / input scale (~0.003)


def test_jumprelu_threshold_gradients_are_the_straight_through_estimates():
    """d loss / d θ from autograd against the rectangle-kernel formulas written out here:
    through the activation ``-θ_i Σ_b g_bi K((z_bi - θ_i)/ε)/ε``, through L0 ``-λ Σ_b K(...)/ε / B``."""
    from tdb_lens.sae.sae import StepContext

    sae = SAE(SAEConfig(d_in=4, d_sae=3, architecture="jumprelu"))
    eps, lam = 0.5, 2.0
    cfg = TrainConfig(jumprelu_bandwidth=eps, l0_coefficient=lam)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.3, 1.0, -0.2]))
        sae.b_dec.zero_()
        sae.W_enc.copy_(torch.tensor([[0.5, 0.2, -0.3], [0.1, 0.4, 0.2], [0.2, -0.1, 0.6], [0.3, 0.9, 0.1]]))
    x = torch.tensor([[0.5, -1.0, 2.0, 0.1], [1.2, 0.3, -0.4, 0.9]])
    ctx = StepContext(cfg, 0, torch.zeros(3, dtype=torch.bool))
    fwd = sae.train_forward(x, ctx)
    g = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])  # an arbitrary upstream gradient on the latents
    penalty, _ = sae.train_penalty(fwd, torch.zeros(2, 4), ctx)
    ((fwd.latents * g).sum() + penalty).backward()
    z, th = fwd.pre.detach(), sae.threshold.detach()
    want = torch.zeros(3)
    for i in range(3):
        for b in range(2):
            k = (1.0 if abs(float(z[b, i] - th[i])) < eps / 2 else 0.0) / eps
            want[i] += -float(th[i]) * float(g[b, i]) * k - lam * k / 2
    assert want.abs().max() > 0.1  # some pre-activations fall in the window
    torch.testing.assert_close(sae.threshold.grad, want, atol=1e-6, rtol=1e-6)
    # the forward is the JumpReLU itself
    torch.testing.assert_close(fwd.latents, torch.relu(z) * (z > th))


def test_relu_l1_with_resampling_recovers_planted_features():
    data = planted(seed=1)
    sae = train_sae(data, SAEConfig(d_in=48, d_sae=256, architecture="standard"),
                    TrainConfig(total_activations=256 * 800, batch_size=256, lr=1e-2, l1_coefficient=4.0,
                                l1_warmup_steps=200, resample_every=100, dead_after=20_000), progress=False)
    frac, best = recovered_fraction(sae, data.directions, 0.9)
    assert frac >= 0.9, f"recovered {frac:.2f}; worst cosines {best.sort().values[:5]}"
    # the trained SAE works on the unscaled data: its decoder rows are unit norm and it reconstructs
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(256), atol=1e-4, rtol=0)
    x = data.batch(999_999)
    with torch.no_grad():
        recons = sae.reconstruct(x)
    assert float((x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.5  # L1 shrinks latents: a loose sanity bound


def test_auxk_trains_only_dead_latents():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4))
    data = PlantedFeatures(d_in=16, n_features=32, batch_size=64)
    tr = SAETrainer(sae, TrainConfig(total_activations=640, batch_size=64, aux_coefficient=1.0, dead_after=10,
                                     normalize_scale=False), data, progress=False)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[10:20] = True
    tr.since_fired[dead] = 100
    x = data.batch(0)
    _, stats, _ = tr._loss(x)
    assert stats["aux"] > 0
    sae.zero_grad()
    # the aux term alone: subtract the reconstruction loss's gradient
    loss, _, _ = tr._loss(x)
    loss.backward()
    g_total = sae.W_enc.grad.clone()
    sae.zero_grad()
    tr.cfg.aux_coefficient = 0.0
    loss0, _, _ = tr._loss(x)
    loss0.backward()
    g_aux = g_total - sae.W_enc.grad
    assert g_aux[:, dead].abs().sum() > 0
    assert g_aux[:, ~dead].abs().max() < 1e-6


def test_resampling_reinitialises_dead_latents():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="standard"))
    data = PlantedFeatures(d_in=16, n_features=32, batch_size=128)
    tr = SAETrainer(sae, TrainConfig(total_activations=1280, batch_size=128, normalize_scale=False), data, progress=False)
    tr.train_step(data.batch(0))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e3
    tr.fired_since_resample[:] = True
    tr.fired_since_resample[dead] = False
    before = sae.W_dec.detach().clone()
    n = tr.resample_dead(data.batch(1))
    assert n == 5
    assert not torch.allclose(sae.W_dec[dead], before[dead])
    torch.testing.assert_close(sae.W_dec[~dead], before[~dead])
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=-1), torch.ones(5))
    assert bool((sae.b_enc[dead] == 0).all())
    st = tr.optim.state[sae.W_dec]
    assert bool((st["exp_avg"][dead] == 0).all()) and bool((st["exp_avg_sq"][dead] == 0).all())
    assert (sae.encode(data.batch(2))[:, dead] > 0).any()  # they fire again


class Crash(Exception):
    pass


class CrashingData(PlantedFeatures):
    crash_at = None

    def __next__(self):
        if self.crash_at is not None and self.batches_read == self.crash_at:
            raise Crash()
        return super().__next__()


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path, arch):
    def cfg():
        return TrainConfig(total_activations=12 * 256, batch_size=256, lr=3e-3, checkpoint_every=5, dead_after=512,
                           log_every=1)

    sae_cfg = SAEConfig(d_in=16, d_sae=48, architecture=arch, k=4 if arch == "topk" else None)
    whole = train_sae(CrashingData(d_in=16, n_features=24, batch_size=256), sae_cfg, cfg(), out_dir=tmp_path / "a",
                      progress=False)
    data = CrashingData(d_in=16, n_features=24, batch_size=256)
    data.crash_at = 8
    with pytest.raises(Crash):
        train_sae(data, sae_cfg, cfg(), out_dir=tmp_path / "b", progress=False)
    latest = json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 5
    assert not list((tmp_path / "b" / "checkpoints").glob(".tmp*"))
    resumed = train_sae(CrashingData(d_in=16, n_features=24, batch_size=256), sae_cfg, cfg(), out_dir=tmp_path / "b",
                        progress=False)
    for n in resumed.param_names:  # (JumpReLU: the threshold and its Adam moments too)
        torch.testing.assert_close(getattr(resumed, n), getattr(whole, n), atol=1e-6, rtol=0)
    assert resumed.cfg.metadata["trained_steps"] == 12
    # only the newest checkpoint is kept; the final SAE is an SAELens folder
    assert [p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*")] == ["step-10"]
    from tdb_lens.sae import load_sae

    again = load_sae(tmp_path / "b")
    torch.testing.assert_close(again.W_enc, resumed.W_enc)


def test_resume_refuses_a_different_sae(tmp_path):
    data = PlantedFeatures(d_in=16, n_features=24, batch_size=64)
    cfg = TrainConfig(total_activations=64 * 4, batch_size=64, checkpoint_every=2)
    train_sae(data, SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4), cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different SAE"):
        train_sae(data, SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4), cfg, out_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------- activation store


@pytest.fixture(scope="module")
def model():
    return HookedGPT2.from_config(GPT2Config(n_layers=3, n_heads=2, d_model=16, d_mlp=32, d_vocab=50, n_ctx=16), seed=0)


def test_stop_layer_for(model):
    # from the hook layouts: one past the hook's layer, 0 for embeddings, None after the blocks
    assert stop_layer_for(model, "blocks.2.hook_resid_post") == 3
    assert stop_layer_for(model, "blocks.0.attn.hook_z") == 1
    assert stop_layer_for(model, "hook_embed") == 0
    assert stop_layer_for(model, "ln_final.hook_normalized") is None
    with pytest.raises(KeyError, match="blocks.2.hook_resid_post"):
        stop_layer_for(model, "blocks.2.hook_resid_pots")


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.0.ln1.hook_scale"])
def test_activation_store_refuses_hooks_without_one_vector_per_token(model, hook):
    tokens = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"one vector per\s+token \(\[batch, pos, d\]\)"):
        ActivationStore(model, hook, tokens)


def test_activation_store_streams_each_activation_once_per_epoch(model):
    tokens = torch.randint(0, 50, (16, 9), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_post"
    later = []
    model.add_hook("blocks.2.hook_resid_pre", lambda a, hook: later.append(1))
    try:
        store = ActivationStore(model, hook, tokens, batch_size=16, buffer_size=48, model_batch_size=3,
                                skip_positions=1, loop=False)
        batches = list(store)
    finally:
        model.reset_hooks()
    assert not later, "layers after the hook ran"
    assert all(b.shape == (16, 16) for b in batches)
    got = torch.cat(batches)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    want = cache[hook][:, 1:].reshape(-1, 16)
    assert got.shape == want.shape
    key = lambda t: t[torch.argsort(t[:, 0])]
    torch.testing.assert_close(key(got), key(want))
    # shuffled: consecutive activations are not consecutive positions
    assert not torch.equal(got[:8], want[:8])


def test_activation_store_loops_and_resumes(model):
    tokens = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    store = ActivationStore(model, "blocks.0.hook_resid_post", tokens, batch_size=8, buffer_size=16,
                            model_batch_size=2, loop=True)
    for _ in range(10):  # 80 activations from 32: loops
        assert store.next_batch().shape == (8, 16)
    state = store.state_dict()
    assert state["sequences_read"] > len(tokens)
    other = ActivationStore(model, "blocks.0.hook_resid_post", tokens, batch_size=8, buffer_size=16, model_batch_size=2)
    other.load_state_dict(state)
    assert other.sequences_read == state["sequences_read"]
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        ActivationStore(model, "blocks.0.hook_resid_pots", tokens)


def test_training_on_a_model_via_the_store(model, tmp_path):
    tokens = torch.randint(0, 50, (32, 9), generator=torch.Generator().manual_seed(2))
    store = ActivationStore(model, "blocks.1.hook_resid_post", tokens, batch_size=64, buffer_size=128)
    sae = train_sae(store, SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"),
                    TrainConfig(total_activations=64 * 20, batch_size=64, lr=3e-3, checkpoint_every=10),
                    out_dir=tmp_path, progress=False)
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["history"] and log["history"][-1]["step"] == 20
    model.add_sae(sae)
    try:
        _, cache = model.run_with_cache(tokens[:2], names_filter=lambda n: n.endswith("hook_sae_acts_post"))
        assert cache["blocks.1.hook_resid_post.hook_sae_acts_post"].shape == (2, 9, 32)
    finally:
        model.reset_saes()


def test_sparse_topk_training_path_matches_dense_formula():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=5))
    data = PlantedFeatures(d_in=16, n_features=32, batch_size=128)
    tr = SAETrainer(sae, TrainConfig(total_activations=1280, batch_size=128, aux_coefficient=0.0,
                                     normalize_scale=False), data, progress=False)
    x = data.batch(0)
    loss, stats, fired = tr._loss(x)
    loss.backward()
    grads = {n: getattr(sae, n).grad.clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    sae.zero_grad()
    acts = sae.activation(sae.pre_acts(x))
    dense = (x - sae.decode_normalized(acts)).pow(2).sum(-1).mean()
    dense.backward()
    assert abs(float(loss.detach()) - float(dense.detach())) < 1e-5
    for n, g in grads.items():
        torch.testing.assert_close(g, getattr(sae, n).grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(fired, (acts > 0).any(0))
    assert abs(stats["l0"] - float((acts > 0).float().sum(-1).mean())) < 1e-6


def test_cached_activations_epochs_and_resume():
    from tdb_lens.sae.activation_store import CachedActivations

    acts = torch.arange(40.0).reshape(20, 2)
    c = CachedActivations(acts, batch_size=5, seed=1)
    epoch = torch.cat([next(c) for _ in range(4)])
    assert sorted(epoch[:, 0].tolist()) == acts[:, 0].tolist()  # each activation once per epoch
    nxt = [next(c) for _ in range(3)]
    d = CachedActivations(acts, batch_size=5, seed=1)
    d.load_state_dict({"batches_read": 4})
    for a in nxt:
        assert torch.equal(next(d), a)
