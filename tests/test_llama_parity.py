"""HookedLlama against independent references on small random configs (no downloads, CPU, seconds).

References: ``transformers``' LlamaForCausalLM / Qwen2ForCausalLM (logits, hidden states, greedy
``generate``) and ``transformer_lens``' HookedTransformer built offline from the same weights with
its own Llama weight conversion (every hook both libraries share).

GQA note: transformer_lens' ``attn.hook_k``/``hook_v`` are per key/value head
``[batch, pos, n_kv_heads, d_head]`` by default (``ungroup_grouped_query_attention=False``), the
same as ours; with ``ungroup_grouped_query_attention=True`` they are repeated to one slice per
query head, which equals ours ``repeat_interleave``d ``n_heads // n_kv_heads`` times along the
head axis. Both are checked below.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import tdb_lens
from tdb_lens.models.components import KVCache
from tdb_lens.models.llama import HookedLlama, LlamaConfig

ATOL = 1e-4
VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: a second intra-op thread only adds synchronisation (much worse on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  max_position_embeddings=128, rms_norm_eps=1e-5)
    if kind == "llama_gqa_untied":
        return transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2,
                                        rope_theta=500.0, tie_word_embeddings=False)
    if kind == "llama_mha_tied":
        return transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=True)
    if kind == "llama_head_dim":  # head_dim != hidden_size / n_heads (as some Llama-family models)
        return transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                        tie_word_embeddings=False)
    if kind == "llama3_rope":
        # original context 32 with d_head 16: the rotary wavelengths span the scaled, smoothed and
        # untouched regimes of Llama 3's frequency rescaling
        return transformers.LlamaConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32},
        )
    if kind == "qwen2_bias":
        return transformers.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, rope_theta=1000.0)
    raise KeyError(kind)


KINDS = ["llama_gqa_untied", "llama_mha_tied", "llama_head_dim", "llama3_rope", "qwen2_bias"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform; norm weights away from one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.12 * noise)


def make_hf(kind: str, seed: int = 0):
    cfg = _hf_config(kind)
    cls = transformers.Qwen2ForCausalLM if kind.startswith("qwen2") else transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    _randomize(hf, seed)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    hf = make_hf(request.param)
    return request.param, hf, HookedLlama.from_hf_model(hf).eval()


def _tokens(batch: int, pos: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_config_reads_transformers_v5_rope_parameters():
    cfg = LlamaConfig.from_hf(_hf_config("llama3_rope").to_dict())
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert LlamaConfig.from_hf(_hf_config("llama_gqa_untied").to_dict()).rope_theta == 500.0
    q = LlamaConfig.from_hf(_hf_config("qwen2_bias").to_dict())
    assert q.attention_bias and q.rope_theta == 1000.0 and q.rope_scaling is None


@torch.no_grad()
def test_logits_and_hidden_states_match_transformers(pair):
    kind, hf, model = pair
    tokens = _tokens(3, 40)
    out = hf(tokens, output_hidden_states=True)
    last_block_out = {}
    handle = hf.model.layers[-1].register_forward_hook(
        lambda mod, inp, o: last_block_out.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    try:
        hf(tokens)
    finally:
        handle.remove()
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    n = model.cfg.n_layers
    # transformers' hidden_states: the input of every layer, then the final-normed output
    for layer in range(n):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], atol=ATOL, rtol=0)
    resid_final = cache[f"blocks.{n - 1}.hook_resid_post"]
    torch.testing.assert_close(resid_final, last_block_out["x"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.ln_final(resid_final), out.hidden_states[n], atol=ATOL, rtol=0)
    # the plain (hook-free, fused-kernel) forward is the same computation
    torch.testing.assert_close(model(tokens), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama_gqa_untied", "llama_mha_tied", "qwen2_bias"])
@torch.no_grad()
def test_save_pretrained_checkpoint_loads(kind, tmp_path):
    hf = make_hf(kind, seed=3)
    hf.save_pretrained(tmp_path)
    tokens = _tokens(2, 24)
    ref = hf(tokens).logits
    a = HookedLlama.from_pretrained(tmp_path)
    b = tdb_lens.load(tmp_path)
    assert isinstance(b, HookedLlama)
    assert a.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    la, lb = a(tokens), b(tokens)
    assert torch.equal(la, lb)
    torch.testing.assert_close(la, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(la, HookedLlama.from_hf_model(hf)(tokens), atol=0, rtol=0)


@pytest.mark.parametrize("hooked", [False, True])
def test_gradients_match_transformers(hooked):
    """Backward through the fused path and through the step-by-step (hooked) attention path."""
    hf = make_hf("llama_gqa_untied", seed=11)
    model = HookedLlama.from_hf_model(hf)
    tokens = _tokens(2, 19, seed=12)
    hf(tokens, labels=tokens).loss.backward()
    fwd_hooks = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(model.cfg.n_layers)] if hooked else []
    with model.hooks(fwd_hooks):
        model(tokens, return_type="loss").backward()
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        mine = ours[HookedLlama._rename(name)]
        torch.testing.assert_close(mine.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---- transformer_lens ------------------------------------------------------------------------
def _tl_model(hf, ungroup: bool):
    import transformer_lens as tl
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf.config
    rp = c.rope_parameters or {}
    tl_cfg = tl.HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn="silu", n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=c.head_dim, rotary_base=rp.get("rope_theta", 10000.0), final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", dtype=torch.float32, device="cpu",
        ungroup_grouped_query_attention=ungroup,
    )
    model = tl.HookedTransformer(tl_cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, tl_cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model.eval()


@pytest.fixture(scope="module")
def tl_pair():
    hf = make_hf("llama_gqa_untied", seed=5)
    return HookedLlama.from_hf_model(hf).eval(), _tl_model(hf, ungroup=False), _tl_model(hf, ungroup=True)


@torch.no_grad()
def test_every_shared_hook_matches_transformer_lens(tl_pair):
    ours, tl, _ = tl_pair
    tokens = _tokens(2, 33, seed=7)
    our_logits, our_cache = ours.run_with_cache(tokens)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    torch.testing.assert_close(our_logits, tl_logits, atol=ATOL, rtol=0)
    shared = sorted(set(our_cache.keys()) & set(tl_cache.keys()))
    only_ours = sorted(set(our_cache.keys()) - set(tl_cache.keys()))
    only_tl = sorted(set(tl_cache.keys()) - set(our_cache.keys()))
    n = ours.cfg.n_layers
    per_layer = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                 "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern",
                 "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
                 "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    expected = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
    expected |= {f"blocks.{l}.{h}" for l in range(n) for h in per_layer}
    assert expected <= set(shared), f"hooks missing from the shared set: {sorted(expected - set(shared))}"
    assert not only_ours, f"hooks only we cache by default: {only_ours}"
    # transformer_lens 3 also hooks the unembedding's input and output (opt-in here, set_use_unembed_hooks,
    # so not in the default set): they
    # are the final-normed residual and the logits, which are checked against ours directly
    assert only_tl == ["unembed.hook_in", "unembed.hook_out"], f"hooks only transformer_lens caches: {only_tl}"
    torch.testing.assert_close(tl_cache["unembed.hook_out"], our_logits, atol=ATOL, rtol=0)
    normed = ours.ln_final(our_cache[f"blocks.{n - 1}.hook_resid_post"])
    torch.testing.assert_close(tl_cache["unembed.hook_in"], normed, atol=ATOL, rtol=0)
    for name in shared:
        a, b = our_cache[name], tl_cache[name]
        assert a.shape == b.shape, f"{name}: ours {tuple(a.shape)} vs transformer_lens {tuple(b.shape)}"
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@torch.no_grad()
def test_grouped_kv_hooks_match_ungrouped_transformer_lens(tl_pair):
    ours, _, tl_ungrouped = tl_pair
    tokens = _tokens(2, 17, seed=8)
    _, our_cache = ours.run_with_cache(tokens)
    _, tl_cache = tl_ungrouped.run_with_cache(tokens)
    rep = ours.cfg.n_heads // ours.cfg.n_key_value_heads
    for l in range(ours.cfg.n_layers):
        for h in ("hook_k", "hook_v", "hook_rot_k"):
            name = f"blocks.{l}.attn.{h}"
            assert our_cache[name].shape[2] == ours.cfg.n_key_value_heads
            assert tl_cache[name].shape[2] == ours.cfg.n_heads
            torch.testing.assert_close(our_cache[name].repeat_interleave(rep, dim=2), tl_cache[name], atol=ATOL, rtol=0)
        for h in ("hook_pattern", "hook_z", "hook_q"):
            name = f"blocks.{l}.attn.{h}"
            torch.testing.assert_close(our_cache[name], tl_cache[name], atol=ATOL, rtol=0)


@torch.no_grad()
def test_weight_views_match_transformer_lens(tl_pair):
    ours, tl, tl_ungrouped = tl_pair
    torch.testing.assert_close(ours.W_E, tl.W_E, atol=0, rtol=0)
    torch.testing.assert_close(ours.W_U, tl.W_U, atol=0, rtol=0)
    for name in ("W_Q", "W_O", "W_in", "W_out"):
        torch.testing.assert_close(getattr(ours, name), getattr(tl, name), atol=0, rtol=0)
    for l, block in enumerate(ours.blocks):
        torch.testing.assert_close(block.mlp.W_gate, tl.blocks[l].mlp.W_gate, atol=0, rtol=0)
        torch.testing.assert_close(block.attn.W_K, tl.blocks[l].attn._W_K, atol=0, rtol=0)
        torch.testing.assert_close(block.attn.W_V, tl.blocks[l].attn._W_V, atol=0, rtol=0)
        torch.testing.assert_close(block.attn.W_K_per_query_head, tl_ungrouped.blocks[l].attn.W_K, atol=0, rtol=0)
        torch.testing.assert_close(block.attn.W_V_per_query_head, tl_ungrouped.blocks[l].attn.W_V, atol=0, rtol=0)


# ---- padding and generation ------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_padded_batch_equals_single_runs(pair, side):
    _, _, model = pair
    lengths = [21, 9, 15, 1]
    seqs = [_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        tokens[i, sl], mask[i, sl] = s, 1
    batched = model(tokens, attention_mask=mask)
    _, hooked_cache = model.run_with_cache(tokens, attention_mask=mask)  # the step-by-step attention path
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        single, single_cache = model.run_with_cache(s[None])
        torch.testing.assert_close(batched[i, sl], single[0], atol=ATOL, rtol=0)
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        torch.testing.assert_close(hooked_cache[last][i, sl], single_cache[last][0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_logits_equal_full_forward(pair):
    _, _, model = pair
    tokens = _tokens(2, 20, seed=4)
    full = model(tokens)
    cache = KVCache.empty(model.cfg.n_layers)
    pieces = [model(tokens[:, :12], past_kv_cache=cache)]
    for p in range(12, 20):
        pieces.append(model(tokens[:, p:p + 1], past_kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_generation_cache_no_cache_and_transformers_agree(pair):
    _, hf, model = pair
    prompt = _tokens(2, 6, seed=9)
    with_cache = model.generate(prompt, max_new_tokens=15, use_past_kv_cache=True)
    without = model.generate(prompt, max_new_tokens=15, use_past_kv_cache=False)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=15, do_sample=False)
    assert with_cache.shape == (2, 21)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, ref)


@pytest.mark.parametrize("grad", [False, True])
def test_score_hook_masking_a_whole_row_matches_transformer_lens(tl_pair, grad):
    """A hook that masks every key of one query row: that row attends to nothing (pattern and z zero), as
    in transformer_lens (which also maps the NaN softmax row to zeros); with autograd on, backward stays finite."""
    ours, tl, _ = tl_pair
    tokens = _tokens(2, 12, seed=13)

    def kill_row(scores, hook):
        scores = scores.clone()
        scores[:, 2, 5, :] = float("-inf")  # query head 2 (GQA: reads kv head 1), query position 5
        return scores

    name = "blocks.1.attn.hook_attn_scores"
    names = lambda n: n.endswith(("hook_pattern", "hook_z"))
    with torch.set_grad_enabled(grad):
        with ours.hooks(fwd_hooks=[(name, kill_row)]):
            our_logits, our_cache = ours.run_with_cache(tokens, names_filter=names)
        with tl.hooks(fwd_hooks=[(name, kill_row)]):
            tl_logits, tl_cache = tl.run_with_cache(tokens, names_filter=names)
        if grad:
            our_logits.sum().backward()
            assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
            ours.zero_grad(set_to_none=True)
    assert torch.equal(our_cache["blocks.1.attn.hook_pattern"][:, 2, 5], torch.zeros(2, 12))
    assert torch.equal(our_cache["blocks.1.attn.hook_z"][:, 5, 2], torch.zeros(2, ours.cfg.d_head))
    assert our_cache["blocks.1.attn.hook_pattern"][:, 2, 4].sum(-1).allclose(torch.ones(2))
    for key in our_cache:
        torch.testing.assert_close(our_cache[key], tl_cache[key], atol=ATOL, rtol=0)
    torch.testing.assert_close(our_logits.detach(), tl_logits.detach(), atol=ATOL, rtol=0)
