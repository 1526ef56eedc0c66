"""Auth: a wrong key backs off to about a call a minute, logs an error per attempt, and the
daemon recovers as soon as the key is fixed (file rewritten, or SIGHUP)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tenacity import RetryCallState, Retrying

from procpoll import daemon as daemon_module
from procpoll.config import Config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator
from procpoll.errors import AuthError, TransientApiError
from tests.conftest import daemon_config, wait_for
from tests.reliability.harness import DaemonProcess, emulator_sections, write_config
from tests.test_daemon import task_event


def wrong_key(emu: Emulator) -> str:
    """A wrong key of the right length, so that the fix can be written in place."""
    return emu.secret_key[::-1]


def auth_failures(emu: Emulator) -> int:
    return sum(n for code, n in emu.stats()["error_codes"].items()
               if code.startswith("AuthFailure"))


def pull_calls(emu: Emulator) -> int:
    return int(emu.stats()["actions"].get("PullEvents", {}).get("calls", 0))


def key_files(tmp_path: Path, emu: Emulator, key: str) -> dict[str, str]:
    """[credentials] pointing at files holding the emulator's id and `key`."""
    (tmp_path / "secret-id").write_text(emu.secret_id + "\n", encoding="utf-8")
    (tmp_path / "secret-key").write_text(key + "\n", encoding="utf-8")
    return {"secret_id_file": str(tmp_path / "secret-id"),
            "secret_key_file": str(tmp_path / "secret-key")}


def test_auth_backoff_is_about_a_minute() -> None:
    """The production backoff after AuthFailure is 60 s ± 10 %; other errors back off less."""
    assert daemon_module.AUTH_BACKOFF_S == 60.0
    for exc, low, high in ((AuthError("AuthFailure.SignatureFailure", "m"), 54.0, 66.0),
                           (TransientApiError("InternalError", "m"), 0.0, 1.0)):
        state = RetryCallState(Retrying(), None, (), {})
        state.set_exception((type(exc), exc, None))
        waits = [daemon_module._pull_wait(state) for _ in range(200)]
        assert low <= min(waits) and max(waits) <= high


@pytest.fixture
def in_thread(log_lines: Callable[[], list[dict[str, Any]]]) -> Iterator[
        Callable[[Config], Daemon]]:
    """Daemon.run in a thread with no environment credentials; stopped at teardown."""
    started: list[tuple[Daemon, threading.Thread]] = []

    def start(config: Config) -> Daemon:
        daemon = Daemon(config, environ={"HOME": "/nonexistent"})
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        started.append((daemon, thread))
        return daemon

    yield start
    for daemon, thread in started:
        daemon.stop()
        thread.join(20)
        assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_wrong_key_backs_off_logs_each_attempt_and_recovers_when_the_file_changes(
        tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch,
        log_lines: Callable[[], list[dict[str, Any]]],
        in_thread: Callable[[Config], Daemon]) -> None:
    """Backoff scaled to 1 s: about one call per second, one api.auth_failed error per
    attempt, the key never logged; a rewritten key file is picked up without SIGHUP."""
    monkeypatch.setattr(daemon_module, "AUTH_BACKOFF_S", 1.0)
    emulator.enqueue([task_event("t-auth")])
    config = daemon_config(tmp_path, emulator, [
        {"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl")}],
        credentials=key_files(tmp_path, emulator, wrong_key(emulator)), daemon={"pullers": 1})
    in_thread(config)
    assert wait_for(lambda: auth_failures(emulator) >= 4, 15)
    failures = [r for r in log_lines() if r["event"] == "api.auth_failed"]
    assert abs(len(failures) - auth_failures(emulator)) <= 1
    assert all(r["level"] == "error" and 0.9 <= r["wait_s"] <= 1.1 for r in failures)
    assert pull_calls(emulator) <= auth_failures(emulator) + 1, "a call without backoff"
    (tmp_path / "secret-key").write_text(emulator.secret_key + "\n", encoding="utf-8")
    assert emulator.wait_drained(10)
    assert wrong_key(emulator) not in (tmp_path / "test.log").read_text(encoding="utf-8")


@pytest.mark.timeout(60)
def test_a_key_file_missing_mid_rotation_is_waited_out_not_a_crash(
        tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch,
        log_lines: Callable[[], list[dict[str, Any]]],
        in_thread: Callable[[Config], Daemon]) -> None:
    """The key file deleted (rotation by rm + write): auth errors with backoff, pull loops
    alive, and the events flow again once the file is back."""
    monkeypatch.setattr(daemon_module, "AUTH_BACKOFF_S", 1.0)
    config = daemon_config(tmp_path, emulator, [
        {"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl")}],
        credentials=key_files(tmp_path, emulator, emulator.secret_key))
    daemon = in_thread(config)
    emulator.enqueue([task_event("t-before")])
    assert emulator.wait_drained(10)
    (tmp_path / "secret-key").unlink()
    assert wait_for(lambda: sum(r["event"] == "api.auth_failed" and
                                r.get("code") == "CredentialsUnavailable"
                                for r in log_lines()) >= 2, 15)
    emulator.enqueue([task_event("t-during")])
    (tmp_path / "secret-key").write_text(emulator.secret_key, encoding="utf-8")
    assert emulator.wait_drained(10)
    assert all(t.is_alive() for t in daemon._pullers)
    assert [r for r in log_lines() if r["event"].endswith(".crashed")] == []


def _start_with_wrong_key(tmp_path: Path, emu: Emulator) -> DaemonProcess:
    """A daemon subprocess (production backoff) whose key file holds a wrong key."""
    config = write_config(tmp_path / "auth.toml", emulator_sections(
        emu, tmp_path, credentials=key_files(tmp_path, emu, wrong_key(emu)),
        daemon={"pullers": 1}), [
        {"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl")}])
    return DaemonProcess(config, tmp_path, {}).start()


@pytest.mark.timeout(60)
def test_production_backoff_ends_as_soon_as_the_key_file_is_fixed(
        tmp_path: Path, emulator: Emulator) -> None:
    """With the real 60 s backoff: one failed call, no second one, then the fixed file is
    used within seconds, not at the end of the minute."""
    emulator.enqueue([task_event("t-prod")])
    daemon = _start_with_wrong_key(tmp_path, emulator)
    try:
        assert wait_for(lambda: daemon.events("api.auth_failed"), 15)
        assert not wait_for(lambda: pull_calls(emulator) > 1, 3), "no backoff"
        (tmp_path / "secret-key").write_text(emulator.secret_key + "\n", encoding="utf-8")
        assert emulator.wait_drained(8), "waited out the backoff instead"
        assert len(daemon.events("api.auth_failed")) == 1
        assert daemon.terminate() == 0
    finally:
        daemon.stop()


@pytest.mark.timeout(60)
def test_sighup_rereads_a_key_file_changed_in_place(tmp_path: Path, emulator: Emulator) -> None:
    """A key fixed in place with the file's mtime kept (no change visible) is used once
    SIGHUP arrives, within seconds, during the 60 s backoff."""
    emulator.enqueue([task_event("t-hup")])
    daemon = _start_with_wrong_key(tmp_path, emulator)
    try:
        assert wait_for(lambda: daemon.events("api.auth_failed"), 15)
        key_file = tmp_path / "secret-key"
        before = key_file.stat()
        with key_file.open("r+", encoding="utf-8") as f:
            f.write(emulator.secret_key)
        os.utime(key_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert not wait_for(lambda: emulator.stats()["confirmed"], 3), "saw an invisible change"
        daemon.send(signal.SIGHUP)
        assert emulator.wait_drained(8)
        assert daemon.events("config.reloaded")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
