"""The delivery memory: which sink already has which event, and how often each failed.

One SQLite file in WAL mode. A row per (delivery id, sink) holds the attempts, the
first-seen time and, once the sink has the event, `delivered_at` (or `dead_at`
once it went to the dead-letter directory). The delivery id is the event key for
the first occurrence of a notification and `key~n` for the n-th identical one: a
row in `confirmations` per (event key, occurrence) that ConfirmEvents accepted
tells a redelivery (same occurrence, not yet confirmed) from a new notification
with a byte-identical body (the next occurrence). Outcomes of concurrent deliveries are
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from procpoll.errors import LedgerError

SCHEMA_VERSION = 2
# Rows per INSERT: a statement per row count stays prepared on the connection (its
# statement cache), so few row counts keep that memory small and bounded.
_ROWS_PER_INSERT = 16
# Reader connections: lookups give up the GIL while in SQLite, so a few overlap; each
# has its own page cache, so an unbounded pool (one per worker) grew RSS with the file.
_MAX_READERS = 4
_READER_CACHE_KIB = 256  # per reader; a lookup touches a few B-tree pages
_READER_WAIT_S = 5.0  # the writer's busy timeout: a reader is never held that long

# `event_key` holds the delivery id. Claims and the ordering key serve several consumers
# sharing one ledger: `claim_owner` delivers until `claim_expires`; a row not done and
# active (`updated_at`) blocks later events of its `ordering_key` in every consumer.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    event_key     TEXT NOT NULL,
    sink          TEXT NOT NULL,
    first_seen    REAL NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    delivered_at  REAL,
    dead_at       REAL,
    last_error    TEXT,
    ordering_key  TEXT,
    claim_owner   TEXT,
    claim_expires REAL,
    updated_at    REAL,
    PRIMARY KEY (event_key, sink)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_first_seen ON deliveries (first_seen);
CREATE INDEX IF NOT EXISTS deliveries_unresolved ON deliveries (ordering_key)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE TABLE IF NOT EXISTS confirmations (
    event_key    TEXT NOT NULL,
    occurrence   INTEGER NOT NULL,
    confirmed_at REAL NOT NULL,
    PRIMARY KEY (event_key, occurrence)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS confirmations_confirmed_at ON confirmations (confirmed_at);
"""


# A key's confirmations (first column NULL), then the rows of one delivery id.
_LOOKUP = """
SELECT NULL, occurrence, NULL, NULL, NULL FROM confirmations WHERE event_key = ?
UNION ALL
SELECT sink, attempts, first_seen, delivered_at IS NOT NULL, dead_at IS NOT NULL
FROM deliveries WHERE event_key = ?
"""
_STATES = """
SELECT sink, attempts, first_seen, delivered_at IS NOT NULL, dead_at IS NOT NULL
FROM deliveries WHERE event_key = ?
"""


# Columns schema 1 lacked; added in place when a version-1 ledger is opened.
_V1_TO_V2 = ("ordering_key TEXT", "claim_owner TEXT", "claim_expires REAL", "updated_at REAL")


def delivery_id(event_key: str, occurrence: int) -> str:
    """The ledger's name for one occurrence of a notification (the key itself for the first)."""
    return event_key if occurrence == 0 else f"{event_key}~{occurrence}"


def next_occurrence(confirmed: Iterable[int], after: int = -1) -> int:
    """The first occurrence number above `after` that ConfirmEvents has not accepted yet."""
    taken = set(confirmed)
    occurrence = after + 1
    while occurrence in taken:
        occurrence += 1
    return occurrence


StateRow = tuple[str, int, float, bool, bool]  # sink, attempts, first_seen, delivered, dead


def lookup_rows(rows: Iterable[tuple[Any, ...]], after: int
                ) -> tuple[int, list[StateRow] | None]:
    """Read one lookup query: the key's confirmations (rows whose first column is NULL)
    and the deliveries of occurrence `after + 1`. Returns the occurrence a new handle
    stands for, and its rows, or None when that is another occurrence, to be read apart.
    """
    rows = list(rows)
    occurrence = next_occurrence((row[1] for row in rows if row[0] is None), after)
    if occurrence != after + 1:
        return occurrence, None
    return occurrence, [row for row in rows if row[0] is not None]


def sink_states(rows: Iterable[StateRow]) -> dict[str, SinkState]:
    """Per sink, the state of the given delivery rows."""
    return {sink: SinkState(attempts, first, bool(delivered), bool(dead))
            for sink, attempts, first, delivered, dead in rows}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery round of one event to one sink (`event_key` is the
    delivery id: see delivery_id)."""

    event_key: str
    sink: str
    delivered: bool
    dead: bool = False
    error: str | None = None
    ordering_key: str | None = None


@dataclass(frozen=True, slots=True)
class SinkState:
    """What the ledger knows about one (event, sink)."""

    attempts: int
    first_seen: float
    delivered: bool
    dead: bool

    @property
    def done(self) -> bool:
        """Nothing more to do for this sink: it has the event, or it was set aside."""
        return self.delivered or self.dead


@dataclass(frozen=True, slots=True)
class Confirmation:
    """ConfirmEvents accepted the handle of this occurrence of this notification."""

    event_key: str
    occurrence: int


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Ask to deliver one occurrence (`delivery_id`) to `sinks`, as `owner`, for `lease_s`.

    `hold_s`: how long a failed event of the same `ordering_key` keeps blocking its
    task's later events without any activity (it is redelivered well within that).
    """

    delivery_id: str
    sinks: tuple[str, ...]
    owner: str
    lease_s: float
    ordering_key: str
    hold_s: float


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What a claim got: sinks now ours, sinks another live owner holds (owner, seconds
    left), sinks already done, or the earlier unresolved event that blocks the task."""

    acquired: tuple[str, ...] = ()
    held: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    done: tuple[str, ...] = ()
    blocked_by: str | None = None


class DeliveryLedger(Protocol):
    """The delivery memory the dispatcher and confirmer need; SQLite or PostgreSQL.

    `shared` says whether other processes may deliver from the same ledger: then the
    dispatcher claims each (occurrence, sink) before delivering it.
    """

    name: str
    shared: bool

    def lookup(self, event_key: str, after: int = -1) -> tuple[int, dict[str, SinkState]]:
        """The occurrence a pulled handle stands for, and what each sink has of it."""

    def states(self, event_key: str, occurrence: int = 0) -> dict[str, SinkState]:
        """Per sink, what is known of this occurrence."""

    def claim(self, request: ClaimRequest) -> ClaimResult:
        """Atomically take the unclaimed (or expired) sinks of an occurrence."""

    def record(self, outcomes: Iterable[Outcome],
               confirmations: Iterable[Confirmation] = ()) -> None:
        """Durably record outcomes (releasing their claims) and accepted confirmations."""

    def record_confirmed(self, confirmations: Iterable[Confirmation]) -> None:
        """Durably record handles ConfirmEvents accepted."""

    def ping(self) -> None:
        """Raise LedgerError unless the ledger answers a trivial query."""

    def prune(self) -> int:
        """Forget rows older than the retention; returns rows removed."""

    def counts(self) -> dict[str, int]:
        """Rows delivered, dead and failing."""

    def close(self) -> None:
        """Release connections."""


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(slots=True)
class _Ticket:
    outcomes: list[Outcome]
    confirmations: list[Confirmation]
    # Held until the ticket is done or made leader: a bare lock is far cheaper to wait
    # on and to release than an Event (a Condition written in Python).
    woken: threading.Lock = field(default_factory=_held_lock)
    done: bool = False
    error: BaseException | None = None


class Ledger:
    """Thread-safe delivery memory over one SQLite file: a writer and reader connections.

    `shared`: several processes of one supervisor use the file (they claim deliveries).
    """

    def __init__(self, path: Path, *, retention_s: float,
                 now: Callable[[], float] = time.time,
                 on_commit: Callable[[float], None] | None = None,
                 shared: bool = False) -> None:
        self.path = path
        self.name = str(path)
        self.shared = shared
        self.retention_s = retention_s
        self._now = now
        self._on_commit = on_commit
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                       timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{path}: schema version {version} is newer than this procpoll")
            if version == 1:
                for column in _V1_TO_V2:
                    self._db.execute(f"ALTER TABLE deliveries ADD COLUMN {column}")
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

    def states(self, event_key: str, occurrence: int = 0) -> dict[str, SinkState]:
        """Per sink, what is known of this occurrence of this event."""
        return self.lookup(event_key, occurrence - 1)[1]

    def lookup(self, event_key: str, after: int = -1) -> tuple[int, dict[str, SinkState]]:
        """The occurrence a newly pulled handle stands for, and per sink what is known of it.

        That is the first occurrence above `after` (an earlier identical notification still
        in memory) whose confirmation is not recorded: an unconfirmed one comes back from
        VOD as a redelivery, a confirmed one can only come back as a new notification.
        """
        reader = self._reader()
        try:
            # One query in the usual case (see lookup_rows).
            occurrence, rows = lookup_rows(reader.execute(
                _LOOKUP, (event_key, delivery_id(event_key, after + 1))), after)
            if rows is None:
                rows = reader.execute(_STATES, (delivery_id(event_key, occurrence),)).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: read failed: {exc}") from exc
        finally:
            self._readers.put(reader)
        return occurrence, sink_states(rows)

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

    def claim(self, request: ClaimRequest) -> ClaimResult:
        """One IMMEDIATE transaction: the ordering check, then each sink's claim.

        Claims are not worth an fsync: one lost in a power cut is taken over by whoever
        pulls the event next, which is the crash window the outcomes already have.
        """
        now = self._now()
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = _claim(self._db, request, now)
                    self._db.execute("COMMIT")
                finally:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: claim failed: {exc}") from exc
        return result

    def ping(self) -> None:
        """Raise LedgerError unless a reader answers."""
        reader = self._reader()
        try:
            reader.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: read failed: {exc}") from exc
        finally:
            self._readers.put(reader)

    def record_confirmed(self, confirmations: Iterable[Confirmation]) -> None:
        """Durably record handles that ConfirmEvents accepted (group-committed like record)."""
        self.record((), confirmations)

    def record(self, outcomes: Iterable[Outcome],
               confirmations: Iterable[Confirmation] = ()) -> None:
        """Durably record outcomes; returns once they are committed, raises LedgerError if not.

        Concurrent callers share one transaction (group commit): one caller, the leader,
        commits every ticket queued so far while the others wait on their own ticket;
        then the oldest ticket queued meanwhile leads the next commit. Waiting on a
        ticket rather than on the lock matters: releasing a lock wakes its waiters one
        at a time, each needing the GIL, which cost more than the commit itself.
        """
        ticket = _Ticket(list(outcomes), list(confirmations))
        if not ticket.outcomes and not ticket.confirmations:
            return
        with self._pending_lock:
            self._pending.append(ticket)
            # Decided under the lock and kept in a local: the previous leader may make this
            # ticket its successor (and release its lock) as soon as the lock is let go.
            lead = not self._committing
            self._committing = True
        if not lead:
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
                if successor is None:
                    self._committing = False
            for ticket in batch:  # each lock is held here: since creation, or by its waiter
                ticket.woken.release()
            if successor is not None:
                successor.woken.release()

    def _commit(self, batch: list[_Ticket]) -> None:
        now = self._now()
        rows = [
            (o.event_key, o.sink, now, now if o.delivered else None,
             now if o.dead else None, o.error, o.ordering_key, now)
            for t in batch for o in t.outcomes
        ]
        confirmed = [(c.event_key, c.occurrence, now) for t in batch for c in t.confirmations]
        error: BaseException | None = None
        started = time.monotonic()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            # Many rows per statement rather than executemany: each SQLite call gives up
            # the GIL and must win it back, and the whole batch waits while it does.
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start:start + _ROWS_PER_INSERT]
                self._db.execute(_upsert(len(chunk)), [v for row in chunk for v in row])
            for start in range(0, len(confirmed), _ROWS_PER_INSERT):
                part = confirmed[start:start + _ROWS_PER_INSERT]
                self._db.execute(_confirm_insert(len(part)), [v for row in part for v in row])
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            error = exc
            with contextlib.suppress(sqlite3.Error):  # no transaction left to roll back
                self._db.execute("ROLLBACK")
        if self._on_commit is not None and error is None:
            self._on_commit(time.monotonic() - started)
        for ticket in batch:
            ticket.error = error
            ticket.done = True

    def prune(self) -> int:
        """Forget events first seen longer ago than the retention; returns rows removed."""
        cutoff = self._now() - self.retention_s
        with self._lock:
            try:
                removed = self._db.execute("DELETE FROM deliveries WHERE first_seen < ?",
                                           (cutoff,)).rowcount
                removed += self._db.execute("DELETE FROM confirmations WHERE confirmed_at < ?",
                                            (cutoff,)).rowcount
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: prune failed: {exc}") from exc
        return removed

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
            "dead_at, last_error, ordering_key, updated_at) VALUES "
            + ", ".join(["(?, ?, ?, 1, ?, ?, ?, ?, ?)"] * rows) +
            " ON CONFLICT (event_key, sink) DO UPDATE SET attempts = attempts + 1, "
            "delivered_at = coalesce(delivered_at, excluded.delivered_at), "
            "dead_at = coalesce(dead_at, excluded.dead_at), "
            "last_error = coalesce(excluded.last_error, last_error), "
            "ordering_key = coalesce(ordering_key, excluded.ordering_key), "
            "claim_owner = NULL, claim_expires = NULL, updated_at = excluded.updated_at")


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _confirm_insert(rows: int) -> str:
    """The insert of `rows` confirmations; a repeated one keeps its first time."""
    return ("INSERT INTO confirmations (event_key, occurrence, confirmed_at) VALUES "  # noqa: S608
            + ", ".join(["(?, ?, ?)"] * rows) + " ON CONFLICT DO NOTHING")


def _claim(db: sqlite3.Connection, request: ClaimRequest, now: float) -> ClaimResult:
    """The claim's statements, inside the caller's transaction."""
    did = request.delivery_id
    mine = db.execute("SELECT min(first_seen) FROM deliveries WHERE event_key = ?",
                      (did,)).fetchone()[0]
    blocker = db.execute(
        "SELECT event_key FROM deliveries WHERE ordering_key = ? AND event_key <> ? "
        "AND delivered_at IS NULL AND dead_at IS NULL AND updated_at > ? "
        "AND first_seen < ? ORDER BY first_seen LIMIT 1",
        (request.ordering_key, did, now - request.hold_s, now if mine is None else mine),
    ).fetchone()
    if blocker is not None:
        return ClaimResult(blocked_by=blocker[0])
    acquired: list[str] = []
    held: dict[str, tuple[str, float]] = {}
    done: list[str] = []
    expires = now + request.lease_s
    for sink in request.sinks:
        row = db.execute(
            "SELECT delivered_at IS NOT NULL OR dead_at IS NOT NULL, claim_owner, claim_expires "
            "FROM deliveries WHERE event_key = ? AND sink = ?", (did, sink)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO deliveries (event_key, sink, first_seen, attempts, ordering_key, "
                "claim_owner, claim_expires, updated_at) VALUES (?, ?, ?, 0, ?, ?, ?, ?)",
                (did, sink, now, request.ordering_key, request.owner, expires, now))
            acquired.append(sink)
        elif row[0]:
            done.append(sink)
        elif row[1] not in (None, request.owner) and row[2] is not None and row[2] > now:
            held[sink] = (row[1], row[2] - now)
        else:
            db.execute(
                "UPDATE deliveries SET claim_owner = ?, claim_expires = ?, updated_at = ?, "
                "ordering_key = coalesce(ordering_key, ?) WHERE event_key = ? AND sink = ?",
                (request.owner, expires, now, request.ordering_key, did, sink))
            acquired.append(sink)
    return ClaimResult(tuple(acquired), held, tuple(done))
