"""The delivery memory in PostgreSQL: one ledger shared by procpoll processes on several hosts.

Same rows and semantics as the SQLite ledger (procpoll.ledger): a row per (delivery id,
sink) in `procpoll_deliveries`, a row per accepted (event key, occurrence) in
`procpoll_confirmations`, the schema version in `procpoll_schema`. Time comes from the
database server's clock unless a clock is injected, so hosts whose clocks disagree still
agree on when a lease expires. Connections come from a pool that replaces broken ones, so
the same object works again once the server is back after a restart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from procpoll.errors import LedgerError
from procpoll.ledger import (
    ClaimRequest,
    ClaimResult,
    Confirmation,
    Outcome,
    SinkState,
    delivery_id,
    lookup_rows,
    sink_states,
)

SCHEMA_VERSION = 1
CONNECT_TIMEOUT_S = 5  # an unreachable server is reported, not waited on
POOL_TIMEOUT_S = 5.0  # longest wait for a pooled connection before LedgerError

Connection = psycopg.Connection[TupleRow]

# A server gone silent mid-call (host down, network cut) would otherwise hold the call for
# the kernel's TCP retry time (minutes): unacknowledged data fails after 15 s, an idle
# connection is probed after 10 s.
_DEAD_PEER_OPTIONS = {"tcp_user_timeout": 15_000, "keepalives": 1, "keepalives_idle": 10,
                      "keepalives_interval": 5, "keepalives_count": 3}

# A host that drops off the network mid-transaction leaves its session open on the server,
# holding its row and advisory locks, until TCP notices (hours by default): the server
# ends a session idle inside a transaction after 10 s (ours last milliseconds), and a
# statement waits at most 10 s for a lock before failing as LedgerError.
_SESSION_LIMITS = ("SET idle_in_transaction_session_timeout = '10s'",
                   "SET lock_timeout = '10s'", "SET statement_timeout = '30s'")

# Serializes schema creation between processes starting together (CREATE ... IF NOT
# EXISTS is not safe against a concurrent CREATE of the same name in PostgreSQL).
_SCHEMA_LOCK = "procpoll_schema"

# Same columns as the SQLite ledger; times are seconds since the epoch.
_TABLES = """
CREATE TABLE procpoll_deliveries (
    event_key     text NOT NULL,
    sink          text NOT NULL,
    first_seen    double precision NOT NULL,
    attempts      integer NOT NULL DEFAULT 0,
    delivered_at  double precision,
    dead_at       double precision,
    last_error    text,
    ordering_key  text,
    claim_owner   text,
    claim_expires double precision,
    updated_at    double precision,
    PRIMARY KEY (event_key, sink)
);
CREATE INDEX procpoll_deliveries_first_seen ON procpoll_deliveries (first_seen);
CREATE INDEX procpoll_deliveries_unresolved ON procpoll_deliveries (ordering_key, first_seen)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE TABLE procpoll_confirmations (
    event_key    text NOT NULL,
    occurrence   integer NOT NULL,
    confirmed_at double precision NOT NULL,
    PRIMARY KEY (event_key, occurrence)
);
CREATE INDEX procpoll_confirmations_confirmed_at ON procpoll_confirmations (confirmed_at);
"""

# In every statement below, %(now)s is the injected clock's reading, or NULL for the
# server's clock: coalesce(%(now)s, <server clock>).

# Same upsert as the SQLite ledger's: attempts count up, delivered/dead keep their first
# time, the claim is released. One row per statement: a batch may hold one (delivery,
# sink) twice, which a multi-row ON CONFLICT DO UPDATE refuses.
_UPSERT = """
INSERT INTO procpoll_deliveries AS d (event_key, sink, first_seen, attempts, delivered_at,
                                      dead_at, last_error, ordering_key, updated_at)
SELECT %(key)s, %(sink)s, t.now, 1, CASE WHEN %(delivered)s THEN t.now END,
       CASE WHEN %(dead)s THEN t.now END, %(error)s, %(ordering)s, t.now
FROM (SELECT coalesce(%(now)s::float8, extract(epoch from clock_timestamp())) AS now) AS t
ON CONFLICT (event_key, sink) DO UPDATE SET attempts = d.attempts + 1,
    delivered_at = coalesce(d.delivered_at, excluded.delivered_at),
    dead_at = coalesce(d.dead_at, excluded.dead_at),
    last_error = coalesce(excluded.last_error, d.last_error),
    ordering_key = coalesce(d.ordering_key, excluded.ordering_key),
    claim_owner = NULL, claim_expires = NULL, updated_at = excluded.updated_at
"""

# Every confirmation of a record in one statement (DO NOTHING, unlike DO UPDATE, takes one
# row twice in a statement).
_CONFIRM = """
INSERT INTO procpoll_confirmations (event_key, occurrence, confirmed_at)
SELECT k.key, k.occurrence, coalesce(%(now)s::float8, extract(epoch from clock_timestamp()))
FROM unnest(%(keys)s::text[], %(occurrences)s::integer[]) AS k (key, occurrence)
ON CONFLICT DO NOTHING
"""

# The confirmations of an event key (first column NULL), and the rows of one delivery id.
_LOOKUP = """
SELECT NULL::text, occurrence, NULL::float8, NULL::boolean, NULL::boolean
FROM procpoll_confirmations WHERE event_key = %(key)s
UNION ALL
SELECT sink, attempts, first_seen, delivered_at IS NOT NULL, dead_at IS NOT NULL
FROM procpoll_deliveries WHERE event_key = %(did)s
"""

_STATES = """
SELECT sink, attempts, first_seen, delivered_at IS NOT NULL, dead_at IS NOT NULL
FROM procpoll_deliveries WHERE event_key = %(did)s
"""

# The claim, run once the task's advisory lock is held: (blocker, sinks taken, now).
# The blocker is the earliest other event of the task still unresolved, active within
# hold_s, and first seen before this one (before now if this one is new); with one, nothing
# is taken. Otherwise each sink is taken unless it is done or another owner's lease is
# live: the row lock ON CONFLICT takes makes two concurrent claimers see each other's
# result. `t` is read once (a CTE with a volatile function is computed once).
_CLAIM = """
WITH t AS (SELECT coalesce(%(now)s::float8, extract(epoch from clock_timestamp())) AS now),
blocker AS (
    SELECT d.event_key FROM procpoll_deliveries AS d, t
    WHERE d.ordering_key = %(ordering)s AND d.event_key <> %(did)s
      AND d.delivered_at IS NULL AND d.dead_at IS NULL AND d.updated_at > t.now - %(hold_s)s
      AND d.first_seen < coalesce(
          (SELECT min(first_seen) FROM procpoll_deliveries WHERE event_key = %(did)s), t.now)
    ORDER BY d.first_seen LIMIT 1),
claimed AS (
    INSERT INTO procpoll_deliveries AS d (event_key, sink, first_seen, attempts, ordering_key,
                                          claim_owner, claim_expires, updated_at)
    SELECT %(did)s, s.sink, t.now, 0, %(ordering)s, %(owner)s, t.now + %(lease_s)s, t.now
    FROM unnest(%(sinks)s::text[]) AS s (sink), t
    WHERE NOT EXISTS (SELECT 1 FROM blocker)
    ON CONFLICT (event_key, sink) DO UPDATE SET claim_owner = excluded.claim_owner,
        claim_expires = excluded.claim_expires, updated_at = excluded.updated_at,
        ordering_key = coalesce(d.ordering_key, excluded.ordering_key)
    WHERE d.delivered_at IS NULL AND d.dead_at IS NULL
      AND (d.claim_owner IS NULL OR d.claim_owner = excluded.claim_owner
           OR d.claim_expires IS NULL OR d.claim_expires <= excluded.updated_at)
    RETURNING d.sink)
SELECT (SELECT event_key FROM blocker), ARRAY(SELECT sink FROM claimed), (SELECT now FROM t)
"""

_PRUNE_DELIVERIES = """
DELETE FROM procpoll_deliveries WHERE first_seen
    < coalesce(%(now)s::float8, extract(epoch from clock_timestamp())) - %(retention_s)s
"""

_PRUNE_CONFIRMATIONS = """
DELETE FROM procpoll_confirmations WHERE confirmed_at
    < coalesce(%(now)s::float8, extract(epoch from clock_timestamp())) - %(retention_s)s
"""

# Why sinks were not taken: (sink, done, owner, seconds left on the owner's lease).
_NOT_CLAIMED = """
SELECT sink, delivered_at IS NOT NULL OR dead_at IS NOT NULL, claim_owner,
       claim_expires - %(now)s
FROM procpoll_deliveries WHERE event_key = %(did)s AND sink = ANY(%(sinks)s)
"""


def split_url(url: str) -> tuple[str, str | None]:
    """The libpq conninfo of `url` without its `schema=` parameter, and that schema."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    rest = [(key, value) for key, value in query if key != "schema"]
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    return conninfo, (schemas[-1] or None) if schemas else None


def masked_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


class PostgresLedger:
    """Thread-safe delivery memory in a PostgreSQL database, shared by every consumer.

    `now`: an injected clock (tests); None uses the server's clock in each statement.
    """

    shared = True

    def __init__(self, url: str, *, retention_s: float, pool_size: int = 4,
                 now: Callable[[], float] | None = None,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self.name = masked_url(url)
        self.retention_s = retention_s
        self._now = now
        self._on_commit = on_commit
        conninfo, self._schema = split_url(url)
        options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "autocommit": True,
                                   **_DEAD_PEER_OPTIONS}
        try:
            with psycopg.connect(conninfo, **options) as conn:
                _create_schema(conn, self._schema, self.name)
            self._pool: ConnectionPool[Connection] = ConnectionPool(
                conninfo, min_size=pool_size, max_size=pool_size, kwargs=options,
                configure=self._configure, timeout=POOL_TIMEOUT_S, open=False,
                name="procpoll-ledger")
            self._pool.open(wait=True, timeout=POOL_TIMEOUT_S)
        except psycopg.Error as exc:
            raise LedgerError(f"{self.name}: cannot open the ledger: {_reason(exc)}") from exc

    def _configure(self, conn: Connection) -> None:
        """Each new pooled connection looks in the ledger's schema first, and bounds how
        long anything can wait on a consumer that died in the middle of a transaction."""
        if self._schema is not None:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self._schema)))
        for setting in _SESSION_LIMITS:
            conn.execute(setting)

    @contextlib.contextmanager
    def _connection(self, what: str) -> Iterator[Connection]:
        """A pooled connection; every database error leaves as LedgerError naming `what`."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                # The server may have restarted: drop the other idle connections that
                # died with it now, rather than failing one caller for each of them.
                with contextlib.suppress(psycopg.Error):
                    self._pool.check()
            raise LedgerError(f"{self.name}: {what} failed: {_reason(exc)}") from exc

    def _clock(self) -> float | None:
        return None if self._now is None else self._now()

    def states(self, event_key: str, occurrence: int = 0) -> dict[str, SinkState]:
        """Per sink, what is known of this occurrence of this event."""
        return self.lookup(event_key, occurrence - 1)[1]

    def lookup(self, event_key: str, after: int = -1) -> tuple[int, dict[str, SinkState]]:
        """The first occurrence above `after` whose confirmation is not recorded, and per
        sink what is known of it (see Ledger.lookup)."""
        with self._connection("read") as conn:
            # One query in the usual case (see lookup_rows).
            occurrence, rows = lookup_rows(conn.execute(_LOOKUP, {
                "key": event_key, "did": delivery_id(event_key, after + 1)}), after)
            if rows is None:
                rows = conn.execute(_STATES, {
                    "did": delivery_id(event_key, occurrence)}).fetchall()
        return occurrence, sink_states(rows)

    def claim(self, request: ClaimRequest) -> ClaimResult:
        """One transaction: the task's advisory lock, the ordering check, each sink's claim.

        The lock (held until commit) makes claimers of one task take turns, so two
        consumers cannot both pass the ordering check for two events of one task. Claims
        are not worth waiting for a WAL flush (synchronous_commit off for this transaction
        only): one lost in a server crash is taken over by whoever pulls the event next.
        """
        params: dict[str, Any] = {
            "did": request.delivery_id, "sinks": list(request.sinks),
            "ordering": request.ordering_key, "now": self._clock(), "hold_s": request.hold_s,
            "owner": request.owner, "lease_s": request.lease_s}
        # The claim is a statement of its own, so its snapshot is taken once the lock is
        # held and it sees what the previous holder committed.
        with self._connection("claim") as conn, conn.transaction():
            conn.execute("SELECT set_config('synchronous_commit', 'off', true) "
                         "FROM pg_advisory_xact_lock(hashtext(%(ordering)s))", params)
            row = conn.execute(_CLAIM, params).fetchone()
            assert row is not None  # noqa: S101 -- a SELECT without FROM returns one row
            blocker, claimed, params["now"] = row
            if blocker is not None:
                return ClaimResult(blocked_by=blocker)
            acquired = tuple(sink for sink in request.sinks if sink in claimed)
            if len(acquired) == len(request.sinks):
                return ClaimResult(acquired)
            # Each sink not taken is done, or held by another owner whose lease is live.
            params["sinks"] = [sink for sink in request.sinks if sink not in claimed]
            states: dict[str, tuple[bool, str, float]] = {
                sink: (finished, owner, left_s)
                for sink, finished, owner, left_s in conn.execute(_NOT_CLAIMED, params)}
        held: dict[str, tuple[str, float]] = {}
        done: list[str] = []
        for sink in params["sinks"]:
            state = states.get(sink)  # a row gone (pruned) is done too
            if state is None or state[0]:
                done.append(sink)
            else:
                held[sink] = state[1:]
        return ClaimResult(acquired, held, tuple(done))

    def ping(self) -> None:
        """Raise LedgerError unless the database answers."""
        with self._connection("read") as conn:
            conn.execute("SELECT 1").fetchone()

    def record_confirmed(self, confirmations: Iterable[Confirmation]) -> None:
        """Durably record handles that ConfirmEvents accepted."""
        self.record((), confirmations)

    def record(self, outcomes: Iterable[Outcome],
               confirmations: Iterable[Confirmation] = ()) -> None:
        """Durably record outcomes (releasing their claims) and confirmations in one
        transaction; returns once committed, raises LedgerError if not.

        The server groups the WAL flushes of concurrent commits itself, so concurrent
        callers each commit on their own pooled connection.
        """
        now = self._clock()
        rows = [{"key": o.event_key, "sink": o.sink, "delivered": o.delivered, "dead": o.dead,
                 "error": o.error, "ordering": o.ordering_key, "now": now} for o in outcomes]
        confirmed = list(confirmations)
        if not rows and not confirmed:
            return
        confirm = {"keys": [c.event_key for c in confirmed], "now": now,
                   "occurrences": [c.occurrence for c in confirmed]}
        with self._connection("write") as conn:
            started = time.monotonic()
            # One statement is atomic on its own: no BEGIN and COMMIT round trips.
            if len(rows) == 1 and not confirmed:
                conn.execute(_UPSERT, rows[0])
            elif not rows:
                conn.execute(_CONFIRM, confirm)
            else:
                with conn.transaction(), conn.cursor() as cursor:
                    if rows:
                        cursor.executemany(_UPSERT, rows)
                    if confirmed:
                        cursor.execute(_CONFIRM, confirm)
            elapsed_s = time.monotonic() - started
        if self._on_commit is not None:
            self._on_commit(elapsed_s)

    def prune(self) -> int:
        """Forget rows older than the retention; returns rows removed."""
        params = {"now": self._clock(), "retention_s": self.retention_s}
        with self._connection("prune") as conn, conn.transaction():
            removed = conn.execute(_PRUNE_DELIVERIES, params).rowcount
            removed += conn.execute(_PRUNE_CONFIRMATIONS, params).rowcount
        return removed

    def counts(self) -> dict[str, int]:
        """Rows delivered, dead and pending, for status output and tests."""
        with self._connection("read") as conn:
            row = conn.execute(
                "SELECT count(delivered_at), count(dead_at), "
                "count(*) - count(delivered_at) - count(dead_at) FROM procpoll_deliveries"
            ).fetchone()
        delivered, dead, failing = row if row is not None else (0, 0, 0)
        return {"delivered": delivered, "dead": dead, "failing": failing}

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()


def _create_schema(conn: Connection, schema: str | None, name: str) -> None:
    """Create (or check) the ledger's tables, in `schema` when one is named."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_SCHEMA_LOCK,))
        if schema is not None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(schema)))
            conn.execute("SELECT set_config('search_path', %s, true)",
                         (sql.Identifier(schema).as_string(conn),))
        conn.execute("CREATE TABLE IF NOT EXISTS procpoll_schema (version integer NOT NULL)")
        version = _first(conn.execute("SELECT max(version) FROM procpoll_schema").fetchone())
        if version is not None and version > SCHEMA_VERSION:
            raise LedgerError(f"{name}: schema version {version} is newer than this procpoll")
        if version is None:
            conn.execute(_TABLES)
            conn.execute("INSERT INTO procpoll_schema (version) VALUES (%s)", (SCHEMA_VERSION,))


def _first(row: TupleRow | None) -> Any:
    return None if row is None else row[0]


def _reason(exc: BaseException) -> str:
    """psycopg's message on one line (server errors carry a multi-line detail)."""
    return " ".join(str(exc).split()) or type(exc).__name__
