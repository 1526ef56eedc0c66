"""`procpoll status`: live figures from a real /metrics endpoint, else the ledger read-only,
and the dead-letter directory counted."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from procpoll import status
from procpoll.config import Config
from procpoll.errors import LedgerError
from procpoll.ledger import Ledger, Outcome
from procpoll.metrics import Metrics

NOW_S = 1_700_000_000.0


@pytest.fixture
def service_metrics() -> Iterator[Metrics]:
    """A Metrics endpoint standing in for a running service, with deliveries recorded."""
    metrics = Metrics()
    metrics.serve("127.0.0.1:0")
    metrics.pulled(None, 20)
    metrics.pulled(1400012345, 5)
    metrics.confirmed(None, 18)
    for _ in range(12):
        metrics.delivery("app", "delivered", 0.05)
    metrics.delivery("app", "failed", 5.0)
    metrics.delivery("archive", "dead")
    metrics.delivery("archive", "duplicate")
    metrics.answered_pull(None, NOW_S - 2.0)
    metrics.answered_pull(1400012345, NOW_S - 400.0)
    metrics.track(lambda: 6, lambda: 3.5)
    try:
        yield metrics
    finally:
        metrics.close()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger written by procpoll's Ledger: app 2 delivered + 1 failing, archive 1 dead."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, retention_s=86_400, now=lambda: NOW_S - 60.0)
    try:
        ledger.record([Outcome("k1", "app", delivered=True), Outcome("k2", "app", delivered=True),
                       Outcome("k3", "app", delivered=False, error="HTTP 502"),
                       Outcome("k3", "archive", delivered=False, dead=True, error="gave up")])
    finally:
        ledger.close()
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def write_dead_letters(directory: Path, ages_s: list[float]) -> None:
    directory.mkdir(parents=True)
    for index, age_s in enumerate(ages_s):
        item = directory / f"key{index}.app.json"
        item.write_text("{}", encoding="utf-8")
        os.utime(item, (NOW_S - age_s, NOW_S - age_s))
    (directory / ".key9.app.123.tmp").write_text("{", encoding="utf-8")  # a write in progress


def test_live_figures_come_from_the_endpoint(service_metrics: Metrics, tmp_path: Path) -> None:
    """With the endpoint answering, per-sink rounds, in flight, oldest unconfirmed and each
    sub-app's last pull come from the scrape; the ledger is not needed."""
    got = status.gather(f"127.0.0.1:{service_metrics.port}", tmp_path / "absent.sqlite3", None,
                        now_s=NOW_S)
    assert got.source == "endpoint"
    assert got.sinks == {"app": status.SinkFigures(delivered=12, failed=1, dead=0),
                         "archive": status.SinkFigures(delivered=0, failed=0, dead=1)}
    assert (got.pulled, got.confirmed, got.in_flight) == (25, 18, 6)
    assert got.oldest_unconfirmed_s == 3.5
    assert got.last_pull_age_s == {"0": 2.0, "1400012345": 400.0}
    assert not (tmp_path / "absent.sqlite3").exists()


def test_a_wildcard_listen_is_asked_on_loopback(service_metrics: Metrics, tmp_path: Path) -> None:
    """`listen = ":PORT"` (every interface) is read through 127.0.0.1."""
    got = status.gather(f":{service_metrics.port}", tmp_path / "l.sqlite3", None, now_s=NOW_S)
    assert got.source == "endpoint"
    assert got.where == f"http://127.0.0.1:{service_metrics.port}/metrics"


def test_a_silent_endpoint_falls_back_to_the_ledger(ledger_path: Path) -> None:
    """Nothing listening at `listen`: the ledger answers, and the note says why."""
    port = closed_port()
    got = status.gather(f"127.0.0.1:{port}", ledger_path, None, now_s=NOW_S)
    assert got.source == "ledger"
    assert f"127.0.0.1:{port}/metrics did not answer" in got.note
    assert got.sinks == {"app": status.SinkFigures(delivered=2, failed=1, dead=0),
                         "archive": status.SinkFigures(delivered=0, failed=0, dead=1)}
    assert got.last_ledger_write_age_s is not None
    assert got.in_flight is None


class _ForeignMetrics(BaseHTTPRequestHandler):
    """Another program's /metrics page."""

    def do_GET(self) -> None:
        body = b"# TYPE other_requests_total counter\nother_requests_total 1.0\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_a_page_that_is_not_procpoll_falls_back_to_the_ledger(ledger_path: Path) -> None:
    """Another program's metrics on that port are not taken for procpoll's."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ForeignMetrics)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        got = status.gather(f"127.0.0.1:{server.server_address[1]}", ledger_path, None,
                            now_s=NOW_S)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert got.source == "ledger"
    assert "not a procpoll metrics page" in got.note


def test_the_ledger_is_read_while_the_service_holds_a_write(ledger_path: Path) -> None:
    """A write transaction in progress (the service committing) neither blocks status nor
    shows through: the committed figures are read at once."""
    writer = sqlite3.connect(ledger_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO deliveries (event_key, sink, first_seen, attempts, "
                       "delivered_at) VALUES ('k9', 'app', ?, 1, ?)", (NOW_S, NOW_S))
        started_s = time.monotonic()
        got = status.from_ledger(ledger_path, NOW_S)
        assert time.monotonic() - started_s < status.LEDGER_BUSY_TIMEOUT_S
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert got.sinks["app"].delivered == 2


def test_a_missing_ledger_is_reported_not_created(tmp_path: Path) -> None:
    """Before the first delivery there is no ledger file; status says so and creates none."""
    path = tmp_path / "state" / "ledger.sqlite3"
    got = status.gather("", path, None, now_s=NOW_S)
    assert got.sinks == {}
    assert "no ledger yet" in got.note
    assert not path.parent.exists()


def test_a_file_that_is_not_a_ledger_raises_ledger_error(tmp_path: Path) -> None:
    """A corrupt or foreign ledger file is a LedgerError (the CLI's exit 73), not a crash."""
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="cannot read the ledger"):
        status.from_ledger(path, NOW_S)


def test_dead_letters_are_counted_with_the_oldest_age(tmp_path: Path) -> None:
    """Every *.json item counts, hidden temp files of a write in progress do not; the oldest
    age comes from the files' modification times."""
    directory = tmp_path / "dead"
    write_dead_letters(directory, [30.0, 7_200.0, 5.0])
    got = status.count_dead_letters(directory, NOW_S)
    assert (got.files, got.oldest_age_s, got.error) == (3, 7_200.0, None)
    assert status.count_dead_letters(tmp_path / "never-created", NOW_S).files == 0


@dataclass(frozen=True)
class _MetricsSection:
    listen: str


@dataclass(frozen=True)
class _ConfigWithMetrics:
    metrics: _MetricsSection


def test_listen_is_read_from_the_metrics_section_when_it_exists() -> None:
    """`[metrics] listen` is used when the config has it; a config without it means off."""
    with_section: Any = _ConfigWithMetrics(_MetricsSection("127.0.0.1:9464"))
    assert status.configured_listen(with_section) == "127.0.0.1:9464"
    assert status.configured_listen(Config()) == ""


def run_status(config_path: Path, *flags: str) -> tuple[int, str]:
    """Parse `status -c FILE FLAGS` with the parser add_parser registers, run its handler."""
    parser = argparse.ArgumentParser(prog="procpoll")
    status.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status", "-c", str(config_path), *flags])
    out = io.StringIO()
    code: int = args.func(args, out)
    return code, out.getvalue()


def write_config(tmp_path: Path, ledger_path: Path, dead_dir: Path) -> Path:
    path = tmp_path / "procpoll.toml"
    path.write_text(f'[ledger]\npath = "{ledger_path}"\n[dead_letter]\ndirectory = "{dead_dir}"\n'
                    f'[[sinks]]\nname = "app"\ntype = "file"\npath = "{tmp_path / "a.jsonl"}"\n',
                    encoding="utf-8")
    return path


def test_the_command_prints_a_human_summary(ledger_path: Path, tmp_path: Path) -> None:
    """`procpoll status -c FILE` exits 0 and prints the source, one row per sink and the
    dead letters."""
    dead_dir = tmp_path / "dead"
    write_dead_letters(dead_dir, [10.0])
    code, text = run_status(write_config(tmp_path, ledger_path, dead_dir))
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == f"procpoll status: from the ledger {ledger_path}"
    assert lines[2].split() == ["sink", "delivered", "failing", "dead"]
    assert lines[3].split() == ["app", "2", "1", "0"]
    assert lines[4].split() == ["archive", "0", "0", "1"]
    assert lines[-1].startswith(f"dead letters: 1 in {dead_dir}, oldest ")


def test_the_command_prints_json_with_json(ledger_path: Path, tmp_path: Path) -> None:
    """`--json` prints one object with the same figures, for scripts."""
    code, text = run_status(write_config(tmp_path, ledger_path, tmp_path / "dead"), "--json")
    assert code == 0
    document = json.loads(text)
    assert document["source"] == "ledger"
    assert document["sinks"]["app"] == {"delivered": 2, "failed": 1, "dead": 0}
    assert document["dead_letters"]["files"] == 0


def test_the_human_summary_of_a_live_service(service_metrics: Metrics, tmp_path: Path) -> None:
    """From the endpoint the summary shows in flight, oldest unconfirmed and each last pull."""
    got = status.gather(f"127.0.0.1:{service_metrics.port}", tmp_path / "l.sqlite3", None,
                        now_s=NOW_S)
    text = status.render(got)
    assert "pulled 25, confirmed 18\n" in text
    assert "in flight: 6\n" in text
    assert "oldest unconfirmed: 3.5 s (handles expire after 30 s)\n" in text
    assert "last answered pull, default sub-app: 2.0 s ago\n" in text
    assert "last answered pull, sub-app 1400012345: 7 min ago\n" in text
    assert text.endswith("dead letters: no [dead_letter] directory configured\n")
