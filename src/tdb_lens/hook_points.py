"""TransformerLens' ``hook_points`` module: `HookPoint`, `HookedRootModule` and `LensHandle`, for
``from transformer_lens.hook_points import HookPoint`` ported as ``from tdb_lens.hook_points import HookPoint``."""

from .hooks.hook_point import HookPoint, LensHandle
from .hooks.root import HookedRootModule

__all__ = ["HookPoint", "HookedRootModule", "LensHandle"]
