"""The PostgreSQL ledger beyond the shared contract: schema, concurrency, failures, restart.

The contract both backends keep is tests/test_ledger_claims.py; these pin what only a
server-backed ledger has. Each test gets its own schema on the local server (tests/pg.py).
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procpoll.errors import LedgerError
from procpoll.ledger import ClaimRequest, Confirmation, Ledger, Outcome
from tests.conftest import wait_for
from tests.pg import execute, fresh_schema_url, require_postgres

try:
    import psycopg

    from procpoll.ledger_copy import copy_ledger
    from procpoll.ledger_pg import SCHEMA_VERSION, PostgresLedger, masked_url, split_url
except ImportError:  # without the optional dependency: skip (fail when CI requires it)
    require_postgres()
    raise


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A ledger URL with a schema of its own, dropped at teardown."""
    with fresh_schema_url() as url:
        yield url


def schema_of(url: str) -> str:
    schema = split_url(url)[1]
    assert schema is not None
    return schema


def test_schema_is_created_and_versioned(pg_url: str) -> None:
    """Opening an empty schema creates the tables and records the schema version once,
    however often the ledger is opened."""
    PostgresLedger(pg_url, retention_s=3600).close()
    ledger = PostgresLedger(pg_url, retention_s=3600)
    with psycopg.connect(split_url(pg_url)[0]) as conn:
        rows = conn.execute(
            f'SELECT version FROM "{schema_of(pg_url)}".procpoll_schema').fetchall()
        tables = {row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema_of(pg_url),))}
    assert rows == [(SCHEMA_VERSION,)]
    assert tables == {"procpoll_schema", "procpoll_deliveries", "procpoll_confirmations"}
    assert ledger.counts() == {"delivered": 0, "dead": 0, "failing": 0}
    ledger.close()


def test_newer_schema_version_is_refused(pg_url: str) -> None:
    """A ledger written by a newer procpoll is not touched: opening it raises LedgerError."""
    PostgresLedger(pg_url, retention_s=3600).close()
    execute(f'UPDATE "{schema_of(pg_url)}".procpoll_schema SET version = %s',
            (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        PostgresLedger(pg_url, retention_s=3600)


def test_outcomes_count_attempts_keep_first_seen_and_release_claims(pg_url: str) -> None:
    """Same upsert as SQLite: attempts count up, first_seen stays, delivered sticks, the
    claim is released, and a repeated confirmation is kept once."""
    now = [1000.0]
    ledger = PostgresLedger(pg_url, retention_s=3600, now=lambda: now[0])
    ledger.claim(ClaimRequest("k", ("s",), "A", 30.0, "task:t", 60.0))
    ledger.record([Outcome("k", "s", delivered=False, error="HTTP 500", ordering_key="task:t")])
    now[0] = 1100.0
    assert ledger.claim(ClaimRequest("k", ("s",), "B", 30.0, "task:t", 60.0)).acquired == ("s",)
    ledger.record([Outcome("k", "s", delivered=True)])
    ledger.record([Outcome("k", "s", delivered=False, error="late")])
    state = ledger.states("k")["s"]
    assert (state.attempts, state.first_seen, state.delivered) == (3, 1000.0, True)
    ledger.record([], [Confirmation("k", 0)])
    ledger.record_confirmed([Confirmation("k", 0)])
    assert ledger.lookup("k") == (1, {})
    assert ledger.lookup("k", 0) == (1, {})
    ledger.close()


def test_every_shape_of_record_lands_in_one_piece(pg_url: str) -> None:
    """One outcome, a batch of confirmations (one of them twice, one already recorded), and
    outcomes with confirmations together: each lands, and a failing batch leaves nothing
    behind."""
    ledger = PostgresLedger(pg_url, retention_s=3600, now=lambda: 1000.0)
    ledger.record([Outcome("a", "s", delivered=True, ordering_key="task:a")])
    ledger.record_confirmed([Confirmation("a", 0)])
    ledger.record_confirmed([Confirmation("a", 0), Confirmation("b", 0), Confirmation("b", 0),
                             Confirmation("b", 1)])
    ledger.record([Outcome("c", "s", delivered=True),
                   Outcome("c", "t", delivered=False, dead=True)], [Confirmation("c", 0)])
    assert ledger.lookup("a") == (1, {})
    assert ledger.lookup("b") == (2, {})
    assert ledger.lookup("c") == (1, {})
    assert ledger.counts() == {"delivered": 2, "dead": 1, "failing": 0}
    with pytest.raises(LedgerError):  # an occurrence beyond integer: the whole batch fails
        ledger.record_confirmed([Confirmation("d", 0), Confirmation("e", 2**40)])
    assert ledger.lookup("d") == (0, {})
    ledger.close()


def test_prune_forgets_rows_older_than_retention(pg_url: str) -> None:
    """Deliveries and confirmations older than the retention go; newer ones stay."""
    now = [0.0]
    ledger = PostgresLedger(pg_url, retention_s=100, now=lambda: now[0])
    ledger.record([Outcome("old", "s", delivered=True)], [Confirmation("old", 0)])
    now[0] = 150.0
    ledger.record([Outcome("new", "s", delivered=True)])
    assert ledger.prune() == 2
    assert ledger.states("old") == {}
    assert ledger.states("new")["s"].done
    ledger.close()


def test_server_clock_times_the_lease(pg_url: str) -> None:
    """Without an injected clock the lease is timed by the server: another owner sees it
    held for about the lease, whatever this host's clock says."""
    a = PostgresLedger(pg_url, retention_s=3600)
    b = PostgresLedger(pg_url, retention_s=3600)
    a.claim(ClaimRequest("k", ("s",), "A", 30.0, "task:t", 60.0))
    owner, left_s = b.claim(ClaimRequest("k", ("s",), "B", 30.0, "task:t", 60.0)).held["s"]
    assert owner == "A" and 25 < left_s <= 30
    a.close()
    b.close()


def test_concurrent_records_all_land(pg_url: str) -> None:
    """16 threads recording outcomes and confirmations through a pool of 4 lose nothing."""
    ledger = PostgresLedger(pg_url, retention_s=3600, pool_size=4)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                ledger.record([Outcome(f"k{n}-{i}", "s", delivered=True),
                               Outcome(f"k{n}-{i}", "t", delivered=False, error="x")],
                              [Confirmation(f"k{n}-{i}", 0)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert errors == []
    assert ledger.counts() == {"delivered": 800, "dead": 0, "failing": 800}
    assert all(ledger.lookup(f"k{n}-{i}")[0] == 1 for n in range(16) for i in range(50))
    ledger.close()


def test_two_events_of_a_task_claimed_at_once_never_both_proceed(pg_url: str) -> None:
    """Two consumers claim the first and the second event of one task at the same moment:
    exactly one of them gets its sink, the other is blocked by it (the task's lock)."""
    ledgers = [PostgresLedger(pg_url, retention_s=3600) for _ in range(2)]
    for round_no in range(40):
        barrier = threading.Barrier(2)
        got: dict[str, bool] = {}

        def race(n: int, did: str, task: str, got: dict[str, bool] = got,
                 barrier: threading.Barrier = barrier) -> None:
            barrier.wait(10)
            result = ledgers[n].claim(ClaimRequest(did, ("s",), f"owner{n}", 30.0, task, 60.0))
            got[did] = result.acquired == ("s",)

        task = f"task:{round_no}"
        threads = [threading.Thread(target=race, args=(0, f"first{round_no}", task)),
                   threading.Thread(target=race, args=(1, f"second{round_no}", task))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(got.values()) == [False, True], round_no
    for ledger in ledgers:
        ledger.close()


def test_name_masks_the_password() -> None:
    """The ledger's name (in logs and errors) never carries the password."""
    assert masked_url("postgresql://u:s3cret@db:5432/x?schema=a") == \
        "postgresql://u:***@db:5432/x?schema=a"
    assert masked_url("postgresql://u@db/x") == "postgresql://u@db/x"


def test_schema_parameter_is_split_from_the_conninfo() -> None:
    """schema= is procpoll's, not libpq's: it leaves the conninfo, other parameters stay."""
    assert split_url("postgresql://u@h/db?sslmode=require&schema=s1") == \
        ("postgresql://u@h/db?sslmode=require", "s1")
    assert split_url("postgresql://u@h/db") == ("postgresql://u@h/db", None)


def test_unreachable_server_fails_fast_with_ledger_error() -> None:
    """Nothing listens on the port: opening raises LedgerError within seconds, no hang."""
    started = time.monotonic()
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        PostgresLedger("postgresql://postgres:pw@127.0.0.1:1/test", retention_s=3600)
    assert time.monotonic() - started < 10


def test_unanswering_server_times_out_with_ledger_error(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: LedgerError after the
    connect timeout, not a hang (and the password is not in the message)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(LedgerError) as raised:
            PostgresLedger(f"postgresql://postgres:pw@127.0.0.1:{port}/test", retention_s=3600)
        assert time.monotonic() - started < 15
    assert "pw" not in str(raised.value)


def dump(url: str) -> list[list[tuple[object, ...]]]:
    """Every row of the PostgreSQL ledger at `url`, sorted."""
    with psycopg.connect(split_url(url)[0]) as conn:
        schema = schema_of(url)
        return [sorted(conn.execute(f'SELECT * FROM "{schema}".{table}').fetchall())
                for table in ("procpoll_deliveries", "procpoll_confirmations")]


def test_copy_from_sqlite_is_complete_and_idempotent(pg_url: str, tmp_path: Path) -> None:
    """Copying a SQLite ledger (in batches) brings every row over; a second run changes
    nothing; a copied delivery is a duplicate for the PostgreSQL ledger, a copied
    confirmation makes the next handle a new occurrence."""
    sqlite = Ledger(tmp_path / "l.sqlite3", retention_s=3600)
    sqlite.record([Outcome(f"k{i}", "s", delivered=True, ordering_key=f"task:{i}")
                   for i in range(5)], [Confirmation("k0", 0)])
    sqlite.record([Outcome("failing", "s", delivered=False, error="HTTP 503",
                           ordering_key="task:f")] * 2)
    sqlite.record([Outcome("dead", "s", delivered=False, dead=True, error="x")])
    sqlite.close()
    source = f"sqlite://{tmp_path}/l.sqlite3"

    first = copy_ledger(source, pg_url, retention_s=3600, batch_rows=2)
    assert first == {"deliveries": 7, "deliveries_written": 7,
                     "confirmations": 1, "confirmations_written": 1}
    rows = dump(pg_url)
    second = copy_ledger(source, pg_url, retention_s=3600, batch_rows=2)
    assert second == {"deliveries": 7, "deliveries_written": 0,
                      "confirmations": 1, "confirmations_written": 0}
    assert dump(pg_url) == rows

    ledger = PostgresLedger(pg_url, retention_s=3600)
    assert ledger.claim(ClaimRequest("k3", ("s",), "A", 30.0, "task:3", 60.0)).done == ("s",)
    assert ledger.lookup("k0") == (1, {})
    assert ledger.states("failing")["s"].attempts == 2
    assert ledger.counts() == {"delivered": 5, "dead": 1, "failing": 1}
    ledger.close()


def test_copy_merges_into_a_ledger_in_use(pg_url: str, tmp_path: Path) -> None:
    """A target that already has the row keeps what says more: the source's delivery
    marks a failing target row delivered, the larger attempt count wins."""
    target = PostgresLedger(pg_url, retention_s=3600)
    target.record([Outcome("k", "s", delivered=False, error="x")] * 3)
    sqlite = Ledger(tmp_path / "l.sqlite3", retention_s=3600)
    sqlite.record([Outcome("k", "s", delivered=True)])
    sqlite.close()
    copied = copy_ledger(str(tmp_path / "l.sqlite3"), pg_url, retention_s=3600)
    assert copied["deliveries_written"] == 1
    state = target.states("k")["s"]
    assert (state.delivered, state.attempts) == (True, 3)
    target.close()


def test_copy_back_to_sqlite(pg_url: str, tmp_path: Path) -> None:
    """The copy runs the other way too: PostgreSQL rows land in a new SQLite ledger."""
    source = PostgresLedger(pg_url, retention_s=3600)
    source.record([Outcome("k", "s", delivered=True)], [Confirmation("k", 0)])
    source.close()
    copied = copy_ledger(pg_url, f"sqlite://{tmp_path}/back.sqlite3", retention_s=3600)
    assert copied["deliveries_written"] == 1 and copied["confirmations_written"] == 1
    back = Ledger(tmp_path / "back.sqlite3", retention_s=3600)
    assert back.lookup("k") == (1, {})
    assert back.counts() == {"delivered": 1, "dead": 0, "failing": 0}
    back.close()


@pytest.mark.slow
def test_ledger_recovers_after_a_server_restart_without_reopening(pg_url: str) -> None:
    """PostgreSQL restarts mid-use: the next call fails with LedgerError, then the same
    object pings, records and claims again, and what was committed before is still there."""
    ledger = PostgresLedger(pg_url, retention_s=3600, pool_size=4)
    ledger.record([Outcome("before", "s", delivered=True)])
    ledger.claim(ClaimRequest("held", ("s",), "A", 300.0, "task:t", 60.0))
    version = Path("/etc/postgresql")
    clusters = sorted(p.name for p in version.iterdir()) if version.is_dir() else []
    if not clusters:
        require_postgres()
        pytest.skip("no local PostgreSQL cluster to restart")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1], "main",
                    "restart"], check=True, capture_output=True, timeout=60)

    failures: list[LedgerError] = []

    def answers() -> bool:
        try:
            ledger.ping()
        except LedgerError as exc:
            failures.append(exc)
            return False
        return True

    assert wait_for(answers, timeout_s=30, step_s=0.1)
    # The server is up once pg_ctlcluster returns: only the first call meets a dead
    # connection; the pool's other idle ones are replaced then, not one failure each.
    assert len(failures) <= 1, failures
    ledger.record([Outcome("after", "s", delivered=True)])
    assert ledger.claim(ClaimRequest("held", ("s",), "B", 30.0, "task:t", 60.0)).held
    assert ledger.states("before")["s"].delivered
    assert ledger.counts()["delivered"] == 2
    ledger.close()
