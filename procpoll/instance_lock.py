"""One daemon per ledger: an exclusive lock file beside the ledger, held for the process's life.

Two `procpoll run` on one ledger would split VOD's queue between them while each
believes it owns the delivery memory. `<ledger>.lock` is taken with flock(LOCK_EX |
LOCK_NB) before the daemon starts; the kernel drops it when the process ends, however it
ends (SIGKILL included), so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from procpoll.errors import LedgerError, ProcpollError

LOCK_SUFFIX = ".lock"


class InstanceLocked(ProcpollError):
    """Another live process holds the ledger's lock: exit 75 (EX_TEMPFAIL)."""

    def __init__(self, lock_path: Path, holder_pid: int | None) -> None:
        self.lock_path = lock_path
        self.holder_pid = holder_pid
        holder = f"PID {holder_pid}" if holder_pid else "a process whose PID is not written yet"
        super().__init__(f"{lock_path}: the ledger is in use by {holder}: two daemons on one "
                         "ledger would split VOD's queue between them; stop that one first")


@dataclass(frozen=True, slots=True)
class InstanceLock:
    """A held lock: the lock file and the descriptor whose open file carries the flock."""

    path: Path
    fd: int

    def release(self) -> None:
        """Let another process take the ledger (the daemon never calls this: exit does)."""
        os.close(self.fd)


def lock_path(ledger_path: Path) -> Path:
    """Where the lock for `ledger_path` lives: beside it, so every user of it finds it."""
    return ledger_path.with_name(ledger_path.name + LOCK_SUFFIX)


def acquire(ledger_path: Path) -> InstanceLock:
    """Lock the ledger for this process and write its PID in the lock file.

    Raises InstanceLocked if another process holds it, LedgerError if the lock file
    cannot be created. The descriptor is close-on-exec: sink commands do not inherit it,
    so one that outlives the daemon cannot keep the ledger locked.
    """
    path = lock_path(ledger_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot create the instance lock: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise InstanceLocked(path, holder) from None
    except OSError as exc:  # ENOLCK: a filesystem without locks (some NFS mounts)
        os.close(fd)
        raise LedgerError(f"{path}: cannot lock: {exc.strerror}") from None
    _write_pid(fd)
    return InstanceLock(path, fd)


def _write_pid(fd: int) -> None:
    # Write then cut: a reader between the two still finds a whole first line (new or old).
    text = f"{os.getpid()}\n".encode()
    # The PID only serves a second instance's message: a full disk must not stop the daemon.
    with contextlib.suppress(OSError):
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))


def _holder_pid(fd: int) -> int | None:
    try:
        first = os.pread(fd, 32, 0).split(b"\n", 1)[0]
        return int(first) if first.strip() else None
    except (OSError, ValueError):
        return None
