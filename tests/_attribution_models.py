"""Small random models of both families for the attribution tests (shared helper, not a test)."""

from __future__ import annotations

import pytest
import torch

from tdb_lens.models.gpt2 import HookedGPT2
from tdb_lens.models.llama import HookedLlama, LlamaConfig

FAMILIES = ["gpt2", "llama"]
VOCAB = 100


def make_model(family: str, n_layers: int = 2):
    if family == "gpt2":
        m = HookedGPT2.from_config(n_layers=n_layers, n_heads=4, d_model=64, d_mlp=256, d_vocab=VOCAB, n_ctx=64, seed=0)
    else:
        cfg = LlamaConfig(n_layers=n_layers, n_heads=4, n_key_value_heads=2, d_model=64, d_head=16, d_mlp=128,
                          d_vocab=VOCAB, n_ctx=64, attention_bias=True)
        m = HookedLlama.from_config(cfg, seed=0)
    m.eval()
    return m


def tokens(batch: int = 3, n_pos: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=FAMILIES)
def model(request):
    return make_model(request.param)
