"""Shared fixtures: an in-process emulator, a recording webhook receiver, config builders."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from procpoll import logs
from procpoll.config import Config, parse_config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator


@contextlib.contextmanager
def forced_preemption() -> Iterator[None]:
    """Switch threads after every bytecode or so (1 µs instead of 5 ms), so that races in a
    lock or hand-off show up in a test run, not only in production."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)



def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0, step_s: float = 0.01) -> Any:
    """Poll `condition` until it is truthy or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step_s)


@pytest.fixture(autouse=True)
def _quiet_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Send the daemon's JSON log to a file so tests can read it and pytest output stays clean."""
    path = tmp_path_factory.mktemp("log") / "procpoll.log"
    with path.open("w", encoding="utf-8") as stream:
        logs.configure("debug", "json", stream=stream)
        yield


@pytest.fixture
def log_lines(tmp_path: Path) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Capture the JSON log of this test in a file; the fixture returns a reader of its lines."""
    path = tmp_path / "test.log"
    with path.open("w", encoding="utf-8") as stream:
        logs.configure("debug", "json", stream=stream)

        def read() -> list[dict[str, Any]]:
            stream.flush()
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]

        yield read


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """An emulator with short windows so redelivery tests take a second, not 30."""
    emu = Emulator(confirm_window_s=3.0, hold_s=0.3, seed=7).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def run_daemon() -> Iterator[Callable[[Config, dict[str, str]], Daemon]]:
    """Start Daemon.run in a thread; at teardown stop it and require exit status 0."""
    started: list[tuple[Daemon, threading.Thread, list[int]]] = []

    def start(config: Config, environ: dict[str, str]) -> Daemon:
        daemon = Daemon(config, environ=environ)
        status: list[int] = []
        thread = threading.Thread(target=lambda: status.append(daemon.run()), daemon=True)
        thread.start()
        started.append((daemon, thread, status))
        return daemon

    yield start
    for daemon, thread, status in started:
        daemon.stop()
        thread.join(20)
        assert not thread.is_alive(), "the daemon did not stop"
        assert status == [0]


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on 127.0.0.1 (ephemeral port), serving in a daemon thread.

    Stop it with `server.shutdown(); server.server_close()`.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    return server


class Receiver:
    """A local HTTP server that records POSTed bodies and answers with a scripted status."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.status: Callable[[bytes], int] = lambda _body: 200
        self.delay_s = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                status = receiver.status(body)
                if 200 <= status < 300:
                    with receiver.lock:
                        receiver.bodies.append(body)
                        receiver.headers.append(dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = serve_on_loopback(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(b) for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording webhook receiver on 127.0.0.1."""
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def daemon_config(tmp_path: Path, emu: Emulator, sinks: list[dict[str, Any]],
                  **sections: dict[str, Any]) -> Config:
    """A Config pointing at the emulator with the ledger in tmp_path."""
    document: dict[str, Any] = {
        "vod": {"endpoint": emu.endpoint, "scheme": "http", "request_timeout": 6,
                "confirm_window": 3.0},
        "ledger": {"path": str(tmp_path / "ledger.sqlite3")},
        "daemon": {"confirm_margin": 0.5, "shutdown_grace": 5},
        "sinks": sinks,
    }
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return parse_config(document, "<test>")


def emulator_env(emu: Emulator) -> dict[str, str]:
    """Environment variables carrying the emulator's credentials."""
    return {"TENCENTCLOUD_SECRET_ID": emu.secret_id, "TENCENTCLOUD_SECRET_KEY": emu.secret_key}
