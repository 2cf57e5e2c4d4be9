"""Chat backends for the explainer and the judges: a chat model run by tdb_lens, or any
OpenAI-compatible ``/chat/completions`` endpoint.

Both have ``complete(messages, max_tokens, temperature, prefill) -> str`` and
``complete_many(list_of_messages, ...) -> list[str]``, and ``yes_probability(list_of_messages)``
(the probability of answering Yes rather than No). The local backend reads that from the model's
next-token distribution; an endpoint answers in text (1.0 for yes, 0.0 for no) unless it returns
top log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from tqdm.auto import tqdm

from .endpoint import BackendError, Messages, OpenAIChatBackend, redact_userinfo

__all__ = ["BackendError", "LocalChatBackend", "Messages", "OpenAIChatBackend", "backend_from_spec"]


# ---- local ------------------------------------------------------------------------------------
class LocalChatBackend:
    """A chat model loaded by tdb_lens (default: SmolLM2-135M-Instruct from the offline GGUF)."""

    def __init__(self, model=None, batch_size: int = 8, progress: bool = False) -> None:
        if model is None:
            from .. import load

            model = load("smollm2-135m")
        if not hasattr(model, "apply_chat_template"):
            raise TypeError(f"{type(model).__name__} has no chat template: use a chat model such as HookedLlama")
        self.model = model.eval()
        self.batch_size = batch_size
        self.progress = progress
        tok = model.tokenizer
        self.name = f"local:{getattr(model, 'name', None) or type(model).__name__}"
        self._yes = [i for i in {_single(tok, w) for w in ("Yes", " Yes", "yes", " yes")} if i is not None]
        self._no = [i for i in {_single(tok, w) for w in ("No", " No", "no", " no")} if i is not None]

    def prompt(self, messages: Messages, prefill: Optional[str] = None) -> str:
        text = self.model.apply_chat_template(messages, add_generation_prompt=True)
        return text + (prefill or "")

    @torch.no_grad()
    def complete_many(self, conversations: Sequence[Messages], max_tokens: int = 48, temperature: float = 0.0,
                      prefill: Optional[str] = None, seed: int = 0) -> list[str]:
        out: list[str] = []
        m = self.model
        for s in tqdm(range(0, len(conversations), self.batch_size), disable=not self.progress, desc="generate"):
            prompts = [self.prompt(c, prefill) for c in conversations[s:s + self.batch_size]]
            tokens, mask = m.to_tokens_and_mask(prompts, prepend_bos=False, padding_side="left")
            gen = m.generate(tokens if mask is None else prompts, max_new_tokens=max_tokens,
                             do_sample=temperature > 0, temperature=max(temperature, 1e-5), seed=seed,
                             return_type="tokens", prepend_bos=False)
            n_in = tokens.shape[1]
            stops = set(getattr(m.tokenizer, "eot_token_ids", [])) | {m.tokenizer.eos_token_id, m.tokenizer.pad_id}
            for row in gen[:, n_in:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                out.append((prefill or "") + m.to_string(row[:cut]))
        return out

    def complete(self, messages: Messages, max_tokens: int = 48, temperature: float = 0.0,
                 prefill: Optional[str] = None) -> str:
        return self.complete_many([messages], max_tokens, temperature, prefill)[0]

    @torch.no_grad()
    def yes_probability(self, conversations: Sequence[Messages]) -> list[float]:
        if not self._yes or not self._no:
            raise BackendError("the local model's tokenizer has no single-token Yes/No")
        m, out = self.model, []
        for s in range(0, len(conversations), self.batch_size):
            prompts = [self.prompt(c) for c in conversations[s:s + self.batch_size]]
            tokens, mask = m.to_tokens_and_mask(prompts, prepend_bos=False, padding_side="left")
            logits = m(tokens, attention_mask=mask)[:, -1].float()
            lse_y = torch.logsumexp(logits[:, self._yes], -1)
            lse_n = torch.logsumexp(logits[:, self._no], -1)
            out += torch.sigmoid(lse_y - lse_n).tolist()
        return out


def _single(tok, text: str) -> Optional[int]:
    ids = tok.encode(text)
    return ids[0] if len(ids) == 1 else None


def backend_from_spec(spec: str, model=None, endpoint_model: str = "gpt-4o-mini",
                      api_key_env: Optional[str] = "OPENAI_API_KEY"):
    """``local`` (SmolLM2-135M-Instruct, or the given chat model), an ``http(s)://`` base URL of an
    OpenAI-compatible endpoint (model ``endpoint_model``), or ``openai:MODEL@BASE_URL``; the key is
    read from the environment variable ``api_key_env``."""
    if spec in ("local", "smollm2", "smollm2-135m"):
        return LocalChatBackend(model)
    if spec.startswith(("http://", "https://")):
        return OpenAIChatBackend(spec, endpoint_model, api_key_env=api_key_env)
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        name, sep, url = rest.partition("@")
        if not sep or not name or not url:
            raise ValueError("an endpoint is openai:MODEL@BASE_URL, e.g. openai:gpt-4o-mini@https://api.openai.com/v1; "
                             f"got {redact_userinfo(spec)!r}")
        return OpenAIChatBackend(url, name, api_key_env=api_key_env)
    raise ValueError(f"unknown backend {redact_userinfo(spec)!r}: use 'local', an http(s):// base URL or "
                     "'openai:MODEL@BASE_URL'")
