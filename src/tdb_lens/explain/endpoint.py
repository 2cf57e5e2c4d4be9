"""The client of OpenAI-compatible ``/chat/completions`` endpoints, on httpx.

What it guarantees (each has a test against a hostile server on 127.0.0.1):

- **No redirects**: a 3xx answer is an error naming where it pointed (without credentials); the
  bearer key is only ever sent to the origin of the base URL.
- **Secrets stay out**: the key comes from an environment variable at request time; credentials
  written into the base URL (``http://user:KEY@host/v1``) are sent as HTTP basic auth and removed
  from the URL the backend shows (``name``, error messages, the store's provenance); any secret a
  server echoes back in an error body is replaced by ``***`` before it reaches a message.
- **Bounded time**: ``timeout`` bounds each attempt as a whole (connect, send, every byte of the
  answer), not each socket read, so a server trickling a byte at a time cannot hold a call past
  it; ``deadline`` (default ``(max_retries + 1) * timeout``) bounds one request with its retries
  and waits. A ``Retry-After`` longer than what is left of the deadline ends the request at once.
- **Bounded memory**: answers are streamed and abandoned past ``max_response_bytes``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

Messages = list[dict]
_deadline = threading.local()  # .until: monotonic time the current thread's attempt must end by


class BackendError(RuntimeError):
    """A chat backend could not answer (endpoint unreachable, bad reply, retries exhausted)."""


class _Retry(Exception):
    def __init__(self, why: str, wait: float = 0.0) -> None:
        super().__init__(why)
        self.wait = wait


def split_credentials(url: str) -> tuple[str, Optional[tuple[str, str]]]:
    """``(url without userinfo, (user, password) or None)``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), (
        parts.username or "", parts.password or "")


def _bounded(timeout: Optional[float]) -> Optional[float]:
    """A socket operation's timeout, cut to what is left of the thread's attempt deadline."""
    until = getattr(_deadline, "until", None)
    if until is None:
        return timeout
    left = until - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and write ends by the attempt's deadline: a server that
    trickles bytes (in the headers or the body) cannot stretch an attempt past ``timeout``."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout))

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        self._inner.write(buffer, _bounded(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout)))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _bounded(timeout), local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _bounded(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _deadline_transport(max_connections: int) -> httpx.HTTPTransport:
    """httpx's transport with its connection pool on `_DeadlineBackend` (checked: the tests of the
    trickling server fail if a new httpx stops taking it)."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=max_connections))
    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if inner is None:  # pragma: no cover - an httpx/httpcore this module was not written for
        raise RuntimeError(f"httpx {httpx.__version__} / httpcore {httpcore.__version__}: cannot bound request "
                           "time (no connection pool network backend); pin httpx<1")
    pool._network_backend = _DeadlineBackend(inner)  # type: ignore[union-attr]
    return transport


class OpenAIChatBackend:
    """``POST {base_url}/chat/completions`` (see the module docstring for the guarantees).

    ``api_key_env`` names the environment variable holding the key (sent as a bearer token; none
    sent when it is unset, for local servers). Connection errors, timeouts and HTTP
    408/409/429/5xx are retried ``max_retries`` times with exponential backoff (``Retry-After``
    honoured within the deadline); at most ``concurrency`` requests are in flight at once.
    """

    RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, concurrency: int = 4,
                 extra_body: Optional[dict] = None, logprobs: bool = False, deadline: Optional[float] = None,
                 max_response_bytes: int = 8 << 20) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {_redact_url(str(base_url))!r}")
        if concurrency < 1 or max_retries < 0 or not timeout > 0 or backoff < 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")
        if max_response_bytes < 1 or (deadline is not None and not deadline > 0):
            raise ValueError("max_response_bytes must be >= 1 and deadline > 0")
        url, self._auth = split_credentials(base_url.rstrip("/"))
        if not urlsplit(url).hostname:
            raise ValueError(f"base_url has no host: {url!r}")
        self.base_url = url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.deadline = float(deadline) if deadline is not None else (max_retries + 1) * self.timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.extra_body = dict(extra_body or {})
        self.logprobs = logprobs
        self.max_response_bytes = int(max_response_bytes)
        self.name = f"openai:{self.model}@{self.base_url}"
        self._sem = threading.Semaphore(concurrency)
        self._client: Optional[httpx.Client] = None
        self._lock = threading.Lock()

    # ---- plumbing ------------------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(follow_redirects=False, transport=_deadline_transport(self.concurrency))
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _secrets(self) -> list[str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        out = [s for s in (key, *(self._auth or ())) if s and len(s) >= 3]
        return sorted(out, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every secret this backend knows (key, URL password) replaced by ``***``."""
        for s in self._secrets():
            text = text.replace(s, "***")
        return text

    def _headers(self) -> dict:
        # identity encoding: the size cap then counts what is kept (a compressed answer is decoded below)
        h = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _attempt(self, url: str, data: bytes, until: float) -> dict:
        """One POST, all of it before ``until`` (monotonic); the decoded JSON or an exception."""
        if until - time.monotonic() <= 0:
            raise _Retry("no time left")
        _deadline.until = until
        try:
            headers = self._headers()  # the bearer key, when set, wins over credentials in the URL
            auth = None if "Authorization" in headers else self._auth
            with self._http().stream("POST", url, content=data, headers=headers, timeout=self.timeout,
                                     auth=auth) as resp:
                body = self._read(resp, until)
                status, answer = resp.status_code, resp.headers
        finally:
            _deadline.until = None
        if 300 <= status < 400:
            where = _redact_url(answer.get("location", "?"))
            raise BackendError(f"{url} answered a redirect (HTTP {status} to {where}); redirects are not followed "
                               "(credentials go to the base URL only): give the final URL")
        if status >= 400:
            detail = self.redact(body[:300].decode(errors="replace"))
            if status not in self.RETRY_STATUS:
                raise BackendError(f"{url} answered HTTP {status}: {detail}")
            raise _Retry(f"HTTP {status}: {detail}", _retry_after(answer.get("retry-after")))
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BackendError(f"{url} answered something that is not JSON: "
                               f"{self.redact(body[:200].decode(errors='replace'))!r}") from None

    def _read(self, resp: httpx.Response, until: float) -> bytes:
        n = resp.headers.get("content-length")
        if n and n.isdigit() and int(n) > self.max_response_bytes:
            raise BackendError(f"{self.base_url} announced a {int(n)}-byte answer, over the "
                               f"{self.max_response_bytes}-byte limit (max_response_bytes)")
        chunks, size = [], 0
        encoded = resp.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        for chunk in (resp.iter_bytes() if encoded else resp.iter_raw()):
            size += len(chunk)
            if size > self.max_response_bytes:
                raise BackendError(f"{self.base_url} sent more than {self.max_response_bytes} bytes "
                                   "(max_response_bytes): answer abandoned")
            if time.monotonic() > until:
                raise _Retry(f"the answer took longer than the {self.timeout:g} s timeout")
            chunks.append(chunk)
        return b"".join(chunks)

    # ---- requests ------------------------------------------------------------------------------
    def request(self, body: dict) -> dict:
        """One chat completion request (with retries, all within ``deadline``); the decoded JSON reply."""
        data = json.dumps({"model": self.model, **self.extra_body, **body}).encode()
        url = self.base_url + "/chat/completions"
        end = time.monotonic() + self.deadline
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * (2 ** attempt)
            try:
                with self._sem:
                    return self._attempt(url, data, min(end, time.monotonic() + self.timeout))
            except _Retry as e:
                last, wait = str(e), max(wait, e.wait)
            except httpx.TimeoutException:
                last = f"no complete answer within the {self.timeout:g} s timeout"
            except httpx.HTTPError as e:  # connection refused / reset, protocol errors
                last = self.redact(f"{type(e).__name__}: {e}")
            left = end - time.monotonic()
            if attempt == self.max_retries:
                break
            if wait >= left:
                last += f" (the next try, in {wait:g} s, would pass the {self.deadline:g} s deadline)"
                break
            time.sleep(wait)
        raise BackendError(f"{url}: no answer after {attempt + 1} attempts (last error: {last})")

    def complete(self, messages: Messages, max_tokens: int = 48, temperature: float = 0.0,
                 prefill: Optional[str] = None) -> str:
        msgs = list(messages)
        if prefill:
            msgs = msgs[:-1] + [{**msgs[-1], "content": msgs[-1]["content"] + f"\nStart your answer with: {prefill}"}]
        reply = self.request({"messages": msgs, "max_tokens": max_tokens, "temperature": temperature})
        try:
            content = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"unexpected reply shape from {self.base_url}: {self.redact(str(reply)[:300])}") from None
        if not isinstance(content, str):
            raise BackendError(f"unexpected reply from {self.base_url}: content is {type(content).__name__}, not text")
        return content

    def complete_many(self, conversations: Sequence[Messages], max_tokens: int = 48, temperature: float = 0.0,
                      prefill: Optional[str] = None) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(lambda c: self.complete(c, max_tokens, temperature, prefill), conversations))

    def yes_probability(self, conversations: Sequence[Messages]) -> list[float]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(self._yes_one, conversations))

    def _yes_one(self, c: Messages) -> float:
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
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            text = ""
        return 1.0 if isinstance(text, str) and text.strip().lower().startswith("yes") else 0.0


def _retry_after(value: Optional[str]) -> float:
    """Seconds asked for by a ``Retry-After`` header (seconds form; 0 when absent or unreadable)."""
    try:
        v = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


def _redact_url(url: str) -> str:
    return redact_userinfo(url)


def redact_userinfo(text: str) -> str:
    """``text`` with the credentials of every URL in it (``scheme://user:password@``) replaced by ``***``."""
    return re.sub(r"(?i)([a-z][a-z0-9+.-]*://)[^/\s@]*@", r"\1***@", text)
