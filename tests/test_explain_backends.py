"""The OpenAI-compatible backend against a fake local HTTP server (http.server in a thread):
bearer key from an environment variable, retries on 5xx / 429 / timeouts, no retry on 4xx,
concurrency limit, log-probability judging, the JSON simulator and the explainer through it."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from _local_server import LocalServer
from tdb_lens.explain.backends import BackendError, OpenAIChatBackend, backend_from_spec
from tdb_lens.explain.simulator import JSONSimulator, parse_json_activations


class FakeServer(LocalServer):
    """Answers POST /v1/chat/completions. ``script`` is a list of actions consumed per request
    (``"ok"``, ``"503"``, ``"429"``, ``"400"``, ``"slow"``, ``"garbage"``); when empty it answers ok.
    ``reply(body) -> str`` makes the assistant's text."""

    def __init__(self, reply=lambda body: "names of cities", delay: float = 0.0, barrier=None) -> None:
        self.script: list[str] = []
        self.barrier = barrier
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.reply = reply
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    action = outer.script.pop(0) if outer.script else "ok"
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, b'{"error": "not found"}')
                    if action == "slow":
                        time.sleep(1.0)
                    if outer.delay:
                        time.sleep(outer.delay)
                    if outer.barrier is not None:
                        outer.barrier.wait()
                    if action in ("503", "429", "400"):
                        extra = {"Retry-After": "0"} if action == "429" else {}
                        return self._send(int(action), b'{"error": "nope"}', extra)
                    if action == "garbage":
                        return self._send(200, b"<html>not json</html>")
                    msg = {"role": "assistant", "content": outer.reply(body)}
                    choice = {"index": 0, "message": msg, "finish_reason": "stop"}
                    if body.get("logprobs"):
                        choice["logprobs"] = {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": [
                            {"token": "Yes", "logprob": -0.35667}, {"token": "No", "logprob": -1.20397},
                            {"token": "Maybe", "logprob": -3.0}]}]}
                    self._send(200, json.dumps({"choices": [choice]}).encode())
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, code, payload, extra=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        super().__init__(Handler)


MSGS = [{"role": "user", "content": "hello"}]


def test_key_from_env_and_reply(monkeypatch):
    monkeypatch.setenv("TDB_TEST_KEY", "sk-test-123")
    with FakeServer() as srv:
        b = OpenAIChatBackend(srv.url, "fake-model", api_key_env="TDB_TEST_KEY", timeout=5, backoff=0.01)
        assert b.complete(MSGS, max_tokens=7) == "names of cities"
        assert srv.headers[0]["Authorization"] == "Bearer sk-test-123"
        assert srv.requests[0]["model"] == "fake-model" and srv.requests[0]["max_tokens"] == 7
        assert srv.requests[0]["messages"] == MSGS
        monkeypatch.delenv("TDB_TEST_KEY")
        b.complete(MSGS)
        assert "Authorization" not in srv.headers[1]  # no key, no header (local servers)


def test_retries_on_server_errors_and_timeouts():
    with FakeServer() as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=0.3, max_retries=3, backoff=0.01, deadline=60)
        srv.script = ["503", "429", "slow"]  # two errors and a timeout, then success
        assert b.complete(MSGS) == "names of cities"
        assert len(srv.requests) == 4
        srv.script = ["503"] * 4
        with pytest.raises(BackendError, match="no answer after 4 attempts"):
            b.complete(MSGS)
        n = len(srv.requests)
        srv.script = ["400"]
        with pytest.raises(BackendError, match="HTTP 400"):
            b.complete(MSGS)
        assert len(srv.requests) == n + 1  # a client error is not retried
        srv.script = ["garbage"]
        with pytest.raises(BackendError, match="not JSON"):
            b.complete(MSGS)


def test_unreachable_endpoint_is_a_clear_error():
    with FakeServer() as srv:
        url = srv.url
    b = OpenAIChatBackend(url, "m", api_key_env=None, timeout=0.5, max_retries=1, backoff=0.01)
    with pytest.raises(BackendError, match="no answer after 2 attempts"):
        b.complete(MSGS)
    with pytest.raises(ValueError, match="http"):
        OpenAIChatBackend("localhost:8000", "m")
    with pytest.raises(ValueError, match="openai:MODEL@BASE_URL"):
        backend_from_spec("openai:nourl")
    with pytest.raises(ValueError, match="unknown backend"):
        backend_from_spec("gpt-5")


def test_concurrency_limit():
    """Requests meet in pairs at a barrier on the server: two are in flight together (a client
    sending one at a time would break the barrier), never three (the client's limit)."""
    barrier = threading.Barrier(2, timeout=30)
    with FakeServer(barrier=barrier) as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, timeout=60, concurrency=2, max_retries=0)
        out = b.complete_many([MSGS] * 6)
        assert out == ["names of cities"] * 6
        assert srv.max_in_flight == 2 and not barrier.broken


def test_yes_probability_from_logprobs_and_text():
    with FakeServer(reply=lambda body: "No, it does not.") as srv:
        b = OpenAIChatBackend(srv.url, "m", api_key_env=None, logprobs=True)
        # P(yes) / (P(yes) + P(no)) from the top log-probabilities: 0.7 / (0.7 + 0.3)
        assert b.yes_probability([MSGS])[0] == pytest.approx(0.7, abs=1e-4)
        assert srv.requests[-1]["logprobs"] is True and srv.requests[-1]["max_tokens"] == 1
        b2 = OpenAIChatBackend(srv.url, "m", api_key_env=None, logprobs=False)
        assert b2.yes_probability([MSGS, MSGS]) == [0.0, 0.0]  # answered "No" in text


def test_json_simulator_through_endpoint():
    def reply(body):
        toks = body["messages"][-1]["content"].split("Tokens:\n", 1)[1].splitlines()
        return "Sure: " + json.dumps([9 if "Paris" in t else 0 for t in toks])

    with FakeServer(reply=reply) as srv:
        sim = JSONSimulator(OpenAIChatBackend(srv.url, "m", api_key_env=None))
        out = sim.simulate("names of cities", [["I", " love", " Paris"], [" Paris", "!"]])
        assert out == [[0.0, 0.0, 9.0], [9.0, 0.0]]


def test_parse_json_activations_repairs():
    assert parse_json_activations("[1, 2, 30]", 3) == [1.0, 2.0, 10.0]
    assert parse_json_activations("[[\"a\", 4], [\"b\", -2]]", 3) == [4.0, 0.0, 0.0]
    assert parse_json_activations("no list here", 2) == [0.0, 0.0]
    assert parse_json_activations("[1, 2, 3, 4]", 2) == [1.0, 2.0]
    assert parse_json_activations("[1, \"x\"]", 2) == [1.0, 0.0]


def test_llm_explainer_through_endpoint():
    import torch

    from tdb_lens.explain.explainer import LLMExplainer
    from tdb_lens.explain.harvest import UnitRecord
    from tdb_lens.explain.prompts import EXPLANATION_PREFILL

    class Tok:
        def id_to_token(self, i):
            return ["a", " Paris", " went", " Rome"][i]

    rec = UnitRecord("blocks.0.mlp.hook_post", 3, "L0.N3", [0], torch.tensor([[0, 1, 2, 3]]),
                     torch.tensor([[0.0, 2.0, 0.0, 1.0]]), [], torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4),
                     [], torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), [], [], {"max": 2.0})
    with FakeServer(reply=lambda body: f"{EXPLANATION_PREFILL} city names. More text.") as srv:
        ex = LLMExplainer(OpenAIChatBackend(srv.url, "m", api_key_env=None), Tok()).explain(rec)
        assert ex.text == "city names" and ex.unit == 3 and ex.explainer.startswith("llm:openai:m@")
        shown = srv.requests[0]["messages"][-1]["content"]
        assert " Paris\t10" in shown and " Rome\t5" in shown and "a\t0" in shown  # Bills et al.'s 0-10 scale


def test_cli_with_endpoint_explainer_and_json_simulator(tmp_path, capsys, monkeypatch):
    """`tdb-lens explain --explainer URL --simulator json` on the planted city unit: the endpoint
    explains and simulates (it marks city tokens), the store gets the scores."""
    from _explain_planted import CITIES, PLANT_HOOK, PLANT_UNIT, planted_model
    from tdb_lens.explain.cli import main
    from tdb_lens.explain.store import ExplanationStore

    def reply(body):
        last = body["messages"][-1]["content"]
        if "Tokens:\n" in last:  # a JSON simulation request
            toks = [t.split("\t", 1)[-1] for t in last.split("Tokens:\n", 1)[1].splitlines()]
            # the planted unit fires on the space-prefixed city tokens (" London", not "London")
            return json.dumps([10 if t.startswith(" ") and t.strip() in CITIES else 0 for t in toks])
        return "This unit responds to names of cities."

    monkeypatch.setenv("TDB_TEST_KEY", "k")
    model, _ = planted_model()
    texts = tmp_path / "cities.txt"
    texts.write_text("\n\n".join(["We flew from Paris to Tokyo and then to Rome.", "The dog slept all day.",
                                  "London, Berlin and Vienna are old cities.", "Nothing happened on Monday."] * 8))
    with FakeServer(reply=reply) as srv:
        rc = main(["--hook", PLANT_HOOK, "--units", f"{PLANT_UNIT}", "--corpus", str(texts), "--n-windows", "12",
                   "--ctx-len", "12", "--k", "4", "--explainer", srv.url, "--explainer-model", "fake",
                   "--api-key-env", "TDB_TEST_KEY", "--simulator", "json", "--db", str(tmp_path / "e.db"),
                   "--no-progress"], model=model)
        assert rc == 0
        assert all(h["Authorization"] == "Bearer k" for h in srv.headers)
    out = capsys.readouterr().out
    assert "L0.N3" in out and "names of cities" in out
    with ExplanationStore(tmp_path / "e.db") as store:
        (row,) = store.explanations()
        assert row.text == "names of cities" and row.explainer == f"llm:openai:fake@{srv.url}"
        assert row.scores["correlation"] == pytest.approx(1.0)
