"""Token windows of text for harvesting activations and training SAEs: local text, JSONL, Debian's
fortunes, Hugging Face datasets. (Shared by `tdb_lens.explain` and `tdb_lens.sae`; it imports
neither.)

A `Corpus` is a fixed ``[n_windows, ctx_len]`` tensor of token ids plus where it came from. Texts
are tokenised in a fixed order, joined with the tokenizer's end-of-text token, and cut into
consecutive full windows (the last partial one is dropped), so no window needs padding. With
``shuffle=True`` the windows are permuted by a seeded generator: the same source, tokenizer and
seed always give the same tensor, which `Corpus.fingerprint` identifies (harvest resumption and
merging check it).

Sources (`iter_texts`):

- a directory: every regular file in it, in sorted order; files in the fortune(6) format
  (entries separated by lines holding only ``%``) are split into entries, other files into
  paragraphs (blank-line separated); ``*.dat`` index files and symlinks are skipped;
- ``*.jsonl`` / ``*.json`` lines: one JSON object a line, the ``text_field`` (default ``"text"``);
- any other file: plain text, split into paragraphs;
- ``hf:NAME[:CONFIG][/SPLIT]``: a Hugging Face dataset, streamed with ``datasets`` (needs the
  network or the local datasets cache; a clear error says so otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

DEBIAN_CORPUS_PACKAGE = "fortunes"  # and its dependency fortunes-min
DEBIAN_CORPUS_DIRS = ("/usr/share/games/fortunes",)


class CorpusUnavailableError(RuntimeError):
    """The requested text source cannot be read here (missing package, no network)."""


def default_corpus_path() -> Path:
    """The offline English corpus used by the tests and examples: Debian's fortune cookie files.

    Installed by ``apt-get install fortunes`` (which pulls ``fortunes-min``) into
    ``/usr/share/games/fortunes`` (about 2.6 MB of quotations, BSD-licensed). Set
    ``TDB_LENS_CORPUS`` to use another directory or file instead.
    """
    env = os.environ.get("TDB_LENS_CORPUS")
    if env:
        p = Path(env)
        if not p.exists():
            raise CorpusUnavailableError(f"TDB_LENS_CORPUS={env!r} does not exist")
        return p
    for d in DEBIAN_CORPUS_DIRS:
        p = Path(d)
        if p.is_dir() and (p / "fortunes").exists():
            return p
    raise CorpusUnavailableError(
        "no offline text corpus found: tdb_lens uses Debian's fortune files from /usr/share/games/fortunes. "
        f"Install them with `apt-get install -y {DEBIAN_CORPUS_PACKAGE}` (scripts/setup.sh does this), "
        "or point TDB_LENS_CORPUS at a directory, .txt or .jsonl file of your own."
    )


# ---- reading text -----------------------------------------------------------------------------
def _split_fortunes(text: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        if line.strip() == "%":
            if cur:
                out.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    if cur:
        out.append("\n".join(cur).strip())
    return [t for t in out if t]


def _split_paragraphs(text: str) -> list[str]:
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in paras if p]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix in (".jsonl", ".ndjson") or (path.suffix == ".json" and _looks_like_jsonl(path)):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
                if isinstance(obj, str):
                    yield obj
                    continue
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(f"{path}:{lineno}: expected an object with a {text_field!r} field")
                yield str(obj[text_field])
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if any(l.strip() == "%" for l in lines[:200]):
        yield from _split_fortunes(text)
    else:
        yield from _split_paragraphs(text)


def _looks_like_jsonl(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    return first.startswith("{") and first.endswith("}")


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    body = spec[len("hf:"):]
    split = "train"
    if "/" in body.split(":")[-1] and body.count("/") >= 1:
        # NAME[:CONFIG]/SPLIT where NAME may itself be owner/name: the split is after the last '/'
        head, _, tail = body.rpartition("/")
        if tail and ":" not in tail and head:
            body, split = head, tail
    name, _, config = body.partition(":")
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise CorpusUnavailableError(f"{spec}: reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # network errors come in many types
        raise CorpusUnavailableError(
            f"could not open Hugging Face dataset {name!r} (config {config or None!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Offline, use a local directory, .txt or .jsonl file, or "
            "tdb_lens.corpus.default_corpus_path()."
        ) from e
    for row in ds:
        if text_field not in row:
            raise ValueError(f"{spec}: rows have no {text_field!r} field (fields: {sorted(row)})")
        yield str(row[text_field])


def iter_texts(source: Union[str, os.PathLike], text_field: str = "text") -> Iterator[str]:
    """The documents of a source, in a fixed order (see the module docstring for the formats)."""
    s = str(source)
    if s.startswith("hf:"):
        yield from _iter_hf(s, text_field)
        return
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"corpus source {s!r} does not exist (expected a directory, a .txt/.jsonl file or hf:NAME)")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.is_symlink() and f.suffix != ".dat"
                       and not f.name.startswith("."))
        if not files:
            raise ValueError(f"corpus directory {s!r} holds no text files")
        for f in files:
            yield from _read_file(f, text_field)
        return
    yield from _read_file(p, text_field)


# ---- windows ----------------------------------------------------------------------------------
@dataclass
class Corpus:
    """``tokens [n_windows, ctx_len]`` int64; ``source`` and ``params`` say how it was made."""

    tokens: torch.Tensor
    source: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.is_floating_point():
            raise ValueError(f"corpus tokens must be an integer [n_windows, ctx_len] tensor, got {tuple(self.tokens.shape)}")
        self.tokens = self.tokens.to(torch.long).cpu().contiguous()

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def ctx_len(self) -> int:
        return int(self.tokens.shape[1])

    def __len__(self) -> int:
        return self.n_windows

    @property
    def fingerprint(self) -> str:
        """sha256 of the token ids (first 16 hex digits): identical windows, identical fingerprint."""
        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(str(tuple(self.tokens.shape)).encode())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int) -> list[tuple[int, int]]:
        """``(start, end)`` window ranges of consecutive batches; batch ``b`` is the ``b``-th."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [(s, min(s + batch_size, self.n_windows)) for s in range(0, self.n_windows, batch_size)]

    def describe(self) -> dict:
        return {"source": self.source, "n_windows": self.n_windows, "ctx_len": self.ctx_len,
                "fingerprint": self.fingerprint, **self.params}


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None and hasattr(model_or_tokenizer, "encode"):
        tok = model_or_tokenizer
    if tok is None:
        raise ValueError("build_corpus needs a model with a tokenizer, or a tokenizer")
    return tok


def build_corpus(
    model_or_tokenizer: Any,
    source: Union[str, os.PathLike, Sequence[str], None] = None,
    ctx_len: int = 64,
    n_windows: Optional[int] = None,
    shuffle: bool = True,
    seed: int = 0,
    prepend_bos: Optional[bool] = None,
    text_field: str = "text",
    max_texts: Optional[int] = None,
) -> Corpus:
    """Cut a text source into ``n_windows`` windows of ``ctx_len`` tokens.

    ``source``: a path / ``hf:`` spec (see `iter_texts`), a list of strings, or None for
    `default_corpus_path`. Documents are separated by the tokenizer's EOS token. With
    ``prepend_bos`` (default: the tokenizer's convention) each window starts with BOS and holds
    ``ctx_len - 1`` text tokens. ``shuffle`` permutes whole windows with ``seed`` before the
    first ``n_windows`` are kept, so a small corpus still samples the whole source; reading stops
    early when not shuffling.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    tok = _tokenizer_of(model_or_tokenizer)
    if prepend_bos is None:
        prepend_bos = bool(getattr(tok, "default_prepend_bos", False))
    if prepend_bos and tok.bos_token_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
    if source is None:
        source = default_corpus_path()
    texts: Iterable[str]
    if isinstance(source, (str, os.PathLike)):
        texts = iter_texts(source, text_field)
        label = str(source)
    else:
        texts = list(source)
        label = f"<{len(texts)} strings>"
    sep = tok.eos_token_id
    body = ctx_len - 1 if prepend_bos else ctx_len
    stream: list[int] = []
    need = None if (shuffle or n_windows is None) else n_windows * body
    for i, t in enumerate(texts):
        if max_texts is not None and i >= max_texts:
            break
        ids = tok.encode(t)
        if not ids:
            continue
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
        if need is not None and len(stream) >= need:
            break
    n_full = len(stream) // body
    if n_full == 0:
        raise ValueError(f"corpus {label!r} has {len(stream)} tokens, fewer than one window of {body}")
    windows = torch.tensor(stream[: n_full * body], dtype=torch.long).view(n_full, body)
    if prepend_bos:
        windows = torch.cat([torch.full((n_full, 1), tok.bos_token_id, dtype=torch.long), windows], dim=1)
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        windows = windows[torch.randperm(n_full, generator=g)]
    if n_windows is not None:
        if n_windows > n_full:
            raise ValueError(f"corpus {label!r} gives only {n_full} windows of {ctx_len} tokens, {n_windows} asked for")
        windows = windows[:n_windows]
    params = {"ctx_len": ctx_len, "shuffle": shuffle, "seed": seed, "prepend_bos": prepend_bos,
              "tokens_in_source": len(stream)}
    return Corpus(windows.contiguous(), label, params)
