"""tdb_lens.patching's *_every sweeps and tdb_lens.evals.ioi_eval against transformer_lens' on the
same random GPT-2 weights (same arguments, same output layout, same values)."""

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
from tdb_lens import evals, patching
from tdb_lens.ioi import IOIDataset

warnings.filterwarnings("ignore", module="transformer_lens")
from transformer_lens import evals as tl_evals  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

TOL = 1e-5


@lru_cache(maxsize=1)
def pair():
    hf = make_hf_gpt2(seed=9, n_layer=1, vocab_size=50257, n_positions=64, block_std=0.1)
    return tdb_lens.HookedTransformer.from_pretrained("gpt2", hf_model=hf), make_tl(
        hf, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


def _metric(lg: torch.Tensor) -> torch.Tensor:
    return lg[:, -1, 262].mean() - lg[:, -1, 290].mean()


@pytest.mark.parametrize("name", ["get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every"])
@torch.no_grad()
def test_every_sweeps_match_transformer_lens(name):
    ours, theirs = pair()
    clean, corrupted = ours.to_tokens(["The cat sat on the mat"]), ours.to_tokens(["The dog sat on the rug"])
    _, cache = ours.run_with_cache(clean)
    _, tl_cache = theirs.run_with_cache(clean)
    got = getattr(patching, name)(ours, corrupted, cache, _metric)
    want = getattr(tl_patching, name)(theirs, corrupted, tl_cache, _metric)
    print(f"\n{name}: {tuple(got.shape)}, max |tdb - TL| {max_diff(got, want):.2e}")
    assert max_diff(got, want) < TOL
    # patching the whole clean residual entering the only block gives the clean metric (a known result)
    if name == "get_act_patch_block_every":
        full = patching.generic_activation_patch(ours, corrupted, cache, _metric, "resid_pre", ("layer",))
        assert abs(float(full[0]) - float(_metric(ours(clean)))) < TOL


@torch.no_grad()
def test_ioi_eval_matches_transformer_lens_on_the_same_dataset():
    ours, theirs = pair()
    data = IOIDataset.generate(ours, 12, seed=1)
    items = [{"prompt": ours.to_tokens(p.text + " " + p.io)[0], "IO": ours.to_tokens(" " + p.io, prepend_bos=False)[0],
              "S": ours.to_tokens(" " + p.s, prepend_bos=False)[0]} for p in data.prompts]
    got, want = evals.ioi_eval(ours, dataset=items, batch_size=5), tl_evals.ioi_eval(theirs, dataset=items, batch_size=5)
    assert set(got) == set(want) == {"Logit Difference", "Accuracy"}
    assert abs(got["Logit Difference"] - want["Logit Difference"]) < TOL and got["Accuracy"] == want["Accuracy"]
    # the generated-data path reads the same prompts the same way
    assert abs(evals.ioi_eval(ours, num_samples=12, seed=1)["Logit Difference"] - got["Logit Difference"]) < TOL
