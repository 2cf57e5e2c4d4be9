"""Independent references for the GPT-2 tests: ``transformers`` models with random weights and
TransformerLens ``HookedTransformer``s built from them, all offline (the hub is unreachable here).

Test files put this folder on ``sys.path`` and ``from _gpt2_reference import ...``, which works
whether or not ``tests`` is a package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
TINY = dict(n_layer=3, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)


@lru_cache(maxsize=1)
def hf_tokenizer_dir() -> str:
    """A directory holding GPT-2's tokenizer files under the names ``transformers`` expects."""
    d = Path(tempfile.mkdtemp(prefix="gpt2-tok-"))
    folder = resources.files("tdb_lens") / "data" / "gpt2-bpe"
    with resources.as_file(folder / "encoder.json") as enc, resources.as_file(folder / "vocab.bpe") as bpe:
        shutil.copy(enc, d / "vocab.json")
        shutil.copy(bpe, d / "merges.txt")
    return str(d)


def hf_tokenizer():
    """``transformers``' GPT2TokenizerFast from the same BPE files tdb_lens ships."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(hf_tokenizer_dir())


def make_hf_gpt2(seed: int = 0, perturb: bool = True, block_std: float = 0.02, **cfg_kw):
    """A ``GPT2LMHeadModel`` with random weights (eval mode, fp32), filled quickly from one seed.

    Matrices are normal(0, 0.02) as GPT-2's init; ``perturb`` also randomises the LayerNorm weights
    and biases and every bias (GPT-2 starts them at 1 / 0), so folding and bias handling are really
    exercised. ``block_std`` > 0.02 makes the blocks matter more than the tied embedding (greedy
    generation on GPT-2-init weights mostly repeats the last token). Built on ``meta`` first:
    ``transformers``' own init of GPT-2-small takes ~15 s here.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = {**TINY, **cfg_kw}
    if kw["vocab_size"] < 50257:  # GPT-2's <|endoftext|> (50256) is outside a small vocabulary
        kw.setdefault("bos_token_id", kw["vocab_size"] - 1)
        kw.setdefault("eos_token_id", kw["vocab_size"] - 1)
    cfg = GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device("meta"):
        hf = GPT2LMHeadModel(cfg)
    hf = hf.to_empty(device="cpu")
    hf.tie_weights()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if perturb else torch.ones(p.shape))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g) if perturb else torch.zeros(p.shape))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g) if perturb else torch.zeros(p.shape))
            else:
                p.normal_(0.0, 0.02 if name.startswith(("transformer.wte", "transformer.wpe")) else block_std, generator=g)
    return hf.eval()


def _fake_hub_cache(hf) -> str:
    """A Hugging Face cache folder in which repo ``gpt2`` holds only this model's config.json.

    TransformerLens reads a model's architecture with ``AutoConfig.from_pretrained("gpt2")`` even when
    given ``hf_model``; pointing ``cache_dir`` here (with ``local_files_only=True``) answers that
    offline, and since the config is the model's own, any GPT-2 shape works.
    """
    root = Path(tempfile.mkdtemp(prefix="tl-cache-"))
    repo = root / "models--gpt2"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    d = hf.config.to_dict()
    d["architectures"] = ["GPT2LMHeadModel"]
    d["n_ctx"] = d["n_positions"]  # TransformerLens reads the legacy field
    (snap / "config.json").write_text(json.dumps(d))
    return str(root)


def make_tl(hf, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False):
    """TransformerLens' ``HookedTransformer`` built from ``hf``'s weights, without network access."""
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(
        "gpt2", hf_model=hf, tokenizer=hf_tokenizer(), device="cpu", dtype=torch.float32,
        fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases, cache_dir=_fake_hub_cache(hf), local_files_only=True,
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; infinities must sit in the same places with the same sign."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), "infinities differ"
    finite = ~inf_a
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0
