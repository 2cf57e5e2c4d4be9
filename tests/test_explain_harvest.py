"""Harvesting against brute force over the whole activation matrix; crash + resume; worker merge."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tdb_lens import HookedGPT2
from tdb_lens.explain.corpus import build_corpus, default_corpus_path, iter_texts
from tdb_lens.explain.harvest import harvest, load_harvest, priorities, random_window_ids

HOOK = "blocks.1.mlp.hook_post"
N_WIN, CTX, BATCH = 45, 12, 8  # 6 batches, the last one partial
KW = dict(k=5, n_sample=7, n_random=6, n_quantiles=4, batch_size=BATCH, seed=3, progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HookedGPT2.from_config(n_layers=2, d_model=32, n_heads=4, d_mlp=48, n_ctx=64, seed=1).eval()


@pytest.fixture(scope="module")
def corpus(model):
    return build_corpus(model, default_corpus_path(), ctx_len=CTX, n_windows=N_WIN, seed=0)


def brute_force(model, corpus, hook, units):
    with torch.no_grad():
        _, cache = model.run_with_cache(corpus.tokens, names_filter=hook)
    return cache[hook][..., units].float()  # [N, C, n]


def test_corpus_is_deterministic_and_checked(model, tmp_path):
    a = build_corpus(model, default_corpus_path(), ctx_len=CTX, n_windows=10, seed=5)
    b = build_corpus(model, default_corpus_path(), ctx_len=CTX, n_windows=10, seed=5)
    c = build_corpus(model, default_corpus_path(), ctx_len=CTX, n_windows=10, seed=6)
    assert torch.equal(a.tokens, b.tokens) and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert (a.tokens[:, 0] == model.tokenizer.bos_token_id).all()  # GPT-2 convention: BOS first
    # local formats: JSONL and plain text, in file order
    (tmp_path / "d.jsonl").write_text('{"text": "one two"}\n{"text": "three"}\n')
    assert list(iter_texts(tmp_path / "d.jsonl")) == ["one two", "three"]
    (tmp_path / "p.txt").write_text("para one\n\npara two\n")
    assert list(iter_texts(tmp_path / "p.txt")) == ["para one", "para two"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="'text' field"):
        list(iter_texts(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        list(iter_texts(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="fewer than one window"):
        build_corpus(model, ["tiny"], ctx_len=CTX, n_windows=3)
    with pytest.raises(ValueError, match="asked for"):
        build_corpus(model, ["a b c d e f g h i j k l m n o p q r s t u v w"], ctx_len=CTX, n_windows=3)


def test_default_corpus_error_names_package(monkeypatch):
    import tdb_lens.explain.corpus as C

    monkeypatch.setattr(C, "DEBIAN_CORPUS_DIRS", ("/nonexistent/fortunes",))
    monkeypatch.delenv("TDB_LENS_CORPUS", raising=False)
    with pytest.raises(C.CorpusUnavailableError, match="apt-get install -y fortunes"):
        C.default_corpus_path()


def test_hf_source_offline_error(monkeypatch):
    import tdb_lens.explain.corpus as C

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(C.CorpusUnavailableError, match="could not open Hugging Face dataset"):
        list(C.iter_texts("hf:tdb-lens-no-such-owner/no-such-dataset"))


def test_harvest_equals_brute_force(model, corpus, tmp_path):
    units = [0, 5, 17, 40, 47]
    res = harvest(model, corpus, HOOK, tmp_path / "h", units=units, **KW)
    assert res.complete
    A = brute_force(model, corpus, HOOK, units)  # [N, C, n]
    wmax = A.amax(1)  # [N, n]
    for i, u in enumerate(units):
        # top-k: score descending, window id ascending on ties
        order = sorted(range(N_WIN), key=lambda w: (-float(wmax[w, i]), w))[: KW["k"]]
        assert res.top_windows[i].tolist() == order
        torch.testing.assert_close(res.top_values[i], wmax[order, i])
        torch.testing.assert_close(res.top_acts[i], A[order, :, i])
        # exact quantile edges of the active window scores
        act = wmax[:, i][wmax[:, i] > 0]
        ref = torch.quantile(act, torch.linspace(0, 1, KW["n_quantiles"] + 1))
        torch.testing.assert_close(res.quantile_edges[i], ref)
        # the sample: the n_sample active windows of lowest priority, with their bins
        pr = priorities(KW["seed"], torch.arange(N_WIN), torch.tensor([u]))[:, 0]
        cand = [w for w in range(N_WIN) if wmax[w, i] > 0]
        want = sorted(cand, key=lambda w: (int(pr[w]), w))[: KW["n_sample"]]
        got = res.sample_windows[i][res.sample_windows[i] >= 0].tolist()
        assert got == want
        torch.testing.assert_close(res.sample_acts[i][: len(want)], A[want, :, i])
        bins = torch.bucketize(wmax[want, i], ref[1:-1], right=True)
        assert res.sample_bins[i][: len(want)].tolist() == bins.tolist()
        # statistics over every token
        flat = A[:, :, i].flatten()
        assert res.stats["max"][i] == flat.max()
        torch.testing.assert_close(res.stats["mean"][i], flat.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.stats["std"][i], flat.std(unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res.stats["density"][i], (flat > 0).float().mean())
    rids = random_window_ids(N_WIN, KW["n_random"], KW["seed"])
    assert res.random_windows.tolist() == rids.tolist()
    torch.testing.assert_close(res.random_acts, A[rids].permute(2, 0, 1))
    torch.testing.assert_close(res.window_scores(), wmax)
    rec = res.record(17)
    assert rec.label == "L1.N17" and rec.top_tokens.shape == (KW["k"], CTX)
    assert torch.equal(rec.top_tokens, corpus.tokens[res.top_windows[2]])


def test_head_units_are_z_norms(model, corpus, tmp_path):
    hook = "blocks.0.attn.hook_z"
    res = harvest(model, corpus, hook, tmp_path / "z", **KW)
    assert res.units == [0, 1, 2, 3]
    with torch.no_grad():
        _, cache = model.run_with_cache(corpus.tokens, names_filter=hook)
    A = cache[hook].norm(dim=-1)  # [N, C, head]
    torch.testing.assert_close(res.top_values[:, 0], A.amax(1).amax(0))
    with pytest.raises(ValueError, match="attention patterns"):
        harvest(model, corpus, "blocks.0.attn.hook_pattern", tmp_path / "p", **KW)


class Boom(RuntimeError):
    pass


def test_killed_run_resumes_to_identical_shards(model, corpus, tmp_path):
    units = [1, 2, 3, 30]
    ref = harvest(model, corpus, HOOK, tmp_path / "ref", units=units, **KW)
    calls = {"n": 0}

    def bomb(act, hook):
        calls["n"] += act.shape[0] == BATCH  # count batches (not the one-window probe of the unit count)
        if calls["n"] == 4:  # die in the 4th batch (3 batches finished); the capture hook comes later
            raise Boom("simulated crash")

    h = model.add_hook(HOOK, bomb, prepend=True)
    try:
        with pytest.raises(Boom):
            harvest(model, corpus, HOOK, tmp_path / "run", units=units, **KW)
    finally:
        for x in h:
            x.remove()
    part = load_harvest(tmp_path / "run")
    assert not part.complete and part.done_batches == [0, 1, 2]
    res = harvest(model, corpus, HOOK, tmp_path / "run", units=units, **KW)
    _assert_same(ref, res)
    # the state files themselves are identical tensors
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref/worker-0-of-1/state.safetensors"))
    b = load_file(str(tmp_path / "run/worker-0-of-1/state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_subprocess_killed_then_resumed(model, corpus, tmp_path):
    """A real process killed by a signal mid-run (SIGKILL, no cleanup) resumes to the same result."""
    torch.save  # noqa: B018 - (the model is rebuilt from the same seed in the child)
    d = tmp_path / "sub"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from tdb_lens import HookedGPT2
        from tdb_lens.explain.corpus import build_corpus, default_corpus_path
        from tdb_lens.explain.harvest import harvest
        torch.manual_seed(0)
        m = HookedGPT2.from_config(n_layers=2, d_model=32, n_heads=4, d_mlp=48, n_ctx=64, seed=1).eval()
        c = build_corpus(m, default_corpus_path(), ctx_len={CTX}, n_windows={N_WIN}, seed=0)
        n = {{"i": 0}}
        def die(act, hook):
            n["i"] += act.shape[0] == {BATCH}
            if n["i"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        m.add_hook("{HOOK}", die, prepend=True)
        harvest(m, c, "{HOOK}", r"{d}", units=[4, 9], **{KW!r})
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert load_harvest(d).done_batches == [0, 1]
    res = harvest(model, corpus, HOOK, d, units=[4, 9], **KW)
    ref = harvest(model, corpus, HOOK, tmp_path / "ref2", units=[4, 9], **KW)
    _assert_same(ref, res)


def test_two_workers_merge_to_one_run(model, corpus, tmp_path):
    units = [0, 7, 8]
    ref = harvest(model, corpus, HOOK, tmp_path / "one", units=units, **KW)
    harvest(model, corpus, HOOK, tmp_path / "w0", units=units, worker=0, n_workers=2, **KW)
    harvest(model, corpus, HOOK, tmp_path / "w1", units=units, worker=1, n_workers=2, **KW)
    assert not load_harvest(tmp_path / "w0").complete
    merged = load_harvest(tmp_path / "w0", tmp_path / "w1")
    assert merged.complete
    _assert_same(ref, merged)
    # different settings refuse to merge or resume
    harvest(model, corpus, HOOK, tmp_path / "other", units=units, **{**KW, "k": 4})
    with pytest.raises(ValueError, match="config differ"):
        load_harvest(tmp_path / "one", tmp_path / "other")
    with pytest.raises(ValueError, match="different harvest"):
        harvest(model, corpus, HOOK, tmp_path / "one", units=[0, 7], **KW)
    assert json.loads((tmp_path / "one/manifest.json").read_text())["config"]["units"] == units


def _assert_same(a, b):
    for name in ("top_values", "top_windows", "top_acts", "sample_windows", "sample_values", "sample_acts",
                 "sample_bins", "quantile_edges", "random_windows", "random_acts"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(torch.nan_to_num(x.float(), nan=-7.0), torch.nan_to_num(y.float(), nan=-7.0)), name
    for k in a.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], rtol=1e-6, atol=1e-6)
