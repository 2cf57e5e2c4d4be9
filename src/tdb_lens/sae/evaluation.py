"""Evaluating an SAE: sparsity, reconstruction, and what splicing it does to the model.

- ``l0``: mean number of latents firing per token;
- ``fvu``: fraction of variance unexplained, ``Σ||x - x̂||² / Σ||x - mean(x)||²`` (``variance_explained = 1 - fvu``);
- ``ce_loss_recovered``: ``(CE_zero - CE_sae) / (CE_zero - CE_clean)`` where ``CE_sae`` is the model's
  next-token loss with the reconstruction spliced in (no error term) and ``CE_zero`` with the
  activation zeroed: 1 means the SAE loses nothing, 0 means it is as bad as deleting the activation;
- ``kl_div``: mean over tokens of KL(clean model || model with the SAE spliced in);
- ``dead_fraction``: latents that never fired on the evaluation tokens;
- ``latent_density``: per-latent firing frequency (plotted by `plot_latent_density`).

The first ``skip_positions`` positions of each row are left as they are (not reconstructed, not
ablated, not counted in l0/fvu), matching what the SAE was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from .attach import saes
from .sae import SAE


class _Sums:
    """Running sums for l0, fvu and density over many batches."""

    def __init__(self, d_sae: int, device) -> None:
        self.n = 0
        self.err = 0.0
        self.sum_x: Optional[torch.Tensor] = None
        self.sum_x2 = 0.0
        self.l0 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, recons: torch.Tensor, acts: torch.Tensor) -> None:
        x, recons = x.double().reshape(-1, x.shape[-1]), recons.double().reshape(-1, x.shape[-1])
        fired = acts.reshape(-1, acts.shape[-1]) > 0
        self.n += len(x)
        self.err += float((x - recons).pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.l0 += float(fired.sum())
        self.fires += fired.sum(0).double()

    def result(self) -> dict[str, Any]:
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n  # type: ignore[union-attr]
        fvu = self.err / total_var if total_var > 0 else float("nan")
        density = (self.fires / self.n).float().cpu()
        return {"n_tokens": self.n, "l0": self.l0 / self.n, "fvu": fvu, "variance_explained": 1.0 - fvu,
                "mse": self.err / self.n, "dead_fraction": float((density == 0).float().mean()),
                "latent_density": density}


@torch.no_grad()
def reconstruction_metrics(sae: SAE, activations: Float[torch.Tensor, "n d_in"], batch_size: int = 4096) -> dict[str, Any]:
    """l0, fvu, variance explained, mse, dead fraction and density on a tensor of activations."""
    sums = _Sums(sae.cfg.d_sae, "cpu")
    for i in range(0, len(activations), batch_size):
        x = activations[i: i + batch_size].to(device=sae.device, dtype=sae.dtype)
        acts, recons = sae.encode_decode(x)
        sums.add(x.cpu(), recons.cpu(), acts.cpu())
    return sums.result()


def _run_with_sae(model: Any, sae: SAE, hook_name: str, rows: Int[torch.Tensor, "batch pos"],
                  skip_positions: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits with ``sae`` spliced in at ``hook_name`` (no error term; the first ``skip_positions``
    positions keep the model's own activation) and the SAE's input, reconstruction and latents."""
    seen: dict[str, torch.Tensor] = {}

    def keep(site: str) -> Callable[..., None]:
        def fn(x: torch.Tensor, hook: Any) -> None:
            seen[site] = x
        return fn

    def keep_leading(out: torch.Tensor, hook: Any) -> torch.Tensor:
        out = out.clone()
        out[:, :skip_positions] = seen["sae_input"][:, :skip_positions].to(out.dtype)
        return out

    with saes(model, {hook_name: sae}, use_error_term=False):
        hooks: list[tuple[str, Callable[..., Any]]] = [(model.hook_name(site, host=hook_name), keep(site))
                 for site in ("sae_input", "sae_acts_post", "sae_recons")]
        hooks.append((model.hook_name("sae_output", host=hook_name), keep_leading))
        logits = model.run_with_hooks(rows, fwd_hooks=hooks)
    return logits, seen


@torch.no_grad()
def evaluate_sae(
    model: Any,
    sae: SAE,
    tokens: Int[torch.Tensor, "n_seq ctx"],
    hook_name: Optional[str] = None,
    batch_size: int = 8,
    skip_positions: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """All the metrics in the module docstring, over ``tokens`` (rows of equal length, no padding)."""
    hook_name = hook_name or sae.hook_name
    if not hook_name:
        raise ValueError("pass hook_name: the SAE records none")
    if sae.__dict__["_host"] is not None:
        raise ValueError(f"detach the SAE (attached at {sae.hook_name!r}) before evaluating it")
    sums = _Sums(sae.cfg.d_sae, "cpu")
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_total, n_pred = 0.0, 0

    def zero(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        x[:, skip_positions:] = 0.0
        return x

    for i in tqdm(range(0, len(tokens), batch_size), desc="evaluating SAE", disable=not progress):
        rows = tokens[i: i + batch_size].to(model.device)
        clean_logits = model(rows)
        ce_clean = model.loss_fn(clean_logits, rows, per_token=True)
        sae_logits, seen = _run_with_sae(model, sae, hook_name, rows, skip_positions)
        zero_logits = model.run_with_hooks(rows, fwd_hooks=[(hook_name, zero)])
        ce["clean"] += float(ce_clean.sum())
        ce["sae"] += float(model.loss_fn(sae_logits, rows, per_token=True).sum())
        ce["zero"] += float(model.loss_fn(zero_logits, rows, per_token=True).sum())
        n_pred += ce_clean.numel()
        lp_clean = F.log_softmax(clean_logits.float(), -1)
        lp_sae = F.log_softmax(sae_logits.float(), -1)
        kl_total += float((lp_clean.exp() * (lp_clean - lp_sae)).sum())
        sums.add(*(seen[k][:, skip_positions:].cpu() for k in ("sae_input", "sae_recons", "sae_acts_post")))
    out = sums.result()
    n_tok_logits = len(tokens) * tokens.shape[1]
    ce_clean, ce_sae, ce_zero = (ce[k] / n_pred for k in ("clean", "sae", "zero"))
    denom = ce_zero - ce_clean
    out.update({
        "ce_loss_clean": ce_clean, "ce_loss_with_sae": ce_sae, "ce_loss_zero_ablation": ce_zero,
        "ce_loss_recovered": (ce_zero - ce_sae) / denom if abs(denom) > 1e-12 else float("nan"),
        "ce_loss_increase": ce_sae - ce_clean, "kl_div": kl_total / n_tok_logits,
        "hook_name": hook_name, "skip_positions": skip_positions,
    })
    return out


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without the per-latent density (JSON-friendly)."""
    return {k: (float(v) if isinstance(v, (float, int)) and not isinstance(v, bool) else v)
            for k, v in metrics.items() if k != "latent_density"}


def plot_latent_density(density: Float[torch.Tensor, " d_sae"], path: str | os.PathLike,
                        title: str = "SAE latent density") -> Path:
    """Histogram of log10 firing frequency per latent (dead latents in their own bar), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = density.detach().float().cpu()
    alive = d[d > 0]
    n_dead = int((d == 0).sum())
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(alive):
        logs = alive.log10().numpy()
        ax.hist(logs, bins=50, color="tab:blue", label=f"alive ({len(alive)})")
        left = float(logs.min()) - 0.5
    else:
        left = -6.0
    if n_dead:
        ax.bar([left], [n_dead], width=0.25, color="tab:red", label=f"dead ({n_dead})")
    ax.set_xlabel("log10(firing frequency)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
