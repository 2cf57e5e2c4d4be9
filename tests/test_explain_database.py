"""The explanation store as a database (issue 13): several writer processes lose nothing, reruns
store nothing twice, an explanation and its scores land together, NaN stays NaN, an empty path
and a locked database get their own clear errors, stores of schema 1 are upgraded in place, and a
model name seen with other weights is refused."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from tdb_lens.explain.explainer import Explanation
from tdb_lens.explain.harvest import UnitRecord
from tdb_lens.explain.store import ExplanationStore, StoreBusyError, format_table

ROOT = Path(__file__).resolve().parents[1]


def record(unit: int, hook: str = "blocks.0.mlp.hook_post") -> UnitRecord:
    toks = torch.arange(4).reshape(1, 4)
    acts = torch.tensor([[0.0, 1.0, 0.5, 0.0]])
    return UnitRecord(hook, unit, f"L0.N{unit}", [0], toks, acts, [1], toks, acts * 0, [0], toks, acts, [0],
                      [0.0, 1.0], {"max": 1.0}, kind="neuron")


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_explain_database import record
    from tdb_lens.explain.explainer import Explanation
    from tdb_lens.explain.store import ExplanationStore

    w = int(sys.argv[1])
    with ExplanationStore(sys.argv[2]) as store:
        for i in range({n}):
            uid = store.add_unit(record(i % 50), "m", "c", "fp", model_digest="d" * 32)
            store.add_explanation(uid, Explanation(f"w{{w}} i{{i}}", f"writer-{{w}}", settings=f"s{{i}}"),
                                  {{"correlation": i / 1000, "detection": w / 10}}, "test")
    print("done", w)
""")


def test_four_writer_processes_lose_nothing(tmp_path):
    """4 processes x 200 writes (unit upsert + explanation + 2 scores each, units shared between the
    writers): every row present exactly once, scores with their explanations, integrity_check ok."""
    db = tmp_path / "shared.db"
    script = WRITER.format(tests=str(ROOT / "tests"), n=200)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w), str(db)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("done")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 50
    rows = con.execute("SELECT explainer, settings, text FROM explanations").fetchall()
    assert len(rows) == 800 and len(set(rows)) == 800
    assert sorted(rows) == sorted((f"writer-{w}", f"s{i}", f"w{w} i{i}") for w in range(4) for i in range(200))
    assert con.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == 1600
    assert con.execute("SELECT COUNT(*) FROM explanations e WHERE (SELECT COUNT(*) FROM scores s "
                       "WHERE s.explanation_id = e.id) != 2").fetchone()[0] == 0
    con.close()


def test_rerun_is_idempotent_and_writes_are_atomic(tmp_path):
    with ExplanationStore(tmp_path / "x.db") as store:
        uid = store.add_unit(record(3), "m", "c", "fp")
        ex = Explanation("cities", "llm:x", 3, settings="prompt=1")
        a = store.add_explanation(uid, ex, {"correlation": 0.5, "correlation_details": {"top": 1}}, "sim")
        b = store.add_explanation(uid, Explanation("towns", "llm:x", 3, settings="prompt=1"), {"correlation": 0.7})
        assert a == b and store.counts()["explanations"] == 1 and store.counts()["scores"] == 1
        (row,) = store.explanations()
        assert row.text == "towns" and row.scores == {"correlation": 0.7}
        assert store.has_explanation(uid, "llm:x", "prompt=1", ["correlation"])
        assert not store.has_explanation(uid, "llm:x", "prompt=1", ["correlation", "detection"])
        assert not store.has_explanation(uid, "llm:x", "prompt=2")
        # other settings (a new prompt version) are another explanation
        store.add_explanation(uid, Explanation("towns", "llm:x", 3, settings="prompt=2"))
        assert store.counts()["explanations"] == 2
        # a bad score aborts the whole write: no explanation without its scores
        with pytest.raises(TypeError, match="cannot store object as JSON"):
            store.add_explanation(uid, Explanation("x", "llm:y", 3),
                                  {"correlation": 0.1, "detection": 0.2, "detection_details": {"x": object()}})
        assert store.counts()["explanations"] == 2 and not store.explanations(explainer="llm:y")


def test_nan_score_is_not_no_score(tmp_path):
    with ExplanationStore(tmp_path / "n.db") as store:
        uid = store.add_unit(record(1), "m")
        eid = store.add_explanation(uid, Explanation("x", "e"), {"correlation": float("nan"), "detection": None})
        store.add_score(eid, "fuzzing", 0.25)
    with ExplanationStore(tmp_path / "n.db") as store:
        (row,) = store.explanations()
        assert math.isnan(row.scores["correlation"]) and row.scores["detection"] is None
        assert row.scores["fuzzing"] == 0.25
        table = format_table([row], ["correlation", "detection", "fuzzing"])
        assert table.splitlines()[2].split()[2:5] == ["nan", "0.250", "x"]
        assert store.mean_scores("correlation") == {}  # NaN is not averaged in


def test_bad_paths_and_locked_databases(tmp_path):
    with pytest.raises(ValueError, match="store path is empty"):
        ExplanationStore("")
    with pytest.raises(ValueError, match="is a directory"):
        ExplanationStore(tmp_path)
    (tmp_path / "junk.db").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ValueError, match="not a tdb_lens explanation store"):
        ExplanationStore(tmp_path / "junk.db")
    # a database another process holds: reported as locked (not as "not a store"), nothing written
    plain = tmp_path / "plain.db"
    holder = sqlite3.connect(plain, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreBusyError, match="locked by another process"):
        ExplanationStore(plain, busy_timeout=0.3)
    holder.execute("ROLLBACK")
    with ExplanationStore(plain) as store:  # free again: opens (and becomes a store)
        assert store.counts()["units"] == 0
    holder.execute("BEGIN IMMEDIATE")  # a writer holding the (now WAL) store for a moment
    timer = threading.Timer(0.3, lambda: holder.execute("ROLLBACK"))
    timer.start()
    with ExplanationStore(plain, busy_timeout=60) as store:  # waits for it, then writes
        store.add_unit(record(0), "m")
        assert store.counts()["units"] == 1
    timer.join()
    holder.close()


def test_schema_1_store_is_upgraded(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE units (id INTEGER PRIMARY KEY, model TEXT NOT NULL, hook TEXT NOT NULL, unit INTEGER NOT NULL,
            label TEXT NOT NULL, kind TEXT NOT NULL, corpus TEXT NOT NULL, corpus_fingerprint TEXT NOT NULL DEFAULT '',
            stats TEXT NOT NULL DEFAULT '{}', UNIQUE (model, hook, unit, corpus_fingerprint));
        CREATE TABLE explanations (id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL, text TEXT NOT NULL,
            explainer TEXT NOT NULL, raw TEXT, created REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE scores (explanation_id INTEGER NOT NULL, method TEXT NOT NULL, value REAL,
            scorer TEXT NOT NULL DEFAULT '', details TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL,
            PRIMARY KEY (explanation_id, method));
        INSERT INTO units VALUES (1, 'm', 'blocks.0.mlp.hook_post', 3, 'L0.N3', 'neuron', 'c', 'fp', '{}');
        INSERT INTO explanations VALUES (1, 1, 'cities', 'top-tokens', NULL, 0, '{}');
        INSERT INTO explanations VALUES (2, 1, 'cities', 'top-tokens', NULL, 0, '{}');
        INSERT INTO scores VALUES (1, 'correlation', 0.5, '', '{}', 0);
    """)
    con.close()
    with ExplanationStore(db) as store:
        rows = store.explanations()
        assert [r.id for r in rows] == [1, 2] and rows[0].scores == {"correlation": 0.5}
        store.add_explanation(1, Explanation("towns", "top-tokens"))  # new rows follow the new key
        store.add_explanation(1, Explanation("towns", "top-tokens"))
        assert store.counts()["explanations"] == 3
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    con.close()


def test_store_refuses_a_model_name_with_other_weights(tmp_path):
    with ExplanationStore(tmp_path / "p.db") as store:
        store.add_unit(record(0), "smollm2-135m", model_digest="a" * 32)
        store.add_unit(record(1), "smollm2-135m", model_digest="a" * 32)
        store.add_unit(record(1), "other", model_digest="b" * 32)
        with pytest.raises(ValueError, match="other weights .*store this model under another name"):
            store.add_unit(record(2), "smollm2-135m", model_digest="b" * 32)
        assert store.counts()["units"] == 3  # nothing written by the refused call
