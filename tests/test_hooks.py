"""The hook engine on a small random HookedGPT2: editing, keeping, gradients, exact removal,
name errors, predicates, permanent hooks, caching options, stop_at_layer, dtype/device, and a
property test that no sequence of operations leaks a hook."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdb_lens import ActivationCache, HookedGPT2


@lru_cache(maxsize=1)
def _model() -> HookedGPT2:
    return HookedGPT2.from_config(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=100, n_ctx=32, seed=0)


@pytest.fixture
def model():
    m = _model()
    m.reset_hooks(including_permanent=True)
    m.zero_grad(set_to_none=True)
    yield m
    m.reset_hooks(including_permanent=True)
    m.zero_grad(set_to_none=True)
    assert m.n_hooks() == 0


TOKENS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


class Boom(RuntimeError):
    pass


def boom(act, hook):
    raise Boom(hook.name)


# --------------------------------------------------------------------------------------------
# forward hooks
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_forward_hook_edit_equals_edited_weights(model):
    zero_pos = lambda act, hook: torch.zeros_like(act)
    hooked = model.run_with_hooks(TOKENS, fwd_hooks=[("hook_pos_embed", zero_pos)])
    ref = copy.deepcopy(model)
    ref.wpe.weight.zero_()
    assert torch.allclose(hooked, ref(TOKENS), atol=1e-6)
    assert not torch.allclose(hooked, model(TOKENS), atol=1e-3)
    # editing in place and returning None keeps the edited tensor
    def zero_in_place(act, hook):
        act.zero_()

    assert torch.equal(model.run_with_hooks(TOKENS, fwd_hooks=[("hook_pos_embed", zero_in_place)]), hooked)


@torch.no_grad()
def test_returning_none_keeps_the_activation(model):
    seen = []

    def look(act, hook):
        seen.append((hook.name, tuple(act.shape)))
        return None

    base = model(TOKENS)
    out = model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_resid_mid"), look)])
    assert torch.equal(out, base)
    assert seen == [(f"blocks.{l}.hook_resid_mid", (2, 8, 32)) for l in range(2)]
    # a hooked pattern is computed step by step instead of by the fused kernel: same numbers
    seen.clear()
    out = model.run_with_hooks(TOKENS, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), look)])
    assert torch.allclose(out, base, atol=1e-6)
    assert seen == [(f"blocks.{l}.attn.hook_pattern", (2, 4, 8, 8)) for l in range(2)]


@torch.no_grad()
def test_hooks_run_in_order_and_compose(model):
    add = lambda v: (lambda act, hook: act + v)
    double = lambda act, hook: act * 2
    _, c1 = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_attn_out")
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", add(1.0)), ("blocks.0.hook_attn_out", double)]):
        _, c2 = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_attn_out")
    # the cache hook was added last, so it sees (x + 1) * 2
    assert torch.allclose(c2["attn_out", 0], (c1["attn_out", 0] + 1) * 2)


def test_bad_hook_return_values_raise_and_leave_nothing(model):
    with pytest.raises(ValueError, match="shape"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", lambda a, hook: a[:, :1])])
    with pytest.raises(TypeError, match="return a tensor or None"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", lambda a, hook: 3.0)])
    with pytest.raises(TypeError, match="callable"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", "not a function")])
    assert model.n_hooks() == 0


# --------------------------------------------------------------------------------------------
# backward hooks
# --------------------------------------------------------------------------------------------
def test_backward_hooks_see_the_gradient(model):
    names = ["hook_embed", "blocks.0.hook_resid_mid", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post",
             "ln_final.hook_normalized"]
    acts, grads = {}, {}

    def keep(act, hook):
        acts[hook.name] = act

    def keep_grad(g, hook):
        grads[hook.name] = g.clone()

    with model.hooks(fwd_hooks=[(n, keep) for n in names], bwd_hooks=[(n, keep_grad) for n in names]):
        loss = model(TOKENS, return_type="loss")
        ref = torch.autograd.grad(loss, [acts[n] for n in names], retain_graph=True)
        loss.backward()
    assert set(grads) == set(names)
    for n, r in zip(names, ref):
        assert torch.allclose(grads[n], r, atol=1e-7), n
        assert float(r.abs().max()) > 0
    assert model.n_hooks() == 0


def test_backward_hook_can_replace_the_gradient(model):
    zero = lambda g, hook: torch.zeros_like(g)
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", zero)]):
        model(TOKENS, return_type="loss").backward()
    # everything upstream of block 1 receives only the zeroed gradient (W_E is tied to the
    # unembedding, so it still gets that path's gradient; W_pos gets none)
    assert float(model.wpe.weight.grad.abs().max()) == 0.0
    assert float(model.blocks[0].attn.c_attn.weight.grad.abs().max()) == 0.0
    assert float(model.blocks[1].attn.c_attn.weight.grad.abs().max()) > 0.0  # downstream untouched


def test_run_with_cache_incl_bwd(model):
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    acts = {}
    with model.hooks(fwd_hooks=[(n, lambda a, hook: acts.__setitem__(hook.name, a)) for n in names]):
        loss = model(TOKENS, return_type="loss")
    ref = dict(zip(names, torch.autograd.grad(loss, [acts[n] for n in names])))
    out, cache = model.run_with_cache(TOKENS, return_type="loss", names_filter=names, incl_bwd=True)
    assert set(cache.keys()) == set(names) | {n + "_grad" for n in names}
    assert torch.allclose(out, loss)
    for n in names:
        assert torch.allclose(cache[n + "_grad"], ref[n], atol=1e-7)
        assert torch.equal(cache[n], acts[n].detach())
    with pytest.raises(ValueError, match="scalar"):
        model.run_with_cache(TOKENS, incl_bwd=True)
    assert model.n_hooks() == 0


# --------------------------------------------------------------------------------------------
# exact removal
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_hooks_context_removes_exactly_its_hooks_even_on_errors(model):
    mine = model.add_hook("hook_embed", lambda a, hook: None)
    perm = model.add_perma_hook("blocks.1.hook_mlp_out", lambda a, hook: None)
    assert model.n_hooks() == 2
    # a hook that raises
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: None), ("blocks.1.hook_attn_out", boom)]):
            assert model.n_hooks() == 4
            model(TOKENS)
    assert model.n_hooks() == 2
    # the forward itself raises (token id out of range)
    with pytest.raises(ValueError, match="token ids"):
        model.run_with_hooks(torch.tensor([[5, 1000]]), fwd_hooks=[(lambda n: True, lambda a, hook: None)])
    assert model.n_hooks() == 2
    # the body of the with-block raises, with nested contexts
    with pytest.raises(KeyError):
        with model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: None)]):
            with model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: None)]):
                assert model.n_hooks() == 4
                raise KeyError("body")
    assert model.n_hooks() == 2
    # hooks added before the context are still the ones attached
    assert model.hook_dict["hook_embed"]._fwd == mine
    assert model.hook_dict["blocks.1.hook_mlp_out"]._fwd == perm


def test_unknown_hook_names_raise_with_close_matches_and_add_nothing(model):
    with pytest.raises(KeyError) as err:
        with model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: None), ("blocks.0.attn.hook_patern", boom)]):
            pass
    msg = str(err.value)
    assert "blocks.0.attn.hook_patern" in msg and "blocks.0.attn.hook_pattern" in msg
    assert model.n_hooks() == 0
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_pots", boom)])
    with pytest.raises(KeyError, match="hook_mlp_out"):
        model.add_hook("blocks.0.hook_mlp_ot", boom)
    with pytest.raises(KeyError):
        model.run_with_cache(TOKENS, names_filter=["hook_embed", "nope.hook_z"])
    with pytest.raises(TypeError):
        model.run_with_hooks(TOKENS, fwd_hooks=[(3, boom)])
    assert model.n_hooks() == 0


@torch.no_grad()
def test_predicate_filters(model):
    hit = []
    pred = lambda name: name.endswith(("hook_q", "hook_k")) and ".1." in name
    model.run_with_hooks(TOKENS, fwd_hooks=[(pred, lambda a, hook: hit.append(hook.name))])
    assert hit == ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]
    assert model.add_hook(lambda name: False, boom) == []
    assert model.n_hooks() == 0


@torch.no_grad()
def test_permanent_hooks_survive_reset_hooks(model):
    calls = []
    model.add_perma_hook("hook_embed", lambda a, hook: calls.append("perm"))
    model.add_hook("hook_embed", lambda a, hook: calls.append("temp"))
    model.reset_hooks()
    assert model.n_hooks() == 1
    model(TOKENS)
    with model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: calls.append("ctx"))]):
        model(TOKENS)
    assert calls == ["perm", "perm", "ctx"]
    model.reset_hooks(including_permanent=True)
    assert model.n_hooks() == 0


# --------------------------------------------------------------------------------------------
# caching options
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_run_with_cache_names_filter(model):
    logits, full = model.run_with_cache(TOKENS)
    assert isinstance(full, ActivationCache) and set(full.keys()) == set(model.hook_dict) - {
        n for n in model.hook_dict if n.endswith(("hook_result", "_input"))}
    assert torch.allclose(logits, model(TOKENS), atol=1e-6)
    _, c = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
    assert list(c.keys()) == ["blocks.1.hook_resid_post"]
    wanted = ["hook_embed", "blocks.0.attn.hook_pattern", "ln_final.hook_scale"]
    _, c = model.run_with_cache(TOKENS, names_filter=wanted)
    assert set(c.keys()) == set(wanted)
    _, c = model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("hook_scale"))
    assert set(c.keys()) == {"blocks.0.ln1.hook_scale", "blocks.0.ln2.hook_scale", "blocks.1.ln1.hook_scale",
                             "blocks.1.ln2.hook_scale", "ln_final.hook_scale"}
    for k in c.keys():
        assert torch.allclose(c[k], full[k], atol=1e-6) and not c[k].requires_grad
    _, d = model.run_with_cache(TOKENS, names_filter=wanted, return_cache_object=False, remove_batch_dim=False)
    assert isinstance(d, dict) and set(d) == set(wanted)
    _, one = model.run_with_cache(TOKENS[:1], names_filter=wanted, remove_batch_dim=True)
    assert one["blocks.0.attn.hook_pattern"].shape == (4, 8, 8)
    assert model.n_hooks() == 0


@torch.no_grad()
def test_stop_at_layer_returns_resid_pre_of_that_layer(model):
    # caching only residual hooks keeps the fused kernels, so the numbers are bit-identical
    _, cache = model.run_with_cache(TOKENS, names_filter=lambda n: "resid" in n)
    for l in range(model.cfg.n_layers):
        assert torch.equal(model(TOKENS, stop_at_layer=l), cache["resid_pre", l])
    assert torch.equal(model(TOKENS, stop_at_layer=model.cfg.n_layers), cache["resid_post", model.cfg.n_layers - 1])
    out, part = model.run_with_cache(TOKENS, stop_at_layer=1)  # all hooks: step-by-step kernels
    assert torch.allclose(out, cache["resid_pre", 1], atol=1e-6)
    assert not any(k.startswith(("blocks.1.", "ln_final")) for k in part.keys())
    assert "blocks.0.hook_resid_post" in part


@torch.no_grad()
def test_cache_device_and_dtype(model):
    _, c32 = model.run_with_cache(TOKENS, names_filter=lambda n: "resid" in n)
    _, c64 = model.run_with_cache(TOKENS, names_filter=lambda n: "resid" in n, dtype=torch.float64, device="cpu")
    for k in c32.keys():
        assert c64[k].dtype == torch.float64 and c64[k].device.type == "cpu"
        assert torch.equal(c64[k], c32[k].double())
    m64 = copy.deepcopy(model).to(torch.float64)
    logits64, c = m64.run_with_cache(TOKENS)
    assert logits64.dtype == torch.float64 and all(v.dtype == torch.float64 for v in c.values())
    assert torch.allclose(logits64.float(), model(TOKENS), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_cache_to_other_device(model):
    gpu = copy.deepcopy(model).to("cuda")
    logits, cache = gpu.run_with_cache(TOKENS.cuda(), device="cpu")
    assert logits.device.type == "cuda" and all(v.device.type == "cpu" for v in cache.values())
    assert torch.allclose(logits.cpu(), model(TOKENS), atol=1e-4)


# --------------------------------------------------------------------------------------------
# property: nothing leaks
# --------------------------------------------------------------------------------------------
NAMES = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post",
         "ln_final.hook_scale", "blocks.0.attn.hook_z"]
TARGETS = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(["blocks.9.hook_resid_pre", "hook_embedd", "blocks.0.attn.hook_x"]),  # unknown
    st.sampled_from(["resid", "attn.", "ln"]).map(lambda s: (lambda n, s=s: s in n)),  # predicates
)
SPEC = st.tuples(TARGETS, st.sampled_from(["noop", "boom", "edit"]), st.sampled_from(["fwd", "bwd"]))


def _fn(kind):
    if kind == "boom":
        return boom
    if kind == "edit":
        return lambda a, hook: a * 1.0
    return lambda a, hook: None


def _n_targets(model, target) -> int:
    if isinstance(target, str):
        return 1 if target in model.hook_dict else -1
    return sum(1 for n in model.hook_dict if target(n))


BODY = st.deferred(lambda: st.lists(
    st.one_of(
        st.just(("run",)),
        st.just(("run_bwd",)),
        st.just(("raise",)),
        st.tuples(st.just("ctx"), st.lists(SPEC, max_size=4), BODY),
        st.tuples(st.just("cache"), st.sampled_from([None, "resid", NAMES[:2]])),
    ),
    max_size=3,
))
TOP = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(NAMES), st.sampled_from(["noop", "boom"]), st.booleans(),
                  st.sampled_from(["fwd", "bwd"])),
        st.tuples(st.just("remove"), st.integers(0, 10)),
        st.tuples(st.just("ctx"), st.lists(SPEC, max_size=4), BODY),
        st.just(("run",)),
        st.just(("reset",)),
    ),
    max_size=8,
)


def _run_body(model, ops):
    for op in ops:
        before = model.n_hooks()
        try:
            if op[0] == "run":
                with torch.no_grad():
                    model(TOKENS[:1, :4])
            elif op[0] == "run_bwd":
                model(TOKENS[:1, :4], return_type="loss").backward()
            elif op[0] == "raise":
                raise Boom("body")
            elif op[0] == "cache":
                filt = op[1]
                if filt == "resid":
                    filt = lambda n: "resid" in n
                with torch.no_grad():
                    model.run_with_cache(TOKENS[:1, :4], names_filter=filt)
            elif op[0] == "ctx":
                _, specs, body = op
                counts = [_n_targets(model, t) for t, _, _ in specs]
                fwd = [(t, _fn(k)) for t, k, d in specs if d == "fwd"]
                bwd = [(t, _fn(k)) for t, k, d in specs if d == "bwd"]
                with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
                    assert -1 not in counts, "an unknown name must raise before the block runs"
                    assert model.n_hooks() == before + sum(counts)
                    _run_body(model, body)
        except (Boom, KeyError):
            pass
        assert model.n_hooks() == before, op


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=TOP)
def test_no_sequence_of_operations_leaks_hooks(model, ops):
    model.reset_hooks(including_permanent=True)
    direct = []  # handles added outside contexts: the only hooks allowed to outlive an operation
    for op in ops:
        if op[0] == "add":
            _, name, kind, permanent, direction = op
            direct += model.add_hook(name, _fn(kind), dir=direction, is_permanent=permanent)
        elif op[0] == "remove":
            if direct:
                direct.pop(op[1] % len(direct)).remove()
        elif op[0] == "reset":
            model.reset_hooks()
            direct = [h for h in direct if h.is_permanent]
        else:
            _run_body(model, [op])
        assert model.n_hooks() == len(direct)
    for h in direct:
        h.remove()
        h.remove()  # twice is harmless
    assert model.n_hooks() == 0
