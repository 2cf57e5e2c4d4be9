"""The README's results cannot drift from the files they come from.

A figure in README.md is written as a link to its results file with the field as the link's title,
e.g. ``[4.74](results/ioi/report.json "logit_diff")``. The field is a dotted path into the JSON
(``\\.`` for a dot inside a key; ``[3]`` picks a list item, ``[order=ABBA,template=14]`` the list
item with those fields), optionally followed by `` *100`` (a percentage). A number must equal the
field rounded to the decimals written; a list of values is written space-separated.

Every results file the README links to must say when, where and how it was made (``provenance``:
``date``, ``machine``, ``command``), and the values column of every results table holds no decimal
figure that is not such a link.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURE = re.compile(r'\[([^\]]+)\]\(((?:results|bench/results)/[^ )]+) "([^"]+)"\)')
SEGMENT = re.compile(r"^(?P<key>[^\[]*)(?:\[(?P<sel>[^\]]+)\])?$")
NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?$")


def readme() -> str:
    return README.read_text()


def section(text: str, heading: str) -> str:
    """The text under the level-2 heading ``heading`` up to the next level-2 heading."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no '## {heading}' section"
    return m.group(1)


@cache
def load(path: str):
    return json.loads((ROOT / path).read_text())


def resolve(doc, field: str):
    """The value at ``field`` (the README's link title, without the scale) in ``doc``."""
    value = doc
    for part in re.split(r"(?<!\\)\.", field):
        m = SEGMENT.match(part.replace("\\.", "."))
        assert m, f"cannot read field segment {part!r}"
        if m["key"]:
            assert isinstance(value, dict) and m["key"] in value, f"no key {m['key']!r} (in {field!r})"
            value = value[m["key"]]
        if m["sel"]:
            assert isinstance(value, list), f"{part!r} selects from a {type(value).__name__}"
            if m["sel"].isdigit():
                value = value[int(m["sel"])]
            else:
                want = dict(kv.split("=", 1) for kv in m["sel"].split(","))
                hits = [v for v in value if all(str(v.get(k)) == w for k, w in want.items())]
                assert len(hits) == 1, f"{len(hits)} items match [{m['sel']}] in {field!r}"
                value = hits[0]
    return value


def written_as(value, text: str) -> str:
    """``value`` written the way ``text`` writes it (same number of decimals)."""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, str):
        return value
    assert NUMBER.match(text), f"{text!r} is not a number but the field holds {value!r}"
    decimals = len(text.split(".")[1]) if "." in text else 0
    out = f"{value:.{decimals}f}"
    return out[1:] if out.startswith("-") and float(out) == 0 else out  # no "-0.00"


def figures() -> list[tuple[str, str, str]]:
    return FIGURE.findall(readme())


def test_the_readme_has_figures_backed_by_files():
    found = figures()
    assert len(found) >= 30, len(found)
    assert {p for _, p, _ in found} >= {"results/ioi/report.json", "bench/results/bench_llama.json"}


@pytest.mark.parametrize("text,path,title", figures(), ids=lambda s: s[:40])
def test_figure_equals_its_file(text, path, title):
    field, _, scale = title.partition(" *")
    value = resolve(load(path), field)
    if scale:
        value = value * float(scale)
    assert written_as(value, text) == text, f"README says {text!r} for {path}:{title!r}; the file has {value!r}"


@pytest.mark.parametrize("path", sorted({p for _, p, _ in figures()}))
def test_results_file_says_when_where_and_how(path):
    prov = load(path).get("provenance")
    assert isinstance(prov, dict), f"{path} has no provenance"
    for key in ("date", "machine", "command"):
        assert isinstance(prov.get(key), str) and prov[key].strip(), f"{path}: provenance.{key} missing"
    assert re.match(r"\d{4}-\d{2}-\d{2}", prov["date"]), prov["date"]


def test_results_tables_hold_only_linked_figures():
    """In the Results section the values column of every table has no bare decimal number."""
    text = section(readme(), "Results")
    rows = [line for line in text.splitlines() if line.startswith("|") and not set(line) <= set("|- ")]
    assert rows
    for line in rows:
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        if len(cells) < 2:
            continue
        values = FIGURE.sub("", cells[1])
        values = re.sub(r"`[^`]*`|\"[^\"]*\"", "", values)
        bare = re.findall(r"(?<![\w.])-?\d+\.\d+", values)
        assert not bare, f"figures {bare} in a results table without a results file: {line[:100]}"


def test_the_resolver_reads_what_it_claims():
    doc = {"a": {"b.c": [1, 2]}, "rows": [{"k": "x", "v": 0.1234}, {"k": "y", "v": -0.001}]}
    assert resolve(doc, "a.b\\.c[1]") == 2
    assert resolve(doc, "rows[k=x].v") == 0.1234
    assert written_as(0.1234, "0.12") == "0.12" and written_as(0.1234, "0.1") == "0.1"
    assert written_as(-0.001, "0.00") == "0.00" and written_as(98.0, "98") == "98"
    assert written_as(["23.3", "29.1"], "23.3 29.1") == "23.3 29.1"
    with pytest.raises(AssertionError):
        resolve(doc, "rows[k=z].v")


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's second command (setup --test, lint, types, tests)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", section(readme(), "Two commands for a fresh machine"), re.S | re.M)
    commands = [b.strip() for b in blocks]
    assert len(commands) == 2, commands
    test_command = commands[1]
    assert "--test" in test_command and "ruff check" in test_command and "mypy" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run does not run the README's test command {test_command!r}"
