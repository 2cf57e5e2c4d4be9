"""Prompt formats: the explainer's, the simulator's and the detection / fuzzing judges'.

The explainer and the simulator use the format of Bills et al. (2023): one token per line, a tab,
then the unit's activation on that token scaled to integers 0..10 (10 = the unit's largest
activation among the examples shown; negative activations are 0). The wording is tdb_lens' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

MAX_SCALE = 10
#: Bumped whenever a prompt below changes: stored explanations record it in their settings.
PROMPT_VERSION = 1
PLACEHOLDER = "unknown"

EXPLAINER_SYSTEM = (
    "You study the units (neurons and features) of a language model. Each unit responds to one kind "
    "of thing in text. You are shown text excerpts one token per line; after each token comes a tab and "
    "how strongly the unit responds to that token, from 0 (not at all) to 10 (its strongest response). "
    "Say in one short phrase what the unit responds to. Describe the pattern; do not list numbers."
)

SIMULATOR_SYSTEM = (
    "A unit of a language model responds to one kind of thing in text, as its description says. For each "
    "token of an excerpt, written one token per line, predict how strongly the unit responds: an integer "
    "from 0 (not at all) to 10 (strongly)."
)

JUDGE_SYSTEM = (
    "A unit of a language model responds to one kind of thing in text, as its description says. "
    "Answer Yes or No."
)

# One worked example (invented for tdb_lens) shown to the explainer and the simulator before the real task.
FEWSHOT_TOKENS = [
    ["We", " meet", " on", " Monday", " and", " again", " on", " Friday", "."],
    ["The", " shop", " is", " closed", " every", " Sunday", " morning", "."],
]
FEWSHOT_ACTS = [[0, 0, 0, 10, 0, 0, 1, 9, 0], [0, 0, 0, 0, 2, 10, 1, 0]]
FEWSHOT_EXPLANATION = "names of days of the week"


def scale_acts(acts: Sequence[Sequence[float]], max_act: Optional[float] = None) -> list[list[int]]:
    """Activations to integers 0..10: ``round(10 * a / max_act)``, negatives 0 (Bills et al.)."""
    if max_act is None:
        max_act = max((float(a) for row in acts for a in row), default=0.0)
    if not max_act or max_act <= 0:
        return [[0 for _ in row] for row in acts]
    return [[int(min(MAX_SCALE, max(0, round(MAX_SCALE * float(a) / max_act)))) for a in row] for row in acts]


def show_token(tok: str) -> str:
    """A token as one line of a prompt: newlines and tabs escaped, empty tokens visible."""
    s = tok.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return s if s else "<empty>"


def format_records(tokens: Sequence[Sequence[str]], values: Sequence[Sequence[object]]) -> str:
    """``<start>``/``<end>`` blocks of ``token<TAB>value`` lines."""
    blocks = []
    for toks, vals in zip(tokens, values):
        lines = [f"{show_token(t)}\t{v}" for t, v in zip(toks, vals)]
        blocks.append("<start>\n" + "\n".join(lines) + "\n<end>")
    return "\n".join(blocks)


def format_nonzero(tokens: Sequence[Sequence[str]], values: Sequence[Sequence[int]]) -> str:
    lines = [f"{show_token(t)}\t{v}" for toks, vals in zip(tokens, values) for t, v in zip(toks, vals) if v]
    return "\n".join(lines) if lines else "(none)"


def trim_window(tokens: Sequence[str], acts: Sequence[float], keep: Optional[int]) -> tuple[list[str], list[float]]:
    """At most ``keep`` tokens around the window's largest activation (mostly before it: the
    context that led to it)."""
    toks, vals = list(tokens), [float(a) for a in acts]
    if keep is None or len(toks) <= keep:
        return toks, vals
    peak = max(range(len(vals)), key=lambda i: vals[i])
    after = min(len(toks) - 1 - peak, max(1, keep // 4))
    end = peak + after + 1
    start = max(0, end - keep)
    end = min(len(toks), start + keep)
    return toks[start:end], vals[start:end]


# ---- explainer --------------------------------------------------------------------------------
def explainer_messages(tokens: Sequence[Sequence[str]], acts: Sequence[Sequence[float]],
                       nonzero_summary: bool = True, fewshot: bool = True,
                       top_tokens: Optional[Sequence[str]] = None) -> list[dict]:
    """Chat messages asking for an explanation of a unit from its examples.

    ``fewshot``: one worked example first (Bills et al. show several). ``top_tokens``: also name
    the tokens with the strongest responses and ask what they have in common (the form that
    SmolLM2-135M answers best: with the worked example it tends to copy the example's answer).
    """

    def user(toks, vals, top=None):
        text = "Excerpts with the unit's responses:\n" + format_records(toks, vals)
        if nonzero_summary:
            text += "\n\nThe same responses, only the tokens above 0:\n" + format_nonzero(toks, vals)
        if top:
            return text + "\n\nThe tokens with the strongest responses: " + ", ".join(top) + \
                ".\nWhat do these tokens have in common? Answer in a few words."
        return text + "\n\nIn one short phrase, what does this unit respond to?"

    msgs = [{"role": "system", "content": EXPLAINER_SYSTEM}]
    if fewshot:
        msgs += [{"role": "user", "content": user(FEWSHOT_TOKENS, FEWSHOT_ACTS)},
                 {"role": "assistant", "content": f"{EXPLANATION_PREFILL} {FEWSHOT_EXPLANATION}."}]
    msgs.append({"role": "user", "content": user(tokens, scale_acts(acts), top_tokens)})
    return msgs


EXPLANATION_PREFILL = "This unit responds to"
LIST_PREFILL = "These tokens are"


def clean_explanation(text: str, prefill: str = EXPLANATION_PREFILL) -> str:
    """The first sentence of a generated explanation, without the prefill or quotes."""
    t = text.strip()
    for p in (prefill, EXPLANATION_PREFILL):
        if p and t.lower().startswith(p.lower()):
            t = t[len(p):].strip()
            break
    for stop in ("\n", ". ", "<|"):
        if stop in t:
            t = t.split(stop)[0]
    t = t.strip().strip('"').strip("'").rstrip(".").strip()
    return t or "(no explanation)"


# ---- simulator -------------------------------------------------------------------------------
@dataclass
class SimulationPrompt:
    """The shared prefix (few-shot example and instructions) and one window's part."""

    prefix: str
    body: str
    token_lines: int


def simulation_prefix(scale_max: int = MAX_SCALE) -> str:
    fs = [[min(v, scale_max) for v in row] for row in FEWSHOT_ACTS]
    return (
        f"{SIMULATOR_SYSTEM}\n\n"
        f"Description: {FEWSHOT_EXPLANATION}\n"
        f"{format_records(FEWSHOT_TOKENS, fs)}\n\n"
    )


def simulation_body(explanation: str, tokens: Sequence[str]) -> str:
    """The part of an all-at-once prompt for one window: a placeholder after each token's tab;
    the simulator reads its next-token distribution over 0..10 at each placeholder."""
    return f"Description: {explanation}\n" + format_records([tokens], [[PLACEHOLDER] * len(tokens)])


def json_simulation_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    """For endpoints without log-probabilities: ask for a JSON list of integers, one per token."""
    listing = "\n".join(f"{i}\t{show_token(t)}" for i, t in enumerate(tokens))
    fs_listing = "\n".join(f"{i}\t{show_token(t)}" for i, t in enumerate(FEWSHOT_TOKENS[0]))
    return [
        {"role": "system", "content": SIMULATOR_SYSTEM + " Reply with only a JSON list of integers, one per token."},
        {"role": "user", "content": f"Description: {FEWSHOT_EXPLANATION}\nTokens:\n{fs_listing}"},
        {"role": "assistant", "content": str(FEWSHOT_ACTS[0])},
        {"role": "user", "content": f"Description: {explanation}\nTokens:\n{listing}"},
    ]


# ---- detection and fuzzing ---------------------------------------------------------------------
def detection_messages(explanation: str, tokens: Sequence[str]) -> list[dict]:
    text = "".join(tokens)
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Description: {explanation}\nText: {text!r}\n"
                                    "Does the text contain something the description is about?"},
    ]


def highlight(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The text with marked tokens between << and >> (adjacent marked tokens share one pair)."""
    out, open_ = [], False
    for t, m in zip(tokens, marked):
        if m and not open_:
            out.append("<<")
            open_ = True
        if not m and open_:
            out.append(">>")
            open_ = False
        out.append(t)
    if open_:
        out.append(">>")
    return "".join(out)


def fuzzing_messages(explanation: str, tokens: Sequence[str], marked: Sequence[bool]) -> list[dict]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Description: {explanation}\nText: {highlight(tokens, marked)!r}\n"
                                    "Are the parts between << and >> what the description is about?"},
    ]


def to_tensor_rows(acts) -> list[list[float]]:
    if isinstance(acts, torch.Tensor):
        return acts.float().tolist()
    return [[float(a) for a in row] for row in acts]
