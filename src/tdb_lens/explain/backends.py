"""Chat backends for the explainer and the judges: a chat model run by tdb_lens, or any
OpenAI-compatible ``/chat/completions`` endpoint.

Both have ``complete(messages, max_tokens, temperature, prefill) -> str`` and
``complete_many(list_of_messages, ...) -> list[str]``, and ``yes_probability(list_of_messages)``
(the probability of answering Yes rather than No). The local backend reads that from the model's
next-token distribution; an endpoint answers in text (1.0 for yes, 0.0 for no) unless it returns
top log-probabilities.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from tqdm.auto import tqdm

Messages = list[dict]


class BackendError(RuntimeError):
    """A chat backend could not answer (endpoint unreachable, bad reply, retries exhausted)."""


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


# ---- OpenAI-compatible endpoints ------------------------------------------------------------------
class OpenAIChatBackend:
    """``POST {base_url}/chat/completions`` with the standard library.

    ``api_key_env`` names the environment variable holding the key (sent as a bearer token; none
    sent when it is unset, for local servers). Each request has ``timeout`` seconds; connection
    errors, timeouts and HTTP 408/409/429/5xx are retried ``max_retries`` times with exponential
    backoff (``Retry-After`` honoured); at most ``concurrency`` requests are in flight at once.
    """

    RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, concurrency: int = 4,
                 extra_body: Optional[dict] = None, logprobs: bool = False) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.extra_body = dict(extra_body or {})
        self.logprobs = logprobs
        self.name = f"openai:{self.model}@{self.base_url}"
        self._sem = threading.Semaphore(concurrency)

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def request(self, body: dict) -> dict:
        """One chat completion request (with retries); the decoded JSON reply."""
        data = json.dumps({"model": self.model, **self.extra_body, **body}).encode()
        url = self.base_url + "/chat/completions"
        last: Optional[BaseException] = None
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * (2 ** attempt)
            try:
                with self._sem:
                    req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
                    with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                        payload = resp.read()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError as e:
                    raise BackendError(f"{url} answered something that is not JSON: {payload[:200]!r}") from e
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace") if e.fp else ""
                if e.code not in self.RETRY_STATUS:
                    raise BackendError(f"{url} answered HTTP {e.code}: {detail}") from e
                last = BackendError(f"HTTP {e.code}: {detail}")
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra:
                    try:
                        wait = max(wait, float(ra))
                    except ValueError:
                        pass
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
            if attempt < self.max_retries:
                time.sleep(min(wait, 60.0))
        raise BackendError(f"{url}: no answer after {self.max_retries + 1} attempts (last error: {last})")

    def complete(self, messages: Messages, max_tokens: int = 48, temperature: float = 0.0,
                 prefill: Optional[str] = None) -> str:
        msgs = list(messages)
        if prefill:
            msgs = msgs[:-1] + [{**msgs[-1], "content": msgs[-1]["content"] + f"\nStart your answer with: {prefill}"}]
        reply = self.request({"messages": msgs, "max_tokens": max_tokens, "temperature": temperature})
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"unexpected reply shape from {self.base_url}: {str(reply)[:300]}") from None

    def complete_many(self, conversations: Sequence[Messages], max_tokens: int = 48, temperature: float = 0.0,
                      prefill: Optional[str] = None) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(lambda c: self.complete(c, max_tokens, temperature, prefill), conversations))

    def yes_probability(self, conversations: Sequence[Messages]) -> list[float]:
        def one(c: Messages) -> float:
            body: dict = {"messages": c, "max_tokens": 1, "temperature": 0.0}
            if self.logprobs:
                body.update({"logprobs": True, "top_logprobs": 10})
            reply = self.request(body)
            if self.logprobs:
                try:
                    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                    y = sum(math.exp(t["logprob"]) for t in top if t["token"].strip().lower() == "yes")
                    n = sum(math.exp(t["logprob"]) for t in top if t["token"].strip().lower() == "no")
                    if y + n > 0:
                        return y / (y + n)
                except (KeyError, IndexError, TypeError):
                    pass
            text = (reply.get("choices") or [{}])[0].get("message", {}).get("content") or ""
            return 1.0 if text.strip().lower().startswith("yes") else 0.0

        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(one, conversations))


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
            raise ValueError(f"an endpoint is openai:MODEL@BASE_URL, e.g. openai:gpt-4o-mini@https://api.openai.com/v1; got {spec!r}")
        return OpenAIChatBackend(url, name, api_key_env=api_key_env)
    raise ValueError(f"unknown backend {spec!r}: use 'local', an http(s):// base URL or 'openai:MODEL@BASE_URL'")
