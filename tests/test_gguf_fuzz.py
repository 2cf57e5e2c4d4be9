"""Fuzz of the GGUF reader. Hypothesis mutates the header and metadata of a small synthetic llama GGUF
(bit flips, overwritten bytes, truncation, huge or zero counts and lengths, wrong value-type tags, and
metadata values of any type and size). Every mutated file must either raise GGUFError through
``tdb_lens.load`` or load into a model whose logits are finite: never another exception, never NaN.

Each test prints how many cases loaded and how many were refused (``pytest -s``), and checks that both
happened (a fuzz whose every case is refused at the magic number would test nothing).
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter

import pytest
import torch
from gguf import GGUFReader
from gguf import GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tdb_lens
from _gguf_files import tiny_metadata, write_tiny_llama
from tdb_lens.models.gguf import GGUFError

pytestmark = pytest.mark.filterwarnings("ignore:.*unknown tokenizer.ggml.pre")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
_names = itertools.count()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The file's bytes, where its tensor data starts, every 4- and 8-byte integer slot of the header
    (counts, string lengths, dims, types, offsets) and the type tags of the metadata values."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "base.gguf"
    write_tiny_llama(path)
    reader = GGUFReader(path)
    slots, type_tags = [], []
    for f in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        pos = f.offset
        for i, part in enumerate(f.parts):
            if part.nbytes in (4, 8) and part.dtype.kind in "ui":
                slots.append((pos, part.nbytes))
                if i == 2 and f in reader.fields.values():
                    type_tags.append(pos)
            pos += part.nbytes
    return folder, path.read_bytes(), reader.data_offset, slots, type_tags


def load_outcome(folder, data: bytes) -> str:
    """'refused: ...' or 'loaded' (after checking the logits); anything else fails the test."""
    path = folder / f"case{next(_names)}.gguf"
    path.write_bytes(data)
    try:
        model = tdb_lens.load(str(path))
    except GGUFError as e:
        return "refused: " + str(e).split(": ", 1)[1].split(" ")[0]
    finally:
        path.unlink()
    tokens = torch.arange(min(model.cfg.d_vocab, model.cfg.n_ctx, 24))[None]
    with torch.no_grad():
        logits = model(tokens)
    assert bool(torch.isfinite(logits).all()), "a mutated file loaded into a model with non-finite logits"
    return "loaded"


@st.composite
def mutations(draw, header_end: int, size: int, slots: list, type_tags: list) -> tuple:
    kind = draw(st.sampled_from(["bit flips", "bytes", "truncate", "big count", "type tag"]))
    if kind == "bit flips":
        return kind, draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 7)), min_size=1, max_size=4))
    if kind == "bytes":
        return kind, (draw(st.integers(4, header_end - 1)), draw(st.binary(min_size=1, max_size=8)))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "big count":
        pos, n = draw(st.sampled_from(slots))
        value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]) | st.integers(0, 2**64 - 1))
        return kind, (pos, n, value % (1 << (8 * n)))
    return kind, (draw(st.sampled_from(type_tags)), draw(st.integers(0, 13) | st.integers(0, 2**32 - 1)))


def apply(data: bytes, kind: str, arg) -> bytes:
    out = bytearray(data)
    if kind == "bit flips":
        for pos, bit in arg:
            out[pos] ^= 1 << bit
    elif kind == "bytes":
        pos, new = arg
        out[pos : pos + len(new)] = new
    elif kind == "truncate":
        del out[arg:]
    elif kind == "big count":
        pos, n, value = arg
        out[pos : pos + n] = value.to_bytes(n, "little")
    else:
        pos, tag = arg
        out[pos : pos + 4] = struct.pack("<I", tag)
    return bytes(out)


def test_header_mutations_are_refused_or_load_finite(base):
    folder, data, header_end, slots, type_tags = base

    outcomes: Counter = Counter()

    @FUZZ
    @given(mutations(header_end, len(data), slots, type_tags))
    def check(mutation):
        kind, arg = mutation
        outcome = load_outcome(folder, apply(data, kind, arg))
        outcomes[f"{kind}: {outcome.split(':')[0]}"] += 1
        outcomes[outcome.split(":")[0]] += 1

    check()
    print(dict(outcomes))
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0


_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(lambda v: (v, VT.INT64)),
    st.integers(0, 2**32 - 1).map(lambda v: (v, VT.UINT32)),
    st.sampled_from([0, 1, 2, 3, 4, 7, 32, 64, 128, 2**31]).map(lambda v: (v, VT.UINT32)),
    st.floats(width=32, allow_nan=True, allow_infinity=True).map(lambda v: (v, VT.FLOAT32)),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: (v, VT.FLOAT64)),
    st.booleans().map(lambda v: (v, VT.BOOL)),
    st.text(max_size=8).map(lambda v: (v, VT.STRING)),
    st.lists(st.integers(0, 300), min_size=1, max_size=3).map(lambda v: (v, VT.ARRAY, VT.UINT32)),
)


def test_metadata_values_of_any_type_are_refused_or_load_finite(base):
    folder = base[0]
    keys = sorted(tiny_metadata()) + ["llama.attention.key_length", "llama.rope.scaling.type", "llama.rope.scaling.factor",
                                      "llama.vocab_size", "tokenizer.ggml.padding_token_id", "general.alignment"]  # fmt: skip

    outcomes: Counter = Counter()

    @FUZZ
    @given(st.dictionaries(st.sampled_from(keys), _VALUES, min_size=1, max_size=2))
    def check(meta):
        path = folder / f"case{next(_names)}.gguf"
        write_tiny_llama(path, meta=meta)
        data = path.read_bytes()
        path.unlink()
        outcome = load_outcome(folder, data)
        outcomes[outcome] += 1
        outcomes[outcome.split(":")[0]] += 1

    check()
    print(dict(outcomes))
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0
