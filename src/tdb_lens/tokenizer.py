"""Tokenizers that work offline: GPT-2's BPE from files shipped in the package, and any
Hugging Face ``tokenizers.Tokenizer`` (built, for example, from a GGUF file's metadata)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

GPT2_BPE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenisation regex (the published one; tiktoken's r50k_base uses the same).
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """The interface models use. Subclasses set the ids and implement encode/decode."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    vocab_size: int = 0
    # whether `to_tokens` prepends BOS when the caller does not say (GPT-2: True, as TransformerLens)
    default_prepend_bos: bool = True

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        """The text of one token, as ``to_str_tokens`` shows it."""
        return self.decode([token_id])

    @property
    def pad_id(self) -> int:
        """Id used to fill padded positions (pad, else eos, else 0); masked out, never attended to."""
        for t in (self.pad_token_id, self.eos_token_id):
            if t is not None:
                return t
        return 0

    # -- the parts of a Hugging Face tokenizer that TransformerLens code calls -----------------
    def batch_decode(self, sequences: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` of each row (a list of id lists or a 2-D tensor), as Hugging Face's."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id} - {None} if skip_special_tokens else set()
        return [self.decode([int(i) for i in row if int(i) not in special]) for row in rows]

    def __call__(self, text: str | Sequence[str], padding: bool | str = False, return_tensors: str | None = None,
                 padding_side: str = "right", **ignored: Any) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}`` as a Hugging Face tokenizer returns them (no BOS added,
        as GPT-2's; ``padding`` True/"longest" pads to the longest with ``pad_id``; ``return_tensors="pt"``
        gives tensors, which needs equal lengths or padding)."""
        single = isinstance(text, str)
        texts: list[str] = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        if padding and padding != "do_not_pad":
            if padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            n = max(len(r) for r in ids)
            right = padding_side == "right"
            mask = [[1] * len(r) + [0] * (n - len(r)) if right else [0] * (n - len(r)) + [1] * len(r) for r in ids]
            ids = [r + [self.pad_id] * (n - len(r)) if right else [self.pad_id] * (n - len(r)) + r for r in ids]
        else:
            mask = [[1] * len(r) for r in ids]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in ids}) > 1:
                raise ValueError("sequences of different lengths cannot be one tensor: pass padding=True")
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (tiktoken), built from ``tdb_lens/data/gpt2-bpe`` with hashes checked."""

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        folder = resources.files("tdb_lens") / "data" / "gpt2-bpe"
        for fname, digest in GPT2_BPE_SHA256.items():
            got = _sha256(folder / fname)
            if got != digest:
                raise RuntimeError(f"GPT-2 tokenizer file {fname} is corrupt: sha256 {got}, expected {digest}")
        with resources.as_file(folder / "vocab.bpe") as bpe, resources.as_file(folder / "encoder.json") as enc:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bpe), encoder_json_file=str(enc))
        self.enc = tiktoken.Encoding(
            name="gpt2", pat_str=_GPT2_PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
        )
        self.bos_token_id = self.eos_token_id = 50256
        self.pad_token_id = 50256
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


class HFTokenizer(Tokenizer):
    """Wraps a ``tokenizers.Tokenizer`` (never adds special tokens by itself: BOS is the model's call)."""

    def __init__(
        self,
        tok,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        eot_token_ids: Sequence[int] = (),
    ) -> None:
        self.tok = tok
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.default_prepend_bos = add_bos_token
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.eot_token_ids = list(eot_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)
