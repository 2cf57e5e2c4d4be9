"""Weight processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases) against
TransformerLens' processed HookedTransformer, and the invariances the processing module documents."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpt2_reference import make_hf_gpt2, make_tl, max_diff
from tdb_lens import HookedGPT2
from tdb_lens.models.gpt2_processing import PROCESSING_FLAGS, process_weights_

TOL = 1e-4
OPTIONS = [
    dict(fold_ln=True),
    dict(center_writing_weights=True),
    dict(center_unembed=True),
    dict(fold_value_biases=True),
    dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True),
    dict(center_writing_weights=True, fold_value_biases=True),
]


def _id(opts: dict) -> str:
    return "+".join(opts)


@lru_cache(maxsize=1)
def reference():
    hf = make_hf_gpt2(seed=11)
    tokens = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(2))
    base = HookedGPT2.from_hf_model(hf)
    with torch.no_grad():
        base_logits, base_cache = base.run_with_cache(tokens)
    return hf, tokens, base_logits, base_cache


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@torch.no_grad()
def test_processed_hooks_equal_transformer_lens(opts):
    hf, tokens, _, _ = reference()
    model = HookedGPT2.from_hf_model(hf, **opts)
    tl = make_tl(hf, **opts)
    logits, cache = model.run_with_cache(tokens)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    assert set(cache.keys()) <= set(tl_cache.keys())
    errs = {name: max_diff(cache[name], tl_cache[name]) for name in cache.keys()}
    errs["logits"] = max_diff(logits, tl_logits)
    worst = max(errs, key=errs.get)
    print(f"\n{_id(opts)}: max |tdb - TL| {errs[worst]:.2e} ({worst})")
    assert errs[worst] < TOL, {k: v for k, v in errs.items() if v >= TOL}
    # the processed weights themselves agree too
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in", "W_out", "b_out"):
        assert max_diff(getattr(model, name), getattr(tl, name)) < 1e-5, name
    for name in ("W_E", "W_pos", "W_U", "b_U"):
        assert max_diff(getattr(model, name), getattr(tl, name)) < 1e-5, name


def _per_position_constant(diff: torch.Tensor) -> float:
    """How far ``diff`` is from a constant along its last axis (0 = a per-position constant)."""
    return float((diff - diff.mean(-1, keepdim=True)).abs().max())


@torch.no_grad()
def test_fold_ln_changes_no_hook_and_no_logit():
    hf, tokens, base_logits, base = reference()
    model = HookedGPT2.from_hf_model(hf, fold_ln=True)
    for ln in [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_final]:
        assert ln.weight is None and ln.bias is None
    assert model.W_U_untied is not None and model.b_U_param is not None
    assert torch.equal(model.W_E, base_model_W_E(hf))  # the embedding is untouched (untied first)
    logits, cache = model.run_with_cache(tokens)
    assert max_diff(logits, base_logits) < 1e-4
    for name in base.keys():
        assert max_diff(cache[name], base[name]) < 1e-4, name
    # LayerNorm's input-side weights are mean-free over d_model after folding
    assert float(model.blocks[0].attn.W_Q.mean(1).abs().max()) < 1e-6
    assert float(model.W_in.mean(1).abs().max()) < 1e-6
    assert float(model.W_U.mean(0).abs().max()) < 1e-6
    assert model(tokens, return_type="loss").item() == pytest.approx(float(HookedGPT2.loss_fn(base_logits, tokens)), abs=1e-5)


def base_model_W_E(hf) -> torch.Tensor:
    return hf.transformer.wte.weight.detach()


WRITERS = ("hook_embed", "hook_pos_embed", "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "hook_resid_mid",
           "hook_resid_post")


@torch.no_grad()
def test_center_writing_weights_shifts_writers_by_a_per_position_constant():
    hf, tokens, base_logits, base = reference()
    model = HookedGPT2.from_hf_model(hf, center_writing_weights=True)
    logits, cache = model.run_with_cache(tokens)
    assert max_diff(logits, base_logits) < 1e-4
    changed = 0
    for name in base.keys():
        if name.endswith(WRITERS):
            diff = cache[name] - base[name]
            assert _per_position_constant(diff) < 1e-5, name
            assert float(cache[name].mean(-1).abs().max()) < 1e-5, name  # now mean-free
            changed += float(diff.abs().max()) > 1e-4
        else:
            assert max_diff(cache[name], base[name]) < 1e-4, name
    assert changed >= 2 + 5 * model.cfg.n_layers  # they really did change
    # the unembedding was untied before W_E was centred
    assert max_diff(model.W_U, base_model_W_E(hf).T) == 0.0


@torch.no_grad()
def test_center_unembed_shifts_logits_by_a_per_position_constant():
    hf, tokens, base_logits, base = reference()
    model = HookedGPT2.from_hf_model(hf, center_unembed=True)
    logits, cache = model.run_with_cache(tokens)
    diff = logits - base_logits
    assert _per_position_constant(diff) < 1e-5 and float(diff.abs().max()) > 1e-4
    assert max_diff(logits.log_softmax(-1), base_logits.log_softmax(-1)) < 1e-5
    assert float(model.W_U.mean(-1).abs().max()) < 1e-7
    for name in base.keys():
        assert max_diff(cache[name], base[name]) < 1e-5, name
    assert torch.equal(model.W_E, base_model_W_E(hf))


@torch.no_grad()
def test_fold_value_biases_moves_b_V_into_b_O():
    hf, tokens, base_logits, base = reference()
    ref = HookedGPT2.from_hf_model(hf)
    model = HookedGPT2.from_hf_model(hf, fold_value_biases=True)
    assert float(model.b_V.abs().max()) == 0.0
    logits, cache = model.run_with_cache(tokens)
    assert max_diff(logits, base_logits) < 1e-4
    for name in base.keys():
        if name.endswith(("attn.hook_v", "attn.hook_z")):
            l = int(name.split(".")[1])
            # patterns sum to 1, so each head's z loses exactly its old value bias
            assert max_diff(cache[name], base[name] - ref.blocks[l].attn.b_V) < 1e-5, name
        else:
            assert max_diff(cache[name], base[name]) < 1e-4, name
    expected_b_O = ref.b_O + torch.einsum("lhd,lhdm->lm", ref.b_V, ref.W_O)
    assert max_diff(model.b_O, expected_b_O) < 1e-6


@torch.no_grad()
def test_processing_is_idempotent_and_recorded():
    hf, tokens, _, _ = reference()
    all_on = {k: True for k in PROCESSING_FLAGS}
    model = HookedGPT2.from_hf_model(hf, **all_on)
    assert model.weight_processing == all_on
    before = {k: v.clone() for k, v in model.state_dict().items()}
    process_weights_(model, **all_on)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert max_diff(before[k], after[k]) < 1e-6, k
    assert HookedGPT2.from_hf_model(hf).__dict__.get("weight_processing") is None
    from tdb_lens.models import processing  # the module's former name still imports the same function

    assert processing.process_weights_ is process_weights_


@torch.no_grad()
def test_in_place_processing_matches_pass_through(tmp_path):
    hf, tokens, _, _ = reference()
    opts = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    a = process_weights_(HookedGPT2.from_hf_model(hf), **opts)
    b = HookedGPT2.from_hf_model(hf, **opts)
    hf.save_pretrained(tmp_path)
    c = HookedGPT2.from_pretrained(tmp_path, **opts)
    assert torch.equal(a(tokens), b(tokens)) and torch.equal(a(tokens), c(tokens))
    # reduced-precision storage: weights arrive rounded to bfloat16, are processed in float32 and
    # rounded once more, so within two bfloat16 roundings of the float32 result
    c16 = HookedGPT2.from_pretrained(tmp_path, dtype=torch.bfloat16, **opts)
    for (name, p16), (_, p32) in zip(c16.named_parameters(), c.named_parameters()):
        assert p16.dtype == torch.bfloat16
        assert max_diff(p16, p32) <= 2 ** -6 * float(p32.abs().max()) + 1e-6, name
    d = HookedGPT2.from_config(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=16, seed=0, fold_ln=True)
    assert d.ln_final.weight is None and d.weight_processing["fold_ln"]
    # processing composes with the per-head options
    a.set_use_attn_result(True)
    _, cache = a.run_with_cache(tokens, names_filter=lambda n: "attn" in n)
    assert max_diff(cache["result", 1].sum(2) + a.blocks[1].attn.b_O, cache["attn_out", 1]) < 1e-5
    a.set_use_attn_result(False)
    a.set_use_split_qkv_input(True)
    assert max_diff(a(tokens), b(tokens)) < 1e-5
    a.set_use_split_qkv_input(False)


def test_bad_inputs():
    with pytest.raises(TypeError, match="HookedGPT2"):
        process_weights_(torch.nn.Linear(2, 2), fold_ln=True)  # type: ignore[arg-type]


@torch.no_grad()
def test_process_weights_method_equals_transformer_lens_method():
    """``model.process_weights_()`` (TransformerLens' method, its defaults) on an unprocessed model
    gives TransformerLens' ``process_weights_()`` on its unprocessed model, hook by hook."""
    hf, tokens, _, _ = reference()
    model = HookedGPT2.from_hf_model(hf)
    assert model.process_weights_() is model
    tl = make_tl(hf)
    tl.process_weights_()
    logits, cache = model.run_with_cache(tokens)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    errs = {name: max_diff(cache[name], tl_cache[name]) for name in cache.keys()}
    errs["logits"] = max_diff(logits, tl_logits)
    assert max(errs.values()) < TOL, {k: v for k, v in errs.items() if v >= TOL}
    assert model.weight_processing == {k: True for k in PROCESSING_FLAGS}
    with pytest.raises(NotImplementedError, match="refactor_factored_attn_matrices"):
        model.process_weights_(refactor_factored_attn_matrices=True)
