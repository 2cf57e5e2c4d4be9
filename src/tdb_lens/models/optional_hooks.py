"""`OptionalHooksMixin`: the hook points a model has only when switched on (TransformerLens' ``set_use_*``).

Each costs memory or compute in every forward, so none is in the default hook set:

- ``set_use_attn_result``: ``blocks.L.attn.hook_result``, per-head outputs [batch, pos, head, d_model];
- ``set_use_split_qkv_input``: ``blocks.L.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``, per-head
  q/k/v inputs [batch, pos, head | kv_head, d_model];
- ``set_use_attn_in``: ``blocks.L.hook_attn_in``, one input per head feeding its q, k and v
  [batch, pos, head, d_model];
- ``set_use_hook_mlp_in``: ``blocks.L.hook_mlp_in``, the MLP's input before ln2 [batch, pos, d_model];
- ``set_use_unembed_hooks``: ``unembed.hook_in`` (the final norm's output) and ``unembed.hook_out``
  (the logits).

``hook_attn_in`` / ``hook_mlp_in`` / the unembed hooks exist only while on (switching off removes
them from ``hook_dict``; it refuses while hooks or an SAE are attached to them). Each setter
checks every block before changing any, so a refused call changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import nn

from ..hooks import HookPoint
from ..hooks.layout import layout

ATTN_IN_CONFLICT = ("use_attn_in and use_split_qkv_input are mutually exclusive (as TransformerLens' "
                    "TransformerBridge): switch one off before switching the other on")


def busy_reason(hp: Optional[HookPoint]) -> Optional[str]:
    """Why the optional hook point ``hp`` cannot be removed now (None: it can)."""
    if hp is not None and (hp.has_hooks or hp.splice is not None):
        return (f"{hp.name} has hooks or an SAE attached; remove them (model.reset_hooks(including_permanent="
                "True), model.remove_sae(...)) before switching it off")
    return None


class UnembedHooks(nn.Module):
    """TransformerLens' ``unembed.hook_in`` [batch, pos, d_model] and ``unembed.hook_out`` [batch, pos, d_vocab].

    Registered as the model's child ``unembed`` (so the names are TransformerLens'); ``model.unembed``
    itself stays the family's unembedding method.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_in = HookPoint(layout("unembed", "unembed_in", "batch", "pos", "d_model"))
        self.hook_out = HookPoint(layout("unembed", "unembed_out", "batch", "pos", "d_vocab"))


class OptionalHooksMixin:
    """The ``set_use_*`` switches of a `HookedTransformer` (see the module docstring)."""

    # provided by HookedTransformer / HookedRootModule / the family (declared, not defined, here)
    blocks: Any
    cfg: Any
    _modules: dict[str, Optional[nn.Module]]
    setup: Callable[[], None]
    unembed: Callable[[torch.Tensor], torch.Tensor]

    def _note(self, flag: str, use: bool) -> None:
        """Keep a TransformerLens-style config (one that has ``flag``) in step with the model."""
        if hasattr(self.cfg, flag):
            setattr(self.cfg, flag, use)

    def set_use_attn_result(self, use: bool) -> None:
        """Per-head outputs at ``attn.hook_result`` [batch, pos, head, d_model]: n_heads times the
        memory of ``hook_attn_out`` and an einsum instead of one matmul."""
        for b in self.blocks:
            b.attn.use_attn_result = use
        self._note("use_attn_result", use)

    def set_use_split_qkv_input(self, use: bool) -> None:
        """Per-head copies of the residual at ``hook_q_input``/``hook_k_input``/``hook_v_input``
        [batch, pos, head, d_model]: (n_heads + 2 n_kv_heads) times the residual's memory.
        Refused while ``use_attn_in`` is on (the two are mutually exclusive)."""
        for b in self.blocks:
            if use and b.use_attn_in:
                raise ValueError(ATTN_IN_CONFLICT)
        for b in self.blocks:
            b.set_split_qkv_input(use)
        self._note("use_split_qkv_input", use)
        self.setup()

    def set_use_attn_in(self, use: bool) -> None:
        """TransformerLens' ``use_attn_in``: ``blocks.L.hook_attn_in`` [batch, pos, head, d_model], the
        residual copied once per head; copy ``h`` (through ln1) is head ``h``'s query, key and value
        input. Editing it changes only the attention's input (the residual stream is unchanged).

        Raises (changing nothing) with ``use_split_qkv_input`` on, on a grouped-query model (as
        TransformerLens' ``HookedTransformer``; use ``set_use_split_qkv_input`` there), and when
        switching off while hooks are attached."""
        problems = [p for p in (b.attn_in_problem(use) for b in self.blocks) if p]
        if problems:
            raise ValueError(problems[0])
        for b in self.blocks:
            b.set_attn_in(use)
        self._note("use_attn_in", use)
        self.setup()

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """TransformerLens' ``use_hook_mlp_in``: ``blocks.L.hook_mlp_in`` [batch, pos, d_model], a copy
        of ``hook_resid_mid`` that ln2 and the MLP read. Editing it changes only the MLP's input."""
        problems = [p for p in (None if use else busy_reason(b.hook_mlp_in) for b in self.blocks) if p]
        if problems:
            raise ValueError(problems[0])
        for b in self.blocks:
            b.set_mlp_in(use)
        self._note("use_hook_mlp_in", use)
        self.setup()

    def set_use_unembed_hooks(self, use: bool) -> None:
        """TransformerLens' ``unembed.hook_in`` (the final norm's output, [batch, pos, d_model]) and
        ``unembed.hook_out`` (the logits, [batch, pos, d_vocab]). TransformerLens always has them;
        here they are opt-in because ``run_with_cache`` would otherwise store the logits a second time
        (batch x pos x d_vocab floats). They fire wherever the engine unembeds (``logits_from_resid``)."""
        hooks = self._modules.get("unembed")
        if use and hooks is None:
            self._modules["unembed"] = UnembedHooks()
        elif not use and isinstance(hooks, UnembedHooks):
            problems = [p for p in (busy_reason(hooks.hook_in), busy_reason(hooks.hook_out)) if p]
            if problems:
                raise ValueError(problems[0])
            del self._modules["unembed"]
        self.setup()

    def unembed_hooked(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """The family's ``unembed(x)``, through ``unembed.hook_in`` / ``hook_out`` when they are on."""
        hooks = self._modules.get("unembed")
        if not isinstance(hooks, UnembedHooks):
            return self.unembed(x)
        return hooks.hook_out(self.unembed(hooks.hook_in(x)))
