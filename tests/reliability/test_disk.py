"""Disk: ledger or dead-letter directory full or unwritable. Nothing is confirmed that could
not be recorded, the log says why, and the daemon recovers when the disk does."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import Config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator
from procpoll.events import event_key
from tests.conftest import Receiver, daemon_config, emulator_env, wait_for
from tests.reliability.harness import LedgerReader, emulator_sections, write_config
from tests.test_daemon import task_event

Logs = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs CAP_SYS_ADMIN); skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the disk tests without a mount still run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses with ENOSPC; returns it (unlink = space back)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def running(log_lines: Logs, run_daemon: Callable[[Config, dict[str, str]], Daemon],
            ) -> Callable[[Config, Emulator], Daemon]:
    """Daemon.run in a thread (log captured by log_lines); stopped before the disk goes."""
    return lambda config, emu: run_daemon(config, emulator_env(emu))


def named(log_lines: Logs, event: str) -> list[dict[str, Any]]:
    return [r for r in log_lines() if r["event"] == event]


@pytest.mark.timeout(90)
def test_full_ledger_disk_confirms_nothing_and_recovers(
        tmp_path: Path, small_disk: Path, emulator: Emulator, log_lines: Logs,
        running: Callable[[Config, Emulator], Daemon]) -> None:
    """With the ledger's filesystem full, delivered events are not confirmed (they come back),
    each failure is an error naming the cause; once space returns all are recorded and
    confirmed."""
    ledger_path = small_disk / "ledger.sqlite3"
    config = daemon_config(tmp_path, emulator, [
        {"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl")}],
        ledger={"path": str(ledger_path)})
    running(config, emulator)
    emulator.enqueue([task_event("t-ok")])
    assert emulator.wait_drained(10)
    filler = fill(small_disk)
    stuck = [task_event(f"t-full-{n}") for n in range(4)]
    emulator.enqueue(stuck)
    assert wait_for(lambda: emulator.stats()["redelivered"] >= len(stuck), 20), \
        "events were not left in VOD"
    assert emulator.stats()["confirmed"] == 1
    failures = named(log_lines, "ledger.write_failed")
    assert len(failures) >= len(stuck)
    assert all(r["level"] == "error" and "full" in r["error"] for r in failures)
    filler.unlink()
    # Failing deliveries made the pullers back off (up to 30 s): recovery comes after it.
    assert emulator.wait_drained(45)
    assert emulator.stats()["confirmed"] == 1 + len(stuck)
    reader = LedgerReader(ledger_path)
    try:
        assert {(event_key(b), "archive") for b in stuck} <= reader.done()
    finally:
        reader.close()


def _poison_and_junk(emulator: Emulator, receiver: Receiver) -> list[dict[str, Any]]:
    """One event the webhook always refuses and one that cannot be parsed."""
    receiver.status = lambda _body: 400
    bodies = [task_event("t-poison"),
              {"EventType": "ProcedureStateChanged", "ProcedureStateChangeEvent": "junk"}]
    emulator.enqueue(bodies)
    return bodies


def _dead_letter_case(tmp_path: Path, dead: Path, emulator: Emulator, receiver: Receiver,
                      log_lines: Logs, running: Callable[[Config, Emulator], Daemon],
                      break_it: Callable[[], Callable[[], None]]) -> None:
    config = daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url, "max_attempts": 1}],
        dead_letter={"directory": str(dead)})
    repair = break_it()
    running(config, emulator)
    _poison_and_junk(emulator, receiver)
    assert wait_for(lambda: len(named(log_lines, "deadletter.write_failed")) >= 4, 20)
    assert emulator.stats()["confirmed"] == 0, "confirmed what could not be set aside"
    assert all(r["level"] == "error" and r["error"] for r in
               named(log_lines, "deadletter.write_failed"))
    if dead.is_dir():  # a failed write leaves no cut file holding space the ledger may need
        assert list(dead.glob(".*.tmp")) == []
    repair()
    assert emulator.wait_drained(45)
    assert emulator.stats()["confirmed"] == 2
    written = sorted(p.name for p in dead.iterdir())
    assert len(written) == 2 and all(not name.startswith(".") for name in written), written
    records = [json.loads(p.read_text(encoding="utf-8")) for p in dead.iterdir()]
    assert {r.get("sink") for r in records} == {"hook", None}


@pytest.mark.timeout(90)
def test_full_dead_letter_disk_confirms_nothing_and_recovers(
        tmp_path: Path, small_disk: Path, emulator: Emulator, receiver: Receiver,
        log_lines: Logs, running: Callable[[Config, Emulator], Daemon]) -> None:
    """Dead-letter directory on a full filesystem: the poison event and the unparseable one
    stay in VOD (errors logged); once space returns both are set aside and confirmed."""
    dead = small_disk / "dead"

    def break_it() -> Callable[[], None]:
        dead.mkdir()
        return fill(small_disk).unlink

    _dead_letter_case(tmp_path, dead, emulator, receiver, log_lines, running, break_it)


@pytest.mark.timeout(90)
def test_unwritable_dead_letter_directory_confirms_nothing_and_recovers(
        tmp_path: Path, emulator: Emulator, receiver: Receiver, log_lines: Logs,
        running: Callable[[Config, Emulator], Daemon]) -> None:
    """The dead-letter path is taken by a file (no mount needed, works as root): same
    guarantee; removing the file lets the daemon create the directory and recover."""
    dead = tmp_path / "dead"

    def break_it() -> Callable[[], None]:
        dead.write_text("not a directory\n", encoding="utf-8")
        return dead.unlink

    _dead_letter_case(tmp_path, dead, emulator, receiver, log_lines, running, break_it)


def test_unusable_ledger_at_start_exits_73_before_pulling(
        tmp_path: Path, emulator: Emulator) -> None:
    """A ledger path that cannot be a database: `procpoll run` says so and exits 73
    (EX_CANTCREAT) without pulling a single event."""
    ledger = tmp_path / "ledger.sqlite3"
    ledger.mkdir()
    emulator.enqueue([task_event("t-never")])
    config = write_config(tmp_path / "c.toml", emulator_sections(emulator, tmp_path), [
        {"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl")}])
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **emulator_env(emulator)}
    done = subprocess.run([sys.executable, "-m", "procpoll", "run", "-c", str(config)],
                          env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 73
    assert f"ledger: {ledger}" in done.stderr and "cannot open the ledger" in done.stderr
    assert "PullEvents" not in emulator.stats()["actions"]
