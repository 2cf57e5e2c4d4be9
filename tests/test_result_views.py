"""Result objects print short, informative reprs (no tensor dumps) and render inline HTML.

References: the objects' own numbers (the repr shows the top node the object's ``top()`` gives;
the heat map has one cell per value of the heads grid)."""

from __future__ import annotations

import re

import torch

from tdb_lens import GPT2Config, HookedGPT2
from tdb_lens import attribution as A


def _model() -> HookedGPT2:
    return HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=64, n_heads=4, d_mlp=128, d_vocab=100, n_ctx=16), seed=0)


TOKENS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def test_reprs_are_short_and_name_the_top_node():
    model = _model()
    metric = A.LogitDiff(3, 5)
    objs = [A.direct_effects(model, TOKENS, metric), A.act_times_grad(model, TOKENS, metric),
            A.trace_upstream(model, TOKENS, "L1.H2@-1")]
    for obj in objs:
        r = repr(obj)
        assert len(r) < 400 and "tensor(" not in r, r
        node, _ = obj.top(1)[0]
        assert str(node) in r, r


def test_html_views_have_one_cell_per_value():
    model = _model()
    de = A.direct_effects(model, TOKENS, A.LogitDiff(3, 5))
    grid = de.heads_grid()
    page = de._repr_html_()
    assert page.startswith("<style>") and "</table>" in page
    assert len(re.findall(r"<td data-v=", page)) == grid.values.numel()
    assert grid._repr_html_() == page
    assert "http" not in page  # nothing fetched


def test_scores_hold_no_autograd_graph():
    """The write norms multiply by weights that require grad (an unfrozen model); the scores must
    not keep the graph alive."""
    from tdb_lens.sae import SAE, SAEConfig

    model = _model()
    model.add_sae(SAE(SAEConfig(d_in=64, d_sae=32, architecture="standard", hook_name="blocks.1.hook_resid_post")))
    ag = A.act_times_grad(model, TOKENS, A.LogitDiff(3, 5))
    tensors = [t for sc in (ag.effect, ag.write_norm)
               for t in [sc.head, sc.neuron, sc.attn, sc.mlp, *sc.sae.values(), *sc.sae_error.values()] if t is not None]
    assert tensors and not any(t.requires_grad for t in tensors)


def test_a_non_finite_metric_is_named_not_propagated():
    """A NaN put into the residual of one prompt (issue 13): attribution and patching used to return
    all-NaN results without a word; now they name the prompt."""
    import pytest

    model = _model()

    def nan_row(x, hook):
        x = x.clone()
        x[1, 2] = float("nan")
        return x

    metric = A.LogitDiff(3, 5)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", nan_row)]):
        with pytest.raises(A.NonFiniteMetricError, match=r"prompt\(s\) \[1\]"):
            A.act_times_grad(model, TOKENS, metric)
        with pytest.raises(A.NonFiniteMetricError, match="clean run"):
            A.activation_patch(model, TOKENS, TOKENS.flip(0), metric, nodes=["L1.H0@-1"])
    assert model.n_hooks() == 0
    A.act_times_grad(model, TOKENS, metric)  # and a clean run is fine
