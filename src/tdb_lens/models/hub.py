"""Finding and reading Hugging Face-layout checkpoints without holding two copies of the weights.

``resolve_checkpoint`` turns a hub name or a local directory into a local directory (hub cache
first; ``HF_HUB_OFFLINE`` honoured). ``load_state_into`` validates every key and shape against the
model *before* it touches anything, then moves tensors one at a time from the safetensors files
into a model built on the ``meta`` device, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Shaped
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot become this model: names what is wrong and what was expected."""


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory holding ``config.json`` and safetensors weights."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p} has no config.json: expected a Hugging Face model directory")
        return p
    name = str(name_or_path)
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a model directory (config.json + *.safetensors) or a hub name")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json"]
    try:  # the cache first: no network when the weights are already here
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise CheckpointError(
            f"{name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it on a "
            f"machine with access (huggingface-cli download {name}) or pass a local directory"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # network errors, unknown repos
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face hub and it is not cached ({type(e).__name__}: {e}). "
            "Pass a local directory, or run where the hub is reachable."
        ) from e


def read_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON: {e}") from e


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = [directory / "model.safetensors"] if (directory / "model.safetensors").exists() else []
    if not files:
        raise CheckpointError(f"{directory} has no model.safetensors (or sharded index); only safetensors are read")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"checkpoint shards missing: {missing}")
    return files


class TensorSource:
    """Key -> (file, shape) across safetensors shards; tensors are read one at a time."""

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
            except Exception as e:
                raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for f, ks in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in ks:
                        yield k, h.get_tensor(k)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor data ({e}); the file is corrupt or truncated") from e


class DictSource:
    """The same interface over an in-memory state dict (e.g. a ``transformers`` model's)."""

    def __init__(self, state: dict[str, torch.Tensor], copy: bool = True, checked_finite: bool = False) -> None:
        self.state = state
        self.copy = copy  # False: take ownership of the tensors (they were made for this model)
        self.checked_finite = checked_finite  # True: every tensor is known to be NaN/Inf-free
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def keys(self) -> list[str]:
        return list(self.state)

    def read(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            t = self.state[k].detach()
            yield k, t.clone() if self.copy else t


def count_nonfinite(t: Shaped[torch.Tensor, "*dims"]) -> int:
    """How many NaN / infinite values ``t`` holds. A finite sum proves there are none (NaN and Inf
    propagate into it), which costs a twentieth of an element-wise test; only otherwise are they counted."""
    if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter) or attr in owner._parameters:
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True))
    else:
        owner._buffers[attr] = value


def load_state_into(
    build: Callable[[], nn.Module],
    source,
    rename: Callable[[str], Optional[str]],
    transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t,
    dtype: torch.dtype = torch.float32,
    what: str = "checkpoint",
) -> nn.Module:
    """Build the model on ``meta``, check keys and shapes, then fill it tensor by tensor.

    ``rename`` maps a checkpoint key to a model parameter name, or None for keys to ignore
    (e.g. causal-mask buffers). Any problem with keys or shapes raises `CheckpointError` before weights
    are read; a tensor holding NaN or Inf raises it while reading (the half-built model is dropped).
    """
    with torch.device("meta"):
        model = build()
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan: dict[str, str] = {}
    unexpected = []
    for key in source.keys():
        name = rename(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
        else:
            plan[key] = name
    missing = sorted(set(expected) - set(plan.values()))
    problems = []
    if missing:
        problems.append(f"missing keys for {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)")
    for key, name in plan.items():
        got = source.shapes[key]
        want = transform_shape(transform, name, got)
        if want != expected[name]:
            problems.append(f"{key}: shape {got}, expected {expected[name]} for {name}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))
    for key, tensor in source.read(plan):
        value = transform(plan[key], tensor).to(dtype).contiguous()
        known_finite = getattr(source, "checked_finite", False) and tensor.dtype == dtype
        if not known_finite and (bad := count_nonfinite(value)):
            converted = f" after conversion to {dtype}" if tensor.dtype != dtype else ""
            raise CheckpointError(f"{what}: tensor {key!r} holds {bad} NaN or infinite values{converted} "
                                  f"(of {value.numel()}); refusing to load it")  # fmt: skip
        _set_tensor(model, plan[key], value)
    return model


def transform_shape(transform, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(transform(name, torch.empty(shape, device="meta")).shape)
