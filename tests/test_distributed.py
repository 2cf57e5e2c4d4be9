"""`tdb_lens.distributed`: a no-op in a plain process; under torchrun (2 ranks, gloo, one thread each)
it joins the group and its collectives give the values computed by hand here."""

from __future__ import annotations

import json

import pytest
import torch

from _dist_launch import explain, torchrun
from tdb_lens import distributed


@pytest.fixture
def plain(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    distributed.shutdown()
    yield
    distributed.shutdown()


def test_plain_process_is_rank_0_of_1_and_touches_nothing(plain):
    threads = torch.get_num_threads()
    d = distributed.init()
    assert (d.rank, d.world_size, d.backend, d.distributed, d.is_main) == (0, 1, None, False, True)
    assert not torch.distributed.is_initialized()
    assert torch.get_num_threads() == threads
    assert distributed.init() is d and distributed.current() is d
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(d.all_reduce(x), x) and d.all_reduce(x) is not x
    assert torch.equal(d.all_gather_rows(x, n=2), x)
    assert d.broadcast_object({"a": 1}) == {"a": 1} and d.all_gather_object(3) == [3]
    d.barrier()
    assert list(d.shard(5)) == [0, 1, 2, 3, 4]
    assert d.progress() and not d.progress(False)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_contiguous_in_rank_order_and_cover(n, world):
    blocks = [distributed.Dist(rank=r, world_size=world).shard(n) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_bad_environment_is_named(plain, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=3 WORLD_SIZE=2"):
        distributed.init()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="must be integers"):
        distributed.init()
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TDB_LENS_DIST_BACKEND", "mpi")
    with pytest.raises(ValueError, match="'gloo' or 'nccl' .* got 'mpi'"):
        distributed.init()
    with pytest.raises(ValueError, match="op must be one of"):
        distributed.Dist().all_reduce(torch.zeros(1), op="mean")
    with pytest.raises(ValueError, match="gathered 1 rows"):
        distributed.Dist().all_gather_rows(torch.zeros(1), n=2)


def test_two_ranks_under_torchrun_gloo_one_thread_each(tmp_path):
    proc = torchrun("_dist_helper.py", str(tmp_path))
    assert proc.returncode == 0, explain(proc)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    # shards of 7: [0, 4) and [4, 7); each rank's rows are arange + 10 * rank
    expected_rows = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0]
    for r, got in enumerate(ranks):
        assert (got["rank"], got["world"], got["local_rank"], got["backend"], got["device"]) == (r, 2, r, "gloo", "cpu")
        assert got["threads"] == 1 and got["torch_threads"] == 1
        assert got["same_object"]
        assert got["shard"] == ([0, 4] if r == 0 else [4, 7])
        assert got["gathered"] == expected_rows
        assert got["summed"] == [1.0 + 2.0, 4.0]
        assert got["max"] == [1.0]
        assert got["seed"] == {"seed": 1234}
        assert got["objects"] == [{"r": 0}, {"r": 1}]
        assert got["progress"] == (r == 0)
    # logs name the rank
    assert "[rank 0/2] hello from the helper" in proc.stderr and "[rank 1/2] hello from the helper" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL needs two CUDA GPUs; torch.cuda.is_available() is False or fewer than 2 GPUs here")
def test_two_ranks_pick_nccl_where_each_has_a_gpu(tmp_path):  # pragma: no cover - needs GPUs
    proc = torchrun("_dist_helper.py", str(tmp_path), backend="")
    assert proc.returncode == 0, explain(proc)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):
        assert (got["backend"], got["device"]) == ("nccl", f"cuda:{r}")
        assert got["gathered"] == [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0]
        assert got["summed"] == [3.0, 4.0]
