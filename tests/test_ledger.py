"""The ledger: durable per-(event, sink) memory, group commits, pruning, schema version."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from procpoll.errors import LedgerError
from procpoll.ledger import SCHEMA_VERSION, Ledger, Outcome


def test_delivered_sink_is_remembered_across_reopen(tmp_path: Path) -> None:
    """A recorded delivery survives closing and reopening the file."""
    ledger = Ledger(tmp_path / "l.db", retention_s=3600)
    ledger.record([Outcome("k1", "hook", delivered=True)])
    ledger.close()
    states = Ledger(tmp_path / "l.db", retention_s=3600).states("k1")
    assert states["hook"].done
    assert states["hook"].attempts == 1


def test_failures_count_attempts_and_keep_first_seen(tmp_path: Path) -> None:
    """Each failed round adds an attempt; a later success marks the row done."""
    now = [1000.0]
    ledger = Ledger(tmp_path / "l.db", retention_s=3600, now=lambda: now[0])
    ledger.record([Outcome("k", "s", delivered=False, error="HTTP 500")])
    now[0] = 1100.0
    ledger.record([Outcome("k", "s", delivered=False, error="HTTP 502")])
    state = ledger.states("k")["s"]
    assert (state.attempts, state.first_seen, state.done) == (2, 1000.0, False)
    ledger.record([Outcome("k", "s", delivered=True)])
    assert ledger.states("k")["s"].done


def test_dead_counts_as_done(tmp_path: Path) -> None:
    """A dead-lettered (event, sink) is not delivered again."""
    ledger = Ledger(tmp_path / "l.db", retention_s=3600)
    ledger.record([Outcome("k", "s", delivered=False, dead=True, error="x")])
    assert ledger.states("k")["s"].done
    assert ledger.counts() == {"delivered": 0, "dead": 1, "failing": 0}


def test_concurrent_records_all_land(tmp_path: Path) -> None:
    """Many threads recording at once: every outcome is committed (group commit loses none)."""
    ledger = Ledger(tmp_path / "l.db", retention_s=3600)

    def work(n: int) -> None:
        for i in range(50):
            ledger.record([Outcome(f"k{n}-{i}", "s", delivered=True)])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.counts()["delivered"] == 400


def test_prune_forgets_rows_older_than_retention(tmp_path: Path) -> None:
    """Rows first seen before now - retention are removed, newer ones kept."""
    now = [0.0]
    ledger = Ledger(tmp_path / "l.db", retention_s=100, now=lambda: now[0])
    ledger.record([Outcome("old", "s", delivered=True)])
    now[0] = 150.0
    ledger.record([Outcome("new", "s", delivered=True)])
    assert ledger.prune() == 1
    assert ledger.states("old") == {}
    assert ledger.states("new")["s"].done


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A ledger written by a newer procpoll is not silently reused."""
    path = tmp_path / "l.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer"):
        Ledger(path, retention_s=100)


def test_unopenable_path_is_a_ledger_error(tmp_path: Path) -> None:
    """A ledger path that is a directory raises LedgerError, not sqlite3.Error."""
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(LedgerError):
        Ledger(tmp_path / "dir.db", retention_s=100)


def test_wal_mode(tmp_path: Path) -> None:
    """The ledger runs in WAL mode so readers never block the daemon."""
    Ledger(tmp_path / "l.db", retention_s=100).close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
