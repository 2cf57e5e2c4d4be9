"""A minimal local text corpus for SAE training, and cutting it into fixed-length token sequences.

``read_texts("fortunes")`` reads Debian's fortune files (``/usr/share/games/fortunes``, packages
``fortunes-min`` / ``fortunes``), one document per fortune. A path reads a text file (documents
separated by blank lines) or every ``*.txt`` file under a folder. The project-wide corpus module is
``tdb_lens.explain.corpus``; this one only needs to feed SAE training.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

FORTUNES_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes")


def fortunes_dir() -> Path:
    for d in FORTUNES_DIRS:
        p = Path(d)
        if p.is_dir() and any(f.suffix == ".dat" for f in p.iterdir()):
            return p
    raise FileNotFoundError(
        f"no fortune files in {' or '.join(FORTUNES_DIRS)}: install them with "
        "`apt-get install -y fortunes-min fortunes`, or pass --corpus PATH (a text file or a folder of .txt files)"
    )


def _split_fortunes(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"^%$", text, flags=re.M) if t.strip()]


def read_texts(spec: str | os.PathLike = "fortunes", max_docs: int | None = None) -> list[str]:
    """Documents from ``"fortunes"``, a text file, or a folder of ``.txt`` files (sorted, so the order is fixed)."""
    docs: list[str] = []
    if str(spec) == "fortunes":
        root = fortunes_dir()
        for f in sorted(root.iterdir()):
            # each fortune file has an index beside it (name.dat); .u8 names are links to the same text
            if f.suffix or f.is_symlink() or not (root / (f.name + ".dat")).exists():
                continue
            docs += _split_fortunes(f.read_text(encoding="utf-8", errors="replace"))
    else:
        p = Path(spec)
        files: Sequence[Path]
        if p.is_dir():
            files = sorted(p.rglob("*.txt"))
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"corpus {str(spec)!r}: no such file or folder (or use 'fortunes')")
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs += [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"corpus {str(spec)!r} holds no text")
    return docs[:max_docs] if max_docs else docs


def token_sequences(tokenizer, texts: Iterable[str], context_size: int, bos_token_id: int | None = None,
                    separator_id: int | None = None, max_sequences: int | None = None) -> torch.Tensor:
    """Concatenate tokenised documents (separated by ``separator_id``) and cut ``[n, context_size]``
    rows; each row starts with ``bos_token_id`` when given. The ragged tail is dropped."""
    body = context_size - (1 if bos_token_id is not None else 0)
    if body <= 0:
        raise ValueError(f"context_size {context_size} is too small")
    stream: list[int] = []
    rows: list[list[int]] = []
    for t in texts:
        stream += tokenizer.encode(t)
        if separator_id is not None:
            stream.append(separator_id)
        while len(stream) >= body:
            rows.append(([bos_token_id] if bos_token_id is not None else []) + stream[:body])
            stream = stream[body:]
            if max_sequences and len(rows) >= max_sequences:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise ValueError(f"the corpus is shorter than one context of {context_size} tokens")
    return torch.tensor(rows, dtype=torch.long)


def corpus_tokens(model, spec: str | os.PathLike = "fortunes", context_size: int = 128,
                  max_sequences: int | None = None) -> torch.Tensor:
    """``[n, context_size]`` token rows of a corpus for ``model`` (documents separated by EOS)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer")
    texts = read_texts(spec)
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    bos = tok.bos_token_id if getattr(tok, "default_prepend_bos", False) else None
    return token_sequences(tok, texts, context_size, bos_token_id=bos, separator_id=sep, max_sequences=max_sequences)
