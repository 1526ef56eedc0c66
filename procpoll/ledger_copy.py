"""Copying one ledger's rows into another (SQLite → PostgreSQL when going highly available).

Every delivery and confirmation row younger than the retention is merged into the target
in batches, so moving to a shared ledger does not redeliver the events the old one
already has. The merge keeps, per (delivery id, sink), whatever says more: the earliest
first-seen, the most attempts, a delivered or dead time once either side has one. It is
idempotent: running it twice changes nothing the second time. Claims are not copied:
they belong to processes of the old ledger, which must be stopped first.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from procpoll.errors import ConfigError, LedgerError
from procpoll.ledger import Ledger
from procpoll.ledger_open import open_url

BATCH_ROWS = 1000

_DELIVERY_COLUMNS = ("event_key, sink, first_seen, attempts, delivered_at, dead_at, "
                     "last_error, ordering_key, updated_at")
_CONFIRMATION_COLUMNS = "event_key, occurrence, confirmed_at"

# Shared by both dialects: {t} is the target table. The WHERE leaves identical rows alone,
# so the count of rows written says what a run changed (nothing, the second time).
_MERGE = """
ON CONFLICT (event_key, sink) DO UPDATE SET
    first_seen = {least}({t}.first_seen, excluded.first_seen),
    attempts = {greatest}({t}.attempts, excluded.attempts),
    delivered_at = coalesce({t}.delivered_at, excluded.delivered_at),
    dead_at = coalesce({t}.dead_at, excluded.dead_at),
    last_error = coalesce({t}.last_error, excluded.last_error),
    ordering_key = coalesce({t}.ordering_key, excluded.ordering_key),
    updated_at = coalesce({greatest}({t}.updated_at, excluded.updated_at),
                          {t}.updated_at, excluded.updated_at)
WHERE excluded.first_seen < {t}.first_seen OR excluded.attempts > {t}.attempts
   OR ({t}.delivered_at IS NULL AND excluded.delivered_at IS NOT NULL)
   OR ({t}.dead_at IS NULL AND excluded.dead_at IS NOT NULL)
   OR ({t}.last_error IS NULL AND excluded.last_error IS NOT NULL)
   OR ({t}.ordering_key IS NULL AND excluded.ordering_key IS NOT NULL)
   OR ({t}.updated_at IS NULL AND excluded.updated_at IS NOT NULL)
   OR excluded.updated_at > {t}.updated_at
"""


class _RowStore(Protocol):
    """Raw access to one ledger's two tables, for copying."""

    def deliveries(self, since: float) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of delivery rows first seen at or after `since`, in key order."""

    def confirmations(self, since: float) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of confirmation rows confirmed at or after `since`, in key order."""

    def merge(self, deliveries: Sequence[tuple[Any, ...]],
              confirmations: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Merge rows in one transaction; returns (deliveries, confirmations) changed."""

    def close(self) -> None:
        """Release the connection."""


def copy_ledger(from_url: str, to_url: str, *, retention_s: float,
                batch_rows: int = BATCH_ROWS) -> dict[str, int]:
    """Merge every row of the ledger at `from_url` younger than `retention_s` into the
    ledger at `to_url` (created if new); returns rows read and rows changed per table.

    A URL is sqlite:///PATH (or a bare file path) or postgresql://...; raises LedgerError
    when either side cannot be read or written, ConfigError for an unusable URL.
    """
    since = time.time() - retention_s
    counts = {"deliveries": 0, "deliveries_written": 0,
              "confirmations": 0, "confirmations_written": 0}
    with contextlib.ExitStack() as stack:
        source = _open(from_url, retention_s, batch_rows)
        stack.callback(source.close)
        target = _open(to_url, retention_s, batch_rows)
        stack.callback(target.close)
        for rows in source.deliveries(since):
            counts["deliveries"] += len(rows)
            counts["deliveries_written"] += target.merge(rows, ())[0]
        for rows in source.confirmations(since):
            counts["confirmations"] += len(rows)
            counts["confirmations_written"] += target.merge((), rows)[1]
    return counts


def _open(url: str, retention_s: float, batch_rows: int) -> _RowStore:
    """The row store at `url`, its schema created or upgraded by opening it as a ledger."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() in ("postgresql", "postgres"):
        open_url(url, retention_s=retention_s, pool_size=1, source="copy").close()
        return _PostgresRows(url, batch_rows)
    if scheme.lower() == "sqlite" and rest:
        path = Path(rest)
    elif "://" not in url and url:
        path = Path(url)
    else:
        raise ConfigError(f"{url!r}: expected sqlite:///PATH, a file path or postgresql://...")
    Ledger(path, retention_s=retention_s).close()
    return _SqliteRows(path, batch_rows)


class _SqliteRows:
    """A SQLite ledger's tables through one connection of its own."""

    _UPSERT = (f"INSERT INTO deliveries ({_DELIVERY_COLUMNS}) "  # noqa: S608 -- constants only
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
               + _MERGE.format(t="deliveries", least="min", greatest="max"))

    def __init__(self, path: Path, batch_rows: int) -> None:
        self.path = path
        self._batch_rows = batch_rows
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: cannot open the ledger: {exc}") from exc

    def deliveries(self, since: float) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of delivery rows first seen at or after `since`."""
        return self._batches(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries "  # noqa: S608 -- constants only
            "WHERE first_seen >= ? AND (event_key, sink) > (?, ?) "
            "ORDER BY event_key, sink LIMIT ?", since, ("", ""))

    def confirmations(self, since: float) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of confirmation rows confirmed at or after `since`."""
        return self._batches(
            f"SELECT {_CONFIRMATION_COLUMNS} FROM confirmations "  # noqa: S608 -- constants
            "WHERE confirmed_at >= ? AND (event_key, occurrence) > (?, ?) "
            "ORDER BY event_key, occurrence LIMIT ?", since, ("", -1))

    def _batches(self, query: str, since: float,
                 after: tuple[Any, ...]) -> Iterator[list[tuple[Any, ...]]]:
        """Keyset pages: each batch starts after the last key of the one before."""
        while True:
            try:
                rows = self._db.execute(query, (since, *after, self._batch_rows)).fetchall()
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: read failed: {exc}") from exc
            if not rows:
                return
            yield rows
            after = tuple(rows[-1][:2])

    def merge(self, deliveries: Sequence[tuple[Any, ...]],
              confirmations: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Merge rows in one transaction; returns (deliveries, confirmations) changed."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                written = self._db.executemany(self._UPSERT, deliveries).rowcount
                confirmed = self._db.executemany(
                    "INSERT INTO confirmations (event_key, occurrence, confirmed_at) "
                    "VALUES (?, ?, ?) ON CONFLICT DO NOTHING", confirmations).rowcount
                self._db.execute("COMMIT")
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: write failed: {exc}") from exc
        return max(written, 0), max(confirmed, 0)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


class _PostgresRows:
    """A PostgreSQL ledger's tables through one connection of its own."""

    _UPSERT = (f"INSERT INTO procpoll_deliveries ({_DELIVERY_COLUMNS}) "  # noqa: S608
               "SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::int[], "
               "%s::float8[], %s::float8[], %s::text[], %s::text[], %s::float8[])"
               + _MERGE.format(t="procpoll_deliveries", least="least", greatest="greatest"))
    _CONFIRM = ("INSERT INTO procpoll_confirmations (event_key, occurrence, confirmed_at) "
                "SELECT * FROM unnest(%s::text[], %s::int[], %s::float8[]) "
                "ON CONFLICT DO NOTHING")

    def __init__(self, url: str, batch_rows: int) -> None:
        import psycopg  # noqa: PLC0415 -- optional dependency, present once open_url passed
        from psycopg import sql  # noqa: PLC0415

        from procpoll.ledger_pg import CONNECT_TIMEOUT_S, masked_url, split_url  # noqa: PLC0415

        self._error = psycopg.Error
        self.name = masked_url(url)
        self._batch_rows = batch_rows
        conninfo, schema = split_url(url)
        try:
            self._db = psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S)
            if schema is not None:
                self._db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            self._db.commit()
        except psycopg.Error as exc:
            raise LedgerError(f"{self.name}: cannot open the ledger: {exc}") from exc

    def deliveries(self, since: float) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of delivery rows first seen at or after `since`."""
        return self._batches(
            f"SELECT {_DELIVERY_COLUMNS} FROM procpoll_deliveries "  # noqa: S608 -- constants
            "WHERE first_seen >= %s AND (event_key, sink) > (%s, %s) "
            "ORDER BY event_key, sink LIMIT %s", since, ("", ""))

    def confirmations(self, since: float) -> Iterator[list[tuple[Any, ...]]]:
        """Batches of confirmation rows confirmed at or after `since`."""
        return self._batches(
            f"SELECT {_CONFIRMATION_COLUMNS} FROM procpoll_confirmations "  # noqa: S608
            "WHERE confirmed_at >= %s AND (event_key, occurrence) > (%s, %s) "
            "ORDER BY event_key, occurrence LIMIT %s", since, ("", -1))

    def _batches(self, query: str, since: float,
                 after: tuple[Any, ...]) -> Iterator[list[tuple[Any, ...]]]:
        while True:
            try:
                rows = self._db.execute(
                    query, (since, *after, self._batch_rows)).fetchall()
                self._db.commit()
            except self._error as exc:
                raise LedgerError(f"{self.name}: read failed: {exc}") from exc
            if not rows:
                return
            yield rows
            after = tuple(rows[-1][:2])

    def merge(self, deliveries: Sequence[tuple[Any, ...]],
              confirmations: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Merge rows in one transaction; returns (deliveries, confirmations) changed."""
        written = confirmed = 0
        try:
            with self._db.transaction():
                if deliveries:
                    written = self._db.execute(
                        self._UPSERT, [list(column) for column in zip(*deliveries, strict=True)]
                    ).rowcount
                if confirmations:
                    confirmed = self._db.execute(
                        self._CONFIRM,
                        [list(column) for column in zip(*confirmations, strict=True)]).rowcount
        except self._error as exc:
            raise LedgerError(f"{self.name}: write failed: {exc}") from exc
        return written, confirmed

    def close(self) -> None:
        """Close the connection."""
        self._db.close()
