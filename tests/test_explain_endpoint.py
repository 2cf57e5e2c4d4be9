"""The OpenAI-compatible client against hostile servers on 127.0.0.1 (issue 13): no redirects, no
secrets in messages, names or logs, one deadline per attempt against a trickling server, a
response-size cap, ``Retry-After`` capped by the deadline. Every server loop is bounded."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from _local_server import LocalServer
from tdb_lens.explain.backends import BackendError, OpenAIChatBackend, backend_from_spec
from tdb_lens.explain.endpoint import redact_userinfo, split_credentials

MSGS = [{"role": "user", "content": "hello"}]
OK = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}]}).encode()


class Server(LocalServer):
    """A ThreadingHTTPServer whose handler is ``handle(request_handler)``; records each request's headers."""

    def __init__(self, handle) -> None:
        self.headers: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.headers.append(dict(self.headers))
                handle(self)

        super().__init__(H)


def send(h, code, body: bytes, headers=None):
    h.send_response(code)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def test_redirect_is_not_followed_and_the_key_stays_home(monkeypatch):
    monkeypatch.setenv("TDB_TEST_KEY", "sk-redirect-secret")
    with Server(lambda h: send(h, 200, OK)) as other:
        target = other.url + "/chat/completions"
        with Server(lambda h: send(h, 302, b"", {"Location": target})) as srv:
            b = OpenAIChatBackend(srv.url, "m", api_key_env="TDB_TEST_KEY", timeout=10, max_retries=2)
            with pytest.raises(BackendError, match="redirect") as e:
                b.complete(MSGS)
            assert len(srv.headers) == 1  # not retried
            assert srv.headers[0]["Authorization"] == "Bearer sk-redirect-secret"
        assert other.headers == []  # the other port never saw the key (nor any request)
    assert "sk-redirect-secret" not in str(e.value)


def test_credentials_in_url_never_shown(monkeypatch, caplog):
    """userinfo in the base URL goes out as basic auth only; the name, errors and logs never show it;
    a server echoing the bearer key or the password in its error body gets them replaced by ***."""
    monkeypatch.setenv("TDB_TEST_KEY", "sk-bearer-echoed-42")

    def echo(h):
        send(h, 400, json.dumps({"error": f"bad key {h.headers.get('Authorization')} "
                                          "(sk-bearer-echoed-42, pw-in-url-77)"}).encode())

    caplog.set_level(logging.DEBUG)
    with Server(echo) as srv:
        url = srv.url.replace("http://", "http://alice:pw-in-url-77@")
        b = backend_from_spec(url, endpoint_model="m", api_key_env="TDB_TEST_KEY")
        assert "pw-in-url-77" not in b.name and b.name == f"openai:m@{srv.url}"
        with pytest.raises(BackendError, match="HTTP 400") as e:
            b.complete(MSGS)
        # a Basic header (basic auth from the URL) would be overridden by the bearer key: the key wins
        assert srv.headers[0]["Authorization"] == "Bearer sk-bearer-echoed-42"
    msg = str(e.value)
    assert "***" in msg
    for secret in ("sk-bearer-echoed-42", "pw-in-url-77"):
        assert secret not in msg and secret not in caplog.text
    with pytest.raises(ValueError) as e2:
        backend_from_spec("gpt:x@http://bob:hunter22@h/v1")
    assert "hunter22" not in str(e2.value)
    assert redact_userinfo("openai:m@https://u:p@h/v1") == "openai:m@https://***@h/v1"
    assert split_credentials("http://u:p@127.0.0.1:8/v1") == ("http://127.0.0.1:8/v1", ("u", "p"))


def test_basic_auth_from_url_without_key():
    with Server(lambda h: send(h, 200, OK)) as srv:
        b = OpenAIChatBackend(srv.url.replace("http://", "http://alice:s3cret@"), "m", api_key_env=None)
        assert b.complete(MSGS) == "fine"
        assert srv.headers[0]["Authorization"].startswith("Basic ")  # base64 of alice:s3cret


class Trickle:
    """A raw TCP server that answers one connection with ``at_once``, then ``trickled`` one byte every
    ``interval`` seconds (a bounded loop); ``sent`` counts the trickled bytes that got out before
    the client hung up."""

    def __init__(self, at_once: bytes, trickled: bytes, interval: float) -> None:
        self.at_once, self.trickled, self.interval, self.sent = at_once, trickled, interval, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        conn, _ = self.sock.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:  # the request head (the small body follows it)
                part = conn.recv(65536)
                if not part:
                    return
                buf += part
            try:
                conn.sendall(self.at_once)
                for i in range(len(self.trickled)):
                    conn.sendall(self.trickled[i:i + 1])
                    self.sent += 1
                    if self.done.wait(self.interval):
                        break
            except OSError:  # the client hung up
                pass
        self.done.set()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.sock.close()
        self.thread.join(timeout=30)


TRICKLES = {
    "body": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 600\r\n\r\n", b"x" * 600),
    "headers": (b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"y" * 592 + b"\r\n\r\n"),
}


@pytest.mark.parametrize("where", sorted(TRICKLES))
def test_trickling_server_cannot_hold_a_call_past_its_timeout(where):
    """One byte every 0.25 s for 600 bytes (150 s), in the body or in the headers: with timeout=1
    the client leaves after a few bytes. (urllib's per-read timeout let such a server hold a
    timeout=2 call for 43 s.)"""
    with Trickle(*TRICKLES[where], interval=0.25) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=1.0, max_retries=0)
        with pytest.raises(BackendError, match="timeout"):
            b.complete(MSGS)
        b.close()
        srv.done.wait(60)
    assert srv.sent < len(srv.trickled)  # the client hung up long before the server was done
    assert srv.sent <= 60  # about 4 bytes a second for 1 s; a stalled scheduler cannot make it 600


def test_response_size_is_capped():
    big = b"[" + b"0," * (4 << 20) + b"0]"  # 8 MB, sent without a length (read until close)

    def stream(h):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.end_headers()
        try:
            for s in range(0, len(big), 65536):
                h.wfile.write(big[s:s + 65536])
                stream.sent = s + 65536
        except OSError:
            pass

    stream.sent = 0
    with Server(stream) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=30, max_retries=0, max_response_bytes=1 << 20)
        with pytest.raises(BackendError, match="more than 1048576 bytes"):
            b.complete(MSGS)
        b.close()
    assert stream.sent < len(big)  # abandoned, not read to the end
    with Server(lambda h: send(h, 200, b"{}" + b" " * (2 << 20))) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=30, max_retries=0, max_response_bytes=1 << 20)
        with pytest.raises(BackendError, match="announced a 2097154-byte answer"):
            b.complete(MSGS)


def test_retry_after_is_capped_by_the_deadline():
    with Server(lambda h: send(h, 429, b'{"error": "slow down"}', {"Retry-After": "100000"})) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=5, max_retries=3, deadline=20)
        with pytest.raises(BackendError, match="would pass the 20 s deadline"):
            b.complete(MSGS)
        assert len(srv.headers) == 1  # gave up at once instead of sleeping
    with Server(lambda h: send(h, 503, b"{}", {"Retry-After": "0"})) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=5, max_retries=2, backoff=0.0)
        with pytest.raises(BackendError, match="no answer after 3 attempts"):
            b.complete(MSGS)
        assert len(srv.headers) == 3


def test_bad_settings_are_refused():
    for kw, msg in (({"timeout": 0}, "timeout > 0"), ({"concurrency": 0}, "concurrency"),
                    ({"max_response_bytes": 0}, "max_response_bytes"), ({"deadline": -1}, "deadline")):
        with pytest.raises(ValueError, match=msg):
            OpenAIChatBackend("http://127.0.0.1:9/v1", "m", **kw)
    with pytest.raises(ValueError, match="no host"):
        OpenAIChatBackend("http:///v1", "m")


def test_compressed_answer_is_decoded_and_capped():
    """A server that compresses anyway: the answer is decoded, and the cap counts decoded bytes."""
    import gzip

    def gz(body: bytes):
        return lambda h: send(h, 200, gzip.compress(body), {"Content-Encoding": "gzip"})

    with Server(gz(OK)) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=30, max_retries=0)
        assert b.complete(MSGS) == "fine"
        assert srv.headers[0]["Accept-Encoding"] == "identity"
    bomb = b"[" + b"0," * (4 << 20) + b"0]"  # 8 MB that gzips to a few kB
    with Server(gz(bomb)) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=30, max_retries=0, max_response_bytes=1 << 20)
        with pytest.raises(BackendError, match="more than 1048576 bytes"):
            b.complete(MSGS)
