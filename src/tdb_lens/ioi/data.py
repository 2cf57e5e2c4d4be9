"""Indirect-object-identification (IOI) prompts, after Wang et al. (2022), "Interpretability in the Wild".

A prompt such as ``"When Mary and John went to the store, John gave a drink to"`` mentions two
names in its first clause; one of them (the subject, S) is repeated, and the model should
complete the sentence with the other one (the indirect object, IO): ``" Mary"``.

The 15 sentence frames are the paper's. Each comes in two orders that differ only in the first
clause: ``"BABA"`` (S named first: "... [B] and [A] ..., [B] gave ... to [A]") and ``"ABBA"`` (IO
named first: "... [A] and [B] ..., [B] gave ... to [A]"). In both, ``[A]`` is the IO and ``[B]`` the
S; the prompt is the sentence without its final ``" [A]"``.

Names, places and objects are kept only when they are one token after a space for the tokenizer
in use, so every prompt built from one template has the same token length and the same key
positions (what per-template mean ablation needs).

Main entry points: :meth:`IOIDataset.generate`, :meth:`IOIDataset.abc`, :meth:`IOIDataset.to_batch`,
:func:`logit_diff`, :func:`io_probability`, :func:`accuracy`, :func:`per_template_groups`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

from .metrics import accuracy, io_probability, logit_diff
from .templates import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    N_TEMPLATES,
    NAMES,
    OBJECTS,
    ORDERS,
    PLACES,
    SLOT,
    TEMPLATES,
    resolve_tokenizer,
    single_token_words,
)

# ---------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt.

    ``text`` ends just before the answer (``"... John gave a drink to"``); ``io`` is the correct
    completion (without its leading space), ``s`` the subject named at S1, ``s2`` the name at the
    repeated-subject slot S2 (equal to ``s`` in a clean prompt; a third name in an ABC prompt).
    ``template`` indexes :data:`BABA_TEMPLATES` / :data:`ABBA_TEMPLATES`, ``order`` is "ABBA" or "BABA".
    ``place``/``obj`` are ``None`` for the two templates without those slots.
    """

    text: str
    io: str
    s: str
    template: int
    order: str
    place: Optional[str]
    obj: Optional[str]
    s2: str = ""

    def __post_init__(self) -> None:
        if not self.s2:
            object.__setattr__(self, "s2", self.s)

    @classmethod
    def build(
        cls,
        template: int,
        order: str,
        io: str,
        s: str,
        place: Optional[str] = None,
        obj: Optional[str] = None,
        s2: Optional[str] = None,
    ) -> IOIPrompt:
        """Fill template ``template`` (order ``order``) with the given words."""
        text, _ = _render(template, order, io, s, s2 if s2 is not None else s, place, obj)
        uses = set(SLOT.findall(TEMPLATES[order][template]))
        return cls(
            text=text,
            io=io,
            s=s,
            template=template,
            order=order,
            place=place if "PLACE" in uses else None,
            obj=obj if "OBJECT" in uses else None,
            s2=s2 if s2 is not None else s,
        )

    @property
    def template_key(self) -> tuple[str, int]:
        """``(order, template index)``: prompts with the same key have the same words but for names."""
        return (self.order, self.template)

    @property
    def template_string(self) -> str:
        return TEMPLATES[self.order][self.template]

    @property
    def full_text(self) -> str:
        """The whole sentence, the prompt followed by ``" " + io``."""
        return f"{self.text} {self.io}"

    @property
    def names(self) -> tuple[str, str, str]:
        """The names at the IO, S1 and S2 slots, in that order."""
        return (self.io, self.s, self.s2)

    def word_spans(self) -> dict[str, tuple[int, int]]:
        """Character spans ``(start, end)`` in ``text`` of the names at ``"io"``, ``"s1"`` and
        ``"s2"`` (the word alone, without its leading space)."""
        text, spans = _render(self.template, self.order, self.io, self.s, self.s2, self.place, self.obj)
        if text != self.text:
            raise ValueError(f"prompt text {self.text!r} does not match its template (renders {text!r})")
        return spans

    def prefix_before(self, slot: str) -> str:
        """The prompt text before the space that precedes the name at ``slot`` ("io", "s1", "s2")."""
        start, _ = self.word_spans()[slot]
        return self.text[: start - 1]


def _render(
    template: int, order: str, io: str, s1: str, s2: str, place: Optional[str], obj: Optional[str]
) -> tuple[str, dict[str, tuple[int, int]]]:
    if order not in TEMPLATES:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not isinstance(template, int) or not 0 <= template < N_TEMPLATES:
        raise ValueError(f"template index must be an int in [0, {N_TEMPLATES}), got {template!r}")
    t = TEMPLATES[order][template]
    t = t[: -len(" [A]")]  # the prompt stops before the answer
    out: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    n_b = 0
    pos = 0
    length = 0
    for m in SLOT.finditer(t):
        lit = t[pos : m.start()]
        out.append(lit)
        length += len(lit)
        kind = m.group(1)
        word: Optional[str]
        slot: Optional[str]
        if kind == "A":
            word, slot = io, "io"
        elif kind == "B":
            word, slot = (s1, "s1") if n_b == 0 else (s2, "s2")
            n_b += 1
        elif kind == "PLACE":
            word, slot = place, None
        else:
            word, slot = obj, None
        if word is None:
            raise ValueError(f"template {order} {template} needs a {kind.lower()}: {TEMPLATES[order][template]!r}")
        if slot is not None:
            spans[slot] = (length, length + len(word))
        out.append(word)
        length += len(word)
        pos = m.end()
    out.append(t[pos:])
    return "".join(out), spans


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class IOIBatch:
    """Tokenized IOI prompts. Every tensor is int64; positions index ``tokens`` (BOS included).

    - ``tokens`` ``[batch, pos]``, right-padded with the pad id; ``attention_mask`` ``[batch, pos]``
      (1 real, 0 padding);
    - ``end`` ``[batch]``: the last real token, where the IO name is predicted;
    - ``io_token`` / ``s_token`` / ``s2_token`` ``[batch]``: ids of ``" " + io``, ``" " + s``
      (the S1 name) and ``" " + s2``;
    - ``io_pos``, ``s1_pos``, ``s2_pos``, ``s1_plus_1`` ``[batch]``: the name tokens in the prompt.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    end: torch.Tensor
    io_token: torch.Tensor
    s_token: torch.Tensor
    s2_token: torch.Tensor
    io_pos: torch.Tensor
    s1_pos: torch.Tensor
    s2_pos: torch.Tensor
    s1_plus_1: torch.Tensor
    prompts: list[IOIPrompt] = field(repr=False)
    prepend_bos: bool = False
    pad_id: int = 0

    _POSITIONS = {"end": "end", "io": "io_pos", "s1": "s1_pos", "s2": "s2_pos", "s1+1": "s1_plus_1"}

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens per prompt (``end + 1``)."""
        return self.end + 1

    def positions(self, name: str) -> torch.Tensor:
        """Positions by name: ``"end"``, ``"io"``, ``"s1"``, ``"s2"``, ``"s1+1"`` (case-insensitive)."""
        key = self._POSITIONS.get(name.lower())
        if key is None:
            raise KeyError(f"unknown IOI position {name!r}; expected one of {sorted(self._POSITIONS)}")
        return getattr(self, key)

    def to(self, device) -> IOIBatch:
        moved = {
            k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)
        }
        return replace(self, **moved)  # type: ignore[arg-type]

    def __getitem__(self, idx) -> IOIBatch:
        """A sub-batch (``idx``: slice, list of indices or index tensor); padding is left as it is."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            sel = list(range(len(self)))[idx]
        else:
            sel = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        index = torch.tensor(sel, dtype=torch.long)
        fields = {
            k: v[index.to(v.device)] for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)
        }
        return replace(self, prompts=[self.prompts[i] for i in sel], **fields)  # type: ignore[arg-type]


def _pad_id(tok) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def _single_id(tok, word: str, what: str, prompt: IOIPrompt) -> int:
    ids = tok.encode(" " + word)
    if len(ids) != 1:
        raise ValueError(
            f"the {what} name {word!r} of prompt {prompt.text!r} is {len(ids)} tokens after a space "
            f"({ids}); IOI names must be single tokens (filter them with single_token_words)"
        )
    return int(ids[0])


def _locate(tok, prompt: IOIPrompt, ids: list[int], slot: str, name_id: int, offset: int) -> int:
    """Position of the name at ``slot`` in ``ids`` (the prompt's encoding), from the length of the
    encoded text before it; checked against the full encoding."""
    prefix = tok.encode(prompt.prefix_before(slot))
    n = len(prefix)
    if ids[:n] != prefix or n >= len(ids) or ids[n] != name_id:
        start, stop = prompt.word_spans()[slot]
        raise ValueError(
            f"cannot find the {slot} name {prompt.text[start:stop]!r} in the tokens of {prompt.text!r}: "
            f"the tokenizer does not split the prompt at the space before it"
        )
    return n + offset


def tokenize_prompts(
    prompts: Sequence[IOIPrompt], model_or_tokenizer, prepend_bos: Optional[bool] = None, device=None
) -> IOIBatch:
    """Tokenize ``prompts`` into an :class:`IOIBatch` (see :meth:`IOIDataset.to_batch`)."""
    if len(prompts) == 0:
        raise ValueError("cannot tokenize an empty list of IOI prompts")
    tok = resolve_tokenizer(model_or_tokenizer)
    bos = getattr(tok, "bos_token_id", None)
    if prepend_bos is None:
        prepend_bos = bool(getattr(tok, "default_prepend_bos", bos is not None)) and bos is not None
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id; pass prepend_bos=False")
    offset = 1 if prepend_bos else 0
    pad = _pad_id(tok)

    rows: list[list[int]] = []
    cols: dict[str, list[int]] = {k: [] for k in ("io_token", "s_token", "s2_token", "io_pos", "s1_pos", "s2_pos")}
    for p in prompts:
        ids = [int(i) for i in tok.encode(p.text)]
        io_id = _single_id(tok, p.io, "IO", p)
        s_id = _single_id(tok, p.s, "S1", p)
        s2_id = _single_id(tok, p.s2, "S2", p)
        cols["io_token"].append(io_id)
        cols["s_token"].append(s_id)
        cols["s2_token"].append(s2_id)
        cols["io_pos"].append(_locate(tok, p, ids, "io", io_id, offset))
        cols["s1_pos"].append(_locate(tok, p, ids, "s1", s_id, offset))
        cols["s2_pos"].append(_locate(tok, p, ids, "s2", s2_id, offset))
        rows.append(([int(bos)] if prepend_bos and bos is not None else []) + ids)

    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    t = {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}
    end = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
    if device is None:
        device = _model_device(model_or_tokenizer)
    batch = IOIBatch(
        tokens=tokens,
        attention_mask=mask,
        end=end,
        s1_plus_1=t["s1_pos"] + 1,
        prompts=list(prompts),
        prepend_bos=bool(prepend_bos),
        pad_id=pad,
        **t,
    )
    return batch.to(device) if device is not None else batch


def _model_device(obj):
    params = getattr(obj, "parameters", None)
    if callable(params):
        try:
            return next(iter(params())).device
        except (StopIteration, TypeError):
            return None
    return None


# ---------------------------------------------------------------------------------------------- dataset


def _check_words(words: Sequence[str], what: str, need: int) -> list[str]:
    words = list(dict.fromkeys(words))
    if len(words) < need:
        raise ValueError(f"need at least {need} {what} (after single-token filtering), got {len(words)}: {words}")
    return words


class IOIDataset:
    """A list of :class:`IOIPrompt` plus the word pools they were drawn from.

    Build one with :meth:`generate`; derive corrupted versions with :meth:`abc` / :meth:`flipped`.
    """

    def __init__(
        self,
        prompts: Sequence[IOIPrompt],
        names: Sequence[str] = NAMES,
        places: Sequence[str] = PLACES,
        objects: Sequence[str] = OBJECTS,
        seed: int = 0,
    ) -> None:
        self.prompts = list(prompts)
        self.names = list(names)
        self.places = list(places)
        self.objects = list(objects)
        self.seed = seed

    # -- construction
    @classmethod
    def generate(
        cls,
        tokenizer,
        n_prompts: int,
        seed: int = 0,
        templates: Optional[Sequence[int]] = None,
        orders: Sequence[str] = ORDERS,
        names: Sequence[str] = NAMES,
        places: Sequence[str] = PLACES,
        objects: Sequence[str] = OBJECTS,
    ) -> IOIDataset:
        """``n_prompts`` prompts, deterministic for ``seed``.

        Prompt ``i`` uses the ``i % k``-th of the ``k`` (template, order) pairs (templates outer,
        orders inner), so every pair gets ``n_prompts // k`` or one more prompts. IO and S are
        two different names drawn at random; place and object too. ``tokenizer`` (or a model with
        ``.tokenizer``) filters the word pools to single tokens; ``None`` keeps them as given.
        """
        if not isinstance(n_prompts, int) or n_prompts <= 0:
            raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}")
        if templates is None:
            templates = list(range(N_TEMPLATES))
        templates = list(templates)
        bad = [t for t in templates if not isinstance(t, int) or not 0 <= t < N_TEMPLATES]
        if not templates or bad:
            raise ValueError(f"templates must be a non-empty list of indices in [0, {N_TEMPLATES}), got {templates}")
        if isinstance(orders, str):
            orders = (orders,)
        orders = list(orders)
        if not orders or any(o not in ORDERS for o in orders):
            raise ValueError(f"orders must be a non-empty subset of {ORDERS}, got {orders}")
        if tokenizer is not None:
            names = single_token_words(names, tokenizer)
            places = single_token_words(places, tokenizer)
            objects = single_token_words(objects, tokenizer)
        names = _check_words(names, "names", 3)  # three, so the ABC corruption is possible
        places = _check_words(places, "places", 1)
        objects = _check_words(objects, "objects", 1)

        rng = random.Random(seed)
        combos = [(t, o) for t in dict.fromkeys(templates) for o in dict.fromkeys(orders)]
        prompts = []
        for i in range(n_prompts):
            t, o = combos[i % len(combos)]
            io, s = rng.sample(names, 2)
            prompts.append(IOIPrompt.build(t, o, io, s, rng.choice(places), rng.choice(objects)))
        return cls(prompts, names, places, objects, seed)

    # -- corruptions
    def abc(self, seed: Optional[int] = None) -> IOIDataset:
        """The ABC corruption: each prompt with its IO, S1 and S2 slots filled by three new,
        distinct names drawn at random (template, order, place and object kept). ``io``/``s``/``s2``
        of the result are the names at those slots."""
        rng = random.Random(self.seed + 1 if seed is None else seed)
        out = []
        for p in self.prompts:
            a, b, c = rng.sample(self.names, 3)
            out.append(IOIPrompt.build(p.template, p.order, a, b, p.place, p.obj, s2=c))
        return IOIDataset(out, self.names, self.places, self.objects, self.seed)

    def flipped(self) -> IOIDataset:
        """Each prompt in the other order (ABBA <-> BABA), same names, place and object: the S1
        and IO names trade places in the first clause."""
        out = [
            IOIPrompt.build(p.template, "BABA" if p.order == "ABBA" else "ABBA", p.io, p.s, p.place, p.obj, s2=p.s2)
            for p in self.prompts
        ]
        return IOIDataset(out, self.names, self.places, self.objects, self.seed)

    # -- tokenization
    def to_batch(self, model_or_tokenizer, prepend_bos: Optional[bool] = None, device=None) -> IOIBatch:
        """Tokenize every prompt.

        ``model_or_tokenizer``: a tokenizer (``encode(str) -> list[int]``, optional
        ``bos_token_id``, ``pad_token_id``/``eos_token_id``) or a model with ``.tokenizer`` (then the
        batch goes to the model's device unless ``device`` says otherwise). ``prepend_bos=None``
        follows the tokenizer's ``default_prepend_bos`` (else: prepend when it has a BOS id).
        Tokens are right-padded with ``pad_token_id``, else ``eos_token_id``, else 0. Name
        positions come from the lengths of the encoded text before each name, checked against the
        full encoding (a clear error if the tokenizer merges a name with what precedes it).
        """
        return tokenize_prompts(self.prompts, model_or_tokenizer, prepend_bos=prepend_bos, device=device)

    # -- container protocol
    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[IOIPrompt]:
        return iter(self.prompts)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return IOIDataset(self.prompts[idx], self.names, self.places, self.objects, self.seed)
        return self.prompts[idx]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def __repr__(self) -> str:
        return f"IOIDataset({len(self)} prompts, {len(self.names)} names, seed={self.seed})"


def per_template_groups(dataset: Union[IOIDataset, Sequence[IOIPrompt]]) -> dict[tuple[str, int], list[int]]:
    """``(order, template index)`` -> indices of the prompts built from that template, in the order
    the keys first appear. The paper's mean ablation averages activations over each group (of the
    ABC prompts), so the means share the prompts' token positions."""
    prompts = dataset.prompts if isinstance(dataset, IOIDataset) else list(dataset)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.template_key, []).append(i)
    return groups


__all__ = [
    "ABBA_TEMPLATES",
    "BABA_TEMPLATES",
    "N_TEMPLATES",
    "NAMES",
    "OBJECTS",
    "ORDERS",
    "PLACES",
    "TEMPLATES",
    "IOIBatch",
    "IOIDataset",
    "IOIPrompt",
    "accuracy",
    "io_probability",
    "logit_diff",
    "per_template_groups",
    "single_token_words",
    "tokenize_prompts",
]
