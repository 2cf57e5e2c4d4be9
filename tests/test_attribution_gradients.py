"""Every gradient API on a frozen and on an unfrozen copy of the same model: identical results,
every parameter's ``requires_grad`` as it was, and no ``.grad`` created (the one gradient runner
starts gradients at the embedding hook points)."""

from __future__ import annotations

import copy

import pytest
import torch

from _attribution_models import FAMILIES, make_model, tokens
from tdb_lens import HookedGPT2
from tdb_lens.attribution import (
    LogitDiff,
    Node,
    act_times_grad,
    attribution_patch,
    direct_effects,
    edge_attribution_patching,
    run_with_grads,
    trace_upstream,
)
from tdb_lens.ioi import IOIDataset
from tdb_lens.ioi.discovery import IOIContext, attribution_by_position


@pytest.fixture(params=FAMILIES)
def model(request):
    return make_model(request.param)

MET = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))


def _flatten(x, out: list) -> list:
    """Every tensor inside ``x`` (dataclasses, dicts, tuples), in a fixed order."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            _flatten(x[k], out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _flatten(v, out)
    elif hasattr(x, "__dataclass_fields__"):
        for k in x.__dataclass_fields__:
            _flatten(getattr(x, k), out)
    return out


def _gradient_apis(m) -> dict:
    clean, corrupted = tokens(3, 7, 1), tokens(3, 7, 2)
    nodes = [Node.head(l, h, p) for l in range(2) for h in range(4) for p in (2, 6)] + ["L1.N3@4", "L0.R@5", "E@1"]
    return {
        "act_times_grad": act_times_grad(m, clean, MET, include_pairs=True),
        "act_times_grad_frozen_scale": act_times_grad(m, clean, MET, freeze_final_scale=True),
        "direct_effects": direct_effects(m, clean, MET),
        "attribution_patch": attribution_patch(m, clean, corrupted, MET, nodes),
        "edge_attribution_patching": edge_attribution_patching(m, clean, corrupted, MET).scores.values,
        "trace_upstream": trace_upstream(m, clean, "L1.H2@5"),
        "trace_neuron": trace_upstream(m, clean, "L0.N7@3", kinds=("embed", "head")),
    }


def _flags(m) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in m.named_parameters()}


def _assert_untouched(m, flags: dict[str, bool]) -> None:
    assert _flags(m) == flags
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("freeze", ["none", "all", "some"])
def test_gradient_apis_agree_on_frozen_and_unfrozen_models(model, freeze):
    frozen = copy.deepcopy(model)
    if freeze == "all":
        frozen.requires_grad_(False)
    elif freeze == "some":  # a partly frozen model: the embeddings and the first block
        for name, p in frozen.named_parameters():
            p.requires_grad_(not (name.startswith("blocks.0.") or "embed" in name or "wte" in name or "wpe" in name))
    flags_model, flags_frozen = _flags(model), _flags(frozen)
    assert all(flags_model.values())
    ref = _flatten(_gradient_apis(model), [])
    _assert_untouched(model, flags_model)
    got = _flatten(_gradient_apis(frozen), [])
    _assert_untouched(frozen, flags_frozen)
    assert len(got) == len(ref) > 20
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_run_with_grads_matches_autograd_on_a_frozen_model(model):
    """Reference: the same gradient with every parameter trainable, taken by a hand-written hook."""
    toks = tokens(3, 6, 3)
    name = model.hook_name("resid_mid", 1)
    kept = {}

    def keep(x, hook):
        x.retain_grad()
        kept["x"] = x

    with model.hooks(fwd_hooks=[(name, keep)]):
        MET(model(toks)).sum().backward()
    want = kept["x"].grad.clone()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    grun = run_with_grads(model, toks, lambda logits, acts: MET(logits), [name])
    assert torch.allclose(grun.grads[name], want, atol=1e-6)
    assert torch.equal(grun.change(name, grun.acts[name]), torch.zeros_like(want))  # no change, no effect
    _assert_untouched(model, {n: False for n, _ in model.named_parameters()})


def test_run_with_grads_names_missing_activations(model):
    with pytest.raises(KeyError, match="never computed"):
        run_with_grads(model, tokens(), lambda logits, acts: MET(logits), [model.hook_name("z", 0)],
                       grad_names=["not_recorded"])
    assert not any(hp.has_hooks for hp in model.hook_dict.values())  # nothing left behind


@pytest.fixture(scope="module")
def ioi_ctx():
    gpt2 = HookedGPT2.from_config(n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=0)
    gpt2.eval()
    ds = IOIDataset.generate(gpt2.tokenizer, 12, seed=1, templates=[0, 3])
    return IOIContext.from_dataset(gpt2, ds)


def test_ioi_attribution_steps_agree_on_frozen_and_unfrozen_models(ioi_ctx):
    m = ioi_ctx.model
    flags = _flags(m)
    assert all(flags.values())
    keep = {(0, 1), (1, 2)}
    ref = _flatten([attribution_by_position(ioi_ctx), ioi_ctx.circuit_attribution(keep)[1]], [])
    _assert_untouched(m, flags)
    m.requires_grad_(False)
    try:
        got = _flatten([attribution_by_position(ioi_ctx), ioi_ctx.circuit_attribution(keep)[1]], [])
        _assert_untouched(m, {n: False for n in flags})
    finally:
        m.requires_grad_(True)
    assert len(got) == len(ref) == 5
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
