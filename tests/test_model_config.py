"""The shared config base (`tdb_lens.models.config.ModelConfig`) as both families see it.

References: the families' defaults and messages as they were written before the base existed
(literal values here), Hugging Face ``transformers``' own config classes (which must read what
``to_hf`` writes), and TransformerLens' names of the read-only fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import transformers

import tdb_lens
from tdb_lens import GPT2Config, LlamaConfig
from tdb_lens.compat import HookedTransformerConfig, from_config
from tdb_lens.models.config import ModelConfig, TLArchitecture

GPT2_DEFAULTS = dict(n_layers=12, n_heads=12, d_model=768, d_mlp=3072, d_vocab=50257, n_ctx=1024, eps=1e-5, init_range=0.02)
LLAMA_DEFAULTS = dict(n_layers=2, n_heads=4, n_key_value_heads=2, d_model=64, d_head=16, d_mlp=128, d_vocab=100, n_ctx=2048,
                      eps=1e-5, rope_theta=10000.0, rope_scaling=None, rope_freq_factors=None, tie_word_embeddings=True,
                      attention_bias=False, init_range=0.02, model_type="llama", extra={})
SHARED = ["n_layers", "n_heads", "d_model", "d_mlp", "d_vocab", "n_ctx", "eps", "init_range"]


def test_defaults_are_each_familys_own():
    assert dataclasses.asdict(GPT2Config()) == GPT2_DEFAULTS
    assert list(dataclasses.asdict(GPT2Config())) == list(GPT2_DEFAULTS)  # field order kept (asdict, repr)
    assert dataclasses.asdict(LlamaConfig()) == LLAMA_DEFAULTS
    # the base's defaults are GPT-2 small's; declaring Llama's did not change them
    assert {f.name: f.default for f in dataclasses.fields(ModelConfig)} == GPT2_DEFAULTS
    assert LlamaConfig().extra is not LlamaConfig().extra


def test_both_families_derive_from_the_base():
    for cfg in (GPT2Config(), LlamaConfig()):
        assert isinstance(cfg, ModelConfig)
        assert [f.name for f in dataclasses.fields(cfg)][:len(SHARED)] == SHARED
    assert [f.name for f in dataclasses.fields(GPT2Config)] == SHARED  # GPT-2 adds no field


def test_d_head_and_key_value_heads():
    g = GPT2Config(n_layers=1, n_heads=4, d_model=48, d_mlp=96)
    assert (g.d_head, g.n_key_value_heads) == (12, 4)
    ll = LlamaConfig(n_heads=6, n_key_value_heads=3, d_model=40, d_head=10)
    assert (ll.d_head, ll.n_key_value_heads) == (10, 3)  # Llama's are fields, independent of d_model
    ll.d_head = 12  # a field, so it can be set (the base's d_head is a read-only property)
    assert ll.d_head == 12 and LlamaConfig().d_head == 16
    with pytest.raises(AttributeError):
        g.d_head = 3  # type: ignore[misc]


TL_FIELDS = ["act_fn", "normalization_type", "positional_embedding_type", "attn_only", "gated_mlp", "d_vocab_out",
             "original_architecture", "default_prepend_bos"]


@pytest.mark.parametrize(("cfg", "want"), [
    (GPT2Config(d_vocab=77), ["gelu_new", "LN", "standard", False, False, 77, "GPT2LMHeadModel", True]),
    (LlamaConfig(d_vocab=55), ["silu", "RMS", "rotary", False, True, 55, "LlamaForCausalLM", None]),
])
def test_transformer_lens_read_only_fields(cfg, want):
    assert [getattr(cfg, name) for name in TL_FIELDS] == want
    for name in TL_FIELDS:
        with pytest.raises(AttributeError):
            setattr(cfg, name, "changed")
    assert [getattr(cfg, name) for name in TL_FIELDS] == want
    # cfg.device: None unless set, per instance
    assert cfg.device is None
    cfg.device = "cpu"
    assert cfg.device == "cpu" and type(cfg)().device is None


def test_rotary_base_is_rope_theta():
    assert LlamaConfig(rope_theta=500000.0).rotary_base == 500000.0
    assert not hasattr(GPT2Config(), "rotary_base")


@pytest.mark.parametrize("family", [GPT2Config, LlamaConfig])
@pytest.mark.parametrize("name", ["n_layers", "n_heads", "d_model", "d_mlp", "d_vocab", "n_ctx"])
@pytest.mark.parametrize("bad", [0, -3, True])
def test_shared_sizes_must_be_positive_integers(family, name, bad):
    with pytest.raises(ValueError, match=rf"^{family.__name__}\.{name} is {bad!r}; expected a positive integer$"):
        family(**{name: bad})


@pytest.mark.parametrize(("family", "name"), [(GPT2Config, "eps"), (LlamaConfig, "eps"), (LlamaConfig, "rope_theta")])
@pytest.mark.parametrize("bad", [0.0, -1e-5, math.nan, math.inf, False])
def test_float_settings_must_be_finite_and_positive(family, name, bad):
    with pytest.raises(ValueError, match=rf"^{family.__name__}\.{name} is {bad!r}; expected a finite number > 0$"):
        family(**{name: bad})


@pytest.mark.parametrize("name", ["n_key_value_heads", "d_head"])
def test_llama_sizes_are_checked_too(name):
    with pytest.raises(ValueError, match=rf"^LlamaConfig\.{name} is 0; expected a positive integer$"):
        LlamaConfig(**{name: 0})


def test_first_bad_field_named_in_the_familys_order():
    # Llama checks n_key_value_heads before d_model (its order before the base existed)
    with pytest.raises(ValueError, match=r"LlamaConfig\.n_key_value_heads"):
        LlamaConfig(d_model=0, n_key_value_heads=0)


def test_family_checks_after_the_shared_ones():
    with pytest.raises(ValueError, match="d_model 10 is not divisible by n_heads 4"):
        GPT2Config(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="n_heads 4 must be a multiple of n_key_value_heads 3"):
        LlamaConfig(n_heads=4, n_key_value_heads=3)
    with pytest.raises(ValueError, match="d_head 15 must be even"):
        LlamaConfig(d_head=15)


def test_fields_are_keyword_only():
    # a family's own fields can never shift what a positional argument means: positions are refused
    with pytest.raises(TypeError):
        GPT2Config(2, 4)  # type: ignore[misc]
    with pytest.raises(TypeError):
        LlamaConfig(2, 4)  # type: ignore[misc]


def test_gpt2_round_trip_through_transformers():
    cfg = GPT2Config(n_layers=3, n_heads=2, d_model=16, d_mlp=40, d_vocab=97, n_ctx=33, eps=1e-6, init_range=0.01)
    hf = transformers.GPT2Config(**cfg.to_hf())
    assert (hf.n_layer, hf.n_head, hf.n_embd, hf.n_inner, hf.vocab_size, hf.n_positions, hf.layer_norm_epsilon,
            hf.initializer_range) == (3, 2, 16, 40, 97, 33, 1e-6, 0.01)
    assert GPT2Config.from_hf(cfg.to_hf()) == cfg
    assert GPT2Config.from_hf(hf.to_dict()) == cfg


def test_llama_round_trip_through_transformers():
    cfg = LlamaConfig(n_layers=3, n_heads=6, n_key_value_heads=2, d_model=48, d_head=10, d_mlp=72, d_vocab=97, n_ctx=333,
                      eps=1e-6, rope_theta=5e5, tie_word_embeddings=False, attention_bias=True, init_range=0.01)
    hf = transformers.LlamaConfig(**cfg.to_hf())
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.hidden_size, hf.head_dim,
            hf.intermediate_size, hf.max_position_embeddings, hf.rms_norm_eps) == (3, 6, 2, 48, 10, 72, 333, 1e-6)
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert LlamaConfig.from_hf(hf.to_dict()) == cfg


def test_family_defaults_of_shared_fields():
    @dataclass(kw_only=True)
    class Tiny(ModelConfig, defaults={"n_layers": 1, "d_model": 8}):
        architecture = TLArchitecture(act_fn="relu", normalization_type="LN", positional_embedding_type="standard",
                                      gated_mlp=False, original_architecture="Tiny", default_prepend_bos=False)

    t = Tiny(n_heads=2)
    assert dataclasses.asdict(t) == {**GPT2_DEFAULTS, "n_layers": 1, "d_model": 8, "n_heads": 2}
    assert (t.act_fn, t.d_head) == ("relu", 4)
    assert GPT2Config().n_layers == 12 and dataclasses.asdict(ModelConfig()) == GPT2_DEFAULTS  # nothing else changed
    with pytest.raises(TypeError, match=r"defaults= names \['n_layer'\], which are not ModelConfig fields"):
        class Wrong(ModelConfig, defaults={"n_layer": 1}):
            pass
    with pytest.raises(TypeError, match="n_layers is declared in the class body and given in defaults="):
        class Twice(ModelConfig, defaults={"n_layers": 1}):
            n_layers: int = 3


def test_compat_picks_the_family_from_the_base_architecture():
    # TransformerLens' folded norms ("LNPre", "RMSPre") name the same families
    g = HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, act_fn="gelu_new", d_vocab=50,
                                normalization_type="LNPre")
    assert type(g) is GPT2Config and g.n_heads == 4
    ll = HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, act_fn="silu", d_vocab=50, gated_mlp=True,
                                 normalization_type="RMSPre", positional_embedding_type="rotary", rotary_base=500.0)
    assert type(ll) is LlamaConfig and (ll.n_key_value_heads, ll.rotary_base, ll.tie_word_embeddings) == (4, 500.0, False)
    with pytest.raises(ValueError, match="unsupported architecture"):  # gated gelu is neither family
        HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, act_fn="gelu_new", d_vocab=50, gated_mlp=True)
    assert isinstance(from_config(ll, seed=0), tdb_lens.HookedLlama)
    with pytest.raises(TypeError, match="from_config takes a GPT2Config or LlamaConfig"):
        from_config(ModelConfig(), seed=0)


@pytest.mark.parametrize(("family", "hf", "missing", "noun"), [
    (GPT2Config, {"n_layer": 1, "n_embd": 8, "vocab_size": 10, "n_positions": 4}, "n_head", "a GPT-2 config"),
    (LlamaConfig, {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64}, "num_attention_heads",
     "a Llama-family config"),
])
def test_from_hf_names_a_missing_entry(family, hf, missing, noun):
    with pytest.raises(tdb_lens.CheckpointError, match=rf"^config\.json has no '{missing}'; {noun} must state it$"):
        family.from_hf(hf)


@pytest.mark.parametrize(("family", "hf", "error"), [
    (GPT2Config, {"n_layer": 1, "n_head": 2, "n_embd": None, "vocab_size": 10, "n_positions": 4}, "TypeError"),
    (LlamaConfig, {"num_hidden_layers": 1, "num_attention_heads": 0, "hidden_size": 64, "intermediate_size": 8,
                   "vocab_size": 10}, "ZeroDivisionError"),
])
def test_from_hf_names_impossible_sizes(family, hf, error):
    with pytest.raises(tdb_lens.CheckpointError, match=rf"^config\.json has impossible sizes \({error}: "):
        family.from_hf(hf)
