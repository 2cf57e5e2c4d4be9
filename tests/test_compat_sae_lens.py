"""SAELens ``HookedSAETransformer`` idioms run unchanged on sae_lens and on tdb_lens.

The same random GPT-2 weights in ``sae_lens.HookedSAETransformer`` and in tdb_lens, the same
``sae_lens`` SAE objects passed to both (tdb_lens converts them, sharing their tensors):
``run_with_cache_with_saes``, ``run_with_saes`` (with and without the error term),
``run_with_hooks_with_saes`` and ``add_sae`` must give the same outputs and SAE activations.
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
from _gpt2_reference import _fake_hub_cache, hf_tokenizer, make_hf_gpt2, max_diff
from tdb_lens.sae_lens_compat import from_sae_lens

warnings.filterwarnings("ignore", module="sae_lens")
warnings.filterwarnings("ignore", module="transformer_lens")
import sae_lens  # noqa: E402  (a test dependency, like transformer_lens)

TOL = 1e-5
PROMPT = "When John and Mary went to the shops, John gave the bag to"


@lru_cache(maxsize=1)
def models():
    hf = make_hf_gpt2(seed=7, n_layer=2, vocab_size=50257, n_positions=64)
    theirs = sae_lens.HookedSAETransformer.from_pretrained_no_processing(
        "gpt2", hf_model=hf, tokenizer=hf_tokenizer(), device="cpu", dtype=torch.float32,
        cache_dir=_fake_hub_cache(hf), local_files_only=True)
    ours = tdb_lens.HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf)
    return ours, theirs


def make_sae(kind: str, hook: str, seed: int):
    cfgs = {"standard": sae_lens.StandardSAEConfig(d_in=64, d_sae=96),
            "topk": sae_lens.TopKSAEConfig(d_in=64, d_sae=96, k=8),
            "jumprelu": sae_lens.JumpReLUSAEConfig(d_in=64, d_sae=96)}
    d = cfgs[kind].to_dict()
    d["metadata"] = {**d.get("metadata", {}), "hook_name": hook}
    sae = sae_lens.SAE.from_dict(d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.02 * torch.rand(p.shape, generator=g) if name == "threshold" else 0.1 * torch.randn(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
@torch.no_grad()
def test_run_with_cache_with_saes_matches_sae_lens(kind):
    ours, theirs = models()
    saes = [make_sae(kind, "blocks.0.hook_resid_post", 1), make_sae(kind, "blocks.1.hook_resid_pre", 2)]
    tokens = ours.to_tokens(PROMPT)
    out, cache = ours.run_with_cache_with_saes(tokens, saes=saes)
    tl_out, tl_cache = theirs.run_with_cache_with_saes(tokens, saes=saes)
    sae_keys = sorted(k for k in cache.keys() if "hook_sae_" in k)
    assert len(sae_keys) == 10 and set(sae_keys) <= set(tl_cache.keys())
    errs = {k: max_diff(cache[k], tl_cache[k]) for k in sae_keys}
    errs["logits"] = max_diff(out, tl_out)
    worst = max(errs, key=errs.get)
    print(f"\n{kind}: max |tdb - sae_lens| {errs[worst]:.2e} ({worst})")
    assert errs[worst] < TOL, errs
    # SAELens' default (use_error_term from the SAE: False) changes the output; with the error term it does not
    assert max_diff(out, ours(tokens)) > 1e-3
    with_err = ours.run_with_saes(tokens, saes=saes, use_error_term=True)
    assert max_diff(with_err, theirs.run_with_saes(tokens, saes=saes, use_error_term=True)) < TOL
    assert max_diff(with_err, ours(tokens)) < TOL
    assert ours.attached_saes == {} and len(theirs.acts_to_saes) == 0  # nothing left attached


@torch.no_grad()
def test_add_sae_and_hooks_with_saes_match_sae_lens():
    ours, theirs = models()
    sae = make_sae("standard", "blocks.0.hook_resid_post", 3)
    tokens = ours.to_tokens(PROMPT)
    name = "blocks.0.hook_resid_post.hook_sae_acts_post"

    def zero_latent_5(acts, hook):
        acts[..., 5] = 0.0
        return acts

    ablated = ours.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(name, zero_latent_5)])
    tl_ablated = theirs.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(name, zero_latent_5)])
    assert max_diff(ablated, tl_ablated) < TOL
    # SAELens' add_sae keeps the SAE's use_error_term (False); tdb_lens' add_sae defaults to True (PORTING.md)
    theirs.add_sae(sae)
    ours.add_sae(sae, use_error_term=False)
    try:
        assert max_diff(ours(tokens), theirs(tokens)) < TOL
    finally:
        theirs.reset_saes()
        ours.reset_saes()
    # the converted SAE is the same object each time and shares the sae_lens tensors (no copy)
    mine = from_sae_lens(sae)
    assert from_sae_lens(sae) is mine and mine.W_enc.data_ptr() == sae.W_enc.data_ptr()
    x = torch.randn(3, 64)
    assert max_diff(mine.encode(x), sae.encode(x)) < TOL
    assert max_diff(mine.decode(mine.encode(x)), sae.decode(sae.encode(x))) < TOL
    with pytest.raises(TypeError, match="sae_lens SAE"):
        ours.add_sae(torch.nn.Linear(64, 64))  # type: ignore[arg-type]
    assert ours.attached_saes == {}
