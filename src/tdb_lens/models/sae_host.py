"""`SAEHostMixin`: ``model.add_sae(...)``, ``with model.saes(...)``, ``model.reset_saes()`` ...

The methods delegate to `tdb_lens.sae.attach`, imported when first called, so building or loading a
model never imports the SAE package (dependencies point down: hooks <- models <- sae). Splicing
itself is the generic `HookPoint.set_splice` of `tdb_lens.hooks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from ..sae.sae import SAE

SAESpec = Union["SAE", Iterable["SAE"], Mapping[str, "SAE"]]


class SAEHostMixin:
    """SAE methods on a `HookedRootModule` (see `tdb_lens.sae.attach` for what each does)."""

    def add_sae(self, sae: SAE, hook_name: Optional[str] = None, use_error_term: bool = True) -> SAE:
        """Splice ``sae`` in at ``hook_name`` (default: the SAE's recorded hook); see `sae.attach.add_sae`."""
        from ..sae import attach

        return attach.add_sae(self, sae, hook_name, use_error_term)  # type: ignore[arg-type]

    def remove_sae(self, which: Union[str, SAE, None] = None) -> None:
        """Detach the SAE at a hook name (or this SAE object; None: all of them)."""
        from ..sae import attach

        attach.remove_sae(self, which)  # type: ignore[arg-type]

    def reset_saes(self) -> None:
        """Detach every SAE."""
        from ..sae import attach

        attach.reset_saes(self)  # type: ignore[arg-type]

    def saes(self, spec: SAESpec, use_error_term: bool = True) -> AbstractContextManager[Any]:
        """``with model.saes([sae, ...]) :`` attach SAEs for a block; see `sae.attach.saes`."""
        from ..sae import attach

        return attach.saes(self, spec, use_error_term)  # type: ignore[arg-type]

    @property
    def attached_saes(self) -> dict[str, SAE]:
        """``{hook_name: sae}`` for the SAEs spliced in now."""
        from ..sae import attach

        return attach.attached_saes(self)  # type: ignore[arg-type]

    def run_with_saes(self, *model_args: Any, saes: SAESpec = (), use_error_term: bool = False,
                      **model_kwargs: Any) -> Any:
        """Run once with ``saes`` attached (SAELens's default here: no error term, the SAE replaces the activation)."""
        from ..sae import attach

        with attach.saes(self, saes, use_error_term):  # type: ignore[arg-type]
            return self(*model_args, **model_kwargs)  # type: ignore[operator]

    def run_with_cache_with_saes(self, *model_args: Any, **kwargs: Any) -> Any:
        """SAELens' ``run_with_cache_with_saes`` (``saes=``, ``use_error_term=None``: each SAE's own
        setting); see `tdb_lens.sae_lens_compat.run_with_cache_with_saes`."""
        from ..sae_lens_compat import run_with_cache_with_saes

        return run_with_cache_with_saes(self, *model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, **kwargs: Any) -> Any:
        """SAELens' ``run_with_hooks_with_saes``; see `tdb_lens.sae_lens_compat`."""
        from ..sae_lens_compat import run_with_hooks_with_saes

        return run_with_hooks_with_saes(self, *model_args, **kwargs)
