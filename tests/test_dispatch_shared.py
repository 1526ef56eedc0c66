"""Several consumers on one ledger: claims keep a sink from getting an event twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procpoll.dispatch import Dispatcher, Policy, Receipt, Route
from procpoll.ledger import ClaimRequest, Ledger, Outcome
from tests.conftest import wait_for
from tests.test_dispatch import RecordingSink, restore, sink_config, task


def deadline(window_s: float = 30.0) -> float:
    """A handle's deadline on the dispatcher's (monotonic) clock."""
    return time.monotonic() + window_s


class Consumer:
    """One dispatcher with its own ledger connection, as one process would have."""

    def __init__(self, path: Path, name: str, sink: RecordingSink) -> None:
        self.ledger = Ledger(path, retention_s=86_400, shared=True)
        self.confirmed: list[Receipt] = []
        self.stop = threading.Event()
        self.dispatcher = Dispatcher(
            [Route(sink_config("s", timeout_s=1.0, retries=0), sink)], self.ledger,
            lambda receipt, _event: self.confirmed.append(receipt),
            policy=Policy(concurrency=2, confirm_margin_s=0.5), dead_letter=None,
            stop=self.stop, owner=name)  # real clocks: leases run in wall time
        self.dispatcher.start()

    def close(self) -> None:
        self.stop.set()
        self.dispatcher.close()
        self.dispatcher.join(5)
        self.ledger.close()


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[Callable[[str, RecordingSink], Consumer]]:
    made: list[Consumer] = []

    def make(name: str, sink: RecordingSink) -> Consumer:
        consumer = Consumer(tmp_path / "ledger.sqlite3", name, sink)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


def test_second_consumer_waits_for_the_first_and_confirms_without_delivering(
        consumers: Callable[[str, RecordingSink], Consumer]) -> None:
    """A's delivery is slow; VOD hands the event to B with a new handle. B does not call
    the sink: it waits for A's outcome and confirms its own handle."""
    sink = RecordingSink()
    sink.gate = threading.Event()
    a, b = consumers("A", sink), consumers("B", sink)
    event = task("t1", "FINISH")
    a.dispatcher.submit(event, Receipt("h1", None, deadline()))
    assert wait_for(lambda: sink.calls, 5)
    b.dispatcher.submit(event, Receipt("h2", None, deadline()))
    assert wait_for(lambda: b.dispatcher.counters["awaited"] == 1, 5)
    sink.gate.set()
    assert a.dispatcher.wait_idle(10) and b.dispatcher.wait_idle(10)
    assert sink.delivered == ["FINISH"]
    assert [r.handle for r in a.confirmed] == ["h1"]
    assert [r.handle for r in b.confirmed] == ["h2"]


def test_claim_of_a_dead_owner_is_taken_over_after_its_lease(
        tmp_path: Path, consumers: Callable[[str, RecordingSink], Consumer]) -> None:
    """A consumer died holding the claim: the next one waits for the lease, then delivers
    (the crash-window duplicate, bounded by one lease)."""
    sink = RecordingSink()
    event = restore("f9")
    Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400, shared=True).claim(
        ClaimRequest(event.key, ("s",), "dead-host:1:1", 0.6, event.ordering_key, 60.0))
    b = consumers("B", sink)
    b.dispatcher.submit(event, Receipt("h2", None, deadline()))
    assert b.dispatcher.wait_idle(10)
    assert sink.delivered == ["0"]
    assert [r.handle for r in b.confirmed] == ["h2"]


def test_later_event_of_a_task_waits_for_an_earlier_one_in_another_consumer(
        consumers: Callable[[str, RecordingSink], Consumer]) -> None:
    """A delivers PROCESSING and fails; B gets FINISH: B does not deliver it (deferred)
    until PROCESSING is delivered, in whichever consumer."""
    sink = RecordingSink()
    failures = iter(["HTTP 503"])
    sink.script = lambda d: next(failures, None) if d.event.status == "PROCESSING" else None
    a, b = consumers("A", sink), consumers("B", sink)
    a.dispatcher.submit(task("t2", "PROCESSING"), Receipt("p1", None, deadline()))
    assert a.dispatcher.wait_idle(10)
    b.dispatcher.submit(task("t2", "FINISH"), Receipt("f1", None, deadline()))
    assert b.dispatcher.wait_idle(10)
    assert sink.delivered == [] and b.confirmed == []
    b.dispatcher.submit(task("t2", "PROCESSING"), Receipt("p2", None, deadline()))
    assert b.dispatcher.wait_idle(10)
    a.dispatcher.submit(task("t2", "FINISH"), Receipt("f2", None, deadline()))
    assert a.dispatcher.wait_idle(10)
    assert sink.delivered == ["PROCESSING", "FINISH"]


def test_many_consumers_racing_on_one_queue_deliver_each_event_once(
        consumers: Callable[[str, RecordingSink], Consumer]) -> None:
    """Four consumers get every one of 60 events (each with its own handle, as after
    redeliveries): the sink gets each event exactly once, and every handle of a delivered
    event is confirmed by the consumer holding it."""
    sink = RecordingSink()
    group = [consumers(f"C{n}", sink) for n in range(4)]
    events = [task(f"t{i}", "FINISH") for i in range(60)]
    for n, consumer in enumerate(group):
        for i, event in enumerate(events):
            consumer.dispatcher.submit(event, Receipt(f"h{n}-{i}", None, deadline()))
    for consumer in group:
        assert consumer.dispatcher.wait_idle(20)
    assert sorted(sink.delivered) == ["FINISH"] * 60
    assert len(sink.calls) == 60
    assert sum(len(c.confirmed) for c in group) == 240


def test_recorded_outcome_in_another_consumer_counts_as_done(
        tmp_path: Path, consumers: Callable[[str, RecordingSink], Consumer]) -> None:
    """The ledger already has the delivery from another process: confirm, no call."""
    sink = RecordingSink()
    event = task("t3", "FINISH")
    Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400).record(
        [Outcome(event.key, "s", delivered=True)])
    b = consumers("B", sink)
    b.dispatcher.submit(event, Receipt("h", None, deadline()))
    assert b.dispatcher.wait_idle(10)
    assert sink.calls == [] and [r.handle for r in b.confirmed] == ["h"]
