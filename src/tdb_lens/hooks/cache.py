"""`ActivationCache`: recorded activations plus the residual-stream decompositions built on them.

Keys are full hook names (``blocks.3.attn.hook_pattern``); ``cache["pattern", 3]``,
``cache["resid_post", -1]`` and ``cache["scale", 2, "ln1"]`` expand through `get_act_name` (negative
layers count from the end, as in TransformerLens). Head and neuron contributions are computed from
``hook_z`` / ``hook_post`` and the model's weights, so nothing per-head has to be cached.

Shapes follow TransformerLens' ``ActivationCache`` exactly: stacks have the component axis first,
``[component, batch, pos, d_model]``; an integer ``pos_slice`` *removes* the position axis
(``[component, batch, d_model]``), a slice or a list keeps it. Layers given as ``None`` or ``-1``
mean "the input of the unembedding" (all layers). The model is reached only through the public
`HookedModel` protocol below.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch
from jaxtyping import Float, Int

from .names import get_act_name, unknown_name_error

PosSlice = Union[int, slice, tuple, Sequence[int], torch.Tensor, None]
TokenArg = Union[int, str, Int[torch.Tensor, "..."]]


@runtime_checkable
class NormLike(Protocol):
    """A norm that can normalise a stack of residual components with a given (cached) scale."""

    def normalize_stack(self, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Components normalised with ``scale`` (centred first for a LayerNorm), no weight/bias."""
        ...


@runtime_checkable
class _Attn(Protocol):
    W_O: torch.Tensor


@runtime_checkable
class _MLP(Protocol):
    W_out: torch.Tensor


@runtime_checkable
class BlockLike(Protocol):
    """A block: its two norms, ``attn.W_O`` and ``mlp.W_out``."""

    ln1: NormLike
    ln2: NormLike
    attn: _Attn
    mlp: _MLP


@runtime_checkable
class HookedModel(Protocol):
    """What the cache asks of a model: its config, per-layer weights and norms, hook names, the
    final norm and the unembedding directions. Both families (and any `HookedTransformer`) fit."""

    cfg: Any
    blocks: Any  # Sequence[BlockLike]
    ln_final: NormLike

    def hook_name(self, site: str, layer: Optional[int] = None, component: Optional[str] = None,
                  host: Optional[str] = None) -> str:
        """The hook name of a site (``hook_name("z", 3)``)."""
        ...

    def final_norm(self, resid: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final norm (with ``scale`` fixed when given)."""
        ...

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """Unembedding directions of tokens, ``[..., d_model]``."""
        ...

    def to_single_token(self, token: Union[str, int]) -> int:
        """The id of a one-token string."""
        ...


def _as_index(s: Any) -> Any:
    """TransformerLens' ``Slice`` input: None, an int, a slice, a (start, stop[, step]) tuple, a
    list / tensor of indices, or a ``transformer_lens.utils.Slice`` (its ``.slice``)."""
    s = getattr(s, "slice", s)
    if isinstance(s, tuple):
        return slice(*s)
    return s


def apply_slice(t: torch.Tensor, s: Any, dim: int) -> torch.Tensor:
    """Index ``t`` along ``dim`` as TransformerLens' ``Slice.apply``: an int removes the axis."""
    s = _as_index(s)
    if s is None:
        return t
    if isinstance(s, bool):
        raise TypeError("a position/batch slice cannot be a bool")
    if isinstance(s, int):
        return t.select(dim, s)
    if isinstance(s, slice):
        idx: list[Any] = [slice(None)] * t.ndim
        idx[dim] = s
        return t[tuple(idx)]
    index = torch.as_tensor(s, device=t.device)
    if index.ndim == 0:
        return t.select(dim, int(index))
    return t.index_select(dim % t.ndim, index.long())


class ActivationCache:
    """Activations by hook name, with TransformerLens' residual-stream decompositions."""

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model: HookedModel = model
        self.has_batch_dim = has_batch_dim

    # -- dict-like ----------------------------------------------------------------------------
    def _key(self, key: Union[str, tuple]) -> str:
        if isinstance(key, tuple):
            if len(key) > 1 and key[1] is not None and key[1] < 0:
                key = (key[0], self._n_layers + key[1], *key[2:])
            return get_act_name(*key)
        if key in self.cache_dict:
            return key
        return get_act_name(key)

    def __getitem__(self, key: Union[str, tuple]) -> torch.Tensor:
        """``cache["blocks.3.attn.hook_z"]``, ``cache["z", 3]``, ``cache["resid_post", -1]``, ``cache["k1a"]``."""
        name = self._key(key)
        if name not in self.cache_dict:
            raise unknown_name_error(name, self.cache_dict, what="cached activation")
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        try:
            return self._key(key) in self.cache_dict  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        """The cached hook names."""
        return self.cache_dict.keys()

    def values(self):
        """The cached activations."""
        return self.cache_dict.values()

    def items(self):
        """``(hook name, activation)`` pairs."""
        return self.cache_dict.items()

    def __repr__(self) -> str:
        names = list(self.cache_dict)
        more = f", ... ({len(names)} in all)" if len(names) > 4 else ""
        return f"ActivationCache({', '.join(names[:4])}{more})"

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> ActivationCache:
        """A cache with every tensor moved (floating tensors also cast when ``dtype`` is given)."""
        out = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.cache_dict.items()}
        return ActivationCache(out, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        """The cache of a batch of one without its batch axis."""
        if not self.has_batch_dim:
            return self
        for k, v in self.cache_dict.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1; {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, has_batch_dim=False)

    def apply_slice_to_batch_dim(self, batch_slice: PosSlice) -> ActivationCache:
        """A cache of some prompts only (an int keeps the batch axis out, as TransformerLens)."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch axis")
        out = {k: apply_slice(v, batch_slice, 0) for k, v in self.cache_dict.items()}
        keeps = not isinstance(_as_index(batch_slice), int)
        return ActivationCache(out, self.model, has_batch_dim=keeps)

    def stack_activation(self, activation_name: str, layer: Optional[int] = -1,
                         sublayer_type: Optional[str] = None) -> torch.Tensor:
        """``activation_name`` of layers ``0 .. layer-1`` stacked on a new first axis."""
        n = self._final_layer(layer)
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(n)])

    # -- helpers ------------------------------------------------------------------------------
    @property
    def _n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def _final_layer(self, layer: Optional[int]) -> int:
        """A layer in ``[0, n_layers]``: None and -1 are ``n_layers`` (the unembedding's input)."""
        n = self._n_layers
        if layer is None:
            return n
        if layer < 0:
            layer += n + 1
        if not 0 <= layer <= n:
            raise ValueError(f"layer must lie in [-{n + 1}, {n}] (None or -1: all {n} layers), got {layer}")
        return layer

    def _name(self, site: str, layer: Optional[int] = None, component: Optional[str] = None) -> str:
        return self.model.hook_name(site, layer, component)

    def _has_site(self, site: str) -> bool:
        try:
            return self._name(site) in self.cache_dict
        except KeyError:
            return False

    def _norm_and_scale(self, layer: int, mlp_input: bool) -> tuple[NormLike, str]:
        if layer == self._n_layers:
            return self.model.ln_final, self._name("scale", None, "ln_final")
        comp = "ln2" if mlp_input else "ln1"
        block = self.model.blocks[layer]
        return (block.ln2 if mlp_input else block.ln1), self._name("scale", layer, comp)

    def _empty(self, pos_slice: PosSlice) -> torch.Tensor:
        ref = apply_slice(self[self._name("embed")], pos_slice, -2)
        return ref.new_zeros((0, *ref.shape))

    # -- normalisation ------------------------------------------------------------------------
    def apply_ln_to_stack(
        self,
        residual_stack: Float[torch.Tensor, "*components d_model"],
        layer: Optional[int] = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[torch.Tensor, "*components d_model"]:
        """Each component normalised as the norm at ``layer``'s input normalised their sum.

        ``layer`` in ``[0, n_layers]`` (None / -1: the final norm); ``mlp_input`` picks ``ln2``.
        The cached ``hook_scale`` is used (frozen), with the norm's centring, without its weight
        and bias, exactly as TransformerLens. ``pos_slice``: the slice already applied to the
        stack (it is applied to the scale here). ``recompute_ln`` at the final layer instead runs
        the full final norm on each component by itself (TransformerLens 3's logit lens).
        A stack whose shape does not line up with the cached scale is an error, not a broadcast.
        """
        layer = self._final_layer(layer)
        if has_batch_dim and self.has_batch_dim:
            residual_stack = apply_slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == self._n_layers:
            d = residual_stack.shape[-1]
            return torch.stack([self.model.final_norm(c.reshape(-1, 1, d)).reshape(c.shape) for c in residual_stack])
        norm, scale_name = self._norm_and_scale(layer, mlp_input)
        if scale_name not in self.cache_dict:
            raise KeyError(f"apply_ln needs {scale_name!r} in the cache (run_with_cache without a names_filter "
                           "that leaves it out)")
        scale = apply_slice(self.cache_dict[scale_name], pos_slice, -2)
        if self.has_batch_dim:
            scale = apply_slice(scale, batch_slice, 0)
        try:
            fits = torch.broadcast_shapes(residual_stack.shape, scale.shape) == residual_stack.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"the stack {tuple(residual_stack.shape)} does not line up with the cached scale {tuple(scale.shape)} "
                f"of {scale_name!r} (pos_slice={pos_slice!r}): the axes before d_model must be the scale's "
                "[batch, pos] after pos_slice (an integer pos_slice removes the position axis)")
        return norm.normalize_stack(residual_stack, scale)

    # -- residual stream ----------------------------------------------------------------------
    def accumulated_resid(
        self,
        layer: Optional[int] = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ):
        """The residual stream entering each layer up to ``layer`` (None / -1: also the final one):
        ``[layers_covered, batch, pos, d_model]``; labels ``"0_pre"``, ``"0_mid"``, ``"final_post"``.

        The logit lens is ``accumulated_resid(apply_ln=True) @ model.W_U``: at the final layer
        each residual goes through the full final norm on its own (TransformerLens 3); at an
        earlier layer the cached scale of that layer's norm is used.
        """
        n = self._n_layers
        layer = self._final_layer(layer)
        parts, labels = [], []
        for l in range(layer + 1):
            if l == n:
                parts.append(self[self._name("resid_post", n - 1)])
                labels.append("final_post")
                continue
            parts.append(self[self._name("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self[self._name("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([apply_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream entering ``layer`` (None / -1: the unembedding) split into the
        embeddings and each attention / MLP output before it: ``[component, batch, pos, d_model]``.

        ``mode`` is "all", "attn" or "mlp"; ``mlp_input`` adds ``layer``'s attention output. With
        every component the stack sums to the residual.
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._final_layer(layer)
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not getattr(self.model.cfg, "attn_only", False)
        parts, labels = [], []
        if incl_embeds:
            for site in ("embed", "pos_embed"):
                if self._has_site(site):
                    parts.append(self[self._name(site)])
                    labels.append(site)
        for l in range(layer):
            if incl_attn:
                parts.append(self[self._name("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                parts.append(self[self._name("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn:
            parts.append(self[self._name("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        if not parts:
            raise ValueError(f"decompose_resid(layer={layer}, mode={mode!r}, incl_embeds={incl_embeds}) has no components")
        stack = torch.stack([apply_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
    ):
        """Every head, every neuron (or MLP output), the embeddings and the bias remainder:
        components that sum exactly to the residual entering ``layer``."""
        layer = self._final_layer(layer)
        heads, labels = self.stack_head_results(layer, return_labels=True, pos_slice=pos_slice)
        parts = [heads]
        if expand_neurons:
            neurons, nl = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            parts.append(neurons)
            labels = labels + nl
        else:
            mlp, ml = self.decompose_resid(layer, mode="mlp", incl_embeds=False, pos_slice=pos_slice, return_labels=True)
            parts.append(mlp)
            labels = labels + ml
        emb, el = self.decompose_resid(layer=0, pos_slice=pos_slice, return_labels=True)
        parts.append(emb)
        labels = labels + el
        stack = torch.cat(parts)
        if mlp_input:
            raise NotImplementedError("get_full_resid_decomposition(mlp_input=True) is not supported")
        total = apply_slice(self.accumulated_resid(layer)[-1], pos_slice, -2)
        stack = torch.cat([stack, (total - stack.sum(0))[None]])
        labels.append("bias")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # -- heads and neurons --------------------------------------------------------------------
    def stack_head_results(
        self,
        layer: Optional[int] = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ):
        """Each head's write to the residual (``hook_z @ W_O``, no ``b_O``) for layers
        ``0 .. layer-1`` (None / -1: all): ``[layer*head, batch, pos, d_model]``, labels ``"L0H3"``.

        ``incl_remainder`` appends the rest of the residual entering ``layer``.
        """
        layer = self._final_layer(layer)
        parts, labels = [], []
        for l in range(layer):
            z = apply_slice(self[self._name("z", l)], pos_slice, -3)  # [..., head, d_head]
            W_O = self.model.blocks[l].attn.W_O  # [head, d_head, d_model]
            res = torch.einsum("...hd,hdm->h...m", z, W_O.to(z.dtype))
            parts.append(res)
            labels += [f"L{l}H{h}" for h in range(res.shape[0])]
        stack = torch.cat(parts) if parts else self._empty(pos_slice)
        if incl_remainder:
            resid = apply_slice(self[self._name("resid_post", layer - 1)], pos_slice, -2) if layer else None
            if resid is None:
                resid = apply_slice(self[self._name("resid_pre", 0)], pos_slice, -2)
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(self, layer: int, neuron_slice: PosSlice = None,
                           pos_slice: PosSlice = None) -> Float[torch.Tensor, "*batch_pos neuron d_model"]:
        """Each neuron's write to the residual at ``layer``: ``[..., neuron, d_model]``."""
        layer = layer + self._n_layers if layer < 0 else layer
        post = apply_slice(self[self._name("post", layer)], pos_slice, -2)
        W_out = self.model.blocks[layer].mlp.W_out  # [d_mlp, d_model]
        post = apply_slice(post, neuron_slice, -1)
        W_out = apply_slice(W_out, neuron_slice, 0)
        return post[..., None] * W_out.to(post.dtype)

    def stack_neuron_results(
        self,
        layer: Optional[int] = -1,
        pos_slice: PosSlice = None,
        neuron_slice: PosSlice = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
    ):
        """Each MLP neuron's write to the residual, ``post[n] * W_out[n]``, for layers ``0 .. layer-1``:
        ``[layer*neuron, batch, pos, d_model]``, labels ``"L0N5"``.

        Memory grows with d_mlp x d_model per position: pass ``neuron_slice`` on big models.
        """
        layer = self._final_layer(layer)
        d_mlp = int(self.model.cfg.d_mlp)
        idx = apply_slice(torch.arange(d_mlp), neuron_slice, 0).reshape(-1)
        labels = [f"L{l}N{int(h)}" for l in range(layer) for h in idx]
        parts = []
        for l in range(layer):
            post = apply_slice(self[self._name("post", l)], pos_slice, -2)
            W_out = self.model.blocks[l].mlp.W_out
            parts.append(torch.einsum("...n,nm->n...m", post[..., idx], W_out[idx].to(post.dtype)))
        stack = torch.cat(parts) if parts else self._empty(pos_slice)
        if incl_remainder:
            resid = apply_slice(self[self._name("resid_post", layer - 1)], pos_slice, -2)
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # -- logits -------------------------------------------------------------------------------
    def logit_attrs(
        self,
        residual_stack: Float[torch.Tensor, "*components d_model"],
        tokens: TokenArg,
        incorrect_tokens: Optional[TokenArg] = None,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        has_batch_dim: bool = True,
    ) -> Float[torch.Tensor, "*components"]:
        """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``).

        Components are normalised with the final norm's cached scale (`apply_ln_to_stack`), then
        dotted with ``model.tokens_to_residual_directions(tokens)``. Unlike TransformerLens on a
        model without ``fold_ln``, those directions include the final norm's weight, so the
        attributions plus the constant ``ln_final.b @ W_U`` term sum to the logit exactly (on a
        ``fold_ln`` model, the usual case, the two agree). Per-prompt tokens ``[batch]`` against a
        stack that still has its position axis are applied at every position.
        """
        def ids(t: TokenArg) -> torch.Tensor:
            return torch.as_tensor(self.model.to_single_token(t) if isinstance(t, str) else t)

        dirs = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if ids(tokens).shape != ids(incorrect_tokens).shape:
                raise ValueError(f"tokens {tuple(ids(tokens).shape)} and incorrect_tokens "
                                 f"{tuple(ids(incorrect_tokens).shape)} must have the same shape")
            dirs = dirs - self.model.tokens_to_residual_directions(incorrect_tokens)
        stack = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                       has_batch_dim=has_batch_dim)
        if dirs.ndim == 2 and has_batch_dim and stack.ndim == 4 and stack.shape[1] == dirs.shape[0]:
            dirs = dirs[:, None]  # [batch, d] against [comp, batch, pos, d]
        return (stack * dirs.to(stack.dtype)).sum(-1)
