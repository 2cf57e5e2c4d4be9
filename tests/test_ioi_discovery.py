"""IOI circuit discovery building blocks (tdb_lens.ioi.discovery) on a small random GPT-2.

References: logits from a plain forward pass, per-template means computed by hand from
``run_with_cache`` on the ABC prompts, attention patterns set by hooks, and finite differences
of the circuit's logit difference (for the linearised estimates)."""

from __future__ import annotations

import pytest
import torch

from tdb_lens import HookedGPT2
from tdb_lens.ioi import IOIDataset, logit_diff, per_template_groups
from tdb_lens.ioi.discovery import (
    IOIContext,
    attribution_by_position,
    completeness,
    head_detector_scores,
    head_direct_effects,
    head_str,
    minimality,
    parse_head,
    path_patch_to_queries,
)


@pytest.fixture(scope="module")
def ctx():
    torch.manual_seed(0)
    model = HookedGPT2.from_config(n_layers=3, n_heads=4, d_model=64, n_ctx=64, seed=0)
    model.eval()
    ds = IOIDataset.generate(model.tokenizer, 24, seed=1, templates=[0, 3, 7])
    return IOIContext.from_dataset(model, ds)


def test_head_strings_round_trip():
    assert head_str((9, 6)) == "9.6" and parse_head("10.10") == (10, 10)
    with pytest.raises(ValueError, match="layer.head"):
        parse_head("L9H6")


@torch.no_grad()
def test_run_ld_equals_logit_diff_of_the_full_logits(ctx):
    b = ctx.clean
    logits = ctx.model(b.tokens, attention_mask=b.attention_mask)
    torch.testing.assert_close(ctx.clean_ld, logit_diff(logits, b, per_prompt=True), atol=1e-4, rtol=1e-5)
    rows = torch.tensor([3, 0, 5])
    torch.testing.assert_close(ctx.run_ld(rows=rows), ctx.clean_ld[rows], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ablation_uses_per_template_abc_means(ctx):
    m, b, a = ctx.model, ctx.clean, ctx.abc
    L, H = ctx.n_layers, ctx.n_heads
    # reference: the mean of z over the ABC prompts of the same (order, template), by hand
    _, cache = m.run_with_cache(a.tokens, attention_mask=a.attention_mask, names_filter=lambda n: n.endswith("hook_z"))
    groups = list(per_template_groups(ctx.clean.prompts).values())
    keep = {(0, 1), (2, 3)}

    def manual(z, hook):
        l = int(hook.name.split(".")[1])
        z = z.clone()
        for g in groups:
            mean = cache[hook.name][g].mean(0)
            for h in range(H):
                if (l, h) not in keep:
                    z[g, :, h] = mean[:, h]
        return z

    logits = m.run_with_hooks(b.tokens, attention_mask=b.attention_mask,
                              fwd_hooks=[(f"blocks.{l}.attn.hook_z", manual) for l in range(L)])
    ref = logit_diff(logits, b)
    assert abs(ctx.circuit_ld(keep) - float(ref)) < 1e-4
    assert ctx.faithfulness(set(ctx.all_heads())) == pytest.approx(1.0, abs=1e-6)
    assert ctx.ablate_only(set()) == pytest.approx(float(ctx.clean_ld.mean()), abs=1e-5)
    assert not m.hook_dict["blocks.0.attn.hook_z"].has_hooks  # nothing left behind


@torch.no_grad()
def test_build_rejects_mismatched_corruption(ctx):
    other = IOIDataset.generate(ctx.model.tokenizer, 24, seed=1, templates=[1]).to_batch(ctx.model)
    with pytest.raises(ValueError, match="same templates"):
        IOIContext.build(ctx.model, ctx.clean, other, ctx.group_ids)
    with pytest.raises(ValueError, match="one group per prompt"):
        IOIContext.build(ctx.model, ctx.clean, ctx.abc, ctx.group_ids[:3])


def test_direct_effects_of_last_layer_heads_are_exact(ctx):
    """The last layer's heads write straight into the final norm: with its scale frozen their
    direct effect is z @ W_O normalised, dotted with the IO - S unembedding direction."""
    m, b = ctx.model, ctx.clean
    de = head_direct_effects(ctx)
    assert de.shape == (ctx.n_layers, ctx.n_heads)
    with torch.no_grad():
        _, cache = m.run_with_cache(b.tokens, attention_mask=b.attention_mask)
        L = ctx.n_layers - 1
        idx = torch.arange(len(b.end))
        z = cache[f"blocks.{L}.attn.hook_z"][idx, b.end]  # [b, h, d_head]
        write = torch.einsum("bhd,hdm->bhm", z, m.blocks[L].attn.W_O)
        scale = cache["ln_final.hook_scale"][idx, b.end]  # [b, 1]
        normed = (write - write.mean(-1, keepdim=True)) / scale[:, None]
        direction = m.tokens_to_residual_directions(b.io_token) - m.tokens_to_residual_directions(b.s_token)
        ref = (normed * direction[:, None]).sum(-1).mean(0)
    torch.testing.assert_close(de[L], ref, atol=1e-4, rtol=1e-4)


def test_attribution_scores_shapes_and_knockout_sum(ctx):
    attr = attribution_by_position(ctx)
    assert set(attr) == {"end", "s2", "s1_plus_1", "knockout"}
    for v in attr.values():
        assert v.shape == (ctx.n_layers, ctx.n_heads) and torch.isfinite(v).all()
    # around the full model the circuit estimate for removing a head is the knock-out estimate
    ld_all, est = ctx.circuit_attribution(set(ctx.all_heads()))
    assert ld_all == pytest.approx(float(ctx.clean_ld.mean()), abs=1e-5)
    torch.testing.assert_close(est, attr["knockout"], atol=1e-5, rtol=1e-4)


def test_circuit_attribution_matches_finite_differences(ctx):
    """Around a circuit, the estimate for restoring / removing one head is the first-order
    change of the circuit's logit difference; it should track the exact change closely in a
    small random model whose activations barely saturate anything."""
    keep = {(0, 0), (1, 2), (2, 1)}
    ld, est = ctx.circuit_attribution(keep)
    assert ld == pytest.approx(ctx.circuit_ld(keep), abs=1e-5)
    exact = torch.zeros_like(est)
    for h in ctx.all_heads():
        exact[h] = (ctx.circuit_ld(keep | {h}) - ld) if h not in keep else (ld - ctx.circuit_ld(keep - {h}))
    corr = torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.9, (est, exact)


def test_path_patching_only_uses_downstream_receivers(ctx):
    assert path_patch_to_queries(ctx, [(2, 0)], [(1, 1)]) == {}
    out = path_patch_to_queries(ctx, [(0, 1), (2, 0)], [(2, 2)], rows=torch.arange(8))
    assert list(out) == [(0, 1)]  # (2, 0) is not upstream of layer 2


def test_path_patching_a_head_with_identical_clean_and_abc_outputs_changes_nothing(ctx):
    # a hook writes zeros for head 1.3 in every run, so its clean and ABC outputs are equal
    zero = [("blocks.1.attn.hook_z", lambda z, hook: torch.cat([z[:, :, :3], torch.zeros_like(z[:, :, 3:])], 2))]
    with ctx.model.hooks(fwd_hooks=zero):
        same = IOIContext.build(ctx.model, ctx.clean, ctx.abc, ctx.group_ids)
        out = path_patch_to_queries(same, [(1, 3)], [(2, 0), (2, 1)])
    assert set(out) == {(1, 3)} and abs(out[(1, 3)]) < 1e-6


def test_head_detectors_read_the_patterns():
    """Patterns forced by hooks: a previous-token head, an induction head and a duplicate-token
    head score exactly 1 on their own detector."""
    model = HookedGPT2.from_config(n_layers=2, n_heads=4, d_model=32, n_ctx=128, d_vocab=1000, seed=0)
    L = 20

    def force(pattern, hook):
        q = pattern.shape[-2]
        p = pattern.clone()
        for head, offset in ((0, 1), (1, L - 1), (2, L)):
            p[:, head] = 0
            rows = torch.arange(q)
            keys = rows - offset
            ok = keys >= 0
            p[:, head, rows[ok], keys[ok]] = 1.0
            p[:, head, rows[~ok], 0] = 1.0
        return p

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", force)]):
        s = head_detector_scores(model, n_seqs=3, seq_len=L, seed=2)
    assert s["previous"][1, 0] == pytest.approx(1.0)
    assert s["induction"][1, 1] == pytest.approx(1.0)
    assert s["duplicate"][1, 2] == pytest.approx(1.0)
    assert s["previous"][1, 1] < 0.2 and s["induction"][1, 0] < 0.2
    assert (s["previous"][0] < 1).all()  # random heads in layer 0


def test_completeness_and_minimality_identities(ctx):
    everything = set(ctx.all_heads())
    assert completeness(ctx, everything, n_samples=2) == pytest.approx(0.0, abs=1e-6)
    keep = {(0, 0), (1, 2)}
    mini = minimality(ctx, keep)
    f = ctx.circuit_ld(keep)
    assert set(mini) == {"0.0", "1.2"}
    assert mini["1.2"] == pytest.approx(abs(f - ctx.circuit_ld({(0, 0)})) / abs(f), rel=1e-5)


def test_gradients_do_not_need_trainable_parameters(ctx):
    """Attribution runs on a model whose parameters are all frozen, and gives the same scores."""
    before = attribution_by_position(ctx)
    ld0, est0 = ctx.circuit_attribution({(0, 0), (2, 1)})
    params = list(ctx.model.parameters())
    try:
        for p in params:
            p.requires_grad_(False)
        after = attribution_by_position(ctx)
        ld1, est1 = ctx.circuit_attribution({(0, 0), (2, 1)})
    finally:
        for p in params:
            p.requires_grad_(True)
    for k in before:
        torch.testing.assert_close(after[k], before[k])
    assert ld1 == pytest.approx(ld0) and torch.equal(est1, est0)
    assert all(p.grad is None for p in params)  # nothing accumulated into parameters
