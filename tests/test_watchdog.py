"""The watchdog means "hung": fed while every loop's unit of work stays within its bound."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from procpoll.daemon import Daemon
from procpoll.emulator import Emulator
from procpoll.heartbeat import Heartbeat
from procpoll.systemd import Notifier
from tests.conftest import daemon_config, emulator_env, wait_for
from tests.test_daemon import file_sink


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_past_its_limit_is_overdue_and_idle_is_not() -> None:
    """A unit of work counts against its bound only while it runs."""
    clock = Clock()
    heartbeat = Heartbeat(clock)
    with heartbeat.busy("PullEvents", 25.0):
        clock.now = 20.0
        assert heartbeat.overdue() == []
        clock.now = 26.0
        late = heartbeat.overdue()
        assert len(late) == 1 and "PullEvents (26 s)" in late[0]
    assert heartbeat.overdue() == []
    clock.now = 1_000.0  # idle for ages: not hung
    assert heartbeat.overdue() == []


@dataclass(frozen=True)
class RecordingNotifier(Notifier):
    """Keeps every sd_notify datagram instead of sending it."""

    sent: list[dict[str, str | int]] = field(default_factory=list)

    def send(self, **fields: str | int) -> bool:
        self.sent.append(fields)
        return True

    def pings(self) -> int:
        return sum("watchdog" in f for f in self.sent)


@pytest.fixture
def watchdog_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # fed every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield


@pytest.mark.usefixtures("watchdog_env")
def test_a_stuck_thread_stops_the_watchdog_and_recovery_resumes_it(
        tmp_path: Path, emulator: Emulator) -> None:
    """While a thread overruns its bound the main loop stops WATCHDOG=1 (systemd restarts
    a hung daemon); once it finishes, the keep-alives resume."""
    notifier = RecordingNotifier(None)
    daemon = Daemon(daemon_config(tmp_path, emulator, [file_sink(tmp_path)]),
                    environ=emulator_env(emulator), notifier=notifier)
    status: list[int] = []
    runner = threading.Thread(target=lambda: status.append(daemon.run()), daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: notifier.pings() >= 3, 10)
        release = threading.Event()

        def stuck() -> None:
            with daemon.heartbeat.busy("sink hook", 0.2):
                release.wait(10)

        worker = threading.Thread(target=stuck, daemon=True)
        worker.start()
        assert wait_for(daemon.heartbeat.overdue, 5)
        # One loop turn may already have been past its check: count from the next one.
        wait_for(lambda: False, 0.15)
        before = notifier.pings()
        assert not wait_for(lambda: notifier.pings() > before, 0.5), \
            "fed the watchdog while a thread was stuck"
        release.set()
        worker.join(5)
        assert wait_for(lambda: notifier.pings() > before, 5)
    finally:
        daemon.stop()
        runner.join(10)
    assert status == [0]
