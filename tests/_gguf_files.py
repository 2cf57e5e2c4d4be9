"""Small synthetic GGUF files for the reader's tests: a 1-layer llama (or qwen2) whose metadata and
tensors a test can change key by key, written with gguf-py's own GGUFWriter."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tdb_lens.models.gguf import unpermute_rotary

DELETE = object()  # a metadata override that removes the key
D, HEADS, KV, HD, FFN = 64, 2, 1, 32, 96
MERGES = ["h e", "l l", "he ll", "o Ġ"]
CHAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The q/k row permutation as convert_hf_to_gguf.py states it (reshape to (head, 2, d/2), swap)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def vocabulary() -> list[str]:
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_alphabet() + ["he", "ll", "hell", "oĠ"]


def tiny_metadata(arch: str = "llama") -> dict[str, tuple[Any, VT, VT | None]]:
    """key -> (value, GGUF type, array item type), in the order GGUFWriter's add_* helpers write them."""
    tokens = vocabulary()
    a = arch
    return {
        f"{a}.block_count": (1, VT.UINT32, None), f"{a}.context_length": (128, VT.UINT32, None),
        f"{a}.embedding_length": (D, VT.UINT32, None), f"{a}.feed_forward_length": (FFN, VT.UINT32, None),
        f"{a}.attention.head_count": (HEADS, VT.UINT32, None), f"{a}.attention.head_count_kv": (KV, VT.UINT32, None),
        f"{a}.rope.freq_base": (10000.0, VT.FLOAT32, None), f"{a}.attention.layer_norm_rms_epsilon": (1e-6, VT.FLOAT32, None),
        f"{a}.rope.dimension_count": (HD, VT.UINT32, None), "tokenizer.ggml.model": ("gpt2", VT.STRING, None),
        "tokenizer.ggml.pre": ("default", VT.STRING, None), "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.token_type": ([3, 3, 3] + [1] * (len(tokens) - 3), VT.ARRAY, VT.INT32),
        "tokenizer.ggml.merges": (MERGES, VT.ARRAY, VT.STRING), "tokenizer.ggml.bos_token_id": (1, VT.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32, None), "tokenizer.ggml.add_bos_token": (True, VT.BOOL, None),
        "tokenizer.chat_template": (CHAT, VT.STRING, None),
    }  # fmt: skip


def tensor_specs(untied: bool = True, arch: str = "llama") -> dict[str, tuple[str, tuple[int, ...]]]:
    """gguf name -> (Hugging Face name, Hugging Face shape)."""
    v = len(vocabulary())
    specs = {
        "token_embd.weight": ("model.embed_tokens.weight", (v, D)),
        "output_norm.weight": ("model.norm.weight", (D,)),
        "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", (D,)),
        "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", (D,)),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (HEADS * HD, D)),
        "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (KV * HD, D)),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", (KV * HD, D)),
        "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", (D, HEADS * HD)),
        "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", (FFN, D)),
        "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (FFN, D)),
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (D, FFN)),
    }
    if arch == "qwen2":
        for kind, rows in (("q", HEADS * HD), ("k", KV * HD), ("v", KV * HD)):
            specs[f"blk.0.attn_{kind}.bias"] = (f"model.layers.0.self_attn.{kind}_proj.bias", (rows,))
    if untied:
        specs["output.weight"] = ("lm_head.weight", (v, D))
    return specs


def write_gguf(path, arch: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, QT]]) -> None:
    w = GGUFWriter(str(path), arch)
    for key, (value, vtype, sub) in metadata.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def write_tiny_llama(path, arch: str = "llama", types: dict | None = None, untied: bool = True,
                     meta: dict | None = None, extra: dict[str, np.ndarray] | None = None,
                     edit: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """A 1-layer GGUF with known tensors; returns them under Hugging Face names (already rounded through the
    storage type, so a correct reader returns exactly them). ``meta``: key -> (value, type[, item type]) or
    DELETE; ``extra``: more F32 tensors to store as they are; ``edit``: replace a tensor's HF-layout values."""
    types = types or {}
    rng = np.random.default_rng(0)
    metadata = tiny_metadata(arch)
    for key, value in (meta or {}).items():
        if value is DELETE:
            metadata.pop(key, None)
        else:
            metadata[key] = (value[0], value[1], value[2] if len(value) > 2 else None)
    tensors: dict[str, tuple[np.ndarray, QT]] = {}
    expected = {}
    for name, (hf, shape) in tensor_specs(untied, arch).items():
        hf_w = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        if edit and name in edit:
            hf_w = torch.from_numpy(np.asarray(edit[name], np.float32).reshape(shape))
        rows = HEADS if ".attn_q." in name else KV
        permute = arch == "llama" and (".attn_q." in name or ".attn_k." in name)
        stored = llama_cpp_permute(hf_w, rows) if permute else hf_w
        qtype = types.get(name, QT.F32)
        data = gguf_quantize(stored.numpy(), qtype)
        tensors[name] = (data, qtype)
        back = torch.from_numpy(gguf_dequantize(data, qtype).reshape(shape).astype(np.float32))
        expected[hf] = unpermute_rotary(back, rows) if permute else back
    for name, data in (extra or {}).items():
        tensors[name] = (np.asarray(data, np.float32), QT.F32)
    write_gguf(path, arch, metadata, tensors)
    return expected
