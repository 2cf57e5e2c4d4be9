"""`SAE`: a sparse autoencoder that is also a `HookedRootModule`, so its insides are hookable.

`SAE` holds what every architecture shares (parameters, input normalisation, the hooked forward
with its error term, weight utilities); the architectures are its subclasses in `architectures`
(`StandardSAE`, `TopKSAE`, `JumpReLUSAE`), each owning its activation, decode and training-step
details. ``SAE(cfg)`` builds the subclass registered for ``cfg.architecture``.

Parameters follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (and ``threshold [d_sae]`` for JumpReLU). With ``apply_b_dec_to_input`` the decoder
bias is subtracted before encoding (OpenAI's ``pre_bias``)::

    latents = act((x - b_dec) @ W_enc + b_enc)        recons = latents @ W_dec + b_dec

Hook points, named as SAELens names them; once attached to a model at ``H`` they are
``H.hook_sae_input`` ... in ``model.hook_dict``:

- ``hook_sae_input``     what the SAE receives                        ``[..., d_in]``
- ``hook_sae_acts_pre``  pre-activations                              ``[..., d_sae]``
- ``hook_sae_acts_post`` the latents                                  ``[..., d_sae]``
- ``hook_sae_recons``    the reconstruction, in the input's units      ``[..., d_in]``
- ``hook_sae_error``     input minus the clean reconstruction         ``[..., d_in]``
- ``hook_sae_output``    what flows on                                ``[..., d_in]``

With the error term, output = reconstruction + error, where the error is computed from the *clean*
reconstruction (no edits); it is evaluated as ``input + (reconstruction - clean reconstruction)``,
so an unedited run returns the input bit for bit and an edit to the latents changes the output by
exactly the change in reconstruction. The error is detached
from the input, as in SAELens: gradients reach upstream only through the latents. When gradients
are on, the error is a leaf that requires grad, so backward hooks on ``hook_sae_error`` see the
gradient of the error node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import nn

from ..hooks import HookedRootModule, HookPoint
from ..hooks.layout import HOST_AXES, HookLayout, layout
from .config import SAEConfig, TrainConfig

# hook point -> its last axis; the leading axes are the host's (see `SAE.splice_axes`)
_SAE_HOOKS = {"hook_sae_input": "d_in", "hook_sae_acts_pre": "d_sae", "hook_sae_acts_post": "d_sae",
              "hook_sae_recons": "d_in", "hook_sae_error": "d_in", "hook_sae_output": "d_in"}
_LN_EPS = 1e-5

# (shift, scale) undone after decoding: recons = decoded * scale + shift. None: nothing to undo.
NormState = Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def _through(hp: HookPoint, t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Run ``t`` through a hook point; return (result, whether a hook changed the values).

    When forward hooks are registered they get a copy, so ``t`` stays the clean value even when
    a hook edits its argument in place.
    """
    if not hp._fwd:
        return hp(t), False
    out = hp(t.clone())
    return out, not torch.equal(out, t)


@dataclass
class StepContext:
    """What an architecture's training penalty may read besides the batch: the training config,
    the step number and which latents count as dead."""

    cfg: TrainConfig
    step: int
    dead: Bool[torch.Tensor, " d_sae"]


@dataclass
class TrainForward:
    """One training forward: the reconstruction (normalised space), the pre-activations, the dense
    latents (None where the architecture decoded sparsely), which latents fired, mean L0."""

    recons: Float[torch.Tensor, "batch d_in"]
    pre: Float[torch.Tensor, "batch d_sae"]
    latents: Optional[Float[torch.Tensor, "batch d_sae"]]
    fired: Bool[torch.Tensor, " d_sae"]
    l0: Float[torch.Tensor, ""]


class SAE(HookedRootModule):
    """A sparse autoencoder. Build with ``SAE(SAEConfig(d_in=..., d_sae=..., architecture=...))``,
    which gives the architecture's class (`architectures.StandardSAE`, `TopKSAE`, `JumpReLUSAE`)."""

    #: the name ``SAEConfig.architecture`` holds for this class (set by each subclass)
    architecture: ClassVar[str] = ""
    #: parameters saved and loaded, in SAELens's names
    param_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    #: whether `training.SAETrainer` can train this architecture
    trainable: ClassVar[bool] = True
    #: whether the trainer's ``resample_every`` re-initialises dead latents (`reinit_latents`)
    resamples_dead_latents: ClassVar[bool] = False
    #: whether the config's ``k`` means something for this architecture
    takes_k: ClassVar[bool] = False

    hook_sae_input: HookPoint
    hook_sae_acts_pre: HookPoint
    hook_sae_acts_post: HookPoint
    hook_sae_recons: HookPoint
    hook_sae_error: HookPoint
    hook_sae_output: HookPoint

    def __new__(cls, cfg: Optional[SAEConfig] = None, *args: Any, **kwargs: Any) -> SAE:
        if cls is SAE and cfg is not None:
            from .architectures import architecture_class

            cls = architecture_class(cfg.architecture)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.architecture != type(self).architecture:
            raise ValueError(f"{type(self).__name__} needs architecture={type(self).architecture!r}, "
                             f"the config says {cfg.architecture!r}; build SAE(cfg) to get the right class")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, dtype=torch.float32)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(dtype=dtype, device=device))
        self.W_enc = nn.Parameter(W_dec.T.contiguous().to(dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self._init_extra_params(dtype, device)
        for name, last in _SAE_HOOKS.items():
            setattr(self, name, HookPoint(layout("sae", name[len("hook_"):], HOST_AXES, last)))
        # Set by add_sae; when True the forward adds the reconstruction error back.
        self.use_error_term = False
        self.__dict__["_host"] = None  # (model, hook_name) while attached; not a submodule
        self.setup()

    # ---- what an architecture provides ------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise a ValueError when ``cfg`` asks for something this architecture does not have."""
        if cfg.rescale_acts_by_decoder_norm:
            raise ValueError(f"rescale_acts_by_decoder_norm does not apply to {cls.architecture} SAEs (topk only)")

    @classmethod
    def config_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        """The config fields only this architecture has, as saved files record them."""
        return {}

    def _init_extra_params(self, dtype: torch.dtype, device: torch.device | str | None) -> None:
        """Create the parameters beyond ``W_enc, b_enc, W_dec, b_dec`` (none by default)."""

    def activation(self, pre: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_sae"]:
        """Latents from pre-activations."""
        raise NotImplementedError

    def decode_pre(self, pre: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """``decode_normalized(activation(pre))``; an architecture may compute it more cheaply."""
        return self.decode_normalized(self.activation(pre))

    def _sparse_decode_ok(self) -> bool:
        """Whether the hooked forward may skip the dense latents (`decode_pre`) when nobody hooks them."""
        return False

    def train_forward(self, x_norm: Float[torch.Tensor, "batch d_in"], ctx: StepContext) -> TrainForward:
        """The training forward of a normalised batch (dense by default)."""
        pre = self.pre_acts(x_norm)
        acts = self.activation(pre)
        return TrainForward(self.decode_normalized(acts), pre, acts, (acts > 0).any(0),
                            (acts > 0).float().sum(-1).mean())

    def train_penalty(self, fwd: TrainForward, err: Float[torch.Tensor, "batch d_in"],
                      ctx: StepContext) -> tuple[Float[torch.Tensor, ""], dict[str, float]]:
        """The loss added to the reconstruction error (sparsity, auxiliary terms) and its stats."""
        raise NotImplementedError

    def init_for_training(self, cfg: TrainConfig) -> None:
        """Set the architecture's own parameters before training starts (nothing by default)."""

    def reinit_latents(self, idx: Int[torch.Tensor, " n"], x_norm: Float[torch.Tensor, "batch d_in"],
                       generator: torch.Generator) -> bool:
        """Re-initialise latents ``idx`` (dead) from a batch; False when nothing was changed."""
        return False

    # ---- basics -----------------------------------------------------------------------------
    def axis_sizes(self) -> dict[str, int]:
        return {"d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae}

    def splice_axes(self, host: HookLayout) -> tuple[str, ...]:
        """The leading axes of this SAE's activations when spliced at a hook with layout ``host``:
        the host's but its last, or but its last two for a hook_z SAE that reads all heads at once."""
        if self.cfg.reshape_activations == "hook_z" and host.width is not None and host.width != self.cfg.d_in:
            return host.axes[:-2]
        return host.axes[:-1]

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property  # SAELens's name; it shadows HookedRootModule.hook_name(site, ...), unused on an SAE
    def hook_name(self) -> Optional[str]:  # type: ignore[override]
        """Where this SAE is attached (else where it was trained, if recorded)."""
        host = self.__dict__["_host"]
        return host[1] if host is not None else self.cfg.hook_name

    def extra_repr(self) -> str:
        c = self.cfg
        extra = "".join(f", {k}={v}" for k, v in self.config_fields(c).items() if v not in (None, False))
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{extra}, hook={self.hook_name!r}"

    # ---- pieces -----------------------------------------------------------------------------
    def _check_width(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten heads for hook_z SAEs; raise a clear error when the last dim is not d_in."""
        d = self.cfg.d_in
        if self.cfg.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-1] != d:
            if x.shape[-2] * x.shape[-1] == d:
                return x.flatten(-2)
        if x.shape[-1] != d:
            where = f" at hook {self.hook_name!r}" if self.hook_name else ""
            raise ValueError(
                f"SAE expects activations whose last dimension is d_in={d}, got shape {tuple(x.shape)}{where}"
            )
        return x

    def normalize(self, x: Float[torch.Tensor, "... d_in"]) -> tuple[Float[torch.Tensor, "... d_in"], NormState]:
        """Apply the input normalisation; return the normalised input and what undoes it."""
        mode = self.cfg.normalize_activations
        if mode == "none":
            return x, None
        if mode == "center":
            mu = x.mean(-1, keepdim=True)
            return x - mu, (mu, None)
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)
            return xc / (std + _LN_EPS), (mu, std)
        # constant_norm_rescale: every vector scaled to norm sqrt(d_in)
        coeff = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True)
        return x * coeff, (None, 1.0 / coeff)

    @staticmethod
    def denormalize(y: Float[torch.Tensor, "... d_in"], state: NormState) -> Float[torch.Tensor, "... d_in"]:
        """Undo `normalize` on a reconstruction."""
        if state is None:
            return y
        shift, scale = state
        if scale is not None:
            y = y * scale
        return y if shift is None else y + shift

    def pre_acts(self, x_norm: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Pre-activations of an already-normalised input."""
        if self.cfg.apply_b_dec_to_input:
            x_norm = x_norm - self.b_dec
        pre = x_norm @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def decode_normalized(self, latents: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """``latents @ W_dec + b_dec``: the reconstruction in the normalised space."""
        if self.cfg.rescale_acts_by_decoder_norm:
            latents = latents / self.W_dec.norm(dim=-1)
        return latents @ self.W_dec + self.b_dec

    # ---- public -----------------------------------------------------------------------------
    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Latents of ``x`` (no hooks run)."""
        x = self._check_width(x).to(self.dtype)
        return self.activation(self.pre_acts(self.normalize(x)[0]))

    def decode(
        self, latents: Float[torch.Tensor, "... d_sae"], norm_state: NormState = None
    ) -> Float[torch.Tensor, "... d_in"]:
        """Reconstruction from latents (no hooks run). For SAEs that normalise their input, pass the
        ``norm_state`` from `normalize` to get the reconstruction in the input's units."""
        if latents.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"latents must have last dimension d_sae={self.cfg.d_sae}, got {tuple(latents.shape)}")
        return self.denormalize(self.decode_normalized(latents.to(self.dtype)), norm_state)

    def encode_decode(
        self, x: Float[torch.Tensor, "... d_in"]
    ) -> tuple[Float[torch.Tensor, "... d_sae"], Float[torch.Tensor, "... d_in"]]:
        """(latents, reconstruction in the input's units), no hooks run."""
        x = self._check_width(x).to(self.dtype)
        xn, state = self.normalize(x)
        latents = self.activation(self.pre_acts(xn))
        return latents, self.denormalize(self.decode_normalized(latents), state)

    def reconstruct(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """The reconstruction of ``x`` in its own units (no hooks run)."""
        return self.encode_decode(x)[1]

    def forward(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """The hooked pass: reconstruction (plus the error term when ``use_error_term``).

        The SAE runs once. When hooks edit the latents, the clean reconstruction for the error
        term is re-decoded from the clean latents; only an edit at ``hook_sae_input`` re-encodes.
        """
        shape, in_dtype = x.shape, x.dtype
        x = self._check_width(x).to(self.dtype)
        sae_in, in_edited = _through(self.hook_sae_input, x)
        xn, state = self.normalize(sae_in)
        pre = self.pre_acts(xn)
        pre_h, pre_edited = _through(self.hook_sae_acts_pre, pre)
        if self._sparse_decode_ok():
            # nobody looks at the dense latents: the architecture decodes from the pre-activations
            acts, acts_edited = None, False
            recons = self.denormalize(self.decode_pre(pre_h), state)
        else:
            acts = self.activation(pre_h)
            acts_h, acts_edited = _through(self.hook_sae_acts_post, acts)
            recons = self.denormalize(self.decode_normalized(acts_h), state)
        out = self.hook_sae_recons(recons)
        if self.use_error_term:
            with torch.no_grad():
                if in_edited:
                    clean = self.reconstruct(x)
                elif pre_edited:
                    clean = self.denormalize(self.decode_pre(pre) if acts is None
                                             else self.decode_normalized(self.activation(pre)), state)
                elif acts_edited:
                    clean = self.denormalize(self.decode_normalized(acts), state)  # type: ignore[arg-type]
                else:
                    clean = recons
                error = x - clean
            if torch.is_grad_enabled() and (x.requires_grad or self.W_enc.requires_grad):
                error.requires_grad_(True)
            error_h = self.hook_sae_error(error)
            # Value: x + (reconstruction - clean reconstruction) + (error edit), so an unedited run
            # returns x bit for bit. Gradient: identity to the (hooked) reconstruction and to the
            # error node, none straight to x (it flows through the latents, as in SAELens).
            out = (x.detach() + (out.detach() - clean.detach()) + (out - out.detach())
                   + (error_h - error.detach()))
        out = self.hook_sae_output(out)
        return out.reshape(shape).to(in_dtype)

    # ---- weight utilities -------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of ``W_dec``'s gradient that would change its rows' norms."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec.data / self.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        self.W_dec.grad -= (self.W_dec.grad * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def fold_input_scale(self, c: float) -> None:
        """This SAE was trained on ``x * c``; make it compute the same thing on ``x`` directly.

        Latents come out divided by ``c`` (so they are in the input's units) and decoder rows
        keep their norms: ``b_enc``, ``b_dec`` (and an architecture's own thresholds) are divided by
        ``c``. Exact for positively homogeneous activations (ReLU, TopK, JumpReLU).
        """
        if self.cfg.normalize_activations not in ("none", "center"):
            raise ValueError(f"cannot fold an input scale into an SAE with {self.cfg.normalize_activations!r} inputs")
        self.b_enc.data /= c
        self.b_dec.data /= c

    def clone(self) -> SAE:
        other = SAE(SAEConfig.from_dict(self.cfg.to_dict()), device=self.device)
        other.load_state_dict(self.state_dict())
        return other.to(self.dtype)
