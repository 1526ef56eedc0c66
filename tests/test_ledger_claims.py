"""The ledger contract every backend keeps: occurrences, claims, per-task blocking, takeover.

`backend` is parametrized over the ledger implementations; each test gets fresh storage.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procpoll.ledger import (
    ClaimRequest,
    Confirmation,
    DeliveryLedger,
    Ledger,
    Outcome,
    delivery_id,
)
from tests.pg import fresh_schema_url

MakeLedger = Callable[..., DeliveryLedger]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_ledger(backend: str, tmp_path: Path) -> Iterator[MakeLedger]:
    """Opens ledgers on one fresh store (several opens = several processes sharing it)."""
    opened: list[DeliveryLedger] = []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_schema_url()) if backend == "postgresql" else ""

        def make(now: Callable[[], float] | None = None) -> DeliveryLedger:
            ledger: DeliveryLedger
            if backend == "sqlite":
                ledger = Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400, shared=True,
                                **({"now": now} if now else {}))
            else:
                from procpoll.ledger_pg import PostgresLedger  # noqa: PLC0415 -- optional

                ledger = PostgresLedger(url, retention_s=86_400, now=now)
            opened.append(ledger)
            return ledger

        yield make
        for ledger in opened:
            ledger.close()


def req(did: str, owner: str, *sinks: str, lease_s: float = 30.0, ordering: str = "task:t",
        hold_s: float = 60.0) -> ClaimRequest:
    return ClaimRequest(did, sinks or ("s",), owner, lease_s, ordering, hold_s)


def test_first_claim_wins_and_the_second_owner_sees_it_held(make_ledger: MakeLedger) -> None:
    """Two consumers claim the same (occurrence, sink): one gets it, the other sees who
    holds it and for how long."""
    a, b = make_ledger(), make_ledger()
    assert a.claim(req("k", "A")).acquired == ("s",)
    result = b.claim(req("k", "B"))
    assert result.acquired == ()
    owner, left_s = result.held["s"]
    assert owner == "A" and 0 < left_s <= 30


def test_recorded_outcome_releases_the_claim_and_done_sinks_are_reported(
        make_ledger: MakeLedger) -> None:
    """After A records the delivery, B's claim reports the sink as done."""
    a, b = make_ledger(), make_ledger()
    a.claim(req("k", "A"))
    a.record([Outcome("k", "s", delivered=True, ordering_key="task:t")])
    assert b.claim(req("k", "B")).done == ("s",)
    assert b.states("k")["s"].delivered


def test_expired_lease_is_taken_over(make_ledger: MakeLedger) -> None:
    """The owner died: once its lease has expired, another consumer takes the claim."""
    clock = Clock()
    a, b = make_ledger(clock), make_ledger(clock)
    a.claim(req("k", "A", lease_s=10))
    clock.now += 11
    assert b.claim(req("k", "B")).acquired == ("s",)


def test_failed_round_releases_the_claim_for_the_next_consumer(make_ledger: MakeLedger) -> None:
    """A failed delivery is recorded (attempts 1) and the claim released: the next
    consumer that gets the event claims it at once."""
    a, b = make_ledger(), make_ledger()
    a.claim(req("k", "A"))
    a.record([Outcome("k", "s", delivered=False, error="HTTP 503", ordering_key="task:t")])
    assert b.claim(req("k", "B")).acquired == ("s",)
    assert b.states("k")["s"].attempts == 1


def test_earlier_unresolved_event_of_the_task_blocks_a_later_one(make_ledger: MakeLedger) -> None:
    """PROCESSING (claimed, then failed) blocks FINISH of the same task in another
    consumer; once PROCESSING is delivered, FINISH can be claimed."""
    clock = Clock()
    a, b = make_ledger(clock), make_ledger(clock)
    a.claim(req("processing", "A"))
    clock.now += 1
    assert b.claim(req("finish", "B")).blocked_by == "processing"
    a.record([Outcome("processing", "s", delivered=False, error="x", ordering_key="task:t")])
    assert b.claim(req("finish", "B")).blocked_by == "processing"
    a.record([Outcome("processing", "s", delivered=True, ordering_key="task:t")])
    assert b.claim(req("finish", "B")).acquired == ("s",)


def test_block_is_by_first_seen_so_two_events_never_wait_for_each_other(
        make_ledger: MakeLedger) -> None:
    """The earlier event (first seen first) is never blocked by the later one."""
    clock = Clock()
    a, b = make_ledger(clock), make_ledger(clock)
    a.claim(req("first", "A"))
    clock.now += 1
    assert b.claim(req("second", "B")).blocked_by == "first"
    assert a.claim(req("first", "A")).acquired == ("s",)


def test_inactive_blocker_lapses_after_hold(make_ledger: MakeLedger) -> None:
    """A failed event with no activity for hold_s no longer blocks its task."""
    clock = Clock()
    a = make_ledger(clock)
    a.claim(req("old", "A"))
    a.record([Outcome("old", "s", delivered=False, error="x", ordering_key="task:t")])
    clock.now += 61
    assert a.claim(req("new", "B", hold_s=60)).acquired == ("s",)


def test_other_tasks_are_not_blocked(make_ledger: MakeLedger) -> None:
    """Unresolved events block only their own ordering key."""
    a = make_ledger()
    a.claim(req("x", "A", ordering="task:1"))
    assert a.claim(req("y", "B", ordering="task:2")).acquired == ("s",)


def test_occurrences_are_shared_between_consumers(make_ledger: MakeLedger) -> None:
    """A confirmation recorded by one consumer makes the key's next handle a new
    occurrence for every consumer."""
    a, b = make_ledger(), make_ledger()
    a.record([Outcome("k", "s", delivered=True)], [Confirmation("k", 0)])
    occurrence, states = b.lookup("k")
    assert (occurrence, states) == (1, {})
    assert b.claim(req(delivery_id("k", 1), "B")).acquired == ("s",)
    b.record([Outcome(delivery_id("k", 1), "s", delivered=True)])
    occurrence, states = a.lookup("k")
    assert occurrence == 1 and states["s"].delivered
    assert a.lookup("k", 1) == (2, {})


def test_concurrent_claims_give_each_sink_to_exactly_one_owner(make_ledger: MakeLedger) -> None:
    """8 consumers race for 50 occurrences: each (occurrence, sink) is acquired once."""
    ledgers = [make_ledger() for _ in range(8)]
    won: list[tuple[str, str]] = []
    lock = threading.Lock()

    def race(n: int) -> None:
        for i in range(50):
            got = ledgers[n].claim(req(f"k{i}", f"owner{n}", "s1", "s2", ordering=f"task:{i}"))
            with lock:
                won.extend((f"k{i}", sink) for sink in got.acquired)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(won) == sorted((f"k{i}", s) for i in range(50) for s in ("s1", "s2"))
