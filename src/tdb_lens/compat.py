"""TransformerLens entry points: ``HookedTransformer.from_pretrained``, ``from_pretrained_no_processing``,
``HookedTransformerConfig`` and ``from_config`` (TransformerLens' ``HookedTransformer(cfg)``).

``tdb_lens.HookedTransformer.from_pretrained(name)`` processes weights as TransformerLens does by
default (``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``), so
numbers read off a ported notebook match TransformerLens'. The family classes' own
``HookedGPT2.from_pretrained`` / ``tdb_lens.load`` keep tdb_lens' default (no processing: logits
equal Hugging Face's). Llama-family models are processed as TransformerLens processes RMSNorm
models (``center_writing_weights`` skipped; see `tdb_lens.models.llama_processing`).
See docs/PORTING.md for every difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from .models.config import ModelConfig
from .models.engine import HookedTransformer
from .models.gpt2 import GPT2_NAMES, GPT2Config, HookedGPT2
from .models.llama import HookedLlama, LlamaConfig
from .models.optional_hooks import ATTN_IN_CONFLICT
from .models.processing import process_weights_

#: TransformerLens' default weight processing in ``from_pretrained``
TL_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
#: TransformerLens keyword arguments that change nothing here
_NO_OP_KWARGS = frozenset({"move_to_device", "n_devices", "checkpoint_index", "checkpoint_value", "trust_remote_code",
                           "first_n_layers", "default_prepend_bos", "default_padding_side", "n_ctx"})


def _family(model_name: str, hf_model: Any) -> str:
    if hf_model is not None:
        mt = getattr(getattr(hf_model, "config", None), "model_type", None)
    elif model_name in GPT2_NAMES:
        return "gpt2"
    elif str(model_name).endswith(".gguf") or str(model_name).lower().startswith("smollm2"):
        return "llama"
    else:
        from .models.hub import read_config, resolve_checkpoint

        mt = read_config(Path(resolve_checkpoint(model_name))).get("model_type")
    if mt == "gpt2":
        return "gpt2"
    from .models.llama import SUPPORTED_MODEL_TYPES

    if mt in SUPPORTED_MODEL_TYPES:
        return "llama"
    raise ValueError(f"{model_name}: model_type {mt!r} is not supported (GPT-2 and the Llama family are)")


def _hf_tokenizer(tokenizer: Any) -> Any:
    """A ``transformers`` tokenizer (what TransformerLens takes) wrapped as a tdb_lens tokenizer."""
    if tokenizer is None or hasattr(tokenizer, "id_to_token") and hasattr(tokenizer, "pad_id"):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("tokenizer must be a tdb_lens tokenizer or a fast transformers tokenizer, "
                        f"got {type(tokenizer).__name__}")
    from .tokenizer import HFTokenizer

    return HFTokenizer(backend, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       add_bos_token=bool(getattr(tokenizer, "add_bos_token", False)))


def from_pretrained(
    model_name: str,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    hf_model: Any = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> HookedTransformer:
    """TransformerLens' ``HookedTransformer.from_pretrained``: the model for ``model_name`` (a GPT-2
    name, a hub id, a local directory, a ``.gguf`` file, ``"smollm2-135m"``) or ``hf_model`` (an
    in-memory ``transformers`` model), with TransformerLens' default weight processing.

    ``tokenizer`` may be a ``transformers`` fast tokenizer. Unknown TransformerLens options raise.
    """
    if refactor_factored_attn_matrices:
        raise NotImplementedError("refactor_factored_attn_matrices is not implemented; pass False (TransformerLens "
                                  "refuses it for rotary models such as the Llama family)")
    unknown = sorted(set(kwargs) - _NO_OP_KWARGS)
    if unknown:
        raise TypeError(f"from_pretrained got options tdb_lens does not implement: {unknown}")
    flags = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
             "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}
    tok = _hf_tokenizer(tokenizer)
    family = _family(model_name, hf_model)
    dev = device or "cpu"
    if family == "gpt2":
        if hf_model is not None:
            return HookedGPT2.from_hf_model(hf_model, tokenizer=tok, **flags).to(dev)
        return HookedGPT2.from_pretrained(model_name, dtype=dtype, device=dev, tokenizer=tok, **flags)
    model: HookedTransformer
    if hf_model is not None:
        model = HookedLlama.from_hf_model(hf_model, tokenizer=tok)
    else:
        from .loading import load

        model = load(model_name) if tok is None else HookedLlama.from_pretrained(model_name, dtype, dev, tok)
    if any(flags.values()):  # as GPT-2's loaders: an unprocessed model records nothing
        model = process_weights_(model, **flags)
    return model.to(device=dev, dtype=dtype)


def from_pretrained_no_processing(model_name: str, **kwargs: Any) -> HookedTransformer:
    """`from_pretrained` with every processing flag off (logits equal Hugging Face's)."""
    for k in TL_PROCESSING:
        kwargs.setdefault(k, False)
    return from_pretrained(model_name, **kwargs)


def HookedTransformerConfig(
    n_layers: int,
    d_model: int,
    n_ctx: int,
    d_head: int,
    n_heads: int = -1,
    d_mlp: Optional[int] = None,
    act_fn: Optional[str] = None,
    d_vocab: int = -1,
    normalization_type: Optional[str] = "LN",
    positional_embedding_type: str = "standard",
    eps: float = 1e-5,
    n_key_value_heads: Optional[int] = None,
    rotary_base: float = 10000.0,
    gated_mlp: bool = False,
    attn_only: bool = False,
    init_range: float = 0.02,
    use_attn_result: bool = False,
    use_split_qkv_input: bool = False,
    use_attn_in: bool = False,
    use_hook_mlp_in: bool = False,
    **ignored: Any,
) -> ModelConfig:
    """TransformerLens' config arguments -> the matching family config: LayerNorm + learned positions
    + ``gelu_new`` is `GPT2Config`; RMSNorm + rotary + gated ``silu`` is `LlamaConfig`. Other
    architectures raise, naming what is supported. Build the model with `from_config`.

    The ``use_*`` hook switches are kept on the config (``cfg.use_attn_in`` ...) and applied by
    `from_config`; the model's ``set_use_*`` setters keep them in step afterwards."""
    flags = {"use_attn_result": use_attn_result, "use_split_qkv_input": use_split_qkv_input,
             "use_attn_in": use_attn_in, "use_hook_mlp_in": use_hook_mlp_in}
    cfg = _family_config(n_layers, d_model, n_ctx, d_head, n_heads, d_mlp, act_fn, d_vocab, normalization_type,
                         positional_embedding_type, eps, n_key_value_heads, rotary_base, gated_mlp, attn_only, init_range)
    _check_hook_flags(cfg, flags)
    for flag, on in flags.items():
        setattr(cfg, flag, on)
    return cfg


#: TransformerLens' hook switches that `HookedTransformerConfig` takes and `from_config` applies
HOOK_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


def _check_hook_flags(cfg: ModelConfig, flags: dict[str, bool]) -> None:
    for flag, on in flags.items():
        if not isinstance(on, bool):
            raise TypeError(f"{flag} must be True or False, got {on!r}")
    if flags["use_attn_in"] and flags["use_split_qkv_input"]:
        raise ValueError(ATTN_IN_CONFLICT)
    if flags["use_attn_in"] and cfg.n_key_value_heads != cfg.n_heads:
        raise ValueError(f"use_attn_in needs one key/value head per query head; the config has {cfg.n_heads} query "
                         f"and {cfg.n_key_value_heads} key/value heads (use use_split_qkv_input instead)")


def _family_config(n_layers: int, d_model: int, n_ctx: int, d_head: int, n_heads: int, d_mlp: Optional[int],
                   act_fn: Optional[str], d_vocab: int, normalization_type: Optional[str], positional_embedding_type: str,
                   eps: float, n_key_value_heads: Optional[int], rotary_base: float, gated_mlp: bool, attn_only: bool,
                   init_range: float) -> ModelConfig:
    n_heads = d_model // d_head if n_heads == -1 else n_heads
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    if d_vocab <= 0:
        raise ValueError("d_vocab must be given (TransformerLens reads it from a tokenizer; pass it here)")
    if attn_only:
        raise ValueError("attention-only models are not supported")
    tl_arch = (normalization_type, positional_embedding_type, act_fn, gated_mlp)
    if _is_family(GPT2Config, *tl_arch):
        if d_head * n_heads != d_model:
            raise ValueError(f"a GPT-2 config needs d_head * n_heads == d_model, got {d_head} * {n_heads} != {d_model}")
        return GPT2Config(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_mlp=d_mlp, d_vocab=d_vocab,
                          n_ctx=n_ctx, eps=eps, init_range=init_range)
    if _is_family(LlamaConfig, *tl_arch):
        return LlamaConfig(n_layers=n_layers, n_heads=n_heads, n_key_value_heads=n_key_value_heads or n_heads,
                           d_model=d_model, d_head=d_head, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx, eps=eps,
                           rope_theta=rotary_base, tie_word_embeddings=False, init_range=init_range)
    raise ValueError(
        f"unsupported architecture (normalization_type={normalization_type!r}, positional_embedding_type="
        f"{positional_embedding_type!r}, act_fn={act_fn!r}, gated_mlp={gated_mlp}); supported: GPT-2 "
        "('LN', 'standard', 'gelu_new') and Llama ('RMS', 'rotary', 'silu', gated_mlp=True)")


def _is_family(config_class: type[ModelConfig], normalization_type: Optional[str], positional_embedding_type: str,
               act_fn: Optional[str], gated_mlp: bool) -> bool:
    """Whether TransformerLens' architecture fields describe ``config_class``'s family (the norm with or
    without TransformerLens' "Pre" suffix for a folded norm)."""
    arch = config_class.architecture
    same = (positional_embedding_type, act_fn, bool(gated_mlp)) == (arch.positional_embedding_type, arch.act_fn, arch.gated_mlp)
    return same and normalization_type in (arch.normalization_type, arch.normalization_type + "Pre")


def from_config(cfg: ModelConfig, seed: Optional[int] = None, **kwargs: Any) -> HookedTransformer:
    """TransformerLens' ``HookedTransformer(cfg)``: a model of ``cfg``'s family with random weights
    (with the ``use_*`` hook switches a `HookedTransformerConfig` was given switched on)."""
    model: HookedTransformer
    if isinstance(cfg, GPT2Config):
        model = HookedGPT2.from_config(cfg, seed=seed, **kwargs)
    elif isinstance(cfg, LlamaConfig):
        model = HookedLlama.from_config(cfg, seed=seed, **kwargs)
    else:
        raise TypeError(f"from_config takes a GPT2Config or LlamaConfig (see HookedTransformerConfig), got {type(cfg).__name__}")
    for flag in HOOK_FLAGS:
        if getattr(cfg, flag, False):
            getattr(model, f"set_{flag}")(True)
    return model
