"""`procpoll demo`: the newcomer's first command, end to end in a real process."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from procpoll.demo import Progress, ProgressView

REPO = Path(__file__).resolve().parents[2]


def demo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m procpoll demo` in `cwd` as a newcomer would (no TTY)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY", "NOTIFY_SOCKET"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "procpoll", "demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=50, check=False)


def test_demo_delivers_every_event_and_prints_a_summary(tmp_path: Path) -> None:
    """60 events: all in the file and sqlite sinks, confirmed, and a summary with a sample query."""
    result = demo(tmp_path, "--dir", "out", "--events", "60")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    lines = (out / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60
    assert all("EventHandle" not in json.loads(text) for text in lines)
    db = sqlite3.connect(out / "events.sqlite3")
    try:
        stored = db.execute("SELECT (SELECT count(*) FROM procedure_tasks) + "
                            "(SELECT count(*) FROM events)").fetchone()[0]
    finally:
        db.close()
    assert 0 < stored <= 60
    assert "procpoll demo: 60 events pulled, delivered to 2 sinks and confirmed" in result.stdout
    assert "./out/events.sqlite3" in result.stdout
    assert "SELECT type, count(*) AS outputs" in result.stdout
    assert "Transcode" in result.stdout
    assert "confirmed 60/60" in result.stderr
    assert (out / "procpoll.log").stat().st_size > 0
    assert '"event"' not in result.stdout + result.stderr, "daemon logs must go to the log file"


def test_demo_run_again_starts_fresh(tmp_path: Path) -> None:
    """A second run replaces the first one's output instead of seeing its events as duplicates."""
    assert demo(tmp_path, "--dir", "out", "--events", "20").returncode == 0
    second = demo(tmp_path, "--dir", "out", "--events", "20")
    assert second.returncode == 0, second.stderr
    lines = (tmp_path / "out" / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20
    assert "duplicates suppressed 0" in second.stdout


class FakeTerminal(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal() -> None:
    """On a TTY each update rewrites the line with \\r; the final one ends it."""
    stream = FakeTerminal()
    view = ProgressView(stream, total=10)
    view.show(Progress(5, 5, 2, 0.5))
    view.show(Progress(10, 20, 10, 1.0), final=True)
    text = stream.getvalue()
    assert text.count("\r") == 2
    assert text.endswith("confirmed 10/10  10 events/s\n")
    assert text.count("\n") == 1


def test_progress_prints_a_line_a_second_when_not_a_terminal() -> None:
    """Piped to a file, progress is plain lines at most once a second, plus the final one."""
    stream = io.StringIO()
    view = ProgressView(stream, total=10)
    for tenth in range(1, 25):
        view.show(Progress(tenth, tenth, tenth // 3, tenth / 10))
    view.show(Progress(10, 20, 10, 2.5), final=True)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 4
    assert lines[-1].startswith("pulled 10/10")
