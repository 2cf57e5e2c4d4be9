"""Family variants whose unembedding differs (a tanh soft-cap on the logits, a final logit bias):
every analysis that runs part of the model goes through the engine, so it agrees with ``forward``.

References: the variant's own ``forward`` and hand-written hooks on a full forward pass."""

from __future__ import annotations

import pytest
import torch

from _attribution_models import VOCAB, tokens
from tdb_lens.attribution import (
    LogitDiff,
    Node,
    activation_patch,
    attribution_patch,
    direct_effects,
    logit_lens,
    patch_resid,
)
from tdb_lens.models.gpt2 import HookedGPT2
from tdb_lens.models.llama import HookedLlama, LlamaConfig

CAP = 0.05


class SoftCapLlama(HookedLlama):
    """Llama with Gemma-2-style logit soft-capping: ``CAP * tanh(logits / CAP)``."""

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return CAP * torch.tanh(super().unembed(x) / CAP)


class BiasedGPT2(HookedGPT2):
    """GPT-2 with a fixed final logit bias (affine in the residual, so direct effects still add up)."""

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.linspace(-3.0, 3.0, self.cfg.d_vocab, device=x.device, dtype=x.dtype)
        return super().unembed(x) + bias


def make_variant(kind: str):
    if kind == "softcap":
        cfg = LlamaConfig(n_layers=3, n_heads=4, n_key_value_heads=2, d_model=64, d_head=16, d_mlp=128,
                          d_vocab=VOCAB, n_ctx=64, attention_bias=True)
        m = SoftCapLlama.from_config(cfg, seed=0)
    else:
        m = BiasedGPT2.from_config(n_layers=3, n_heads=4, d_model=64, d_mlp=256, d_vocab=VOCAB, n_ctx=64, seed=0)
    return m.eval()


MET = LogitDiff(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
CLEAN, CORRUPTED = tokens(3, 7, 1), tokens(3, 7, 2)


@pytest.fixture(params=["softcap", "bias"], scope="module")
def variant(request):
    return make_variant(request.param)


def _metric(m, toks, hooks=()) -> float:
    with torch.no_grad():
        return float(MET(m.run_with_hooks(toks, fwd_hooks=list(hooks))).mean())


def test_the_variant_changes_the_logits(variant):
    """The transform matters: the plain unembedding gives other logits."""
    with torch.no_grad():
        resid = variant(CLEAN, stop_at_layer=variant.cfg.n_layers)
        plain = type(variant).__mro__[1].unembed(variant, variant.ln_final(resid))
        assert (variant(CLEAN) - plain).abs().max() > 0.1


def test_activation_patching_agrees_with_forward(variant):
    # identity patches (clean into clean) give the clean metric
    nodes = [Node.resid(1, p) for p in range(7)] + [Node.head(2, 1, 4), Node.neuron(1, 3, 6)]
    same = activation_patch(variant, CLEAN, CLEAN, MET, nodes, normalise=False, progress=False)
    assert torch.allclose(same, torch.full_like(same, _metric(variant, CLEAN)), atol=1e-5)
    # a patch of a mid-layer node at a late position (the pass starts inside the model) against a
    # hand-written hook on a full forward pass of the corrupted input
    node = Node.head(1, 2, 5)
    _, cache = variant.run_with_cache(CLEAN, names_filter=[node.hook_name])

    def put(z, hook):
        z = z.clone()
        z[:, 5, 2] = cache[node.hook_name][:, 5, 2]
        return z

    want = _metric(variant, CORRUPTED, [(node.hook_name, put)])
    got = activation_patch(variant, CLEAN, CORRUPTED, MET, [node], normalise=False, progress=False)
    slow = activation_patch(variant, CLEAN, CORRUPTED, MET, [node], normalise=False, progress=False, fast=False)
    assert abs(float(got[0]) - want) < 1e-5 and abs(float(slow[0]) - want) < 1e-5
    # a whole sweep: the fast (start-inside) path equals full forward passes
    fast = patch_resid(variant, CLEAN, CORRUPTED, MET, progress=False).values
    full = patch_resid(variant, CLEAN, CORRUPTED, MET, progress=False, fast=False).values
    assert torch.allclose(fast, full, atol=1e-4)


def test_attribution_patching_of_no_change_is_the_forward_metric(variant):
    nodes = [Node.head(l, h) for l in range(3) for h in range(4)]
    out = attribution_patch(variant, CORRUPTED, CORRUPTED, MET, nodes, normalise=False)
    assert torch.allclose(out, torch.full_like(out, _metric(variant, CORRUPTED)), atol=1e-6)


def test_direct_effects_and_logit_lens_agree_with_forward(variant):
    want = MET(variant(CLEAN)).detach()
    de = direct_effects(variant, CLEAN, MET)
    assert torch.allclose(de.metric, want, atol=1e-6)
    lens = logit_lens(variant, CLEAN, MET)
    assert abs(float(lens.values[-1]) - float(want.mean())) < 1e-5
    frozen = logit_lens(variant, CLEAN, MET, frozen_scale=True)
    assert abs(float(frozen.values[-1]) - float(want.mean())) < 1e-5
    logits = logit_lens(variant, CLEAN)
    assert torch.allclose(logits[-1], variant(CLEAN), atol=1e-5)
    if isinstance(variant, BiasedGPT2):  # affine in the final residual: the direct effects add up exactly
        assert torch.allclose(de.total(), want, atol=1e-4)
        assert torch.allclose(de.resid[:, -1].sum(-1) + de.constant, want, atol=1e-4)
