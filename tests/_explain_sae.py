"""A small, quickly trained SAE on SmolLM2 for the explanation tests and the end-to-end run.

TopK (k=16), 4x expansion (576 -> 2304 latents) on ``blocks.{layer}.hook_resid_post``, trained with
`tdb_lens.sae.train_sae` on the residual activations of a few hundred fortune windows (position 0
left out: its norm is an outlier). It is far from a good SAE; it has real, sparse latents to explain.
"""

from __future__ import annotations

import torch

from tdb_lens.explain.harvest import capture
from tdb_lens.sae import SAE, SAEConfig, TrainConfig
from tdb_lens.sae.activation_store import CachedActivations
from tdb_lens.sae.training import train_sae


def quick_sae(model, corpus, layer: int = 3, d_sae: int = 2304, k: int = 16, epochs: int = 4,
              batch_size: int = 256, seed: int = 0) -> SAE:
    hook = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        acts = torch.cat([capture(model, corpus.tokens[s:s + 32], hook)[:, 1:].reshape(-1, model.cfg.d_model)
                          for s in range(0, corpus.n_windows, 32)]).float()
    data = CachedActivations(acts, batch_size=batch_size, seed=seed)
    cfg = SAEConfig(d_in=model.cfg.d_model, d_sae=d_sae, architecture="topk", k=k, hook_name=hook)
    train = TrainConfig(total_activations=epochs * len(acts), batch_size=batch_size, lr=1e-3, seed=seed,
                        dead_after=len(acts), log_every=10_000)
    return train_sae(data, cfg, train, progress=False)
