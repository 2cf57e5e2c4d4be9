"""Which model produced a harvest or an explanation: its name plus a digest of its weights.

Harvest directories and explanation stores record a `ModelIdentity` and refuse to mix models: a
harvest made with other weights is never resumed or reused, and a store that knows a model name
with other weights refuses new units under that name.

The digest is BLAKE2b over every tensor of the model's ``state_dict`` (name, dtype, shape, bytes)
and over the state of every module spliced into a hook point (an SAE), in name order. It reads each
byte once (about 0.3 s for SmolLM2-135M's 540 MB of float32 weights on one core here).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelIdentity:
    """``name`` as the user gave it (``smollm2-135m``, a path, a hub id) and ``digest``, hex."""

    name: str
    digest: str

    def short(self) -> str:
        return f"{self.name} (weights {self.digest[:12]})"

    def as_dict(self) -> dict:
        return {"name": self.name, "digest": self.digest}


def _update(h, prefix: str, state: dict) -> None:
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{prefix}{key}|{t.dtype}|{tuple(state[key].shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())


def weights_digest(model: torch.nn.Module) -> str:
    """A 32-hex-digit BLAKE2b digest of the model's weights and buffers and of any spliced module's."""
    h = hashlib.blake2b(digest_size=16)
    _update(h, "", model.state_dict())
    for name, hp in sorted(getattr(model, "hook_dict", {}).items()):
        splice = getattr(hp, "splice", None)
        if isinstance(splice, torch.nn.Module):
            _update(h, f"splice:{name}:", splice.state_dict())
    return h.hexdigest()


def model_name_of(model) -> str:
    return str(getattr(model, "name", None) or getattr(getattr(model, "cfg", None), "model_name", None)
               or type(model).__name__)


def model_identity(model: torch.nn.Module, name: Optional[str] = None) -> ModelIdentity:
    """The model's identity: ``name`` (default: what the model calls itself) and its weights digest."""
    return ModelIdentity(name or model_name_of(model), weights_digest(model))
