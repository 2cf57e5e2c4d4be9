"""ARENA-style TransformerLens code run unchanged on ``transformer_lens`` and on ``tdb_lens``.

`arena_ioi` is written once, as a TransformerLens user writes it (cache indexing with negative
layers, ``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, ``logit_attrs``,
``apply_ln_to_stack``, ``tokens_to_residual_directions``, ``FactoredMatrix`` on ``OV[l, h]``,
the ``patching`` functions, ``get_act_name`` shorthands). It runs on TransformerLens'
``HookedTransformer`` and on tdb_lens' from the same random GPT-2 weights; only the imports
(``utils``, ``patching``) and the model construction differ. Every result must agree in shape and
value, with TransformerLens' default weight processing and without it. The one deliberate
difference (unprocessed models: tdb_lens' unembedding directions include the final norm's weight,
docs/PORTING.md) is checked against TransformerLens with ``fold_ln``, where the two must agree.
"""

from __future__ import annotations

import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tdb_lens
from _gpt2_reference import make_hf_gpt2, make_tl, max_diff
from tdb_lens import patching as tdb_patching
from tdb_lens import utils as tdb_utils

warnings.filterwarnings("ignore", module="transformer_lens")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens import patching as tl_patching
    from transformer_lens import utils as tl_utils

TOL = 1e-5
TL_DEFAULTS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
PROMPTS = ["When John and Mary went to the shops, John gave the bag to",
           "When Tom and James went to the park, James gave the ball to"]
CORRUPTED = ["When John and Mary went to the shops, Mary gave the bag to",
             "When Tom and James went to the park, Tom gave the ball to"]
ANSWERS = [(" Mary", " John"), (" Tom", " James")]
SHORTHANDS = ["k1a", "q0", "v2a", "pattern1", "scale2ln1", "normalized0ln2", "pre2", "post1", "resid_pre",
              "embed", "pos_embed", "z0", "attn1", "blocks.1.hook_resid_post", "hook_embed"]


def arena_ioi(model, utils, patching, with_patching: bool = True) -> dict:
    """ARENA's IOI / direct logit attribution walk-through, as TransformerLens code."""
    out: dict = {}
    tokens = model.to_tokens(PROMPTS)
    answer_tokens = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    logits, cache = model.run_with_cache(tokens)
    out["logits"] = logits
    out["resid_post_-1"] = cache["resid_post", -1]
    out["z_-2"] = cache["z", -2]
    for s in SHORTHANDS:
        if not s.startswith(("resid_pre", "embed", "pos_embed")) or "." in s:
            out[f"act {s}"] = cache[utils.get_act_name(s)]
    out["str_tokens"] = model.to_str_tokens(tokens[:1])
    seen_layers = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), lambda z, hook: seen_layers.append(hook.layer()))])
    out["hook.layer()"] = seen_layers
    out["start_at_layer"] = model(cache["resid_pre", 1], start_at_layer=1)

    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)  # [batch, 2, d_model]
    out["dirs_shape"] = tuple(answer_residual_directions.shape)
    out["one_dir_shape"] = tuple(model.tokens_to_residual_directions(answer_tokens[:1, :1]).shape)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
    final_token_residual_stream = cache["resid_post", -1][:, -1, :]
    scaled = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
    out["avg_logit_diff"] = (scaled * logit_diff_directions).sum(-1).mean()

    accumulated, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    out["accumulated_resid"], out["accumulated_labels"] = accumulated, labels
    out["accumulated_resid apply_ln"] = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True)
    out["accumulated_resid layer 2"] = cache.accumulated_resid(layer=2, apply_ln=True, mlp_input=True)
    out["apply_ln_to_stack"] = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1)
    per_layer, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    out["decompose_resid"], out["decompose_labels"] = per_layer, labels
    out["decompose_resid mlp_input"] = cache.decompose_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=[0, 3])
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    out["stack_head_results"], out["head_labels"] = heads, head_labels
    out["stack_head_results apply_ln"] = cache.stack_head_results(layer=2, pos_slice=-1, apply_ln=True)
    out["stack_head_results remainder"] = cache.stack_head_results(layer=-1, incl_remainder=True)
    out["stack_neuron_results"] = cache.stack_neuron_results(-1, pos_slice=-1)
    out["stack_neuron_results some"] = cache.stack_neuron_results(2, neuron_slice=[3, 7], return_labels=True)[1]
    out["logit_attrs"] = cache.logit_attrs(heads, tokens=answer_tokens[:, 0], incorrect_tokens=answer_tokens[:, 1],
                                           pos_slice=-1)
    out["logit_attrs decompose"] = cache.logit_attrs(per_layer, tokens=answer_tokens[:, 0], pos_slice=-1)

    OV = model.OV[1, 2]
    out["OV shape"], out["OV ndim"] = tuple(OV.shape), OV.ndim
    out["OV AB"], out["OV S"], out["OV norm"] = OV.AB, OV.S, OV.norm()
    U, S, V = OV.svd()
    out["OV U S V^T"] = U @ torch.diag_embed(S) @ V.transpose(-1, -2)
    out["QK corner"] = model.QK[0, 1].get_corner(3)
    out["QK[0] shape"] = tuple(model.QK[0].shape)
    out["full OV eigenvalues"] = model.OV.eigenvalues.abs().sort(-1).values

    if not with_patching:
        return out
    corrupted = model.to_tokens(CORRUPTED)

    def metric(lg: torch.Tensor) -> torch.Tensor:
        last = lg[:, -1]
        return (last.gather(-1, answer_tokens[:, :1]) - last.gather(-1, answer_tokens[:, 1:])).mean()

    out["patch resid_pre"] = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    out["patch head out all pos"] = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    out["patch head pattern all pos"] = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, cache, metric)
    return out


@lru_cache(maxsize=1)
def _hf():
    return make_hf_gpt2(seed=5, n_layer=3, vocab_size=50257, n_positions=64)


@lru_cache(maxsize=4)
def results(kind: str) -> dict:
    """kind: "tl" / "tl-fold_ln" / "tdb" + ("" or " processed")."""
    hf = _hf()
    processed = kind.endswith(" processed")
    if kind.startswith("tl"):
        flags = TL_DEFAULTS if processed else (dict(fold_ln=True) if "fold_ln" in kind else {})
        model, utils, patching = make_tl(hf, **flags), tl_utils, tl_patching
    else:
        load = tdb_lens.HookedTransformer.from_pretrained if processed else \
            tdb_lens.HookedTransformer.from_pretrained_no_processing
        model, utils, patching = load("gpt2", hf_model=hf), tdb_utils, tdb_patching
    with torch.no_grad():
        return arena_ioi(model, utils, patching, with_patching="fold_ln" not in kind)


def _compare(ours: dict, theirs: dict, keys) -> dict:
    errs = {}
    for k in keys:
        a, b = ours[k], theirs[k]
        if isinstance(a, torch.Tensor):
            errs[k] = max_diff(a, b.to(a.device))  # asserts equal shapes
        else:
            assert a == b, f"{k}: tdb_lens {a!r} vs transformer_lens {b!r}"
    return errs


# the unembedding directions of an unprocessed model (see the module docstring)
DIRECTIONS = {"avg_logit_diff", "logit_attrs", "logit_attrs decompose"}


@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "tl-processed"])
def test_arena_ioi_code_gives_transformer_lens_results(processed):
    suffix = " processed" if processed else ""
    ours, theirs = results("tdb" + suffix), results("tl" + suffix)
    assert set(ours) == set(theirs)
    keys = sorted(set(ours) - (set() if processed else DIRECTIONS))
    errs = _compare(ours, theirs, keys)
    worst = max(errs, key=errs.get)
    print(f"\n{'TL-processed' if processed else 'unprocessed'}: {len(keys)} results, max |tdb - TL| "
          f"{errs[worst]:.2e} ({worst})")
    assert errs[worst] < TOL, {k: v for k, v in errs.items() if v >= TOL}
    assert ours["dirs_shape"] == (2, 2, 64) and ours["one_dir_shape"] == (64,)
    assert ours["stack_head_results"].shape == (3 * 4, 2, 64)  # integer pos_slice: no position axis


def test_unprocessed_logit_attributions_include_the_final_norm_weight():
    """The deliberate difference: on a model without fold_ln, tdb_lens' residual directions are the
    final norm's weight times the unembedding column, so they equal TransformerLens' after fold_ln
    (which moves that weight into W_U), and the attributions sum to the logit difference."""
    ours, tl_folded = results("tdb"), results("tl-fold_ln")  # (TransformerLens without the patching sweeps)
    errs = _compare(ours, tl_folded, sorted(DIRECTIONS))
    assert max(errs.values()) < TOL, errs
    hf = _hf()
    model = tdb_lens.HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf)
    answer = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    logits = ours["logits"][:, -1]
    true_ld = logits.gather(-1, answer[:, :1])[:, 0] - logits.gather(-1, answer[:, 1:])[:, 0]
    b = model.ln_final.b
    bias_ld = b @ (model.W_U[:, answer[:, 0]] - model.W_U[:, answer[:, 1]])  # the constant norm-bias term
    # decompose_resid's attributions (no incorrect tokens) sum to the correct answer's logit minus its bias term
    correct = logits.gather(-1, answer[:, :1])[:, 0]
    summed = ours["logit_attrs decompose"].sum(0)
    assert max_diff(summed + b @ model.W_U[:, answer[:, 0]], correct) < 1e-4
    assert max_diff(ours["avg_logit_diff"], (true_ld - bias_ld).mean()) < 1e-4


def test_get_act_name_shorthands_match_transformer_lens():
    for s in SHORTHANDS + ["key3", "query0", "value1", "scale", "k12b"]:
        if s in ("resid_pre", "pos_embed"):
            continue
        assert tdb_utils.get_act_name(s) == tl_utils.get_act_name(s), s
    for args in [("k", 6, "a"), ("pre", 2), ("normalized", 27, "ln2"), ("resid_mid", 1), ("attn_out", 0), ("z", 3, "attn"),
                 ("attn_logits", 2), ("mlp_pre", 1), ("mlp_post", 0), ("key", 1, "a"), ("embed",), ("pos_embed",)]:
        assert tdb_utils.get_act_name(*args) == tl_utils.get_act_name(*args), args


def test_utils_match_transformer_lens():
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 6, 50, generator=g), torch.randint(0, 50, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert max_diff(tdb_utils.lm_cross_entropy_loss(logits, tokens), tl_utils.lm_cross_entropy_loss(logits, tokens)) < 1e-6
    assert max_diff(tdb_utils.lm_cross_entropy_loss(logits, tokens, per_token=True),
                    tl_utils.lm_cross_entropy_loss(logits, tokens, per_token=True)) < 1e-6
    assert max_diff(tdb_utils.lm_cross_entropy_loss(logits, tokens, attention_mask=mask),
                    tl_utils.lm_cross_entropy_loss(logits, tokens, attention_mask=mask)) < 1e-6
    assert max_diff(tdb_utils.lm_accuracy(logits, tokens), tl_utils.lm_accuracy(logits, tokens)) == 0
    x = torch.randn(5, 7, 9, generator=g)
    assert (tdb_utils.to_numpy(x) == tl_utils.to_numpy(x)).all()
    assert torch.equal(tdb_utils.get_corner(x, 2), tl_utils.get_corner(x, 2))
    for s in [None, -1, 2, (1, 4), (0, 6, 2), [0, 3]]:
        assert torch.equal(tdb_utils.Slice(s).apply(x, dim=1), tl_utils.Slice(s).apply(x, dim=1)), s
    assert max_diff(tdb_utils.gelu_new(x), tl_utils.gelu_new(x)) < 1e-6


def test_test_prompt_reports_the_rank_transformer_lens_reports(capsys):
    hf = _hf()
    ours = tdb_lens.HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf)
    tl = make_tl(hf)
    rows = tdb_utils.test_prompt(PROMPTS[0], "Mary", ours, print_details=False, top_k=5)
    tokens = tl.to_tokens(PROMPTS[0] + " Mary")
    with torch.no_grad():
        last = tl(tokens)[0, -2]
    want_rank = int((last > last[tl.to_single_token(" Mary")]).sum())
    assert rows is not None and rows[0]["rank"] == want_rank and rows[0]["token"] == " Mary"
    assert [t for t, _, _ in rows[0]["top"]] == [tl.to_string([int(i)]) for i in last.topk(5).indices]
    tdb_utils.test_prompt(PROMPTS[0], "Mary", ours, top_k=3)
    assert f"rank {want_rank}" in capsys.readouterr().out


def test_transformer_lens_surface():
    from tdb_lens.hook_points import HookPoint

    assert HookPoint is tdb_lens.HookPoint and tdb_lens.FactoredMatrix is tdb_lens.models.FactoredMatrix
    cfg = tdb_lens.HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, act_fn="gelu_new", d_vocab=100)
    assert isinstance(cfg, tdb_lens.GPT2Config) and cfg.n_heads == 4 and cfg.d_mlp == 256
    assert (cfg.act_fn, cfg.normalization_type, cfg.positional_embedding_type) == ("gelu_new", "LN", "standard")
    llama = tdb_lens.HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, n_heads=4, act_fn="silu", d_vocab=50,
                                             normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                                             n_key_value_heads=2)
    assert isinstance(llama, tdb_lens.LlamaConfig) and llama.n_key_value_heads == 2 and llama.normalization_type == "RMS"
    with pytest.raises(ValueError, match="supported"):
        tdb_lens.HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, act_fn="relu", d_vocab=50)
    from tdb_lens.compat import from_config

    model = from_config(cfg, seed=0)
    assert isinstance(model, tdb_lens.HookedGPT2) and "blocks.0.attn" in model.mod_dict
    assert model.blocks[0].ln1.w is model.blocks[0].ln1.weight and model.blocks[0].ln1.b is model.blocks[0].ln1.bias
    with pytest.raises(TypeError, match="does not implement"):
        tdb_lens.HookedTransformer.from_pretrained("gpt2", hf_model=_hf(), n_devices_typo=2)
    # run_with_cache(return_type=None) still records the final norm's scale (for logit_attrs)
    out, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), return_type=None)
    assert out is None and cache["ln_final.hook_scale"].shape == (1, 3, 1)


def test_tokenizer_called_like_hugging_face():
    """TransformerLens code calls ``model.tokenizer(prompts, padding=True, return_tensors="pt")`` and
    ``model.tokenizer.batch_decode``: same ids, masks and text as transformers' GPT-2 tokenizer."""
    from _gpt2_reference import hf_tokenizer

    ours = tdb_lens.HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=_hf()).tokenizer
    theirs = hf_tokenizer()
    theirs.pad_token = theirs.eos_token
    for side in ("right", "left"):
        theirs.padding_side = side
        a, b = ours(PROMPTS + ["Hi"], padding=True, return_tensors="pt", padding_side=side), theirs(
            PROMPTS + ["Hi"], padding=True, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        assert ours.batch_decode(a["input_ids"]) == theirs.batch_decode(b["input_ids"])
        assert ours.batch_decode(a["input_ids"], skip_special_tokens=True) == theirs.batch_decode(
            b["input_ids"], skip_special_tokens=True)
    assert ours(PROMPTS[0]) == dict(theirs(PROMPTS[0]))
    with pytest.raises(ValueError, match="padding=True"):
        ours(PROMPTS + ["Hi"], return_tensors="pt")


def llama_cache_idioms(model, tokens: torch.Tensor, answers: torch.Tensor) -> dict:
    """The cache decompositions on a Llama-family model (RMSNorm, rotary, grouped-query attention)."""
    _, cache = model.run_with_cache(tokens)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    return {
        "resid_post -1": cache["resid_post", -1],
        "accumulated_resid apply_ln": cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True),
        "accumulated_resid layer 1": cache.accumulated_resid(layer=1, apply_ln=True, mlp_input=True),
        "decompose_resid": cache.decompose_resid(layer=-1, pos_slice=-1, apply_ln=True),
        "decompose_resid labels": cache.decompose_resid(layer=2, return_labels=True)[1],
        "stack_head_results": heads,
        "stack_head_results apply_ln": cache.stack_head_results(layer=2, pos_slice=[1, 4], apply_ln=True),
        "stack_neuron_results": cache.stack_neuron_results(-1, pos_slice=-1),
        "apply_ln_to_stack": cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1),
        "OV": model.OV[1, 3].AB, "QK": model.QK[0, 2].AB, "OV S": model.OV[2, 1].S,
        "dirs": model.tokens_to_residual_directions(answers).shape,
    }


@torch.no_grad()
def test_llama_cache_idioms_match_transformer_lens():
    from tdb_lens import HookedLlama
    from test_llama_parity import VOCAB, _tl_model, make_hf

    hf = make_hf("llama_gqa_untied", seed=3)
    ours, theirs = HookedLlama.from_hf_model(hf).eval(), _tl_model(hf, ungroup=False)
    g = torch.Generator().manual_seed(2)
    tokens, answers = torch.randint(0, VOCAB, (2, 9), generator=g), torch.randint(0, VOCAB, (2, 2), generator=g)
    got, want = llama_cache_idioms(ours, tokens, answers), llama_cache_idioms(theirs, tokens, answers)
    errs = _compare(got, want, sorted(got))
    assert max(errs.values()) < TOL, errs
    # logit_attrs: tdb_lens' directions carry the final RMSNorm's weight (docs/PORTING.md), so the
    # head attributions are TransformerLens' normalised heads dotted with weight * W_U
    _, cache = ours.run_with_cache(tokens)
    attrs = cache.logit_attrs(got["stack_head_results"], tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1)
    w = ours.ln_final.w
    direction = (theirs.W_U[:, answers[:, 0]] - theirs.W_U[:, answers[:, 1]]).T * w
    assert max_diff(attrs, (want["apply_ln_to_stack"] * direction).sum(-1)) < TOL
