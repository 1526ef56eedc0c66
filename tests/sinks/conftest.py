"""Fixtures for the sink tests: events, deliveries, sink configs and a recording HTTP server."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import parse_config
from procpoll.errors import ConfigError
from procpoll.events import Event, parse_callback_body
from procpoll.sinks.base import Delivery, SinkConfig
from tests.conftest import serve_on_loopback

PAYLOADS = Path(__file__).parent.parent / "data" / "payloads"


def payload(name: str) -> dict[str, Any]:
    """A documented callback body from tests/data/payloads, as a dict."""
    data: dict[str, Any] = json.loads((PAYLOADS / name).read_text(encoding="utf-8"))
    return data


def load_event(name: str) -> Event:
    """A documented callback body from tests/data/payloads, as an Event."""
    return parse_callback_body(payload(name))


def procedure_event(task_id: str = "1256-Procedure-t1", status: str = "FINISH",
                    **fields: Any) -> Event:
    """A ProcedureStateChanged event built on the transcode + cover sample, with overrides."""
    raw = copy.deepcopy(payload("ProcedureStateChanged-transcode-coverbysnapshot.json"))
    body = raw["ProcedureStateChangeEvent"]
    body.update({"TaskId": task_id, "Status": status, **fields})
    if status != "FINISH":
        for result in body["MediaProcessResultSet"]:
            task = next(v for k, v in result.items() if k.endswith("Task"))
            task.update(Status="PROCESSING", Output={})
    return parse_callback_body(raw)


def delivery(event: Event, *, sub_app_id: int | None = None, attempt: int = 1,
             timeout_s: float = 10.0) -> Delivery:
    """One delivery of `event`."""
    return Delivery(event, sub_app_id, attempt, timeout_s)


def sink_config(sink_type: str, **keys: Any) -> SinkConfig:
    """The SinkConfig of one [[sinks]] table, validated by the real config parser."""
    table = {"name": f"test-{sink_type}", "type": sink_type, **keys}
    return parse_config({"sinks": [table]}, "<test>").sinks[0]


def config_problems(sink_type: str, **keys: Any) -> list[str]:
    """The problems the config parser reports for one [[sinks]] table (none: [])."""
    try:
        sink_config(sink_type, **keys)
    except ConfigError as exc:
        return exc.problems
    return []


class Recorder:
    """A stdlib HTTP server on 127.0.0.1 that records every request and answers as scripted."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer: Callable[[int], int] = lambda _n: 200
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with recorder._lock:
                    recorder.requests.append((dict(self.headers), body))
                    n = len(recorder.requests)
                recorder.hold.wait(30)
                self.send_response(recorder.answer(n))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = serve_on_loopback(Handler)

    @property
    def url(self) -> str:
        """The URL to POST to."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/vod"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """A recording HTTP receiver, stopped at teardown."""
    server = Recorder()
    try:
        yield server
    finally:
        server.close()
