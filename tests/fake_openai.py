"""A deterministic OpenAI-compatible HTTP server for tests.

It speaks the real protocol (``GET /v1/models``, ``POST /v1/chat/completions`` with ``usage`` and, when
asked, ``logprobs``), so the real ``openai`` client, and Ray actors in other processes, can call it. It
listens on 127.0.0.1 on a free port, in a daemon thread::

    with FakeOpenAI(oracle({"great film": "positive"})) as server:
        config = ControllerConfig(base_url=server.base_url, model=server.model, ...)

Behaviour comes from a ``responder(request_json) -> reply`` hook. A reply is one of:

- ``str``: the assistant message content (wrapped in a chat completion with usage and logprobs);
- :class:`HTTPError`: an error status with an OpenAI-style error body;
- ``dict``: a complete JSON body, sent as is with status 200.

Ready-made responders: :func:`oracle`, :func:`candidate_oracle`, :func:`constant`, :func:`out_of_set`, :func:`garbage`,
:func:`fail_first`, :func:`slow`, :func:`script`. The server records every chat request (``requests``) and
the largest number of chat requests in flight at once (``max_in_flight``).

Tokens are deterministic: prompt tokens are the whitespace-separated words of all messages; the reply is
split into word and punctuation tokens. With logprobs, the tokens that spell the value of ``"label"`` share
``label_logprob`` (log 0.8 by default) and every other token gets ``scaffold_logprob`` (-0.01).
"""

from __future__ import annotations

import html
import itertools
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

Reply = Any  # str | HTTPError | dict
Responder = Callable[[dict], Reply]

_FENCED = re.compile(r"<text>\n(.*?)\n</text>", re.DOTALL)
_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")


@dataclass
class HTTPError:
    status: int
    message: str = "fake server error"
    headers: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- responders


def last_fenced_text(request: Mapping[str, Any]) -> str | None:
    """The text in the last ``<text>`` fence of the request's user messages (HTML-unescaped)."""
    for message in reversed(request.get("messages", [])):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        found = _FENCED.findall(content or "")
        if found:
            return html.unescape(found[-1])
    return None


def demonstrations(request: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (text, label) demonstrations of a request: each user turn but the last, with the label of the
    assistant turn after it."""
    out, messages = [], list(request.get("messages", []))
    for message, reply in zip(messages, messages[1:]):
        if message.get("role") == "user" and reply.get("role") == "assistant":
            found = _FENCED.findall(message.get("content") or "")
            if found:
                out.append((html.unescape(found[-1]), json.loads(reply["content"])["label"]))
    return out


def label_reply(label: str) -> str:
    return json.dumps({"label": label})


def oracle(mapping: Mapping[str, str], *, default: str | None = None) -> Responder:
    """Answers the label ``mapping`` gives the fenced text (a truncated text matches by prefix).

    A text not in the mapping gets ``default``, or an HTTP 400 naming it when there is no default.
    """

    def respond(request: dict) -> Reply:
        text = last_fenced_text(request)
        if text is not None and text in mapping:
            return label_reply(mapping[text])
        if text is not None:
            for key, label in mapping.items():
                if key.startswith(text):
                    return label_reply(label)
        if default is not None:
            return label_reply(default)
        return HTTPError(400, f"fake oracle has no label for text {text!r}")

    return respond


def candidate_oracle(sets: Mapping[str, list[str]]) -> Responder:
    """Answers the candidate set ``sets`` gives the fenced text (``{"labels": [...]}`` as sent, so a test can
    send empty, duplicated, unknown or too many labels); a text not in it gets an HTTP 400."""

    def respond(request: dict) -> Reply:
        text = last_fenced_text(request)
        if text in sets:
            return json.dumps({"labels": sets[text]})
        for key, labels in sets.items():  # a truncated text matches by prefix
            if text and key.startswith(text):
                return json.dumps({"labels": labels})
        return HTTPError(400, f"fake candidate oracle has no set for text {text!r}")

    return respond


def constant(label: str) -> Responder:
    return lambda request: label_reply(label)


def out_of_set(label: str = "not-a-label") -> Responder:
    """A well-formed answer whose label is outside any allowed set."""
    return constant(label)


def garbage(content: str = "I think it is probably fine, hard to say!!") -> Responder:
    return lambda request: content


def http_error(status: int, message: str = "fake server error") -> Responder:
    return lambda request: HTTPError(status, message)


def script(*responders: Responder) -> Responder:
    """The i-th request is answered by the i-th responder; the last one answers every later request."""
    counter = itertools.count()
    lock = threading.Lock()

    def respond(request: dict) -> Reply:
        with lock:
            i = next(counter)
        return responders[min(i, len(responders) - 1)](request)

    return respond


def fail_first(n: int, then: Responder, *, status: int = 500, retry_after: float | None = None) -> Responder:
    """HTTP ``status`` for the first ``n`` requests, then ``then``."""
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
    failing = lambda request: HTTPError(status, f"fake failure with HTTP {status}", dict(headers))  # noqa: E731
    return script(*([failing] * n), then) if n > 0 else then


def slow(seconds: float, then: Responder) -> Responder:
    """Sleeps ``seconds`` before answering with ``then`` (the server cuts the sleep short on stop)."""

    def respond(request: dict) -> Reply:
        stop = request.get("_fake_stop_event")
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)
        return then(request)

    return respond


# ----------------------------------------------------------------------------- server


def _tokens(content: str) -> list[str]:
    return _TOKEN.findall(content)


def _logprobs(content: str, *, label_logprob: float, scaffold_logprob: float) -> list[dict[str, Any]]:
    tokens = _tokens(content)
    span = None
    try:
        value = json.loads(content).get("label")
        if isinstance(value, str) and value:
            start = content.rfind(json.dumps(value)) + 1
            if start > 0:
                span = (start, start + len(value))
    except (ValueError, AttributeError):
        span = None
    positions, pos = [], 0
    for tok in tokens:
        positions.append((pos, pos + len(tok)))
        pos += len(tok)
    in_label = [span is not None and a < span[1] and b > span[0] for a, b in positions]
    n_label = sum(in_label) or 1
    out = []
    for tok, inside in zip(tokens, in_label):
        lp = label_logprob / n_label if inside else scaffold_logprob
        out.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": []})
    return out


class FakeOpenAI:
    """The server. ``start()`` returns ``base_url`` (``http://127.0.0.1:<port>/v1``); ``stop()`` ends it."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        model: str = "fake-model",
        label_logprob: float = math.log(0.8),
        scaffold_logprob: float = -0.01,
    ) -> None:
        self.responder: Responder = responder or constant("positive")
        self.model = model
        self.label_logprob = label_logprob
        self.scaffold_logprob = scaffold_logprob
        self.requests: list[dict] = []
        self.authorizations: set[str] = set()  # the Authorization headers seen (is the key the configured one?)
        self.model_list_calls = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    # -- lifecycle

    def start(self) -> str:
        if self._server is not None:
            return self.base_url  # type: ignore[return-value]
        self._stop.clear()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        return self.base_url

    def stop(self) -> None:
        if self._server is None:
            return
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> "FakeOpenAI":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- assertions helpers

    @property
    def chat_calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0
            self.model_list_calls = 0

    # -- protocol

    def _chat(self, request: dict) -> tuple[int, dict, dict[str, str]]:
        with self._lock:
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            reply = self.responder({**request, "_fake_stop_event": self._stop})
        finally:
            with self._lock:
                self._in_flight -= 1
        if isinstance(reply, HTTPError):
            body = {"error": {"message": reply.message, "type": "fake_error", "param": None, "code": None}}
            return reply.status, body, reply.headers
        if isinstance(reply, dict):
            return 200, reply, {}
        content = str(reply)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if request.get("logprobs"):
            choice["logprobs"] = {
                "content": _logprobs(content, label_logprob=self.label_logprob, scaffold_logprob=self.scaffold_logprob),
                "refusal": None,
            }
        body = {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model", self.model),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(_tokens(content)),
                "total_tokens": prompt_tokens + len(_tokens(content)),
            },
        }
        return 200, body, {}


def _make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
            pass

        def _send(self, status: int, body: dict, headers: Mapping[str, str] | None = None) -> None:
            data = json.dumps(body).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test); nothing to answer

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                with fake._lock:
                    fake.model_list_calls += 1
                self._send(
                    200,
                    {"object": "list", "data": [{"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}]},
                )
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            with fake._lock:
                fake.authorizations.add(self.headers.get("Authorization") or "")
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                request = json.loads(raw or b"{}")
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
                return
            status, body, headers = fake._chat(request)
            self._send(status, body, headers)

    return Handler
