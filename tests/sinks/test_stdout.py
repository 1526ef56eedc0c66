"""The stdout sink: whole JSON lines on stdout beside the log, or on a FIFO or file `path`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from procpoll.errors import SinkError
from procpoll.sinks import build_sink
from procpoll.sinks.stdout import StdoutOptions, StdoutSink
from tests.sinks.conftest import config_problems, delivery, procedure_event, sink_config

REPO = Path(__file__).resolve().parents[2]

# Eight threads deliver events and eight log, all with lines longer than the stream buffers.
INTERLEAVE = r"""
import threading
import structlog
from procpoll import logs
from procpoll.sinks.stdout import StdoutOptions, StdoutSink
from tests.sinks.conftest import delivery, procedure_event

logs.configure("info", "json")
log = structlog.get_logger("test")
sink = StdoutSink("out", StdoutOptions())
events = [procedure_event(f"t{n}", FileName="e" * 20_000) for n in range(8)]

def deliver(n):
    for _ in range(50):
        sink.deliver(delivery(events[n]))

def chatter(n):
    for i in range(50):
        log.info("test.chatter", n=n, i=i, filler="l" * 20_000)

threads = [threading.Thread(target=f, args=(n,)) for n in range(8) for f in (deliver, chatter)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_events_and_log_lines_never_interleave() -> None:
    """With the JSON log on stdout too, every stdout line is one whole event or log object."""
    result = subprocess.run([sys.executable, "-c", INTERLEAVE], cwd=REPO, capture_output=True,
                            timeout=60, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    events = [x for x in lines if "EventType" in x]
    chatter = [x for x in lines if x.get("event") == "test.chatter"]
    assert (len(events), len(chatter), len(lines)) == (400, 400, 800)


def test_stdout_line_is_the_callback_body(capsys: pytest.CaptureFixture[str]) -> None:
    """On stdout each event is its normal-callback JSON followed by a newline."""
    event = procedure_event(FileName="动物世界")
    StdoutSink("out", StdoutOptions()).deliver(delivery(event))
    assert capsys.readouterr().out == event.callback_body().decode() + "\n"


def test_stdout_that_cannot_encode_utf8_gets_ascii_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """When stdout's encoding is not UTF-8 the line is \\u-escaped JSON of the same object."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", stream)
    event = procedure_event(FileName="动物世界")
    StdoutSink("out", StdoutOptions()).deliver(delivery(event))
    line = raw.getvalue()
    assert line.isascii()
    assert json.loads(line) == dict(event.raw)


def test_closed_stdout_is_a_sink_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stdout that cannot be written fails the delivery instead of crashing the worker."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    stream.close()
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(SinkError) as info:
        StdoutSink("out", StdoutOptions()).deliver(delivery(procedure_event()))
    assert info.value.reason.startswith("standard output: ")


def open_reader(path: Path) -> io.BufferedReader:
    """The read end of the FIFO, opened without waiting for a writer, then blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def test_fifo_path_gets_one_line_per_event(tmp_path: Path) -> None:
    """With a FIFO as `path`, a reader gets each event as one line, in order."""
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    events = [procedure_event(f"t{n}") for n in range(20)]
    sink = StdoutSink("out", StdoutOptions(str(fifo)))
    with open_reader(fifo) as reader:
        for event in events:
            sink.deliver(delivery(event))
        lines = [reader.readline() for _ in events]
    sink.close()
    assert lines == [e.callback_body() + b"\n" for e in events]


def test_fifo_without_a_reader_is_retryable(tmp_path: Path) -> None:
    """Nobody reading the FIFO is a retryable failure, not a blocked worker."""
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    with pytest.raises(SinkError) as info:
        StdoutSink("out", StdoutOptions(str(fifo))).deliver(delivery(procedure_event()))
    assert info.value.retryable
    assert info.value.reason == f"{fifo}: no process is reading the FIFO"


def test_stalled_reader_times_out_and_the_line_is_finished_first(tmp_path: Path) -> None:
    """A line cut by a timeout is completed before the next one, so the reader sees whole lines."""
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    big = procedure_event("big", FileName="b" * 300_000)
    small = procedure_event("small")
    sink = StdoutSink("out", StdoutOptions(str(fifo)))
    with open_reader(fifo) as stalled:  # open but not reading: the pipe fills up
        with pytest.raises(SinkError) as info:
            sink.deliver(delivery(big, timeout_s=0.3))
        assert info.value.retryable
        assert info.value.reason == f"{fifo}: timed out: the reader is not reading"
        received = bytearray()

        def read_until_eof() -> None:
            while chunk := stalled.read1():
                received.extend(chunk)

        reader = threading.Thread(target=read_until_eof)
        reader.start()
        sink.deliver(delivery(small))
        sink.close()  # EOF for the reader
        reader.join(10)
    assert received.splitlines(keepends=True) == \
        [big.callback_body() + b"\n", small.callback_body() + b"\n"]


class PausedReader:
    """A reader of the FIFO that does not read until `resume`, then reads to EOF."""

    def __init__(self, fifo: Path) -> None:
        self.received = bytearray()
        self._stream = open_reader(fifo)
        self._thread = threading.Thread(target=self._read_until_eof)

    def resume(self) -> None:
        """Start reading."""
        self._thread.start()

    def lines(self) -> list[bytes]:
        """Wait for EOF (the sink closed), then the lines read."""
        self._thread.join(10)
        self._stream.close()
        return self.received.splitlines(keepends=True)

    def _read_until_eof(self) -> None:
        while chunk := self._stream.read1():
            self.received.extend(chunk)


def test_retry_that_finishes_its_own_torn_line_does_not_write_it_again(tmp_path: Path) -> None:
    """A timed-out event's retry completes its torn line and stops: the reader sees it once."""
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    big = procedure_event("big", FileName="b" * 300_000)
    after = procedure_event("after")
    sink = StdoutSink("out", StdoutOptions(str(fifo)))
    reader = PausedReader(fifo)
    with pytest.raises(SinkError):
        sink.deliver(delivery(big, timeout_s=0.3))
    reader.resume()
    sink.deliver(delivery(big, attempt=2))
    sink.deliver(delivery(after))
    sink.close()
    assert reader.lines() == [big.callback_body() + b"\n", after.callback_body() + b"\n"]


def test_torn_line_finished_by_another_event_is_not_written_again(tmp_path: Path) -> None:
    """A line finished by the next event's delivery counts for its own event, not the next one.

    The next event's line is still written; the torn event's retry writes nothing more.
    """
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    torn = procedure_event("torn", FileName="t" * 300_000)
    other = procedure_event("other")
    sink = StdoutSink("out", StdoutOptions(str(fifo)))
    reader = PausedReader(fifo)
    with pytest.raises(SinkError):
        sink.deliver(delivery(torn, timeout_s=0.3))
    reader.resume()
    sink.deliver(delivery(other))
    sink.deliver(delivery(torn, attempt=2))
    sink.close()
    assert reader.lines() == [torn.callback_body() + b"\n", other.callback_body() + b"\n"]


def test_reader_gone_is_retryable_and_the_next_reader_works(tmp_path: Path) -> None:
    """When the reader closes the FIFO the delivery fails retryably; a new reader gets events."""
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    sink = StdoutSink("out", StdoutOptions(str(fifo)))
    with open_reader(fifo) as reader:
        sink.deliver(delivery(procedure_event("t0")))
        assert reader.readline() == procedure_event("t0").callback_body() + b"\n"
    with pytest.raises(SinkError) as info:
        sink.deliver(delivery(procedure_event("t1")))
    assert info.value.retryable
    assert info.value.reason == f"{fifo}: Broken pipe"
    with open_reader(fifo) as reader:
        sink.deliver(delivery(procedure_event("t1")))
        assert reader.readline() == procedure_event("t1").callback_body() + b"\n"
    sink.close()


def test_regular_file_path_is_appended(tmp_path: Path) -> None:
    """A regular file as `path` receives the lines appended after what it had."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"old":1}\n')
    sink = build_sink(sink_config("stdout", path=str(path)))
    sink.deliver(delivery(procedure_event()))
    sink.close()
    assert path.read_bytes() == b'{"old":1}\n' + procedure_event().callback_body() + b"\n"


def test_config_path_defaults_to_stdout() -> None:
    """`path` defaults to "-" (stdout); an empty path is a config problem."""
    assert sink_config("stdout").options == StdoutOptions("-")
    assert config_problems("stdout", path="") == \
        ['<test>: sinks[0].path: expected "-" (standard output) or a path such as a FIFO']
