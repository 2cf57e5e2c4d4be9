"""The README's tour runs as written: every Python block of "## A short tour", in order, in one
namespace, on the offline SmolLM2 model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow


def tour_blocks() -> list[str]:
    text = README.read_text()
    m = re.search(r"^## A short tour\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README has no '## A short tour' section"
    return re.findall(r"^```python\n(.*?)^```", m.group(1), re.S | re.M)


def test_the_tour_runs_as_written(capsys):
    blocks = tour_blocks()
    assert len(blocks) >= 2
    ns: dict = {"__name__": "readme_tour"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md tour block {i + 1}", "exec"), ns)
    out = capsys.readouterr().out
    # what the blocks claim, checked on what they left behind
    model, cache, logits = ns["model"], ns["cache"], ns["logits"]
    n_tok = logits.shape[1]
    assert tuple(cache["pattern", 3].shape) == (1, model.cfg.n_heads, n_tok, n_tok)
    assert torch.equal(cache["pattern", 3], cache["blocks.3.attn.hook_pattern"])
    assert ns["ablated"].shape == logits.shape and not torch.allclose(ns["ablated"], logits)
    assert ns["seen"] and all(shape[1] == model.cfg.n_heads for _, shape in ns["seen"])
    assert "Once upon a time" in out
