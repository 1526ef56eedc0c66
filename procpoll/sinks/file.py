"""The file sink: one normal-callback JSON object per line, fsync'd before it counts.

Each line is written under an exclusive flock of the file, so the processes of one service
(`[daemon] processes = N`) append whole lines one after the other, and a failed write's
undo (a truncate to where its line began) cannot cut a line another process appended.
"""

from __future__ import annotations

import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from procpoll.errors import SinkError
from procpoll.schema import Table
from procpoll.sinks.base import Delivery, Sink, SinkConfig, SinkType


@dataclass(frozen=True, slots=True)
class FileOptions:
    """[[sinks]] keys of type "file"."""

    path: Path
    fsync: bool = True


def parse_options(t: Table) -> FileOptions:
    """Read the file sink's own keys."""
    return FileOptions(path=t.file_path("path", Path("events.jsonl")), fsync=t.flag("fsync", True))


_PATH_LOCKS: dict[str, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _path_lock(path: Path) -> threading.Lock:
    """One lock per file for the whole process: a sink replaced by a reload may still be
    writing while its successor starts, and the undo of one must not cut the other's line."""
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(str(path.absolute()), threading.Lock())


class FileSink:
    """Appends events to a JSON-lines file, opened once, shared by all workers."""

    def __init__(self, name: str, options: FileOptions) -> None:
        self.name = name
        self._options = options
        self._lock = _path_lock(options.path)
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._options.path.parent.mkdir(parents=True, exist_ok=True)
            # Read access too: the cut-line check reads the last byte (EBADF otherwise).
            self._fd = os.open(self._options.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def deliver(self, delivery: Delivery) -> None:
        """Append the event's line and make it durable."""
        line = delivery.event.callback_body() + b"\n"
        with self._lock:
            start = None
            locked = False
            try:
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
                start = os.fstat(fd).st_size
                if start and os.pread(fd, 1, start - 1) != b"\n":
                    # A crash (of this or another process) cut the last line short: start
                    # on a fresh line; the cut one stays, as a line no reader can parse.
                    os.write(fd, b"\n")
                    start += 1
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                if self._options.fsync:
                    os.fsync(fd)
            except OSError as exc:
                self._undo(start)
                raise SinkError(f"{self._options.path}: {exc.strerror or exc}") from exc
            finally:
                if locked and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _undo(self, start: int | None) -> None:
        """Cut a half-written line (disk full) so a retry does not leave junk behind."""
        if self._fd is not None and start is not None:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._close_fd()


def build(config: SinkConfig) -> Sink:
    """Build a FileSink from its config."""
    assert isinstance(config.options, FileOptions)  # noqa: S101 -- the registry guarantees it
    return FileSink(config.name, config.options)


TYPE = SinkType(parse_options=parse_options, build=build)
