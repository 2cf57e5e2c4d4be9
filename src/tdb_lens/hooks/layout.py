"""`HookLayout`: what a hook point holds, declared where the hook point is built.

Every `HookPoint` carries a layout: the layer it belongs to (None outside the blocks), the
component (``embed``, ``resid``, ``attn``, ``mlp``, ``ln1``, ``ln2``, ``ln_final``, ``sae``), its
site (TransformerLens's short name: ``resid_pre``, ``z``, ``pattern``, ``post``, ``scale``,
``sae_acts_post`` ...) and its named axes, e.g. ``("batch", "pos", "head", "d_head")``. Sizes of
the model's axes (``d_model``, ``head``, ``kv_head``, ``d_head``, ``d_mlp``, ``d_sae`` ...) are
filled in by the root's ``setup()``; ``batch``, ``pos``, ``query_pos`` and ``key_pos`` stay free.

Code that needs to know where the positions are, which layer a hook is in or how wide a unit
axis is reads ``model.hook_dict[name].layout``; nothing outside `tdb_lens.hooks.names` takes hook
names apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

#: Axes whose size changes from run to run.
FREE_AXES = frozenset({"batch", "pos", "query_pos", "key_pos"})
#: Axes that index positions (the query side first).
POSITION_AXES = ("pos", "query_pos")
#: Axes whose entries are units an analysis can point at (a head, a neuron, a latent).
UNIT_AXES = ("head", "kv_head", "d_mlp", "d_sae")
#: The layer that leading axes of a spliced module's hook point inherit from its host.
HOST_AXES = "..."

COMPONENTS = ("embed", "resid", "attn", "mlp", "ln1", "ln2", "ln_final", "unembed", "sae", "model")


@dataclass(frozen=True)
class HookLayout:
    """Layer, component, site and named axes of one hook point (see the module docstring).

    ``host`` is set on the hook points of a module spliced into another hook point (an SAE): the
    name of the hook point it is spliced at.
    """

    component: str
    site: str
    axes: tuple[str, ...]
    layer: Optional[int] = None
    host: Optional[str] = None
    sizes: Mapping[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"hook component must be one of {COMPONENTS}, got {self.component!r}")

    # -- axes ---------------------------------------------------------------------------------
    def axis(self, name: str) -> int:
        """Index of the named axis; raises a KeyError naming the axes this hook has."""
        try:
            return self.axes.index(name)
        except ValueError:
            raise KeyError(f"hook site {self.site!r} has no axis {name!r}; its axes are {self.axes}") from None

    def has_axis(self, name: str) -> bool:
        return name in self.axes

    @property
    def pos_axis(self) -> Optional[int]:
        """The (query) position axis, or None for activations without one."""
        for name in POSITION_AXES:
            if name in self.axes:
                return self.axes.index(name)
        return None

    @property
    def key_axis(self) -> Optional[int]:
        return self.axes.index("key_pos") if "key_pos" in self.axes else None

    @property
    def unit_axis(self) -> Optional[int]:
        """The axis whose entries are heads, neurons or latents (None for residual-like hooks)."""
        for name in UNIT_AXES:
            if name in self.axes:
                return self.axes.index(name)
        return None

    @property
    def width(self) -> Optional[int]:
        """Size of the last axis, when it is a model axis (``d_model``, ``d_mlp``, ``d_head``, ``d_sae``)."""
        return self.sizes.get(self.axes[-1]) if self.axes else None

    def size(self, axis: str) -> Optional[int]:
        """The size of a model axis (None for batch/position axes or when not set up)."""
        return self.sizes.get(axis)

    def shape_for(self, batch: int, pos: int, key_pos: Optional[int] = None) -> tuple[int, ...]:
        """The full shape of this activation for a run of ``batch`` x ``pos`` tokens."""
        free = {"batch": batch, "pos": pos, "query_pos": pos, "key_pos": pos if key_pos is None else key_pos}
        out = []
        for a in self.axes:
            n = free.get(a, self.sizes.get(a))
            if n is None:
                raise ValueError(f"size of axis {a!r} of hook site {self.site!r} is not known (model not set up?)")
            out.append(n)
        return tuple(out)

    # -- building -----------------------------------------------------------------------------
    def stamped(self, **changes) -> HookLayout:
        return replace(self, **changes)

    def on_host(self, host_name: str, host: HookLayout, leading: Optional[tuple[str, ...]] = None) -> HookLayout:
        """This layout (a spliced module's) placed at ``host``: a leading ``...`` becomes
        ``leading`` (default: the host's axes but its last), and the layer is the host's."""
        axes = self.axes
        if axes and axes[0] == HOST_AXES:
            axes = (host.axes[:-1] if leading is None else tuple(leading)) + axes[1:]
        sizes = {**host.sizes, **self.sizes}
        return replace(self, axes=axes, layer=host.layer, host=host_name, sizes=sizes)

    def with_sizes(self, sizes: Mapping[str, int]) -> HookLayout:
        return replace(self, sizes={**sizes, **self.sizes})

    # -- checking -----------------------------------------------------------------------------
    def check(self, x: torch.Tensor, name: Optional[str], bound: Optional[dict[str, int]] = None) -> None:
        """Raise a ValueError naming the hook when ``x`` does not have this layout's shape.

        ``bound`` carries the sizes of free axes seen earlier in the same forward (batch, pos), so
        every hook of one run must agree on them.
        """
        axes = self.axes
        if axes and axes[0] == HOST_AXES:
            return  # an unplaced spliced module: checked once it is on a host
        where = f"hook {name!r}" if name else f"hook site {self.site!r}"
        if x.ndim != len(axes):
            raise ValueError(f"{where} got a {x.ndim}-d tensor {tuple(x.shape)}; its layout is [{', '.join(axes)}]")
        for a, n in zip(axes, x.shape):
            want = self.sizes.get(a)
            if want is None and bound is not None and a in ("batch", "pos", "query_pos"):
                key = "pos" if a == "query_pos" else a
                want = bound.setdefault(key, int(n))
            if want is not None and want != n:
                raise ValueError(f"{where}: axis {a!r} has size {n}, expected {want} "
                                 f"(shape {tuple(x.shape)}, layout [{', '.join(axes)}])")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{where} holds a {x.dtype} tensor; activations are floating point")

    def __str__(self) -> str:
        where = "" if self.layer is None else f"layer {self.layer}, "
        return f"{self.component}.{self.site} ({where}[{', '.join(self.axes)}])"


def layout(component: str, site: str, *axes: str) -> HookLayout:
    """Shorthand used where hook points are built: ``layout("attn", "z", "batch", "pos", "head", "d_head")``."""
    return HookLayout(component=component, site=site, axes=tuple(axes))
