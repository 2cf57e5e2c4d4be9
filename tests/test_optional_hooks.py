"""Opt-in hook points against TransformerLens 3.9 on the same weights: ``hook_attn_in``
(``set_use_attn_in``), ``hook_mlp_in`` (``set_use_hook_mlp_in``) and ``unembed.hook_in/out``
(``set_use_unembed_hooks``; always on in TransformerLens).

Both families, through the shared `Block`: a tiny random GPT-2 and a tiny Llama with one key/value
head per query head (TransformerLens refuses ``use_attn_in`` on grouped-query attention, and so do
we). The references are TransformerLens ``HookedTransformer``s built from the same Hugging Face
weights (tests/_gpt2_reference.py, tests/test_llama_parity.py).
"""

from __future__ import annotations

import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tdb_lens
from _gpt2_reference import make_hf_gpt2, make_tl, max_diff
from tdb_lens.hooks import get_act_name
from tdb_lens.models.gpt2 import HookedGPT2
from tdb_lens.models.llama import HookedLlama

warnings.filterwarnings("ignore", module="transformer_lens")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from transformer_lens import utils as tl_utils

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
FAMILIES = ["gpt2", "llama"]


@lru_cache(maxsize=4)
def _hf(family: str, kind: str = "llama_mha_tied"):
    if family == "gpt2":
        return make_hf_gpt2(seed=11, n_layer=3, vocab_size=1000, block_std=0.08)
    from test_llama_parity import make_hf

    return make_hf(kind, seed=4)


def pair(family: str, kind: str = "llama_mha_tied"):
    """(ours, TransformerLens') on the same weights, both fresh (the switches are per model)."""
    hf = _hf(family, kind)
    if family == "gpt2":
        return HookedGPT2.from_hf_model(hf).eval(), make_tl(hf)
    from test_llama_parity import _tl_model

    return HookedLlama.from_hf_model(hf).eval(), _tl_model(hf, ungroup=False)


def tokens(model) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(3))


def switch_on(*models) -> None:
    for m in models:
        m.set_use_attn_in(True)
        m.set_use_hook_mlp_in(True)


def layer_names(model, site: str) -> set[str]:
    return {get_act_name(site, l) for l in range(model.cfg.n_layers)}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_new_hooks_cache_what_transformer_lens_caches(family):
    ours, tl = pair(family)
    toks = tokens(ours)
    plain_logits = ours(toks)
    switch_on(ours, tl)
    ours.set_use_unembed_hooks(True)
    logits, cache = ours.run_with_cache(toks)
    tl_logits, tl_cache = tl.run_with_cache(toks)
    # merely switching the hook points on changes nothing, and the two libraries still agree
    assert max_diff(logits, plain_logits) < TOL and max_diff(logits, tl_logits) < TOL
    # with every optional hook point on, both libraries cache the same set of activations
    assert set(cache.keys()) == set(tl_cache.keys())
    n, h, d = ours.cfg.n_layers, ours.cfg.n_heads, ours.cfg.d_model
    checked = layer_names(ours, "attn_in") | layer_names(ours, "mlp_in") | {"unembed.hook_in", "unembed.hook_out"}
    checked |= {f"blocks.{l}.ln1.{s}" for l in range(n) for s in ("hook_scale", "hook_normalized")}
    errs = {name: max_diff(cache[name], tl_cache[name]) for name in sorted(checked)}
    assert max(errs.values()) < TOL, errs
    assert cache["blocks.1.hook_attn_in"].shape == (2, 9, h, d)
    assert cache["blocks.2.ln1.hook_scale"].shape == (2, 9, h, 1)
    assert cache["blocks.0.hook_mlp_in"].shape == (2, 9, d)
    # the attention input is the residual copied per head; the MLP input is resid_mid
    assert torch.equal(cache["blocks.1.hook_attn_in"][:, :, 2], cache["blocks.1.hook_resid_pre"])
    assert torch.equal(cache["blocks.2.hook_mlp_in"], cache["blocks.2.hook_resid_mid"])
    assert torch.equal(cache["unembed.hook_out"], logits)
    # TransformerLens' short names, negative layers and the cache's (name, layer) indexing
    assert torch.equal(cache["attn_in", -1], cache[f"blocks.{n - 1}.hook_attn_in"])
    assert max_diff(cache["mlp_in", 0], tl_cache["mlp_in", 0]) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_names_layouts_and_lookup(family):
    ours, _ = pair(family)
    switch_on(ours)
    ours.set_use_unembed_hooks(True)
    n = ours.cfg.n_layers
    for l in range(n):
        for site in ("attn_in", "mlp_in"):
            name = ours.hook_name(site, l)
            assert name == get_act_name(site, l) == tl_utils.get_act_name(site, l)
            assert ours.hook_layout(name).layer == l and ours.hook_dict[name].layer() == l
    attn_in = ours.hook_layout(ours.hook_name("attn_in", -1))
    assert (attn_in.component, attn_in.axes) == ("attn", ("batch", "pos", "head", "d_model"))
    assert (attn_in.pos_axis, attn_in.unit_axis, attn_in.width, attn_in.size("head")) == (1, 2, ours.cfg.d_model,
                                                                                          ours.cfg.n_heads)
    mlp_in = ours.hook_layout(ours.hook_name("mlp_in", 0))
    assert (mlp_in.component, mlp_in.axes) == ("mlp", ("batch", "pos", "d_model"))
    assert ours.find_hooks(site="attn_in") == [f"blocks.{l}.hook_attn_in" for l in range(n)]
    assert ours.find_hooks(component="unembed") == ["unembed.hook_in", "unembed.hook_out"]
    assert ours.hook_layout("unembed.hook_out").shape_for(2, 5) == (2, 5, ours.cfg.d_vocab)
    assert ours.hook_name("unembed_in") == "unembed.hook_in"
    ln1 = ours.hook_layout(ours.hook_name("scale", 0, "ln1"))
    assert ln1.axes == ("batch", "pos", "head", "singleton")


def _head_edit(head: int, d_model: int):
    delta = 2.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(5))

    def edit(x, hook):
        x = x.clone()
        x[:, 3:, head] += delta
        return x

    return edit


def _pos_edit(d_model: int):
    delta = 2.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(6))

    def edit(x, hook):
        x = x.clone()
        x[:, 4] += delta
        return x

    return edit


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_editing_the_new_hooks_changes_the_output_as_in_transformer_lens(family):
    ours, tl = pair(family)
    switch_on(ours, tl)
    ours.set_use_unembed_hooks(True)
    toks, d = tokens(ours), ours.cfg.d_model
    plain = ours(toks)
    cases = {
        "attn_in head 1": [("blocks.1.hook_attn_in", _head_edit(1, d))],
        "attn_in head 3": [("blocks.0.hook_attn_in", _head_edit(3, d))],
        "mlp_in": [("blocks.2.hook_mlp_in", _pos_edit(d))],
        "unembed.hook_in": [("unembed.hook_in", _pos_edit(d))],
        "unembed.hook_out": [("unembed.hook_out", lambda x, hook: x * 0.5)],
    }
    for what, hooks in cases.items():
        got, want = ours.run_with_hooks(toks, fwd_hooks=hooks), tl.run_with_hooks(toks, fwd_hooks=hooks)
        assert max_diff(got, want) < TOL, what
        assert max_diff(got, plain) > 1e-2, f"{what}: the edit did not reach the output"
    # an edit of the MLP's input leaves the residual stream itself alone (only the MLP reads it)
    with ours.hooks(fwd_hooks=cases["mlp_in"]):
        _, cache = ours.run_with_cache(toks, names_filter=lambda n: "resid" in n)
    _, clean = ours.run_with_cache(toks, names_filter=lambda n: "resid" in n)
    assert torch.equal(cache["blocks.2.hook_resid_mid"], clean["blocks.2.hook_resid_mid"])
    assert not torch.equal(cache["blocks.2.hook_resid_post"], clean["blocks.2.hook_resid_post"])


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_at_the_new_hooks_match_transformer_lens(family):
    ours, tl = pair(family)
    switch_on(ours, tl)
    toks = tokens(ours)
    names = ["blocks.0.hook_attn_in", "blocks.2.hook_attn_in", "blocks.1.hook_mlp_in"]
    loss, cache = ours.run_with_cache(toks, return_type="loss", incl_bwd=True, names_filter=names)
    tl_loss, tl_cache = tl.run_with_cache(toks, return_type="loss", incl_bwd=True, names_filter=names)
    assert abs(float(loss.detach()) - float(tl_loss.detach())) < TOL
    errs = {n: max_diff(cache[n + "_grad"], tl_cache[n + "_grad"]) for n in names}
    assert max(errs.values()) < TOL, errs
    assert all(float(cache[n + "_grad"].abs().max()) > 0 for n in names)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_default_hook_set_unchanged_and_switching_off_removes_them(family):
    ours, tl = pair(family)
    toks = tokens(ours)
    default_points = list(ours.hook_dict)
    _, cache = ours.run_with_cache(toks)
    default_cached = list(cache.keys())
    _, tl_cache = tl.run_with_cache(toks)
    # off (the default): TransformerLens' default set, less its always-on unembed hooks
    assert set(default_cached) == set(tl_cache.keys()) - {"unembed.hook_in", "unembed.hook_out"}
    assert not any(ours.find_hooks(site=s) for s in ("attn_in", "mlp_in", "unembed_in", "unembed_out"))
    switch_on(ours)
    ours.set_use_unembed_hooks(True)
    added = set(ours.hook_dict) - set(default_points)
    assert added == layer_names(ours, "attn_in") | layer_names(ours, "mlp_in") | {"unembed.hook_in", "unembed.hook_out"}
    ours.set_use_attn_in(False)
    ours.set_use_hook_mlp_in(False)
    ours.set_use_unembed_hooks(False)
    assert list(ours.hook_dict) == default_points
    logits, cache = ours.run_with_cache(toks)
    assert list(cache.keys()) == default_cached
    assert ours.hook_layout(ours.hook_name("scale", 0, "ln1")).axes == ("batch", "pos", "singleton")
    with pytest.raises(KeyError, match="hook_attn_in"):
        ours.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_attn_in", lambda x, hook: x)])
    assert max_diff(logits, tl(toks)) < TOL


@torch.no_grad()
def test_switching_off_with_hooks_attached_is_refused_and_changes_nothing():
    ours, _ = pair("gpt2")
    switch_on(ours)
    ours.set_use_unembed_hooks(True)
    before = list(ours.hook_dict)
    ours.add_perma_hook("blocks.2.hook_attn_in", lambda x, hook: x)
    ours.add_perma_hook("blocks.1.hook_mlp_in", lambda x, hook: x)
    ours.add_perma_hook("unembed.hook_out", lambda x, hook: x)
    for setter in (ours.set_use_attn_in, ours.set_use_hook_mlp_in, ours.set_use_unembed_hooks):
        with pytest.raises(ValueError, match="has hooks or an SAE attached"):
            setter(False)
        assert list(ours.hook_dict) == before
    assert ours.n_hooks() == 3
    ours.reset_hooks(including_permanent=True)
    ours.set_use_attn_in(False)
    assert not ours.find_hooks(site="attn_in")


@torch.no_grad()
def test_attn_in_and_split_qkv_input_are_mutually_exclusive():
    ours, tl = pair("gpt2")
    toks = tokens(ours)
    ours.set_use_split_qkv_input(True)
    before = list(ours.hook_dict)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours.set_use_attn_in(True)
    assert list(ours.hook_dict) == before and not ours.find_hooks(site="attn_in")
    ours.set_use_split_qkv_input(False)
    ours.set_use_attn_in(True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours.set_use_split_qkv_input(True)
    assert not any(b.attn.use_split_qkv_input for b in ours.blocks)
    # why we refuse: TransformerLens' HookedTransformer takes both, and then silently ignores an
    # edit of hook_attn_in (its TransformerBridge raises, as we do)
    tl.set_use_attn_in(True)
    tl.set_use_split_qkv_input(True)
    edit = [("blocks.1.hook_attn_in", _head_edit(1, ours.cfg.d_model))]
    assert max_diff(tl.run_with_hooks(toks, fwd_hooks=edit), tl(toks)) == 0.0
    with pytest.raises(ValueError, match="mutually exclusive"):
        tdb_lens.HookedTransformerConfig(n_layers=1, d_model=32, n_ctx=16, d_head=8, act_fn="gelu_new", d_vocab=50,
                                         use_attn_in=True, use_split_qkv_input=True)


def test_attn_in_on_grouped_query_attention_is_refused_as_in_transformer_lens():
    ours, tl = pair("llama", "llama_gqa_untied")
    before = list(ours.hook_dict)
    with pytest.raises(ValueError, match="grouped-query attention"):
        ours.set_use_attn_in(True)
    assert list(ours.hook_dict) == before
    with pytest.raises(AssertionError, match="GroupedQueryAttention"):
        tl.set_use_attn_in(True)
    # hook_mlp_in does not depend on the heads
    ours.set_use_hook_mlp_in(True)
    toks = tokens(ours)
    tl.set_use_hook_mlp_in(True)
    with torch.no_grad():
        _, cache = ours.run_with_cache(toks, names_filter=lambda n: n.endswith("mlp_in"))
        _, tl_cache = tl.run_with_cache(toks, names_filter=lambda n: n.endswith("mlp_in"))
    assert max(max_diff(cache[n], tl_cache[n]) for n in cache.keys()) < TOL


@torch.no_grad()
def test_config_flags_build_a_model_with_the_hooks_on():
    kw = dict(n_layers=2, d_model=32, n_ctx=16, d_head=8, d_vocab=50)
    llama = dict(normalization_type="RMS", positional_embedding_type="rotary", act_fn="silu", gated_mlp=True)
    for arch in (dict(act_fn="gelu_new"), llama):
        cfg = tdb_lens.HookedTransformerConfig(**kw, **arch, use_attn_in=True, use_hook_mlp_in=True)
        assert cfg.use_attn_in and cfg.use_hook_mlp_in and not cfg.use_split_qkv_input
        model = tdb_lens.compat.from_config(cfg, seed=0)
        assert model.find_hooks(site="attn_in") == ["blocks.0.hook_attn_in", "blocks.1.hook_attn_in"]
        assert len(model.find_hooks(site="mlp_in")) == 2
        plain = tdb_lens.compat.from_config(tdb_lens.HookedTransformerConfig(**kw, **arch), seed=0)
        toks = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
        assert max_diff(model(toks), plain(toks)) < TOL
        model.set_use_attn_in(False)
        assert cfg.use_attn_in is False  # the setter keeps a TransformerLens-style config in step
    with pytest.raises(ValueError, match="key/value heads"):
        tdb_lens.HookedTransformerConfig(**kw, **llama, n_heads=4, n_key_value_heads=2, use_attn_in=True)
    # the library's own error, or (in this suite) the run-time type checker's, naming the parameter
    with pytest.raises(TypeError, match="use_hook_mlp_in"):
        tdb_lens.HookedTransformerConfig(**kw, act_fn="gelu_new", use_hook_mlp_in="yes")


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_mean_ablation_at_the_new_hooks_through_their_layouts(family):
    """`compute_means` finds the position axis from the layouts; replacing the activations by those
    means gives TransformerLens' logits under the same hand-written replacement."""
    from tdb_lens.attribution.ablation import compute_means

    ours, tl = pair(family)
    switch_on(ours, tl)
    reference = torch.randint(0, ours.cfg.d_vocab, (5, 9), generator=torch.Generator().manual_seed(8))
    names = ["blocks.1.hook_attn_in", "blocks.2.hook_mlp_in"]
    means = compute_means(ours, reference, names)
    _, cache = ours.run_with_cache(reference, names_filter=names)
    for name in names:
        assert means[name].shape == (1,) + tuple(cache[name].shape[1:])
        assert max_diff(means[name][0], cache[name].mean(0)) < TOL
    hooks = [(name, (lambda m: lambda x, hook: m.expand_as(x).clone())(means[name])) for name in names]
    toks = tokens(ours)
    got, want = ours.run_with_hooks(toks, fwd_hooks=hooks), tl.run_with_hooks(toks, fwd_hooks=hooks)
    assert max_diff(got, want) < TOL and max_diff(got, ours(toks)) > 1e-2
