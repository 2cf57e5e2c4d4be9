"""notebooks/debugger.ipynb (an IOI investigation on SmolLM2) runs from top to bottom; its own
asserts check what it shows, and the committed copy keeps its outputs."""

from __future__ import annotations

from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "debugger.ipynb"


def test_debugger_notebook_is_committed_with_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") for c in code[1:]), "execute the notebook and keep its outputs"
    assert not [o for c in code for o in c["outputs"] if o.output_type == "error"]


# Executing it from top to bottom is tests/test_notebooks.py's job (it runs every notebook).
