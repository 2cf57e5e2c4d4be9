"""Shared builders of the debugger tests (no tests here): the tiny random GPT-2, a small harvest
and an explanation store for it, and a deterministic stand-in embedder for search."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tdb_lens import GPT2Config, HookedGPT2

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_B = "When Anna and Peter went to the store, Peter gave a drink to"
STATE = {"prompt": IOI, "target": " Mary", "distractor": " John"}
HARVEST_HOOK = "blocks.0.mlp.hook_post"
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank in the morning light.",
    "Mary and John went to the market to buy apples, bread and a bottle of milk for dinner.",
    "Paris, London, Berlin and Rome are large cities with old churches and busy streets.",
    "He counted one, two, three, four, five and then stopped to look at the quiet sea.",
    "The committee will meet on Monday to discuss the budget and the new school building.",
    "Cats sleep most of the day while dogs wait at the door for someone to come home.",
] * 4


def tiny_model():
    return HookedGPT2.from_config(GPT2Config(n_layers=2, d_model=64, n_heads=4, d_mlp=256), seed=0)


class WordEmbedder:
    """Bag-of-words hashing embedder: deterministic, offline, instant (search itself is the reference)."""

    name = "test-bag-of-words"

    def encode(self, texts):
        out = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        return out / out.norm(dim=-1, keepdim=True).clamp(min=1e-9)


EXPLANATIONS = {0: "names of people", 1: "numbers and counting", 2: "cities in Europe", 3: "animals like cats and dogs"}


def harvest_and_store(model, tmp: Path):
    """A harvest of 8 neurons of ``HARVEST_HOOK`` over `TEXTS` and a store explaining four of them."""
    from tdb_lens.explain import Explanation, ExplanationStore, build_corpus, harvest

    corpus = build_corpus(model, TEXTS, ctx_len=16, n_windows=20, seed=0)
    res = harvest(model, corpus, HARVEST_HOOK, tmp / "harvests" / "l0-post", units=list(range(8)), k=4, n_sample=4,
                  n_random=3, n_quantiles=2, batch_size=8, progress=False, model_name="tiny-gpt2")
    store = ExplanationStore(tmp / "store.db")
    for unit, text in EXPLANATIONS.items():
        uid = store.add_unit(res.record(unit), model="tiny-gpt2")
        store.add_explanation(uid, Explanation(text, "test", unit, HARVEST_HOOK))
    return tmp / "harvests", store
