"""Attribution patching against activation patching on the real SmolLM2-135M over IOI prompts."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_attribution_patching_tracks_activation_patching_of_heads(smollm2):
    from tdb_lens.attribution.metrics import LogitDiff
    from tdb_lens.attribution.patching import patch_heads
    from tdb_lens.ioi.data import IOIDataset

    ds = IOIDataset.generate(smollm2, 4, seed=0, templates=[0])  # one template: equal lengths, ABBA and BABA
    clean, corr = ds.to_batch(smollm2), ds.abc().to_batch(smollm2)
    metric = LogitDiff(clean.io_token, clean.s_token, pos=clean.end)
    kw = dict(clean_mask=clean.attention_mask, corrupted_mask=corr.attention_mask)
    att = patch_heads(smollm2, clean.tokens, corr.tokens, metric, method="attribution", **kw)
    act = patch_heads(smollm2, clean.tokens, corr.tokens, metric, method="activation", progress=False, **kw)
    assert att.values.shape == act.values.shape == (30, 9)
    r = torch.corrcoef(torch.stack([att.values.flatten(), act.values.flatten()]))[0, 1]
    print(f"SmolLM2 IOI head-output patching: corr(attribution, activation) = {float(r):.4f}; "
          f"top activation {act.top(3)}; top attribution {att.top(3)}")
    assert r >= 0.9
    # the same heads lead both rankings
    assert act.top(1)[0][0] in [n for n, _ in att.top(3)]
