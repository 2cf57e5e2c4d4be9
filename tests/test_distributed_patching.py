"""Patching sweeps and IOI metrics split over 2 torchrun ranks (gloo, one thread each) equal the
1-process calls of the same functions on every prompt."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from _dist_launch import explain, torchrun
from _dist_patch import CIRCUIT, context_metrics, pair, pass_results, setup
from tdb_lens.attribution import activation_patch, attribution_patch, path_patch
from tdb_lens.attribution.sharding import shard_rows, sharded_patch
from tdb_lens.distributed import Dist
from tdb_lens.ioi.discovery import ioi_metric


@pytest.fixture(scope="module")
def reference():
    """The 1-process numbers, from the unsharded functions."""
    model, ctx, nodes, senders = setup()
    (clean, corrupted), masks = pair(ctx)
    metric = ioi_metric(ctx.clean)
    ld, est = ctx.circuit_attribution(CIRCUIT)
    passes, seen = pass_results(ctx)  # the passes before the search, whole in one process
    return {
        "act": activation_patch(model, clean, corrupted, metric, nodes, progress=False, **masks),
        "act_raw": activation_patch(model, clean, corrupted, metric, nodes, normalise=False, progress=False, **masks),
        "attr": attribution_patch(model, clean, corrupted, metric, nodes, **masks),
        "path": path_patch(model, clean, corrupted, metric, senders, progress=False, **masks),
        "prompt_ld": ctx.clean_ld,
        "circuit_prompt_ld": ctx.run_ld(ctx.ablation_hooks(CIRCUIT)),
        "circuit_ld": torch.tensor(ctx.circuit_ld(CIRCUIT)),
        "faithfulness": torch.tensor(ctx.faithfulness(CIRCUIT)),
        "attr_ld": torch.tensor(ld), "attr_est": est,
        **context_metrics(ctx),  # what ShardedIOIContext computes under torchrun
        **passes, "pass_rows_seen": torch.tensor(seen),
    }


def test_two_ranks_equal_the_one_process_numbers(tmp_path, reference):
    proc = torchrun("_dist_patch.py", str(tmp_path))
    assert proc.returncode == 0, explain(proc)
    got = load_file(str(tmp_path / "sharded.safetensors"))
    # the passes before the search split their work: each rank ran fewer sequences, together all of them
    seen, whole = got.pop("pass_rows_seen").tolist(), int(reference["pass_rows_seen"])
    assert sum(seen) == whole and max(seen) < whole, (seen, whole)
    assert set(got) == set(reference) - {"pass_rows_seen"}
    for key, ref in reference.items():
        if key == "pass_rows_seen":
            continue
        assert got[key].shape == ref.shape, key
        torch.testing.assert_close(got[key], ref.float(), rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    # the sweep is not trivial: patches move the metric by different amounts
    assert float(reference["act"].std()) > 1e-3 and float(reference["attr_est"].abs().max()) > 0
    for key in ("pass_direct_effects", "pass_attr_end", "pass_attr_knockout", "pass_path_patching_rows",
                "pass_detector_induction", "pass_detector_previous", "pass_detector_one_seq"):
        assert float(reference[key].std()) > 1e-4, key  # heads (senders) differ: a wrong split would show
    assert "[rank 1/2] patching done" in proc.stderr


def test_plain_process_takes_every_prompt_and_bad_splits_are_named(reference):
    model, ctx, nodes, senders = setup()
    (clean, corrupted), masks = pair(ctx)
    plain = Dist()
    assert torch.equal(shard_rows(10, plain), torch.arange(10))
    got = sharded_patch(activation_patch, model, clean, corrupted, lambda rows: ioi_metric(ctx.clean[rows]), nodes,
                        dist=plain, progress=False, **masks)
    torch.testing.assert_close(got, reference["act"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 prompts cannot be split over 4 ranks"):
        shard_rows(3, Dist(rank=0, world_size=4))
    with pytest.raises(ValueError, match="must have the same shape"):
        sharded_patch(activation_patch, model, clean, corrupted[:3], lambda rows: ioi_metric(ctx.clean[rows]), nodes,
                      dist=plain)
