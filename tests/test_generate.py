"""Generation: greedy with and without the KV cache, against ``transformers``' ``generate``; stop
tokens; hooks active at every step; sampling against transformers' warpers; every setting checked
before the first forward."""

from __future__ import annotations

import copy
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _gpt2_reference import make_hf_gpt2
from tdb_lens import HookedGPT2

PROMPT = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(9))
N_NEW = 15


@lru_cache(maxsize=1)
def models():
    # GPT-2's vocabulary (so the tokenizer's pad id 50256 is a valid token); block_std=0.2 for
    # varied greedy continuations
    hf = make_hf_gpt2(seed=41, vocab_size=50257, block_std=0.2)
    hf.generation_config.eos_token_id = None  # generate exactly N_NEW tokens
    hf.generation_config.pad_token_id = 50256
    return hf, HookedGPT2.from_hf_model(hf)


def _hf_generate(hf, tokens, mask=None, n=N_NEW):
    mask = torch.ones_like(tokens) if mask is None else mask
    with torch.no_grad():
        return hf.generate(tokens, attention_mask=mask, max_new_tokens=n, do_sample=False)


def test_greedy_with_cache_equals_without_and_equals_transformers():
    hf, model = models()
    cached = model.generate(PROMPT, max_new_tokens=N_NEW, use_past_kv_cache=True, stop_at_eos=False)
    uncached = model.generate(PROMPT, max_new_tokens=N_NEW, use_past_kv_cache=False, stop_at_eos=False)
    ref = _hf_generate(hf, PROMPT)
    assert cached.shape == (1, 6 + N_NEW)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)
    assert len(set(cached[0, 6:].tolist())) > 3  # a real continuation, not one repeated token
    assert torch.equal(cached[:, :6], PROMPT)


def test_batched_left_padded_text_generation_equals_transformers():
    hf = make_hf_gpt2(seed=42, vocab_size=50257, block_std=0.2)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 50256
    model = HookedGPT2.from_hf_model(hf)
    texts = ["The capital of France is", "Hi", "One two three four five six"]
    out = model.generate(texts, max_new_tokens=8, stop_at_eos=False, return_type="tokens")
    tokens, mask = model.to_tokens_and_mask(texts, padding_side="left")
    ref = _hf_generate(hf, tokens, mask, n=8)
    assert torch.equal(out, ref)
    assert len(set(out[:, -8:].flatten().tolist())) > 3
    # each prompt generated alone continues the same way
    for i, t in enumerate(texts):
        alone = model.generate(t, max_new_tokens=8, stop_at_eos=False, return_type="tokens")
        assert torch.equal(alone[0, -8:], out[i, -8:])
    texts_out = model.generate(texts, max_new_tokens=8, stop_at_eos=False)
    # the text continues each prompt; the BOS that to_tokens prepended is not in it (as TransformerLens)
    assert [s.startswith(t) for s, t in zip(texts_out, texts)] == [True] * 3
    full_mask = torch.cat([mask, torch.ones(len(texts), 8, dtype=mask.dtype)], dim=1).bool()  # nothing stopped
    for i, s in enumerate(texts_out):
        assert s == model.to_string(out[i][full_mask[i]][1:])
        assert out[i][full_mask[i]][0] == model.tokenizer.bos_token_id  # what was dropped is that BOS


def test_text_generation_drops_only_the_prepended_bos():
    """TransformerLens returns the decoded continuation without the BOS it prepended. Reference: the
    tokens generate returns for the same call, decoded without that first id."""
    _, model = models()
    bos_text = model.tokenizer.decode([model.tokenizer.bos_token_id])
    assert bos_text == "<|endoftext|>"
    text = "The capital of France is"
    toks = model.generate(text, max_new_tokens=6, stop_at_eos=False, return_type="tokens")
    assert toks[0, 0] == model.tokenizer.bos_token_id
    out = model.generate(text, max_new_tokens=6, stop_at_eos=False)
    assert isinstance(out, str) and out.startswith(text) and out == model.to_string(toks[0, 1:])
    # without a prepended BOS nothing is dropped
    toks_nb = model.generate(text, max_new_tokens=6, stop_at_eos=False, prepend_bos=False, return_type="tokens")
    assert toks_nb[0, 0] != model.tokenizer.bos_token_id
    out_nb = model.generate(text, max_new_tokens=6, stop_at_eos=False, prepend_bos=False)
    assert out_nb.startswith(text) and out_nb == model.to_string(toks_nb[0])
    # a BOS the caller wrote into the text is the caller's: kept, whether or not one is prepended
    own = bos_text + text
    assert model.generate(own, max_new_tokens=6, stop_at_eos=False).startswith(own)
    assert model.generate(own, max_new_tokens=6, stop_at_eos=False, prepend_bos=False).startswith(own)
    # token input returns tokens; asked for text, it is all of them decoded (nothing was prepended)
    as_text = model.generate(toks[:, :5], max_new_tokens=3, stop_at_eos=False, return_type="str")
    assert as_text[0].startswith(bos_text)


def test_stop_tokens_stop_generation():
    _, model = models()
    full = model.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False)
    new = full[0, 6:].tolist()
    assert len(set(new)) > 3, "the reference continuation should not be one repeated token"
    # in a batch, a finished row is padded while the others go on: pick a stop token that only
    # the first row produces
    other_prompt = PROMPT.flip(1)
    other = model.generate(other_prompt, max_new_tokens=N_NEW, stop_at_eos=False)[0, 6:].tolist()
    candidates = [t for t in new[2:] if t not in other]
    assert candidates
    stop = candidates[0]
    first = new.index(stop)
    out = model.generate(PROMPT, max_new_tokens=N_NEW, stop_tokens=[stop], stop_at_eos=False)
    assert out[0, 6:].tolist() == new[: first + 1]  # stops right after emitting the stop token
    out = model.generate(torch.cat([PROMPT, other_prompt]), max_new_tokens=N_NEW, stop_tokens=[stop], stop_at_eos=False)
    assert out.shape[1] == 6 + N_NEW and out[1, 6:].tolist() == other
    assert out[0, 6: 6 + first + 1].tolist() == new[: first + 1]
    assert set(out[0, 6 + first + 1:].tolist()) <= {model.tokenizer.pad_id}
    # and once every row has stopped, generation ends
    assert model.generate(PROMPT, max_new_tokens=N_NEW, stop_tokens=[new[0]], stop_at_eos=False).shape[1] == 7


def test_hooks_are_active_during_generation():
    hf, model = models()
    base = model.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False)

    def zero(act, hook):
        return torch.zeros_like(act)

    # hooks passed to generate, with and without the KV cache
    hooked = model.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    hooked_nc = model.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False, use_past_kv_cache=False,
                               fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    assert not torch.equal(hooked, base)
    assert torch.equal(hooked, hooked_nc)
    # same as deleting that MLP's output from the weights of the reference model
    edited = copy.deepcopy(hf)
    with torch.no_grad():
        edited.transformer.h[1].mlp.c_proj.weight.zero_()
        edited.transformer.h[1].mlp.c_proj.bias.zero_()
    assert torch.equal(hooked, _hf_generate(edited, PROMPT))
    # hooks already on the model (a `with model.hooks(...)` block) are active too
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", zero)]):
        assert torch.equal(model.generate(PROMPT, max_new_tokens=N_NEW, stop_at_eos=False), hooked)
    assert model.n_hooks() == 0
    # with the cache, each step's hooks see only the new position
    shapes = []
    model.generate(PROMPT, max_new_tokens=4, stop_at_eos=False,
                   fwd_hooks=[("hook_embed", lambda a, hook: shapes.append(tuple(a.shape)))])
    assert shapes == [(1, 6, 64)] + [(1, 1, 64)] * 3
    assert model.n_hooks() == 0


# ------------------------------------------------------------------------------ settings checked first

BAD_SETTINGS = [
    ({"do_sample": True, "temperature": -1.0}, r"temperature must be a finite number > 0, got -1\.0"),
    ({"temperature": float("nan")}, r"temperature must be a finite number > 0, got nan"),
    ({"do_sample": True, "temperature": 0}, r"temperature=0 with do_sample=True: sampling needs temperature > 0"),
    ({"do_sample": True, "top_k": 0}, r"top_k must be None or an integer >= 1, got 0"),
    ({"do_sample": True, "top_k": 2.5}, r"top_k must be None or an integer >= 1, got 2\.5"),
    ({"do_sample": True, "top_p": 0}, r"top_p must be None or a number in \(0, 1\], got 0"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p must be None or a number in \(0, 1\], got 1\.5"),
    ({"do_sample": True, "top_p": float("nan")}, r"top_p must be None or a number in \(0, 1\], got nan"),
    ({"max_new_tokens": -1}, r"max_new_tokens must be an integer >= 0, got -1"),
    ({"max_new_tokens": 2.0}, r"max_new_tokens must be an integer >= 0, got 2\.0"),
    ({"return_type": "text"}, r"return_type must be one of 'auto', 'input', 'str', 'tokens', got 'text'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SETTINGS)
def test_generate_refuses_bad_settings_before_running(kwargs, message):
    _, model = models()
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: calls.append(1))]):
        # a value of the wrong type meets the suite's run-time type checker (conftest.py) first,
        # which names the parameter; without it the library's own check gives ``message``
        wrong_type = "|".join(f"parameter '?{k}" for k in kwargs)
        with pytest.raises((ValueError, TypeError), match=f"{message}|{wrong_type}"):
            model.generate(PROMPT, **{"max_new_tokens": 3, **kwargs})
    assert calls == [] and model.n_hooks() == 0  # nothing ran, nothing left behind


def test_generate_edge_settings_that_are_valid():
    _, model = models()
    assert torch.equal(model.generate(PROMPT, max_new_tokens=0), PROMPT)
    greedy = model.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, stop_at_eos=False, temperature=0), greedy)
    # top_k=1 sampling is greedy; a top_k above the vocabulary keeps every token (it was a torch error)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, stop_at_eos=False, do_sample=True, top_k=1, seed=0), greedy)
    assert model.generate(PROMPT, max_new_tokens=2, do_sample=True, top_k=10**6, seed=0).shape == (1, 8)
    assert isinstance(model.generate(PROMPT, max_new_tokens=2, return_type="str"), list)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, stop_at_eos=False, return_type="input"), greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.7, 6, 0.75)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    """Frequencies of 20000 draws against the probabilities transformers' own temperature / top-k / top-p
    warpers give (applied in transformers' order); tokens they exclude are never drawn."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from tdb_lens.models.sampling import next_token

    logits = torch.tensor([[2.0, 1.5, 1.2, 0.3, 0.2, -0.5, -1.0, -3.0]])
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    expected = ref.softmax(-1)[0]
    n = 20000
    draws = next_token(logits.expand(n, -1), True, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=8).float() / n
    assert set(draws.unique().tolist()) <= set(expected.nonzero().flatten().tolist())
    assert (freq - expected).abs().max() < 0.02  # 4.5 standard errors at p = 0.5


def test_token_helpers_name_bad_input():
    _, model = models()
    with pytest.raises(ValueError, match="to_tokens got an empty list of strings"):
        model.to_tokens([])
    # (or the suite's run-time type checker, which names the parameter first)
    with pytest.raises(TypeError, match="to_tokens expects a string or a list of strings, got int|parameter '?input"):
        model.to_tokens(5)
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary \[0, 50257\)"):
        model.to_single_token(50257)
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model.to_single_token(-1)
    with pytest.raises(ValueError, match=r"' hello world' is 2 tokens"):
        model.to_single_token(" hello world")
    assert model.to_single_token(" hello") == model.to_tokens(" hello", prepend_bos=False)[0, 0].item()
