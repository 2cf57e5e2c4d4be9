"""SAE training data-parallel over 2 torchrun ranks (DDP, gloo, one thread each) reaches the
parameters and metrics of one process trained on the same global batches; a killed rank fails the
job and a rerun resumes from the last checkpoint to the same parameters."""

from __future__ import annotations

import json

import pytest
import torch

from _dist_launch import explain, torchrun
from _dist_sae import STEPS, configs, stream
from tdb_lens.distributed import Dist
from tdb_lens.sae.distributed import DistributedSAETrainer, RankSlice
from tdb_lens.sae.loading import load_sae
from tdb_lens.sae.sae import SAE
from tdb_lens.sae.training import SAETrainer

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def one_process(arch: str):
    """The reference: the ordinary trainer on the global batches."""
    sae_cfg, train_cfg = configs(arch)
    torch.manual_seed(train_cfg.seed)
    trainer = SAETrainer(SAE(sae_cfg), train_cfg, stream(arch), progress=False)
    return trainer.train(), trainer.history


def assert_same_sae(got: SAE, ref: SAE) -> None:
    for name in PARAMS:
        torch.testing.assert_close(getattr(got, name).detach(), getattr(ref, name).detach(), rtol=0, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def assert_same_history(history: list[dict], ref: list[dict]) -> None:
    assert [h["step"] for h in history] == [h["step"] for h in ref] == list(range(1, STEPS + 1))
    for got, want in zip(history, ref):
        assert set(got) >= {"mse", "fvu", "l0", "loss", "dead_fraction"}
        for key in ("mse", "fvu", "l0", "loss", "dead_fraction", "aux", "l1", "resampled"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)


@pytest.fixture(scope="module", params=["topk", "standard"])
def arch_and_reference(request):
    sae, history = one_process(request.param)
    # the run exercises what the ranks must agree on: dead latents (AuxK) or resampling
    key = "aux" if request.param == "topk" else "resampled"
    assert any(h.get(key, 0) > 0 for h in history), key
    return request.param, sae, history


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, arch_and_reference):
    arch, ref, ref_history = arch_and_reference
    proc = torchrun("_dist_sae.py", str(tmp_path), arch)
    assert proc.returncode == 0, explain(proc)
    assert_same_sae(load_sae(str(tmp_path)), ref)
    assert_same_history(json.loads((tmp_path / "training_log.json").read_text())["history"], ref_history)
    assert "[rank 1/2] sae done" in proc.stderr


def test_killed_rank_fails_and_the_rerun_resumes_to_the_same_sae(tmp_path, arch_and_reference):
    arch, ref, _ = arch_and_reference
    # rank 1 dies asking for its 6th batch, after the checkpoint at step 3 and before the one at step 6
    killed = torchrun("_dist_sae.py", str(tmp_path), arch, extra_env={"DIE_RANK": "1", "DIE_AT": "6"})
    assert killed.returncode != 0, explain(killed)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3 and not (tmp_path / "cfg.json").exists()
    state = json.loads((tmp_path / "checkpoints" / "step-3" / "trainer.json").read_text())["data_state"]
    assert state["world_size"] == 2 and state["ranks"] == [{"batches_read": 3}, {"batches_read": 3}]
    rerun = torchrun("_dist_sae.py", str(tmp_path), arch)
    assert rerun.returncode == 0, explain(rerun)
    assert_same_sae(load_sae(str(tmp_path)), ref)


def test_plain_process_is_the_ordinary_trainer(arch_and_reference):
    arch, ref, ref_history = arch_and_reference
    sae_cfg, train_cfg = configs(arch)
    torch.manual_seed(train_cfg.seed)
    trainer = DistributedSAETrainer(SAE(sae_cfg), train_cfg, RankSlice(stream(arch), Dist()), progress=False, dist=Dist())
    got = trainer.train()
    for name in PARAMS:
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    def timeless(history):
        return [{k: v for k, v in h.items() if k != "activations_per_s"} for h in history]

    assert timeless(trainer.history) == timeless(ref_history)


def test_global_batch_must_split_evenly():
    sae_cfg, train_cfg = configs("topk")
    with pytest.raises(ValueError, match="global batch size 64 must be a multiple of the world size 3"):
        DistributedSAETrainer(SAE(sae_cfg), train_cfg, stream("topk"), progress=False,
                              dist=Dist(rank=0, world_size=3))
