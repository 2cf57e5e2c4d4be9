"""Pieces every architecture shares: norms, the attention core, the residual block, the KV cache.

An architecture supplies its own projections (how q/k/v and the output are computed from its
stored weights) and positional scheme; everything about hooks, masking, caching and per-head
views lives here once. Fast paths: a norm or an attention pattern with no hooks on it runs the
fused PyTorch kernel (``F.layer_norm``, ``F.rms_norm``, ``scaled_dot_product_attention``); with a
hook attached it is computed step by step so the intermediate can be read or edited.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union, overload

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from ..hooks import HookPoint
from ..hooks.hook_point import hooks_active
from ..hooks.layout import HookLayout, layout
from .optional_hooks import ATTN_IN_CONFLICT, busy_reason


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
def norm_hook_points(component: str = "ln_final") -> tuple[HookPoint, HookPoint]:
    """``hook_scale [batch, pos, singleton]`` and ``hook_normalized [batch, pos, d_model]`` of a norm.

    The owner (a `Block`: ln1 / ln2) re-stamps the component; a free-standing norm is the final one.
    """
    return (HookPoint(layout(component, "scale", "batch", "pos", "singleton")),
            HookPoint(layout(component, "normalized", "batch", "pos", "d_model")))


def stamp(module: nn.Module, **fields) -> None:
    """Set layout fields (``layer=``, ``component=``) on every hook point inside ``module``.

    Used by owners at construction: a block stamps its layer on everything it holds, and names
    its two norms ``ln1`` and ``ln2``.
    """
    for hp in module.modules():
        if isinstance(hp, HookPoint) and hp.layout is not None:
            hp.layout = hp.layout.stamped(**fields)


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------
class Norm(nn.Module):
    """What the shared engine needs of a norm: its hooks, its weight, and the frozen-scale forms."""

    weight: Optional[nn.Parameter]
    hook_scale: HookPoint
    hook_normalized: HookPoint
    centers: bool

    def normalize_stack(self, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Components of a residual normalised with its (frozen) scale; they sum to ``hook_normalized``."""
        raise NotImplementedError

    def with_scale(self, x: Float[torch.Tensor, "... d"], scale: torch.Tensor) -> Float[torch.Tensor, "... d"]:
        """This norm with its scale fixed to ``scale``: linear in ``x`` (weight and bias applied)."""
        raise NotImplementedError


class LayerNorm(Norm):
    """LayerNorm with ``hook_scale`` [batch, pos, 1] and ``hook_normalized`` (before weight/bias).

    ``weight``/``bias`` are ``None`` after ``fold_ln`` (then it is TransformerLens' ``LNPre``).
    """

    centers = True

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.d, self.eps = d, eps
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(d))
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(d))
        self.hook_scale, self.hook_normalized = norm_hook_points()

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        if not (self.hook_scale.has_hooks or self.hook_normalized.has_hooks):
            return F.layer_norm(x, (self.d,), self.weight, self.bias, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        if self.weight is not None:
            x = x * self.weight
        return x if self.bias is None else x + self.bias

    w = property(lambda self: self.weight, doc="TransformerLens' name of the weight (None after fold_ln)")
    b = property(lambda self: self.bias, doc="TransformerLens' name of the bias (None after fold_ln)")

    def normalize_stack(self, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (stack - stack.mean(-1, keepdim=True)) / scale

    def with_scale(self, x: Float[torch.Tensor, "... d"], scale: torch.Tensor) -> Float[torch.Tensor, "... d"]:
        y = self.normalize_stack(x, scale)
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias


class RMSNorm(Norm):
    """RMSNorm (no centring) with the same hooks as `LayerNorm`. Computed in float32, as Hugging Face does."""

    centers = False

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.d, self.eps = d, eps
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(d))
        self.hook_scale, self.hook_normalized = norm_hook_points()

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        dtype = x.dtype
        if not (self.hook_scale.has_hooks or self.hook_normalized.has_hooks):
            y = x.float()
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
            y = y.to(dtype)
            return y if self.weight is None else self.weight * y
        y = x.float()
        scale = self.hook_scale((y.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        y = self.hook_normalized((y / scale).to(dtype))
        return y if self.weight is None else self.weight * y

    w = property(lambda self: self.weight, doc="TransformerLens' name of the weight (None after fold_ln)")

    def normalize_stack(self, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return stack / scale

    def with_scale(self, x: Float[torch.Tensor, "... d"], scale: torch.Tensor) -> Float[torch.Tensor, "... d"]:
        y = self.normalize_stack(x, scale)
        return y if self.weight is None else y * self.weight


# --------------------------------------------------------------------------------------------
# Per-forward context and KV cache
# --------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Keys and values of past positions, per layer, in [batch, kv_head, pos, d_head] (post-rotary)."""

    keys: list[Optional[torch.Tensor]] = field(default_factory=list)
    values: list[Optional[torch.Tensor]] = field(default_factory=list)
    attention_mask: Optional[torch.Tensor] = None  # [batch, past_len] (1 = real token)

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        k = self.keys[0] if self.keys else None
        return 0 if k is None else k.shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)  # type: ignore[list-item]
            v = torch.cat([self.values[layer], v], dim=-2)  # type: ignore[list-item]
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass
class ForwardContext:
    """What every layer needs to know about the current forward pass."""

    positions: torch.Tensor  # [batch, pos] absolute positions of the current tokens
    key_mask: Optional[torch.Tensor]  # [batch, past+pos] bool, True = real token; None = no padding
    kv_cache: Optional[KVCache] = None
    memo: dict[Any, Any] = field(default_factory=dict)  # per-forward values shared by layers (rotary)

    def allowed(self, q_len: int, k_len: int, device: torch.device, explicit: bool) -> Optional[torch.Tensor]:
        """Boolean [batch|1, 1, q, k] mask of the keys each query may attend to.

        ``None`` (only when ``explicit`` is False) means plain causal attention with q_len == k_len
        or a single query attending to everything: the fused kernel handles those itself.
        """
        key = ("allowed", q_len, k_len, explicit)
        if key in self.memo:
            return self.memo[key]
        if self.key_mask is None and not explicit and (q_len == k_len or q_len == 1):
            self.memo[key] = None
            return None
        q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        allowed = (torch.arange(k_len, device=device)[None, :] <= q_idx)[None, None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :]
            # a padding query would attend to nothing (NaN): let it see itself; real rows unchanged
            own = torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
            own[torch.arange(q_len), torch.arange(k_len - q_len, k_len)] = True
            allowed = allowed | (own[None, None] & ~allowed.any(-1, keepdim=True))
        self.memo[key] = allowed
        return allowed


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def _finite(ctx: ForwardContext, *xs: torch.Tensor) -> bool:
    """False when a hook may have put a non-finite value into ``xs`` and did.

    PyTorch's fused kernel returns 0 for a query row of NaN and lets a NaN value reach queries
    masked from it; the step-by-step path gives IEEE results restricted to what each query may
    attend to, so non-finite inputs go there. Without any hook attached the check is skipped:
    loaders reject non-finite weights, so only a hook can put a NaN into an attention input.
    """
    if not hooks_active():
        return True
    return all(bool(torch.isfinite(x).all()) for x in xs)


class Attention(nn.Module):
    """Hooks, masking, GQA and per-head views shared by all architectures.

    Subclasses implement ``project(x)`` -> q [b,p,h,d], k/v [b,p,h_kv,d]; ``project_out(z)``; the
    weight views ``W_Q, W_K, W_V, W_O`` and biases ``b_Q, b_K, b_V, b_O`` (zeros where absent); and
    optionally ``position(q, k, ctx)`` (rotary).
    """

    W_Q: torch.Tensor  # [head, d_model, d_head]
    W_K: torch.Tensor  # [kv_head, d_model, d_head]
    W_V: torch.Tensor  # [kv_head, d_model, d_head]
    W_O: torch.Tensor  # [head, d_head, d_model]
    b_Q: torch.Tensor
    b_K: torch.Tensor
    b_V: torch.Tensor
    b_O: torch.Tensor

    def __init__(self, n_heads: int, n_kv_heads: int, d_head: int, d_model: int, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head, self.d_model = n_heads, n_kv_heads, d_head, d_model
        self.layer = layer
        self.scale = d_head ** -0.5
        self.use_attn_result = False  # per-head hook_result [b, p, h, d_model]: costs h x attn_out memory
        self.use_split_qkv_input = False  # per-head q/k/v inputs (set through the model)
        self.hook_q = HookPoint(layout("attn", "q", "batch", "pos", "head", "d_head"))
        self.hook_k = HookPoint(layout("attn", "k", "batch", "pos", "kv_head", "d_head"))
        self.hook_v = HookPoint(layout("attn", "v", "batch", "pos", "kv_head", "d_head"))
        self.hook_attn_scores = HookPoint(layout("attn", "attn_scores", "batch", "head", "query_pos", "key_pos"))
        self.hook_pattern = HookPoint(layout("attn", "pattern", "batch", "head", "query_pos", "key_pos"))
        self.hook_z = HookPoint(layout("attn", "z", "batch", "pos", "head", "d_head"))
        self.hook_result = HookPoint(layout("attn", "result", "batch", "pos", "head", "d_model"))

    # -- architecture-specific ----------------------------------------------------------------
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project_out(self, z: Float[torch.Tensor, "batch pos head_d"]) -> torch.Tensor:
        raise NotImplementedError

    def position(self, q: torch.Tensor, k: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    # -- per-head input path --------------------------------------------------------------------
    def project_split(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor):
        """q/k/v from per-head inputs ``[b, p, head, d_model]`` (``use_split_qkv_input``)."""
        q = torch.einsum("bphm,hmd->bphd", xq, self.W_Q) + self.b_Q
        k = torch.einsum("bphm,hmd->bphd", xk, self.W_K) + self.b_K
        v = torch.einsum("bphm,hmd->bphd", xv, self.W_V) + self.b_V
        return q, k, v

    # -- repeated key/value weights for GQA --------------------------------------------------
    @property
    def W_K_per_query_head(self) -> torch.Tensor:
        """``W_K`` repeated so head ``i`` is the key/value head query head ``i`` reads: [n_heads, d_model, d_head]."""
        return self.W_K.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    @property
    def W_V_per_query_head(self) -> torch.Tensor:
        return self.W_V.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    @property
    def OV(self):
        from .factored import FactoredMatrix

        return FactoredMatrix(self.W_V_per_query_head, self.W_O)

    @property
    def QK(self):
        from .factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K_per_query_head.transpose(-1, -2))

    # -- the step-by-step path (hooked scores/pattern, or non-finite inputs) ---------------------
    def _explicit(self, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention computed step by step, ``[b, head, p, d_head]`` from ``[b, head|kv_head, p|k, d_head]``.

        NaN semantics (the same as the fused path's): a key a query may not attend to contributes
        nothing, even when its value is not finite; everything a query does attend to propagates.
        """
        b, _, p, _ = qh.shape
        k_len = kh.shape[-2]
        kv, rep = self.n_kv_heads, self.n_heads // self.n_kv_heads
        # query heads sharing a key/value head are consecutive (head i reads kv head i // rep): fold
        # them into the query axis, [b, h, p, d] -> [b, kv, rep * p, d], instead of copying keys and values
        scores = (qh.reshape(b, kv, rep * p, self.d_head) @ kh.transpose(-1, -2)).view(b, self.n_heads, p, k_len)
        # the scores are a fresh tensor here (before their hook): scale and mask it in place
        scores.mul_(self.scale)
        allowed = ctx.allowed(p, k_len, qh.device, explicit=True)
        assert allowed is not None  # explicit=True always builds the mask
        scores.masked_fill_(~allowed, float("-inf"))
        scores_hooked = self.hook_attn_scores.has_hooks
        scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1)
        if scores_hooked:
            # every row has an allowed key (`ForwardContext.allowed`), so only a hook on the scores can
            # leave a row all -inf (softmax: NaN): such a row attends to nothing (zeros)
            pattern = pattern.masked_fill(scores.isneginf().all(-1, keepdim=True), 0.0)
        pattern = self.hook_pattern(pattern)
        finite_v = torch.isfinite(vh)
        if bool(finite_v.all()):
            z = pattern.reshape(b, kv, rep * p, k_len) @ vh
        else:  # 0 x NaN is NaN: a value may only reach the queries whose weight on it is not 0
            flat = pattern.reshape(b, kv, rep * p, k_len)
            z = flat @ vh.masked_fill(~finite_v, 0.0)
            reaches = (flat != 0).to(vh.dtype) @ (~finite_v).to(vh.dtype) > 0
            z = z.masked_fill(reaches, float("nan"))
        return z.view(b, self.n_heads, p, self.d_head)

    # -- the shared computation ------------------------------------------------------------------
    def forward(self, x, ctx: ForwardContext) -> Float[torch.Tensor, "batch pos d_model"]:
        q, k, v = self.project_split(*x) if isinstance(x, tuple) else self.project(x)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k = self.position(q, k, ctx)
        b, p = q.shape[:2]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ctx.kv_cache is not None:
            kh, vh = ctx.kv_cache.update(self.layer, kh, vh)
        k_len = kh.shape[-2]
        if self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks or not _finite(ctx, qh, kh, vh):
            z = self._explicit(qh, kh, vh, ctx)
        else:
            mask = ctx.allowed(p, k_len, q.device, explicit=False)
            z = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=mask is None and p == k_len and p > 1,
                scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads,
            )
        z = self.hook_z(z.transpose(1, 2))  # [b, p, h, d_head]
        if self.use_attn_result:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(2) + self.b_O
        return self.project_out(z.reshape(b, p, self.n_heads * self.d_head))


# --------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """What the shared engine needs of an MLP: the neuron hooks and the weight views."""

    hook_pre: HookPoint
    hook_post: HookPoint
    W_in: torch.Tensor  # [d_model, d_mlp]
    W_out: torch.Tensor  # [d_mlp, d_model]
    b_in: torch.Tensor
    b_out: torch.Tensor


class Block(nn.Module):
    """Pre-norm residual block: ``resid + attn(ln1(resid))``, then ``+ mlp(ln2(resid))``.

    ``hook_attn_in`` and ``hook_mlp_in`` are opt-in (TransformerLens' ``use_attn_in`` /
    ``use_hook_mlp_in``): empty slots (None, not in the model's hook set) until switched on.
    """

    ln1: Norm
    attn: Attention
    ln2: Norm
    mlp: MLP
    hook_attn_in: Optional[HookPoint]
    hook_mlp_in: Optional[HookPoint]

    def __init__(self, ln1: Norm, attn: Attention, ln2: Norm, mlp: MLP, layer: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        resid = ("batch", "pos", "d_model")
        self.hook_resid_pre = HookPoint(layout("resid", "resid_pre", *resid))
        self.use_attn_in = self.use_hook_mlp_in = False  # plain flags: the default forward reads only these
        self.register_module("hook_attn_in", None)  # slot: see set_attn_in
        self.hook_q_input = HookPoint(layout("attn", "q_input", "batch", "pos", "head", "d_model"))
        self.hook_k_input = HookPoint(layout("attn", "k_input", "batch", "pos", "kv_head", "d_model"))
        self.hook_v_input = HookPoint(layout("attn", "v_input", "batch", "pos", "kv_head", "d_model"))
        self.hook_attn_out = HookPoint(layout("attn", "attn_out", *resid))
        self.hook_resid_mid = HookPoint(layout("resid", "resid_mid", *resid))
        self.register_module("hook_mlp_in", None)  # slot: see set_mlp_in
        self.hook_mlp_out = HookPoint(layout("mlp", "mlp_out", *resid))
        self.hook_resid_post = HookPoint(layout("resid", "resid_post", *resid))
        self.layer = layer
        stamp(self.ln1, component="ln1")
        stamp(self.ln2, component="ln2")
        stamp(self, layer=layer)

    def set_split_qkv_input(self, use: bool) -> None:
        """Per-head q/k/v inputs (see `_split_inputs`); ln1's hooks then gain a ``qkv_head`` axis."""
        if use and self.use_attn_in:
            raise ValueError(ATTN_IN_CONFLICT)
        self.attn.use_split_qkv_input = use
        self._ln1_head_axis("qkv_head" if use else None)

    def attn_in_problem(self, use: bool) -> Optional[str]:
        """Why ``hook_attn_in`` cannot be switched to ``use`` now (None: it can)."""
        if use and self.attn.use_split_qkv_input:
            return ATTN_IN_CONFLICT
        if use and self.attn.n_kv_heads != self.attn.n_heads:
            return (f"use_attn_in needs one key/value head per query head; this model has {self.attn.n_heads} "
                    f"query and {self.attn.n_kv_heads} key/value heads (grouped-query attention). TransformerLens "
                    "refuses it too: use set_use_split_qkv_input(True) (hook_k_input/hook_v_input per key/value head)")
        return busy_reason(self.hook_attn_in) if not use else None

    def set_attn_in(self, use: bool) -> None:
        """``hook_attn_in`` [batch, pos, head, d_model]: a copy of the residual per head, the input
        of that head's q, k and v (each copy normalised by ln1, whose hooks then gain a ``head`` axis).
        Edits change only the attention's input; the residual stream goes on unchanged."""
        problem = self.attn_in_problem(use)
        if problem:
            raise ValueError(problem)
        self._switch("hook_attn_in", layout("attn", "attn_in", "batch", "pos", "head", "d_model") if use else None)
        self._ln1_head_axis("head" if use else None)
        self.use_attn_in = use

    def set_mlp_in(self, use: bool) -> None:
        """``hook_mlp_in`` [batch, pos, d_model]: a copy of ``hook_resid_mid``, the input of ln2 and the
        MLP. Edits change only the MLP's input; the residual stream goes on unchanged."""
        problem = None if use else busy_reason(self.hook_mlp_in)
        if problem:
            raise ValueError(problem)
        self._switch("hook_mlp_in", layout("mlp", "mlp_in", "batch", "pos", "d_model") if use else None)
        self.use_hook_mlp_in = use

    def _switch(self, slot: str, lay: Optional[HookLayout]) -> None:
        if lay is None:
            self.register_module(slot, None)
        elif self._modules[slot] is None:
            self.register_module(slot, HookPoint(lay.stamped(layer=self.layer)))

    def _ln1_head_axis(self, head: Optional[str]) -> None:
        """ln1 normalises per-head copies (``head``: their axis) or the residual itself (None)."""
        heads = (head,) if head else ()
        for hp, last in ((self.ln1.hook_scale, "singleton"), (self.ln1.hook_normalized, "d_model")):
            old = hp.layout
            if old is not None:
                hp.layout = old.stamped(axes=("batch", "pos", *heads, last))

    def forward(self, resid: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        if self.attn.use_split_qkv_input:
            attn_out = self.attn(self._split_inputs(resid), ctx)
        elif self.use_attn_in:
            b, p, m = resid.shape
            per_head = self.hook_attn_in(resid[:, :, None].expand(b, p, self.attn.n_heads, m).clone())  # type: ignore[misc]
            normed = self.ln1(per_head)
            attn_out = self.attn((normed, normed, normed), ctx)
        else:
            attn_out = self.attn(self.ln1(resid), ctx)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(attn_out))
        mlp_in = self.hook_mlp_in(resid.clone()) if self.use_hook_mlp_in else resid  # type: ignore[misc]
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid + mlp_out)

    def _split_inputs(self, resid: torch.Tensor):
        """Per-head copies of the residual (hook_q/k/v_input), normalised by ONE ln1 call.

        In this mode ``ln1.hook_scale`` is [batch, pos, n_heads + 2 * n_kv_heads, 1]: the q, k and
        v inputs concatenated along the head axis.
        """
        h, hk = self.attn.n_heads, self.attn.n_kv_heads
        b, p, m = resid.shape
        xq = self.hook_q_input(resid[:, :, None].expand(b, p, h, m).clone())
        xk = self.hook_k_input(resid[:, :, None].expand(b, p, hk, m).clone())
        xv = self.hook_v_input(resid[:, :, None].expand(b, p, hk, m).clone())
        normed = self.ln1(torch.cat([xq, xk, xv], dim=2))
        return normed[:, :, :h], normed[:, :, h:h + hk], normed[:, :, h + hk:]


class Blocks(nn.ModuleList):
    """The model's blocks, typed: indexing gives a `Block`, slicing a `Blocks`."""

    @overload  # type: ignore[override]
    def __getitem__(self, idx: int) -> Block: ...

    @overload
    def __getitem__(self, idx: slice) -> Blocks: ...

    def __getitem__(self, idx: Union[int, slice]) -> Union[Block, Blocks]:
        return super().__getitem__(idx)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Block]:
        return super().__iter__()  # type: ignore[return-value]
