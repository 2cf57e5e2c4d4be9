"""The model settings of a llama / qwen2 GGUF file as a typed, checked :class:`GGUFSettings`.

``settings_from_metadata(meta, path)`` reads every ``{arch}.*`` key, checks each value's type and range
(a head count of 0, heads that do not divide the width, a NaN epsilon ... raise :class:`GGUFError`
naming the key) and refuses any key it does not apply when that key would change the model's maths:
RoPE scaling other than linear, partial rotary embeddings, per-layer sizes that differ, and any
architecture key it does not know. ``GGUFSettings.tensor_shapes()`` is the exact set of Hugging Face
tensors (and shapes) such a file must hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hub import CheckpointError


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read into a model: names the file and what was wrong."""


# GGUF architecture -> (HF class, model_type, whether convert_hf_to_gguf permuted the q/k rows, q/k/v biases)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True, False),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False, True),
}

# every `{arch}.` key the reader understands; any other one is refused (it may change the maths)
_APPLIED_KEYS = (
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scale_linear",
)  # fmt: skip
_NO_SCALING = (None, "none")


@dataclass(frozen=True)
class GGUFSettings:
    """What a GGUF file says about the model (all of it is applied by `HookedLlama.from_gguf`)."""

    architecture: str  # "llama" or "qwen2"
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None  # linear RoPE scaling (positions divided by this); None: none
    tie_word_embeddings: bool
    # Llama 3.1/3.2: the file's rope_freqs.weight, divisors of the rotary frequencies (None: absent or all 1)
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture][1]

    @property
    def permuted_qk(self) -> bool:
        """Whether llama.cpp's converter interleaved the q/k rotary halves (undone on reading)."""
        return ARCHITECTURES[self.architecture][2]

    @property
    def attention_bias(self) -> bool:
        return ARCHITECTURES[self.architecture][3]

    def rope_scaling(self) -> dict | None:
        """The scaling in Hugging Face's config form (None: no scaling)."""
        return None if self.rope_linear_factor is None else {"rope_type": "linear", "factor": self.rope_linear_factor}

    def hf_config(self) -> dict:
        """The same settings as a Hugging Face ``config.json`` dict (e.g. for ``transformers.LlamaConfig``).
        ``rope_freq_factors`` have no such form (Hugging Face states the Llama 3 scaling's parameters)."""
        cfg = {
            "architectures": [ARCHITECTURES[self.architecture][0]], "model_type": self.model_type,
            "vocab_size": self.d_vocab, "hidden_size": self.d_model, "intermediate_size": self.d_mlp,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_key_value_heads, "head_dim": self.d_head, "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.n_ctx,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }  # fmt: skip
        if (scaling := self.rope_scaling()) is not None:
            cfg["rope_scaling"] = scaling
        return cfg

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor name -> shape, for every tensor a file with these settings must hold."""
        d, q, kv, ffn = self.d_model, self.n_heads * self.d_head, self.n_key_value_heads * self.d_head, self.d_mlp
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.d_vocab, d), "model.norm.weight": (d,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.d_vocab, d)
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                p + "mlp.down_proj.weight": (d, ffn),
            })  # fmt: skip
            if self.attention_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})  # fmt: skip
        return shapes


class _Keys:
    """Typed access to one file's metadata; every complaint names the file and the key."""

    def __init__(self, meta: dict, arch: str, path: Path) -> None:
        self.meta, self.arch, self.path = meta, arch, path

    def fail(self, key: str, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: metadata {key} {what}")

    def raw(self, name: str, default: Any = KeyError) -> Any:
        key = f"{self.arch}.{name}"
        if key not in self.meta:
            if default is KeyError:
                raise GGUFError(f"{self.path}: metadata key {key} is missing; a {self.arch} GGUF file must state it")
            return default
        value = self.meta[key]
        if isinstance(value, list):  # per-layer values: one is all the engine can apply
            if not value:
                raise self.fail(key, "is an empty list")
            if len({repr(v) for v in value}) != 1:
                raise self.fail(key, f"differs between layers ({sorted(set(map(repr, value)))[:4]}); "
                                     "only one value for every layer is supported")  # fmt: skip
            value = value[0]
        return value

    def count(self, name: str, default: Any = KeyError, minimum: int = 1) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{self.arch}.{name}", f"is {value!r}; expected an integer >= {minimum}")
        if value < minimum:
            raise self.fail(f"{self.arch}.{name}", f"is {value}; expected an integer >= {minimum}")
        return value

    def positive(self, name: str, default: Any = KeyError) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self.fail(f"{self.arch}.{name}", f"is {value!r}; expected a finite number > 0")
        return float(value)

    def token_id(self, key: str, n_vocab: int) -> int | None:
        value = self.meta.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_vocab:
            raise self.fail(key, f"is {value!r}; expected a token id in [0, {n_vocab})")
        return value


def _rope_linear_factor(k: _Keys) -> float | None:
    kind = k.raw("rope.scaling.type", None)
    if kind is None and k.raw("rope.scale_linear", None) is not None:  # older files
        kind = "linear"
    if kind in _NO_SCALING:
        for name in ("rope.scaling.factor", "rope.scale_linear"):
            if k.raw(name, None) not in (None, 1, 1.0):
                raise k.fail(f"{k.arch}.{name}", f"is {k.raw(name)!r} but no rope.scaling.type says how to apply it")
        return None
    if kind != "linear":
        raise k.fail(f"{k.arch}.rope.scaling.type", f"is {kind!r}: that RoPE scaling is not implemented here (supported: "
                                                    "none, linear); loading would put tokens at the wrong positions")  # fmt: skip
    name = "rope.scaling.factor" if k.raw("rope.scaling.factor", None) is not None else "rope.scale_linear"
    factor = k.positive(name, 1.0)
    return None if factor == 1.0 else factor


def _check_rope(k: _Keys, theta: float, d_head: int, n_ctx: int, factor: float | None) -> None:
    """The rotation angles the engine computes in float32 (position / theta ** (2i / d_head) / factor)
    must stay far from overflow for every position in the context (a tiny base makes them explode)."""
    exponent = (d_head - 2) / d_head
    log_fastest = max(0.0, -exponent * math.log(theta)) - math.log(factor or 1.0)
    if log_fastest + math.log(n_ctx) > math.log(1e30):
        raise k.fail(f"{k.arch}.rope.freq_base", f"is {theta!r}: with head size {d_head}, scaling factor {factor or 1.0} "
                                                 f"and {n_ctx} positions the rotary angles overflow float32")  # fmt: skip


def settings_from_metadata(meta: dict, path: Path, tensor_names: set[str]) -> GGUFSettings:
    """Typed, checked settings of a llama / qwen2 file (see the module docstring)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    if (parts := meta.get("split.count", 1)) != 1:
        raise GGUFError(f"{path}: metadata split.count is {parts!r}: split GGUF files are not supported "
                        "(merge them into one with llama-gguf-split --merge)")  # fmt: skip
    unknown = sorted(key for key in meta if key.startswith(f"{arch}.") and key[len(arch) + 1 :] not in _APPLIED_KEYS)
    if unknown:
        raise GGUFError(f"{path}: metadata {', '.join(unknown[:6])} {'is' if len(unknown) == 1 else 'are'} not applied by "
                        "tdb_lens and may change the model's computation; refusing to load a different model")  # fmt: skip
    if meta.get("tokenizer.ggml.add_space_prefix") not in (None, False):
        raise GGUFError(f"{path}: metadata tokenizer.ggml.add_space_prefix is {meta['tokenizer.ggml.add_space_prefix']!r}; "
                        "a byte-level BPE tokenizer that adds a space prefix is not supported")  # fmt: skip
    k = _Keys(meta, arch, path)
    n_layers = k.count("block_count")
    if n_layers > len(tensor_names):
        raise k.fail(f"{arch}.block_count", f"is {n_layers}, but the file holds only {len(tensor_names)} tensors")
    d_model, n_heads = k.count("embedding_length"), k.count("attention.head_count")
    n_kv = k.count("attention.head_count_kv", n_heads)
    if n_heads % n_kv:
        raise k.fail(f"{arch}.attention.head_count_kv", f"is {n_kv}, which does not divide the {n_heads} query heads")
    if f"{arch}.attention.key_length" in meta:
        d_head = k.count("attention.key_length")
    elif d_model % n_heads:
        raise k.fail(f"{arch}.attention.head_count", f"is {n_heads}, which does not divide embedding_length {d_model} "
                                                     "(and no attention.key_length gives the head size)")  # fmt: skip
    else:
        d_head = d_model // n_heads
    if (d_v := k.count("attention.value_length", d_head)) != d_head:
        raise k.fail(f"{arch}.attention.value_length", f"is {d_v}, key_length {d_head}: different sizes are not supported")
    if d_head % 2:
        raise k.fail(f"{arch}.attention.key_length", f"gives an odd head size {d_head}; rotary embeddings need an even one")
    if (rot := k.count("rope.dimension_count", d_head)) != d_head:
        raise k.fail(f"{arch}.rope.dimension_count", f"is {rot} of the head size {d_head}: partial rotary embeddings "
                                                     "are not implemented here")  # fmt: skip
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else 0  # its type is checked with the tokenizer
    d_vocab = k.count("vocab_size", n_tokens if n_tokens else KeyError)
    n_ctx = k.count("context_length")
    theta = k.positive("rope.freq_base", 10000.0)
    factor = _rope_linear_factor(k)
    _check_rope(k, theta, d_head, n_ctx, factor)
    return GGUFSettings(
        architecture=arch, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_key_value_heads=n_kv,
        d_head=d_head, d_mlp=k.count("feed_forward_length"), d_vocab=d_vocab, n_ctx=n_ctx,
        rms_eps=k.positive("attention.layer_norm_rms_epsilon"), rope_theta=theta, rope_linear_factor=factor,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=k.token_id("tokenizer.ggml.bos_token_id", d_vocab),
        eos_token_id=k.token_id("tokenizer.ggml.eos_token_id", d_vocab),
        pad_token_id=k.token_id("tokenizer.ggml.padding_token_id", d_vocab),
    )  # fmt: skip
