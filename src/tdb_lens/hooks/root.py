"""`HookedRootModule`: the two primitives every analysis in tdb_lens is built on.

``run_with_hooks`` runs the model with temporary hooks; ``run_with_cache`` records activations.
Both go through the ``hooks()`` context manager, which validates every name before it adds
anything and removes exactly the hooks it added, even when a hook or the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import nn

from ..input_checks import validates_input
from .cache import ActivationCache
from .hook_point import Direction, HookFn, HookPoint, LensHandle
from .layout import HookLayout
from .names import unknown_name_error

NameFilter = Union[str, Sequence[str], Callable[[str], bool], None]
HookSpec = Sequence[tuple[Union[str, Callable[[str], bool]], HookFn]]


class _Recorder:
    """The caching hook: stores ``activation.detach()`` (moved / cast as asked) under
    ``hook.name + suffix``. One object serves every hook point of a run."""

    def __init__(self, cache: dict[str, torch.Tensor], suffix: str, device: Union[str, torch.device, None],
                 dtype: torch.dtype | None, remove_batch_dim: bool) -> None:
        self.cache, self.suffix, self.device, self.dtype = cache, suffix, device, dtype
        self.remove_batch_dim = remove_batch_dim

    def __call__(self, act: torch.Tensor, hook: HookPoint) -> None:
        t = act.detach()
        if self.device is not None or self.dtype is not None:
            t = t.to(device=self.device, dtype=self.dtype)
        self.cache[f"{hook.name}{self.suffix}"] = t[0] if self.remove_batch_dim else t


class HookedRootModule(nn.Module):
    """Root of a model made of `HookPoint`s. Call ``setup()`` after building (or changing) it."""

    hook_dict: dict[str, HookPoint]

    def axis_sizes(self) -> dict[str, int]:
        """Sizes of the model's named axes (``d_model``, ``head`` ...), filled into every hook layout."""
        return {}

    def setup(self) -> None:
        """(Re)name every hook point by its module path, give each layout its sizes, rebuild
        ``hook_dict`` and the layout index."""
        self.hook_dict = {}
        self._layout_index: dict[tuple, str] = {}
        sizes = self.axis_sizes()
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                # a hook point that was placed on a host (see below) and is now a root's own again
                module.layout = module.__dict__.pop("_unplaced_layout", module.layout)
                if module.layout is not None:
                    module.layout = module.layout.with_sizes(sizes)
                self._register(name, module)
                self._add_spliced_hook_points(name, module)

    def _register(self, name: str, hp: HookPoint) -> None:
        self.hook_dict[name] = hp
        lay = hp.layout
        if lay is not None:
            # looked up by hook_name: every combination of given/omitted component and (for spliced
            # points, whose host fixes the layer) layer, so a lookup is one dict access
            for comp in (lay.component, None):
                for layer in ((lay.layer, None) if lay.host is not None else (lay.layer,)):
                    self._layout_index.setdefault((comp, lay.site, layer, lay.host), name)

    def _add_spliced_hook_points(self, name: str, hp: HookPoint) -> None:
        """Hook points of a module spliced into ``hp`` (an SAE) are named ``{hp.name}.{local}``;
        their layouts are placed on the host's (its layer, its leading axes, or those the module's
        ``splice_axes(host_layout)`` says it keeps)."""
        splice = hp.splice
        if splice is None:
            return
        leading = None
        place = getattr(splice, "splice_axes", None)
        if hp.layout is not None and callable(place):
            leading = place(hp.layout)
        for local, module in splice.named_modules():
            if isinstance(module, HookPoint) and local:
                full = f"{name}.{local}"
                module.name = full
                if module.layout is not None and hp.layout is not None:
                    unplaced = module.__dict__.setdefault("_unplaced_layout", module.layout)
                    module.layout = unplaced.on_host(name, hp.layout, leading)
                self._register(full, module)
                self._add_spliced_hook_points(full, module)

    # -- layouts ------------------------------------------------------------------------------
    def hook_layout(self, name: str) -> HookLayout:
        """The layout of the hook point ``name`` (a KeyError with close matches for a bad name)."""
        hp = self.hook_dict.get(name)
        if hp is None:
            raise unknown_name_error(name, self.hook_dict)
        if hp.layout is None:
            raise ValueError(f"hook point {name!r} declares no layout")
        return hp.layout

    def hook_name(self, site: str, layer: int | None = None, component: str | None = None,
                  host: str | None = None) -> str:
        """The name of the hook point with this layout: ``model.hook_name("z", 3)`` is
        ``"blocks.3.attn.hook_z"``; ``hook_name("scale", 2, "ln1")``; ``hook_name("sae_acts_post",
        host="blocks.3.hook_resid_post")``. Negative layers count from the end."""
        n_layers = getattr(getattr(self, "cfg", None), "n_layers", None)
        if layer is not None and layer < 0 and n_layers is not None:
            layer += n_layers
        name = self._layout_index.get((component, site, layer, host))
        if name is not None:
            return name
        sites = sorted({k[1] for k in self._layout_index})
        where = "" if layer is None else f" in layer {layer}"
        comp = "" if component is None else f" (component {component!r})"
        on = "" if host is None else f" spliced at {host!r}"
        raise KeyError(f"this model has no hook site {site!r}{where}{comp}{on}; sites: {', '.join(sites)}")

    def find_hooks(self, component: str | None = None, site: str | None = None, layer: int | None = None,
                   host: str | None = None) -> list[str]:
        """Names of the hook points whose layout matches every given field, in module order (blocks in layer order)."""
        out = []
        for name, hp in self.hook_dict.items():
            lay = hp.layout
            if lay is None:
                continue
            if ((component is None or lay.component == component) and (site is None or lay.site == site)
                    and (layer is None or lay.layer == layer) and (host is None or lay.host == host)):
                out.append(name)
        return out

    # -- lookup -------------------------------------------------------------------------------
    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    @validates_input
    def resolve_hook_points(self, name: Union[str, Callable[[str], bool]]) -> list[HookPoint]:
        """Hook points named by a string (exact) or selected by a predicate on names."""
        if isinstance(name, str):
            hp = self.hook_dict.get(name)
            if hp is None:
                raise unknown_name_error(name, self.hook_dict)
            return [hp]
        if callable(name):
            return [hp for n, hp in self.hook_dict.items() if name(n)]
        raise TypeError(f"a hook target must be a name or a predicate on names, got {type(name).__name__}")

    @validates_input
    def _names_from_filter(self, names_filter: NameFilter) -> list[str]:
        if names_filter is None:
            return list(self.hook_dict)
        if isinstance(names_filter, str):
            return [hp.name for hp in self.resolve_hook_points(names_filter)]  # type: ignore[misc]
        if callable(names_filter):
            return [n for n in self.hook_dict if names_filter(n)]
        if not isinstance(names_filter, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names_filter):
            raise TypeError("names_filter must be a hook name, a list of hook names or a predicate on names, "
                            f"got {type(names_filter).__name__} {names_filter!r}")
        out = []
        for n in names_filter:
            if n not in self.hook_dict:
                raise unknown_name_error(n, self.hook_dict)
            out.append(n)
        return out

    # -- adding and removing ------------------------------------------------------------------
    @validates_input
    def add_hook(
        self,
        name: Union[str, Callable[[str], bool]],
        hook: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> list[LensHandle]:
        return [hp.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend)  # type: ignore[arg-type]
                for hp in self.resolve_hook_points(name)]

    @validates_input
    def add_perma_hook(self, name: Union[str, Callable[[str], bool]], hook: HookFn, dir: str = "fwd") -> list[LensHandle]:
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, including_permanent: bool = False, clear_contexts: bool = True) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks("both", including_permanent=including_permanent)
            if clear_contexts:
                hp.clear_context()

    def n_hooks(self) -> int:
        return sum(hp.n_hooks for hp in self.hook_dict.values())

    @validates_input
    def hooks(
        self,
        fwd_hooks: HookSpec = (),
        bwd_hooks: HookSpec = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> contextlib.AbstractContextManager[HookedRootModule]:
        """Add hooks for the duration of a ``with`` block; remove exactly these on exit.

        All names are resolved here, before any hook is added, so a bad name or hook raises at
        once and changes nothing.
        """
        plan: list[tuple[HookPoint, HookFn, Direction]] = []
        for direction, specs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for spec in specs:
                if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
                    raise TypeError(f"each {direction} hook must be a (name_or_filter, fn) pair, got {spec!r}")
                target, fn = spec
                if not callable(fn):
                    raise TypeError(f"hook for {target!r} must be callable fn(activation, hook)")
                for hp in self.resolve_hook_points(target):
                    plan.append((hp, fn, "fwd" if direction == "fwd" else "bwd"))
        return self._hooks_added(plan, reset_hooks_end, clear_contexts)

    @contextlib.contextmanager
    def _hooks_added(self, plan: list[tuple[HookPoint, HookFn, Direction]], reset_hooks_end: bool,
                     clear_contexts: bool) -> Iterator[HookedRootModule]:
        added: list[LensHandle] = []
        try:
            for hp, fn, direction in plan:
                added.append(hp.add_hook(fn, dir=direction))
            yield self
        finally:
            if reset_hooks_end:
                for h in added:
                    h.remove()
                if clear_contexts:
                    for hp, _, _ in plan:
                        hp.clear_context()

    @validates_input
    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: HookSpec = (),
        bwd_hooks: HookSpec = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model with temporary hooks: ``fwd_hooks=[(name_or_filter, fn), ...]``.

        Backward hooks only fire on a backward pass: with ``reset_hooks_end=True`` they are gone
        when this returns, so call ``.backward()`` inside ``with model.hooks(bwd_hooks=...)``.
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    # -- caching ------------------------------------------------------------------------------
    @validates_input
    def get_caching_hooks(
        self,
        names_filter: NameFilter = None,
        incl_bwd: bool = False,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[tuple[Union[str, Callable[[str], bool]], HookFn]],
               list[tuple[Union[str, Callable[[str], bool]], HookFn]]]:
        cache = {} if cache is None else cache
        names = self._names_from_filter(names_filter)
        save = _Recorder(cache, "", device, dtype, remove_batch_dim)
        fwd: list[tuple[Union[str, Callable[[str], bool]], HookFn]] = [(n, save) for n in names]
        bwd: list[tuple[Union[str, Callable[[str], bool]], HookFn]] = []
        if incl_bwd:
            save_grad = _Recorder(cache, "_grad", device, dtype, remove_batch_dim)
            bwd = [(n, save_grad) for n in names]
        return cache, fwd, bwd

    @validates_input
    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NameFilter = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype | None = None,
        incl_bwd: bool = False,
        stop_at_layer: int | None = None,
        remove_batch_dim: bool = False,
        return_cache_object: bool = True,
        **model_kwargs: Any,
    ) -> tuple[Any, Union[ActivationCache, dict[str, torch.Tensor]]]:
        """Run the model and record the activations whose names pass ``names_filter``.

        ``names_filter``: a name, a list of names or a predicate; ``None`` records every hook.
        ``incl_bwd=True`` also backpropagates the output (which must then be a scalar, e.g.
        ``return_type="loss"``) and records gradients under ``name + "_grad"``.
        """
        cache_dict, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, dtype, remove_batch_dim)
        if stop_at_layer is not None:
            model_kwargs["stop_at_layer"] = stop_at_layer
        with self.hooks(fwd, bwd):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, torch.Tensor) or out.numel() != 1:
                    raise ValueError("run_with_cache(incl_bwd=True) needs a scalar output, e.g. return_type='loss'")
                out.backward()
        if return_cache_object:
            return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
        return out, cache_dict
