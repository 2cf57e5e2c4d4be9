"""Model families on the shared hook engine."""

from .components import KVCache
from .engine import HookedTransformer
from .factored import FactoredMatrix
from .gpt2 import GPT2Config, HookedGPT2
from .hub import CheckpointError
from .llama import HookedLlama, LlamaConfig

__all__ = ["CheckpointError", "FactoredMatrix", "GPT2Config", "HookedGPT2", "HookedLlama", "HookedTransformer", "KVCache",
           "LlamaConfig"]
