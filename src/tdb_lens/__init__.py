"""tdb_lens: debug transformers the way Transformer Debugger does, with TransformerLens hook points."""

from .allocator import keep_freed_memory, release_freed_memory
from .compat import HookedTransformerConfig
from .hooks import ActivationCache, HookedRootModule, HookPoint, get_act_name
from .loading import DEFAULT_MODEL, load
from .models import CheckpointError, GPT2Config, HookedGPT2, HookedTransformer
from .models.factored import FactoredMatrix
from .models.llama import HookedLlama, LlamaConfig

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "CheckpointError", "GPT2Config", "HookPoint", "HookedGPT2", "HookedRootModule",
    "HookedLlama", "HookedTransformer", "LlamaConfig", "DEFAULT_MODEL", "get_act_name", "keep_freed_memory", "load",
    "release_freed_memory", "FactoredMatrix", "HookedTransformerConfig",
]
