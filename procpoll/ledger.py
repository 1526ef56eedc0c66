"""The delivery memory: which sink already has which event, and how often each failed.

One SQLite file in WAL mode. A row per (event key, sink) holds the attempts, the
first-seen time and, once the sink has the event, `delivered_at` (or `dead_at`
once it went to the dead-letter directory). Outcomes of concurrent deliveries are
group-committed: each caller waits until its own rows are durable. Reads go through
other connections, taken from a pool without a lock, so a lookup never waits behind
a commit and its fsync, nor behind another lookup (WAL readers see every committed
transaction without blocking the writer).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from procpoll.errors import LedgerError

SCHEMA_VERSION = 1
# Rows per INSERT: a statement per row count stays prepared on the connection (its
# statement cache), so few row counts keep that memory small and bounded.
_ROWS_PER_INSERT = 16
# Reader connections: lookups give up the GIL while in SQLite, so a few overlap; each
# has its own page cache, so an unbounded pool (one per worker) grew RSS with the file.
_MAX_READERS = 4
_READER_CACHE_KIB = 256  # per reader; a lookup touches a few B-tree pages
_READER_WAIT_S = 5.0  # the writer's busy timeout: a reader is never held that long

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


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(slots=True)
class _Ticket:
    outcomes: list[Outcome]
    # Held until the ticket is done or made leader: a bare lock is far cheaper to wait
    # on and to release than an Event (a Condition written in Python).
    woken: threading.Lock = field(default_factory=_held_lock)
    done: bool = False
    lead: bool = False  # this caller commits the queued tickets (its own among them)
    error: BaseException | None = None


class Ledger:
    """Thread-safe delivery memory over one SQLite file: a writer and a reader connection."""

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
        self._lock = threading.Lock()  # the writer connection
        # Idle reader connections; up to _MAX_READERS are opened as lookups overlap.
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._pending: list[_Ticket] = []
        self._pending_lock = threading.Lock()
        self._committing = False

    def states(self, event_key: str) -> dict[str, SinkState]:
        """Per sink, what is known of this event."""
        reader = self._reader()
        try:
            rows = reader.execute(
                "SELECT sink, attempts, first_seen, delivered_at IS NOT NULL OR "
                "dead_at IS NOT NULL FROM deliveries WHERE event_key = ?",
                (event_key,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: read failed: {exc}") from exc
        finally:
            self._readers.put(reader)
        return {sink: SinkState(attempts, first, bool(done))
                for sink, attempts, first, done in rows}

    def _reader(self) -> sqlite3.Connection:
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            pass
        with self._readers_lock:
            if self._closed:
                raise LedgerError(f"{self.path}: read failed: the ledger is closed")
            if len(self._all_readers) < _MAX_READERS:
                try:
                    reader = sqlite3.connect(self.path, check_same_thread=False,
                                             isolation_level=None, timeout=5.0)
                    reader.execute(f"PRAGMA cache_size=-{_READER_CACHE_KIB}")
                except sqlite3.Error as exc:
                    raise LedgerError(f"{self.path}: read failed: {exc}") from exc
                self._all_readers.append(reader)
                return reader
        try:
            return self._readers.get(timeout=_READER_WAIT_S)
        except queue.Empty:
            raise LedgerError(f"{self.path}: read failed: no reader free") from None

    def record(self, outcomes: Iterable[Outcome]) -> None:
        """Durably record outcomes; returns once they are committed, raises LedgerError if not.

        Concurrent callers share one transaction (group commit): one caller, the leader,
        commits every ticket queued so far while the others wait on their own ticket;
        then the oldest ticket queued meanwhile leads the next commit. Waiting on a
        ticket rather than on the lock matters: releasing a lock wakes its waiters one
        at a time, each needing the GIL, which cost more than the commit itself.
        """
        ticket = _Ticket(list(outcomes))
        if not ticket.outcomes:
            return
        with self._pending_lock:
            self._pending.append(ticket)
            if not self._committing:
                self._committing = ticket.lead = True
        if not ticket.lead:
            ticket.woken.acquire()
        if not ticket.done:
            self._lead_commit()
        if ticket.error is not None:
            raise LedgerError(f"{self.path}: write failed: {ticket.error}") from ticket.error

    def _lead_commit(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        try:
            with self._lock:
                self._commit(batch)
        except Exception as exc:  # not sqlite's (_commit handles those): fail every ticket
            for ticket in batch:
                ticket.error, ticket.done = exc, True
            raise
        finally:
            with self._pending_lock:
                successor = self._pending[0] if self._pending else None
                if successor is not None:
                    successor.lead = True
                else:
                    self._committing = False
            for ticket in batch:  # each lock is held here: since creation, or by its waiter
                ticket.woken.release()
            if successor is not None:
                successor.woken.release()

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
            # Many rows per statement rather than executemany: each SQLite call gives up
            # the GIL and must win it back, and the whole batch waits while it does.
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start:start + _ROWS_PER_INSERT]
                self._db.execute(_upsert(len(chunk)), [v for row in chunk for v in row])
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
        with self._readers_lock:
            self._closed = True
            for reader in self._all_readers:
                reader.close()
        with self._lock:
            self._db.close()


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _upsert(rows: int) -> str:
    """The upsert of `rows` outcomes: attempts count up, delivered/dead keep their first time."""
    # Only placeholders are repeated into the text; every value is a bound parameter.
    return ("INSERT INTO deliveries (event_key, sink, first_seen, attempts, delivered_at, "  # noqa: S608
            "dead_at, last_error) VALUES " + ", ".join(["(?, ?, ?, 1, ?, ?, ?)"] * rows) +
            " ON CONFLICT (event_key, sink) DO UPDATE SET attempts = attempts + 1, "
            "delivered_at = coalesce(delivered_at, excluded.delivered_at), "
            "dead_at = coalesce(dead_at, excluded.dead_at), "
            "last_error = coalesce(excluded.last_error, last_error)")
