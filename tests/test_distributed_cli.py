"""``torchrun --nproc_per_node 2 -m tdb_lens ...`` (gloo, one thread per rank): ``explain`` shards the
harvest over the ranks and stores the same explanations and scores as the 1-process command;
``sae train`` trains with DDP and rank 0 writes and evaluates the SAE; one-process commands are
refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist_launch import HERE, explain
from _tiny_files import save_gpt2
from tdb_lens.explain.cli import main as explain_main
from tdb_lens.explain.harvest import load_harvest
from tdb_lens.explain.store import ExplanationStore

# the in-process reference runs on one thread, as each rank does (the same kernels, the same sums)
pytestmark = pytest.mark.usefixtures("one_thread")


def tdb_lens_torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TDB_LENS_KEEP_FREED_MEMORY="0", PYTHONPATH=str(HERE), TDB_LENS_DIST_BACKEND="gloo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "tdb_lens",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def explain_args(tiny_gpt2_dir, tiny_corpus, db: Path) -> list[str]:
    return ["--model", str(tiny_gpt2_dir), "--hook", "blocks.1.mlp.hook_post", "--units", "0-3", "--corpus", str(tiny_corpus),
            "--n-windows", "32", "--ctx-len", "16", "--batch-size", "4", "--explainer", "top-tokens",
            "--scores", "correlation", "--db", str(db), "--no-progress"]


def stored(db: Path) -> list[tuple]:
    with ExplanationStore(db) as store:
        return [(r.hook, r.unit, r.text, r.explainer, r.scores) for r in store.explanations()]


def harvest_dir(db: Path) -> Path:
    found = [p.parent for p in db.with_name(f"{db.stem}-harvest").glob("*/manifest.json")]
    assert len(found) == 1, found
    return found[0]


def test_explain_under_torchrun_equals_the_one_process_command(tiny_gpt2_dir, tiny_corpus, tmp_path):
    ref_db = tmp_path / "one" / "ex.db"
    ref_db.parent.mkdir()
    assert explain_main(explain_args(tiny_gpt2_dir, tiny_corpus, ref_db)) == 0
    db = tmp_path / "two" / "ex.db"
    db.parent.mkdir()
    proc = tdb_lens_torchrun("explain", *explain_args(tiny_gpt2_dir, tiny_corpus, db))
    assert proc.returncode == 0, explain(proc)
    # the harvest ran on both ranks, one shard each, and was consolidated where the command looks
    hdir = harvest_dir(db)
    shards = hdir.with_name(hdir.name + ".shards")
    assert sorted(p.name for p in shards.iterdir()) == ["rank-0-of-2", "rank-1-of-2"]
    got, ref = load_harvest(hdir), load_harvest(harvest_dir(ref_db))
    assert got.complete and got.units == ref.units == [0, 1, 2, 3]
    for name in ("top_values", "top_windows", "top_acts", "sample_windows", "sample_acts", "quantile_edges",
                 "random_windows", "random_acts"):
        assert torch.equal(getattr(got, name).nan_to_num(-7.0), getattr(ref, name).nan_to_num(-7.0)), name
    # the same explanations and scores in the store
    rows, ref_rows = stored(db), stored(ref_db)
    assert len(rows) == 4 and [r[:4] for r in rows] == [r[:4] for r in ref_rows]
    for (*_, scores), (*_, ref_scores) in zip(rows, ref_rows):
        assert scores.keys() == ref_scores.keys()
        for k in scores:
            assert scores[k] == pytest.approx(ref_scores[k], rel=1e-5, abs=1e-6, nan_ok=True)
    assert "[rank 0/2] harvesting on 2 ranks" in proc.stderr


def test_sae_train_under_torchrun(tiny_gpt2_dir, tiny_corpus, tmp_path):
    out = tmp_path / "sae"
    proc = tdb_lens_torchrun("sae", "train", "--model", str(tiny_gpt2_dir), "--hook", "blocks.0.hook_resid_post", "--corpus",
                             str(tiny_corpus), "--context-size", "32", "--k", "4", "--d-sae", "64", "--tokens", "4096",
                             "--batch-size", "256", "--eval-tokens", "256", "--checkpoint-every", "5", "--out", str(out),
                             "--quiet")
    assert proc.returncode == 0, explain(proc)
    for f in ("cfg.json", "sae_weights.safetensors", "metrics.json", "training_log.json"):
        assert (out / f).is_file(), f
    history = json.loads((out / "training_log.json").read_text())["history"]
    assert history[-1]["step"] == 4096 // 256 and history[-1]["activations"] == 4096
    state = json.loads((out / "checkpoints" / "step-15" / "trainer.json").read_text())["data_state"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert proc.stdout.count("trained 16 steps (4096 activations)") == 1  # rank 0 reports, once
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["l0"] <= 4


def test_one_process_commands_are_refused_under_torchrun(tiny_gpt2_dir):
    proc = tdb_lens_torchrun("hooks", "--model", str(tiny_gpt2_dir))
    assert proc.returncode != 0
    assert "tdb-lens hooks: error: runs in one process" in proc.stderr


def test_ioi_under_torchrun_equals_the_one_process_command(tmp_path):
    from _dist_patch import setup
    from tdb_lens.ioi.cli import main as ioi_main

    # 2 layers x 4 heads with attention 10x its initial scale (tests/_dist_patch.py), saved as a folder
    model = setup()[0]
    tiny_gpt2_dir = save_gpt2(model, tmp_path / "model")
    args = ["--model", str(tiny_gpt2_dir), "--prompts", "12", "--max-heads", "5", "--quiet"]
    assert ioi_main(args + ["--out", str(tmp_path / "one")]) == 0
    proc = tdb_lens_torchrun("ioi", *args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, explain(proc)
    got, ref = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("two", "one"))
    assert got["circuit"] == ref["circuit"] and 0 < got["n_heads"] < 8
    for key in ("logit_diff", "accuracy", "faithfulness", "circuit_logit_diff", "circuit_ablated_logit_diff",
                "completeness", "minimality"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    for g, r in zip(got["heads"], ref["heads"], strict=True):
        assert (g["class"], g["head"]) == (r["class"], r["head"])
        assert {k: v for k, v in g.items() if k not in ("class", "head")} == pytest.approx(
            {k: v for k, v in r.items() if k not in ("class", "head")}, rel=1e-5, abs=1e-6)
    assert proc.stdout.count("wrote ") == 1  # rank 0 writes the report
