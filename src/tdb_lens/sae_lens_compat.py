"""SAELens' ``HookedSAETransformer`` idioms on a tdb_lens model.

* `from_sae_lens(sae)`: a ``sae_lens`` SAE object as a tdb_lens `SAE` whose parameters *are* the
  SAELens tensors (no copy when dtype and device already match; edits to one show in the other).
  ``model.add_sae``, ``model.saes``, ``model.run_with_saes`` accept SAELens SAEs directly.
* `run_with_cache_with_saes`, `run_with_saes`, `run_with_hooks_with_saes`: SAELens' names and
  arguments; the cache keys are SAELens' (``blocks.3.hook_resid_post.hook_sae_acts_post``).

**``use_error_term``**: as SAELens, these functions default to ``None`` = each SAE's own setting
(False for a fresh SAE: the reconstruction replaces the activation). tdb_lens' own
``model.add_sae(sae)`` and ``with model.saes(...)`` default to ``use_error_term=True`` (the model's
output is unchanged and latent edits flow downstream): a ported ``model.add_sae(sae)`` must pass
``use_error_term=False`` to get SAELens' behaviour. See docs/PORTING.md.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

from .sae.sae import SAE

_converted: weakref.WeakKeyDictionary[Any, SAE] = weakref.WeakKeyDictionary()


def is_sae_lens_sae(obj: Any) -> bool:
    """True for an SAE object of the ``sae_lens`` package (checked without importing it)."""
    return any(c.__module__.split(".")[0] == "sae_lens" and c.__name__ == "SAE" for c in type(obj).__mro__)


def from_sae_lens(sae: Any) -> SAE:
    """The tdb_lens `SAE` computing what the ``sae_lens`` SAE ``sae`` computes, sharing its tensors.

    The same object is returned for the same SAELens SAE while it lives. Raises `SAEFormatError`
    for architectures tdb_lens does not run (gated, transcoders ...).
    """
    if isinstance(sae, SAE):
        return sae
    if not is_sae_lens_sae(sae):
        raise TypeError(f"expected a tdb_lens SAE or a sae_lens SAE, got {type(sae).__name__}")
    if sae in _converted:
        return _converted[sae]
    from .sae.saelens_format import config_from_saelens, sae_from_tensors

    where = f"sae_lens {type(sae).__name__}"
    cfg = config_from_saelens(sae.cfg.to_dict(), where=where)
    tensors = {name: t.detach() for name, t in sae.state_dict().items()}
    device = next(iter(tensors.values())).device if tensors else None
    ours = sae_from_tensors(cfg, tensors, where, device=device)
    ours.use_error_term = bool(getattr(sae, "use_error_term", False))
    _converted[sae] = ours
    return ours


def _as_list(saes: Any) -> list[SAE]:
    if saes is None:
        return []
    if isinstance(saes, SAE) or is_sae_lens_sae(saes):
        saes = [saes]
    return [from_sae_lens(s) for s in saes]


@contextlib.contextmanager
def saes(model: Any, saes: Any = (), reset_saes_end: bool = True,
         use_error_term: Optional[bool] = None) -> Iterator[Any]:
    """SAELens' ``with model.saes(saes=[...])``: attach each SAE at its recorded hook for the block.

    ``use_error_term=None`` keeps each SAE's own setting (SAELens' default)."""
    from .sae import attach

    added: list[str] = []
    try:
        for sae in _as_list(saes):
            flag = sae.use_error_term if use_error_term is None else use_error_term
            name = sae.cfg.hook_name
            attach.add_sae(model, sae, name, use_error_term=flag)
            added.append(name)  # type: ignore[arg-type]
        yield model
    finally:
        if reset_saes_end:
            for name in reversed(added):
                if name in attach.attached_saes(model):
                    attach.remove_sae(model, name)


def run_with_saes(model: Any, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                  use_error_term: Optional[bool] = None, **model_kwargs: Any) -> Any:
    """Run ``model`` once with ``saes`` attached (SAELens' ``run_with_saes``)."""
    with _saes_ctx(model, saes, reset_saes_end, use_error_term):
        return model(*model_args, **model_kwargs)


def run_with_cache_with_saes(model: Any, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                             use_error_term: Optional[bool] = None, return_cache_object: bool = True,
                             remove_batch_dim: bool = False, **model_kwargs: Any) -> tuple[Any, Any]:
    """``model.run_with_cache`` with ``saes`` attached (SAELens' ``run_with_cache_with_saes``):
    the cache holds the SAE hook points too (``{host}.hook_sae_acts_post`` ...)."""
    with _saes_ctx(model, saes, reset_saes_end, use_error_term):
        return model.run_with_cache(*model_args, return_cache_object=return_cache_object,
                                    remove_batch_dim=remove_batch_dim, **model_kwargs)


def run_with_hooks_with_saes(model: Any, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                             fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
                             clear_contexts: bool = False, **model_kwargs: Any) -> Any:
    """``model.run_with_hooks`` with ``saes`` attached (SAELens' ``run_with_hooks_with_saes``)."""
    with _saes_ctx(model, saes, reset_saes_end, None):
        return model.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                                    reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **model_kwargs)


_saes_ctx = saes

SAELike = Union[SAE, Any]
