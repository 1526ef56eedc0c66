"""`procpoll demo`: the emulator, a few hundred events, the daemon, and a summary of what happened.

Everything runs in this process: the emulator serves the VOD API on a free local port,
the daemon runs in a thread against it with a file sink and a sqlite sink writing
under the demo directory, and the main thread draws progress until the queue is empty.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from procpoll import logs
from procpoll.config import Config, parse_config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator, generate_events
from procpoll.systemd import Notifier

EX_OK = 0
EX_SOFTWARE = 70
EX_TEMPFAIL = 75

DEFAULT_EVENTS = 300
DEFAULT_SEED = 7
CONFIRM_WINDOW_S = 30.0
HOLD_S = 1.0
TICK_S = 0.2
LINE_EVERY_S = 1.0

EVENTS_FILE = "events.jsonl"
EVENTS_DB = "events.sqlite3"
LEDGER = "ledger.sqlite3"
LOG_FILE = "procpoll.log"
DEAD_LETTER = "dead-letter"

SAMPLE_QUERY = ("SELECT type, count(*) AS outputs, sum(status = 'FAIL') AS failed "
                "FROM procedure_outputs GROUP BY type ORDER BY type")


@dataclass(frozen=True, slots=True)
class Progress:
    """Where the run is: events pulled by the daemon, sink deliveries, events confirmed."""

    pulled: int
    delivered: int
    confirmed: int
    elapsed_s: float

    def line(self, total: int) -> str:
        """One status line."""
        rate = self.confirmed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"pulled {self.pulled}/{total}  delivered {self.delivered}  "
                f"confirmed {self.confirmed}/{total}  {rate:.0f} events/s")


class ProgressView:
    """Progress on a stream: one line redrawn with \\r on a terminal, a line a second otherwise."""

    def __init__(self, stream: TextIO, total: int) -> None:
        self._stream = stream
        self._total = total
        self._tty = stream.isatty()
        self._last_line_at: float | None = None
        self._width = 0

    def show(self, progress: Progress, *, final: bool = False) -> None:
        """Draw `progress`; `final` ends the redrawn line (or forces the last plain line)."""
        text = progress.line(self._total)
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width) + ("\n" if final else ""))
            self._width = len(text)
        elif final or self._last_line_at is None or \
                progress.elapsed_s - self._last_line_at >= LINE_EVERY_S:
            self._stream.write(text + "\n")
            self._last_line_at = progress.elapsed_s
        self._stream.flush()


def run_demo(directory: Path, events: int = DEFAULT_EVENTS, *, seed: int = DEFAULT_SEED,
             progress_stream: TextIO | None = None, out: TextIO | None = None,
             timeout_s: float = 120.0) -> int:
    """Run the whole demo; returns 0 when every event was confirmed, 75 on timeout."""
    err = sys.stderr if progress_stream is None else progress_stream
    out = sys.stdout if out is None else out
    directory.mkdir(parents=True, exist_ok=True)
    _reset(directory)
    emulator = Emulator(confirm_window_s=CONFIRM_WINDOW_S, hold_s=HOLD_S, seed=seed).start()
    log_stream = (directory / LOG_FILE).open("a", encoding="utf-8")
    try:
        total = emulator.enqueue(generate_events(events, seed))
        err.write(f"procpoll demo: emulator on http://{emulator.endpoint} with {total} events; "
                  f"daemon log in {directory / LOG_FILE}\n")
        logs.configure("info", "json", stream=log_stream)
        daemon = Daemon(_config(directory, emulator.endpoint),
                        environ={"TENCENTCLOUD_SECRET_ID": emulator.secret_id,
                                 "TENCENTCLOUD_SECRET_KEY": emulator.secret_key},
                        notifier=Notifier(None))
        outcome: dict[str, Any] = {}
        thread = threading.Thread(target=_run_daemon, args=(daemon, outcome),
                                  name="demo-daemon", daemon=True)
        started = time.monotonic()
        thread.start()
        view = ProgressView(err, total)

        def now(elapsed_s: float | None = None) -> Progress:
            return Progress(emulator.stats()["delivered"], daemon.dispatcher.counters["delivered"],
                            daemon.confirmer.confirmed,
                            time.monotonic() - started if elapsed_s is None else elapsed_s)

        drained = False
        while thread.is_alive() and time.monotonic() - started < timeout_s:
            if emulator.wait_drained(TICK_S):
                drained = True
                break
            view.show(now())
        elapsed_s = time.monotonic() - started
        daemon.stop()
        thread.join(30.0)
        # After the stop: the confirmer has counted the replies of its last calls.
        final = now(elapsed_s)
        view.show(final, final=True)
    finally:
        emulator.stop()
        # Late lines of the daemon's threads must neither hit a closed file nor the summary.
        logs.configure("info", "json", stream=sys.stderr)
        log_stream.close()
    if "error" in outcome:
        err.write(f"procpoll demo: the daemon crashed: {outcome['error']!r}; see "
                  f"{directory / LOG_FILE}\n")
        return EX_SOFTWARE
    if not drained:
        err.write(f"procpoll demo: not drained after {timeout_s:g} s; see "
                  f"{directory / LOG_FILE}\n")
        return EX_TEMPFAIL
    _summary(out, directory, final, daemon, emulator.stats())
    return EX_OK


def _run_daemon(daemon: Daemon, outcome: dict[str, Any]) -> None:
    try:
        outcome["status"] = daemon.run()
    except Exception as exc:  # noqa: BLE001 -- reported by the main thread, with the log
        outcome["error"] = exc


def _config(directory: Path, endpoint: str) -> Config:
    sinks = [{"name": "archive", "type": "file", "path": str(directory / EVENTS_FILE)},
             {"name": "db", "type": "sqlite", "path": str(directory / EVENTS_DB)}]
    return parse_config({
        "vod": {"endpoint": endpoint, "scheme": "http", "request_timeout": 10,
                "confirm_window": CONFIRM_WINDOW_S},
        "ledger": {"path": str(directory / LEDGER)},
        "dead_letter": {"directory": str(directory / DEAD_LETTER)},
        "sinks": sinks,
    }, "<demo>")


def _reset(directory: Path) -> None:
    """Remove what a previous run left, so the ledger does not treat new events as duplicates."""
    names = [EVENTS_FILE, LOG_FILE]
    for db in (LEDGER, EVENTS_DB):
        names += [db, f"{db}-wal", f"{db}-shm", f"{db}-journal"]
    for name in names:
        (directory / name).unlink(missing_ok=True)
    dead = directory / DEAD_LETTER
    if dead.is_dir():
        for item in dead.glob("*.json"):
            item.unlink()


def _summary(out: TextIO, directory: Path, final: Progress, daemon: Daemon,
             emulator_stats: dict[str, Any]) -> None:
    counters = daemon.dispatcher.counters
    rate = final.confirmed / final.elapsed_s if final.elapsed_s > 0 else 0.0
    shown = _shown(directory)
    sinks = len(daemon.dispatcher.routes)
    lines = [
        "",
        f"procpoll demo: {final.confirmed} events pulled, delivered to {sinks} sinks and "
        f"confirmed in {final.elapsed_s:.1f} s ({rate:.0f} events/s)",
        f"  sink deliveries {counters['delivered']}, duplicates suppressed "
        f"{counters['duplicates']}, redelivered by VOD {emulator_stats['redelivered']}, "
        f"dead-lettered {counters['dead']}",
        "",
        f"Output in {shown}/:",
        f"  {EVENTS_FILE:<16} one normal-callback JSON body per line (file sink 'archive')",
        f"  {EVENTS_DB:<16} tables procedure_tasks, procedure_outputs, events "
        "(sqlite sink 'db')",
        f"  {LEDGER:<16} the delivery memory: which sink has which event",
        f"  {LOG_FILE:<16} the daemon's JSON log: jq -c 'select(.event != \"event.delivered\")' "
        f"{shown}/{LOG_FILE}",
        "",
    ]
    lines.append(f"What VOD produced, and what failed: sqlite3 -header {shown}/{EVENTS_DB} "
                 f"\"{SAMPLE_QUERY}\"")
    lines += ["  " + row for row in _table(directory / EVENTS_DB, SAMPLE_QUERY)]
    lines += ["", "Next: config.example.toml, `procpoll check -c FILE`, `procpoll doctor -c FILE`."]
    out.write("\n".join(lines) + "\n")
    out.flush()


def _table(path: Path, query: str) -> list[str]:
    """The query's result as aligned text rows, header first."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cursor = db.execute(query)
        header = [d[0] for d in cursor.description]
        rows = [[_cell(v) for v in row] for row in cursor.fetchall()]
    finally:
        db.close()
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def _cell(value: object) -> str:
    return "NULL" if value is None else value if isinstance(value, str) else json.dumps(value)


def _shown(directory: Path) -> str:
    """The directory as the user would type it: relative to here when inside it."""
    try:
        relative = directory.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(directory)
    return f".{os.sep}{relative}" if str(relative) != "." else "."
