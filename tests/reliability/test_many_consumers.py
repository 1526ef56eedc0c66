"""Many consumers of one queue: three processes under one supervisor on SQLite, three
separate `procpoll run` on one PostgreSQL ledger, one of them SIGKILLed, PostgreSQL
restarted. The confirm window (2 s) is shorter than one delivery in eight (3 s), so
VOD hands those events to another consumer while the first is still delivering them.

Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from procpoll.emulator import Emulator, generate_events
from procpoll.events import event_key
from tests import pg
from tests.conftest import serve_on_loopback
from tests.reliability.harness import (
    ConfirmAudit,
    DaemonProcess,
    LedgerReader,
    emulator_sections,
    wait_until,
    write_config,
)
from tests.reliability.scenarios import credentials_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EVENTS = 160
CONSUMERS = 3
CONFIRM_WINDOW_S = 2.0
SLOW_S = 3.0  # longer than the confirm window: the event is pulled again meanwhile
SLOW_ONE_IN = 8
FEED_S = 6.0  # events arrive over this long, so "mid-run" has a middle
DRAIN_TIMEOUT_S = 50.0
PG_RESTART = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"]


class SlowReceiver:
    """A webhook receiver where one body in eight takes SLOW_S; records each webhook-id it
    took (before answering, so a delivery cut by a crash still counts as received)."""

    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()
        self.slow = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if int(hashlib.sha256(body).hexdigest()[:8], 16) % SLOW_ONE_IN == 0:
                    with receiver._lock:
                        receiver.slow += 1
                    time.sleep(SLOW_S)  # the slow application this scenario is about
                with receiver._lock:
                    receiver.ids[self.headers.get("webhook-id", "")] += 1
                try:
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    return  # the consumer died meanwhile

            def log_message(self, *_args: Any) -> None:
                return

        self.server = serve_on_loopback(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.ids)

    def has(self, webhook_id: str) -> bool:
        with self._lock:
            return self.ids[webhook_id] > 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PostgresReader:
    """Read-only questions to a PostgreSQL ledger from the test process."""

    def __init__(self, url: str) -> None:
        self.conninfo, schema = url.split("?schema=")
        self.schema = schema

    def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg  # noqa: PLC0415 -- optional dependency

        with psycopg.connect(self.conninfo, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def delivered_at(self) -> dict[str, float]:
        """Delivery id → when it was recorded delivered (server clock, unix seconds)."""
        rows = self._rows("SELECT event_key, delivered_at FROM procpoll_deliveries "
                          "WHERE delivered_at IS NOT NULL")
        return dict(rows)

    def claimants(self) -> Counter[int]:
        """Pid of each owner of open claims → how many it holds."""
        rows = self._rows("SELECT claim_owner FROM procpoll_deliveries WHERE claim_owner IS NOT "
                          "NULL AND delivered_at IS NULL AND dead_at IS NULL")
        return Counter(int(owner.split(":")[1]) for (owner,) in rows)

    def open_claims(self, owner_prefix: str) -> set[str]:
        """Delivery ids claimed by this owner and not recorded delivered or dead."""
        rows = self._rows("SELECT event_key FROM procpoll_deliveries WHERE claim_owner LIKE %s "
                          "AND delivered_at IS NULL AND dead_at IS NULL", (owner_prefix + "%",))
        return {key for (key,) in rows}


class ConfirmLog:
    """Stands in for the ledger in ConfirmAudit: notes when each event was confirmed, so the
    ledger is checked afterwards (PostgreSQL may be down at that moment)."""

    def __init__(self) -> None:
        self.confirmed_at: list[tuple[str, float]] = []

    def done(self, event_key: str | None = None) -> set[tuple[str, str]]:
        assert event_key is not None
        self.confirmed_at.append((event_key, time.time()))
        return {(event_key, "hook")}


@dataclass
class Report:
    """What one run did: figures to print and to assert on."""

    events: int = 0
    received: int = 0
    distinct: int = 0
    slow: int = 0
    redelivered: int = 0
    confirmed: int = 0
    drained: bool = False
    lost: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    early_confirms: list[Any] = field(default_factory=list)
    unrecorded_confirms: list[str] = field(default_factory=list)
    killed_claims: set[str] = field(default_factory=set)
    unrecorded_deliveries: set[str] = field(default_factory=set)  # delivered, record failed
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (f"events {self.events}, received {self.received} ({self.distinct} distinct, "
                f"{sum(self.duplicates.values())} duplicates), slow {self.slow}, "
                f"redelivered {self.redelivered}, confirmed {self.confirmed}, "
                f"lost {len(self.lost)}, early confirms {len(self.early_confirms)}, "
                f"unrecorded confirms {len(self.unrecorded_confirms)}, "
                f"{self.seconds:.1f} s {self.extra or ''}")


@dataclass
class Run:
    """The consumers, the emulator, the receiver; what a scenario acts on mid-run."""

    emu: Emulator
    receiver: SlowReceiver
    consumers: list[DaemonProcess]
    ledger_url: str | None


def _sections(emu: Emulator, workdir: Path, ledger_url: str | None,
              processes: int) -> dict[str, dict[str, Any]]:
    sections = emulator_sections(emu, workdir, vod={"confirm_window": CONFIRM_WINDOW_S},
                                 daemon={"processes": processes, "shutdown_grace": 3})
    if ledger_url is not None:
        sections["ledger"] = {"url": ledger_url}
    return sections


def _feed(emu: Emulator, bodies: list[dict[str, Any]]) -> None:
    chunk = 10
    for start in range(0, len(bodies), chunk):
        emu.enqueue(bodies[start:start + chunk])
        time.sleep(FEED_S * chunk / len(bodies))  # the arrival rate of this scenario


def run_scenario(workdir: Path, *, ledger_url: str | None, supervised: bool, seed: int,
                 mid_run: Callable[[Run, Report], None] | None = None) -> Report:
    """Feed EVENTS over FEED_S to three consumers, act `mid_run`, drain, stop, count."""
    started = time.monotonic()
    report = Report(events=EVENTS)
    bodies = generate_events(EVENTS, seed=seed)
    emu = Emulator(confirm_window_s=CONFIRM_WINDOW_S, hold_s=0.3, seed=seed).start()
    receiver = SlowReceiver()
    confirms = ConfirmLog()
    sqlite = LedgerReader(workdir / "ledger.sqlite3")
    audit = ConfirmAudit(emu, confirms if ledger_url else sqlite,
                         {"hook": (lambda _b: True, receiver.has)})
    consumers: list[DaemonProcess] = []
    try:
        config = write_config(workdir / "procpoll.toml",
                              _sections(emu, workdir, ledger_url,
                                        CONSUMERS if supervised else 1),
                              [{"name": "hook", "type": "webhook", "url": receiver.url,
                                "timeout": SLOW_S + 2, "retries": 1, "backoff": 0.05,
                                "backoff_max": 0.2}])
        for n in range(1 if supervised else CONSUMERS):
            home = workdir / f"consumer-{n}"
            home.mkdir()
            consumers.append(DaemonProcess(config, home, credentials_env(emu)).start())
        feeder = threading.Thread(target=_feed, args=(emu, bodies), daemon=True)
        feeder.start()
        if mid_run is not None:
            mid_run(Run(emu, receiver, consumers, ledger_url), report)
        feeder.join(FEED_S * 3)
        report.drained = emu.wait_drained(DRAIN_TIMEOUT_S)
        report.seconds = time.monotonic() - started
        report.extra["still_running"] = sum(1 for c in consumers if c.alive())
        report.extra["starts"] = sum(c.runs for c in consumers)
        report.extra["ledger_errors"] = sum(
            1 for c in consumers for r in c.records()
            if r.get("level") == "error" and str(r.get("event", "")).startswith("ledger."))
        report.unrecorded_deliveries = {
            r["event_key"] for c in consumers for r in c.events("ledger.write_failed")
            if "event_key" in r}
        statuses = [c.terminate() for c in consumers if c.alive()]
        assert all(s == 0 for s in statuses), statuses
        stats = emu.stats()
        report.confirmed, report.redelivered = stats["confirmed"], stats["redelivered"]
        counts = receiver.counts()
        report.received, report.distinct = sum(counts.values()), len(counts)
        report.duplicates = {k: n - 1 for k, n in counts.items() if n > 1}
        report.slow = receiver.slow
        report.early_confirms = audit.early
        # A body's first occurrence has its event key as webhook-id.
        report.lost = [k for k in {event_key(b) for b in bodies} if not counts[k]]
        if ledger_url is not None:
            recorded = PostgresReader(ledger_url).delivered_at()
            # A confirm must come after its delivery's record (same host, same clock).
            report.unrecorded_confirms = [k for k, at in confirms.confirmed_at
                                          if k not in recorded or recorded[k] > at + 0.01]
        return report
    finally:
        for consumer in consumers:
            consumer.stop()
        _kill_workers(consumers)
        sqlite.close()
        receiver.close()
        emu.stop()


def _kill_workers(consumers: list[DaemonProcess]) -> None:
    """Teardown: a supervisor's workers too (a killed supervisor leaves them running)."""
    for consumer in consumers:
        for record in consumer.events("supervisor.worker_started"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record["pid"], signal.SIGKILL)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL ledger URL on a schema of its own (skips without PostgreSQL)."""
    with pg.fresh_schema_url() as url:
        yield url


def _assert_clean(report: Report) -> None:
    assert report.drained, report.line()
    assert report.lost == []
    assert report.confirmed == report.events
    assert report.distinct == report.events
    assert report.early_confirms == []
    assert report.unrecorded_confirms == []
    assert report.slow > 0 and report.redelivered > 0  # the window really was overrun


def test_three_supervised_processes_on_sqlite(tmp_path: Path) -> None:
    """processes = 3 on one SQLite ledger: every event delivered once, none twice, all
    confirmed, none confirmed before the webhook had it and the ledger recorded it."""
    report = run_scenario(tmp_path, ledger_url=None, supervised=True, seed=21)
    print(f"\nsupervised sqlite: {report.line()}")
    _assert_clean(report)
    assert report.duplicates == {}


def test_three_consumers_on_one_postgresql_ledger(tmp_path: Path, pg_url: str) -> None:
    """Three separate `procpoll run` on one PostgreSQL ledger: the same, across processes
    that share nothing but the ledger."""
    report = run_scenario(tmp_path, ledger_url=pg_url, supervised=False, seed=22)
    print(f"\nthree consumers, postgresql: {report.line()}")
    _assert_clean(report)
    assert report.duplicates == {}


def _kill_one(run: Run, report: Report) -> None:
    """Mid-run, SIGKILL a consumer while it holds claims (deliveries under way); note which."""
    assert run.ledger_url is not None
    ledger = PostgresReader(run.ledger_url)
    wait_until(lambda: sum(run.receiver.counts().values()) >= EVENTS // 3, FEED_S * 2)
    by_pid = {c.pid: c for c in run.consumers}

    def busiest() -> int | None:
        held = {pid: n for pid, n in ledger.claimants().items() if pid in by_pid}
        return max(held, key=held.__getitem__) if held else None

    pid = wait_until(busiest, FEED_S * 2, step_s=0.05)
    assert pid is not None, "no consumer held a claim mid-run"
    by_pid[pid].kill()
    owner = f"{socket.gethostname()}:{pid}:"
    report.killed_claims = ledger.open_claims(owner)
    report.extra["killed_at_received"] = sum(run.receiver.counts().values())
    report.extra["open_claims_at_kill"] = len(report.killed_claims)


def test_one_postgresql_consumer_killed_mid_run(tmp_path: Path, pg_url: str) -> None:
    """One of three consumers SIGKILLed mid-run: nothing lost, every event confirmed, and a
    webhook-id received twice only if the killed consumer held its claim at the kill."""
    report = run_scenario(tmp_path, ledger_url=pg_url, supervised=False, seed=23,
                          mid_run=_kill_one)
    print(f"\none consumer killed, postgresql: {report.line()}")
    _assert_clean(report)
    assert set(report.duplicates) <= report.killed_claims
    assert all(n == 1 for n in report.duplicates.values())


def _restart_postgres(run: Run, report: Report) -> None:
    """Mid-run, restart the PostgreSQL server under the consumers."""
    wait_until(lambda: sum(run.receiver.counts().values()) >= EVENTS // 3, FEED_S * 2)
    report.extra["received_before_restart"] = sum(run.receiver.counts().values())
    began = time.monotonic()
    subprocess.run(PG_RESTART, check=True, capture_output=True, timeout=60)
    report.extra["pg_restart_s"] = round(time.monotonic() - began, 1)
    report.extra["received_after_restart"] = sum(run.receiver.counts().values())


def test_postgresql_restarted_mid_run(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL restarted under three consumers: nothing lost, nothing confirmed that the
    ledger had not recorded delivered, and the same processes finish the queue."""
    report = run_scenario(tmp_path, ledger_url=pg_url, supervised=False, seed=24,
                          mid_run=_restart_postgres)
    print(f"\npostgresql restarted: {report.line()}")
    _assert_clean(report)
    assert report.extra["ledger_errors"] > 0  # the consumers did feel the restart
    # The same processes recovered: none exited, none was started again.
    assert report.extra["still_running"] == report.extra["starts"] == CONSUMERS
    # A repeat only where a delivery succeeded but its record failed (ledger.write_failed).
    assert {k.split("~")[0] for k in report.duplicates} <= report.unrecorded_deliveries
