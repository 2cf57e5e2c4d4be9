"""The hook engine: named activations, temporary hooks, caches."""

from .cache import ActivationCache
from .hook_point import HookPoint, LensHandle
from .names import get_act_name
from .root import HookedRootModule

__all__ = ["ActivationCache", "HookPoint", "HookedRootModule", "LensHandle", "get_act_name"]
