"""Weight processing for every family: ``process_weights_(model, fold_ln=..., center_writing_weights=...,
center_unembed=..., fold_value_biases=...)``, TransformerLens' four simplifications, in place.

Each family's processor lives next to the family (`gpt2_processing`: LayerNorm; `llama_processing`:
RMSNorm, where ``center_writing_weights`` is skipped as TransformerLens skips it) and registers
itself here under its model class; `process_weights_` looks the model's class (or a base class) up
in that registry. Their module docstrings list which hooks each option changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")

#: model class -> its in-place processor ``f(model, **flags) -> model``
PROCESSORS: dict[type, Callable[..., Any]] = {}
#: the built-in families' processing modules (each registers itself when imported)
_FAMILY_MODULES = (".gpt2_processing", ".llama_processing")
M = TypeVar("M", bound=nn.Module)


def register_processor(model_class: type, processor: Callable[..., Any]) -> None:
    """Make `process_weights_` use ``processor`` for ``model_class`` and its subclasses."""
    PROCESSORS[model_class] = processor


def processor_for(model: nn.Module) -> Callable[..., Any]:
    """The registered processor of ``model``'s class (or nearest base class); TypeError if none."""
    for module in _FAMILY_MODULES:
        importlib.import_module(module, __package__)
    for cls in type(model).__mro__:
        if cls in PROCESSORS:
            return PROCESSORS[cls]
    supported = ", ".join(sorted(c.__name__ for c in PROCESSORS))
    raise TypeError(f"process_weights_ supports {supported}; got {type(model).__name__}")


def process_weights_(
    model: M,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> M:
    """Apply the chosen TransformerLens weight simplifications to ``model`` in place (its family's
    processor); returns it. Nothing is processed unless asked for."""
    return processor_for(model)(model, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases)


__all__ = ["PROCESSING_FLAGS", "PROCESSORS", "process_weights_", "processor_for", "register_processor"]
