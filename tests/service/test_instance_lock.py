"""One daemon per ledger: a second `run` or `once` on a locked ledger exits 75 naming the
holder; the lock goes with the holder's process, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from procpoll import cli
from procpoll.emulator import Emulator
from procpoll.errors import LedgerError
from procpoll.instance_lock import InstanceLocked, acquire, lock_path
from tests.conftest import emulator_env, wait_for

# A process that takes the lock, says so, then waits for its stdin to close.
HOLDER = """
import subprocess, sys
from pathlib import Path
from procpoll.instance_lock import acquire
acquire(Path(sys.argv[1]))
if sys.argv[2:] == ["with-child"]:
    # Like a command sink's program: started while the lock is held, outliving its parent.
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             close_fds=False)
    print(child.pid, flush=True)
print("held", flush=True)
sys.stdin.read()
"""


def procpoll(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "procpoll", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False)


def write_config(tmp_path: Path, emu: Emulator) -> Path:
    path = tmp_path / "procpoll.toml"
    path.write_text(f"""
[vod]
endpoint = "{emu.endpoint}"
scheme = "http"
request_timeout = 6
confirm_window = 3
[ledger]
path = "{tmp_path / 'ledger.sqlite3'}"
[daemon]
confirm_margin = 0.5
shutdown_grace = 5
[[sinks]]
name = "archive"
type = "file"
path = "{tmp_path / 'archive.jsonl'}"
""", encoding="utf-8")
    return path


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the lock of tmp_path/ledger.sqlite3 until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ledger.sqlite3")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_second_run_on_one_ledger_exits_75_naming_the_first(tmp_path: Path,
                                                            emulator: Emulator) -> None:
    """While `procpoll run` holds the ledger, another `run` and a `once` exit 75 at once,
    naming its PID; after it stops, `once` runs."""
    config = write_config(tmp_path, emulator)
    env = {**os.environ, **emulator_env(emulator)}
    env.pop("JOURNAL_STREAM", None)
    lock = lock_path(tmp_path / "ledger.sqlite3")
    with (tmp_path / "first.out").open("wb") as out:
        first = subprocess.Popen([sys.executable, "-m", "procpoll", "run", "-c", str(config)],
                                 env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: lock.exists() and lock.read_text() == f"{first.pid}\n", 30)
        for command in ("run", "once"):
            second = procpoll(command, "-c", str(config), env=env)
            assert second.returncode == cli.EX_TEMPFAIL, second.stderr
            assert second.stderr == (f"procpoll: {lock}: the ledger is in use by PID "
                                     f"{first.pid}: two daemons on one ledger would split "
                                     "VOD's queue between them; stop that one first\n")
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == cli.EX_OK
    finally:
        first.kill()
        first.wait(10)
    assert procpoll("once", "-c", str(config), env=env).returncode == cli.EX_OK


def test_lock_names_the_holding_process(tmp_path: Path,
                                        holder: subprocess.Popen[str]) -> None:
    """The refusal carries the PID written by the holder."""
    with pytest.raises(InstanceLocked) as refused:
        acquire(tmp_path / "ledger.sqlite3")
    assert refused.value.holder_pid == holder.pid


def test_lock_is_free_once_the_holder_is_killed(tmp_path: Path,
                                                holder: subprocess.Popen[str]) -> None:
    """SIGKILL leaves the lock file behind but not the lock: a restart is never blocked."""
    holder.kill()
    holder.wait(10)
    assert lock_path(tmp_path / "ledger.sqlite3").exists()
    acquire(tmp_path / "ledger.sqlite3").release()


def test_a_child_that_outlives_the_holder_does_not_keep_the_lock(tmp_path: Path) -> None:
    """The lock's descriptor is close-on-exec: a program the daemon started (a command
    sink's) that is still running after the daemon died does not block the next daemon."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ledger.sqlite3"),
                             "with-child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    child_pid = int(proc.stdout.readline())
    try:
        assert proc.stdout.readline() == "held\n"
        proc.kill()
        proc.communicate(timeout=10)
        os.kill(child_pid, 0)  # still alive
        acquire(tmp_path / "ledger.sqlite3").release()
    finally:
        os.kill(child_pid, signal.SIGKILL)


def test_lock_in_one_process_refuses_a_second_taker(tmp_path: Path) -> None:
    """flock locks belong to the open file: even this process cannot take it twice; after
    release it can."""
    held = acquire(tmp_path / "ledger.sqlite3")
    try:
        with pytest.raises(InstanceLocked) as refused:
            acquire(tmp_path / "ledger.sqlite3")
        assert refused.value.holder_pid == os.getpid()
    finally:
        held.release()
    acquire(tmp_path / "ledger.sqlite3").release()


def test_lock_beside_an_impossible_ledger_path_is_a_ledger_error(tmp_path: Path) -> None:
    """A ledger directory that is a file: LedgerError (exit 73), naming the lock path."""
    (tmp_path / "state").write_text("", encoding="utf-8")
    with pytest.raises(LedgerError, match=r"state/ledger.sqlite3.lock: cannot create"):
        acquire(tmp_path / "state" / "ledger.sqlite3")
