"""Hook layouts and the engine's own forward pieces.

References: the activations themselves (every recorded tensor has the shape its layout declares,
with the model's sizes), the full forward (``run_blocks`` + ``logits_from_resid`` reproduce it
exactly), IEEE arithmetic restricted to what each query may see (the NaN tests compare the fused
and the step-by-step attention paths with each other and with causality).
"""

from __future__ import annotations

import pytest
import torch

from tdb_lens import GPT2Config, HookedGPT2
from tdb_lens.models.llama import HookedLlama, LlamaConfig

TOKENS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def _gpt2() -> HookedGPT2:
    return HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=64, n_heads=4, d_mlp=256, d_vocab=100, n_ctx=32),
                                  seed=0)


def _llama() -> HookedLlama:
    cfg = LlamaConfig(n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_mlp=96, d_vocab=100, n_ctx=32)
    return HookedLlama.from_config(cfg, seed=0)


MODELS = {"gpt2": _gpt2, "llama_gqa": _llama}


@pytest.fixture(params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def test_every_hook_point_declares_a_layout_that_matches_its_activation(model):
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(TOKENS)
    assert set(cache.keys()) <= set(model.hook_dict)
    missing = [n for n, hp in model.hook_dict.items() if hp.layout is None]
    assert missing == []
    for name, act in cache.items():
        lay = model.hook_layout(name)
        assert act.shape == lay.shape_for(*TOKENS.shape), name
        # the layer is the block the hook point lives in (read from the module tree, not the name)
        in_block = [i for i, b in enumerate(model.blocks) if any(m is model.hook_dict[name] for m in b.modules())]
        assert lay.layer == (in_block[0] if in_block else None), name


def test_hook_name_and_find_hooks_invert_the_layout(model):
    n = model.cfg.n_layers
    for name, hp in model.hook_dict.items():
        lay = hp.layout
        assert model.hook_name(lay.site, lay.layer, lay.component) == name
    assert model.hook_name("z", -1) == model.hook_name("z", n - 1)
    assert model.find_hooks(site="resid_pre") == [model.hook_name("resid_pre", l) for l in range(n)]
    assert model.find_hooks(component="embed")[0] == "hook_embed"
    with pytest.raises(KeyError, match="no hook site 'zz'"):
        model.hook_name("zz", 0)


def test_unit_and_position_axes(model):
    z = model.hook_layout(model.hook_name("z", 0))
    assert (z.pos_axis, z.unit_axis, z.width) == (1, 2, model.cfg.d_head)
    pat = model.hook_layout(model.hook_name("pattern", 0))
    assert (pat.pos_axis, pat.key_axis, pat.unit_axis) == (2, 3, 1)
    k = model.hook_layout(model.hook_name("k", 0))
    assert k.size("kv_head") == getattr(model.cfg, "n_key_value_heads", model.cfg.n_heads)
    post = model.hook_layout(model.hook_name("post", 1))
    assert (post.unit_axis, post.width) == (2, model.cfg.d_mlp)
    assert model.hook_layout(model.hook_name("resid_post", 1)).unit_axis is None


def test_split_qkv_input_changes_ln1_layout_and_still_checks(model):
    model.set_use_split_qkv_input(True)
    _, cache = model.run_with_cache(TOKENS)
    name = model.hook_name("scale", 0, "ln1")
    assert cache[name].shape == model.hook_layout(name).shape_for(*TOKENS.shape)
    model.set_use_split_qkv_input(False)
    assert model.hook_layout(name).axes == ("batch", "pos", "singleton")


def test_sae_hook_points_are_placed_on_their_host(model):
    from tdb_lens.sae import SAE, SAEConfig

    host = model.hook_name("resid_post", 1)
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=48, architecture="standard", hook_name=host))
    model.add_sae(sae)
    name = model.hook_name("sae_acts_post", host=host)
    lay = model.hook_layout(name)
    assert (lay.layer, lay.host, lay.axes) == (1, host, ("batch", "pos", "d_sae"))
    _, cache = model.run_with_cache(TOKENS)
    assert cache[name].shape == lay.shape_for(*TOKENS.shape)
    model.reset_saes()
    assert sae.hook_sae_acts_post.layout.axes == ("...", "d_sae")  # unplaced again


def test_layout_check_names_the_hook_that_disagrees(model):
    from tdb_lens.hooks.layout import layout

    hp = model.hook_dict[model.hook_name("z", 0)]
    declared = hp.layout
    try:
        hp.layout = layout("attn", "z", "batch", "pos", "d_head").with_sizes(declared.sizes)
        with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_z.*layout is \[batch, pos, d_head\]"):
            model(TOKENS)
    finally:
        hp.layout = declared


def test_hook_returning_another_dtype_is_named(model):
    with pytest.raises(TypeError, match=r"blocks\.0\.hook_resid_pre.*torch\.float64"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(model.hook_name("resid_pre", 0), lambda x, hook: x.double())])
    assert model.n_hooks() == 0


def test_pytorch_register_forward_hook_fires():
    model = _gpt2()
    seen = []
    hp = model.hook_dict["blocks.0.hook_resid_post"]
    handle = hp.register_forward_hook(lambda mod, args, out: seen.append((mod is hp, out.shape)))
    model(TOKENS)
    assert seen == [(True, torch.Size([2, 7, 64]))]
    handle.remove()
    model(TOKENS)
    assert len(seen) == 1
    # as in PyTorch, a returned tensor replaces the output
    zeroing = hp.register_forward_hook(lambda mod, args, out: out * 0)
    zeroed = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_post")[1]["blocks.0.hook_resid_post"]
    assert torch.count_nonzero(zeroed) == 0
    zeroing.remove()
    with pytest.raises(NotImplementedError, match="add_hook"):
        hp.register_forward_pre_hook(lambda *a: None)


def test_run_blocks_and_logits_from_resid_reproduce_forward(model):
    tokens, mask = model.prepare_input(TOKENS)
    assert mask is None
    ctx = model.make_context(*tokens.shape, mask, None, tokens.device)
    resid = model.embed(tokens, ctx)
    half = model.run_blocks(resid, ctx, 0, 1)
    out = model.logits_from_resid(model.run_blocks(half, ctx, 1))
    assert torch.equal(out, model(TOKENS))
    assert torch.equal(model(half, start_at_layer=1), out)
    assert torch.equal(model(TOKENS, stop_at_layer=1), half)
    _, cache = model.run_with_cache(TOKENS)
    final = cache[model.hook_name("resid_post", -1)]
    scale = cache["ln_final.hook_scale"]
    # with the scale frozen at its own value the frozen-norm logits are the logits
    torch.testing.assert_close(model.logits_from_resid(final, norm_scale=scale), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a range"):
        model.run_blocks(resid, ctx, 1, 5)


def test_return_type_none_still_runs_the_final_norm(model):
    _, cache = model.run_with_cache(TOKENS, return_type=None)
    assert "ln_final.hook_scale" in cache


@pytest.mark.parametrize("bad", [torch.full((2, 7), 2), torch.ones(2, 7) * 0.5])
def test_attention_mask_must_be_zeros_and_ones(model, bad):
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        model(TOKENS, attention_mask=bad)


def _inject(site: str, pos: int):
    def hook(x, hook):
        x = x.clone()
        x[:, pos] = float("nan")  # [batch, pos, head, d_head]
        return x

    return site, hook


@pytest.mark.parametrize("site,pos", [("v", 4), ("q", 2), ("k", 3)])
@pytest.mark.parametrize("hooked", [False, True])
def test_nan_reaches_exactly_the_positions_that_can_see_it(model, site, pos, hooked):
    """A NaN put into an attention input at position ``pos`` of block 0 makes the positions that
    attend to it NaN (``pos`` and later, causal) and leaves earlier ones finite and unchanged, on the
    fused path and on the step-by-step path (a no-op hook on the pattern) alike."""
    name, fn = _inject(site, pos)
    hooks = [(model.hook_name(name, 0), fn)]
    if hooked:
        hooks.append((model.hook_name("pattern", 0), lambda x, hook: None))
    clean = model(TOKENS)
    out = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert torch.isnan(out[:, pos:]).all()
    torch.testing.assert_close(out[:, :pos], clean[:, :pos], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [5, [1, 2], b"hook_embed"])
def test_names_filter_of_the_wrong_type_is_named(bad):
    model = _gpt2()
    with pytest.raises(TypeError, match="names_filter must be a hook name"):
        model.run_with_cache(TOKENS, names_filter=bad)
    assert model.n_hooks() == 0
