"""Files the command-line tests read: a tiny random GPT-2 saved as a Hugging Face folder (what
`tdb_lens.load` reads) and a small text corpus of random words."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tdb_lens.models.gpt2 import GPT2Config, HookedGPT2

WORDS = ("the cat sat on a mat while dogs ran past quickly and birds sang songs about rain sun wind "
         "trees rivers mountains people walked talked laughed").split()


def hf_name(k: str) -> str:
    """A HookedGPT2 parameter's name in a Hugging Face GPT-2 checkpoint."""
    k = k.replace(".ln1.", ".ln_1.").replace(".ln2.", ".ln_2.")
    k = "h." + k[len("blocks."):] if k.startswith("blocks.") else k
    return "ln_f." + k[len("ln_final."):] if k.startswith("ln_final.") else k


def save_gpt2(model: HookedGPT2, d: Path) -> Path:
    """``model`` as a Hugging Face folder: ``d/model.safetensors`` + ``d/config.json``."""
    d.mkdir(parents=True, exist_ok=True)
    save_file({hf_name(k): v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(model.cfg.to_hf()))
    return d


def save_tiny_gpt2(d: Path) -> Path:
    """A 2-layer, d_model 16 GPT-2 (seed 0) as a Hugging Face folder."""
    cfg = GPT2Config(n_layers=2, n_heads=2, d_model=16, d_mlp=32, n_ctx=64)
    return save_gpt2(HookedGPT2.from_config(cfg, seed=0), d)


def write_corpus(d: Path) -> Path:
    """60 paragraphs of 40 random words (seed 0) as ``d/text.txt``."""
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g).tolist()) for _ in range(60)]
    p = d / "text.txt"
    p.write_text("\n\n".join(paras))
    return p
