"""A loopback HTTP server standing in for the VOD API, each POST answered by a script.

Shapes the API's HTTP exactly (status, Content-Type, body bytes, a dropped connection, an
answer that never comes) for the SDK adapter, which speaks to it over a real socket.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.conftest import serve_on_loopback

JSON = "application/json"


@dataclass(frozen=True)
class ApiCall:
    """One request as the server received it."""

    headers: Message
    body: bytes

    def json(self) -> Any:
        """The request body, decoded."""
        return json.loads(self.body or b"{}")


@dataclass(frozen=True)
class Answer:
    """What the server does with a request: a reply, or `drop` the connection unanswered,
    or `hang` without answering until the server closes."""

    status: int = 200
    content_type: str = JSON
    body: bytes = b""
    drop: bool = False
    hang: bool = False


DROP = Answer(drop=True)
HANG = Answer(hang=True)


class ScriptedApi:
    """Answers each POST with `answer(call)`, or with the next queued Answer."""

    def __init__(self, answer: Callable[[ApiCall], Answer] | None = None) -> None:
        self.calls: list[ApiCall] = []
        self._queue: deque[Answer] = deque()
        self._answer = answer or self._next
        self._closed = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the API

            def do_POST(self) -> None:
                call = ApiCall(self.headers, self.rfile.read(
                    int(self.headers.get("Content-Length", "0"))))
                api.calls.append(call)
                answer = api._answer(call)
                if answer.hang:
                    api._closed.wait(30)
                if answer.drop or answer.hang:
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *_args: Any) -> None:
                """Quiet: tests read `calls`."""

        self._server = serve_on_loopback(Handler)

    @property
    def endpoint(self) -> str:
        """host:port, as [vod] endpoint."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    def queue(self, body: Any, *, status: int = 200, content_type: str = JSON) -> None:
        """Answer the next request with `body` (JSON-encoded unless bytes or text)."""
        raw = body if isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else json.dumps(body).encode())
        self._queue.append(Answer(status, content_type, raw))

    def queue_answer(self, answer: Answer) -> None:
        """Answer the next request with `answer` (DROP, HANG…)."""
        self._queue.append(answer)

    def close(self) -> None:
        """Release hanging requests and stop serving."""
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()

    def _next(self, _call: ApiCall) -> Answer:
        if not self._queue:
            return Answer(500, JSON, b'{"Response": {"Error": {"Code": "InternalError", '
                                     b'"Message": "no answer scripted"}}}')
        return self._queue.popleft()
