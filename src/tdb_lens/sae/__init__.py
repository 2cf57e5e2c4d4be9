"""Sparse autoencoders: modules, attaching to models, file formats, training and evaluation.

>>> from tdb_lens.sae import SAE, SAEConfig, add_sae
>>> sae = SAE(SAEConfig(d_in=576, d_sae=4608, architecture="topk", k=32))   # a TopKSAE
>>> add_sae(model, sae, "blocks.15.hook_resid_post")          # or model.add_sae(sae, ...)
>>> _, cache = model.run_with_cache(tokens)
>>> cache["blocks.15.hook_resid_post.hook_sae_acts_post"]      # the latents
"""

from .architectures import JumpReLUSAE, StandardSAE, TopKSAE
from .attach import SAEHostMixin, add_sae, attached_saes, remove_sae, reset_saes, saes
from .config import SAEConfig, TrainConfig
from .sae import SAE

__all__ = [
    "SAE", "JumpReLUSAE", "SAEConfig", "SAEHostMixin", "StandardSAE", "TopKSAE", "TrainConfig", "add_sae",
    "attached_saes", "remove_sae", "reset_saes", "saes", "load_sae", "save_sae", "from_pretrained",
]


def __getattr__(name: str):
    # formats pull in safetensors / huggingface_hub; load them on first use
    if name in ("load_sae", "save_sae"):
        from . import loading

        return getattr(loading, name)
    if name == "from_pretrained":
        from .hub import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'tdb_lens.sae' has no attribute {name!r}")
