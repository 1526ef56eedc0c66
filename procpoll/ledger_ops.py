"""`procpoll ledger show|stats`: what the ledger knows, read without disturbing the daemon."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TextIO

from procpoll.errors import LedgerError


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """The ledger opened read-only: no write, no schema change, no WAL checkpoint, so it is
    safe while the daemon runs (WAL readers never block its writer)."""
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot open the ledger read-only: {exc}") from exc
    with closing(db):
        try:
            yield db
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: read failed: {exc}") from exc


def show(path: Path, event_key: str) -> dict[str, Any]:
    """Per (delivery id, sink) row and per confirmation, everything known about an event.

    Rows of later occurrences (identical bodies, `KEY~n`) are included.
    """
    with read_only(path) as db:
        # substr, not LIKE: a key may hold "%" or "_", which LIKE would take as wildcards.
        rows = db.execute(
            "SELECT event_key, sink, attempts, delivered_at, dead_at, last_error, first_seen "
            "FROM deliveries WHERE event_key = ? OR substr(event_key, 1, ?) = ? "
            "ORDER BY length(event_key), event_key, sink",
            (event_key, len(event_key) + 1, f"{event_key}~")).fetchall()
        confirmed = db.execute(
            "SELECT occurrence, confirmed_at FROM confirmations WHERE event_key = ? "
            "ORDER BY occurrence", (event_key,)).fetchall()
    return {
        "event_key": event_key,
        "deliveries": [
            {"delivery_id": did, "sink": sink, "attempts": attempts,
             "delivered": delivered is not None, "dead": dead is not None,
             "state": _state(delivered, dead), "last_error": error,
             "first_seen": _iso(first), "delivered_at": _iso(delivered),
             "dead_at": _iso(dead)}
            for did, sink, attempts, delivered, dead, error, first in rows],
        "confirmations": [{"occurrence": occurrence, "confirmed_at": _iso(at)}
                          for occurrence, at in confirmed],
    }


def stats(path: Path) -> dict[str, Any]:
    """Row totals: delivered, dead, failing (neither yet), confirmations, the oldest row."""
    with read_only(path) as db:
        delivered, dead, failing, oldest = db.execute(
            "SELECT count(delivered_at), count(dead_at), "
            "count(*) - count(delivered_at) - count(dead_at), min(first_seen) "
            "FROM deliveries").fetchone()
        confirmations, oldest_confirmation = db.execute(
            "SELECT count(*), min(confirmed_at) FROM confirmations").fetchone()
    firsts = [t for t in (oldest, oldest_confirmation) if t is not None]
    return {"ledger": str(path), "delivered": delivered, "dead": dead, "failing": failing,
            "confirmations": confirmations, "oldest_row": _iso(min(firsts, default=None))}


def print_show(record: dict[str, Any], out: TextIO, *, as_json: bool) -> None:
    """The `ledger show` answer, as a table or as one JSON document."""
    if as_json:
        print(json.dumps(record, indent=2, ensure_ascii=False), file=out)
        return
    print(f"event {record['event_key']}", file=out)
    for row in record["deliveries"]:
        line = (f"  {row['delivery_id']}  sink={row['sink']}  {row['state']}  "
                f"attempts={row['attempts']}  first_seen={row['first_seen']}")
        if row["last_error"]:
            line += f"  last_error={row['last_error']!r}"
        print(line, file=out)
    if not record["deliveries"]:
        print("  no delivery rows", file=out)
    for row in record["confirmations"]:
        print(f"  confirmed occurrence {row['occurrence']} at {row['confirmed_at']}", file=out)
    if not record["confirmations"]:
        print("  no confirmation recorded", file=out)


def print_stats(totals: dict[str, Any], out: TextIO, *, as_json: bool) -> None:
    """The `ledger stats` answer, one `name: value` a line or as one JSON document."""
    if as_json:
        print(json.dumps(totals, indent=2), file=out)
        return
    for name, value in totals.items():
        print(f"{name}: {value if value is not None else '-'}", file=out)


def _state(delivered_at: float | None, dead_at: float | None) -> str:
    if delivered_at is not None:
        return "delivered"
    return "dead" if dead_at is not None else "failing"


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
