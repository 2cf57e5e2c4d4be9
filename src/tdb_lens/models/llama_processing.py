"""Opt-in weight processing for `HookedLlama` (RMSNorm: Llama 3, SmolLM2, Qwen2), in place, as
TransformerLens 3.9 processes an RMSNorm model.

The flags are the same four as GPT-2's (`tdb_lens.models.processing`); what each does here:

=========================  ==========================================================================
option                     effect
=========================  ==========================================================================
``fold_ln``                Every RMSNorm's weight moves into the layers that read it: ``ln1`` into
                           ``q_proj``/``k_proj``/``v_proj`` (with grouped-query attention the
                           key/value weights are folded per key/value head, as TransformerLens'
                           ``_W_K``/``_W_V``), ``ln2`` into ``gate_proj`` and ``up_proj``,
                           ``ln_final`` into the unembedding, which is untied from ``W_E`` first
                           (``W_E`` is unchanged; SmolLM2 ties them). The norms keep only the scaling
                           (``weight`` is ``None``: TransformerLens' ``RMSPre``); their
                           ``hook_scale``/``hook_normalized`` are unchanged. RMSNorm has no bias and
                           does not centre, so nothing is centred (TransformerLens folds RMSNorm with
                           ``fold_biases=False, center_weights=False``). q, k, v, MLP activations,
                           residual stream and **logits unchanged**.
``center_writing_weights`` **Not applied** (recorded as False), as TransformerLens skips it for
                           RMSNorm models: RMSNorm does not remove a vector's mean, so centring the
                           weights that write to the residual stream would change the model.
``center_unembed``         ``W_U`` (untied first) gets zero mean over the vocabulary. **Logits shift
                           by a per-position constant** (log-probs unchanged). ``b_U`` stays zero.
``fold_value_biases``      Models with q/k/v biases (Qwen2): ``b_V`` becomes 0 and the output bias
                           ``b_O`` (created, zero before) gains ``sum_h b_V[kv(h)] @ W_O[h]``, each
                           query head reading its key/value head's bias. ``attn.hook_v``, ``hook_z``
                           and ``hook_result`` change; ``hook_attn_out`` and everything downstream
                           **unchanged**. Without biases it changes nothing.
=========================  ==========================================================================

Applied in TransformerLens' order (fold_ln, center_unembed, fold_value_biases), computed in float32
whatever the storage dtype. Idempotent (a folded norm is skipped; centring twice changes nothing);
the flags applied are recorded in ``model.weight_processing``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .components import RMSNorm
from .llama import HookedLlama
from .processing import PROCESSING_FLAGS, register_processor

if TYPE_CHECKING:  # pragma: no cover
    from .llama import LlamaAttention, LlamaMLP


def _untie_unembed(model: HookedLlama) -> nn.Linear:
    """The model's own unembedding ``lm_head`` (a copy of ``W_E`` when tied) so ``W_E`` can stay as it is."""
    if model.lm_head is None:
        w = model.embed_tokens.weight
        head = nn.Linear(model.cfg.d_model, model.cfg.d_vocab, bias=False, device=w.device, dtype=w.dtype)
        head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        model.lm_head = head
        # a copy of the config: the caller's (from_config(cfg)) may describe other, still tied models
        cfg = copy.copy(model.cfg)
        cfg.tie_word_embeddings = False
        model.cfg = cfg
    return model.lm_head


def _fold_rms_into(norm: RMSNorm, *readers: nn.Linear) -> None:
    """``(n * w) @ W.T == n @ (W * w).T`` for each reader ``W [out, d_model]``; the norm keeps only its scaling."""
    if norm.weight is None:  # already folded
        return
    w = norm.weight.detach().float()
    for lin in readers:
        lin.weight.copy_(lin.weight.float() * w)
    norm.weight = None


def _fold_value_bias(attn: LlamaAttention) -> None:
    """``b_O += sum_h b_V[kv(h)] @ W_O[h]`` (patterns sum to 1, so a value bias is a constant write); ``b_V = 0``."""
    b_v = attn.v_proj.bias
    if b_v is None:
        return
    rep = attn.n_heads // attn.n_kv_heads
    per_head = b_v.detach().float().view(attn.n_kv_heads, attn.d_head).repeat_interleave(rep, dim=0)
    write = torch.einsum("hd,hdm->m", per_head, attn.W_O.detach().float())
    out = attn.o_proj
    if out.bias is None:
        w = out.weight
        out.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    out.bias.copy_(out.bias.float() + write)
    b_v.zero_()


@torch.no_grad()
def process_llama_weights_(
    model: HookedLlama,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> HookedLlama:
    """Apply TransformerLens' weight processing for RMSNorm models to ``model`` in place; returns it.

    ``center_writing_weights`` is accepted and skipped, as TransformerLens skips it for RMSNorm (see
    the module docstring). Reach it through `tdb_lens.models.processing.process_weights_`.
    """
    if not isinstance(model, HookedLlama):
        raise TypeError(f"process_llama_weights_ takes a HookedLlama, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("weight processing needs materialised weights; this model is still on the meta device")
    done = dict(model.weight_processing or {k: False for k in PROCESSING_FLAGS})
    layers = [(cast(RMSNorm, b.ln1), cast("LlamaAttention", b.attn), cast(RMSNorm, b.ln2), cast("LlamaMLP", b.mlp))
              for b in model.blocks]  # fmt: skip

    if fold_ln:
        for ln1, attn, ln2, mlp in layers:
            _fold_rms_into(ln1, attn.q_proj, attn.k_proj, attn.v_proj)
            _fold_rms_into(ln2, mlp.gate_proj, mlp.up_proj)
        ln_final = cast(RMSNorm, model.ln_final)
        if ln_final.weight is not None:
            _fold_rms_into(ln_final, _untie_unembed(model))
        done["fold_ln"] = True

    if center_unembed:
        head = _untie_unembed(model).weight  # [d_vocab, d_model]: W_U.T, centred over the vocabulary
        head.copy_(head.float() - head.float().mean(0, keepdim=True))
        done["center_unembed"] = True

    if fold_value_biases:
        for _, attn, _, _ in layers:
            _fold_value_bias(attn)
        done["fold_value_biases"] = True

    model.weight_processing = done
    return model


register_processor(HookedLlama, process_llama_weights_)
