"""Harvesting against brute force over the whole activation matrix; crash + resume; worker merge."""

import json
import math
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
                 "sample_bins", "quantile_edges", "random_windows", "random_acts", "tail_values", "tail_tokens"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(torch.nan_to_num(x.float(), nan=-7.0), torch.nan_to_num(y.float(), nan=-7.0)), name
    for k in a.stats:
        torch.testing.assert_close(a.stats[k], b.stats[k], rtol=1e-6, atol=1e-6)


# ---- the per-token tail and exact quantiles ----------------------------------------------------
def _tail_by_hand(flat: torch.Tensor, t: int) -> list[list[int]]:
    """Each unit's ``t`` largest token activations: value descending, then token index ascending."""
    return [sorted(range(flat.shape[0]), key=lambda j: (-float(flat[j, i]), j))[:t] for i in range(flat.shape[1])]


@pytest.mark.parametrize("hook, units", [(HOOK, [0, 5, 17, 40]), ("hook_embed", [0, 3, 31])])
def test_tail_is_the_top_tokens_of_every_harvested_token(model, corpus, tmp_path, hook, units):
    """The tail equals torch.topk over every token activation recomputed with run_with_cache, with
    ties (the embedding of the BOS token that starts every window) broken by the lower token index."""
    T = 64
    res = harvest(model, corpus, hook, tmp_path / "t", units=units, **{**KW, "n_tail": T})
    flat = brute_force(model, corpus, hook, units).reshape(-1, len(units))  # [N * C, n]: token w * C + c
    assert int(res.stats["n_tokens"]) == flat.shape[0] == N_WIN * CTX
    assert res.tail_values.shape == res.tail_tokens.shape == (len(units), T)
    torch.testing.assert_close(res.tail_values, torch.topk(flat.T, T, dim=1).values, rtol=0, atol=0)
    assert res.tail_tokens.tolist() == _tail_by_hand(flat, T)
    torch.testing.assert_close(res.tail_values, flat.T.gather(1, res.tail_tokens), rtol=0, atol=0)
    if hook == "hook_embed":  # the test exercises ties
        tv = res.tail_values
        assert bool((tv[:, 1:] == tv[:, :-1]).any())


def test_quantiles_exact_from_the_tail_else_the_named_sample(model, corpus, tmp_path):
    """Rule: with N tokens and a tail of T, q is exact when (1 - q)(N - 1) <= T - 1; it then equals
    torch.quantile over every recomputed activation; below, the random windows' tokens are used."""
    from tdb_lens.explain.quantiles import min_exact_quantile

    units, T = [0, 5, 17], 64
    res = harvest(model, corpus, HOOK, tmp_path / "q", units=units, **{**KW, "n_tail": T})
    A = brute_force(model, corpus, HOOK, units)
    flat = A.reshape(-1, len(units)).double()
    N = flat.shape[0]
    q_min = min_exact_quantile(N, T)
    assert q_min == (N - T) / (N - 1) and 0.88 < q_min < 0.89
    rids = random_window_ids(N_WIN, KW["n_random"], KW["seed"])
    for i, u in enumerate(units):
        for q in (0.99, 0.999, q_min, 0.95):
            est = res.quantile(u, q)
            assert est.exact and est.n_tokens == N and est.describe() == f"q={q:g} of {N:,} tokens (exact)"
            assert abs(est.value - float(torch.quantile(flat[:, i], q))) <= 1e-6, (u, q)
        for q in (0.5, 0.88):  # below the rule: the random windows' tokens, and the reason
            est = res.quantile(u, q)
            sample = A[rids, :, i].reshape(-1)
            assert not est.exact and est.n_used == sample.numel() == KW["n_random"] * CTX
            assert math.isclose(est.value, float(torch.quantile(sample, q)), rel_tol=1e-6, abs_tol=1e-7)
            assert f"sample of {sample.numel()} tokens" in est.describe() and f"below q={q_min:.6g}" in est.reason
    # a tail holding every token answers every quantile
    whole = harvest(model, corpus, HOOK, tmp_path / "w", units=units, **{**KW, "n_tail": N + 5})
    for q in (0.01, 0.5, 0.999):
        assert abs(whole.quantile(17, q).value - float(torch.quantile(flat[:, 2], q))) <= 1e-6
    with pytest.raises(ValueError, match=r"quantile must be a number in \(0, 1\)"):
        res.quantile(0, 1.0)
    with pytest.raises(ValueError, match="n_tail must be >= 0"):
        harvest(model, corpus, HOOK, tmp_path / "bad", units=units, **{**KW, "n_tail": -1})
    assert not (tmp_path / "bad").exists()


def test_harvest_without_a_tail_loads_and_falls_back(model, corpus, tmp_path):
    """A directory written before the tail existed (no tail tensors, no n_tail in the manifest) loads;
    quantiles come from the sample and say why; resuming it asks for n_tail=0 or a new directory."""
    import shutil

    from safetensors.torch import load_file, save_file

    units = [4, 9]
    new = harvest(model, corpus, HOOK, tmp_path / "new", units=units, **KW)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    man = json.loads((old / "manifest.json").read_text())
    del man["config"]["n_tail"]
    (old / "manifest.json").write_text(json.dumps(man))
    sp = str(old / "worker-0-of-1/state.safetensors")
    from safetensors import safe_open

    with safe_open(sp, framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in load_file(sp).items() if not k.startswith("tail_")}, sp, metadata=meta)
    res = load_harvest(old)
    assert res.config.n_tail == 0 and res.tail_values.shape == (2, 0)
    est = res.quantile(9, 0.999)
    assert not est.exact and "no per-token tail" in est.reason
    rids = random_window_ids(N_WIN, KW["n_random"], KW["seed"])
    sample = brute_force(model, corpus, HOOK, units)[rids, :, 1].reshape(-1)
    assert math.isclose(est.value, float(torch.quantile(sample, 0.999)), rel_tol=1e-6, abs_tol=1e-7)
    assert new.quantile(9, 0.999).exact
    with pytest.raises(ValueError, match=r"without a per-token tail.*n_tail=0"):
        harvest(model, corpus, HOOK, old, units=units, **KW)
    again = harvest(model, corpus, HOOK, old, units=units, **{**KW, "n_tail": 0})
    assert again.complete and torch.equal(again.top_values, new.top_values)
    # another tail size is another harvest: refused for resuming and for merging
    with pytest.raises(ValueError, match=r"different harvest \(config differs"):
        harvest(model, corpus, HOOK, tmp_path / "new", units=units, **{**KW, "n_tail": 8})
    with pytest.raises(ValueError, match="config differ"):
        load_harvest(tmp_path / "new", old)


def test_explain_cli_passes_tail_and_random_windows(model, tmp_path, capsys):
    """``tdb-lens explain --tail N --random-windows M`` harvests with them (and names them in the
    default harvest folder, so runs with other settings do not collide)."""
    from tdb_lens.explain.cli import main

    argv = ["--hook", HOOK, "--units", "0-1", "--n-windows", "12", "--ctx-len", str(CTX), "--k", "3",
            "--explainer", "top-tokens", "--db", str(tmp_path / "e.db"), "--no-progress"]
    assert main(argv + ["--tail", "16", "--random-windows", "3"], model=model) == 0, capsys.readouterr().err
    (hdir,) = [p.parent for p in (tmp_path / "e-harvest").glob("*/manifest.json")]
    assert "-k3-t16-r3-" in hdir.name
    res = load_harvest(hdir)
    assert (res.config.n_tail, res.config.n_random) == (16, 3)
    assert res.tail_values.shape == (2, 16) and len(res.random_windows) == 3
    flat = brute_force(model, build_corpus(model, default_corpus_path(), ctx_len=CTX, n_windows=12, seed=0), HOOK,
                       [0, 1]).reshape(-1, 2)
    torch.testing.assert_close(res.tail_values, torch.topk(flat.T, 16, dim=1).values, rtol=0, atol=0)


def test_tail_state_is_independent_of_batching_and_workers():
    """The running tail (many ties, NaN and -inf activations) equals the brute-force order (value
    descending, token index ascending, NaN never kept) whatever the batch sizes, and two workers'
    tails merge to the same."""
    from tdb_lens.explain.harvest_state import HarvestConfig, _State

    g = torch.Generator().manual_seed(0)
    n, N, T = 6, 300, 40
    vals = torch.randint(-15, 15, (n, N), generator=g).float()  # few distinct values: ties everywhere
    vals[0, ::7] = float("nan")
    vals[1, ::5] = float("-inf")
    vals[2, :] = torch.randn(N, generator=g)  # distinct values: the top-k path
    vals[3, :250] = float("nan")  # fewer than T real values
    vals[4, :] = float("nan")  # exactly T real values, a third of them -inf
    vals[4, 200:240] = torch.randn(40, generator=g)
    vals[4, 200:240:3] = float("-inf")
    want_i = torch.full((n, T), -1, dtype=torch.long)
    want_v = torch.full((n, T), float("-inf"))
    for u in range(n):
        order = sorted((j for j in range(N) if not math.isnan(float(vals[u, j]))), key=lambda j: (-float(vals[u, j]), j))[:T]
        want_i[u, : len(order)] = torch.tensor(order, dtype=torch.long)
        want_v[u, : len(order)] = vals[u, order]
    cfg = HarvestConfig("h", list(range(n)), n_tail=T)
    for trial in range(5):
        cuts = sorted(torch.randperm(N - 1, generator=g)[: 4 * trial - 1].add(1).tolist()) if trial else []
        spans = list(zip([0] + cuts, cuts + [N]))
        states = [_State.empty(n, cfg, 1, 0) for _ in range(2)]
        one = _State.empty(n, cfg, 1, 0)
        for b, (s, e) in enumerate(spans):
            one.update_tail(vals[:, s:e], torch.arange(s, e))
            states[b % 2].update_tail(vals[:, s:e], torch.arange(s, e))
        states[1].merge_tail(states[0].tail_val, states[0].tail_idx)
        for st in (one, states[1]):
            assert st.tail_idx.tolist() == want_i.tolist(), trial
            assert torch.equal(st.tail_val, want_v), trial
