"""The ledger: durable per-(event, sink) memory, group commits, pruning, schema version."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from procpoll.errors import LedgerError
from procpoll.ledger import (
    SCHEMA_VERSION,
    Confirmation,
    Ledger,
    Outcome,
    delivery_id,
    next_occurrence,
)
from tests.conftest import forced_preemption, wait_for


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


def test_group_commit_survives_forced_preemption(tmp_path: Path) -> None:
    """24 threads recording at once with a thread switch every microsecond: every call
    returns (no hang, no 'release unlocked lock') and every outcome is committed."""
    ledger = Ledger(tmp_path / "l.db", retention_s=3600)
    ledger._db.execute("PRAGMA synchronous=OFF")  # the hand-off is under test, not the disk
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                ledger.record([Outcome(f"k{n}-{i}", "s", delivered=True)])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    with forced_preemption():
        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(45)
    assert not [t for t in threads if t.is_alive()], "record() hung"
    assert errors == []
    assert ledger.counts()["delivered"] == 24 * 300


class _PausingLock:
    """Wraps the ledger's pending-list lock: the named thread pauses right after releasing
    it once, the window in which the previous leader may pick it as successor."""

    def __init__(self, inner: threading.Lock, thread_name: str) -> None:
        self._inner = inner
        self._thread_name = thread_name
        self.paused = threading.Event()
        self.resume = threading.Event()

    def __enter__(self) -> None:
        self._inner.acquire()

    def __exit__(self, *_exc: object) -> None:
        self._inner.release()
        if threading.current_thread().name == self._thread_name and not self.paused.is_set():
            self.paused.set()
            self.resume.wait(10)


def test_ticket_made_successor_before_it_waits_still_leads_cleanly(tmp_path: Path) -> None:
    """Deterministic form of the hand-off race: B queues while A commits, pauses before
    waiting, A makes B the successor and finishes; B then leads its own commit without a
    double release, and later records still complete."""
    ledger = Ledger(tmp_path / "l.db", retention_s=3600)
    pausing = _PausingLock(ledger._pending_lock, "B")
    ledger._pending_lock = pausing  # type: ignore[assignment]
    errors: list[BaseException] = []

    def record(key: str) -> None:
        try:
            ledger.record([Outcome(key, "s", delivered=True)])
        except BaseException as exc:
            errors.append(exc)

    ledger._lock.acquire()  # hold A inside its commit
    a = threading.Thread(target=record, args=("a",), name="A", daemon=True)
    a.start()
    assert wait_for(lambda: ledger._committing and not ledger._pending, 5)
    b = threading.Thread(target=record, args=("b",), name="B", daemon=True)
    b.start()
    assert pausing.paused.wait(5)
    ledger._lock.release()  # A commits and hands over to B
    a.join(5)
    pausing.resume.set()
    b.join(5)
    c = threading.Thread(target=record, args=("c",), name="C", daemon=True)
    c.start()
    c.join(5)
    assert not (a.is_alive() or b.is_alive() or c.is_alive())
    assert errors == []
    assert ledger.counts()["delivered"] == 3


def test_occurrences_follow_recorded_confirmations(tmp_path: Path) -> None:
    """An unconfirmed occurrence is looked up again (a redelivery); once its confirmation
    is recorded, the same key stands for the next occurrence with its own delivery rows."""
    ledger = Ledger(tmp_path / "l.db", retention_s=3600)
    ledger.record([Outcome("k", "s", delivered=True)])
    occurrence, states = ledger.lookup("k")
    assert occurrence == 0 and states["s"].delivered
    ledger.record_confirmed([Confirmation("k", 0)])
    occurrence, states = ledger.lookup("k")
    assert (occurrence, states) == (1, {})
    ledger.record([Outcome(delivery_id("k", 1), "s", delivered=True)])
    assert ledger.lookup("k")[1]["s"].delivered
    # An identical notification already in memory as occurrence 1: the next one is 2.
    assert ledger.lookup("k", after=1) == (2, {})
    ledger.close()
    assert Ledger(tmp_path / "l.db", retention_s=3600).lookup("k")[0] == 1


def test_lowest_unconfirmed_occurrence_is_a_redelivery(tmp_path: Path) -> None:
    """Occurrence 1 confirmed but 0 not (its confirm was lost): a handle for the key is
    taken as occurrence 0's redelivery, not as a third notification."""
    assert next_occurrence([1]) == 0
    assert next_occurrence([0, 1, 3]) == 2
    assert next_occurrence([0, 1, 3], after=2) == 4


def test_prune_forgets_old_confirmations(tmp_path: Path) -> None:
    """Confirmations older than the retention are pruned like delivery rows."""
    now = [1000.0]
    ledger = Ledger(tmp_path / "l.db", retention_s=100, now=lambda: now[0])
    ledger.record_confirmed([Confirmation("k", 0)])
    now[0] = 1200.0
    assert ledger.prune() == 1
    assert ledger.lookup("k")[0] == 0


def test_version_1_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    """A ledger written by schema 1 keeps its rows and gains the confirmations table."""
    path = tmp_path / "l.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE deliveries (event_key TEXT NOT NULL, sink TEXT NOT NULL, "
        "first_seen REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, delivered_at REAL, "
        "dead_at REAL, last_error TEXT, PRIMARY KEY (event_key, sink)) WITHOUT ROWID;"
        "INSERT INTO deliveries VALUES ('k', 's', 1.0, 1, 2.0, NULL, NULL);"
        "PRAGMA user_version=1;")
    db.close()
    ledger = Ledger(path, retention_s=10**9)
    assert ledger.states("k")["s"].delivered
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
