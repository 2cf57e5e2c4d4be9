"""`HookedLlama`: the Llama family (Llama 3, SmolLM2, Qwen2) on the shared engine.

RMSNorm, rotary position embeddings (with Llama 3 frequency scaling), grouped-query attention,
SwiGLU MLP, tied or untied unembedding, optional q/k/v biases (Qwen2). Parameters keep Hugging
Face's names and layouts (``q_proj.weight [n_heads*d_head, d_model]``), so loading is a rename;
``W_Q`` and friends are TransformerLens-convention views. ``W_K``/``W_V`` have one slice per
key/value head; ``attn.W_K_per_query_head`` repeats them so index ``i`` is query head ``i``'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from ..hooks import HookPoint
from ..hooks.layout import layout
from ..tokenizer import HFTokenizer, Tokenizer
from .components import MLP, Attention, Block, Blocks, ForwardContext, RMSNorm
from .config import ModelConfig, TLArchitecture
from .engine import HookedTransformer
from .hub import DictSource, TensorSource, load_state_into, read_config, resolve_checkpoint, safetensors_files

if TYPE_CHECKING:  # pragma: no cover
    from .gguf_config import GGUFSettings

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(kw_only=True)
class LlamaConfig(ModelConfig, defaults={"n_layers": 2, "n_heads": 4, "d_model": 64, "d_mlp": 128, "d_vocab": 100,
                                         "n_ctx": 2048}):
    """A Llama-family config: `ModelConfig`'s fields (defaults: a tiny test model) and the family's own."""

    n_key_value_heads: int = 2
    d_head: int = 16
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    # per-frequency divisors of the rotary frequencies (llama.cpp's rope_freqs.weight: how GGUF files of
    # Llama 3.1/3.2 store their long-context scaling), applied after rope_scaling; None: none
    rope_freq_factors: Optional[tuple[float, ...]] = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases (Qwen2: True)
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)

    family_name = "Llama-family"
    #: default_prepend_bos None: the tokenizer's own convention decides (SmolLM2: no BOS)
    architecture = TLArchitecture(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                  gated_mlp=True, original_architecture="LlamaForCausalLM", default_prepend_bos=None)
    _positive_ints = ("n_layers", "n_heads", "n_key_value_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx")
    _positive_floats = ("eps", "rope_theta")
    rotary_base = property(lambda self: self.rope_theta)  # TransformerLens' name (read-only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_key_value_heads {self.n_key_value_heads}")
        if self.d_head % 2:
            raise ValueError(f"d_head {self.d_head} must be even (rotary embeddings rotate pairs)")
        factors = self.rope_freq_factors
        if factors is not None and (len(factors) != self.d_head // 2 or not all(math.isfinite(f) and f > 0 for f in factors)):
            raise ValueError(f"rope_freq_factors must be {self.d_head // 2} finite numbers > 0, got {factors!r}")

    @classmethod
    def from_gguf(cls, s: GGUFSettings) -> LlamaConfig:
        """The config a GGUF file's checked settings describe (every setting is applied)."""
        return cls(
            n_layers=s.n_layers, n_heads=s.n_heads, n_key_value_heads=s.n_key_value_heads, d_model=s.d_model,
            d_head=s.d_head, d_mlp=s.d_mlp, d_vocab=s.d_vocab, n_ctx=s.n_ctx, eps=s.rms_eps, rope_theta=s.rope_theta,
            rope_scaling=s.rope_scaling(), rope_freq_factors=s.rope_freq_factors, tie_word_embeddings=s.tie_word_embeddings,
            attention_bias=s.attention_bias, model_type=s.model_type,
        )  # fmt: skip

    @classmethod
    def _from_hf(cls, hf: dict) -> LlamaConfig:
        mt = hf.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {mt!r} is not a Llama-family architecture; supported: {SUPPORTED_MODEL_TYPES}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only SwiGLU (hidden_act 'silu') is supported, config has {hf.get('hidden_act')!r}")
        if hf.get("mlp_bias"):
            raise ValueError("MLP biases (mlp_bias=True) are not supported")
        h = hf["num_attention_heads"]
        # transformers >= 5 writes rope_theta and the scaling into one `rope_parameters` dict
        rp = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta") or rp.get("rope_theta", 10000.0)
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rp.get("rope_type", rp.get("type", "default")) != "default":
            rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        return cls(
            n_layers=hf["num_hidden_layers"], n_heads=h, n_key_value_heads=hf.get("num_key_value_heads") or h,
            d_model=hf["hidden_size"], d_head=hf.get("head_dim") or hf["hidden_size"] // h,
            d_mlp=hf["intermediate_size"], d_vocab=hf["vocab_size"], n_ctx=hf.get("max_position_embeddings", 2048),
            eps=hf.get("rms_norm_eps", 1e-5), rope_theta=rope_theta,
            rope_scaling=rope_scaling, tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", mt == "qwen2"), init_range=hf.get("initializer_range", 0.02),
            model_type=mt,
        )

    def to_hf(self) -> dict:
        if self.rope_freq_factors is not None:
            raise ValueError("rope_freq_factors (a GGUF file's rope_freqs.weight) have no Hugging Face config form")
        return {
            "model_type": self.model_type, "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_key_value_heads, "hidden_size": self.d_model, "head_dim": self.d_head,
            "intermediate_size": self.d_mlp, "vocab_size": self.d_vocab, "max_position_embeddings": self.n_ctx,
            "rms_norm_eps": self.eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "hidden_act": "silu", "initializer_range": self.init_range,
        }


def rotary_inv_freq(cfg: LlamaConfig, device: torch.device | str | None) -> Float[torch.Tensor, "half_d_head"]:  # noqa: F821, UP037
    """Rotary frequencies, with Llama 3's long-context rescaling when the config asks for it (as
    ``rope_scaling`` or as a GGUF file's per-frequency ``rope_freq_factors``)."""
    inv = _scaled_inv_freq(cfg, device)
    if cfg.rope_freq_factors is not None:
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=inv.dtype, device=inv.device)
    return inv


def _scaled_inv_freq(cfg: LlamaConfig, device: torch.device | str | None) -> torch.Tensor:
    d = cfg.d_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(Attention):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__(cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model, layer)
        self.cfg = cfg
        hd, kd = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, kd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, kd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hd, cfg.d_model, bias=False)
        self.hook_rot_q = HookPoint(layout("attn", "rot_q", "batch", "pos", "head", "d_head"))
        self.hook_rot_k = HookPoint(layout("attn", "rot_k", "batch", "pos", "kv_head", "d_head"))

    def project(self, x):
        b, p, _ = x.shape
        q = self.q_proj(x).view(b, p, self.n_heads, self.d_head)
        k = self.k_proj(x).view(b, p, self.n_kv_heads, self.d_head)
        v = self.v_proj(x).view(b, p, self.n_kv_heads, self.d_head)
        return q, k, v

    def position(self, q, k, ctx: ForwardContext):
        if "rope" not in ctx.memo:  # once per forward, shared by all layers
            inv = rotary_inv_freq(self.cfg, q.device)
            freqs = ctx.positions[..., None].float() * inv  # [b, p, d/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [b, p, 1, d]
            ctx.memo["rope"] = (emb.cos().to(q.dtype), emb.sin().to(q.dtype))
        cos, sin = ctx.memo["rope"]
        q = self.hook_rot_q(q * cos + _rotate_half(q) * sin)
        k = self.hook_rot_k(k * cos + _rotate_half(k) * sin)
        return q, k

    def project_out(self, z):
        return self.o_proj(z)

    def _w(self, lin: nn.Linear, heads: int) -> torch.Tensor:  # [heads, d_model, d_head] view
        return lin.weight.view(heads, self.d_head, self.d_model).transpose(1, 2)

    def _b(self, lin: nn.Linear, heads: int) -> torch.Tensor:
        if lin.bias is None:
            return torch.zeros(heads, self.d_head, device=lin.weight.device, dtype=lin.weight.dtype)
        return lin.bias.view(heads, self.d_head)

    W_Q = property(lambda self: self._w(self.q_proj, self.n_heads))
    W_K = property(lambda self: self._w(self.k_proj, self.n_kv_heads))
    W_V = property(lambda self: self._w(self.v_proj, self.n_kv_heads))
    b_Q = property(lambda self: self._b(self.q_proj, self.n_heads))
    b_K = property(lambda self: self._b(self.k_proj, self.n_kv_heads))
    b_V = property(lambda self: self._b(self.v_proj, self.n_kv_heads))
    W_O = property(lambda self: self.o_proj.weight.view(self.d_model, self.n_heads, self.d_head).permute(1, 2, 0))
    b_O = property(lambda self: torch.zeros(self.d_model, device=self.o_proj.weight.device, dtype=self.o_proj.weight.dtype)
                   if self.o_proj.bias is None else self.o_proj.bias)  # a bias only after fold_value_biases


class LlamaMLP(MLP):
    """SwiGLU: ``hook_post = silu(hook_pre) * hook_pre_linear`` (the neurons)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint(layout("mlp", "pre", "batch", "pos", "d_mlp"))
        self.hook_pre_linear = HookPoint(layout("mlp", "pre_linear", "batch", "pos", "d_mlp"))
        self.hook_post = HookPoint(layout("mlp", "post", "batch", "pos", "d_mlp"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        post = F.silu(self.hook_pre(self.gate_proj(x))) * self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(post))

    W_gate = property(lambda self: self.gate_proj.weight.T)
    W_in = property(lambda self: self.up_proj.weight.T)
    W_out = property(lambda self: self.down_proj.weight.T)
    b_in = property(lambda self: torch.zeros(self.up_proj.weight.shape[0], device=self.up_proj.weight.device))
    b_out = property(lambda self: torch.zeros(self.down_proj.weight.shape[0], device=self.down_proj.weight.device))


class HookedLlama(HookedTransformer):
    """A Llama-family model with TransformerLens hook names; logits equal ``transformers``'."""

    weight_processing: Optional[dict] = None  # the `llama_processing` flags applied, once any is

    def __init__(self, cfg: LlamaConfig, tokenizer: Optional[Tokenizer] = None) -> None:
        super().__init__(cfg, tokenizer)
        self.embed_tokens = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.blocks = Blocks(
            Block(RMSNorm(cfg.d_model, cfg.eps), LlamaAttention(cfg, l), RMSNorm(cfg.d_model, cfg.eps), LlamaMLP(cfg), l)
            for l in range(cfg.n_layers)
        )
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.setup()

    def embed(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.hook_embed(self.embed_tokens(tokens))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed_tokens.weight

    @property
    def W_U(self) -> torch.Tensor:
        return (self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight).T

    @property
    def b_U(self) -> torch.Tensor:
        return torch.zeros(self.cfg.d_vocab, device=self.device)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of ``messages`` ([{"role", "content"}])."""
        from .gguf import render_chat

        tok = self._tok()
        template = getattr(tok, "chat_template", None)
        if not template:
            raise ValueError("this model's tokenizer has no chat template")
        bos = tok.decode([tok.bos_token_id]) if tok.bos_token_id is not None else ""
        eos = tok.decode([tok.eos_token_id]) if tok.eos_token_id is not None else ""
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)

    def chat(self, messages: list[dict] | str, max_new_tokens: int = 64, **generate_kwargs) -> str:
        """Answer a conversation (or one user message) with the chat template; stops at end of turn."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt = self.apply_chat_template(messages)
        tokens = self.to_tokens(prompt, prepend_bos=False)
        out = self.generate(tokens, max_new_tokens=max_new_tokens, return_type="tokens", **generate_kwargs)
        new = out[0, tokens.shape[1]:].tolist()
        stops = set(getattr(self.tokenizer, "eot_token_ids", [])) | {self._tok().eos_token_id}
        while new and new[-1] in stops:
            new = new[:-1]
        return self.to_string(new)  # type: ignore[return-value]

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Optional[LlamaConfig] = None, seed: Optional[int] = None,
                    tokenizer: Optional[Tokenizer] = None, **kw) -> HookedLlama:
        cfg = cfg or LlamaConfig(**kw)
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(cfg, tokenizer)
        for name, p in model.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0.0, cfg.init_range)
            elif name.endswith("bias"):
                nn.init.normal_(p, 0.0, cfg.init_range)
        return model

    @staticmethod
    def _rename(key: str) -> Optional[str]:
        if key == "lm_head.weight":
            return "lm_head.weight"
        if key.endswith("rotary_emb.inv_freq"):
            return None
        k = key[len("model."):] if key.startswith("model.") else key
        if k.startswith("layers."):
            k = "blocks." + k[len("layers."):]
        k = (k.replace(".self_attn.", ".attn.").replace(".input_layernorm.", ".ln1.")
             .replace(".post_attention_layernorm.", ".ln2."))
        if k.startswith("norm."):
            k = "ln_final." + k[len("norm."):]
        return k

    @classmethod
    def _load(cls, cfg: LlamaConfig, source, tokenizer, dtype, device, what: str) -> HookedLlama:
        if cfg.tie_word_embeddings and "lm_head.weight" in source.keys():
            cfg.tie_word_embeddings = False  # the checkpoint carries its own unembedding
        model = cast(HookedLlama, load_state_into(lambda: cls(cfg, tokenizer), source, cls._rename, dtype=dtype, what=what))
        model.setup()
        return model.to(device)

    @classmethod
    def from_pretrained(cls, model_name: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", tokenizer: Optional[Tokenizer] = None,
                        **unexpected: Any) -> HookedLlama:  # fmt: skip
        """A Hugging Face Llama-family checkpoint (hub name or local directory; safetensors)."""
        if unexpected:
            raise TypeError(f"HookedLlama.from_pretrained got unexpected arguments {sorted(unexpected)}")
        directory = resolve_checkpoint(model_name)
        cfg = LlamaConfig.from_hf(read_config(directory))
        if tokenizer is None and (directory / "tokenizer.json").exists():
            tokenizer = _tokenizer_from_dir(directory)
        return cls._load(cfg, TensorSource(safetensors_files(directory)), tokenizer, dtype, device, str(directory))

    @classmethod
    def from_hf_model(cls, hf_model, tokenizer: Optional[Tokenizer] = None) -> HookedLlama:
        cfg = LlamaConfig.from_hf(hf_model.config.to_dict())
        return cls._load(cfg, DictSource(hf_model.state_dict()), tokenizer, torch.float32, "cpu", "transformers model")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> HookedLlama:
        """A GGUF file (F32/F16/Q8_0/Q4_0/Q4_1 dequantised); config and tokenizer from its metadata."""
        from .gguf import read_gguf

        ck = read_gguf(Path(path))
        cfg = LlamaConfig.from_gguf(ck.settings)
        tok = HFTokenizer(ck.tokenizer, ck.bos_token_id, ck.eos_token_id, ck.pad_token_id, ck.add_bos_token,
                          ck.chat_template, ck.eot_token_ids)
        source = DictSource(ck.tensors, copy=False, checked_finite=True)  # read_gguf refuses NaN/Inf
        return cls._load(cfg, source, tok, dtype, device, str(path))


def _tokenizer_from_dir(directory) -> HFTokenizer:
    import json

    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(directory / "tokenizer.json"))
    cfg_path = directory / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def tid(key):
        t = tc.get(key)
        if isinstance(t, dict):
            t = t.get("content")
        return raw.token_to_id(t) if t else None

    eot = [i for i in (raw.token_to_id("<|im_end|>"), raw.token_to_id("<|eot_id|>")) if i is not None]
    return HFTokenizer(raw, tid("bos_token"), tid("eos_token"), tid("pad_token"),
                       bool(tc.get("add_bos_token", False)), tc.get("chat_template"), eot)
