"""Configuration dataclasses for sparse autoencoders: what an SAE is (`SAEConfig`) and how one is
trained (`TrainConfig`).

Field names follow SAELens (``d_in``, ``d_sae``, ``apply_b_dec_to_input``, ``normalize_activations``,
``k``, ``rescale_acts_by_decoder_norm``) so a config round-trips through SAELens's ``cfg.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

# "center" is tdb_lens's own: subtract each vector's mean over d_in before encoding and add it back
# after decoding (what a model with centred writing weights gives; see `hub.py`).
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale", "center")
RESHAPES = ("none", "hook_z")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class SAEConfig:
    """Shape and architecture of an SAE.

    ``architecture``: the name of one of the classes in `tdb_lens.sae.architectures`: "standard"
    (ReLU with a pre-encoder bias: OpenAI's / Transformer Debugger's autoencoders, SAELens
    "standard"), "topk" (keep the ``k`` largest pre-activations, ReLU'd) or "jumprelu" (a learned
    per-latent ``threshold``). ``SAE(cfg)`` builds that class; it also checks the fields it needs.
    ``normalize_activations``: "layer_norm" is OpenAI's TopK input normalisation (centre, divide by the
    standard deviation, undo both on the reconstruction).
    ``hook_name`` / ``model_name`` record where the SAE was trained; attaching uses ``hook_name`` when
    no other is given.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    k: Optional[int] = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"
    dtype: str = "float32"
    hook_name: Optional[str] = None
    model_name: Optional[str] = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .architectures import architecture_class  # (imports this module: not at import time)

        arch = architecture_class(self.architecture)
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        arch.check_config(self)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}"
            )
        if self.reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations must be one of {RESHAPES}, got {self.reshape_activations!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """How to train an SAE on a stream of activations.

    TopK SAEs get OpenAI's auxiliary loss on dead latents (AuxK: the ``aux_k`` dead latents with the
    largest pre-activations reconstruct the residual error, weighted ``aux_coefficient``). Standard
    (ReLU) SAEs get an L1 penalty on decoder-norm-weighted latents and dead latents are resampled
    every ``resample_every`` steps towards inputs the SAE reconstructs badly. JumpReLU SAEs get an
    L0 penalty weighted ``l0_coefficient``; their thresholds start at ``jumprelu_init_threshold`` and
    learn through straight-through gradients over a window ``jumprelu_bandwidth`` wide. (Each
    architecture's class in `architectures` holds its part.) Decoder rows are kept at unit norm. A
    latent is dead when it has not fired for ``dead_after`` training activations.
    """

    total_activations: int = 1_000_000
    batch_size: int = 4096
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    warmup_steps: int = 0
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last fraction of training
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0
    aux_coefficient: float = 1.0 / 32
    aux_k: Optional[int] = None  # default: d_in // 2
    l0_coefficient: float = 1.0  # JumpReLU: weight of the L0 penalty
    jumprelu_bandwidth: float = 0.05  # JumpReLU: width of the straight-through window (in scaled input units)
    jumprelu_init_threshold: float = 0.01
    dead_after: int = 1_000_000
    resample_every: Optional[int] = None  # standard SAEs only; None: never
    resample_until: Optional[int] = None  # stop resampling after this step (default: half of training)
    normalize_scale: bool = True  # train on x * c with E||x c|| = sqrt(d_in); c is folded out at the end
    init_b_dec: str = "mean"  # "mean", "median" (geometric) or "zeros"
    checkpoint_every: Optional[int] = None  # steps
    keep_checkpoints: int = 1
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)
