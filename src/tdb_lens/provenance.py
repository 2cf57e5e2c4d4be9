"""Which model produced a harvest, an explanation or an SAE: its name plus a digest of its weights.

Harvest directories and explanation stores record a `ModelIdentity` and refuse to mix models: a
harvest made with other weights is never resumed or reused, and a store that knows a model name
with other weights refuses new units under that name.

The digest is BLAKE2b over every tensor of the model's ``state_dict`` (name, dtype, shape, bytes),
in name order; it reads each byte once (0.65 s of CPU for SmolLM2-135M's 538 MB of float32 weights
here). Modules spliced into hook points (SAEs) are not part of the model's identity: a harvest
records their digest separately (`splice_digest`), so a harvest of latents is never reused for
another SAE.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelIdentity:
    """``name`` as the user gave it (``smollm2-135m``, a path, a hub id), ``digest`` of its weights
    (hex) and ``spliced``: the digest of the modules spliced into it when the identity was taken
    ("" for none; not part of what a store compares)."""

    name: str
    digest: str
    spliced: str = ""

    def short(self) -> str:
        return f"{self.name} (weights {self.digest[:12]})"

    def as_dict(self) -> dict:
        return {"name": self.name, "digest": self.digest, "spliced": self.spliced}


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
    """A 32-hex-digit BLAKE2b digest of the model's weights and buffers (spliced modules excluded)."""
    h = hashlib.blake2b(digest_size=16)
    _update(h, "", model.state_dict())
    return h.hexdigest()


def splice_digest(model: torch.nn.Module) -> str:
    """A digest of every module spliced into the model's hook points (with where), "" when none is."""
    h = hashlib.blake2b(digest_size=16)
    found = False
    for name, hp in sorted(getattr(model, "hook_dict", {}).items()):
        splice = getattr(hp, "splice", None)
        if isinstance(splice, torch.nn.Module):
            found = True
            _update(h, f"splice:{name}:", splice.state_dict())
    return h.hexdigest() if found else ""


def model_name_of(model) -> str:
    return str(getattr(model, "name", None) or getattr(getattr(model, "cfg", None), "model_name", None)
               or type(model).__name__)


def model_identity(model: torch.nn.Module, name: Optional[str] = None) -> ModelIdentity:
    """The model's identity: ``name`` (default: what the model calls itself), its weights digest and
    the digest of what is spliced into it now."""
    return ModelIdentity(name or model_name_of(model), weights_digest(model), splice_digest(model))
