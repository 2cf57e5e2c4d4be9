"""Weight processing of the Llama family (RMSNorm) against TransformerLens' processed HookedTransformer
built offline from the same Hugging Face weights, and the identities processing must keep.

Three tiny random models: Llama with grouped-query attention and an untied unembedding, Llama with
tied embeddings (as SmolLM2), Qwen2 (q/k/v biases, GQA, tied). Each TransformerLens option on its
own and all together (its ``from_pretrained`` default); ``center_writing_weights`` is one of them
because TransformerLens accepts it for RMSNorm models and skips it, which we must match.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tdb_lens
from tdb_lens.models.llama import HookedLlama
from tdb_lens.models.processing import PROCESSING_FLAGS, process_weights_
from test_llama_parity import VOCAB, make_hf

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
KINDS = ["llama_gqa_untied", "llama_mha_tied", "qwen2_bias"]
ALL_ON = {k: True for k in PROCESSING_FLAGS}  # TransformerLens' from_pretrained default
OPTIONS = [{k: True} for k in PROCESSING_FLAGS] + [ALL_ON]


def _id(opts: dict) -> str:
    return "all" if opts == ALL_ON else "+".join(opts)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; equal entries (the -inf of masked attention scores) count 0."""
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    a, b = a.detach().float(), b.detach().float()
    return float(torch.where(a == b, 0.0, (a - b).abs()).max())


def make_tl(hf, **flags):
    """TransformerLens' HookedTransformer from ``hf``'s weights with its own conversion and processing."""
    import transformer_lens as tl
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformer_lens.pretrained.weight_conversions.qwen2 import convert_qwen2_weights

    c = hf.config
    qwen = c.model_type == "qwen2"
    gqa = qwen or c.num_key_value_heads != c.num_attention_heads
    rp = getattr(c, "rope_parameters", None) or {}
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = tl.HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn="silu", n_key_value_heads=c.num_key_value_heads if gqa else None, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d_head,
        rotary_base=rp.get("rope_theta", getattr(c, "rope_theta", 10000.0)), final_rms=True, gated_mlp=True,
        original_architecture="Qwen2ForCausalLM" if qwen else "LlamaForCausalLM", dtype=torch.float32, device="cpu",
    )
    model = tl.HookedTransformer(cfg)
    state = (convert_qwen2_weights if qwen else convert_llama_weights)(hf, cfg)
    model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False,
                                      **{k: bool(flags.get(k)) for k in PROCESSING_FLAGS})
    return model.eval()


@cache
def _saved(kind: str) -> tuple:
    """The ``transformers`` model and a checkpoint folder of it. A tied model's folder holds no
    ``lm_head.weight`` (safetensors drops the shared tensor), so loading it gives a really tied
    `HookedLlama`, as SmolLM2's; ``from_hf_model`` sees both tensors and unties."""
    hf = make_hf(kind, seed=7)
    folder = tempfile.mkdtemp(prefix=f"tdb-llama-processing-{kind}-")
    hf.save_pretrained(folder)
    return hf, folder


def ours(kind: str) -> HookedLlama:
    """A fresh unprocessed `HookedLlama` of ``kind`` (tied where the Hugging Face config ties)."""
    model = HookedLlama.from_pretrained(_saved(kind)[1]).eval()
    assert (model.lm_head is None) == bool(_saved(kind)[0].config.tie_word_embeddings)
    return model


@cache
def reference(kind: str):
    """(hf, tokens, the unprocessed model's log-probs and cache); never processed in place."""
    hf = _saved(kind)[0]
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, cache = ours(kind).run_with_cache(tokens)
    return hf, tokens, logits.log_softmax(-1), cache


# the activations the brief names: residual stream, attention z, MLP neurons, norm scales
SITES = ("hook_resid_pre", "hook_resid_post", "attn.hook_z", "mlp.hook_post", "ln1.hook_scale", "ln2.hook_scale")


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_processed_model_equals_transformer_lens(kind, opts):
    hf, tokens, _, _ = reference(kind)
    model = process_weights_(ours(kind), **opts)
    tl = make_tl(hf, **opts)
    logits, cache = model.run_with_cache(tokens)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    shared = sorted(set(cache.keys()) & set(tl_cache.keys()))
    for site in SITES:
        assert all(f"blocks.{l}.{site}" in shared for l in range(model.cfg.n_layers)), site
    assert "ln_final.hook_scale" in shared
    errs = {name: max_diff(cache[name], tl_cache[name]) for name in shared}
    errs["logits"] = max_diff(logits, tl_logits)
    errs["log_probs"] = max_diff(logits.log_softmax(-1), tl_logits.log_softmax(-1))
    worst = max(errs, key=lambda k: errs[k])
    print(f"\n{kind} {_id(opts)}: {len(shared)} shared hooks, max |tdb - TL| {errs[worst]:.2e} ({worst})")
    assert errs[worst] < TOL, {k: v for k, v in errs.items() if v >= TOL}


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_processed_weights_equal_transformer_lens(kind):
    hf, _, _, _ = reference(kind)
    model = process_weights_(ours(kind), **ALL_ON)
    tl = make_tl(hf, **ALL_ON)
    for l in range(model.cfg.n_layers):
        a, t = model.blocks[l].attn, tl.blocks[l].attn
        # grouped key/value weights: TransformerLens' W_K/W_V/b_K/b_V repeat them per query head
        for mine, theirs in ((a.W_Q, t.W_Q), (a.W_K_per_query_head, t.W_K), (a.W_V_per_query_head, t.W_V),
                             (a.W_O, t.W_O), (a.b_Q, t.b_Q), (a.b_O, t.b_O),
                             (a.b_K.repeat_interleave(a.n_heads // a.n_kv_heads, 0), t.b_K),
                             (a.b_V.repeat_interleave(a.n_heads // a.n_kv_heads, 0), t.b_V)):
            assert max_diff(mine, theirs) < TOL
        m, tm = model.blocks[l].mlp, tl.blocks[l].mlp
        for mine, theirs in ((m.W_in, tm.W_in), (m.W_gate, tm.W_gate), (m.W_out, tm.W_out)):
            assert max_diff(mine, theirs) < TOL
    for name in ("W_E", "W_U", "b_U"):
        assert max_diff(getattr(model, name), getattr(tl, name)) < TOL, name
    assert float(model.W_U.mean(-1).abs().max()) < 1e-6  # centred over the vocabulary


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_processing_keeps_the_log_probs(kind, opts):
    """An exact identity: processing changes no next-token distribution."""
    hf, tokens, base_log_probs, base = reference(kind)
    model = process_weights_(ours(kind), **opts)
    logits, cache = model.run_with_cache(tokens)
    assert max_diff(logits.log_softmax(-1), base_log_probs) < TOL
    # fold_ln and center_unembed change no hook (center_unembed: only the logits, by a constant);
    # fold_value_biases changes v/z/result and nothing downstream of the attention output
    changed = ("attn.hook_v", "attn.hook_z") if opts.get("fold_value_biases") and kind == "qwen2_bias" else ()
    for name in base.keys():
        if not any(name.endswith(s) for s in changed):
            assert max_diff(cache[name], base[name]) < TOL, name


@pytest.mark.parametrize("kind", ["llama_mha_tied", "qwen2_bias"])
@torch.no_grad()
def test_tied_embeddings_are_untied_and_W_E_unchanged(kind):
    hf, tokens, base_log_probs, _ = reference(kind)
    hf_embed = hf.model.embed_tokens.weight.detach().clone()
    model = ours(kind)
    cfg_before = model.cfg
    assert model.lm_head is None and model.cfg.tie_word_embeddings
    W_E = model.W_E.detach().clone()
    process_weights_(model, fold_ln=True, center_unembed=True)
    assert torch.equal(model.W_E, W_E)  # folding ln_final and centring W_U left the embedding alone
    assert model.lm_head is not None and model.W_U.data_ptr() != model.W_E.data_ptr()
    assert not torch.allclose(model.W_U, model.W_E.T)
    assert not model.cfg.tie_word_embeddings and cfg_before.tie_word_embeddings  # the old config object untouched
    assert torch.equal(hf.model.embed_tokens.weight, hf_embed)  # the transformers model is not edited
    assert max_diff(model(tokens).log_softmax(-1), base_log_probs) < TOL


@torch.no_grad()
def test_norms_become_scale_only_with_their_hooks():
    hf, tokens, _, base = reference("llama_gqa_untied")
    model = process_weights_(ours("llama_gqa_untied"), fold_ln=True)
    norms = [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_final]
    assert all(n.weight is None and n.w is None for n in norms)
    _, cache = model.run_with_cache(tokens)
    for name in ("blocks.1.ln1.hook_scale", "blocks.1.ln2.hook_normalized", "ln_final.hook_scale", "ln_final.hook_normalized"):
        assert max_diff(cache[name], base[name]) < TOL, name


@torch.no_grad()
def test_value_biases_fold_into_b_O_per_query_head():
    hf, tokens, _, base = reference("qwen2_bias")
    model = process_weights_(ours("qwen2_bias"), fold_value_biases=True)
    unprocessed = ours("qwen2_bias")
    for l, block in enumerate(model.blocks):
        attn, old = block.attn, unprocessed.blocks[l].attn
        assert torch.equal(attn.b_V, torch.zeros_like(attn.b_V))
        # b_O by hand: query head h reads key/value head h // (n_heads // n_kv_heads)
        rep = attn.n_heads // attn.n_kv_heads
        want = sum(old.b_V[h // rep] @ old.W_O[h] for h in range(attn.n_heads))
        assert max_diff(attn.b_O, want) < TOL
    # the per-head result path uses the new b_O
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(tokens)
    for l in range(model.cfg.n_layers):
        assert max_diff(cache["result", l].sum(2) + model.blocks[l].attn.b_O, cache["attn_out", l]) < TOL
        assert max_diff(cache["attn_out", l], base["attn_out", l]) < TOL


@torch.no_grad()
def test_processing_is_idempotent_and_recorded():
    hf, tokens, _, _ = reference("qwen2_bias")
    model = process_weights_(ours("qwen2_bias"), **ALL_ON)
    # center_writing_weights is skipped for RMSNorm (as TransformerLens): recorded as not applied
    assert model.weight_processing == {**ALL_ON, "center_writing_weights": False}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    process_weights_(model, **ALL_ON)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(max_diff(before[k], after[k]) < 1e-6 for k in before)
    assert ours("qwen2_bias").weight_processing is None


def test_bad_inputs_change_nothing():
    with pytest.raises(TypeError, match="HookedGPT2, HookedLlama; got Linear"):
        process_weights_(torch.nn.Linear(2, 2), fold_ln=True)
    with torch.device("meta"):
        meta = HookedLlama(tdb_lens.LlamaConfig())
    with pytest.raises(ValueError, match="meta device"):
        process_weights_(meta, fold_ln=True)
    assert meta.ln_final.weight is not None and meta.weight_processing is None


@torch.no_grad()
def test_from_pretrained_processes_llama_like_transformer_lens():
    """The TransformerLens entry point: default processing, no warning, TransformerLens' numbers."""
    hf, tokens, base_log_probs, _ = reference("qwen2_bias")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tdb_lens.HookedTransformer.from_pretrained("tiny-qwen2", hf_model=hf)
    assert isinstance(model, HookedLlama) and model.weight_processing == {**ALL_ON, "center_writing_weights": False}
    assert max_diff(model(tokens), make_tl(hf, **ALL_ON)(tokens)) < TOL
    raw = tdb_lens.HookedTransformer.from_pretrained_no_processing("tiny-qwen2", hf_model=hf)
    assert raw.weight_processing is None and raw.ln_final.weight is not None
    assert max_diff(raw(tokens), hf(tokens).logits) < 1e-4  # transformers' own logits (ours vs theirs kernels)
    assert max_diff(model(tokens).log_softmax(-1), base_log_probs) < TOL


@torch.no_grad()
def test_smollm2_processed_keeps_the_log_probs(smollm2):
    """SmolLM2-135M (tied embeddings) through ``from_pretrained`` vs the unprocessed fixture, one prompt."""
    processed = tdb_lens.HookedTransformer.from_pretrained("smollm2-135m")
    assert processed.weight_processing == {**ALL_ON, "center_writing_weights": False}
    tokens = smollm2.to_tokens("The capital of France is Paris, and the capital of Italy is")
    want = smollm2(tokens).log_softmax(-1)
    got = processed(tokens).log_softmax(-1)
    err = max_diff(got, want)
    print(f"\nSmolLM2 processed vs unprocessed: max |log-prob diff| {err:.2e}")
    assert err < 1e-4
    assert torch.equal(processed.W_E, smollm2.W_E) and smollm2.lm_head is None  # the fixture is not touched


@torch.no_grad()
def test_process_weights_method_equals_transformer_lens_method():
    """``model.process_weights_()`` with TransformerLens' defaults equals TransformerLens' own method
    applied to its unprocessed model (GQA + biases + tied embeddings: the Qwen2-style kind)."""
    hf, tokens, _, _ = reference("qwen2_bias")
    model = ours("qwen2_bias")
    assert model.process_weights_() is model
    tl = make_tl(hf)
    tl.process_weights_()
    logits, cache = model.run_with_cache(tokens)
    tl_logits, tl_cache = tl.run_with_cache(tokens)
    shared = sorted(set(cache.keys()) & set(tl_cache.keys()))
    assert len(shared) > 50
    errs = {name: max_diff(cache[name], tl_cache[name]) for name in shared}
    errs["logits"] = max_diff(logits, tl_logits)
    assert max(errs.values()) < TOL, {k: v for k, v in errs.items() if v >= TOL}
