"""A harvest sharded over 2 torchrun ranks (gloo, one thread each) merges to exactly the 1-process
harvest; a rank killed mid-harvest fails the job and a rerun resumes each rank to the same result."""

from __future__ import annotations

import random

import pytest
import torch

from _dist_harvest import HOOKS, SETTINGS, tiny_corpus, tiny_model
from _dist_launch import explain, torchrun
from tdb_lens.explain.harvest import harvest
from tdb_lens.explain.sharding import harvest_sharded, load_sharded, shard_dirs

EXACT = ("top_values", "top_windows", "top_acts", "sample_windows", "sample_values", "sample_acts", "sample_bins",
         "quantile_edges", "random_windows", "random_acts", "tail_values", "tail_tokens")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = "the cat dog ran sat on a mat red blue green house tree river stone".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(lines))
    return path


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    """The 1-process harvests of every hook (the plain `harvest`, one worker)."""
    model = tiny_model()
    corpus = tiny_corpus(model, str(text_file))
    out = tmp_path_factory.mktemp("ref")
    return {h: harvest(model, corpus, h, out / h, progress=False, **SETTINGS) for h in HOOKS}


def assert_same(got, ref):
    assert got.complete and ref.complete
    assert got.units == ref.units and sorted(got.done_batches) == sorted(ref.done_batches)
    for name in EXACT:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0)), name
    for key in ("max", "min", "density", "window_density", "n_tokens"):
        assert torch.equal(got.stats[key], ref.stats[key]), key
    for key in ("mean", "std"):
        torch.testing.assert_close(got.stats[key], ref.stats[key], rtol=1e-6, atol=1e-7)
    assert torch.equal(got.window_scores(), ref.window_scores())


def test_reference_exercises_ties_and_samples(reference):
    # ties: some unit keeps two windows of equal score in its top-k (broken by window index)
    ref = reference["hook_embed"]
    tv, tw = ref.top_values, ref.top_windows
    tie = (tv[:, 1:] == tv[:, :-1]) & (tw[:, 1:] >= 0)
    assert bool(tie.any())
    assert bool((tw[:, 1:][tie] > tw[:, :-1][tie]).all())
    # and in the per-token tail (the same token's embedding in many windows), broken by token index
    tv, ti = ref.tail_values, ref.tail_tokens
    tie = (tv[:, 1:] == tv[:, :-1]) & (ti[:, 1:] >= 0)
    assert bool(tie.any()) and bool((ti[:, 1:][tie] > ti[:, :-1][tie]).all())
    assert ref.tail_values.shape[1] == 256 and int(ref.stats["n_tokens"]) == 64 * 12
    for r in reference.values():
        assert bool((r.sample_windows >= 0).any()) and len(r.random_windows) == SETTINGS["n_random"]


def test_two_ranks_merge_to_the_one_process_harvest(text_file, reference, tmp_path):
    proc = torchrun("_dist_harvest.py", str(tmp_path), str(text_file))
    assert proc.returncode == 0, explain(proc)
    n_batches = 64 // SETTINGS["batch_size"]
    for hook in HOOKS:
        world, dirs = shard_dirs(tmp_path / hook)
        assert world == 2 and [p.name for p in dirs] == ["rank-0-of-2", "rank-1-of-2"]
        got = load_sharded(tmp_path / hook)  # merged by a later process (this one)
        assert_same(got, reference[hook])
        # each rank did its own batches only
        assert len(got.done_batches) == n_batches
    forwards = [int((tmp_path / f"forwards-rank-{r}.txt").read_text()) for r in range(2)]
    assert forwards == [len(HOOKS) * n_batches // 2] * 2
    assert "[rank 1/2] harvest done" in proc.stderr


def test_killed_rank_fails_the_job_and_a_rerun_resumes_exactly(text_file, reference, tmp_path):
    n_batches = 64 // SETTINGS["batch_size"]
    killed = torchrun("_dist_harvest.py", str(tmp_path), str(text_file), extra_env={"DIE_RANK": "1", "DIE_AFTER": "2"})
    assert killed.returncode != 0, explain(killed)
    # rank 1 finished 2 batches of the first hook before it died; no merged result claims completeness
    partial = load_sharded(tmp_path / HOOKS[0])
    assert not partial.complete
    assert {b for b in partial.done_batches if b % 2 == 1} == {1, 3}
    rerun = torchrun("_dist_harvest.py", str(tmp_path), str(text_file))
    assert rerun.returncode == 0, explain(rerun)
    # the rerun of rank 1 skipped its 2 finished batches
    assert int((tmp_path / "forwards-rank-1.txt").read_text().split()[-1]) == len(HOOKS) * n_batches // 2 - 2
    for hook in HOOKS:
        assert_same(load_sharded(tmp_path / hook), reference[hook])


def test_torchrun_restart_after_a_killed_rank_resumes_exactly(text_file, reference, tmp_path):
    n_batches = 64 // SETTINGS["batch_size"]
    proc = torchrun("_dist_harvest.py", str(tmp_path), str(text_file), torchrun_args=("--max-restarts=1",),
                    extra_env={"DIE_RANK": "1", "DIE_AFTER": "3", "DIE_ONCE": "1"})
    assert proc.returncode == 0, explain(proc)
    # one attempt died (no forward count written), the restart resumed rank 1 after its 3 finished batches
    assert (tmp_path / "forwards-rank-1.txt").read_text().split() == [str(len(HOOKS) * n_batches // 2 - 3)]
    for hook in HOOKS:
        assert_same(load_sharded(tmp_path / hook), reference[hook])


def test_plain_process_is_one_shard_and_other_world_sizes_are_refused(text_file, reference, tmp_path):
    model = tiny_model()
    corpus = tiny_corpus(model, str(text_file))
    hook = HOOKS[0]
    got = harvest_sharded(model, corpus, hook, tmp_path, progress=False, **SETTINGS)
    assert shard_dirs(tmp_path)[0] == 1
    assert_same(got, reference[hook])
    (tmp_path / "rank-0-of-2").mkdir()
    with pytest.raises(ValueError, match=r"shards of harvests with \[1, 2\] ranks"):
        harvest_sharded(model, corpus, hook, tmp_path, progress=False, **SETTINGS)
    (tmp_path / "rank-0-of-2").rmdir()
    with pytest.raises(TypeError, match="sets 'worker' itself"):
        harvest_sharded(model, corpus, hook, tmp_path, worker=1, **SETTINGS)
    with pytest.raises(FileNotFoundError, match="no sharded harvest"):
        load_sharded(tmp_path / "nothing")
