"""The SAE architectures: `StandardSAE` (ReLU), `TopKSAE`, `JumpReLUSAE`.

Each class owns its activation, how it decodes, what its config must hold, its extra parameters
and the parts of a training step that differ between architectures (the sparsity penalty or
auxiliary loss, and how dead latents are handled). `architecture_class` maps the name stored in
``SAEConfig.architecture`` to its class; it is the only place that name is looked at.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from .config import SAEConfig, TrainConfig
from .sae import SAE, StepContext, TrainForward


class StandardSAE(SAE):
    """ReLU latents with a pre-encoder bias (OpenAI's / Transformer Debugger's autoencoders, SAELens
    "standard"). Trained with an L1 penalty on decoder-norm-weighted latents; dead latents are
    re-initialised towards badly reconstructed inputs (`reinit_latents`)."""

    architecture = "standard"
    resamples_dead_latents = True

    def activation(self, pre: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_sae"]:
        return F.relu(pre)

    def train_penalty(self, fwd: TrainForward, err: Float[torch.Tensor, "batch d_in"],
                      ctx: StepContext) -> tuple[Float[torch.Tensor, ""], dict[str, float]]:
        coef = ctx.cfg.l1_coefficient
        if ctx.cfg.l1_warmup_steps and ctx.step < ctx.cfg.l1_warmup_steps:
            coef *= (ctx.step + 1) / ctx.cfg.l1_warmup_steps
        assert fwd.latents is not None  # the dense training forward
        l1 = (fwd.latents * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return coef * l1, {"l1": float(l1.detach())}

    @torch.no_grad()
    def reinit_latents(self, idx: Int[torch.Tensor, " n"], x_norm: Float[torch.Tensor, "batch d_in"],
                       generator: torch.Generator) -> bool:
        """Point each latent in ``idx`` at an input sampled with probability proportional to its
        squared reconstruction error (to the fourth power of the error norm), encoder rows at 0.2
        of the mean live encoder norm, encoder bias 0."""
        err = (x_norm - self.decode_normalized(self.activation(self.pre_acts(x_norm)))).pow(2).sum(-1)
        if float(err.sum()) <= 0:
            return False
        probs = (err ** 2).float().cpu()
        pick = torch.multinomial(probs / probs.sum(), len(idx), replacement=True, generator=generator)
        v = x_norm[pick.to(x_norm.device)] - self.b_dec
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=x_norm.device)
        alive[idx] = False
        enc_norm = self.W_enc.norm(dim=0)[alive].mean() if alive.any() else torch.tensor(1.0, device=x_norm.device)
        self.W_dec.data[idx] = v
        self.W_enc.data[:, idx] = (v * enc_norm * 0.2).T
        self.b_enc.data[idx] = 0.0
        return True


class TopKSAE(SAE):
    """Keep the ``k`` largest pre-activations (ReLU'd), zero the rest. Decodes by reading only the
    ``k`` active decoder rows when nobody hooks the dense latents. Trained with OpenAI's AuxK loss:
    the ``aux_k`` dead latents with the largest pre-activations reconstruct the residual error."""

    architecture = "topk"
    takes_k = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if not isinstance(cfg.k, int) or isinstance(cfg.k, bool) or not 0 < cfg.k <= cfg.d_sae:
            raise ValueError(f"a topk SAE needs 0 < k <= d_sae ({cfg.d_sae}), got k={cfg.k!r}")

    @classmethod
    def config_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}

    @property
    def k(self) -> int:
        assert self.cfg.k is not None  # check_config
        return self.cfg.k

    def activation(self, pre: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_sae"]:
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))

    def decode_rows(self, idx: Int[torch.Tensor, "... n"],
                    weights: Float[torch.Tensor, "... n"]) -> Float[torch.Tensor, "... d_in"]:
        """``Σ_j weights[..., j] W_dec[idx[..., j]]`` (no bias), reading only those decoder rows."""
        n = idx.shape[-1]
        dec = F.embedding_bag(idx.reshape(-1, n), self.W_dec, per_sample_weights=weights.reshape(-1, n), mode="sum")
        return dec.reshape(*idx.shape[:-1], self.cfg.d_in)

    def _sparse(self) -> bool:
        return not self.cfg.rescale_acts_by_decoder_norm

    def decode_pre(self, pre: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        if not self._sparse():
            return super().decode_pre(pre)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return self.decode_rows(idx, F.relu(vals)) + self.b_dec

    def _sparse_decode_ok(self) -> bool:
        hp = self.hook_sae_acts_post
        return self._sparse() and not hp._fwd and not hp._bwd

    def train_forward(self, x_norm: Float[torch.Tensor, "batch d_in"], ctx: StepContext) -> TrainForward:
        if not self._sparse():
            return super().train_forward(x_norm, ctx)
        # decode only the k active rows: the decoder's forward and backward cost k/d_sae of a dense pass
        pre = self.pre_acts(x_norm)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        vals = torch.relu(vals)
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_norm.device)
        fired[idx[vals > 0]] = True
        return TrainForward(self.decode_rows(idx, vals) + self.b_dec, pre, None, fired,
                            (vals > 0).float().sum(-1).mean())

    def train_penalty(self, fwd: TrainForward, err: Float[torch.Tensor, "batch d_in"],
                      ctx: StepContext) -> tuple[Float[torch.Tensor, ""], dict[str, float]]:
        """AuxK: ``mean_b ||e_b - ê_b||²`` with ``e`` the (detached) residual error and ``ê`` decoded
        (no bias) from the ``aux_k`` largest pre-activations among dead latents."""
        n_dead = int(ctx.dead.sum())
        aux = torch.zeros((), device=err.device)
        if n_dead:
            k_aux = min(ctx.cfg.aux_k or self.cfg.d_in // 2, n_dead)
            masked = fwd.pre.masked_fill(~ctx.dead, float("-inf"))
            a_vals, a_idx = masked.topk(k_aux, dim=-1, sorted=False)
            a_vals = torch.relu(a_vals)
            if not self._sparse():
                a_vals = a_vals / self.W_dec.norm(dim=-1)[a_idx]
            aux = (err.detach() - self.decode_rows(a_idx, a_vals)).pow(2).sum(-1).mean()
            aux = torch.nan_to_num(aux, nan=0.0)
        return ctx.cfg.aux_coefficient * aux, {"aux": float(aux.detach())}


def _window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``K((pre - threshold) / ε) / ε`` with the rectangle kernel ``K(u) = 1{|u| < 1/2}``."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """``relu(pre) * 1{pre > θ}``; the gradient to ``θ`` is the straight-through estimate
    ``-θ K((pre - θ)/ε)/ε`` (Rajamanoharan et al. 2024, "Jumping Ahead")."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return F.relu(pre) * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * ((pre > threshold) & (pre > 0)).to(grad.dtype)
        grad_th = -(threshold * _window(pre, threshold, ctx.bandwidth) * grad).reshape(-1, pre.shape[-1]).sum(0)
        return grad_pre, grad_th, None


class _Step(torch.autograd.Function):
    """``1{pre > θ}`` (what L0 counts); no gradient to ``pre``, ``-K((pre - θ)/ε)/ε`` to ``θ``."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        grad_th = -(_window(pre, threshold, ctx.bandwidth) * grad).reshape(-1, pre.shape[-1]).sum(0)
        return None, grad_th, None


class JumpReLUSAE(SAE):
    """ReLU latents kept only above a learned per-latent ``threshold`` (Gemma Scope's SAEs). Trained
    with an L0 penalty; the threshold learns through straight-through gradients (`_JumpReLU`,
    `_Step`) over a window of width ``jumprelu_bandwidth``."""

    architecture = "jumprelu"
    param_names = SAE.param_names + ("threshold",)

    def _init_extra_params(self, dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.threshold = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=dtype, device=device))

    def activation(self, pre: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_sae"]:
        return F.relu(pre) * (pre > self.threshold).to(pre.dtype)

    @torch.no_grad()
    def init_for_training(self, cfg: TrainConfig) -> None:
        self.threshold.fill_(cfg.jumprelu_init_threshold)

    def train_forward(self, x_norm: Float[torch.Tensor, "batch d_in"], ctx: StepContext) -> TrainForward:
        pre = self.pre_acts(x_norm)
        acts = _JumpReLU.apply(pre, self.threshold, ctx.cfg.jumprelu_bandwidth)
        return TrainForward(self.decode_normalized(acts), pre, acts, (acts > 0).any(0),
                            (acts > 0).float().sum(-1).mean())

    def train_penalty(self, fwd: TrainForward, err: Float[torch.Tensor, "batch d_in"],
                      ctx: StepContext) -> tuple[Float[torch.Tensor, ""], dict[str, float]]:
        """``l0_coefficient * mean_b Σ_i 1{pre_i > θ_i}``, differentiable in θ only."""
        l0 = _Step.apply(fwd.pre, self.threshold, ctx.cfg.jumprelu_bandwidth).sum(-1).mean()
        return ctx.cfg.l0_coefficient * l0, {"l0_penalty": float(l0.detach())}

    @torch.no_grad()
    def fold_input_scale(self, c: float) -> None:
        super().fold_input_scale(c)
        self.threshold.data /= c


#: ``SAEConfig.architecture`` -> class
ARCHITECTURES: dict[str, type[SAE]] = {cls.architecture: cls for cls in (StandardSAE, TopKSAE, JumpReLUSAE)}


def architecture_class(name: str) -> type[SAE]:
    """The class of the architecture ``name`` (``"standard"``, ``"topk"``, ``"jumprelu"``)."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"architecture must be one of {tuple(ARCHITECTURES)}, got {name!r}") from None


def trainable_architectures() -> list[str]:
    """Names of the architectures `training.SAETrainer` trains."""
    return [name for name, cls in ARCHITECTURES.items() if cls.trainable]
