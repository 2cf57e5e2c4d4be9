"""`HookedGPT2`: GPT-2 exactly as Hugging Face's ``GPT2LMHeadModel`` computes it, with hook points.

Parameters are stored in Hugging Face's layout (``c_attn``, ``c_proj``, ``c_fc`` as Conv1D
``[in, out]``), so loading is a rename; TransformerLens-convention weights (``W_Q`` ...) are views.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from ..hooks import HookPoint
from ..hooks.layout import layout
from ..tokenizer import Tokenizer, gpt2_tokenizer
from .components import MLP, Attention, Block, Blocks, ForwardContext, LayerNorm
from .config import ModelConfig, TLArchitecture
from .engine import HookedTransformer
from .hub import DictSource, TensorSource, load_state_into, read_config, resolve_checkpoint, safetensors_files

GPT2_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}


@dataclass(kw_only=True)
class GPT2Config(ModelConfig):
    """GPT-2's sizes (`ModelConfig`'s fields; defaults: GPT-2 small); ``d_head`` is ``d_model // n_heads``."""

    family_name = "GPT-2"
    architecture = TLArchitecture(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
                                  gated_mlp=False, original_architecture="GPT2LMHeadModel", default_prepend_bos=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    @classmethod
    def _from_hf(cls, hf: dict) -> GPT2Config:
        act = hf.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ValueError(f"only GPT-2's gelu_new activation is supported, config has {act!r}")
        d = hf["n_embd"]
        return cls(
            n_layers=hf["n_layer"], n_heads=hf["n_head"], d_model=d, d_mlp=hf.get("n_inner") or 4 * d,
            d_vocab=hf["vocab_size"], n_ctx=hf["n_positions"], eps=hf.get("layer_norm_epsilon", 1e-5),
            init_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": self.n_layers,
            "n_head": self.n_heads, "n_embd": self.d_model, "n_inner": self.d_mlp, "vocab_size": self.d_vocab,
            "n_positions": self.n_ctx, "n_ctx": self.n_ctx, "layer_norm_epsilon": self.eps,
            "activation_function": "gelu_new", "initializer_range": self.init_range,
            "bos_token_id": 50256, "eos_token_id": 50256,
        }


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with weight ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], -1)


class GPT2Attention(Attention):
    def __init__(self, cfg: GPT2Config, layer: int) -> None:
        super().__init__(cfg.n_heads, cfg.n_heads, cfg.d_head, cfg.d_model, layer)
        self.c_attn = Conv1D(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = Conv1D(cfg.d_model, cfg.d_model)

    def project(self, x):
        b, p, _ = x.shape
        q, k, v = self.c_attn(x).split(self.d_model, dim=-1)
        shape = (b, p, self.n_heads, self.d_head)
        return q.view(shape), k.view(shape), v.view(shape)

    def project_out(self, z):
        return self.c_proj(z)

    def _w(self, i: int) -> torch.Tensor:  # [h, d_model, d_head] view into c_attn.weight
        D = self.d_model
        return self.c_attn.weight[:, i * D:(i + 1) * D].view(D, self.n_heads, self.d_head).permute(1, 0, 2)

    W_Q = property(lambda self: self._w(0))
    W_K = property(lambda self: self._w(1))
    W_V = property(lambda self: self._w(2))
    b_Q = property(lambda self: self.c_attn.bias[: self.d_model].view(self.n_heads, self.d_head))
    b_K = property(lambda self: self.c_attn.bias[self.d_model: 2 * self.d_model].view(self.n_heads, self.d_head))
    b_V = property(lambda self: self.c_attn.bias[2 * self.d_model:].view(self.n_heads, self.d_head))
    W_O = property(lambda self: self.c_proj.weight.view(self.n_heads, self.d_head, self.d_model))
    b_O = property(lambda self: self.c_proj.bias)


class GPT2MLP(MLP):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.d_model, cfg.d_mlp)
        self.c_proj = Conv1D(cfg.d_mlp, cfg.d_model)
        self.hook_pre = HookPoint(layout("mlp", "pre", "batch", "pos", "d_mlp"))
        self.hook_post = HookPoint(layout("mlp", "post", "batch", "pos", "d_mlp"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gelu_new is GELU's tanh approximation
        return self.c_proj(self.hook_post(F.gelu(self.hook_pre(self.c_fc(x)), approximate="tanh")))

    W_in = property(lambda self: self.c_fc.weight)
    b_in = property(lambda self: self.c_fc.bias)
    W_out = property(lambda self: self.c_proj.weight)
    b_out = property(lambda self: self.c_proj.bias)


GPT2_VOCAB_SIZE = 50257  # GPT-2's tokenizer; attached by default only to models with this vocabulary


class HookedGPT2(HookedTransformer):
    """GPT-2 with TransformerLens hook names. Logits equal ``transformers``' (no weight processing)."""

    weight_processing: Optional[dict] = None  # the `gpt2_processing` flags applied, once any is
    _no_tokenizer_reason: Optional[str] = None  # why no tokenizer was attached (said when text is passed)

    def __init__(self, cfg: GPT2Config, tokenizer: Optional[Tokenizer] = None) -> None:
        super().__init__(cfg, tokenizer)
        self.wte = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.hook_pos_embed = HookPoint(layout("embed", "pos_embed", "batch", "pos", "d_model"))
        self.blocks = Blocks(
            Block(LayerNorm(cfg.d_model, cfg.eps), GPT2Attention(cfg, l), LayerNorm(cfg.d_model, cfg.eps), GPT2MLP(cfg), l)
            for l in range(cfg.n_layers)
        )
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps)
        # After fold_ln / center_unembed the unembedding is untied and gets a bias (TransformerLens' b_U).
        self.W_U_untied: Optional[nn.Parameter] = None
        self.b_U_param: Optional[nn.Parameter] = None
        self.setup()

    # ---- architecture hooks into the engine -------------------------------------------------
    def embed(self, tokens: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.hook_embed(self.wte(tokens)) + self.hook_pos_embed(self.wpe(ctx.positions))

    def unembed(self, x: Float[torch.Tensor, "batch pos d_model"]) -> torch.Tensor:
        if self.W_U_untied is None:
            return F.linear(x, self.wte.weight)
        out = x @ self.W_U_untied
        return out if self.b_U_param is None else out + self.b_U_param

    @property
    def W_E(self) -> torch.Tensor:
        return self.wte.weight

    @property
    def W_pos(self) -> torch.Tensor:
        return self.wpe.weight

    @property
    def W_U(self) -> torch.Tensor:
        return self.wte.weight.T if self.W_U_untied is None else self.W_U_untied

    @property
    def b_U(self) -> torch.Tensor:
        return torch.zeros(self.cfg.d_vocab, device=self.device) if self.b_U_param is None else self.b_U_param

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, cfg: Optional[GPT2Config] = None, seed: Optional[int] = None, tokenizer: Optional[Tokenizer] = None,
        fold_ln: bool = False, center_writing_weights: bool = False, center_unembed: bool = False,
        fold_value_biases: bool = False, **kw,
    ) -> HookedGPT2:
        """Random weights, initialised as Hugging Face initialises GPT-2 (normal(0, 0.02)).

        The processing flags are `gpt2_processing.process_weights_`'s (all off by default)."""
        cfg = cfg or GPT2Config(**kw)
        if seed is not None:
            torch.manual_seed(seed)
        model = cls._with_default_tokenizer(cfg, tokenizer)
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                nn.init.normal_(p, 0.0, cfg.init_range)
                if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual writes
                    nn.init.normal_(p, 0.0, cfg.init_range / (2 * cfg.n_layers) ** 0.5)
        return model._process(fold_ln, center_writing_weights, center_unembed, fold_value_biases)

    @staticmethod
    def _rename(key: str) -> Optional[str]:
        for prefix in ("transformer.", ""):
            if key.startswith(prefix):
                k = key[len(prefix):]
                break
        if key == "lm_head.weight" or k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            return None  # tied to wte / causal-mask buffers of older checkpoints
        if k.startswith("h."):
            k = "blocks." + k[2:]
        k = k.replace(".ln_1.", ".ln1.").replace(".ln_2.", ".ln2.")
        if k.startswith("ln_f."):
            k = "ln_final." + k[len("ln_f."):]
        return k

    @classmethod
    def from_pretrained(
        cls, model_name: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        tokenizer: Optional[Tokenizer] = None, fold_ln: bool = False, center_writing_weights: bool = False,
        center_unembed: bool = False, fold_value_biases: bool = False, **unexpected: Any,
    ) -> HookedGPT2:
        """GPT-2 from the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), a local Hugging
        Face directory (config.json + model.safetensors or a sharded index).

        No weight processing unless asked: the flags are TransformerLens' (see `gpt2_processing`), all
        off by default, so logits equal ``transformers``'."""
        if unexpected:
            raise TypeError(f"HookedGPT2.from_pretrained got unexpected arguments {sorted(unexpected)}")
        directory = resolve_checkpoint(GPT2_NAMES.get(str(model_name), model_name))
        cfg = GPT2Config.from_hf(read_config(directory))
        source = TensorSource(safetensors_files(directory))
        model = cls._load(cfg, source, dtype, device, tokenizer, what=str(directory))
        return model._process(fold_ln, center_writing_weights, center_unembed, fold_value_biases)

    @classmethod
    def from_hf_model(
        cls, hf_model, tokenizer: Optional[Tokenizer] = None, fold_ln: bool = False,
        center_writing_weights: bool = False, center_unembed: bool = False, fold_value_biases: bool = False,
    ) -> HookedGPT2:
        """From an in-memory ``transformers`` ``GPT2LMHeadModel`` (weights copied; processing flags as
        `from_pretrained`)."""
        cfg = GPT2Config.from_hf(hf_model.config.to_dict())
        model = cls._load(cfg, DictSource(hf_model.state_dict()), torch.float32, "cpu", tokenizer, what="transformers model")
        return model._process(fold_ln, center_writing_weights, center_unembed, fold_value_biases)

    def _process(self, fold_ln: bool, center_writing_weights: bool, center_unembed: bool, fold_value_biases: bool) -> HookedGPT2:
        if not (fold_ln or center_writing_weights or center_unembed or fold_value_biases):
            return self
        from .gpt2_processing import process_weights_

        return process_weights_(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases)

    @classmethod
    def _load(cls, cfg, source, dtype, device, tokenizer, what: str) -> HookedGPT2:
        build = lambda: cls._with_default_tokenizer(cfg, tokenizer)
        model = cast(HookedGPT2, load_state_into(build, source, cls._rename, dtype=dtype, what=what))
        model.setup()
        return model.to(device)

    @classmethod
    def _with_default_tokenizer(cls, cfg: GPT2Config, tokenizer: Optional[Tokenizer]) -> HookedGPT2:
        """The model with ``tokenizer``, else GPT-2's own when the vocabulary is GPT-2's (50257 ids),
        else none (text input then raises, saying why)."""
        if tokenizer is not None:
            return cls(cfg, tokenizer)
        if cfg.d_vocab == GPT2_VOCAB_SIZE:
            return cls(cfg, gpt2_tokenizer())
        model = cls(cfg, None)
        model._no_tokenizer_reason = (
            f"its vocabulary has {cfg.d_vocab} tokens, GPT-2's tokenizer {GPT2_VOCAB_SIZE}, so none was attached"
        )
        return model

    def hf_config(self) -> dict:
        return self.cfg.to_hf()

    def config_dict(self) -> dict:
        return asdict(self.cfg)
