"""Partition: the API accepts connections and never answers, for longer than request_timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procpoll.emulator import Emulator, generate_events
from tests.reliability.harness import (
    DaemonProcess,
    NotifyListener,
    emulator_sections,
    wait_until,
    write_config,
)
from tests.reliability.scenarios import credentials_env

WATCHDOG_USEC = 2_000_000  # ping every 1 s; stop once no loop had an answer for 2 s
REQUEST_TIMEOUT_S = 6


@pytest.fixture
def emu() -> Iterator[Emulator]:
    """An emulator with a short hold, so a healthy daemon gets an answer every 0.3 s."""
    emulator = Emulator(confirm_window_s=5.0, hold_s=0.3, seed=3).start()
    yield emulator
    emulator.stop()


@pytest.mark.timeout(90)
def test_partition_times_out_backs_off_keeps_the_watchdog_fed_and_recovers(
        tmp_path: Path, emu: Emulator) -> None:
    """During a 12 s partition the daemon times out and retries with backoff; it is not
    hung, so it keeps feeding the watchdog (a restart cannot end an outage); afterwards the
    same process delivers what queued up."""
    notify = NotifyListener(tmp_path / "notify")
    config = write_config(tmp_path / "p.toml", emulator_sections(
        emu, tmp_path, vod={"request_timeout": REQUEST_TIMEOUT_S, "confirm_window": 5.0}),
        [{"name": "archive", "type": "file", "path": str(tmp_path / "archive.jsonl")}])
    daemon = DaemonProcess(config, tmp_path, {
        **credentials_env(emu), "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": str(WATCHDOG_USEC)}).start()
    try:
        emu.enqueue(generate_events(5, seed=1))
        assert emu.wait_drained(20)
        assert wait_until(lambda: len(notify.watchdog_times()) >= 2, 10), "no watchdog pings"

        emu.set_partition(True)
        cut = time.monotonic()
        assert emu.wait_held(partitioned=2, timeout_s=10), "the pulls never reached the API"
        emu.enqueue(generate_events(5, seed=2))
        assert wait_until(lambda: len(_timeouts(daemon)) >= 3, 25), "the daemon gave up"
        timeouts = _timeouts(daemon)
        in_partition = time.monotonic() - cut
        assert in_partition > REQUEST_TIMEOUT_S
        # Backoff, not a tight loop: each attempt waited, and no more attempts than timeouts allow.
        assert all(r["wait_s"] > 0 for r in timeouts)
        assert max(r["attempt"] for r in timeouts) >= 2
        assert len(timeouts) <= 2 * (in_partition / REQUEST_TIMEOUT_S + 1)
        late = cut + 2 * WATCHDOG_USEC / 1e6 + 1.5
        assert [t for t in notify.watchdog_times() if t > late], \
            "the watchdog starved during an API outage: systemd would kill a healthy daemon"

        emu.set_partition(False)
        healed = time.monotonic()
        assert emu.wait_drained(40), "no recovery without a restart"
        assert daemon.alive()
        assert wait_until(lambda: any(t > healed for t in notify.watchdog_times()), 10)
        assert daemon.runs == 1
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
        notify.close()


def _timeouts(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [r for r in daemon.events("api.pull_failed") if r.get("code") == "ClientNetworkError"]
