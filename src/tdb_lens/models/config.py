"""`ModelConfig`: the config every model family shares, and `TLArchitecture`, the TransformerLens fields a
family fixes.

A family's config (`GPT2Config`, `LlamaConfig`) derives from `ModelConfig` and adds only what differs:
its own fields, its own checks (in ``__post_init__``, after ``super().__post_init__()``), its
`TLArchitecture` as the class attribute ``architecture``, and, where its defaults of the shared sizes
differ, ``defaults=`` in the class statement::

    @dataclass(kw_only=True)
    class TinyConfig(ModelConfig, defaults={"n_layers": 2, "d_model": 64}):
        architecture = TLArchitecture(...)

Fields are keyword-only (``GPT2Config(n_layers=2, d_model=64, ...)``), so a family's own fields can
never shift the meaning of a positional argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, TypeVar

from .hub import CheckpointError

C = TypeVar("C", bound="ModelConfig")


@dataclass(frozen=True)
class TLArchitecture:
    """TransformerLens' config fields that are the same for every config of a family; each shows on the
    config as a read-only field (``cfg.act_fn`` ...)."""

    act_fn: str
    normalization_type: str
    positional_embedding_type: str
    gated_mlp: bool
    original_architecture: str
    #: None: the tokenizer's own convention decides whether a BOS token is prepended
    default_prepend_bos: Optional[bool]


@dataclass(kw_only=True)
class ModelConfig:
    """Sizes and settings every family has (defaults: GPT-2 small's), their checks, and the TransformerLens
    read-only fields. A wrong value raises ValueError naming ``Class.field``, its value and what was expected."""

    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    d_vocab: int = 50257
    n_ctx: int = 1024
    eps: float = 1e-5
    init_range: float = 0.02

    #: the family's fixed TransformerLens fields (set by each family)
    architecture: ClassVar[TLArchitecture]
    #: what `from_hf` calls the family in its errors ("a GPT-2 config must state it")
    family_name: ClassVar[str]
    #: fields that must be positive integers / finite numbers > 0, in the order they are checked
    _positive_ints: ClassVar[tuple[str, ...]] = ("n_layers", "n_heads", "d_model", "d_mlp", "d_vocab", "n_ctx")
    _positive_floats: ClassVar[tuple[str, ...]] = ("eps",)
    #: TransformerLens' ``cfg.device``; None (tensors made with it go to the default device) unless set;
    #: moving the model does not change it
    device = None

    def __init_subclass__(cls, defaults: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        """``defaults``: the family's own defaults of shared fields (written into the class body as if
        redeclared there, so the ``@dataclass`` decorator that follows gives them these defaults)."""
        super().__init_subclass__(**kwargs)
        if not defaults:
            return
        shared = ModelConfig.__dataclass_fields__
        unknown = sorted(set(defaults) - set(shared))
        if unknown:
            raise TypeError(f"{cls.__name__}: defaults= names {unknown}, which are not ModelConfig fields {sorted(shared)}")
        own = cls.__dict__.get("__annotations__")
        if own is None:  # a body without annotations would otherwise share (and change) a base class's dict
            own = {}
            cls.__annotations__ = own
        for name, value in defaults.items():
            if name in own:
                raise TypeError(f"{cls.__name__}: {name} is declared in the class body and given in defaults=; pick one")
            own[name] = shared[name].type
            setattr(cls, name, value)

    def __post_init__(self) -> None:
        cls = type(self).__name__
        for name in self._positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{cls}.{name} is {value!r}; expected a positive integer")
        for name in self._positive_floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{cls}.{name} is {value!r}; expected a finite number > 0")

    @classmethod
    def from_hf(cls: type[C], hf: dict) -> C:
        """From a Hugging Face ``config.json`` dict; a missing or impossible entry raises ValueError naming it."""
        try:
            return cls._from_hf(hf)
        except KeyError as e:
            raise CheckpointError(f"config.json has no {e.args[0]!r}; a {cls.family_name} config must state it") from None
        except (TypeError, ZeroDivisionError) as e:
            raise CheckpointError(f"config.json has impossible sizes ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_hf(cls: type[C], hf: dict) -> C:
        """The family's reading of ``config.json`` (a missing key may raise KeyError)."""
        raise NotImplementedError(f"{cls.__name__} does not read Hugging Face configs")

    @property
    def d_head(self) -> int:
        """Width of one attention head (a family may make it a field of its own)."""
        return self.d_model // self.n_heads

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads (grouped-query attention; a family may make it a field of its own)."""
        return self.n_heads

    # TransformerLens' config fields that are fixed for a family (read-only)
    act_fn = property(lambda self: self.architecture.act_fn)
    normalization_type = property(lambda self: self.architecture.normalization_type,
                                  doc="'LN' or 'RMS' (TransformerLens says 'LNPre' after fold_ln)")
    positional_embedding_type = property(lambda self: self.architecture.positional_embedding_type)
    gated_mlp = property(lambda self: self.architecture.gated_mlp)
    original_architecture = property(lambda self: self.architecture.original_architecture)
    default_prepend_bos = property(lambda self: self.architecture.default_prepend_bos)
    attn_only = property(lambda self: False)
    d_vocab_out = property(lambda self: self.d_vocab)
