"""`load_sae` / `save_sae`: one entry point for every SAE format tdb_lens reads and writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import SAEFormatError
from .sae import SAE


def load_sae(source: Union[str, os.PathLike], sae_id: Optional[str] = None, device: str = "cpu",
             dtype: Optional[str] = None, k: Optional[int] = None, hook_name: Optional[str] = None) -> SAE:
    """Load an SAE from

    - an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), e.g. one `save_sae` or tdb_lens's
      trainer wrote;
    - an OpenAI sparse_autoencoder / Transformer Debugger ``.pt`` state dict (``k`` for TopK files that
      do not record it; ``hook_name`` to record where it belongs);
    - a hub release and id: ``load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")``.
    """
    if sae_id is not None:
        from .hub import from_pretrained

        return from_pretrained(str(source), sae_id, device=device, dtype=dtype)
    p = Path(source)
    if p.is_dir():
        from .saelens_format import load_saelens

        sae = load_saelens(p, device=device, dtype=dtype)
    elif p.is_file() and p.suffix in (".pt", ".pth", ".bin"):
        from .openai_format import load_openai

        sae = load_openai(p, k=k, hook_name=hook_name, device=device)
    elif p.is_file() and p.name.endswith(".safetensors") and (p.parent / "cfg.json").is_file():
        from .saelens_format import load_saelens

        sae = load_saelens(p.parent, device=device, dtype=dtype)
    elif not p.exists():
        raise SAEFormatError(f"{p}: no such file or folder (for a hub release pass sae_id too)")
    else:
        raise SAEFormatError(f"{p}: not an SAE: expected an SAELens folder (cfg.json + sae_weights.safetensors) "
                             "or an OpenAI .pt state dict")
    if hook_name is not None:
        sae.cfg.hook_name = hook_name
    return sae


def save_sae(sae: SAE, path: Union[str, os.PathLike], format: str = "saelens") -> Path:
    """Write ``sae`` as an SAELens folder (``format="saelens"``) or an OpenAI ``.pt`` (``"openai"``)."""
    if format == "saelens":
        from .saelens_format import save_saelens

        return save_saelens(sae, path)
    if format == "openai":
        from .openai_format import save_openai

        return save_openai(sae, path)
    raise ValueError(f"format must be 'saelens' or 'openai', got {format!r}")
