"""The tokenizer and chat template of a GGUF file.

``gguf_tokenizer(meta, path)`` rebuilds a ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` (model
``gpt2``: byte-level BPE, with the pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre``), after
checking the vocabulary, token types and merges (a wrong type or an id outside the vocabulary raises
:class:`GGUFError` naming the key). ``render_chat`` renders a Jinja chat template in a sandbox.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import pre_tokenizers as pt

from .gguf_config import GGUFError

_GPT2_PRE = ("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo")
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b")
# Split patterns of the original Hugging Face tokenizers (they differ in how digits are grouped).
_SPLIT_3_DIGITS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_1_DIGIT = _SPLIT_3_DIGITS.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_PRE = {
    "llama-bpe": _SPLIT_3_DIGITS, "llama3": _SPLIT_3_DIGITS, "dbrx": _SPLIT_3_DIGITS, "smaug-bpe": _SPLIT_3_DIGITS,
    "falcon3": _SPLIT_3_DIGITS, "qwen2": _SPLIT_1_DIGIT, "deepseek-r1-qwen": _SPLIT_1_DIGIT, "megrez": _SPLIT_1_DIGIT,
}  # fmt: skip
# llama.cpp ends generation on these control tokens as well as on eos
_EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GGUFTokenizer:
    """The pieces of ``tokenizer.ggml.*`` a model needs (ids checked against the vocabulary)."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    eot_token_ids: list[int]  # ids generation stops on: eos and end-of-turn markers


def _pre_tokenizer(pre: str | None, path: Path) -> Any:
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split, then bytes -> chars
    if pre in _DIGITS_PRE:  # every digit its own piece first (StarCoder / SmolLM tokenizers)
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_PRE:
        split = pt.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated")
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, *_GPT2_PRE):
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; splitting text as GPT-2 does", stacklevel=4)
    return byte_level


def _typed(meta: dict, key: str, kind: type, path: Path, default: Any = None, items: type | None = None) -> Any:
    """``meta[key]`` if it is a ``kind`` (a list of ``items``), else a GGUFError naming the key."""
    value = meta.get(key, default)
    ok = value is default or (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if ok and items is not None and value is not default:
        ok = set(map(type, value)) <= {items}  # exact types: a bool is not an int here
    if not ok:
        what = f"a list of {items.__name__}" if items is not None else kind.__name__
        raise GGUFError(f"{path}: metadata {key} is {str(value)[:60]!r} ({type(value).__name__}); expected {what}")
    return value


def _token_id(meta: dict, key: str, n: int, path: Path) -> int | None:
    value = _typed(meta, key, int, path)
    if value is not None and not 0 <= value < n:
        raise GGUFError(f"{path}: metadata {key} is {value}; expected a token id in [0, {n})")
    return value


def gguf_tokenizer(meta: dict, path: Path) -> GGUFTokenizer:
    """The file's byte-level BPE tokenizer, special ids and chat template (see the module docstring)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{path}: the file has no vocabulary (tokenizer.ggml.tokens)")
    tokens = _typed(meta, "tokenizer.ggml.tokens", list, path, items=str)
    types = _typed(meta, "tokenizer.ggml.token_type", list, path, [], items=int)
    if types and len(types) != len(tokens):
        raise GGUFError(f"{path}: metadata tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    merges = [tuple(m.split(" ", 1)) for m in _typed(meta, "tokenizer.ggml.merges", list, path, [], items=str)]
    if set(map(len, merges)) - {2}:
        bad = next(" ".join(m) for m in merges if len(m) != 2)
        raise GGUFError(f"{path}: metadata tokenizer.ggml.merges holds {bad!r}; expected two tokens joined by a space")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:
        raise GGUFError(f"{path}: the tokenizer vocabulary or merges are inconsistent ({e})") from e
    tokenizer.pre_tokenizer = _pre_tokenizer(_typed(meta, "tokenizer.ggml.pre", str, path), path)
    tokenizer.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    n = len(tokens)
    ids = {k: _token_id(meta, f"tokenizer.ggml.{k}", n, path) for k in
           ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id", "eom_token_id")}  # fmt: skip
    eot = {ids["eot_token_id"], ids["eom_token_id"], ids["eos_token_id"]}
    eot |= {tokens.index(s) for s in _EOT_NAMES if s in special}
    return GGUFTokenizer(
        tokenizer, ids["bos_token_id"], ids["eos_token_id"], ids["padding_token_id"],
        add_bos_token=_typed(meta, "tokenizer.ggml.add_bos_token", bool, path, False),
        chat_template=_typed(meta, "tokenizer.chat_template", str, path),
        eot_token_ids=sorted(i for i in eot if i is not None),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ chat


class ChatTemplateError(ValueError):
    """Raised by a chat template's own ``raise_exception(...)`` call."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # unlike jinja's built-in filter, keeps '<' and '>' as they are (templates embed JSON in prompts)
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:  # fmt: skip
    """Render a Jinja chat template in a sandbox, with the variables Hugging Face templates expect."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, **kwargs,
    )  # fmt: skip
