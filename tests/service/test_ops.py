"""Day-to-day operation commands end to end on the emulator: `once --drain`, `ledger`,
`deadletter`, and the operator-facing output of `check` and `emulate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from procpoll import cli
from procpoll.config import Config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator, generate_events
from tests.conftest import Receiver, daemon_config, emulator_env


def procpoll(*args: str, env: dict[str, str] | None = None,
             **options: Any) -> subprocess.CompletedProcess[str]:
    """`python -m procpoll ARGS` in a child process, outside any journal."""
    base = {k: v for k, v in os.environ.items()
            if k != "JOURNAL_STREAM" and not k.startswith("TENCENTCLOUD_")}
    return subprocess.run([sys.executable, "-m", "procpoll", *args], env={**base, **(env or {})},
                          text=True, capture_output=True, timeout=60, check=False, **options)


def config_file(tmp_path: Path, emu: Emulator, extra: str = "") -> Path:
    """A TOML config pointing at the emulator, a file sink "archive", a dead-letter directory."""
    path = tmp_path / "procpoll.toml"
    path.write_text(
        f'[vod]\nendpoint = "{emu.endpoint}"\nscheme = "http"\nconfirm_window = 3.0\n'
        f'[ledger]\npath = "{tmp_path / "ledger.sqlite3"}"\n'
        f'[dead_letter]\ndirectory = "{tmp_path / "dead"}"\n'
        f'[[sinks]]\nname = "archive"\ntype = "file"\npath = "{tmp_path / "archive.jsonl"}"\n'
        + extra, encoding="utf-8")
    return path


def archived(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "archive.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


# --- once --drain ------------------------------------------------------------------------------

def test_once_drain_empties_a_backlog_larger_than_one_pull(tmp_path: Path,
                                                           emulator: Emulator) -> None:
    """`once --drain` pulls until the queue answers empty: 100 events (seven pulls) are
    delivered and confirmed, and the exit status is 0."""
    emulator.enqueue(generate_events(100, seed=3))
    result = procpoll("once", "--drain", "-c", str(config_file(tmp_path, emulator)),
                      env=emulator_env(emulator))
    assert result.returncode == cli.EX_OK, result.stderr
    assert emulator.stats()["confirmed"] == 100
    assert len(archived(tmp_path)) == 100


def test_once_without_drain_pulls_one_batch(tmp_path: Path, emulator: Emulator) -> None:
    """Plain `once` keeps its meaning: one pull per sub-app, so 16 of 100 events."""
    emulator.enqueue(generate_events(100, seed=3))
    result = procpoll("once", "-c", str(config_file(tmp_path, emulator)),
                      env=emulator_env(emulator))
    assert result.returncode == cli.EX_OK, result.stderr
    assert emulator.stats()["confirmed"] == 16


def test_once_drain_max_events_stops_pulling_after_n(tmp_path: Path,
                                                     emulator: Emulator) -> None:
    """`--max-events 20` stops after the pull that reached 20: two pulls of 16, 32 events;
    the rest stays in VOD for the next run."""
    emulator.enqueue(generate_events(100, seed=3))
    result = procpoll("once", "--drain", "--max-events", "20",
                      "-c", str(config_file(tmp_path, emulator)), env=emulator_env(emulator))
    assert result.returncode == cli.EX_OK, result.stderr
    assert emulator.stats()["confirmed"] == 32
    assert emulator.stats()["pending"] == 68


def test_max_events_without_drain_is_a_usage_error(tmp_path: Path) -> None:
    """`--max-events` only bounds a drain: alone it is exit 64 before any work."""
    assert cli.main(["once", "--max-events", "5", "-c", str(tmp_path / "none.toml")]) \
        == cli.EX_USAGE


def test_once_drain_holds_no_more_than_max_in_flight(tmp_path: Path, emulator: Emulator,
                                                     receiver: Receiver) -> None:
    """While draining, `once` reserves room for each pull as the pull loop does: with
    max_in_flight = 16 and a slow receiver, at most 16 events are ever held, and all 80
    still arrive."""
    receiver.delay_s = 0.01
    emulator.enqueue(generate_events(80, seed=5))
    config: Config = daemon_config(tmp_path, emulator,
                                   [{"name": "hook", "type": "webhook", "url": receiver.url}],
                                   daemon={"max_in_flight": 16, "concurrency": 8})
    daemon = Daemon(config, environ=emulator_env(emulator))
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], daemon.dispatcher.in_flight)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert daemon.once(drain=True) == cli.EX_OK
    finally:
        done.set()
        sampler.join(5)
    assert 0 < peak[0] <= 16
    assert len(receiver.received()) == 80


def test_once_with_refused_credentials_exits_77_without_backing_off(
        tmp_path: Path, emulator: Emulator) -> None:
    """A refused key will not fix itself within a cron run: `once` exits 77 after the first
    PullEvents, not after two one-minute auth backoffs."""
    config = daemon_config(tmp_path, emulator, [{"name": "archive", "type": "file",
                                                 "path": str(tmp_path / "archive.jsonl")}])
    env = {**emulator_env(emulator), "TENCENTCLOUD_SECRET_KEY": "wrong-key"}
    started = time.monotonic()
    assert Daemon(config, environ=env).once(drain=True) == 77
    assert time.monotonic() - started < 10
    assert emulator.stats()["actions"]["PullEvents"]["calls"] == 1
