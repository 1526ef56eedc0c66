"""The file sink: whole lines, durable, and safe with several writing processes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from procpoll.errors import SinkError
from procpoll.sinks.file import FileOptions, FileSink
from tests.conftest import forced_preemption
from tests.sinks.conftest import delivery, procedure_event

# A second process appending events through its own FileSink, as a worker of
# `processes = N` does: argv = path, task id prefix, count.
_OTHER_PROCESS = """
import sys
from pathlib import Path
from procpoll.sinks.base import Delivery
from procpoll.sinks.file import FileOptions, FileSink
from tests.sinks.conftest import procedure_event
sink = FileSink("other", FileOptions(Path(sys.argv[1])))
for i in range(int(sys.argv[3])):
    sink.deliver(Delivery(procedure_event(f"{sys.argv[2]}-{i}"), None, 1, 10.0))
sink.close()
"""


def other_process(path: Path, prefix: str, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS, str(path), prefix, str(count)],
                            cwd=Path(__file__).resolve().parents[2])


def task_ids(path: Path) -> list[str]:
    """The TaskId of each line; a line that is not whole JSON fails the test."""
    return [json.loads(line)["ProcedureStateChangeEvent"]["TaskId"]
            for line in path.read_bytes().splitlines() if line]


def test_failed_write_cuts_only_its_own_line_not_another_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (a full disk at fsync) is undone by truncating the file to where
    its line began. Another process appending meanwhile must not lose its line: it waits
    for the file's lock, so the undo cuts nothing but the failed line."""
    path = tmp_path / "events.jsonl"
    sink = FileSink("archive", FileOptions(path))
    sink.deliver(delivery(procedure_event("first")))
    others: list[subprocess.Popen[bytes]] = []
    real_fsync = os.fsync

    def full_disk_while_another_process_appends(fd: int) -> None:
        other = other_process(path, "other", 1)
        others.append(other)
        # Without the lock the other process appends at once; with it, it waits for us.
        with contextlib.suppress(subprocess.TimeoutExpired):
            other.wait(timeout=2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("procpoll.sinks.file.os.fsync", full_disk_while_another_process_appends)
    with pytest.raises(SinkError, match="No space left"):
        sink.deliver(delivery(procedure_event("failed")))
    monkeypatch.setattr("procpoll.sinks.file.os.fsync", real_fsync)
    assert others[0].wait(timeout=30) == 0
    sink.close()
    assert task_ids(path) == ["first", "other-0"]


def test_lines_of_several_processes_and_threads_stay_whole(tmp_path: Path) -> None:
    """Two processes and eight threads under forced preemption append at once: every line
    is one whole event, none is missing, none is doubled."""
    path = tmp_path / "events.jsonl"
    sink = FileSink("archive", FileOptions(path, fsync=False))
    others = [other_process(path, f"p{n}", 150) for n in range(2)]

    def write(n: int) -> None:
        for i in range(40):
            sink.deliver(delivery(procedure_event(f"t{n}-{i}")))

    with forced_preemption():
        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert [other.wait(timeout=60) for other in others] == [0, 0]
    sink.close()
    expected = {f"t{n}-{i}" for n in range(8) for i in range(40)}
    expected |= {f"p{n}-{i}" for n in range(2) for i in range(150)}
    found = task_ids(path)
    assert len(found) == len(expected)
    assert set(found) == expected


def test_a_line_cut_by_a_crash_is_followed_by_a_fresh_line(tmp_path: Path) -> None:
    """A file whose last line a crashed writer cut short gets the next event on a line of
    its own, so that event stays readable."""
    path = tmp_path / "events.jsonl"
    whole = procedure_event("whole").callback_body() + b"\n"
    path.write_bytes(whole + b'{"EventType":"Procedu')
    sink = FileSink("archive", FileOptions(path))
    sink.deliver(delivery(procedure_event("after")))
    sink.close()
    lines = path.read_bytes().splitlines()
    assert lines[1] == b'{"EventType":"Procedu'
    assert json.loads(lines[2])["ProcedureStateChangeEvent"]["TaskId"] == "after"
