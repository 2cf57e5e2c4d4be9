"""The debugger's inline HTML views: self-contained (nothing fetched), every value shown, text tables."""

from __future__ import annotations

import re
from html import escape

import pytest
import torch

from tdb_lens.attribution import Labelled
from tdb_lens.debugger import Investigation, labelled_html, logit_lens_view
from test_debugger_support import IOI, tiny_model

EXTERNAL = re.compile(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}|<link|<script[^>]+src=", re.I)


@pytest.fixture(scope="module")
def inv():
    return Investigation(tiny_model(), IOI, target=" Mary", distractor=" John")


def test_node_table_views(inv):
    t = inv.node_table()
    html = t._repr_html_()
    assert not EXTERNAL.search(html)
    assert all(f"data-node='{escape(str(r.node))}'" in html for r in t.rows)
    assert html.count("<tr data-node=") == len(t.rows)
    text = str(t)
    assert all(str(r.node) in text for r in t.rows)
    inv.ablate("L1.N3@-1")
    t2 = inv.node_table()
    inv.unablate()
    assert t2.sides == ("left", "diff", "right") and "act*grad diff" in t2._repr_html_()


def test_attention_logit_lens_and_patching_views(inv):
    att = inv.attention(1, 2)
    html = att._repr_html_()
    _, cache = inv.model.run_with_cache(IOI)
    pat = cache["blocks.1.attn.hook_pattern"][0, 2]
    P = pat.shape[0]
    assert html.count("<td data-v=") == P * P and not EXTERNAL.search(html)
    assert f"query 14:{att.tokens[14]} / key 3:{att.tokens[3]}: {float(pat[14, 3]):.4f}" in html
    lens = logit_lens_view(inv.model, IOI, target=" Mary")
    assert len(lens.layers) == inv.model.cfg.n_layers + 1 and not EXTERNAL.search(lens._repr_html_())
    lab = Labelled(torch.arange(6.0).reshape(2, 3), ("layer", "head"), (["0", "1"], ["a", "b", "c"]), title="patch")
    h = labelled_html(lab)
    assert h.count("<td data-v=") == 6 and "layer 1 / head c: 5.0000" in h
    logits = inv.logits()
    assert not EXTERNAL.search(logits._repr_html_()) and logits.tokens[0] in str(logits)
