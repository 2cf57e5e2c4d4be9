"""``tdb-lens ioi``: argument errors, and the report writer end to end on a small random GPT-2
(the real run on SmolLM2 is in test_ioi_smollm2.py)."""

from __future__ import annotations

import json

import pytest

from tdb_lens import HookedGPT2
from tdb_lens.cli import main as tdb_main
from tdb_lens.ioi.report import format_report, run_ioi


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        tdb_main(["ioi", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--prompts", "--seed", "--out"):
        assert opt in out


def test_bad_arguments_are_refused_before_loading(capsys, tmp_path):
    assert tdb_main(["ioi", "--prompts", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--prompts must be at least 1" in capsys.readouterr().err
    assert tdb_main(["ioi", "--target", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    assert tdb_main(["ioi", "--model", str(tmp_path / "missing-model"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "cannot load model" in err and "missing-model" in err
    assert not (tmp_path / "o").exists()


def test_run_ioi_writes_report_and_heatmaps(tmp_path):
    model = HookedGPT2.from_config(n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=0).eval()
    rep = run_ioi(model, n_prompts=30, seed=3, model_name="tiny", max_heads=4, with_minimality=True, progress=False)
    r = rep.json
    assert r["model"] == "tiny" and r["n_prompts"] == 30 and r["n_heads_total"] == 8
    assert 1 <= r["n_heads"] <= 4
    heads = [h for hs in r["circuit"].values() for h in hs]
    assert len(heads) == r["n_heads"] and sorted(r["minimality"]) == sorted(heads)
    assert r["faithfulness"] == pytest.approx(r["circuit_logit_diff"] / r["logit_diff"], rel=1e-4)
    paths = rep.write(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(r))
    assert {p.name for p in paths} == {"report.json", "head_patching.png", "direct_effects.png", "detectors.png"}
    assert not list((tmp_path / "out").glob("*.tmp"))
    text = format_report(r)
    assert "faithfulness" in text and heads[0] in text
