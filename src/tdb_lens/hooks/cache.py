"""`ActivationCache`: recorded activations plus the residual-stream decompositions built on them.

Keys are full hook names (``blocks.3.attn.hook_pattern``); ``cache["pattern", 3]`` and
``cache["scale", 2, "ln1"]`` expand through `get_act_name`. Head and neuron contributions are
computed from ``hook_z`` / ``hook_post`` and the model's weights, so nothing per-head has to be
cached. All stacks have the component axis first: ``[component, batch, pos, d_model]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Float, Int

from .names import get_act_name, unknown_name_error

if TYPE_CHECKING:  # pragma: no cover
    from .root import HookedRootModule

PosSlice = Union[int, slice, Sequence[int], torch.Tensor, None]


def _slice_pos(t: torch.Tensor, pos_slice: PosSlice, dim: int) -> torch.Tensor:
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        return t.narrow(dim, pos_slice % t.shape[dim], 1)
    if isinstance(pos_slice, slice):
        idx = [slice(None)] * t.ndim
        idx[dim] = pos_slice
        return t[tuple(idx)]
    return t.index_select(dim, torch.as_tensor(pos_slice, device=t.device))


class ActivationCache:
    def __init__(self, cache_dict: dict[str, torch.Tensor], model: HookedRootModule, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # -- dict-like ----------------------------------------------------------------------------
    def _key(self, key: Union[str, tuple]) -> str:
        if isinstance(key, tuple):
            return get_act_name(*key)
        if key in self.cache_dict:
            return key
        return get_act_name(key) if "." not in key and not key.startswith("blocks") else key

    def __getitem__(self, key: Union[str, tuple]) -> torch.Tensor:
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
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self.cache_dict)[:4]}{'...' if len(self) > 4 else ''})"

    def to(self, device: Union[str, torch.device, None] = None, dtype: torch.dtype | None = None) -> ActivationCache:
        """A cache with every tensor moved (floating tensors also cast when ``dtype`` is given)."""
        out = {}
        for k, v in self.cache_dict.items():
            out[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return ActivationCache(out, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> ActivationCache:
        if not self.has_batch_dim:
            return self
        for k, v in self.cache_dict.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1; {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, has_batch_dim=False)

    # -- residual stream ----------------------------------------------------------------------
    @property
    def _n_layers(self) -> int:
        return self.model.cfg.n_layers  # type: ignore[attr-defined]

    def _norm_for(self, layer: int | None, mlp_input: bool):
        m = self.model
        if layer is None or layer >= self._n_layers:
            return m.ln_final, "ln_final.hook_scale"  # type: ignore[attr-defined]
        ln = "ln2" if mlp_input else "ln1"
        return getattr(m.blocks[layer], ln), f"blocks.{layer}.{ln}.hook_scale"  # type: ignore[attr-defined]

    def apply_ln_to_stack(
        self,
        residual_stack: Float[torch.Tensor, "... batch pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        batch_slice: Union[int, slice, None] = None,
        has_batch_dim: bool = True,
    ) -> Float[torch.Tensor, "... batch pos d_model"]:
        """Normalise each component as the given norm normalised their sum (its scale frozen).

        Centring (LayerNorm) is linear, so the normalised components sum to the normalised
        residual, before the norm's weight and bias. Needs the norm's ``hook_scale`` cached.
        """
        norm, scale_name = self._norm_for(layer, mlp_input)
        scale = self[scale_name]
        if self.has_batch_dim and batch_slice is not None:
            scale = scale[batch_slice] if isinstance(batch_slice, slice) else scale[batch_slice: batch_slice + 1]
        scale = _slice_pos(scale, pos_slice, -2)
        if not has_batch_dim:
            scale = scale[0] if scale.ndim == residual_stack.ndim else scale
        return norm.normalize_stack(residual_stack, scale)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ):
        """The residual stream before each layer (and the final one): ``[layers+1, batch, pos, d]``.

        This is the logit lens: ``apply_ln=True`` then ``@ W_U`` gives each layer's prediction.
        """
        n = self._n_layers
        layer = n if layer is None else (layer % (n + 1) if layer < 0 else layer)
        parts, labels = [], []
        for l in range(layer + 1):
            if l == n:
                parts.append(self[f"blocks.{n - 1}.hook_resid_post"])
                labels.append("final_post")
                break
            if l < layer or (l == layer and not mlp_input):
                parts.append(self[f"blocks.{l}.hook_resid_pre"])
                labels.append(f"{l}_pre")
            if incl_mid and l < layer or (l == layer and mlp_input):
                parts.append(self[f"blocks.{l}.hook_resid_mid"])
                labels.append(f"{l}_mid")
            if l == layer:
                break
        stack = _slice_pos(torch.stack(parts), pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, None if layer == n else layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream at ``layer`` split into embeddings and each attention / MLP output.

        ``mode`` is "all", "attn" or "mlp". With every component the stack sums to the residual.
        """
        n = self._n_layers
        layer = n if layer is None else layer
        parts, labels = [], []
        if incl_embeds:
            for name in ("hook_embed", "hook_pos_embed"):
                if name in self.cache_dict:
                    parts.append(self[name])
                    labels.append(name[len("hook_"):])
        for l in range(layer + (1 if mlp_input and layer < n else 0)):
            if mode in ("all", "attn"):
                parts.append(self[f"blocks.{l}.hook_attn_out"])
                labels.append(f"{l}_attn_out")
            if mode in ("all", "mlp") and not (mlp_input and l == layer):
                parts.append(self[f"blocks.{l}.hook_mlp_out"])
                labels.append(f"{l}_mlp_out")
        stack = _slice_pos(torch.stack(parts), pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, None if layer == n else layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def _layers(self, layer: int | None) -> range:
        n = self._n_layers
        return range(n if layer is None or layer == -1 else layer)

    def stack_head_results(
        self,
        layer: int | None = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: PosSlice = None,
        apply_ln: bool = False,
    ):
        """Each head's write to the residual, from ``hook_z`` and ``W_O``: ``[layer*head, batch, pos, d]``.

        Layers ``0 .. layer-1`` (all when None). Biases ``b_O`` are not included; with
        ``incl_remainder`` the last component is everything else in the residual at ``layer``.
        """
        parts, labels = [], []
        for l in self._layers(layer):
            z = _slice_pos(self[f"blocks.{l}.attn.hook_z"], pos_slice, -3)  # [b, p, h, d_head]
            W_O = self.model.blocks[l].attn.W_O  # type: ignore[attr-defined]  [h, d_head, d_model]
            res = torch.einsum("...phd,hdm->h...pm", z, W_O.to(z.dtype))
            parts.append(res)
            labels += [f"L{l}H{h}" for h in range(res.shape[0])]
        stack = torch.cat(parts)
        if incl_remainder:
            resid = self.accumulated_resid(layer=None if layer in (None, -1) else layer, pos_slice=pos_slice)[-1]
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, None if layer in (None, -1) else layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_neuron_results(
        self,
        layer: int | None = None,
        neuron_slice: Union[slice, Sequence[int], None] = None,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
        apply_ln: bool = False,
    ):
        """Each MLP neuron's write to the residual, ``post[n] * W_out[n]``: ``[layer*neuron, batch, pos, d]``.

        Memory grows with d_mlp x d_model per position: pass ``neuron_slice`` on big models.
        """
        parts, labels = [], []
        for l in self._layers(layer):
            post = _slice_pos(self[f"blocks.{l}.mlp.hook_post"], pos_slice, -2)
            W_out = self.model.blocks[l].mlp.W_out  # type: ignore[attr-defined]  [d_mlp, d_model]
            idx = torch.arange(W_out.shape[0])
            if neuron_slice is not None:
                idx = idx[neuron_slice] if isinstance(neuron_slice, slice) else torch.as_tensor(neuron_slice)
            res = torch.einsum("...pn,nm->n...pm", post[..., idx], W_out[idx].to(post.dtype))
            parts.append(res)
            labels += [f"L{l}N{int(n)}" for n in idx]
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, None if layer in (None, -1) else layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def logit_attrs(
        self,
        residual_stack: Float[torch.Tensor, "... d_model"],
        tokens: Union[int, str, Int[torch.Tensor, ...]],
        incorrect_tokens: Union[int, str, Int[torch.Tensor, ...], None] = None,
        pos_slice: PosSlice = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``).

        Components are normalised with the final norm's cached scale, then dotted with the
        token's residual direction (final norm weight times the unembedding column), so
        summed over all components plus the constant norm-bias term they give the logit exactly.
        """
        m = self.model
        stack = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, has_batch_dim=has_batch_dim)
        dirs = m.tokens_to_residual_directions(tokens)  # type: ignore[attr-defined]
        if incorrect_tokens is not None:
            dirs = dirs - m.tokens_to_residual_directions(incorrect_tokens)  # type: ignore[attr-defined]
        if dirs.ndim == 1:
            return stack @ dirs.to(stack.dtype)
        # per-prompt directions [batch, d_model]; the stack is [..., batch, pos, d_model]
        return (stack * dirs[:, None, :].to(stack.dtype)).sum(-1)
