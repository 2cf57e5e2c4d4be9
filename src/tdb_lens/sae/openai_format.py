"""OpenAI's ``sparse_autoencoder`` / Transformer Debugger state dicts (``.pt``), read and written.

OpenAI's ``Autoencoder`` computes ``latents = act(encoder(x - pre_bias) + latent_bias)`` and
``recons = decoder(latents) + pre_bias``; with the TopK activation (the v5 release) the input is
first layer-normalised (centred, divided by its standard deviation) and the reconstruction is
mapped back. Transformer Debugger's ReLU autoencoders are the same class with ``activation`` ReLU
and no normalisation. The mapping to SAELens names:

    W_enc = encoder.weight.T   b_enc = latent_bias   W_dec = decoder.weight.T   b_dec = pre_bias

Files are read with ``torch.load(..., weights_only=True)``: tensors, strings and numbers only; a
file that needs to unpickle code is refused.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .architectures import StandardSAE, TopKSAE
from .config import SAEConfig
from .errors import SAEFormatError, require_finite
from .sae import SAE
from .saelens_format import sae_from_tensors

# OpenAI's activation name <-> our class, with the input normalisation OpenAI's Autoencoder applies
# for it (it layer-normalises exactly when the activation is TopK)
_OPENAI_CLASSES: dict[str, tuple[type[SAE], str]] = {"ReLU": (StandardSAE, "none"), "TopK": (TopKSAE, "layer_norm")}
_OPENAI_NAMES = {cls: (name, norm) for name, (cls, norm) in _OPENAI_CLASSES.items()}

_KNOWN = {"encoder.weight", "encoder.bias", "latent_bias", "pre_bias", "decoder.weight", "decoder.linear.weight",
          "decoder.linear.bias", "stats_last_nonzero", "latents_activation_frequency", "latents_mean_square",
          "activation", "activation_state_dict"}


def _refusal(p: Path, message: str) -> str:
    """Why torch's weights-only loader refused ``p``, in one line."""
    detail = next((ln.strip() for ln in message.splitlines() if "Unsupported global" in ln), "")
    if zipfile.is_zipfile(p):
        kind = "a torch.save archive"
    else:
        with open(p, "rb") as f:
            head = f.read(2)
        if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:  # pickle protocols 2-5 start so
            return f"{p}: not a readable torch state dict (neither a torch.save zip archive nor a pickle)"
        kind = "a legacy (non-zip) pickle"
    what = f" ({detail})" if detail else " (it uses pickle operations beyond tensors, strings and numbers)"
    return (f"{p}: refused: {kind} that needs to unpickle more than tensors, strings and numbers{what}; "
            "tdb_lens never unpickles code. Convert it to safetensors (or a state dict of plain tensors) "
            "where you trust the file")


def read_state_dict(path: Union[str, os.PathLike], map_location: str = "cpu") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SAEFormatError(f"{p}: no such file")
    try:
        sd = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SAEFormatError(_refusal(p, str(e))) from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFormatError(f"{p}: not a readable torch state dict ({why})") from None
    if not isinstance(sd, Mapping):
        raise SAEFormatError(f"{p}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    return dict(sd)


def config_from_openai(sd: Mapping[str, Any], where: str = "state dict", k: Optional[int] = None,
                       hook_name: Optional[str] = None) -> SAEConfig:
    if "encoder.weight" not in sd:
        found = ", ".join(sorted(map(str, sd))[:8])
        raise SAEFormatError(f"{where}: no 'encoder.weight'; not an OpenAI sparse_autoencoder state dict (keys: {found})")
    W = sd["encoder.weight"]
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise SAEFormatError(f"{where}: 'encoder.weight' must be a 2-D tensor [n_latents, n_inputs]")
    n_latents, d = W.shape
    activation = sd.get("activation", "ReLU")
    if not isinstance(activation, str) or activation not in _OPENAI_CLASSES:
        raise SAEFormatError(f"{where}: activation {activation!r} is not supported ({' or '.join(_OPENAI_CLASSES)})")
    cls, norm = _OPENAI_CLASSES[activation]
    if cls.takes_k:
        act_sd = sd.get("activation_state_dict") or {}
        post = act_sd.get("postact_fn", "ReLU")
        if post != "ReLU":
            raise SAEFormatError(f"{where}: {activation} with post-activation {post!r}; only ReLU is supported")
        k = int(act_sd.get("k", k) or 0) or k
        if not k:
            raise SAEFormatError(f"{where}: {activation} activation without k; pass k=...")
    return SAEConfig(d_in=int(d), d_sae=int(n_latents), architecture=cls.architecture, k=k if cls.takes_k else None,
                     normalize_activations=norm, hook_name=hook_name, metadata={"source_format": "openai"})


def sae_from_openai(sd: Mapping[str, Any], where: str = "state dict", k: Optional[int] = None,
                    hook_name: Optional[str] = None, device: str | torch.device | None = None) -> SAE:
    """An SAE from an OpenAI ``Autoencoder`` state dict (already loaded)."""
    cfg = config_from_openai(sd, where, k, hook_name)
    unknown = sorted(set(map(str, sd)) - _KNOWN)
    if unknown:
        raise SAEFormatError(f"{where}: unexpected keys {unknown}; expected OpenAI Autoencoder keys")
    for name in ("latent_bias", "pre_bias"):
        if name not in sd:
            raise SAEFormatError(f"{where}: missing {name!r}")
    require_finite(sd, where)
    enc = sd["encoder.weight"].float()
    if "decoder.weight" in sd:
        W_dec = sd["decoder.weight"].float().T  # decoder is Linear(n_latents, n_inputs): weight [n_inputs, n_latents]
    elif "decoder.linear.weight" in sd:  # tied: decoder(x) = x @ encoder.weight
        W_dec = sd["decoder.linear.weight"].float()
    else:
        raise SAEFormatError(f"{where}: missing 'decoder.weight'")
    b_enc = sd["latent_bias"].float()
    if "encoder.bias" in sd and isinstance(sd["encoder.bias"], torch.Tensor):
        b_enc = b_enc + sd["encoder.bias"].float()  # an encoder Linear with a bias adds it to latent_bias
    tensors = {"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec.contiguous(), "b_dec": sd["pre_bias"].float()}
    sae = sae_from_tensors(cfg, tensors, where, device)
    if "stats_last_nonzero" in sd and isinstance(sd["stats_last_nonzero"], torch.Tensor):
        sae.cfg.metadata["stats_last_nonzero_max"] = int(sd["stats_last_nonzero"].max())
    return sae


def load_openai(path: Union[str, os.PathLike], k: Optional[int] = None, hook_name: Optional[str] = None,
                device: str | torch.device | None = None) -> SAE:
    """Load an OpenAI sparse_autoencoder / Transformer Debugger ``.pt`` state dict."""
    return sae_from_openai(read_state_dict(path), str(path), k, hook_name, device)


def openai_state_dict(sae: SAE) -> dict[str, Any]:
    """``sae`` as an OpenAI ``Autoencoder`` state dict (ReLU, or TopK with layer-norm inputs)."""
    c = sae.cfg
    name, norm = _OPENAI_NAMES.get(type(sae), (None, None))
    if not (c.apply_b_dec_to_input and name is not None and c.normalize_activations == norm
            and not c.rescale_acts_by_decoder_norm):
        raise SAEFormatError(
            "OpenAI's Autoencoder holds ReLU SAEs without input normalisation or TopK SAEs with layer-norm "
            f"inputs, both with the decoder bias subtracted first; this SAE is {c.architecture} with "
            f"normalize_activations={c.normalize_activations!r}, apply_b_dec_to_input={c.apply_b_dec_to_input}"
        )
    sd: dict[str, Any] = {
        "pre_bias": sae.b_dec.detach().float().cpu().clone(),
        "encoder.weight": sae.W_enc.detach().float().cpu().T.contiguous(),
        "latent_bias": sae.b_enc.detach().float().cpu().clone(),
        "decoder.weight": sae.W_dec.detach().float().cpu().T.contiguous(),
        "stats_last_nonzero": torch.zeros(c.d_sae, dtype=torch.long),
        "activation": name,
    }
    sd["activation_state_dict"] = {"k": c.k, "postact_fn": "ReLU"} if sae.takes_k else {}
    return sd


def save_openai(sae: SAE, path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    sd = openai_state_dict(sae)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    torch.save(sd, tmp)
    os.replace(tmp, p)
    return p
