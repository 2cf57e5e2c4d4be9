"""A planted unit: fires (1.0) exactly on city-name tokens, 0 elsewhere; shared by the explain tests.

The host is a tiny random GPT-2 (one layer) whose neuron ``PLANT_UNIT`` of ``PLANT_HOOK`` is
overwritten by a permanent hook with the indicator of the city tokens; the corpus mixes sentences
full of cities with Debian fortunes (few cities), so random windows are mostly city-free.
"""

import torch

from tdb_lens import HookedGPT2
from tdb_lens.explain.corpus import build_corpus, default_corpus_path, iter_texts

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Chicago", "Boston", "Moscow", "Sydney",
          "Toronto", "Vienna", "Dublin", "Cairo", "Athens", "Prague"]
CITY_SENTENCES = [
    "We flew from Paris to Tokyo last spring and took the night train back.",
    "My sister lives in London but spends two weeks a month in Berlin.",
    "The conference moved from Chicago to Boston because of the snow.",
    "He grew up in Madrid and studied painting in Rome for three years.",
    "Flights to Sydney and Toronto were cancelled on Monday morning.",
    "She sent postcards from Vienna, Prague and Athens to her parents.",
    "The band toured Dublin and Moscow before ending the year in Cairo.",
    "After a week in Berlin they drove south to Vienna and then to Rome.",
]
PLANT_HOOK = "blocks.0.mlp.hook_post"
PLANT_UNIT = 3


def planted_model():
    """``(model, city token ids)``: neuron 3 at layer 0 is the city indicator."""
    model = HookedGPT2.from_config(n_layers=1, d_model=32, n_heads=4, d_mlp=16, n_ctx=64, seed=0).eval()
    tok = model.tokenizer
    ids = torch.tensor(sorted({tok.encode(" " + c)[0] for c in CITIES if len(tok.encode(" " + c)) == 1}))
    state = {}

    def plant(act, hook):
        act = act.clone()
        act[..., PLANT_UNIT] = torch.isin(state["tokens"], ids).to(act.dtype)
        return act

    orig_forward = model.forward

    def forward(input, *a, **kw):  # remember the token ids: the MLP hook only sees activations
        t, _ = model.prepare_input(input, None, kw.get("prepend_bos"), kw.get("padding_side"))
        state["tokens"] = t
        return orig_forward(input, *a, **kw)

    model.forward = forward  # type: ignore[method-assign]
    model.add_perma_hook(PLANT_HOOK, plant)
    return model, set(ids.tolist())


def planted_corpus(model, n_fortunes: int = 40, ctx_len: int = 16):
    texts = CITY_SENTENCES + list(iter_texts(default_corpus_path()))[:4000:100][:n_fortunes]
    return build_corpus(model, texts, ctx_len=ctx_len, shuffle=True, seed=0)
