"""The dispatcher's log: one info line per delivered event, each sink's delivery at debug."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from procpoll import logs
from tests.test_dispatch import Harness, RecordingSink, harness, sink_config, task

__all__ = ["harness"]  # the fixture, imported to be used here


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


@pytest.fixture
def log_at() -> Callable[[str], io.StringIO]:
    """Send the log to a string at a level (conftest's autouse fixture resets it per test)."""

    def configure(level: str) -> io.StringIO:
        out = io.StringIO()
        logs.configure(level, stream=out)
        return out

    return configure


def test_one_info_line_per_event_with_every_sink(
        harness: Callable[..., Harness], log_at: Callable[[str], io.StringIO]) -> None:
    """At info, an event delivered to two sinks logs one event.delivered line naming both,
    with each sink's attempts and duration and the event's key, type, task and status."""
    out = log_at("info")
    h = harness([RecordingSink("archive"), RecordingSink("hook")])
    event = task("t-1", "FINISH")
    h.submit(event, "h1")
    h.idle()
    delivered = [r for r in lines(out) if r["event"] == "event.delivered"]
    assert len(delivered) == 1
    record = delivered[0]
    assert sorted(record["sinks"]) == ["archive", "hook"]
    assert record["attempts"] == {"archive": 1, "hook": 1}
    assert set(record["duration_ms"]) == {"archive", "hook"}
    assert (record["event_key"], record["event_type"], record["task_id"], record["status"]) == (
        event.key, "ProcedureStateChanged", "t-1", "FINISH")
    assert record["level"] == "info"
    assert not [r for r in lines(out) if r["event"] == "sink.delivered"]


def test_each_sink_delivery_is_a_debug_line(
        harness: Callable[..., Harness], log_at: Callable[[str], io.StringIO]) -> None:
    """At debug, each sink's delivery has its own sink.delivered line (attempt, duration)."""
    out = log_at("debug")
    h = harness([RecordingSink("archive"), RecordingSink("hook")])
    h.submit(task("t-2", "FINISH"), "h1")
    h.idle()
    per_sink = [r for r in lines(out) if r["event"] == "sink.delivered"]
    assert sorted(r["sink"] for r in per_sink) == ["archive", "hook"]
    assert all(r["level"] == "debug" and r["attempt"] == 1 and "duration_ms" in r
               for r in per_sink)


def test_a_retried_delivery_counts_its_attempts(
        harness: Callable[..., Harness], log_at: Callable[[str], io.StringIO]) -> None:
    """A sink that took the event on its second attempt shows attempts 2 on the info line."""
    out = log_at("info")
    sink = RecordingSink("hook")
    sink.script = lambda d: "busy" if d.attempt == 1 else None
    h = harness([sink], [sink_config("hook", retries=1)])
    h.submit(task("t-3", "FINISH"), "h1")
    h.idle()
    delivered = [r for r in lines(out) if r["event"] == "event.delivered"]
    assert [r["attempts"] for r in delivered] == [{"hook": 2}]
