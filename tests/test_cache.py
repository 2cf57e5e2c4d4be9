"""ActivationCache: name shorthand and the residual-stream decompositions, checked against the
identities they must satisfy (components sum to the residual, attributions sum to the logits)."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpt2_reference import make_hf_gpt2, max_diff
from tdb_lens import HookedGPT2, get_act_name

N_LAYERS = 4
TOKENS = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(4))


@lru_cache(maxsize=2)
def run(processed: bool = False):
    """A model with random (perturbed: LayerNorm biases non-zero) weights, its logits and full cache."""
    hf = make_hf_gpt2(seed=21, n_layer=N_LAYERS)
    opts = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True) if processed else {}
    model = HookedGPT2.from_hf_model(hf, **opts)
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
    return model, logits, cache


def test_get_act_name_and_shorthand():
    _, _, cache = run()
    assert get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale"
    assert get_act_name("normalized", 1, "ln2") == "blocks.1.ln2.hook_normalized"
    assert get_act_name("scale") == "ln_final.hook_scale"
    assert get_act_name("embed") == "hook_embed" and get_act_name("pos_embed") == "hook_pos_embed"
    assert get_act_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert get_act_name("post", 2) == "blocks.2.mlp.hook_post"
    assert get_act_name("z", 1) == "blocks.1.attn.hook_z"
    assert get_act_name("blocks.1.attn.hook_q") == "blocks.1.attn.hook_q"
    with pytest.raises(ValueError, match="layer"):
        get_act_name("pattern")
    assert cache["pattern", 3] is cache["blocks.3.attn.hook_pattern"]
    assert cache["scale", 2, "ln1"] is cache["blocks.2.ln1.hook_scale"]
    assert cache["embed"] is cache["hook_embed"] and cache["scale"] is cache["ln_final.hook_scale"]
    assert ("pattern", 3) in cache and ("pattern", 9) not in cache
    assert cache["pattern", 3].shape == (2, 4, 7, 7)
    with pytest.raises(KeyError, match="blocks.3.attn.hook_pattern"):
        cache["blocks.3.attn.hook_patern"]


@pytest.mark.parametrize("processed", [False, True])
def test_accumulated_resid(processed):
    model, _, cache = run(processed)
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert stack.shape == (N_LAYERS + 1, 2, 7, 64)
    assert labels == [f"{l}_pre" for l in range(N_LAYERS)] + ["final_post"]
    for l in range(N_LAYERS):
        assert torch.equal(stack[l], cache["resid_pre", l])
    assert torch.equal(stack[-1], cache["resid_post", N_LAYERS - 1])
    # logit lens (TransformerLens 3): at the final layer each entry goes through the whole final norm
    normed = cache.accumulated_resid(apply_ln=True)
    for l in range(N_LAYERS + 1):
        assert max_diff(normed[l], model.ln_final(stack[l])) < 1e-5
    # at an earlier layer the cached scale of that layer's ln1 is used: the last entry is ln1's own input
    at2 = cache.accumulated_resid(layer=2, apply_ln=True)
    assert max_diff(at2[-1], cache["normalized", 2, "ln1"]) < 1e-5
    assert torch.equal(cache.accumulated_resid(layer=-1), stack)
    last = cache.accumulated_resid(pos_slice=-1)  # an integer position removes the axis
    assert last.shape == (N_LAYERS + 1, 2, 64) and torch.equal(last, stack[:, :, -1])
    mid, labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
    assert torch.equal(mid[1], cache["resid_mid", 0])


@pytest.mark.parametrize("processed", [False, True])
def test_decompose_resid_sums_to_the_residual(processed):
    model, _, cache = run(processed)
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * N_LAYERS
    assert max_diff(stack.sum(0), cache["resid_post", N_LAYERS - 1]) < 1e-5
    part = cache.decompose_resid(layer=2)
    assert max_diff(part.sum(0), cache["resid_pre", 2]) < 1e-5
    part = cache.decompose_resid(layer=2, mlp_input=True)
    assert max_diff(part.sum(0), cache["resid_mid", 2]) < 1e-5
    # -1 is the unembedding's input (every component), as None
    assert torch.equal(cache.decompose_resid(layer=-1), stack)
    assert cache.decompose_resid(pos_slice=-1).shape == (2 + 2 * N_LAYERS, 2, 64)
    assert cache.decompose_resid(pos_slice=[0, 6]).shape == (2 + 2 * N_LAYERS, 2, 2, 64)
    assert torch.equal(cache["resid_post", -1], cache["resid_post", N_LAYERS - 1])


@pytest.mark.parametrize("processed", [False, True])
def test_stack_head_results_sum_to_attn_out(processed):
    model, _, cache = run(processed)
    H = model.cfg.n_heads
    stack, labels = cache.stack_head_results(return_labels=True)
    assert stack.shape == (N_LAYERS * H, 2, 7, 64) and labels[:2] == ["L0H0", "L0H1"]
    per_layer = stack.reshape(N_LAYERS, H, 2, 7, 64)
    for l in range(N_LAYERS):
        assert max_diff(per_layer[l].sum(0) + model.blocks[l].attn.b_O, cache["attn_out", l]) < 1e-5
    # with use_attn_result the model computes the same per-head outputs itself
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, c2 = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_result"))
    finally:
        model.set_use_attn_result(False)
    for l in range(N_LAYERS):
        assert max_diff(per_layer[l], c2["result", l].permute(2, 0, 1, 3)) < 1e-5
    first2 = cache.stack_head_results(layer=2)
    assert torch.equal(first2, stack[: 2 * H])
    with_rest = cache.stack_head_results(incl_remainder=True)
    assert max_diff(with_rest.sum(0), cache["resid_post", N_LAYERS - 1]) < 1e-5


@pytest.mark.parametrize("processed", [False, True])
def test_stack_neuron_results_sum_to_mlp_out(processed):
    model, _, cache = run(processed)
    d_mlp = model.cfg.d_mlp
    stack, labels = cache.stack_neuron_results(return_labels=True)
    assert stack.shape == (N_LAYERS * d_mlp, 2, 7, 64) and labels[1] == "L0N1"
    per_layer = stack.reshape(N_LAYERS, d_mlp, 2, 7, 64)
    for l in range(N_LAYERS):
        assert max_diff(per_layer[l].sum(0) + model.blocks[l].mlp.b_out, cache["mlp_out", l]) < 1e-5
    some = cache.stack_neuron_results(layer=1, neuron_slice=[3, 5])
    assert torch.equal(some, per_layer[0, [3, 5]])


def _bias_term(model, token):
    """The part of a logit no residual component carries: final-norm bias through W_U, plus b_U."""
    W_U, b_U = model.W_U, model.b_U
    bias = model.ln_final.bias
    return (0.0 if bias is None else bias @ W_U[:, token]) + b_U[token]


@pytest.mark.parametrize("processed", [False, True])
@torch.no_grad()
def test_logit_attributions_sum_to_the_logits(processed):
    model, logits, cache = run(processed)
    stack = cache.decompose_resid()
    for token in (0, 17, 999):
        attrs = cache.logit_attrs(stack, tokens=token)
        assert attrs.shape == (stack.shape[0], 2, 7)
        assert max_diff(attrs.sum(0) + _bias_term(model, token), logits[..., token]) < 1e-4
    # per-prompt answer tokens and a difference of logits
    answers, wrong = torch.tensor([5, 9]), torch.tensor([11, 2])
    diff = cache.logit_attrs(stack, tokens=answers, incorrect_tokens=wrong).sum(0)
    for b in range(2):
        want = logits[b, :, answers[b]] - logits[b, :, wrong[b]]
        want_bias = _bias_term(model, int(answers[b])) - _bias_term(model, int(wrong[b]))
        assert max_diff(diff[b] + want_bias, want) < 1e-4
    # the finest decomposition: every head, every neuron, the embeddings and all biases
    L = model.cfg.n_layers
    biases = torch.stack([model.blocks[l].attn.b_O for l in range(L)] + [model.blocks[l].mlp.b_out for l in range(L)])
    parts = torch.cat([
        cache.stack_head_results(), cache.stack_neuron_results(), torch.stack([cache["embed"], cache["pos_embed"]]),
        biases[:, None, None, :].expand(-1, 2, 7, -1),
    ])
    attrs = cache.logit_attrs(parts, tokens=42)
    assert max_diff(attrs.sum(0) + _bias_term(model, 42), logits[..., 42]) < 1e-4
    # apply_ln_to_stack is the frozen-scale normalisation: normalised parts sum to hook_normalized
    normed = cache.apply_ln_to_stack(parts)
    assert max_diff(normed.sum(0), cache["ln_final.hook_normalized"]) < 1e-5
    at_last = cache.apply_ln_to_stack(parts[:, :, -1], pos_slice=-1)
    assert max_diff(at_last, normed[:, :, -1]) < 1e-6
    # a stack that does not line up with the cached scale is an error, not a silent broadcast
    with pytest.raises(ValueError, match="line up"):
        cache.apply_ln_to_stack(parts[:, :, -1])
    final = cache["resid_post", -1][:, -1]  # [batch, d_model]
    assert cache.apply_ln_to_stack(final, pos_slice=-1).shape == (2, 64)


def test_cache_to_dtype_and_only_requested_names():
    model, _, full = run()
    c64 = full.to(dtype=torch.float64)
    assert all(v.dtype == torch.float64 for v in c64.values()) and len(c64) == len(full)
    assert all(v.dtype == torch.float32 for v in full.values())  # the original is untouched
    assert torch.equal(c64["pattern", 1], full["pattern", 1].double())
    wanted = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z"]
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=wanted)
    assert sorted(cache.keys()) == sorted(wanted) and len(cache) == 2
    assert all(not v.requires_grad for v in cache.values())
    with pytest.raises(KeyError):
        cache["blocks.1.hook_resid_pre"]
    one = model.run_with_cache(TOKENS[:1], names_filter=wanted)[1].remove_batch_dim()
    assert one["blocks.1.hook_resid_post"].shape == (7, 64)
    with pytest.raises(ValueError, match="batch size 1"):
        cache.remove_batch_dim()
