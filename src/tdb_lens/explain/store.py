"""SQLite store (standard library ``sqlite3``) of units, their examples, explanations and scores.

Tables (one file, readable by any SQLite client):

- ``models``: every model name the store has seen with the digest of its weights
  (`tdb_lens.explain.provenance`): a store refuses units of a model whose name it knows with other weights;
- ``units``: one row per (model, hook, unit, corpus): its label as `tdb_lens.attribution.nodes.Node`
  prints it (``L3.N1024``, ``blocks.3.hook_resid_post:F123``), kind, corpus fingerprint and
  statistics (JSON);
- ``examples``: the unit's harvested windows (``top``, ``random``, ``sample``): token ids and
  activations as JSON lists, the window's max activation and quantile bin;
- ``explanations``: text, explainer (provenance: ``llm:local:...``, ``top-tokens``,
  ``llm:openai:...``), the explainer's settings (prompt version, examples shown ...), raw model
  output, creation time, metadata. One row per (unit, explainer, settings): storing it again
  replaces it, so reruns and resumed runs store nothing twice;
- ``scores``: one row per (explanation, method): ``correlation``, ``detection``, ``fuzzing``,
  ``causal``..., the scorer's name and details (JSON); a score that came out NaN is kept as NaN
  (SQLite would turn it into NULL, "no score"), through the ``nan`` column;
- ``embeddings``: cached sentence embeddings of explanations (used by `tdb_lens.explain.search`).

Several processes may write one store at once: it runs in WAL mode, every write is one
``BEGIN IMMEDIATE`` transaction (an explanation with its scores together), and a writer waits for a
busy database (``busy_timeout`` seconds, then `StoreBusyError`). Re-adding a unit updates it in
place (same id) and replaces its examples.
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float

from .explainer import Explanation
from .harvest import UnitRecord

SCHEMA_VERSION = 2
TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL, hook TEXT NOT NULL, unit INTEGER NOT NULL, label TEXT NOT NULL, kind TEXT NOT NULL,
    corpus TEXT NOT NULL, corpus_fingerprint TEXT NOT NULL DEFAULT '', stats TEXT NOT NULL DEFAULT '{}',
    UNIQUE (model, hook, unit, corpus_fingerprint)
);
CREATE TABLE IF NOT EXISTS examples (
    unit_id INTEGER NOT NULL REFERENCES units (id) ON DELETE CASCADE,
    kind TEXT NOT NULL, rank INTEGER NOT NULL, window INTEGER NOT NULL,
    tokens TEXT NOT NULL, acts TEXT NOT NULL, max_act REAL NOT NULL, bin INTEGER,
    PRIMARY KEY (unit_id, kind, rank)
);
CREATE TABLE IF NOT EXISTS explanations (
    id INTEGER PRIMARY KEY,
    unit_id INTEGER NOT NULL REFERENCES units (id) ON DELETE CASCADE,
    text TEXT NOT NULL, explainer TEXT NOT NULL, raw TEXT, created REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}',
    settings TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS scores (
    explanation_id INTEGER NOT NULL REFERENCES explanations (id) ON DELETE CASCADE,
    method TEXT NOT NULL, value REAL, scorer TEXT NOT NULL DEFAULT '', details TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, nan INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (explanation_id, method)
);
CREATE TABLE IF NOT EXISTS embeddings (
    explanation_id INTEGER NOT NULL REFERENCES explanations (id) ON DELETE CASCADE,
    embedder TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (explanation_id, embedder)
)
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS units_label ON units (label);
CREATE INDEX IF NOT EXISTS explanations_unit ON explanations (unit_id);
CREATE UNIQUE INDEX IF NOT EXISTS explanations_key ON explanations (unit_id, explainer, settings)
"""
#: Schema 1 -> 2: settings (one explanation per unit, explainer and settings; old rows keep their
#: own key), NaN scores, the models table.
MIGRATE_1 = """
ALTER TABLE explanations ADD COLUMN settings TEXT NOT NULL DEFAULT '';
UPDATE explanations SET settings = 'schema1:' || id;
ALTER TABLE scores ADD COLUMN nan INTEGER NOT NULL DEFAULT 0
"""


class StoreBusyError(RuntimeError):
    """Another process held the store longer than the busy timeout."""


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _is_busy(e: sqlite3.Error) -> bool:
    msg = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


@dataclass
class ExplanationRow:
    """One explanation with its unit and scores, as `ExplanationStore.explanations` returns it."""

    id: int
    unit_id: int
    model: str
    hook: str
    unit: int
    label: str
    kind: str
    corpus: str
    text: str
    explainer: str
    scores: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} as JSON")


def _dumps(obj) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _score_value(method: str, value) -> tuple[Optional[float], int]:
    """``(value, nan flag)`` as stored: None is "no score", NaN is kept as a flag (SQLite has no NaN)."""
    if value is None:
        return None, 0
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score {method!r} must be a number or None, got {value!r}") from None
    return (None, 1) if math.isnan(v) else (v, 0)


class ExplanationStore:
    """``ExplanationStore(path)`` opens (creating if needed) a store; ``":memory:"`` for a scratch one.

    ``busy_timeout``: seconds a write (or the opening) waits for other processes holding the store.
    """

    def __init__(self, path: Union[str, os.PathLike] = ":memory:", busy_timeout: float = 60.0) -> None:
        self.path = os.fspath(path)
        if not self.path.strip():
            raise ValueError("the store path is empty: give a file path (e.g. runs/explanations.db) or ':memory:'")
        if busy_timeout <= 0:
            raise ValueError(f"busy_timeout must be > 0 seconds, got {busy_timeout}")
        self.busy_timeout = float(busy_timeout)
        if self.path != ":memory:":
            if Path(self.path).is_dir():
                raise ValueError(f"store path {self.path} is a directory; give a file path such as {self.path}/explanations.db")
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=min(self.busy_timeout, 5.0), isolation_level=None)
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self.conn.close()
            if _is_busy(e):
                raise StoreBusyError(f"{self.path} stayed locked by another process for {self.busy_timeout:.0f} s "
                                     f"(SQLite says: {e}); try again when it has finished") from None
            raise ValueError(f"{self.path} is not a tdb_lens explanation store (SQLite says: {e})") from None
        except BaseException:
            self.conn.close()
            raise

    def _open(self) -> None:
        self.conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            self._retry(lambda: self.conn.execute("PRAGMA journal_mode = WAL").fetchone())
        with self.transaction():
            for stmt in _statements(TABLES):
                self.conn.execute(stmt)
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = SCHEMA_VERSION if row is None else int(row[0])
            if version == 1:
                for stmt in _statements(MIGRATE_1):
                    self.conn.execute(stmt)
            elif version != SCHEMA_VERSION:
                raise ValueError(f"{self.path} has store schema {version}, this tdb_lens reads {SCHEMA_VERSION}")
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            for stmt in _statements(INDEXES):
                self.conn.execute(stmt)

    def _retry(self, fn):
        """``fn()``, retried with jittered sleeps while SQLite reports the database busy, up to ``busy_timeout``."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``, retried while busy): all of it or none of it."""
        if self.conn.in_transaction:  # nested: part of the outer one
            yield self.conn
            return
        try:
            self._retry(lambda: self.conn.execute("BEGIN IMMEDIATE"))
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise StoreBusyError(f"{self.path} stayed locked by another process for {self.busy_timeout:.0f} s "
                                     f"(SQLite says: {e}); nothing was written") from None
            raise
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self._retry(lambda: self.conn.execute("COMMIT"))

    # ---- context manager ----------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ExplanationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing --------------------------------------------------------------------------------
    def check_model(self, model: str, digest: str) -> None:
        """Record ``model``'s weights digest, or raise if the store knows that name with other weights."""
        with self.transaction():
            row = self.conn.execute("SELECT digest FROM models WHERE name = ?", (model,)).fetchone()
            if row is None:
                self.conn.execute("INSERT INTO models VALUES (?, ?)", (model, digest))
            elif row[0] != digest:
                raise ValueError(
                    f"{self.path} holds units of a model named {model!r} with other weights (digest {row[0][:12]}, "
                    f"this model's is {digest[:12]}); store this model under another name or use another store")

    def add_unit(self, record: UnitRecord, model: str, corpus: str = "", corpus_fingerprint: str = "",
                 examples: bool = True, model_digest: Optional[str] = None) -> int:
        """Store (or update) a harvested unit and, with ``examples``, its windows; its id.
        With ``model_digest`` (`tdb_lens.explain.provenance.ModelIdentity.digest`) the store refuses
        a model whose name it knows with other weights."""
        if not model:
            raise ValueError("add_unit needs the model's name (provenance)")
        with self.transaction():
            if model_digest is not None:
                self.check_model(model, model_digest)
            cur = self.conn.execute(
                "INSERT INTO units (model, hook, unit, label, kind, corpus, corpus_fingerprint, stats) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model, hook, unit, corpus_fingerprint) DO UPDATE SET "
                "label = excluded.label, kind = excluded.kind, corpus = excluded.corpus, stats = excluded.stats "
                "RETURNING id",
                (model, record.hook, int(record.unit), record.label, record.kind, corpus,
                 corpus_fingerprint, _dumps(record.stats)),
            )
            uid = int(cur.fetchone()[0])
            if examples:
                self.conn.execute("DELETE FROM examples WHERE unit_id = ?", (uid,))
                self.conn.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _example_rows(uid, record))
        return uid

    def add_explanation(self, unit_id: int, explanation: Explanation, scores: Optional[dict] = None,
                        scorer: str = "") -> int:
        """Store an explanation (replacing the unit's earlier one from the same explainer and
        settings, with its scores) and, given ``scores`` (`score_all`'s result), its scores, in one
        transaction; its id."""
        with self.transaction():
            self._check_unit(unit_id)
            cur = self.conn.execute(
                "INSERT INTO explanations (unit_id, text, explainer, raw, created, meta, settings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (unit_id, explainer, settings) DO UPDATE SET "
                "text = excluded.text, raw = excluded.raw, created = excluded.created, meta = excluded.meta "
                "RETURNING id",
                (unit_id, explanation.text, explanation.explainer, explanation.raw, time.time(),
                 _dumps(explanation.meta), explanation.settings),
            )
            eid = int(cur.fetchone()[0])
            self.conn.execute("DELETE FROM scores WHERE explanation_id = ?", (eid,))
            self.conn.execute("DELETE FROM embeddings WHERE explanation_id = ?", (eid,))
            if scores:
                self.add_scores(eid, scores, scorer)
        return eid

    def explanation_id(self, unit_id: int, explainer: str, settings: str = "") -> int:
        row = self.conn.execute("SELECT id FROM explanations WHERE unit_id = ? AND explainer = ? AND settings = ?",
                                (unit_id, explainer, settings)).fetchone()
        if row is None:
            raise KeyError(f"no explanation of unit {unit_id} by {explainer!r} with settings {settings!r}")
        return int(row[0])

    def has_explanation(self, unit_id: int, explainer: str, settings: str = "",
                        methods: Sequence[str] = ()) -> bool:
        """Whether the unit has an explanation from this explainer and settings with every score in ``methods``."""
        row = self.conn.execute("SELECT id FROM explanations WHERE unit_id = ? AND explainer = ? AND settings = ?",
                                (unit_id, explainer, settings)).fetchone()
        if row is None:
            return False
        have = {m for (m,) in self.conn.execute("SELECT method FROM scores WHERE explanation_id = ?", (row[0],))}
        return set(methods) <= have

    def add_score(self, explanation_id: int, method: str, value: Optional[float], scorer: str = "",
                  details: Optional[dict] = None) -> None:
        """Store one score (None: no score; NaN is kept as NaN)."""
        val, nan = _score_value(method, value)
        with self.transaction():
            if self.conn.execute("SELECT 1 FROM explanations WHERE id = ?", (explanation_id,)).fetchone() is None:
                raise KeyError(f"no explanation with id {explanation_id}")
            self.conn.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (explanation_id, method, val, scorer, _dumps(details or {}), time.time(), nan))

    def add_scores(self, explanation_id: int, scores: dict, scorer: str = "") -> None:
        """Every ``{method: value}`` of `tdb_lens.explain.scoring.score_all`'s result, with its
        ``{method}_details``, in one transaction."""
        with self.transaction():
            for method, value in scores.items():
                if not method.endswith("_details"):
                    self.add_score(explanation_id, method, value, scorer, scores.get(f"{method}_details"))

    def _check_unit(self, unit_id: int) -> None:
        if self.conn.execute("SELECT 1 FROM units WHERE id = ?", (unit_id,)).fetchone() is None:
            raise KeyError(f"no unit with id {unit_id}")

    # ---- reading --------------------------------------------------------------------------------
    def unit_id(self, label_or_hook: str, unit: Optional[int] = None, model: Optional[str] = None) -> int:
        """The id of a unit by label (``L3.N1024``) or by hook and index; the most recent if several."""
        q, args = ("SELECT id FROM units WHERE label = ?", [label_or_hook]) if unit is None else \
            ("SELECT id FROM units WHERE hook = ? AND unit = ?", [label_or_hook, int(unit)])
        if model is not None:
            q += " AND model = ?"
            args.append(model)
        row = self.conn.execute(q + " ORDER BY id DESC", args).fetchone()
        if row is None:
            what = label_or_hook if unit is None else f"{label_or_hook}[{unit}]"
            raise KeyError(f"no unit {what} in {self.path}")
        return int(row[0])

    def unit(self, unit_id: int) -> dict:
        row = self.conn.execute("SELECT id, model, hook, unit, label, kind, corpus, corpus_fingerprint, stats "
                                "FROM units WHERE id = ?", (unit_id,)).fetchone()
        if row is None:
            raise KeyError(f"no unit with id {unit_id}")
        keys = ("id", "model", "hook", "unit", "label", "kind", "corpus", "corpus_fingerprint", "stats")
        d = dict(zip(keys, row))
        d["stats"] = json.loads(d["stats"])
        return d

    def examples(self, unit_id: int, kind: str = "top") -> list[dict]:
        """``[{window, tokens, acts, max_act, bin}]`` of one kind (top / random / sample), in rank order."""
        if kind not in ("top", "random", "sample"):
            raise ValueError(f"kind must be 'top', 'random' or 'sample', got {kind!r}")
        rows = self.conn.execute("SELECT window, tokens, acts, max_act, bin FROM examples WHERE unit_id = ? AND kind = ? "
                                 "ORDER BY rank", (unit_id, kind)).fetchall()
        return [{"window": w, "tokens": json.loads(t), "acts": json.loads(a), "max_act": m, "bin": b}
                for w, t, a, m, b in rows]

    def explanations(self, model: Optional[str] = None, hook: Optional[str] = None,
                     explainer: Optional[str] = None, unit_id: Optional[int] = None,
                     ids: Optional[Sequence[int]] = None) -> list[ExplanationRow]:
        """Explanations with their unit and every score, filtered by the arguments given."""
        q = ("SELECT e.id, u.id, u.model, u.hook, u.unit, u.label, u.kind, u.corpus, e.text, e.explainer "
             "FROM explanations e JOIN units u ON e.unit_id = u.id WHERE 1=1")
        args: list = []
        for col, val in (("u.model", model), ("u.hook", hook), ("e.explainer", explainer), ("u.id", unit_id)):
            if val is not None:
                q += f" AND {col} = ?"
                args.append(val)
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return []
            q += f" AND e.id IN ({','.join('?' * len(ids))})"
            args += ids
        rows = self.conn.execute(q + " ORDER BY u.hook, u.unit, e.id", args).fetchall()
        scores: dict[int, dict] = {}
        if rows:
            eids = [r[0] for r in rows]
            for s in range(0, len(eids), 900):  # SQLite's bound-parameter limit
                part = eids[s:s + 900]
                for eid, method, value, nan in self.conn.execute(
                        "SELECT explanation_id, method, value, nan FROM scores WHERE explanation_id IN "
                        f"({','.join('?' * len(part))})", part):
                    scores.setdefault(eid, {})[method] = math.nan if nan else value
        keys = ("id", "unit_id", "model", "hook", "unit", "label", "kind", "corpus", "text", "explainer")
        return [ExplanationRow(**dict(zip(keys, r)), scores=scores.get(r[0], {})) for r in rows]

    def score_details(self, explanation_id: int, method: str) -> dict:
        row = self.conn.execute("SELECT details FROM scores WHERE explanation_id = ? AND method = ?",
                                (explanation_id, method)).fetchone()
        if row is None:
            raise KeyError(f"no {method!r} score for explanation {explanation_id}")
        return json.loads(row[0])

    def best(self, label: str, method: str = "correlation") -> ExplanationRow:
        """The explanation of unit ``label`` with the highest ``method`` score."""
        rows = [r for r in self.explanations(unit_id=self.unit_id(label))
                if r.scores.get(method) is not None and not math.isnan(r.scores[method])]
        if not rows:
            raise KeyError(f"unit {label} has no explanation scored by {method!r}")
        return max(rows, key=lambda r: r.scores[method])

    def mean_scores(self, method: str = "correlation", **filters) -> dict[str, float]:
        """``{explainer: mean score}`` over the explanations matching ``filters``."""
        acc: dict[str, list[float]] = {}
        for r in self.explanations(**filters):
            v = r.scores.get(method)
            if v is not None and not math.isnan(v):
                acc.setdefault(r.explainer, []).append(float(v))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def counts(self) -> dict[str, int]:
        return {t: int(self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                for t in ("units", "examples", "explanations", "scores", "embeddings")}

    # ---- embeddings (for search) -------------------------------------------------------------
    def embeddings(self, explanation_ids: Iterable[int], embedder: str) -> dict[int, Float[torch.Tensor, " d"]]:
        ids = list(explanation_ids)
        out: dict[int, torch.Tensor] = {}
        for s in range(0, len(ids), 900):
            part = ids[s:s + 900]
            for eid, dim, blob in self.conn.execute(
                    f"SELECT explanation_id, dim, vector FROM embeddings WHERE embedder = ? AND explanation_id IN "
                    f"({','.join('?' * len(part))})", [embedder, *part]):
                out[int(eid)] = torch.frombuffer(bytearray(blob), dtype=torch.float32)[:dim].clone()
        return out

    def put_embeddings(self, vectors: dict[int, Float[torch.Tensor, " d"]], embedder: str) -> None:
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)",
                [(int(i), embedder, int(v.numel()), v.detach().float().cpu().contiguous().numpy().tobytes())
                 for i, v in vectors.items()],
            )


def _example_rows(uid: int, record: UnitRecord) -> list[tuple]:
    rows = []
    for kind, wins, toks, acts, bins in (
        ("top", record.top_windows, record.top_tokens, record.top_acts, None),
        ("random", record.random_windows, record.random_tokens, record.random_acts, None),
        ("sample", record.sample_windows, record.sample_tokens, record.sample_acts, record.sample_bins),
    ):
        for r, w in enumerate(wins):
            a = acts[r]
            rows.append((uid, kind, r, int(w), _dumps(toks[r].tolist()), _dumps(a.tolist()),
                         float(a.max()) if a.numel() else 0.0, None if bins is None else int(bins[r])))
    return rows


def format_table(rows: Sequence[ExplanationRow], methods: Optional[Sequence[str]] = None, width: int = 60) -> str:
    """A plain-text table: label, explainer, scores, explanation (cut to ``width`` characters)."""
    if methods is None:
        seen: list[str] = []
        for r in rows:
            seen += [m for m in r.scores if m not in seen]
        methods = seen
    head = ["unit", "explainer", *methods, "explanation"]
    body = []
    for r in rows:
        text = r.text if len(r.text) <= width else r.text[: width - 1] + "…"
        vals = [("" if r.scores.get(m) is None else "nan" if math.isnan(r.scores[m]) else f"{r.scores[m]:.3f}")
                for m in methods]
        body.append([r.label, r.explainer, *vals, text])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)
