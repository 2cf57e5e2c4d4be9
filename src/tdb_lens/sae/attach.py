"""Splicing SAEs into a model: `add_sae`, `remove_sae`, `reset_saes`, the `saes` context, `SAEHostMixin`.

An attached SAE sits after its hook point's own hooks (`HookPoint.set_splice`): hooks on the
original name still fire, on the SAE's input, and the SAE's hook points appear in
``model.hook_dict`` as ``{hook_name}.hook_sae_acts_post`` etc., so ``run_with_cache`` and
``run_with_hooks`` reach the latents. The SAE is kept out of the model's module tree, so the model's
``state_dict`` never changes and detaching restores the model exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Optional, Union

from ..hooks import HookedRootModule, HookPoint
from ..hooks.names import unknown_name_error

if TYPE_CHECKING:  # pragma: no cover
    from .sae import SAE

SAESpec = Union["SAE", Iterable["SAE"], Mapping[str, "SAE"]]


def attached_saes(model: HookedRootModule) -> dict[str, SAE]:
    """``{hook_name: sae}`` for the SAEs spliced into ``model`` now."""
    return dict(model.__dict__.get("_tdb_attached_saes", {}))


def _registry(model: HookedRootModule) -> dict[str, SAE]:
    # A plain dict in __dict__: nn.Module never sees it, so state_dict and .modules() are unchanged.
    return model.__dict__.setdefault("_tdb_attached_saes", {})


def _host_hook_points(model: HookedRootModule) -> dict[str, HookPoint]:
    """The model's own hook points (not those inside spliced SAEs)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HookPoint)}


def expected_width(model: HookedRootModule, hook_name: str) -> Optional[int]:
    """The last dimension of the activation at ``hook_name``, from its layout (None when the layout
    does not fix it, e.g. attention patterns, whose last axis is a position)."""
    hp = model.hook_dict.get(hook_name)
    lay = hp.layout if hp is not None else None
    return None if lay is None else lay.width


def _head_axis_size(model: HookedRootModule, hook_name: str) -> Optional[int]:
    """Number of heads when the activation is ``[..., head or kv_head, width]`` (else None)."""
    lay = model.hook_dict[hook_name].layout
    if lay is None or len(lay.axes) < 2 or lay.axes[-2] not in ("head", "kv_head"):
        return None
    return lay.size(lay.axes[-2])


def _check_fits(model: HookedRootModule, sae: SAE, hook_name: str) -> None:
    width = expected_width(model, hook_name)
    d_in = sae.cfg.d_in
    if width is None:
        return  # checked on the first run by the SAE itself
    heads = _head_axis_size(model, hook_name)
    if heads and sae.cfg.reshape_activations == "hook_z":
        if d_in not in (width, width * heads):
            raise ValueError(f"SAE d_in={d_in} does not fit {hook_name!r}: its activations are "
                             f"[..., n_heads={heads}, d_head={width}] (hook_z SAEs need d_in = {width * heads})")
        return
    if d_in != width:
        raise ValueError(f"SAE d_in={d_in} does not match {hook_name!r}, whose activations have last dimension "
                         f"{width}; was this SAE trained on another model or hook?")


def _check_device(model: HookedRootModule, sae: SAE) -> None:
    p = next(iter(model.parameters()), None)
    if p is not None and p.device != sae.device:
        raise ValueError(f"SAE is on {sae.device} but the model is on {p.device}: call sae.to({str(p.device)!r}) first")


def add_sae(model: HookedRootModule, sae: SAE, hook_name: Optional[str] = None, use_error_term: bool = True) -> SAE:
    """Splice ``sae`` in at ``hook_name`` (default: ``sae.cfg.hook_name``).

    With ``use_error_term`` the reconstruction error is added back, so the model computes what it
    computed before and edits to latents flow downstream. Raises (changing nothing) on an unknown
    name, a width mismatch, a device mismatch, a hook point that already holds an SAE, or an SAE
    already attached elsewhere.
    """
    from .sae import SAE

    if not isinstance(sae, SAE):  # a sae_lens SAE becomes a tdb_lens one sharing its tensors; else TypeError
        from ..sae_lens_compat import from_sae_lens

        sae = from_sae_lens(sae)
    hook_name = hook_name or sae.cfg.hook_name
    if not hook_name:
        raise ValueError("no hook_name given and the SAE's config records none: add_sae(model, sae, 'blocks.3.hook_resid_post')")
    points = _host_hook_points(model)
    if hook_name not in points:
        raise unknown_name_error(hook_name, points)
    hp = points[hook_name]
    registry = _registry(model)
    if hp.splice is not None:
        raise ValueError(f"{hook_name!r} already has an SAE attached; remove_sae(model, {hook_name!r}) first")
    host = sae.__dict__["_host"]
    if host is not None:
        raise ValueError(f"this SAE is already attached at {host[1]!r}; detach it first or attach sae.clone()")
    _check_fits(model, sae, hook_name)
    _check_device(model, sae)
    previous_flag = sae.use_error_term
    try:
        sae.use_error_term = use_error_term
        hp.set_splice(sae)
        sae.__dict__["_host"] = (model, hook_name)
        registry[hook_name] = sae
        model.setup()
    except BaseException:
        hp.set_splice(None)
        sae.__dict__["_host"] = None
        sae.use_error_term = previous_flag
        registry.pop(hook_name, None)
        model.setup()
        sae.setup()
        raise
    return sae


def _find(model: HookedRootModule, which: Union[str, SAE, None]) -> list[str]:
    registry = _registry(model)
    if which is None:
        return list(registry)
    if isinstance(which, str):
        if which not in registry:
            hint = f" SAEs are attached at: {', '.join(registry)}." if registry else " No SAE is attached."
            raise KeyError(f"no SAE attached at {which!r}.{hint}")
        return [which]
    names = [n for n, s in registry.items() if s is which]
    if not names:
        raise KeyError("this SAE is not attached to the model")
    return names


def remove_sae(model: HookedRootModule, which: Union[str, SAE, None] = None) -> None:
    """Detach the SAE at a hook name (or this SAE object; None: all of them)."""
    points = _host_hook_points(model)
    registry = _registry(model)
    for name in _find(model, which):
        sae = registry.pop(name)
        points[name].set_splice(None)
        sae.__dict__["_host"] = None
        sae.use_error_term = False
        sae.setup()  # give its hook points back their local names
    model.setup()


def reset_saes(model: HookedRootModule) -> None:
    """Detach every SAE."""
    remove_sae(model, None)


def _as_pairs(spec: SAESpec) -> list[tuple[Optional[str], SAE]]:
    from ..sae_lens_compat import from_sae_lens, is_sae_lens_sae  # sae_lens SAEs are converted (tensors shared)
    from .sae import SAE

    if isinstance(spec, SAE) or is_sae_lens_sae(spec):
        return [(None, from_sae_lens(spec))]
    if isinstance(spec, Mapping):
        return [(name, from_sae_lens(s)) for name, s in spec.items()]
    return [(None, from_sae_lens(s)) for s in spec]


@contextlib.contextmanager
def saes(model: HookedRootModule, spec: SAESpec, use_error_term: bool = True) -> Iterator[HookedRootModule]:
    """Attach SAEs for a ``with`` block: a list (each at its ``cfg.hook_name``) or ``{hook_name: sae}``.

    All or nothing: if one cannot be attached, those already attached are detached before the error
    propagates. On exit exactly these SAEs are detached.
    """
    added: list[str] = []
    try:
        for name, sae in _as_pairs(spec):
            add_sae(model, sae, name, use_error_term=use_error_term)
            added.append(name or sae.cfg.hook_name)  # type: ignore[arg-type]
        yield model
    finally:
        for name in reversed(added):
            if name in _registry(model):
                remove_sae(model, name)


# The model-side methods (``model.add_sae`` ...) live in `tdb_lens.models.sae_host` so that models
# never import this package; re-exported here for ``from tdb_lens.sae import SAEHostMixin``.
from ..models.sae_host import SAEHostMixin  # noqa: E402

__all__ = ["SAEHostMixin", "SAESpec", "add_sae", "attached_saes", "expected_width", "remove_sae", "reset_saes", "saes"]
