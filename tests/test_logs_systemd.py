"""Logs are JSON lines with secrets redacted; sd_notify datagrams reach a real socket."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import structlog

from procpoll import logs
from procpoll.systemd import Notifier, watchdog_interval_s


def test_log_lines_are_json_with_a_stable_event_name() -> None:
    """Each log call is one JSON object with `event`, `level` and `timestamp`."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger("t").info("event.delivered", sink="hook", attempt=1)
    record = json.loads(out.getvalue())
    assert record["event"] == "event.delivered"
    assert record["sink"] == "hook"
    assert record["level"] == "info"
    assert "timestamp" in record


def test_registered_secrets_are_redacted_everywhere_including_tracebacks() -> None:
    """A secret in a field, a message or an exception traceback never reaches the output."""
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    logs.register_secret("s3cr3t-key-value")
    log = structlog.get_logger("t")
    log.info("x", detail="key=s3cr3t-key-value")
    try:
        raise RuntimeError("boom s3cr3t-key-value")
    except RuntimeError:
        log.exception("y")
    text = out.getvalue()
    assert "s3cr3t-key-value" not in text
    assert logs.REDACTED in text
    assert "RuntimeError" in text


def test_level_filters_lower_levels() -> None:
    """At level warning, info lines are not written."""
    out = io.StringIO()
    logs.configure("warning", "json", stream=out)
    structlog.get_logger("t").info("quiet")
    assert out.getvalue() == ""


def test_notifier_sends_datagrams_to_a_path_socket(tmp_path: Path) -> None:
    """READY=1 and RELOADING=1 + MONOTONIC_USEC arrive as single datagrams."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready(status="pulling")
        assert notifier.reloading()
        assert sock.recv(4096) == b"READY=1\nSTATUS=pulling"
        reload_msg = sock.recv(4096).decode()
        assert reload_msg.startswith("RELOADING=1\nMONOTONIC_USEC=")


def test_notifier_abstract_socket_and_noop() -> None:
    """'@name' is the abstract namespace; without NOTIFY_SOCKET nothing is sent."""
    name = f"procpoll-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    assert not Notifier.from_env({}).ready()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG_USEC=60s → ping every 30 s; another PID's watchdog is not ours."""
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None


def test_a_crashing_thread_is_logged_as_json_and_redacted() -> None:
    """An exception that ends a thread becomes a `thread.crashed` JSON line, secrets removed."""
    import threading  # noqa: PLC0415

    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logs.register_secret("thread-secret-value")
    previous = threading.excepthook
    logs.log_thread_crashes()
    try:
        def boom() -> None:
            raise ValueError("leaked thread-secret-value")

        thread = threading.Thread(target=boom, name="worker-x")
        thread.start()
        thread.join()
    finally:
        threading.excepthook = previous
    record = json.loads(out.getvalue())
    assert record["event"] == "thread.crashed"
    assert record["thread"] == "worker-x"
    assert "thread-secret-value" not in out.getvalue()


def test_lines_carry_a_syslog_priority_only_when_stdout_is_the_journal(tmp_path: Path) -> None:
    """Under journald ($JOURNAL_STREAM = our stdout) each line starts with <N> for
    `journalctl -p`; anywhere else the line is plain JSON."""
    path = tmp_path / "out.log"
    with path.open("w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        assert logs.writes_to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.writes_to_journal(stream, {"JOURNAL_STREAM": "1:2"})
        assert not logs.writes_to_journal(stream, {})
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            logs.configure("info", "json", stream=stream)
            structlog.get_logger("t").error("api.auth_failed")
            structlog.get_logger("t").info("event.delivered")
        finally:
            del os.environ["JOURNAL_STREAM"]
    first, second = path.read_text(encoding="utf-8").splitlines()
    assert first.startswith("<3>{")
    assert json.loads(first[3:])["event"] == "api.auth_failed"
    assert second.startswith("<6>{")


def test_lines_keep_every_value_json_would_write() -> None:
    """A line holds integers past 64 bits, non-str keys, non-ASCII text and unknown objects
    (as their repr), exactly as the json module would have written them."""

    class Thing:
        def __repr__(self) -> str:
            return "<thing>"

    out = io.StringIO()
    logs.configure("info", stream=out)
    structlog.get_logger("t").info("event.delivered", big=2**70, counts={1: 2}, name="动物",
                                   thing=Thing(), ratio=0.5)
    record = json.loads(out.getvalue())
    assert record["big"] == 2**70
    assert record["counts"] == {"1": 2}
    assert record["name"] == "动物"
    assert record["thing"] == "<thing>"
    assert record["ratio"] == 0.5
    assert "动物" in out.getvalue()  # not escaped: journald and jq read UTF-8


def test_a_lone_surrogate_in_a_field_still_makes_a_line() -> None:
    """Text orjson refuses (a lone surrogate from a junk payload) is written as json writes it."""
    out = io.StringIO()
    logs.configure("info", stream=out)
    structlog.get_logger("t").info("event.unrouted", event_type="bad\ud800type")
    assert json.loads(out.getvalue())["event_type"] == "bad\ud800type"
