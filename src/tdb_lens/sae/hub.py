"""Pretrained SAE releases on the Hugging Face hub (SAELens's folder format), via ``huggingface_hub``.

``from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")`` resolves the release to a hub
repository and folder (from the few releases listed here, else from SAELens's release list when the
``sae_lens`` package is installed), downloads ``cfg.json`` and ``sae_weights.safetensors`` into the
hub cache, and reads them with `load_saelens`. Without network (or with ``HF_HUB_OFFLINE=1``) and
nothing cached it raises `SAEHubError` saying so.

Caveat for ``gpt2-small-res-jb`` (Joseph Bloom's GPT-2 small residual SAEs): SAELens's release
list gives no activation normalisation for it, but says the model must be loaded with
``center_writing_weights=True``: the SAEs were trained on TransformerLens's processed GPT-2, whose
residual stream has zero mean over ``d_model`` at every position. tdb_lens's ``HookedGPT2`` is
unprocessed, so those SAEs are loaded with ``normalize_activations="center"``: each vector's mean is
subtracted before encoding and added back after decoding. (On an already-centred residual stream
this does nothing, so it is also right for a model with centred writing weights.)
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from .errors import SAEFormatError, SAEHubError
from .sae import SAE
from .saelens_format import CFG_FILENAME, WEIGHTS_FILENAME, load_saelens

_GPT2_RES_JB_IDS = [f"blocks.{l}.hook_resid_pre" for l in range(12)] + ["blocks.11.hook_resid_post"]

# release -> repo, {sae_id: folder}, model kwargs the SAEs were trained with
BUILTIN_RELEASES: dict[str, dict[str, Any]] = {
    "gpt2-small-res-jb": {
        "repo_id": "jbloom/GPT2-Small-SAEs-Reformatted",
        "model": "gpt2-small",
        "saes": {i: i for i in _GPT2_RES_JB_IDS},
        "model_from_pretrained_kwargs": {"center_writing_weights": True},
        "conversion_func": None,
    },
}


@lru_cache(maxsize=1)
def _saelens_releases() -> dict[str, dict[str, Any]]:
    """SAELens's ``pretrained_saes.yaml``, read as data (sae_lens itself is not imported)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    try:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: the file is ~36k lines
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=loader) or {}
    except Exception:  # no yaml, unreadable file: fall back to the built-in list
        return {}
    out = {}
    for name, rel in raw.items():
        if not isinstance(rel, dict) or "repo_id" not in rel:
            continue
        saes = {s["id"]: s.get("path", s["id"]) for s in rel.get("saes", []) if isinstance(s, dict) and "id" in s}
        factors = {s["id"]: s["norm_scaling_factor"] for s in rel.get("saes", [])
                   if isinstance(s, dict) and "norm_scaling_factor" in s}
        overrides = rel.get("config_overrides") or {}
        out[name] = {
            "repo_id": rel["repo_id"], "model": rel.get("model"), "saes": saes, "norm_scaling_factor": factors,
            "model_from_pretrained_kwargs": (overrides.get("model_from_pretrained_kwargs") or {}),
            "conversion_func": rel.get("conversion_func"),
        }
    return out


def release_info(release: str) -> dict[str, Any]:
    """What tdb_lens knows about a release (SAELens's list first, then the built-in one)."""
    info = BUILTIN_RELEASES.get(release) or _saelens_releases().get(release)
    if info is None:
        if "/" in release:  # a hub repo id: sae_id is the folder
            return {"repo_id": release, "saes": {}, "model_from_pretrained_kwargs": {}, "conversion_func": None}
        known = sorted(set(BUILTIN_RELEASES) | set(_saelens_releases()))
        import difflib

        close = difflib.get_close_matches(release, known, n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise SAEHubError(f"unknown SAE release {release!r}.{hint} A hub repo id (owner/name) also works.")
    return info


def _download(repo_id: str, filename: str, force_download: bool) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # (a subclass of EntryNotFoundError: first)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise SAEHubError(
            f"cannot fetch {repo_id}/{filename}: {why} and the file is not in the local hub cache. "
            f"Download the folder on a machine with network access and load it with "
            f"tdb_lens.sae.load_sae(path) ({type(e).__name__})"
        ) from None
    except EntryNotFoundError:
        raise SAEHubError(f"{repo_id} has no file {filename!r}") from None
    except OSError as e:  # connection errors surface as OSError subclasses
        raise SAEHubError(f"cannot fetch {repo_id}/{filename} from the Hugging Face hub: {e}") from None


def from_pretrained(release: str, sae_id: str, device: str = "cpu", dtype: Optional[str] = None,
                    force_download: bool = False) -> SAE:
    """Fetch an SAELens-format SAE from the hub (see the module docstring for the GPT-2 caveat)."""
    info = release_info(release)
    saes = info["saes"]
    if saes and sae_id not in saes:
        import difflib

        close = difflib.get_close_matches(sae_id, list(saes), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else f" Valid ids start: {', '.join(list(saes)[:5])}."
        raise SAEHubError(f"release {release!r} has no SAE {sae_id!r}.{hint}")
    if info.get("conversion_func"):
        raise SAEHubError(f"release {release!r} is stored in a non-SAELens format ({info['conversion_func']}); "
                          "tdb_lens reads SAELens folders only")
    folder = saes.get(sae_id, sae_id)
    cfg_path = _download(info["repo_id"], f"{folder}/{CFG_FILENAME}", force_download)
    _download(info["repo_id"], f"{folder}/{WEIGHTS_FILENAME}", force_download)
    local = Path(cfg_path).parent
    factor = (info.get("norm_scaling_factor") or {}).get(sae_id)
    sae = _load_with_factor(local, device, dtype, factor)
    if info.get("model_from_pretrained_kwargs", {}).get("center_writing_weights"):
        sae.cfg.normalize_activations = "center"
    sae.cfg.metadata.update({"release": release, "sae_id": sae_id, "repo_id": info["repo_id"],
                             "model_from_pretrained_kwargs": info.get("model_from_pretrained_kwargs", {})})
    return sae


def _load_with_factor(folder: Path, device, dtype, factor: Optional[float]) -> SAE:
    """Load a folder, folding a release's norm scaling factor (``expected_average_only_in``) into the weights."""
    import json

    with open(folder / CFG_FILENAME, encoding="utf-8") as f:
        d = json.load(f)
    norm = d.get("normalize_activations")
    if norm is True or norm == "expected_average_only_in":
        if factor is None:
            raise SAEFormatError(f"{folder}: normalize_activations='expected_average_only_in' but the release lists "
                                 "no norm_scaling_factor")
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(folder / WEIGHTS_FILENAME, Path(tmp) / WEIGHTS_FILENAME)
            d["normalize_activations"] = "none"
            with open(Path(tmp) / CFG_FILENAME, "w", encoding="utf-8") as f:
                json.dump(d, f)
            sae = load_saelens(tmp, device, dtype)
        # the SAE was trained on x * factor: latents of x*factor = encoder with W_enc * factor;
        # its reconstruction divided by factor is the reconstruction of x.
        sae.W_enc.data *= factor
        sae.W_dec.data /= factor
        sae.b_dec.data /= factor
        return sae
    return load_saelens(folder, device, dtype)
