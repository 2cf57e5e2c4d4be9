"""`HookPoint`: an identity module that names an activation and lets hooks read or edit it.

A hook is ``fn(activation, hook) -> activation | None``; returning ``None`` keeps the activation.
Backward hooks receive the gradient flowing into the activation and may return a replacement.
With no hooks registered a hook point costs one attribute check, so an unhooked model runs at the
speed of the plain computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from ..input_checks import validates_input
from .layout import HookLayout

HookFn = Callable[..., Optional[torch.Tensor]]
Direction = Literal["fwd", "bwd"]

_check_layouts = False
_n_active = 0  # hooks registered on any hook point of any model (see hooks_active)


def hooks_active() -> bool:
    """True while any hook is registered on any hook point (O(1)); code paths that guard against
    what only a hook can do (e.g. a NaN in an attention input) check it first."""
    return _n_active > 0


def set_layout_checks(on: bool) -> bool:
    """Check every activation against its hook point's layout (shape and dtype) as it passes.

    A debugging aid (the test suite runs with it on): a model whose code produces an activation
    that disagrees with the declared axes fails at that hook, named. Returns the previous setting.
    """
    global _check_layouts
    previous, _check_layouts = _check_layouts, bool(on)
    return previous


@dataclass(eq=False)
class LensHandle:
    """One registered hook. ``remove()`` detaches it; removing twice is harmless."""

    fn: HookFn
    hook_point: HookPoint
    direction: Direction
    is_permanent: bool = False
    active: bool = field(default=True)

    def remove(self) -> None:
        global _n_active
        if not self.active:
            return
        self.active = False
        _n_active -= 1
        lst = self.hook_point._fwd if self.direction == "fwd" else self.hook_point._bwd
        try:
            lst.remove(self)
        except ValueError:  # already gone
            pass


class _GradHooks:
    """The tensor hook that runs a hook point's backward hooks (those registered when the
    activation was made and not removed since) on the gradient flowing into it."""

    def __init__(self, hook_point: HookPoint, handles: list[LensHandle]) -> None:
        self.hook_point, self.handles = hook_point, handles

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        for h in self.handles:
            if not h.active:  # removed between forward and backward
                continue
            out = h.fn(grad, hook=self.hook_point)
            if out is not None:
                grad = out
        return grad


class HookPoint(nn.Module):
    """Identity module; its ``name`` is its module path inside the root model.

    ``layout`` (`HookLayout`) says what the activation is: layer, component, site and named axes.
    Model code always passes one; a bare ``HookPoint()`` (user code) has none.
    """

    splice: Optional[nn.Module]  # kept in __dict__ (see set_splice), not a submodule

    def __init__(self, layout: Optional[HookLayout] = None) -> None:
        super().__init__()
        self.name: str | None = None
        self.layout: Optional[HookLayout] = layout
        self._fwd: list[LensHandle] = []
        self._bwd: list[LensHandle] = []
        # scratch space for hooks that want to remember things between calls (TransformerLens' ctx)
        self.ctx: dict[Any, Any] = {}
        # A module spliced in after this point's hooks (an SAE): what it returns flows on. Kept
        # out of the module tree so attaching one never changes the model's state_dict.
        self.__dict__["splice"] = None

    def set_splice(self, module: Optional[nn.Module]) -> None:
        """Route this point's output through ``module`` (``None`` removes it). Call root.setup() after."""
        self.__dict__["splice"] = module

    # -- registration -------------------------------------------------------------------------
    @validates_input
    def add_hook(
        self,
        fn: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> LensHandle:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(fn):
            raise TypeError(f"hook for {self.name!r} must be callable fn(activation, hook), got {type(fn).__name__}")
        global _n_active
        handle = LensHandle(fn, self, dir, is_permanent)
        _n_active += 1
        lst = self._fwd if dir == "fwd" else self._bwd
        if prepend:
            lst.insert(0, handle)
        else:
            lst.append(handle)
        return handle

    def register_forward_hook(self, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> LensHandle:  # type: ignore[override]
        """PyTorch's ``hook(module, args, output)`` form, run as a tdb_lens forward hook.

        (A hook point skips ``nn.Module.__call__`` when nothing is attached, so PyTorch's own hook
        lists would never be read; this routes the hook to where it fires.)
        """
        if args or kwargs:
            raise TypeError("HookPoint.register_forward_hook takes only the hook; use add_hook(fn, ...) for options")

        def adapted(x: torch.Tensor, hook: HookPoint) -> Optional[torch.Tensor]:
            return hook_out if isinstance(hook_out := hook_fn(self, (x,), x), torch.Tensor) else None

        hook_fn = hook
        return self.add_hook(adapted)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a HookPoint is an identity: use add_hook(fn) (fn(activation, hook)) instead")

    def register_full_backward_hook(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("use add_hook(fn, dir='bwd') on a HookPoint (fn(grad, hook))")

    def register_full_backward_pre_hook(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("use add_hook(fn, dir='bwd') on a HookPoint (fn(grad, hook))")

    def remove_hooks(self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False) -> None:
        lists = {"fwd": [self._fwd], "bwd": [self._bwd], "both": [self._fwd, self._bwd]}[dir]
        for lst in lists:
            for h in list(lst):
                if including_permanent or not h.is_permanent:
                    h.remove()

    def clear_context(self) -> None:
        self.ctx.clear()

    @property
    def has_hooks(self) -> bool:
        """True when running this point does anything (hooks, or a spliced module): fast paths skip it otherwise."""
        return bool(self._fwd or self._bwd or self.__dict__["splice"] is not None)

    @property
    def n_hooks(self) -> int:
        return len(self._fwd) + len(self._bwd)

    # -- running ------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # fast path: skip nn.Module.__call__ machinery entirely when nothing is attached
        if _check_layouts and self.layout is not None:
            self.layout.check(x, self.name)
        if not self._fwd and not self._bwd:
            splice = self.__dict__["splice"]
            return x if splice is None else splice(x)
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for h in list(self._fwd):
            out = h.fn(x, hook=self)
            if out is not None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"forward hook on {self.name!r} returned {type(out).__name__}; "
                        "return a tensor or None"
                    )
                if out.shape != x.shape:
                    raise ValueError(
                        f"forward hook on {self.name!r} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(x.shape)}"
                    )
                if out.dtype != x.dtype:
                    raise TypeError(
                        f"forward hook on {self.name!r} returned a {out.dtype} tensor, expected {x.dtype} "
                        f"(cast with .to({x.dtype}))"
                    )
                x = out
        if self._bwd and x.requires_grad:
            x = x.view_as(x)  # a fresh node, so the gradient hook sees only this use
            x.register_hook(_GradHooks(self, list(self._bwd)))
        splice = self.__dict__["splice"]
        return x if splice is None else splice(x)

    def extra_repr(self) -> str:
        lay = "" if self.layout is None else f", layout={self.layout}"
        return f"name={self.name!r}{lay}, fwd={len(self._fwd)}, bwd={len(self._bwd)}"

    def layer(self) -> Optional[int]:
        """The block this hook point belongs to (TransformerLens's ``hook.layer()``); None outside blocks."""
        return None if self.layout is None else self.layout.layer
