"""The delivery memory: which sink already has which event, and how often each failed.

One SQLite file in WAL mode. A row per (event key, sink) holds the attempts, the
first-seen time and, once the sink has the event, `delivered_at` (or `dead_at`
once it went to the dead-letter directory). Outcomes of concurrent deliveries are
group-committed: each caller waits until its own rows are durable.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from procpoll.errors import LedgerError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    event_key    TEXT NOT NULL,
    sink         TEXT NOT NULL,
    first_seen   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    delivered_at REAL,
    dead_at      REAL,
    last_error   TEXT,
    PRIMARY KEY (event_key, sink)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_first_seen ON deliveries (first_seen);
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery round of one event to one sink."""

    event_key: str
    sink: str
    delivered: bool
    dead: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SinkState:
    """What the ledger knows about one (event, sink)."""

    attempts: int
    first_seen: float
    done: bool


@dataclass(slots=True)
class _Ticket:
    outcomes: list[Outcome]
    done: bool = False
    error: BaseException | None = None


class Ledger:
    """Thread-safe delivery memory over one SQLite connection."""

    def __init__(self, path: Path, *, retention_s: float,
                 now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.retention_s = retention_s
        self._now = now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{path}: schema version {version} is newer than this procpoll")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"{path}: cannot open the ledger: {exc}") from exc
        self._lock = threading.Lock()
        self._pending: list[_Ticket] = []
        self._pending_lock = threading.Lock()

    def states(self, event_key: str) -> dict[str, SinkState]:
        """Per sink, what is known of this event."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT sink, attempts, first_seen, delivered_at IS NOT NULL OR "
                    "dead_at IS NOT NULL FROM deliveries WHERE event_key = ?",
                    (event_key,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: read failed: {exc}") from exc
        return {sink: SinkState(attempts, first, bool(done))
                for sink, attempts, first, done in rows}

    def record(self, outcomes: Iterable[Outcome]) -> None:
        """Durably record outcomes; returns once they are committed, raises LedgerError if not.

        Concurrent callers share one transaction (group commit).
        """
        ticket = _Ticket(list(outcomes))
        if not ticket.outcomes:
            return
        with self._pending_lock:
            self._pending.append(ticket)
        with self._lock:
            if not ticket.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._commit(batch)
        if ticket.error is not None:
            raise LedgerError(f"{self.path}: write failed: {ticket.error}") from ticket.error

    def _commit(self, batch: list[_Ticket]) -> None:
        now = self._now()
        rows = [
            (o.event_key, o.sink, now, now if o.delivered else None,
             now if o.dead else None, o.error)
            for t in batch for o in t.outcomes
        ]
        error: BaseException | None = None
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO deliveries (event_key, sink, first_seen, attempts, delivered_at, "
                "dead_at, last_error) VALUES (?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (event_key, sink) DO UPDATE SET attempts = attempts + 1, "
                "delivered_at = coalesce(delivered_at, excluded.delivered_at), "
                "dead_at = coalesce(dead_at, excluded.dead_at), "
                "last_error = coalesce(excluded.last_error, last_error)",
                rows,
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            error = exc
            with contextlib.suppress(sqlite3.Error):  # no transaction left to roll back
                self._db.execute("ROLLBACK")
        for ticket in batch:
            ticket.error = error
            ticket.done = True

    def prune(self) -> int:
        """Forget events first seen longer ago than the retention; returns rows removed."""
        cutoff = self._now() - self.retention_s
        with self._lock:
            try:
                cursor = self._db.execute("DELETE FROM deliveries WHERE first_seen < ?",
                                          (cutoff,))
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: prune failed: {exc}") from exc
        return cursor.rowcount

    def counts(self) -> dict[str, int]:
        """Rows delivered, dead and pending, for status output and tests."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(delivered_at), count(dead_at), "
                "count(*) - count(delivered_at) - count(dead_at) FROM deliveries"
            ).fetchone()
        return {"delivered": row[0], "dead": row[1], "failing": row[2]}

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            self._db.close()
