"""Bounds: memory flat over many events; every in-process structure bounded by configuration."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from procpoll import logs
from procpoll.config import CredentialsConfig, parse_config
from procpoll.daemon import Daemon
from procpoll.dispatch import (
    UNROUTED_TYPE_CHARS,
    UNROUTED_TYPES_REMEMBERED,
    Dispatcher,
    Policy,
    Receipt,
    Route,
)
from procpoll.emulator import Emulator, generate_events
from procpoll.events import parse_event
from procpoll.ledger import Ledger
from procpoll.sinks import build_sink
from procpoll.vod import CredentialChain
from tests.conftest import Receiver, daemon_config, emulator_env
from tests.reliability.scenarios import run_memory

CI_EVENTS = 12_000
GROWTH_LIMIT_KIB = 6 * 1024  # from the 25 % mark to the end; a 700 B/event leak exceeds it


@pytest.mark.timeout(120)
def test_memory_is_flat_over_many_events(tmp_path: Path) -> None:
    """A daemon subprocess through 12k events: RSS grows < 6 MiB between the 25 % and 100 %
    marks (bench/soak.py runs the same for 100k and prints the figures)."""
    report = run_memory(tmp_path, events=CI_EVENTS, timeout_s=100)
    assert report.delivered_lines == CI_EVENTS
    marks = {f: report.rss_at(f) for f in (0.25, 0.5, 0.75, 1.0)}
    print(f"\nmemory: {report.rate:.0f} events/s, RSS KiB at 25/50/75/100 %: {marks}, "
          f"peak {report.peak_kib}")
    assert marks[1.0] - marks[0.25] < GROWTH_LIMIT_KIB


@pytest.mark.timeout(60)
def test_events_in_memory_never_exceed_max_in_flight(
        tmp_path: Path, emulator: Emulator, receiver: Receiver) -> None:
    """Four pullers, a slow sink and a deep queue: the events held (queued or being
    delivered) never exceed [daemon] max_in_flight, even with every puller polling."""
    receiver.delay_s = 0.02
    emulator.enqueue(generate_events(300, seed=6))
    config = daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url}],
        vod={"confirm_window": 30.0},
        daemon={"pullers": 4, "max_in_flight": 32, "concurrency": 2})
    daemon = Daemon(config, environ=emulator_env(emulator))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        peak = 0
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # sampling, not waiting
            peak = max(peak, daemon.dispatcher.in_flight)
            time.sleep(0.002)
    finally:
        daemon.stop()
        thread.join(20)
    assert emulator.stats()["confirmed"] > 32, "too slow to have tested anything"
    assert 16 <= peak <= 32


def test_unrouted_event_types_from_the_api_take_bounded_memory(tmp_path: Path) -> None:
    """Thousands of distinct, long EventTypes no sink wants: the once-per-type log memory
    stays within its fixed count and name length."""
    config = parse_config({"sinks": [
        {"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl"),
         "events": ["ProcedureStateChanged"]}]}, "<bounds>")
    ledger = Ledger(tmp_path / "l.sqlite3", retention_s=3600)
    confirmed: list[str] = []
    stop = threading.Event()
    dispatcher = Dispatcher([Route(s, build_sink(s)) for s in config.sinks], ledger,
                            lambda receipt, _event: confirmed.append(receipt.handle),
                            policy=Policy(concurrency=4), dead_letter=None, stop=stop)
    dispatcher.start()
    try:
        for n in range(3 * UNROUTED_TYPES_REMEMBERED):
            event = parse_event({"EventHandle": f"h{n}", "EventType": f"Junk{n}-" + "x" * 5000})
            dispatcher.submit(event, Receipt(event.handle, None, time.monotonic() + 60))
        assert dispatcher.wait_idle(30)
    finally:
        stop.set()
        dispatcher.close()
        ledger.close()
    assert len(confirmed) == 3 * UNROUTED_TYPES_REMEMBERED
    seen = dispatcher._unrouted_seen  # the structure under test
    assert len(seen) <= UNROUTED_TYPES_REMEMBERED
    assert max(map(len, seen)) <= UNROUTED_TYPE_CHARS


def test_rotated_credentials_do_not_grow_the_redaction_list(tmp_path: Path) -> None:
    """A session-token file rewritten 300 times (hourly STS rotation = 12 days): the set of
    values redacted from logs stays bounded, and the current ones are still redacted."""
    paths = {name: tmp_path / name for name in ("id", "key", "token")}
    paths["id"].write_text("AKIDrotation0000", encoding="utf-8")
    paths["key"].write_text("rotation-secret-key", encoding="utf-8")
    chain = CredentialChain(CredentialsConfig(
        secret_id_file=paths["id"], secret_key_file=paths["key"],
        session_token_file=paths["token"], profile_file=tmp_path / "none"), {})
    before = len(logs._secrets)  # the structure under test
    for n in range(300):
        paths["token"].write_text(f"sts-token-{n:04d}-" + "t" * 60, encoding="utf-8")
        assert chain.get().token == f"sts-token-{n:04d}-" + "t" * 60
    assert len(logs._secrets) - before <= 20
    current = chain.get()
    for value in (current.secret_id, current.secret_key, current.token):
        assert logs.redact(f"x {value} y") == f"x {logs.REDACTED} y"
