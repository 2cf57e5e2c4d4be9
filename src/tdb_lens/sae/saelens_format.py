"""SAELens's folder format: ``cfg.json`` + ``sae_weights.safetensors`` (read and written).

Reads configs written by SAELens 6 (fields at the top level, ``hook_name`` under ``metadata``) and
by older versions (``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs``, a boolean
``normalize_activations``). Writes SAELens 6 configs, so ``sae_lens.SAE.load_from_disk`` reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .architectures import ARCHITECTURES, architecture_class
from .config import SAEConfig
from .errors import SAEFormatError, require_finite
from .sae import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# The SAELens config version our cfg.json follows (fields at top level, run metadata under "metadata").
SAELENS_FORMAT_VERSION = "6.0.0"


def is_saelens_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CFG_FILENAME).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise SAEFormatError(f"{path.parent}: no {path.name}; an SAELens folder holds {CFG_FILENAME} "
                             f"and {WEIGHTS_FILENAME}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _saelens_architecture(d: dict[str, Any], where: str) -> tuple[str, Any]:
    """(our architecture name, k) from a SAELens config: SAELens 6 names the architecture, older
    versions say ``activation_fn_str`` (``"topk"`` with ``activation_fn_kwargs.k``, else ReLU)."""
    arch = d.get("architecture")
    act = d.get("activation_fn", d.get("activation_fn_str", "relu"))
    k = d.get("k")
    if arch is None:  # before SAELens 6
        kwargs = d.get("activation_fn_kwargs") or {}
        if act == "topk" and kwargs.get("k") is not None:
            arch, k = "topk", kwargs["k"]
        else:
            arch = "standard"
    if arch not in ARCHITECTURES:
        raise SAEFormatError(f"{where}: SAE architecture {arch!r} is not supported; tdb_lens runs {sorted(ARCHITECTURES)}")
    if arch == "standard" and act not in ("relu", None):
        raise SAEFormatError(f"{where}: standard SAE with activation {act!r}; only relu is supported")
    return arch, k


def config_from_saelens(d: dict[str, Any], where: str = "cfg.json") -> SAEConfig:
    """An `SAEConfig` from a SAELens config dict of any version."""
    raw_meta = d.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    arch, k = _saelens_architecture(d, where)
    norm = d.get("normalize_activations", "none")
    if isinstance(norm, bool) or norm is None:
        norm = "expected_average_only_in" if norm else "none"
    if norm == "expected_average_only_in":
        raise SAEFormatError(
            f"{where}: normalize_activations='expected_average_only_in' needs the release's norm scaling factor; "
            "load it with tdb_lens.sae.from_pretrained (which folds the factor in) or fold it yourself"
        )
    if d.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{where}: SAEs with a finetuning scaling factor are not supported")
    try:
        d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SAEFormatError(f"{where}: needs integer 'd_in' and 'd_sae'") from None
    hook = meta.get("hook_name") or d.get("hook_name") or d.get("hook_point")
    model_name = meta.get("model_name") or d.get("model_name")
    dtype = str(d.get("dtype", "float32")).replace("torch.", "")
    format_keys = ("hook_name", "model_name", "sae_lens_version", "sae_lens_training_version", "written_by")
    extra = {k_: v for k_, v in meta.items() if k_ not in format_keys}
    try:
        return SAEConfig(
            d_in=d_in, d_sae=d_sae, architecture=arch, k=int(k) if k is not None else None,
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)), normalize_activations=norm,
            rescale_acts_by_decoder_norm=bool(d.get("rescale_acts_by_decoder_norm", False)),
            reshape_activations=d.get("reshape_activations", "none") or "none",
            dtype=dtype if dtype in ("float32", "float64", "float16", "bfloat16") else "float32",
            hook_name=hook, model_name=model_name, metadata=extra,
        )
    except ValueError as e:
        raise SAEFormatError(f"{where}: {e}") from None


def config_to_saelens(cfg: SAEConfig) -> dict[str, Any]:
    if cfg.normalize_activations == "center":
        raise SAEFormatError(
            "SAELens has no 'center' input normalisation: this SAE only fits tdb_lens (save it with "
            "normalize_activations='none' after running the model with centred residuals)"
        )
    meta = dict(cfg.metadata)
    meta.update({"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
                 "hook_name": cfg.hook_name, "model_name": cfg.model_name, "written_by": "tdb_lens"})
    d: dict[str, Any] = {
        "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape_activations, "metadata": meta, "architecture": cfg.architecture,
    }
    d.update(architecture_class(cfg.architecture).config_fields(cfg))
    return d


def _param_names(cfg: SAEConfig) -> tuple[str, ...]:
    return architecture_class(cfg.architecture).param_names


def sae_from_tensors(cfg: SAEConfig, tensors: Mapping[str, Float[torch.Tensor, "*shape"]], where: str,
                     device: str | torch.device | None = None) -> SAE:
    """Build an SAE from SAELens-named tensors, checking names and shapes first."""
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
              "b_dec": (cfg.d_in,), "threshold": (cfg.d_sae,)}
    tensors = dict(tensors)
    names = _param_names(cfg)
    if "threshold" in names and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "b_enc" not in tensors and "b_mag" in tensors:
        raise SAEFormatError(f"{where}: looks like a gated SAE (b_mag/b_gate); gated SAEs are not supported")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{where}: missing tensors {missing}; found {sorted(tensors)}")
    for n in names:
        if tuple(tensors[n].shape) != shapes[n]:
            raise SAEFormatError(
                f"{where}: {n} has shape {tuple(tensors[n].shape)}, the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}) needs {shapes[n]}"
            )
    require_finite({n: tensors[n] for n in names}, where)
    sae = SAE(cfg, device="meta")
    dtype = getattr(torch, cfg.dtype)
    state = {n: tensors[n].to(dtype=dtype, device=device or "cpu") for n in names}
    sae.load_state_dict(state, assign=True)
    return sae


def load_saelens(path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: Optional[str] = None) -> SAE:
    """Load an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFormatError(f"{folder}: not a directory; an SAELens SAE is a folder with {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    cfg_dict = _read_json(folder / CFG_FILENAME)
    if dtype is not None:
        cfg_dict["dtype"] = dtype
    cfg = config_from_saelens(cfg_dict, where=str(folder / CFG_FILENAME))
    weights = folder / WEIGHTS_FILENAME
    if not weights.is_file():
        raise SAEFormatError(f"{folder}: no {WEIGHTS_FILENAME}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{weights}: not a readable safetensors file ({e})") from None
    return sae_from_tensors(cfg, tensors, str(weights), device)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_saelens(sae: SAE, path: str | os.PathLike,
                 extra_tensors_file: Optional[Mapping[str, Float[torch.Tensor, "*shape"]]] = None) -> Path:
    """Write ``sae`` as an SAELens folder (each file written atomically). Returns the folder."""
    folder = Path(path)
    d = config_to_saelens(sae.cfg)  # raises before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).detach().contiguous().cpu() for n in _param_names(sae.cfg)}
    _atomic_write(folder / WEIGHTS_FILENAME, lambda p: save_file(tensors, str(p)))
    if extra_tensors_file:
        _atomic_write(folder / SPARSITY_FILENAME, lambda p: save_file(dict(extra_tensors_file), str(p)))

    def write_cfg(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)

    _atomic_write(folder / CFG_FILENAME, write_cfg)
    return folder
