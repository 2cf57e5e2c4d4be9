"""tdb_lens: debug transformers the way Transformer Debugger does, with TransformerLens hook points."""

from .hooks import ActivationCache, HookedRootModule, HookPoint, get_act_name
from .models import CheckpointError, GPT2Config, HookedGPT2, HookedTransformer

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "CheckpointError", "GPT2Config", "HookPoint", "HookedGPT2", "HookedRootModule",
    "HookedTransformer", "get_act_name",
]
