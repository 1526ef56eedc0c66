"""The stdout sink: one normal-callback JSON per line, for piping into other tools.

On stdout ("-") event lines share the stream with the JSON log and take the log's own
write lock, so a line is never cut by a log line; a `path` (a FIFO, /dev/stderr, a file)
keeps them apart.

A write to `path` that times out part-way leaves a torn line in the stream. The next
delivery finishes it first, so the reader only ever sees whole lines; once finished it
is a whole copy of its event, which therefore counts as delivered and is not written again.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import select
import sys
import threading
import time
from dataclasses import dataclass

from procpoll.errors import SinkError
from procpoll.events import Event
from procpoll.logs import LineWriter
from procpoll.schema import Table
from procpoll.sinks.base import Delivery, Sink, SinkConfig, SinkType

STDOUT = "-"


@dataclass(frozen=True, slots=True)
class StdoutOptions:
    """[[sinks]] keys of type "stdout"."""

    path: str = STDOUT


def parse_options(t: Table) -> StdoutOptions:
    """Read the stdout sink's own key: `path` ("-" = standard output)."""
    path = t.text("path", STDOUT)
    if not path:
        t.bad("path", 'expected "-" (standard output) or a path such as a FIFO')
    return StdoutOptions(path=path or STDOUT)


def _stdout_text(event: Event, encoding: str | None) -> str:
    """The line's text; escaped to ASCII JSON if stdout cannot encode all of UTF-8."""
    try:
        utf8 = codecs.lookup(encoding or "utf-8").name == "utf-8"
    except LookupError:
        utf8 = False
    if utf8:
        return event.callback_body().decode()
    return json.dumps(event.raw, ensure_ascii=True, separators=(",", ":"))


class StdoutSink:
    """Writes each event as one whole line, to stdout or to `path`."""

    def __init__(self, name: str, options: StdoutOptions) -> None:
        self.name = name
        self._path = options.path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._torn = b""  # the unwritten rest of the last line, when its write timed out
        self._torn_key: str | None = None  # the event key of that line
        # The key of a torn line that the next event's delivery finished: that event's
        # retry is then already delivered. One slot: the retry comes soon, if at all.
        self._finished_key: str | None = None

    def deliver(self, delivery: Delivery) -> None:
        """Write the event's line; return once it is handed to the stream."""
        if self._path == STDOUT:
            self._to_stdout(delivery.event)
        else:
            deadline = time.monotonic() + delivery.timeout_s
            event = delivery.event
            self._to_path(event.key, event.callback_body() + b"\n", deadline)

    def _to_stdout(self, event: Event) -> None:
        stream = sys.stdout
        if stream is None:
            raise SinkError("there is no standard output", retryable=False)
        text = _stdout_text(event, getattr(stream, "encoding", None))
        try:
            # The JSON log's writer, under its lock: a log line and an event line never
            # interleave.
            LineWriter(stream).msg(text)
        except (OSError, ValueError) as exc:
            raise SinkError(f"standard output: {exc}") from None

    def _to_path(self, key: str, line: bytes, deadline: float) -> None:
        with self._lock:
            if key == self._finished_key:
                self._finished_key = None
                return  # its torn line was finished by the delivery after it
            fd = self._open()
            try:
                if self._torn:
                    self._torn = self._write(fd, self._torn, deadline)
                    if self._torn:
                        raise SinkError(f"{self._path}: timed out finishing the last line")
                    if self._torn_key == key:
                        return  # this event's own line, now whole: writing it again duplicates
                    self._finished_key = self._torn_key
                torn = self._write(fd, line, deadline)
            except OSError as exc:
                # EPIPE: the reader went away. The next one starts on a fresh line.
                self._close_fd()
                raise SinkError(f"{self._path}: {exc.strerror or exc}") from None
            if torn:
                if len(torn) < len(line):
                    self._torn, self._torn_key = torn, key
                raise SinkError(f"{self._path}: timed out: the reader is not reading")

    def _open(self) -> int:
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                self._fd = os.open(self._path, flags, 0o640)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    raise SinkError(f"{self._path}: no process is reading the FIFO") from None
                raise SinkError(f"{self._path}: {exc.strerror or exc}") from None
            self._torn = b""
        return self._fd

    @staticmethod
    def _write(fd: int, data: bytes, deadline: float) -> bytes:
        """Write `data` before `deadline`; return what could not be written."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                    return bytes(view)
        return b""

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            self._torn = b""

    def close(self) -> None:
        """Close `path` if it was opened; stdout stays open."""
        with self._lock:
            self._close_fd()


def build(config: SinkConfig) -> Sink:
    """Build a StdoutSink from its config."""
    assert isinstance(config.options, StdoutOptions)  # noqa: S101 -- the registry guarantees it
    return StdoutSink(config.name, config.options)


TYPE = SinkType(parse_options=parse_options, build=build)
