"""Opt-in weight processing for `HookedGPT2` (LayerNorm, GPT-2 weight layout): the four TransformerLens
simplifications, in place.

Each option rewrites weights so the model computes the same next-token distribution while some
activations become easier to read. Nothing is processed unless asked for: a freshly loaded
`HookedGPT2` is bit-for-bit Hugging Face GPT-2. Call `process_weights_(model, ...)` or pass the same
flags to ``HookedGPT2.from_pretrained`` / ``from_hf_model`` / ``from_config``.

What each option changes, hook by hook (everything not listed is unchanged up to float rounding):

=========================  ==========================================================================
option                     effect on hooks
=========================  ==========================================================================
``fold_ln``                Every LayerNorm's weight and bias move into the layer that reads it
                           (``c_attn``, ``c_fc``, the unembedding, which becomes untied from
                           ``W_E`` and gains a bias ``b_U``); the norms keep only centring and
                           scaling (``weight``/``bias`` are ``None``). Reading weights are centred
                           over ``d_model``. ``ln*.hook_scale`` and ``ln*.hook_normalized``
                           unchanged (``hook_normalized`` is taken before weight and bias); q, k, v,
                           ``mlp.hook_pre``, residual stream and **logits unchanged**.
``center_writing_weights`` ``W_E``, ``W_pos``, ``W_O``/``b_O`` and ``W_out``/``b_out`` get zero mean
                           over ``d_model`` (the unembedding is untied first). ``hook_embed``,
                           ``hook_pos_embed``, ``hook_attn_out``, ``hook_mlp_out``,
                           ``attn.hook_result`` and every ``hook_resid_*`` change by a per-position
                           constant times the all-ones vector (they become mean-free); the norms
                           remove that constant, so ``hook_scale``/``hook_normalized``, q, k, v,
                           patterns, MLP activations and **logits are unchanged**.
``center_unembed``         ``W_U`` (untied) and ``b_U`` get zero mean over the vocabulary. **Logits
                           shift by a per-position constant** (log-probs and loss unchanged); all
                           other hooks unchanged.
``fold_value_biases``      ``b_V`` becomes 0 and ``b_O += sum_h b_V[h] @ W_O[h]`` (attention
                           patterns sum to 1, so a value bias is a constant write). ``attn.hook_v``,
                           ``attn.hook_z`` and ``attn.hook_result`` change (per head, by the old
                           bias); ``hook_attn_out`` and everything downstream **unchanged**.
=========================  ==========================================================================

The maths follows TransformerLens' ``fold_ln``, ``center_writing_weights``, ``center_unembed`` and
``fold_value_biases`` (applied in that order, as TransformerLens does), so a processed `HookedGPT2`
matches ``HookedTransformer.from_pretrained(..., fold_ln=..., ...)`` hook for hook.

Processing is idempotent: an already-folded norm (``weight is None``) is skipped, centring twice
changes nothing. The flags that have been applied are recorded in ``model.weight_processing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .components import LayerNorm
from .gpt2 import HookedGPT2
from .processing import PROCESSING_FLAGS, process_weights_, register_processor

if TYPE_CHECKING:  # pragma: no cover
    from .gpt2 import GPT2MLP, GPT2Attention

# `process_weights_` (re-exported here, its former home) is the family-neutral entry point; GPT-2's
# own processor is `process_gpt2_weights_`
__all__ = ["PROCESSING_FLAGS", "process_gpt2_weights_", "process_weights_"]


def _untie_unembed(model: HookedGPT2) -> None:
    """Give the model its own ``W_U`` [d_model, d_vocab] (a copy of ``W_E.T``) so ``W_E`` can change alone."""
    if model.W_U_untied is None:
        w = model.wte.weight
        model.W_U_untied = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)


def _ensure_b_U(model: HookedGPT2) -> nn.Parameter:
    if model.b_U_param is None:
        w = model.W_U
        model.b_U_param = nn.Parameter(
            torch.zeros(w.shape[1], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad
        )
    return model.b_U_param


def _layers(model: HookedGPT2) -> list[tuple[LayerNorm, GPT2Attention, LayerNorm, GPT2MLP]]:
    """Each block's (ln1, attn, ln2, mlp), typed as GPT-2 builds them."""
    return [(cast(LayerNorm, b.ln1), cast("GPT2Attention", b.attn), cast(LayerNorm, b.ln2), cast("GPT2MLP", b.mlp))
            for b in model.blocks]  # fmt: skip


def _fold_norm_into(norm: LayerNorm, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Fold a LayerNorm into the layer reading it: ``x_norm @ W + b`` with W [d_model, out], b [out].

    ``(n * w + c) @ W + b == n @ (w[:, None] * W) + (c @ W + b)``; the reading weight is then centred
    over ``d_model`` (``n`` has zero mean, so that changes nothing). Computed in float32 whatever the
    storage dtype (as TransformerLens does). Returns False if the norm was already folded.
    """
    if norm.weight is None or norm.bias is None:
        return False
    W, b = weight.float(), bias.float()  # the tensors themselves when already float32
    w, c = norm.weight.detach().float(), norm.bias.detach().float()
    b = b + c @ W
    W = W * w[:, None]
    W = W - W.mean(0, keepdim=True)
    weight.copy_(W)
    bias.copy_(b)
    norm.weight = None
    norm.bias = None
    return True


def _center_rows(t: torch.Tensor) -> None:
    """Subtract each vector's mean over the last axis (the residual-stream axis for writing weights)."""
    f = t.float()
    t.copy_(f - f.mean(-1, keepdim=True))


@torch.no_grad()
def process_gpt2_weights_(
    model: HookedGPT2,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> HookedGPT2:
    """Apply the chosen TransformerLens weight simplifications to ``model`` in place; returns it.

    See the module docstring for which hooks each option changes. The model is edited through its
    parameters (Hugging Face layout), so ``W_Q``, ``b_O``... views show the processed weights.
    Reach it through `tdb_lens.models.processing.process_weights_`.
    """
    if not isinstance(model, HookedGPT2):
        raise TypeError(f"process_gpt2_weights_ takes a HookedGPT2 (LayerNorm, tied GPT-2 weights); got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("process_weights_ needs materialised weights; this model is still on the meta device")
    done = getattr(model, "weight_processing", None) or {k: False for k in PROCESSING_FLAGS}

    layers = _layers(model)
    if fold_ln:
        for ln1, attn, ln2, mlp in layers:
            _fold_norm_into(ln1, attn.c_attn.weight, attn.c_attn.bias)
            _fold_norm_into(ln2, mlp.c_fc.weight, mlp.c_fc.bias)
        ln_final = cast(LayerNorm, model.ln_final)
        if ln_final.weight is not None:
            _untie_unembed(model)
            _fold_norm_into(ln_final, cast(nn.Parameter, model.W_U_untied), _ensure_b_U(model))
        done["fold_ln"] = True

    if center_writing_weights:
        _untie_unembed(model)  # W_E changes; the unembedding must not
        _center_rows(model.wte.weight)
        _center_rows(model.wpe.weight)
        for _, attn, _, mlp in layers:
            # c_proj.weight rows are (head, d_head) -> d_model, i.e. W_O flattened
            for lin in (attn.c_proj, mlp.c_proj):
                _center_rows(lin.weight)
                _center_rows(lin.bias)
        done["center_writing_weights"] = True

    if center_unembed:
        _untie_unembed(model)
        _center_rows(cast(nn.Parameter, model.W_U_untied))  # [d_model, d_vocab]: mean over the vocabulary
        if model.b_U_param is not None:
            _center_rows(model.b_U_param)
        done["center_unembed"] = True

    if fold_value_biases:
        for _, attn, _, _ in layers:
            D = attn.d_model
            b_v = attn.c_attn.bias[2 * D:]  # b_V flattened (head, d_head)
            b_o = attn.c_proj.bias
            b_o.copy_(b_o.float() + b_v.float() @ attn.c_proj.weight.float())  # sum_h b_V[h] @ W_O[h]
            b_v.zero_()
            if done.get("center_writing_weights"):
                _center_rows(attn.c_proj.bias)  # as TransformerLens: b_O stays mean-free
        done["fold_value_biases"] = True

    model.weight_processing = done
    return model


register_processor(HookedGPT2, process_gpt2_weights_)
