"""HookedGPT2 against independent implementations: ``transformers``' GPT2LMHeadModel and
TransformerLens' HookedTransformer built from the same random weights; padding; the tokenizer."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from _gpt2_reference import GPT2_SMALL, hf_tokenizer, make_hf_gpt2, make_tl, max_diff
from tdb_lens import HookedGPT2
from tdb_lens.tokenizer import gpt2_tokenizer

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: on a shared 2-core machine a second OpenMP thread mostly
    waits for the first (several times slower); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# GPT-2-small shape, random weights
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    hf = make_hf_gpt2(seed=0, **GPT2_SMALL)
    ours = HookedGPT2.from_hf_model(hf)
    tokens = torch.randint(0, GPT2_SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    return hf, ours, tokens


@torch.no_grad()
def test_logits_and_hidden_states_equal_transformers(small):
    hf, ours, tokens = small
    ref = hf(tokens, output_hidden_states=True, labels=tokens)
    logits, cache = ours.run_with_cache(tokens)
    errs = {"logits": max_diff(logits, ref.logits)}
    n = ours.cfg.n_layers
    assert len(ref.hidden_states) == n + 1
    for l in range(n):
        errs[f"hidden_{l}"] = max_diff(cache["resid_pre", l], ref.hidden_states[l])
    # Hugging Face's last hidden state is after ln_f (weight and bias applied)
    ln_f = ours.ln_final
    errs["hidden_final"] = max_diff(cache["ln_final.hook_normalized"] * ln_f.weight + ln_f.bias, ref.hidden_states[n])
    print("\nmax |tdb - transformers| (GPT-2-small shape):", max(errs.values()))
    assert max(errs.values()) < TOL, errs
    # the loss is the same next-token cross-entropy
    assert abs(float(ours(tokens, return_type="loss")) - float(ref.loss)) < 1e-5
    # unhooked forward (fused kernels) equals the hooked one
    assert max_diff(ours(tokens), logits) < 1e-5


@torch.no_grad()
def test_every_shared_hook_equals_transformer_lens(small):
    hf, ours, tokens = small
    tl = make_tl(hf)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    logits, cache = ours.run_with_cache(tokens)
    shared = sorted(set(cache.keys()) & set(tl_cache.keys()))
    # every activation tdb_lens records by default has a TransformerLens counterpart
    assert set(cache.keys()) <= set(tl_cache.keys()), set(cache.keys()) - set(tl_cache.keys())
    assert len(shared) == len(cache) == 2 + 17 * ours.cfg.n_layers + 2
    errs = {name: max_diff(cache[name], tl_cache[name]) for name in shared}
    errs["logits"] = max_diff(logits, tl_logits)
    worst = max(errs, key=errs.get)
    print(f"\nmax |tdb - TransformerLens| over {len(shared)} hooks + logits: {errs[worst]:.2e} ({worst})")
    assert errs[worst] < TOL, {k: v for k, v in errs.items() if v >= TOL}


# --------------------------------------------------------------------------------------------
# Small random model: per-head options, padding
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def tiny():
    hf = make_hf_gpt2(seed=3)
    return hf, HookedGPT2.from_hf_model(hf)


@torch.no_grad()
def test_use_attn_result():
    hf, model = tiny()
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    base = model(tokens)
    model.set_use_attn_result(True)
    try:
        logits, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    assert max_diff(logits, base) < 1e-5
    tl = make_tl(hf)
    tl.set_use_attn_result(True)
    _, tl_cache = tl.run_with_cache(tokens)
    for l in range(model.cfg.n_layers):
        result = cache["result", l]
        assert result.shape == (2, 9, model.cfg.n_heads, model.cfg.d_model)
        # heads' writes add up to the attention output minus the output bias
        assert max_diff(result.sum(2), cache["attn_out", l] - model.blocks[l].attn.b_O) < 1e-5
        assert max_diff(result, tl_cache[f"blocks.{l}.attn.hook_result"]) < TOL
    assert "blocks.0.attn.hook_result" not in model.run_with_cache(tokens)[1]  # off again


@torch.no_grad()
def test_use_split_qkv_input():
    hf, model = tiny()
    tokens = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    base_logits, base = model.run_with_cache(tokens)
    model.set_use_split_qkv_input(True)
    try:
        logits, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_split_qkv_input(False)
    assert max_diff(logits, base_logits) < 1e-5
    tl = make_tl(hf)
    tl.set_use_split_qkv_input(True)
    _, tl_cache = tl.run_with_cache(tokens)
    h = model.cfg.n_heads
    for l in range(model.cfg.n_layers):
        for which in ("q_input", "k_input", "v_input"):
            x = cache[which, l]
            assert x.shape == (2, 7, h, model.cfg.d_model)
            assert torch.equal(x, base["resid_pre", l][:, :, None].expand_as(x))
            assert max_diff(x, tl_cache[f"blocks.{l}.hook_{which}"]) < TOL
        for which in ("q", "k", "v", "z"):
            assert max_diff(cache[which, l], base[which, l]) < 1e-5
    # per-head inputs can be edited one head at a time
    def zero_head0(x, hook):
        x = x.clone()
        x[:, :, 0] = 0
        return x

    model.set_use_split_qkv_input(True)
    try:
        edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_v_input", zero_head0)])
    finally:
        model.set_use_split_qkv_input(False)
    assert max_diff(edited, base_logits) > 1e-4


def _compare_padded(model, seqs, side):
    """Each sequence of a padded batch gives what it gives alone (logits and activations)."""
    n = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        tokens[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    names = lambda name: any(name.endswith(k) for k in (
        "hook_resid_pre", "hook_resid_post", "hook_z", "hook_post", "hook_pattern", "hook_normalized", "hook_q"))
    fast = model(tokens, attention_mask=mask)  # fused attention with a mask
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    for i, s in enumerate(seqs):
        L = len(s)
        sl = slice(0, L) if side == "right" else slice(n - L, n)
        alone_logits, alone = model.run_with_cache(torch.tensor([s]), names_filter=names)
        assert max_diff(logits[i, sl], alone_logits[0]) < 1e-5
        assert max_diff(fast[i, sl], alone_logits[0]) < 1e-5
        for name, act in alone.items():
            if name.endswith("hook_pattern"):
                got = cache[name][i][:, sl, sl]
                # real queries give no weight to padding
                assert float(cache[name][i][:, sl].sum(-1).sub(1).abs().max()) < 1e-5
            else:
                got = cache[name][i][sl]
            assert max_diff(got, act[0]) < 1e-5, name


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=10), min_size=2, max_size=4),
    side=st.sampled_from(["right", "left"]),
)
@torch.no_grad()
def test_padded_batch_equals_each_sequence_alone(seqs, side):
    _compare_padded(tiny()[1], seqs, side)


@torch.no_grad()
def test_padded_batch_from_text_matches_transformers():
    """Text batches are padded by to_tokens; Hugging Face given the same tokens and mask agrees."""
    hf = make_hf_gpt2(seed=5, vocab_size=50257)
    model = HookedGPT2.from_hf_model(hf)
    texts = ["Hello there, how are you?", "Hi", "The quick brown fox jumps"]
    for side in ("right", "left"):
        tokens, mask = model.to_tokens_and_mask(texts, padding_side=side)
        ours = model(tokens, attention_mask=mask)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(tokens, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert max_diff(ours[real], ref[real]) < TOL
        # same as the text passed straight to the model (right padding is the default)
        if side == "right":
            assert torch.equal(model(texts), ours)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
TEXTS = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά",
    "numbers 1234567890 3.14159 -42 1e-5",
    "contractions: don't, I'm, we've, they're, she'll, it's, I'd",
    "code: def f(x): return x**2  # comment\n    if a != b: pass",
    "<|endoftext|>special token in the middle<|endoftext|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
    " ",
    "MiXeD CaSe and punctuation!!! ??? ... ---",
]


def test_tokenizer_ids_equal_transformers():
    ours, ref = gpt2_tokenizer(), hf_tokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours.vocab_size == len(ref) == 50257
    assert ours.bos_token_id == ours.eos_token_id == ref.eos_token_id == 50256


@lru_cache(maxsize=1)
def text_model():
    return HookedGPT2.from_config(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=64, seed=0)


def test_to_tokens_prepends_bos_by_default():
    model, ref = text_model(), hf_tokenizer()
    toks = model.to_tokens("Hello world!")
    assert toks.dtype == torch.long and toks.shape == (1, 4)
    assert toks[0].tolist() == [50256] + ref("Hello world!")["input_ids"]
    assert model.to_tokens("Hello world!", prepend_bos=False)[0].tolist() == ref("Hello world!")["input_ids"]
    batch = model.to_tokens(["a b c", "a"])
    assert batch.shape == (2, 4) and batch[:, 0].tolist() == [50256, 50256]


def test_to_str_tokens_and_get_token_position():
    model, ref = text_model(), hf_tokenizer()
    text = "The cat sat on the mat. The cat"
    strs = model.to_str_tokens(text)
    ids = ref(text)["input_ids"]
    assert strs == ["<|endoftext|>"] + [ref.decode([i]) for i in ids]
    assert "".join(strs[1:]) == text
    assert model.to_str_tokens(model.to_tokens(text)) == strs  # [1, n] is one sequence, as TransformerLens
    assert model.to_str_tokens(text, prepend_bos=False) == strs[1:]
    # [BOS, The, cat, sat, on, the, mat, ., The, cat]
    assert model.get_token_position(" cat", text) == 2
    assert model.get_token_position(" cat", text, mode="last") == 9
    assert model.get_token_position(" cat", text, prepend_bos=False) == 1
    assert model.get_token_position(ids[1], torch.tensor(ids)) == 1
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(" dog", text)
    with pytest.raises(ValueError, match="exactly one"):
        model.get_token_position(" catastrophe is", text)
