"""The IOI sentence frames (Wang et al. 2022) and the word lists their slots are filled from.

Each of the paper's 15 frames comes in two orders, ``"BABA"`` (the subject [B] named first) and
``"ABBA"`` (the indirect object [A] first); `single_token_words` keeps the words a tokenizer encodes
as one token after a space, so prompts from one frame share their token positions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

ORDERS = ("ABBA", "BABA")

# The paper's 15 sentence frames, in its "BABA" form (the subject [B] is named first).
BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. Then, [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)


def _swap_first_clause(template: str) -> str:
    """BABA -> ABBA: swap the first [A] and the first [B] (the two names of the first clause)."""
    a, b = template.index("[A]"), template.index("[B]")
    lo, hi = min(a, b), max(a, b)
    first, second = template[lo : lo + 3], template[hi : hi + 3]
    return template[:lo] + second + template[lo + 3 : hi] + first + template[hi + 3 :]


# The same frames with the indirect object named first.
ABBA_TEMPLATES: tuple[str, ...] = tuple(_swap_first_clause(t) for t in BABA_TEMPLATES)

TEMPLATES: dict[str, tuple[str, ...]] = {"ABBA": ABBA_TEMPLATES, "BABA": BABA_TEMPLATES}
N_TEMPLATES = len(BABA_TEMPLATES)

# 110 common English first names (before single-token filtering).
NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Robert", "Michael", "William", "David", "Richard", "Joseph",
    "Thomas", "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kevin",
    "Brian", "George", "Edward", "Ronald", "Timothy", "Jason", "Jeffrey", "Ryan", "Jacob", "Gary",
    "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott", "Brandon", "Benjamin", "Samuel",
    "Frank", "Gregory", "Patrick", "Alexander", "Jack", "Dennis", "Peter", "Tyler", "Aaron", "Adam",
    "Henry", "Nathan", "Douglas", "Zachary", "Kyle", "Walter", "Ethan", "Jeremy", "Harold", "Sean",
    "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen", "Lisa",
    "Nancy", "Betty", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa",
    "Deborah", "Stephanie", "Rebecca", "Laura", "Sharon", "Cynthia", "Kathleen", "Amy", "Angela", "Anna",
    "Rachel", "Emma", "Nicole", "Helen", "Katherine", "Christine", "Samantha", "Alice", "Grace", "Kelly",
    "Lucy", "Kate", "Sophie", "Max", "Ben", "Dan", "Sam", "Alex", "Jane", "Rose",
)

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "beach",
    "library", "museum", "church", "airport", "market", "theater", "hotel", "bank", "zoo", "gym",
    "farm", "cafe", "mall", "river", "lake",
)

OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "letter",
    "gift", "flower", "ball", "key", "cake", "hat", "watch", "phone", "bottle", "card",
    "pen", "toy", "box", "bag", "coin",
)

SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


@runtime_checkable
class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _check_templates() -> None:
    for order, temps in TEMPLATES.items():
        for i, t in enumerate(temps):
            slots = SLOT.findall(t)
            if slots.count("A") != 2 or slots.count("B") != 2 or not t.endswith(" [A]"):
                raise AssertionError(f"IOI template {order} {i} is malformed: {t!r}")
            names = [s for s in slots if s in ("A", "B")]
            want = ["A", "B", "B", "A"] if order == "ABBA" else ["B", "A", "B", "A"]
            if names != want:
                raise AssertionError(f"IOI template {order} {i} has name order {names}, expected {want}")


_check_templates()


def resolve_tokenizer(model_or_tokenizer) -> TokenizerLike:
    """A model with a ``.tokenizer`` gives that tokenizer; anything with ``encode`` is a tokenizer."""
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is not None and callable(getattr(tok, "encode", None)):
        return tok
    if callable(getattr(model_or_tokenizer, "encode", None)):
        return model_or_tokenizer
    raise TypeError(
        f"expected a tokenizer (an object with encode(str) -> list[int]) or a model with a .tokenizer, "
        f"got {type(model_or_tokenizer).__name__}"
    )


def single_token_words(words: Iterable[str], tokenizer) -> list[str]:
    """The words (in their given order, duplicates removed) that ``tokenizer`` encodes as exactly
    one token when preceded by a space, e.g. ``" Mary"``."""
    tok = resolve_tokenizer(tokenizer)
    out: list[str] = []
    seen: set[str] = set()
    for w in words:
        if not isinstance(w, str) or not w or w != w.strip():
            raise ValueError(f"expected non-empty words without surrounding spaces, got {w!r}")
        if w in seen:
            continue
        seen.add(w)
        if len(tok.encode(" " + w)) == 1:
            out.append(w)
    return out
