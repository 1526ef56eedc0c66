"""The emulator's HTTP front end: VOD request pipeline, injected faults, control endpoints.

An API request goes through: partition hold, TC3 signature, version, action, rate limit,
fault draw, then the action itself. Faults are drawn before the action runs, so a faulted
PullEvents dequeues nothing and a faulted ConfirmEvents confirms nothing. Every API reply
is HTTP 200 `application/json` (exactly: the SDK ignores error bodies otherwise) in VOD's
`{"Response": {...,"RequestId"}}` envelope, except the injected HTTP 502.

Control endpoints (no signature, no faults, not held by a partition):
`GET /_emulator/stats`, `POST /_emulator/events[?sub_app_id=N]` (a JSON list of
normal-callback bodies, or one), `POST /_emulator/settings` (JSON with any of `faults`,
`fault_kinds`, `partition`, `latency_ms`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from procpoll.emulator import api
from procpoll.emulator.controls import Controls
from procpoll.emulator.event_queue import EventQueue
from procpoll.emulator.faults import SLOW_REPLY_S, Fault, FaultPlan, RateLimiter
from procpoll.emulator.request_stats import RequestStats
from procpoll.emulator.signature import verify

MAX_BODY_BYTES = 10 * 1024 * 1024  # VOD's limit for a TC3 POST
_JSON = "application/json"
_INTERNAL_ERROR = "An internal error has occurred. Retry your request."


class EmulatorServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its open connections, so stop can end them."""

    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(
        self,
        address: tuple[str, int],
        *,
        queue: EventQueue,
        controls: Controls,
        faults: FaultPlan,
        limiter: RateLimiter,
        stats: RequestStats,
        settings: Callable[[], api.ActionSettings],
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.queue = queue
        self.controls = controls
        self.faults = faults
        self.limiter = limiter
        self.request_stats = stats
        self.settings = settings
        self.snapshot = snapshot
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host, which can stall."""
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, registered so `end_connections` can reach it."""
        with self._connections_lock:
            self._connections[threading.current_thread()] = request
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def end_connections(self, timeout_s: float) -> None:
        """Let in-progress replies finish, end idle keep-alive reads, join connection threads."""
        with self._connections_lock:
            connections = dict(self._connections)
        for sock in connections.values():
            _shutdown(sock, socket.SHUT_RD)  # a blocked read sees EOF; writes still work
        deadline = time.monotonic() + timeout_s
        for thread, sock in connections.items():
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                _shutdown(sock, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up are normal; anything else is reported."""
        if isinstance(_current_exception(), ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    protocol_version = "HTTP/1.1"
    server_version = "procpoll-emulator"
    sys_version = ""
    timeout = 300  # an idle keep-alive connection is closed after this
    # Headers and body go out in two sends: with Nagle on, each reply would wait for the
    # client's delayed ACK (~40 ms) and every call would look twice as slow as asked.
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines would drown the CLI's output and the test logs."""

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
            if body is None:
                return
            url = urlsplit(self.path)
            if url.path.startswith("/_emulator/"):
                self._control(url, body)
            elif self.server.controls.wait_partition_over():
                self._api(url, body)
            else:
                self.close_connection = True  # stopping: the held request gets no answer
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # VOD's clients send Content-Length; keep it simple
            self._send(411, "text/plain", b"Content-Length required\n")
            return None
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, "text/plain", b"request body too large or malformed length\n")
            return None
        return self.rfile.read(int(length_text))

    def _api(self, url: SplitResult, body: bytes) -> None:
        srv = self.server
        headers = {name.lower(): value for name, value in self.headers.items()}
        action = headers.get("x-tc-action", "")
        key = action if action in api.ACTIONS else "other"
        srv.request_stats.call(key)
        request_id = str(uuid.uuid4())
        try:
            self._check(url, headers, body, action)
            fault = srv.faults.draw()
            if fault is not None:
                srv.request_stats.fault(fault.value)
                self._inject(fault, key, request_id)
                return
            params = self._params(url, body)
            result = api.call(action, params, srv.queue, srv.settings())
        except api.ApiError as error:
            srv.request_stats.error(key, error.code)
            self._reply(_error(error.code, error.message, request_id))
            return
        except (ConnectionError, TimeoutError):
            raise  # the client is gone: nothing to answer
        except Exception:  # noqa: BLE001 - an emulator bug must still answer like VOD would
            traceback.print_exc()
            srv.request_stats.error(key, "InternalError")
            self._reply(_error("InternalError", _INTERNAL_ERROR, request_id))
            return
        self._reply({"Response": {**result, "RequestId": request_id}})

    def _check(
        self, url: SplitResult, headers: Mapping[str, str], body: bytes, action: str
    ) -> None:
        srv = self.server
        rejection = verify(
            method=self.command,
            path=url.path or "/",
            query=url.query,
            headers=headers,
            body=body,
            credentials=srv.controls.credentials,
            now=time.time(),
        )
        if rejection is not None:
            raise api.ApiError(rejection.code, rejection.message)
        version = headers.get("x-tc-version", "")
        if not version:
            raise api.ApiError("MissingParameter", "The request is missing parameter `Version`.")
        if version != api.VERSION:
            raise api.ApiError(
                "NoSuchVersion", f"The version `{version}` does not exist for service vod."
            )
        if not action:
            raise api.ApiError("MissingParameter", "The request is missing parameter `Action`.")
        if action not in api.ACTIONS:
            raise api.ApiError("InvalidAction", f"The action `{action}` is not supported.")
        if not srv.limiter.allow(action):
            raise api.ApiError(
                "RequestLimitExceeded",
                f"Your request rate exceeds the frequency limit of {srv.limiter.rate:g} "
                f"requests per second for `{action}`. Please reduce the frequency of calls.",
            )

    def _params(self, url: SplitResult, body: bytes) -> dict[str, Any]:
        if self.command == "GET":
            return api.params_from_query(parse_qs(url.query, keep_blank_values=True))
        try:
            params = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise api.ApiError("InvalidParameter", f"The request body is not JSON: {exc}") from exc
        if not isinstance(params, dict):
            raise api.ApiError("InvalidParameter", "The request body must be a JSON object.")
        return params

    def _inject(self, fault: Fault, key: str, request_id: str) -> None:
        stats = self.server.request_stats
        if fault is Fault.INTERNAL_ERROR:
            stats.error(key, "InternalError")
            self._reply(_error("InternalError", _INTERNAL_ERROR, request_id))
        elif fault is Fault.REQUEST_LIMIT:
            stats.error(key, "RequestLimitExceeded")
            message = "Your request rate exceeds the frequency limit. Please retry later."
            self._reply(_error("RequestLimitExceeded", message, request_id))
        elif fault is Fault.BAD_GATEWAY:
            stats.error(key, None)
            self.server.controls.pause(self.server.controls.latency_ms / 1000)
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"
            self._send(502, "text/html", page)
        elif fault is Fault.CONNECTION_RESET:
            stats.error(key, None)
            self._reset()
        else:
            stats.error(key, None)
            self.server.controls.hold_slow_reply(SLOW_REPLY_S)
            self.close_connection = True

    def _control(self, url: SplitResult, body: bytes) -> None:
        route = (self.command, url.path)
        try:
            if route == ("GET", "/_emulator/stats"):
                self._send_json(200, self.server.snapshot())
            elif route == ("POST", "/_emulator/events"):
                self._send_json(200, {"enqueued": self._control_enqueue(url, body)})
            elif route == ("POST", "/_emulator/settings"):
                self._send_json(200, self._control_settings(body))
            else:
                self._send_json(404, {"error": f"no such endpoint: {self.command} {url.path}"})
        except (ValueError, TypeError) as exc:
            self._send_json(400, {"error": str(exc)})

    def _control_enqueue(self, url: SplitResult, body: bytes) -> int:
        query = parse_qs(url.query)
        sub_app_text = query.get("sub_app_id", [""])[-1]
        if sub_app_text and not sub_app_text.isdigit():
            raise ValueError("sub_app_id must be a non-negative integer")
        payload = json.loads(body)
        bodies = payload if isinstance(payload, list) else [payload]
        return self.server.queue.enqueue(bodies, int(sub_app_text) if sub_app_text else None)

    def _control_settings(self, body: bytes) -> dict[str, Any]:
        settings = json.loads(body or b"{}")
        if not isinstance(settings, dict):
            raise TypeError("settings must be a JSON object")
        unknown = set(settings) - {"faults", "fault_kinds", "partition", "latency_ms"}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        srv = self.server
        if "faults" in settings or "fault_kinds" in settings:
            srv.faults.set(
                float(settings.get("faults", srv.faults.rate)), settings.get("fault_kinds")
            )
        if "latency_ms" in settings:
            srv.controls.set_latency_ms(float(settings["latency_ms"]))
        if "partition" in settings:
            if not isinstance(settings["partition"], bool):
                raise TypeError("partition must be true or false")
            srv.controls.set_partition(settings["partition"])
        return {
            "faults": srv.faults.rate,
            "fault_kinds": [kind.value for kind in srv.faults.kinds],
            "partition": srv.controls.partitioned,
            "latency_ms": srv.controls.latency_ms,
        }

    def _reply(self, envelope: dict[str, Any]) -> None:
        self.server.controls.pause(self.server.controls.latency_ms / 1000)
        self._send_json(200, envelope)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, _JSON, json.dumps(payload, ensure_ascii=False).encode())

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _reset(self) -> None:
        # Linger 0 turns close into a TCP RST; rfile (a makefile) holds the socket open
        # until it is closed too. wfile wraps the socket without a reference.
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()


def _error(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": request_id}}


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # already closed by the client or its handler
        sock.shutdown(how)


def _current_exception() -> BaseException | None:
    return sys.exception()
