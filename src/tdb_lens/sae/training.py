"""Training SAEs: TopK with AuxK, ReLU + L1 with dead-latent resampling, or JumpReLU + L0 with
straight-through threshold gradients; Adam; unit-norm decoder rows; atomic checkpoints and resume.

Loss per batch (``x`` already scaled so that ``E||x|| = sqrt(d_in)`` when ``normalize_scale``):

- reconstruction: ``mean_b ||x_b - x̂_b||²`` (in the SAE's normalised space);
- TopK: ``+ aux_coefficient * mean_b ||e_b - ê_b||²`` where ``e = x - x̂`` (no gradient) and ``ê``
  is decoded (no bias) from the ``aux_k`` largest pre-activations among dead latents (OpenAI's AuxK);
- standard: ``+ l1 * mean_b Σ_i |f_i| ||W_dec[i]||`` and, every ``resample_every`` steps, dead
  latents are re-initialised towards inputs with large reconstruction error (sampled with
  probability proportional to the squared error), with their Adam moments reset;
- JumpReLU: ``+ l0_coefficient * mean_b Σ_i 1{pre_bi > θ_i}``, differentiable in ``θ`` through the
  straight-through estimator (the architecture's class computes each of these terms).

After each step decoder rows are renormalised to unit norm (the gradient component along each row
is removed first). At the end the input scale is folded into the weights, so the saved SAE takes the
model's activations as they are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Bool, Float
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .architectures import trainable_architectures
from .config import SAEConfig, TrainConfig
from .sae import SAE, StepContext

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def _geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp(min=1e-6)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < 1e-6 * (m.norm() + 1e-12):
            return new
        m = new
    return m


class SAETrainer:
    """Train ``sae`` on ``activations`` (an iterator of ``[batch, d_in]`` tensors; an `ActivationStore`
    or anything with ``state_dict``/``load_state_dict`` also resumes where it stopped).

    ``out_dir``: checkpoints go to ``out_dir/checkpoints`` and the final SAE (SAELens folder) to
    ``out_dir``. With ``resume`` an existing checkpoint there is picked up.
    """

    def __init__(self, sae: SAE, cfg: TrainConfig, activations: Iterator[Float[torch.Tensor, "batch d_in"]],
                 out_dir: Optional[str | os.PathLike] = None, resume: bool = True, progress: bool = True,
                 on_log: Optional[Callable[[dict], None]] = None) -> None:
        if not sae.trainable:
            raise ValueError(f"training supports {' and '.join(trainable_architectures())} SAEs; "
                             f"{sae.architecture} SAEs ({type(sae).__name__}) can be loaded and run only")
        self.sae, self.cfg, self.activations = sae, cfg, activations
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.on_log = progress, on_log
        self.device = torch.device(cfg.device)
        self.sae.to(self.device)
        self.n_steps = max(1, cfg.total_activations // cfg.batch_size)
        self.step = 0
        self.scale = 1.0
        self.history: list[dict[str, Any]] = []
        d_sae = sae.cfg.d_sae
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)  # activations since last firing
        self.fired_since_resample = torch.zeros(d_sae, dtype=torch.bool, device=self.device)
        self.optim = torch.optim.Adam(self._params(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        self.initialized = False
        self._pending: Optional[torch.Tensor] = None  # the first batch, read by _initialize
        if resume and self.out_dir is not None and (self.out_dir / CHECKPOINTS / LATEST).is_file():
            self.load_checkpoint()

    def _params(self) -> list[torch.nn.Parameter]:
        return [getattr(self.sae, n) for n in self.sae.param_names]

    # ---- data -------------------------------------------------------------------------------
    def _next(self) -> torch.Tensor:
        x = next(self.activations)
        if x.ndim != 2 or x.shape[1] != self.sae.cfg.d_in:
            raise ValueError(f"activation batches must be [batch, d_in={self.sae.cfg.d_in}], got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=self.sae.dtype) * self.scale

    @torch.no_grad()
    def _initialize(self) -> None:
        """Input scale from the first batch, b_dec at its mean / geometric median, W_enc = W_dec^T."""
        cfg, sae = self.cfg, self.sae
        first = next(self.activations).to(device=self.device, dtype=sae.dtype)
        self._pending = first
        if cfg.normalize_scale and sae.cfg.normalize_activations in ("none", "center"):
            xn = sae.normalize(first)[0]
            self.scale = float(math.sqrt(sae.cfg.d_in) / xn.norm(dim=-1).mean().clamp(min=1e-12))
        xn = sae.normalize(first * self.scale)[0]
        sae.set_decoder_norm_to_unit_norm()
        if cfg.init_b_dec == "mean":
            sae.b_dec.data.copy_(xn.mean(0))
        elif cfg.init_b_dec == "median":
            sae.b_dec.data.copy_(_geometric_median(xn.float()).to(sae.dtype))
        elif cfg.init_b_dec != "zeros":
            raise ValueError(f"init_b_dec must be 'mean', 'median' or 'zeros', got {cfg.init_b_dec!r}")
        sae.W_enc.data.copy_(sae.W_dec.data.T)
        sae.b_enc.data.zero_()
        sae.init_for_training(cfg)
        self.initialized = True

    # ---- one step ---------------------------------------------------------------------------
    def _lr(self) -> float:
        cfg, s = self.cfg, self.step
        lr = cfg.lr
        if cfg.warmup_steps and s < cfg.warmup_steps:
            lr *= (s + 1) / cfg.warmup_steps
        decay_start = int(self.n_steps * (1 - cfg.lr_decay_fraction))
        if cfg.lr_decay_fraction > 0 and s >= decay_start:
            lr *= max(0.0, (self.n_steps - s) / max(1, self.n_steps - decay_start))
        return lr

    def dead_mask(self) -> Bool[torch.Tensor, " d_sae"]:
        """Latents that have not fired for ``dead_after`` training activations."""
        return self.since_fired >= self.cfg.dead_after

    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """(loss, stats, which latents fired in this batch): reconstruction error plus the
        architecture's own penalty (`SAE.train_penalty`)."""
        sae = self.sae
        xn, _ = sae.normalize(x)
        ctx = StepContext(self.cfg, self.step, self.dead_mask())
        fwd = sae.train_forward(xn, ctx)
        err = xn - fwd.recons
        mse = err.pow(2).sum(-1).mean()
        penalty, stats = sae.train_penalty(fwd, err, ctx)
        with torch.no_grad():
            total = (xn - xn.mean(0)).pow(2).sum()
            stats["mse"] = float(mse.detach())
            stats["fvu"] = float(err.detach().pow(2).sum() / total.clamp(min=1e-12))
            stats["l0"] = float(fwd.l0)
        return mse + penalty, stats, fwd.fired

    def train_step(self, x: Float[torch.Tensor, "batch d_in"]) -> dict[str, float]:
        """One optimiser step on a (scaled) batch; returns its stats."""
        sae = self.sae
        for group in self.optim.param_groups:
            group["lr"] = self._lr()
        loss, stats, fired = self._loss(x)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optim.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            self.since_fired += len(x)
            self.since_fired[fired] = 0
            self.fired_since_resample |= fired
        stats["loss"] = float(loss.detach())
        stats["dead_fraction"] = float(self.dead_mask().float().mean())
        self.step += 1
        return stats

    # ---- resampling (standard SAEs) ---------------------------------------------------------
    @torch.no_grad()
    def resample_dead(self, x: Float[torch.Tensor, "batch d_in"]) -> int:
        """Re-initialise latents that have not fired since the last resampling (or are dead), for
        architectures that resample (`SAE.reinit_latents`); their Adam moments start again at 0."""
        sae = self.sae
        if not sae.resamples_dead_latents:
            return 0
        dead = (~self.fired_since_resample) | self.dead_mask()
        idx = dead.nonzero().flatten()
        self.fired_since_resample.zero_()
        if len(idx) == 0:
            return 0
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 31 + self.step)
        if not sae.reinit_latents(idx, sae.normalize(x)[0], g):
            return 0
        for p, sel in ((sae.W_dec, (idx, slice(None))), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
            st = self.optim.state.get(p)
            if st:
                st["exp_avg"][sel] = 0.0
                st["exp_avg_sq"][sel] = 0.0
        self.since_fired[idx] = 0
        return len(idx)

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> SAE:
        cfg = self.cfg
        if not self.initialized:
            self._initialize()
        resample_until = cfg.resample_until if cfg.resample_until is not None else self.n_steps // 2
        bar = tqdm(total=self.n_steps, initial=self.step, desc="training SAE", unit="step", disable=not self.progress)
        t0, start_step = time.perf_counter(), self.step
        try:
            while self.step < self.n_steps:
                pending = self._pending
                if pending is not None:
                    x, self._pending = pending * self.scale, None
                else:
                    try:
                        x = self._next()
                    except StopIteration:
                        break
                stats = self.train_step(x)
                if (self.sae.resamples_dead_latents and cfg.resample_every
                        and self.step % cfg.resample_every == 0 and self.step <= resample_until):
                    stats["resampled"] = self.resample_dead(x)
                if self.step % cfg.log_every == 0 or self.step == self.n_steps:
                    stats["step"] = self.step
                    stats["activations"] = self.step * cfg.batch_size
                    stats["activations_per_s"] = (self.step - start_step) * cfg.batch_size / (time.perf_counter() - t0)
                    self.history.append(stats)
                    bar.set_postfix(fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}", dead=f"{stats['dead_fraction']:.3f}")
                    if self.on_log:
                        self.on_log(stats)
                bar.update(1)
                if cfg.checkpoint_every and self.out_dir is not None and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.finalize()

    def finalize(self) -> SAE:
        """The trained SAE working on unscaled activations (a copy; the trainer keeps its own)."""
        out = self.sae.clone()
        if self.scale != 1.0:
            out.fold_input_scale(self.scale)
        out.cfg.metadata.update({"trained_steps": self.step, "trained_activations": self.step * self.cfg.batch_size,
                                 "input_scale_folded": self.scale, "trainer": "tdb_lens"})
        if self.out_dir is not None:
            from .saelens_format import save_saelens

            save_saelens(out, self.out_dir)
            _atomic_json(self.out_dir / "training_log.json", {"train_config": self.cfg.to_dict(),
                                                              "history": self.history})
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` (weights, Adam moments and counters as safetensors, the rest as
        JSON) into a temporary folder, rename it into place, then point ``latest.json`` at it."""
        assert self.out_dir is not None
        root = self.out_dir / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        sae = self.sae
        tensors = {f"sae.{n}": getattr(sae, n).detach().cpu().contiguous() for n in sae.param_names}
        names = {id(getattr(sae, n)): n for n in sae.param_names}
        adam_steps = {}
        for p, st in self.optim.state.items():
            n = names[id(p)]
            tensors[f"adam.{n}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
            adam_steps[n] = float(st["step"])
        tensors["since_fired"] = self.since_fired.cpu()
        tensors["fired_since_resample"] = self.fired_since_resample.cpu().to(torch.uint8)
        save_file(tensors, str(tmp / "state.safetensors"))
        store_state = self.activations.state_dict() if hasattr(self.activations, "state_dict") else None
        meta = {"step": self.step, "scale": self.scale, "adam_steps": adam_steps, "sae_config": sae.cfg.to_dict(),
                "train_config": self.cfg.to_dict(), "data_state": store_state, "history": self.history}
        with open(tmp / "trainer.json", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_json(root / LATEST, {"checkpoint": final.name, "step": self.step})
        kept = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[: -max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Optional[Path] = None) -> None:
        assert self.out_dir is not None
        root = self.out_dir / CHECKPOINTS
        if path is None:
            with open(root / LATEST, encoding="utf-8") as f:
                path = root / json.load(f)["checkpoint"]
        with open(path / "trainer.json", encoding="utf-8") as f:
            meta = json.load(f)
        saved_cfg = SAEConfig.from_dict(meta["sae_config"])
        keys = ("architecture", "d_in", "d_sae", "k", "hook_name", "model_name", "model_digest")
        saved, ours = ({k: getattr(c, k, None) if k != "model_digest" else c.metadata.get(k) for k in keys}
                       for c in (saved_cfg, self.sae.cfg))
        if saved != ours:
            diff = ", ".join(f"{k}={saved[k]!r} (now {ours[k]!r})" for k in keys if saved[k] != ours[k])
            raise ValueError(f"checkpoint {path} is for a different SAE: {diff}; use another --out or resume=False")
        t = load_file(str(path / "state.safetensors"))
        sae = self.sae
        with torch.no_grad():
            for n in sae.param_names:
                getattr(sae, n).copy_(t[f"sae.{n}"].to(self.device))
        params = {n: getattr(sae, n) for n in sae.param_names}
        for n, step in meta["adam_steps"].items():
            p = params[n]
            self.optim.state[p] = {"step": torch.tensor(step), "exp_avg": t[f"adam.{n}.exp_avg"].to(self.device),
                                   "exp_avg_sq": t[f"adam.{n}.exp_avg_sq"].to(self.device)}
        self.since_fired = t["since_fired"].to(self.device)
        self.fired_since_resample = t["fired_since_resample"].to(self.device).bool()
        self.step, self.scale, self.history = int(meta["step"]), float(meta["scale"]), list(meta["history"])
        if meta.get("data_state") is not None and hasattr(self.activations, "load_state_dict"):
            self.activations.load_state_dict(meta["data_state"])
        self.initialized = True


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train_sae(activations: Iterator[Float[torch.Tensor, "batch d_in"]], sae_cfg: SAEConfig, train_cfg: TrainConfig,
              out_dir: Optional[str | os.PathLike] = None, resume: bool = True, progress: bool = True,
              sae: Optional[SAE] = None) -> SAE:
    """Train an SAE (a fresh one from ``sae_cfg`` seeded with ``train_cfg.seed``, unless ``sae`` is
    given) and return it, ready to use on unscaled activations."""
    if sae is None:
        torch.manual_seed(train_cfg.seed)
        sae = SAE(sae_cfg, device=train_cfg.device)
    return SAETrainer(sae, train_cfg, activations, out_dir, resume=resume, progress=progress).train()
