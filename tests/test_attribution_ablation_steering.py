import pytest
import torch

from _attribution_models import FAMILIES, make_model, tokens
from tdb_lens.attribution.ablation import ablate, compute_means, mean_ablation_hooks, resample_ablation_hooks, zero_ablation_hooks
from tdb_lens.attribution.steering import steer_direction, steer_nodes, steering_hooks


@pytest.fixture(params=FAMILIES)
def model(request):
    return make_model(request.param)


def test_empty_ablation_is_clean_run(model):
    toks = tokens()
    clean = model(toks).detach()
    ref = tokens(6, 7, seed=4)
    for method, kw in (("zero", {}), ("mean", {"reference": ref}), ("resample", {"source": tokens(seed=9)})):
        assert torch.equal(ablate(model, toks, [], method, **kw), clean)


def test_zero_ablation_sets_exactly_the_nodes(model):
    toks = tokens()
    hooks = zero_ablation_hooks(["L0.N3@2", "L1.H2", "L0.H1@4"])
    with model.hooks(fwd_hooks=hooks):
        _, c = model.run_with_cache(toks, names_filter=lambda n: n.endswith(("hook_post", "hook_z")))
    _, c0 = model.run_with_cache(toks, names_filter="blocks.0.mlp.hook_post")
    post = c["blocks.0.mlp.hook_post"]
    assert torch.all(post[:, 2, 3] == 0)
    want = c0["blocks.0.mlp.hook_post"].clone()
    want[:, 2, 3] = 0
    assert torch.equal(post[:, :4], want[:, :4])  # L0.H1@4 changes layer 0's MLP input from position 4 on
    assert torch.all(c["blocks.1.attn.hook_z"][:, :, 2] == 0)
    assert torch.all(c["blocks.0.attn.hook_z"][:, 4, 1] == 0) and torch.any(c["blocks.0.attn.hook_z"][:, 3, 1] != 0)


def test_mean_ablation_reproduces_hand_computed_means(model):
    ref = tokens(6, 7, seed=4)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[3, 4:] = 0
    groups = torch.tensor([0, 1, 0, 1, 1, 0])
    _, rc = model.run_with_cache(ref, attention_mask=mask, names_filter=["blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"])
    z = rc["blocks.1.attn.hook_z"]
    # hand-computed: group 1, position 4, over the prompts whose position 4 is real (rows 1 and 4)
    assert torch.allclose(compute_means(model, ref, ["blocks.1.attn.hook_z"], mask, groups)["blocks.1.attn.hook_z"][1, 4],
                          (z[1, 4] + z[4, 4]) / 2, atol=1e-6)
    toks = tokens(2, 7)
    target_groups = [1, 0]
    hooks = mean_ablation_hooks(model, ["L1.H2@4", "L0.MLP"], reference=ref, attention_mask=mask, groups=groups,
                                target_groups=target_groups)
    with model.hooks(fwd_hooks=hooks):
        _, c = model.run_with_cache(toks, names_filter=["blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"])
    assert torch.allclose(c["blocks.1.attn.hook_z"][0, 4, 2], (z[1, 4, 2] + z[4, 4, 2]) / 2, atol=1e-6)
    g0 = [0, 2, 5]
    assert torch.allclose(c["blocks.1.attn.hook_z"][1, 4, 2], z[g0, 4, 2].mean(0), atol=1e-6)
    mo = rc["blocks.0.hook_mlp_out"]
    want_p6_g0 = (mo[2, 6] + mo[5, 6]) / 2  # row 0 is padding at position 6
    assert torch.allclose(c["blocks.0.hook_mlp_out"][1, 6], want_p6_g0, atol=1e-6)
    # all positions pooled
    pooled = compute_means(model, ref, ["blocks.0.hook_mlp_out"], mask, per_position=False)["blocks.0.hook_mlp_out"]
    assert torch.allclose(pooled[0, 0], (mo * mask[..., None]).sum((0, 1)) / mask.sum(), atol=1e-6)
    with pytest.raises(ValueError):
        mean_ablation_hooks(model, ["L0.MLP"], reference=ref, groups=groups)[0][1](torch.zeros(2, 7, 64), None)


def test_resample_ablation_takes_the_permuted_rows(model):
    toks, src = tokens(3, 7, seed=1), tokens(3, 7, seed=8)
    hooks = resample_ablation_hooks(model, ["L0.N1"], src, permutation=[2, 0, 1])
    _, sc = model.run_with_cache(src, names_filter="blocks.0.mlp.hook_post")
    with model.hooks(fwd_hooks=hooks):
        _, c = model.run_with_cache(toks, names_filter="blocks.0.mlp.hook_post")
    assert torch.equal(c["blocks.0.mlp.hook_post"][:, :, 1], sc["blocks.0.mlp.hook_post"][[2, 0, 1], :, 1])


def test_hooks_compose(model):
    toks = tokens()
    hooks = zero_ablation_hooks(["L0.N3"]) + steer_nodes(["L0.N4@1"], "clamp", 2.0).hooks
    with model.hooks(fwd_hooks=hooks):
        _, c = model.run_with_cache(toks, names_filter="blocks.0.mlp.hook_post")
    post = c["blocks.0.mlp.hook_post"]
    assert torch.all(post[..., 3] == 0) and torch.all(post[:, 1, 4] == 2.0)


def test_steering_modes(model):
    toks = tokens()
    _, c0 = model.run_with_cache(toks, names_filter="blocks.1.mlp.hook_post")
    base = c0["blocks.1.mlp.hook_post"]
    for mode, f in (("clamp", lambda x: torch.full_like(x, 3.0)), ("add", lambda x: x + 3.0), ("scale", lambda x: x * 3.0)):
        with model.hooks(fwd_hooks=steer_nodes(["L1.N7", "L1.N9"], mode, 3.0, positions=[2, 5]).hooks):
            _, c = model.run_with_cache(toks, names_filter="blocks.1.mlp.hook_post")
        got = c["blocks.1.mlp.hook_post"]
        want = base.clone()
        for p in (2, 5):
            for n in (7, 9):
                want[:, p, n] = f(base[:, p, n])
        assert torch.allclose(got, want, atol=1e-6), mode


def test_direction_steering(model):
    toks = tokens()
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    u = d / d.norm()
    name = "blocks.0.hook_resid_post"
    _, c0 = model.run_with_cache(toks, names_filter=name)
    for mode, val in (("clamp", 4.0), ("add", 2.0), ("scale", 0.0)):
        with model.hooks(fwd_hooks=steer_direction(name, d, mode, val, positions=[3]).hooks):
            _, c = model.run_with_cache(toks, names_filter=name)
        x, x0 = c[name], c0[name]
        assert torch.allclose(x[:, :3], x0[:, :3]) and torch.allclose(x[:, 4:], x0[:, 4:])
        if mode == "clamp":
            assert torch.allclose(x[:, 3] @ u, torch.full((3,), 4.0), atol=1e-5)
        elif mode == "add":
            assert torch.allclose(x[:, 3], x0[:, 3] + 2.0 * d, atol=1e-5)
        else:
            assert torch.allclose(x[:, 3] @ u, torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError):
        steering_hooks(d, "add", 1.0)


def test_steering_during_generation_hits_absolute_positions(model):
    """With the KV cache each step sees one position; the hook still steers position 6 only."""
    toks = tokens(2, 4)
    seen = {}

    def record(x, hook):
        seen.setdefault("calls", []).append(x[:, :, 5].clone())

    st = steer_nodes(["L0.N5"], "clamp", 7.0, positions=[6])
    out = model.generate(toks, max_new_tokens=4, fwd_hooks=st.hooks + [("blocks.0.mlp.hook_post", record)],
                         stop_at_eos=False, return_type="tokens")
    assert out.shape == (2, 8)
    calls = seen["calls"]  # prompt (4 positions), then positions 4, 5, 6
    assert calls[0].shape[1] == 4 and all(c.shape[1] == 1 for c in calls[1:])
    assert torch.all(calls[3] == 7.0) and not torch.any(calls[2] == 7.0) and not torch.any(calls[0] == 7.0)
    # the same steering without the cache steers the same tokens
    st.reset()
    out2 = model.generate(toks, max_new_tokens=4, fwd_hooks=st.hooks, stop_at_eos=False, return_type="tokens",
                          use_past_kv_cache=False)
    assert torch.equal(out, out2)
