"""Simulators: predict a unit's activation on each token from an explanation alone.

`AllAtOnceSimulator` is Bills et al.'s "all at once" method with a model run by tdb_lens: one
forward pass over a prompt that lists the window's tokens, each followed by a tab and a
placeholder; at each placeholder the model's next-token probabilities over the tokens ``0 .. 10``
(renormalised over those) give the expected activation. The instructions and a worked example
form a prefix whose keys and values are computed once and reused for every window (KV cache),
and windows are batched with right padding. When ``"10"`` is not a single token (Llama-style
digit splitting, SmolLM2) the scale is ``0 .. 9``: correlation does not care about the scale.

`LikelihoodSimulator` is tdb_lens' simulator for small local models, which cannot follow the
all-at-once format: on the planted city-name unit SmolLM2-135M-Instruct's all-at-once
simulation correlates about 0.35 with the truth whatever the explanation says (the true one and
"numbers and arithmetic" alike), so it does not discriminate. The likelihood simulator asks
instead how much more likely each token's word becomes when the explanation precedes it: the
pointwise mutual information ``log P(word | "Examples of {explanation}:") - log P(word |
"Examples of words:")``, averaged over a few templates and clipped at 0. Likelihoods are what
small language models are good at. It reads a token's word only, not its context, so an
explanation of a context-dependent unit is judged by the token content it names.

`JSONSimulator` serves chat endpoints without log-probabilities: the model answers a JSON list of
integers, one per token; malformed replies are repaired where possible (a list of the wrong
length is padded with zeros or cut) and otherwise count as all zeros.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ..models.components import KVCache

from .prompts import PLACEHOLDER, json_simulation_messages, show_token, simulation_prefix


class AllAtOnceSimulator:
    def __init__(self, model=None, batch_size: int = 8, progress: bool = False) -> None:
        if model is None:
            from .. import load

            model = load("smollm2-135m")
        self.model = model.eval()
        self.batch_size = batch_size
        self.progress = progress
        tok = model.tokenizer
        ids: dict[int, int] = {}
        for v in range(11):
            enc = tok.encode(str(v))
            if len(enc) == 1:
                ids[v] = enc[0]
        if not all(v in ids for v in range(10)):
            raise ValueError("the simulator model's tokenizer must have the digits 0-9 as single tokens")
        self.scale_max = 10 if 10 in ids else 9
        self.values = torch.tensor(list(range(self.scale_max + 1)), dtype=torch.float32)
        self.value_ids = torch.tensor([ids[v] for v in range(self.scale_max + 1)])
        self.prefix_ids = tok.encode(simulation_prefix(self.scale_max))
        self._prefix_cache: Optional[KVCache] = None
        self.name = f"all-at-once:{getattr(model, 'name', None) or type(model).__name__}"

    # -- prompt construction with known placeholder positions -------------------------------------
    def encode_body(self, explanation: str, tokens: Sequence[str]) -> tuple[list[int], list[int]]:
        """Token ids of one window's part and, per window token, the position whose next-token
        distribution is read (the tab before that token's placeholder)."""
        enc = self.model.tokenizer.encode
        ids = enc(f"Description: {explanation}\n<start>\n")
        read_at = []
        tail = enc(f"{PLACEHOLDER}\n")
        for t in tokens:
            ids += enc(f"{show_token(t)}\t")
            read_at.append(len(ids) - 1)
            ids += tail
        ids += enc("<end>")
        return ids, read_at

    @torch.no_grad()
    def _prefix(self):
        from ..models.components import KVCache

        if self._prefix_cache is None:
            cache = KVCache.empty(self.model.cfg.n_layers)
            self.model(torch.tensor([self.prefix_ids], device=self.model.device), past_kv_cache=cache)
            self._prefix_cache = cache
        return self._prefix_cache

    @torch.no_grad()
    def simulate(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[list[float]]:
        """Expected activation (0..scale_max) at every token of every window."""
        from ..models.components import KVCache

        m = self.model
        bodies = [self.encode_body(explanation, w) for w in windows]
        out: list[list[float]] = [[] for _ in windows]
        order = sorted(range(len(bodies)), key=lambda i: len(bodies[i][0]))  # similar lengths together
        prefix = self._prefix()
        for s in tqdm(range(0, len(order), self.batch_size), disable=not self.progress, desc="simulate"):
            idx = order[s:s + self.batch_size]
            B = len(idx)
            n = max(len(bodies[i][0]) for i in idx)
            if len(self.prefix_ids) + n > m.cfg.n_ctx:
                raise ValueError(f"simulation prompt of {len(self.prefix_ids) + n} tokens exceeds the model's "
                                 f"context {m.cfg.n_ctx}")
            toks = torch.full((B, n), m.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(B, n, dtype=torch.long)
            for r, i in enumerate(idx):
                ids = bodies[i][0]
                toks[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            cache = KVCache([k.expand(B, -1, -1, -1) for k in prefix.keys],
                            [v.expand(B, -1, -1, -1) for v in prefix.values])
            logits = m(toks.to(m.device), attention_mask=mask.to(m.device), past_kv_cache=cache).float().cpu()
            for r, i in enumerate(idx):
                pos = torch.tensor(bodies[i][1], dtype=torch.long)
                lp = logits[r, pos][:, self.value_ids].softmax(-1)  # [T, values]
                out[i] = (lp @ self.values).tolist()
        return out


# (explanation template, neutral template): "{e}" is replaced by the explanation
LIKELIHOOD_TEMPLATES = (
    ("Examples of {e}:", "Examples of words:"),
    ("Here is a list of {e}:", "Here is a list of words:"),
    ("Text about {e}, for example", "Text, for example"),
)


def word_of(token: str) -> str:
    """The word a token stands for in the likelihood simulator: stripped of surrounding spaces."""
    return token.strip() or token


class LikelihoodSimulator:
    """Pointwise mutual information between an explanation and each token (see the module docstring).

    For each template pair ``(T_e, T_0)`` and each distinct word ``w`` of the windows,
    ``log P(" " + w | T_e(explanation)) - log P(" " + w | T_0)`` (all of the word's tokens); the
    prediction is its mean over the templates, clipped at 0. One forward over the template's
    tokens is cached (KV) and reused for every word; neutral log-probabilities do not depend on
    the explanation and are memoised.
    """

    def __init__(self, model=None, templates: Sequence[tuple[str, str]] = LIKELIHOOD_TEMPLATES,
                 batch_size: int = 256, clip: bool = True, progress: bool = False) -> None:
        if model is None:
            from .. import load

            model = load("smollm2-135m")
        if not templates:
            raise ValueError("LikelihoodSimulator needs at least one (explanation, neutral) template pair")
        for t in templates:
            if len(t) != 2 or "{e}" not in t[0]:
                raise ValueError(f"a template is a pair (text with '{{e}}', neutral text), got {t!r}")
        self.model = model.eval()
        self.templates = tuple(tuple(t) for t in templates)
        self.batch_size = batch_size
        self.clip = clip
        self.progress = progress
        self._neutral: dict[tuple[str, str], float] = {}
        self.name = f"likelihood:{getattr(model, 'name', None) or type(model).__name__}"

    @torch.no_grad()
    def word_log_probs(self, prefix: str, words: Sequence[str]) -> Float[torch.Tensor, " word"]:
        """``[len(words)]``: ``log P(" " + word | prefix)`` summed over the word's tokens."""
        from ..models.components import KVCache

        m, enc = self.model, self.model.tokenizer.encode
        pid = enc(prefix)
        if not pid:
            raise ValueError("empty prefix")
        cache = KVCache.empty(m.cfg.n_layers)
        first = m(torch.tensor([pid], device=m.device), past_kv_cache=cache)[0, -1].float().log_softmax(-1).cpu()
        wids = [enc(" " + w) or [m.tokenizer.pad_id] for w in words]
        out = torch.tensor([float(first[w[0]]) for w in wids])
        # words of more than one token: the rest of their tokens after the cached prefix, batched
        # by length (most words are one token and need no forward at all)
        multi = sorted((i for i, w in enumerate(wids) if len(w) > 1), key=lambda i: len(wids[i]))
        for s in range(0, len(multi), self.batch_size):
            part = multi[s:s + self.batch_size]
            B, L = len(part), max(len(wids[i]) for i in part) - 1
            toks = torch.full((B, L), m.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(B, L, dtype=torch.long)
            for r, i in enumerate(part):
                toks[r, : len(wids[i]) - 1] = torch.tensor(wids[i][:-1])
                mask[r, : len(wids[i]) - 1] = 1
            c = KVCache([_expand(k, B) for k in cache.keys], [_expand(v, B) for v in cache.values])
            logits = m(toks.to(m.device), attention_mask=mask.to(m.device), past_kv_cache=c).float().cpu()
            for r, i in enumerate(part):
                n = len(wids[i]) - 1
                lp = logits[r, :n].log_softmax(-1)
                out[i] += lp[torch.arange(n), torch.tensor(wids[i][1:])].sum()
        return out

    def _neutral_lp(self, neutral: str, words: Sequence[str]) -> Float[torch.Tensor, " word"]:
        missing = [w for w in words if (neutral, w) not in self._neutral]
        if missing:
            for w, v in zip(missing, self.word_log_probs(neutral, missing).tolist()):
                self._neutral[(neutral, w)] = v
        return torch.tensor([self._neutral[(neutral, w)] for w in words])

    def word_scores(self, explanation: str, words: Sequence[str]) -> dict[str, float]:
        """The prediction for each word (before it is spread over the windows)."""
        explanation = explanation.strip()
        if not explanation:
            raise ValueError("empty explanation")
        words = list(dict.fromkeys(words))
        total = torch.zeros(len(words))
        for te, t0 in tqdm(self.templates, disable=not self.progress, desc="simulate"):
            total += self.word_log_probs(te.replace("{e}", explanation), words) - self._neutral_lp(t0, words)
        total /= len(self.templates)
        if self.clip:
            total = total.clamp(min=0)
        return dict(zip(words, total.tolist()))

    def simulate(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[list[float]]:
        score = self.word_scores(explanation, [word_of(t) for w in windows for t in w])
        return [[score[word_of(t)] for t in w] for w in windows]


class JSONSimulator:
    def __init__(self, backend, max_tokens_per_token: int = 4) -> None:
        self.backend = backend
        self.scale_max = 10
        self.max_tokens_per_token = max_tokens_per_token
        self.name = f"json:{getattr(backend, 'name', type(backend).__name__)}"

    def simulate(self, explanation: str, windows: Sequence[Sequence[str]]) -> list[list[float]]:
        convs = [json_simulation_messages(explanation, w) for w in windows]
        replies = self.backend.complete_many(
            convs, max_tokens=16 + self.max_tokens_per_token * max((len(w) for w in windows), default=1))
        return [parse_json_activations(r, len(w), self.scale_max) for r, w in zip(replies, windows)]


def parse_json_activations(reply: str, n: int, scale_max: int = 10) -> list[float]:
    """The first JSON list of numbers in ``reply``, clipped to ``0..scale_max``, fitted to length ``n``."""
    text = reply or ""
    raw = None
    dec = json.JSONDecoder()
    for m in re.finditer(r"\[", text):  # the first '[' that starts a whole JSON list
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, list):
            raw = obj
            break
    vals: list[float] = []
    for v in raw or []:
        if isinstance(v, (list, tuple)) and v:  # [[token, value], ...]
            v = v[-1]
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            vals.append(0.0)
    vals = [min(float(scale_max), max(0.0, v)) for v in vals][:n]
    return vals + [0.0] * (n - len(vals))


def simulator_for(backend_or_model, kind: str = "auto") -> object:
    """A simulator for a backend or model. ``kind``: "all-at-once", "likelihood", "json" or
    "auto" (JSON for an endpoint, likelihood for a local model)."""
    from .backends import LocalChatBackend

    model = backend_or_model.model if isinstance(backend_or_model, LocalChatBackend) else backend_or_model
    if kind == "auto":
        kind = "json" if hasattr(backend_or_model, "request") else "likelihood"
    if kind == "json":
        return JSONSimulator(backend_or_model)
    if kind == "all-at-once":
        return AllAtOnceSimulator(model)
    if kind == "likelihood":
        return LikelihoodSimulator(model)
    raise ValueError(f"unknown simulator kind {kind!r}: all-at-once, likelihood, json or auto")


__all__ = ["AllAtOnceSimulator", "JSONSimulator", "LikelihoodSimulator", "parse_json_activations", "simulator_for"]


def _expand(t: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    if t is None:
        raise RuntimeError("the cached prefix has a layer without keys/values")
    return t.expand(batch, -1, -1, -1)
