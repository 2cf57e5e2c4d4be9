"""The ``tdb-lens`` commands refuse bad input before any work, with one line and a non-zero exit
(issue 13): ranges, output paths, explainers, stores, devices; ``--version``; ``hooks --layer``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tdb_lens
from tdb_lens.cli import main


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a model fails the test: the checks must come first."""
    import tdb_lens.loading

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(tdb_lens.loading, "load", boom)
    monkeypatch.setattr(tdb_lens, "load", boom)


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for w in words:
        assert w in last, (w, err)
    return last


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tdb-lens {tdb_lens.__version__}"
    assert main(["-V"]) == 0
    out = subprocess.run([sys.executable, "-m", "tdb_lens.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tdb-lens {tdb_lens.__version__}"


def test_user_error_from_a_real_process_is_one_line(tmp_path):
    """Through ``python -m tdb_lens.cli`` (the module runs as __main__): still one line, exit 2."""
    out = subprocess.run([sys.executable, "-m", "tdb_lens.cli", "ioi", "--max-heads", "-3", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "tdb-lens ioi: error: --max-heads must be at least 1, got -3"


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--prompts", "0"], ["--prompts must be at least 1"]),
    (["--max-heads", "-3"], ["--max-heads must be at least 1, got -3"]),
    (["--max-heads", "0"], ["--max-heads"]),
    (["--target", "0"], ["--target"]),
    (["--threads", "0"], ["--threads must be at least 1"]),
    (["--device", "warp9"], ["--device 'warp9' is not a torch device"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
])
def test_ioi_ranges_checked_before_loading(argv, words, capsys, tmp_path, no_model_loading):
    if "cuda" in " ".join(argv):
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 CUDA devices: cuda:7 exists")
    assert main(["ioi", *argv, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "tdb-lens ioi: error:", *words)
    assert not (tmp_path / "o").exists()


def test_ioi_out_checked_before_loading(capsys, tmp_path, no_model_loading):
    f = tmp_path / "afile"
    f.write_text("keep me")
    assert main(["ioi", "--out", str(f)]) == 2
    one_line_error(capsys, "--out", "is a file")
    assert f.read_text() == "keep me"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["ioi", "--out", str(busy)]) == 2
    one_line_error(capsys, "is not empty", "notes.txt")
    assert main(["ioi", "--out", str(f / "sub")]) == 2  # under a file: cannot be created
    one_line_error(capsys, "--out")


def test_ioi_earlier_report_folder_is_accepted(tmp_path):
    from tdb_lens.ioi.cli import REPORT_FILES, check_out_dir

    d = tmp_path / "ioi"
    d.mkdir()
    for name in REPORT_FILES:
        (d / name).write_text("old")
    check_out_dir(str(d), REPORT_FILES)  # an earlier report is overwritten, nothing else is in the way
    check_out_dir(str(tmp_path / "new" / "deeper"), REPORT_FILES)


@pytest.mark.parametrize("argv, words", [
    (["--n-windows", "0"], ["--n-windows must be at least 1"]),
    (["--k", "0"], ["--k must be at least 1"]),
    (["--k", "-2"], ["--k must be at least 1"]),
    (["--tail", "-1"], ["--tail must be at least 0, got -1"]),
    (["--random-windows", "0"], ["--random-windows must be at least 1, got 0"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--ctx-len", "1"], ["--ctx-len must be at least 2"]),
    (["--n-examples", "0"], ["--n-examples"]),
    (["--units", "5-2"], ["empty range"]),
    (["--units", "random:0"], ["N must be at least 1"]),
    (["--units", "active:x"], ["integer N"]),
    (["--units", "1,1"], ["twice"]),
    (["--explainer", "gpt-5"], ["--explainer must be local, top-tokens"]),
    (["--explainer", "openai:nourl"], ["openai:MODEL@BASE_URL"]),
    (["--explainer", ""], ["names no explainer"]),
    (["--scores", "correlation,vibes"], ["--scores: unknown ['vibes']"]),
    (["--simulator", "json"], ["--simulator json needs an OpenAI-compatible --explainer"]),
    (["--db", ""], ["--db is empty"]),
    (["--corpus", "/no/such/corpus.txt"], ["--corpus /no/such/corpus.txt: no such file"]),
    (["--sae", "/no/such/sae"], ["--sae /no/such/sae"]),
])
def test_explain_checked_before_loading(argv, words, capsys, tmp_path, no_model_loading):
    base = ["explain", "--hook", "blocks.0.mlp.hook_post", "--db", str(tmp_path / "e.db")]
    assert main(base + argv) == 2
    one_line_error(capsys, "tdb-lens explain: error:", *words)
    assert not (tmp_path / "e.db").exists()


def test_explain_paths_checked_before_loading(capsys, tmp_path, no_model_loading):
    base = ["explain", "--hook", "blocks.0.mlp.hook_post"]
    assert main(base + ["--db", str(tmp_path)]) == 2
    one_line_error(capsys, "is a directory")
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite")
    assert main(base + ["--db", str(junk)]) == 2
    one_line_error(capsys, "is not an SQLite database")
    assert junk.read_text() == "not sqlite"
    assert main(base + ["--db", str(tmp_path / "e.db"), "--harvest-dir", str(junk)]) == 2
    one_line_error(capsys, "--harvest-dir", "is a file")
    assert main(["explain", "--units", "0-1", "--db", str(tmp_path / "e.db")]) == 2
    one_line_error(capsys, "--hook is required")
    assert main(["explain", "--db", "", "--list"]) == 2
    one_line_error(capsys, "no store at ''")
    assert main(["explain", "--db", str(junk), "--search", "x", "--top", "0"]) == 2
    one_line_error(capsys, "--top must be at least 1")


def test_explain_endpoint_key_in_url_not_echoed(capsys, tmp_path, no_model_loading):
    assert main(["explain", "--hook", "h", "--explainer", "openai:m@http://u:SECRET-77@", "--db",
                 str(tmp_path / "e.db")]) == 2
    err = capsys.readouterr().err
    assert "SECRET-77" not in err and "Traceback" not in err


def test_hooks_layer_out_of_range(capsys, monkeypatch):
    from tdb_lens import GPT2Config, HookedGPT2

    tiny = HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=32), seed=0)
    import tdb_lens.loading

    monkeypatch.setattr(tdb_lens.loading, "load", lambda name: tiny)
    assert main(["hooks", "--layer", "99"]) == 2
    one_line_error(capsys, "--layer 99: the model has 2 layers")
    assert main(["hooks", "--layer", "-1"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_resid_post" in out and "blocks.0." not in out and "hook_embed" in out
    assert "[batch, pos, head, d_head]" in out
    assert main(["hooks", "--text", "  "]) == 2
    one_line_error(capsys, "--text is empty")
    monkeypatch.setattr(tdb_lens.loading, "load", lambda name: (_ for _ in ()).throw(FileNotFoundError("no file x")))
    assert main(["hooks", "--model", "x.gguf"]) == 1
    one_line_error(capsys, "cannot load model 'x.gguf'")


def test_explain_config_check_accepts_every_unit_form(tmp_path):
    """The pre-load check reads ``all`` / ``active:N`` / ``random:N`` without building unit lists
    (it once built a list of 2**40 units for ``active:1``)."""
    from tdb_lens.explain import ExplainConfig

    for spec in ("all", "active:5", "random:3", "0-3,7", "0-1000000000"):
        ExplainConfig(hook="blocks.0.mlp.hook_post", units=spec, db=str(tmp_path / "e.db")).check()
    assert not (tmp_path / "e.db").exists()
