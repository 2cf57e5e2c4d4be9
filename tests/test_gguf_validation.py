"""GGUF files that must not load: impossible metadata, settings the engine does not apply, inconsistent
layouts and non-finite weights each raise GGUFError naming the key or tensor (through tdb_lens.load, so the
error is what a user sees), and a setting that is applied (linear RoPE scaling) matches transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

import tdb_lens
from _gguf_files import DELETE, HD, write_tiny_llama
from tdb_lens.ioi.cli import main as ioi_main
from tdb_lens.models.gguf import GGUFError, read_gguf
from tdb_lens.models.hub import CheckpointError
from tdb_lens.models.llama import HookedLlama, LlamaConfig

U32, I32, F32, STR, ARR = VT.UINT32, VT.INT32, VT.FLOAT32, VT.STRING, VT.ARRAY
NAN, INF = float("nan"), float("inf")

# (metadata overrides, the message: key named, what was wrong)
IMPOSSIBLE = {
    "head_count 0": ({"llama.attention.head_count": (0, U32)}, r"llama\.attention\.head_count is 0; expected an integer >= 1"),
    "heads do not divide the width": ({"llama.attention.head_count": (3, U32)},
                                      r"llama\.attention\.head_count is 3, which does not divide embedding_length 64"),
    "kv heads do not divide heads": ({"llama.attention.head_count_kv": (3, U32)},
                                     r"llama\.attention\.head_count_kv is 3, which does not divide the 2 query heads"),
    "kv heads 0": ({"llama.attention.head_count_kv": (0, U32)}, r"head_count_kv is 0; expected an integer >= 1"),
    "rms_eps NaN": ({"llama.attention.layer_norm_rms_epsilon": (NAN, F32)},
                    r"layer_norm_rms_epsilon is nan; expected a finite number > 0"),
    "rms_eps 0": ({"llama.attention.layer_norm_rms_epsilon": (0.0, F32)}, r"layer_norm_rms_epsilon is 0\.0; expected"),
    "rms_eps negative": ({"llama.attention.layer_norm_rms_epsilon": (-1e-6, F32)}, r"layer_norm_rms_epsilon is -1e-06"),
    "rope base negative": ({"llama.rope.freq_base": (-10000.0, F32)}, r"llama\.rope\.freq_base is -10000\.0; expected a finite"),
    "rope base NaN": ({"llama.rope.freq_base": (NAN, F32)}, r"llama\.rope\.freq_base is nan"),
    "rope base Inf": ({"llama.rope.freq_base": (INF, F32)}, r"llama\.rope\.freq_base is inf"),
    "rope base that overflows the angles": ({"llama.rope.freq_base": (1e-40, F32)},
                                            r"llama\.rope\.freq_base is 1e-40: .* rotary angles overflow float32"),
    "context length 0": ({"llama.context_length": (0, U32)}, r"llama\.context_length is 0; expected an integer >= 1"),
    "context length negative": ({"llama.context_length": (-5, I32)}, r"llama\.context_length is -5"),
    "block_count 0": ({"llama.block_count": (0, U32)}, r"llama\.block_count is 0"),
    "block_count huge": ({"llama.block_count": (2**40, VT.UINT64)}, r"block_count is 1099511627776, but the file holds only 12"),
    "feed_forward_length 0": ({"llama.feed_forward_length": (0, U32)}, r"feed_forward_length is 0"),
    "a size as text": ({"llama.attention.head_count": ("two", STR)}, r"head_count is 'two'; expected an integer"),
    "a size as a float": ({"llama.embedding_length": (64.0, F32)}, r"embedding_length is 64\.0; expected an integer"),
    "odd head size": ({"llama.attention.key_length": (33, U32), "llama.attention.value_length": (33, U32)},
                      r"key_length gives an odd head size 33"),
    "value length differs": ({"llama.attention.value_length": (16, U32)}, r"value_length is 16, key_length 32"),
    "embedding size that disagrees with the tensors": (
        {"llama.embedding_length": (128, U32), "llama.attention.key_length": (32, U32)},
        r"tensor 'token_embd\.weight' has shape \[263, 64\], expected \[263, 128\]",
    ),
    "missing key": ({"llama.context_length": DELETE}, r"metadata key llama\.context_length is missing"),
    "per-layer sizes that differ": ({"llama.attention.head_count_kv": ([1, 2], ARR, U32)},
                                    r"head_count_kv differs between layers"),
    "bos id outside the vocabulary": ({"tokenizer.ggml.bos_token_id": (10**6, U32)},
                                      r"tokenizer\.ggml\.bos_token_id is 1000000; expected a token id in \[0, 263\)"),
    "merges that are not text": ({"tokenizer.ggml.merges": ([1, 2], ARR, I32)},
                                 r"tokenizer\.ggml\.merges is .*expected a list of str"),
    "a merge without a pair": ({"tokenizer.ggml.merges": (["hell"], ARR, STR)}, r"merges holds 'hell'; expected two tokens"),
    "token types of another length": ({"tokenizer.ggml.token_type": ([1, 1], ARR, I32)},
                                      r"token_type has 2 entries for 263 tokens"),
    "alignment not a power of two": ({"general.alignment": (48, U32)},
                                     r"general\.alignment is 48; expected a power of two"),
    "split file": ({"split.count": (2, VT.UINT16)}, r"split\.count is 2: split GGUF files are not supported"),
}

# settings the engine does not implement: loading would compute another model
NOT_APPLIED = {
    "yarn RoPE scaling": ({"llama.rope.scaling.type": ("yarn", STR), "llama.rope.scaling.factor": (4.0, F32)},
                          r"llama\.rope\.scaling\.type is 'yarn': that RoPE scaling is not implemented"),
    "a scaling factor without a type": ({"llama.rope.scaling.factor": (4.0, F32)},
                                        r"llama\.rope\.scaling\.factor is 4\.0 but no rope\.scaling\.type"),
    "partial rotary": ({"llama.rope.dimension_count": (16, U32)},
                       r"llama\.rope\.dimension_count is 16 of the head size 32: partial rotary embeddings"),
    "an unknown architecture key": ({"llama.attn_logit_softcapping": (30.0, F32)},
                                    r"metadata llama\.attn_logit_softcapping is not applied by tdb_lens"),
    "a space prefix": ({"tokenizer.ggml.add_space_prefix": (True, VT.BOOL)}, r"add_space_prefix is True"),
}


@pytest.mark.parametrize("case", sorted({**IMPOSSIBLE, **NOT_APPLIED}))
def test_bad_metadata_is_refused_naming_the_key(tmp_path, case):
    meta, message = {**IMPOSSIBLE, **NOT_APPLIED}[case]
    path = tmp_path / "bad.gguf"
    write_tiny_llama(path, meta=meta)
    with pytest.raises(GGUFError, match=r"bad\.gguf: .*" + message):
        tdb_lens.load(str(path))


def llama3_rope_factors(d_head: int, theta: float, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py writes it for a Llama 3.1 rope_scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, d_head, 2) / d_head):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


@torch.no_grad()
def test_llama31_rope_freqs_are_applied_as_transformers_llama3_scaling(tmp_path):
    """Llama 3.1/3.2 GGUF files keep their RoPE scaling in rope_freqs.weight (it was read and dropped
    before). Reference: transformers' LlamaForCausalLM with the rope_scaling those factors were made from
    (original context 32, head size 32: the untouched, smoothed and scaled regimes all occur)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip
    factors = llama3_rope_factors(HD, 10000.0, 8.0, 1.0, 4.0, 32)
    assert len(set(factors.round(4).tolist())) > 3  # 1, 8 and values between
    path = tmp_path / "llama31.gguf"
    write_tiny_llama(path, extra={"rope_freqs.weight": factors})
    ck = read_gguf(path, progress=False)
    assert ck.settings.rope_freq_factors == tuple(factors.tolist())
    model = tdb_lens.load(str(path))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ck.settings.hf_config(), rope_scaling=scaling)).eval()
    hf.load_state_dict(ck.tensors, strict=True)
    tokens = torch.randint(0, ck.settings.d_vocab, (2, 60), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    plain = tmp_path / "plain.gguf"
    write_tiny_llama(plain)
    assert (tdb_lens.load(str(plain))(tokens) - model(tokens)).abs().max() > 1e-2
    # factors of exactly 1 change nothing: the same model as the file without them
    write_tiny_llama(path, extra={"rope_freqs.weight": np.ones(HD // 2)})
    assert read_gguf(path, progress=False).settings.rope_freq_factors is None
    assert torch.equal(tdb_lens.load(str(path))(tokens), tdb_lens.load(str(plain))(tokens))


@pytest.mark.parametrize("factors,message", [
    (np.ones(HD // 2 + 1), r"'rope_freqs\.weight' has shape \[17\], expected \[16\]"),
    (np.r_[np.ones(HD // 2 - 1), 0.0], r"'rope_freqs\.weight' holds RoPE frequency factors <= 0 \(0\)"),
    (np.r_[np.ones(HD // 2 - 1), np.nan], r"'rope_freqs\.weight' holds 1 NaN or infinite values"),
    (np.r_[1e-38, np.ones(HD // 2 - 1)], r"'rope_freqs\.weight' holds RoPE frequency factors down to 1e-38: .* overflow"),
])  # fmt: skip
def test_bad_rope_freqs_are_refused(tmp_path, factors, message):
    path = tmp_path / "bad.gguf"
    write_tiny_llama(path, extra={"rope_freqs.weight": factors})
    with pytest.raises(GGUFError, match=message):
        tdb_lens.load(str(path))


def test_unknown_tensors_are_refused(tmp_path):
    path = tmp_path / "sinks.gguf"
    write_tiny_llama(path, extra={"blk.0.attn_sinks.weight": np.ones(2)})
    with pytest.raises(GGUFError, match=r"tensors \['blk\.0\.attn_sinks\.weight'\] are not used by a llama model"):
        tdb_lens.load(str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad, qtype):
    w = np.random.default_rng(1).normal(size=(96, 64))
    w[3, 5] = bad
    path = tmp_path / "nan.gguf"
    write_tiny_llama(path, edit={"blk.0.ffn_up.weight": w}, types={"blk.0.ffn_up.weight": qtype})
    with pytest.raises(GGUFError, match=r"nan\.gguf: tensor 'blk\.0\.ffn_up\.weight' holds 1 NaN or infinite values of 6144"):
        tdb_lens.load(str(path))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_non_finite_count_from_storage_equals_gguf_dequantized_count(qtype):
    """The reader counts NaN/Inf from the storage (for quantized blocks, from their float16 scales only);
    the reference is the number of non-finite values gguf-py's own dequantizer produces."""
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    from tdb_lens.models.gguf import _count_nonfinite_storage

    x = np.random.default_rng(2).normal(size=(16, 128)).astype(np.float32)
    data = bytearray(gguf_quantize(x, qtype).tobytes())
    assert _count_nonfinite_storage(np.frombuffer(bytes(data), np.uint8), qtype) == 0
    block = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20}.get(qtype)
    width = {QT.F32: 4}.get(qtype, 2)
    bad16 = [np.float16(np.inf).tobytes(), np.float16(np.nan).tobytes(), np.float16(-np.inf).tobytes()]
    for i, pos in enumerate([5, 9, 40]):
        if block is None:  # a value's own bytes: NaN/Inf of the storage type
            value = np.float32([np.inf, np.nan, -np.inf][i]).tobytes() if qtype == QT.F32 else bad16[i]
            if qtype == QT.BF16:
                value = np.float32([np.inf, np.nan, -np.inf][i]).tobytes()[2:]
            data[pos * width : pos * width + width] = value
        else:  # a block's scale d, or (Q4_1) its minimum m
            at = pos * block + (2 if qtype == QT.Q4_1 and i == 1 else 0)
            data[at : at + 2] = bad16[i]
    raw = np.frombuffer(bytes(data), np.uint8)
    with np.errstate(invalid="ignore"):
        ref = int((~np.isfinite(np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32))).sum())
    assert ref > 0 and _count_nonfinite_storage(raw, qtype) == ref


def test_quantized_block_with_infinite_scale_is_refused(tmp_path):
    """A Q8_0 block whose float16 scale is Inf dequantizes to Inf (the scale sits in the first 2 bytes)."""
    path = tmp_path / "q8.gguf"
    write_tiny_llama(path, types={"blk.0.ffn_down.weight": QT.Q8_0})
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    data = bytearray(path.read_bytes())
    data[t.data_offset : t.data_offset + 2] = np.float16(np.inf).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.ffn_down\.weight' holds \d+ NaN or infinite values"):
        read_gguf(path, progress=False)


def test_values_too_large_for_the_requested_dtype(tmp_path):
    w = np.random.default_rng(1).normal(size=(96, 64))
    w[0, 0] = 1e6  # finite in float32, Inf in float16
    path = tmp_path / "big.gguf"
    write_tiny_llama(path, edit={"blk.0.ffn_up.weight": w})
    assert read_gguf(path, progress=False).tensors["model.layers.0.mlp.up_proj.weight"][0, 0] == 1e6
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight' has values too large for torch\.float16"):
        read_gguf(path, dtype=torch.float16, progress=False)


def test_tensor_offsets_must_follow_each_other(tmp_path):
    """llama.cpp's rule: each tensor starts at the aligned end of the previous one. A wrong offset would
    otherwise read another tensor's bytes as this one's weights."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.tensors[1].field
    offset_part = field.parts[-1]  # the tensor's data offset, relative to the data section
    data = bytearray(path.read_bytes())
    start = field.offset + sum(p.nbytes for p in field.parts[:-1])
    shifted = int(offset_part[0]) + 32  # still aligned, now inside the next tensor
    data[start : start + 8] = shifted.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=rf"tensor '{reader.tensors[1].name}' has data offset {shifted}, expected"):
        read_gguf(path, progress=False)


@torch.no_grad()
def test_linear_rope_scaling_is_applied_as_transformers_applies_it(tmp_path):
    """The one RoPE scaling the engine implements: logits equal transformers' LlamaForCausalLM built from the
    same settings and tensors, and differ from the unscaled model's."""
    path = tmp_path / "linear.gguf"
    write_tiny_llama(path, meta={"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (4.0, F32)})
    ck = read_gguf(path, progress=False)
    assert ck.settings.rope_scaling() == {"rope_type": "linear", "factor": 4.0}
    model = tdb_lens.load(str(path))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ck.settings.hf_config())).eval()
    hf.load_state_dict(ck.tensors, strict=True)
    tokens = torch.randint(0, ck.settings.d_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    plain = tmp_path / "plain.gguf"
    write_tiny_llama(plain)
    assert (tdb_lens.load(str(plain))(tokens) - model(tokens)).abs().max() > 1e-2


def test_config_json_errors_name_the_entry():
    with pytest.raises(CheckpointError, match=r"config\.json has no 'num_attention_heads'"):
        LlamaConfig.from_hf({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64})
    hf = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 0,
          "intermediate_size": 8, "vocab_size": 10}  # fmt: skip
    with pytest.raises(CheckpointError, match="ZeroDivisionError"):
        LlamaConfig.from_hf(hf)
    with pytest.raises(ValueError, match=r"LlamaConfig\.eps is nan; expected a finite number > 0"):
        LlamaConfig(eps=float("nan"))
    with pytest.raises(ValueError, match=r"LlamaConfig\.n_heads is 0; expected a positive integer"):
        HookedLlama.from_config(LlamaConfig(n_heads=0))


def test_ioi_command_prints_a_bad_gguf_as_one_line(tmp_path, capsys):
    path = tmp_path / "bad.gguf"
    write_tiny_llama(path, meta={"llama.attention.head_count": (0, U32)})
    assert ioi_main(["--model", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("tdb-lens ioi: cannot load model") and "llama.attention.head_count is 0" in err
    assert not (tmp_path / "out").exists()
