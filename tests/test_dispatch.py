"""The dispatcher one step at a time: in-process sinks, a real ledger, an injected clock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procpoll.deadletter import DeadLetter
from procpoll.dispatch import Dispatcher, Policy, Receipt, Route
from procpoll.errors import SinkError
from procpoll.events import Event, parse_callback_body
from procpoll.ledger import Ledger, Outcome
from procpoll.sinks.base import Delivery, SinkConfig
from tests.conftest import forced_preemption, wait_for


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    """A sink in memory: records each call; `script` decides per call (None = success)."""

    def __init__(self, name: str = "s") -> None:
        self.name = name
        self.calls: list[tuple[str, int]] = []  # (status or event type, attempt)
        self.delivered: list[str] = []
        self.script: Callable[[Delivery], str | None] = lambda _d: None
        self.gate: threading.Event | None = None  # when set, deliver waits for it
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def deliver(self, delivery: Delivery) -> None:
        label = delivery.event.status or delivery.event.event_type
        with self.lock:
            self.calls.append((label, delivery.attempt))
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.closed.is_set():
            raise SinkError("stopped by shutdown")
        failure = self.script(delivery)
        if failure is not None:
            raise SinkError(failure)
        with self.lock:
            self.delivered.append(label)

    def close(self) -> None:
        self.closed.set()


def sink_config(name: str = "s", **over: Any) -> SinkConfig:
    values: dict[str, Any] = {
        "name": name, "type": "memory", "events": None, "statuses": None, "sub_app_ids": None,
        "timeout_s": 1.0, "retries": 0, "backoff_s": 0.01, "backoff_max_s": 0.01,
        "max_attempts": 5, "options": None}
    values.update(over)
    return SinkConfig(**values)


def task(task_id: str, status: str) -> Event:
    return parse_callback_body({"EventType": "ProcedureStateChanged",
                                "ProcedureStateChangeEvent": {"TaskId": task_id,
                                                              "Status": status}}, "h")


def restore(file_id: str) -> Event:
    return parse_callback_body({"EventType": "RestoreMediaComplete",
                                "RestoreMediaCompleteEvent": {"FileId": file_id,
                                                              "Status": 0}}, "h")


class Harness:
    """A started dispatcher and what it confirmed."""

    def __init__(self, tmp_path: Path, sinks: list[RecordingSink], configs: list[SinkConfig],
                 **policy: Any) -> None:
        self.clock = Clock()
        self.ledger = Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400)
        self.confirmed: list[Receipt] = []
        self.stop = threading.Event()
        self.dead = DeadLetter(tmp_path / "dead")
        self.dispatcher = Dispatcher(
            [Route(c, s) for c, s in zip(configs, sinks, strict=True)], self.ledger,
            lambda receipt, _event: self.confirmed.append(receipt),
            policy=Policy(concurrency=4, **policy), dead_letter=self.dead, stop=self.stop,
            clock=self.clock)
        self.dispatcher.start()

    def submit(self, event: Event, handle: str, window_s: float = 30.0) -> Receipt:
        receipt = Receipt(handle, None, self.clock.now + window_s)
        self.dispatcher.submit(event, receipt)
        return receipt

    def idle(self) -> None:
        assert self.dispatcher.wait_idle(10)

    def close(self) -> None:
        self.stop.set()
        self.dispatcher.close()
        self.dispatcher.join(5)
        self.ledger.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(sinks: list[RecordingSink], configs: list[SinkConfig] | None = None,
             **policy: Any) -> Harness:
        h = Harness(tmp_path, sinks, configs or [sink_config(s.name) for s in sinks], **policy)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_two_live_handles_with_one_key_are_two_notifications(
        harness: Callable[..., Harness]) -> None:
    """Identical bodies, both handles live: delivered twice, in turn, and each handle is
    confirmed with its own occurrence number."""
    sink = RecordingSink()
    h = harness([sink])
    sink.gate = threading.Event()
    event = restore("f1")
    h.submit(event, "h1")
    h.submit(event, "h2")
    assert wait_for(lambda: sink.calls, 5)
    assert h.dispatcher.in_flight == 2
    sink.gate.set()
    h.idle()
    assert sink.delivered == ["0", "0"]  # RestoreMedia's Status
    assert [(r.handle, r.occurrence) for r in h.confirmed] == [("h1", 0), ("h2", 1)]


def test_handle_arriving_after_the_first_expired_is_attached_not_delivered(
        harness: Callable[..., Harness]) -> None:
    """While work runs past its handle's deadline, VOD's redelivery (a new handle) joins it:
    one delivery, and the newest handle is the one confirmed."""
    sink = RecordingSink()
    h = harness([sink])
    sink.gate = threading.Event()
    event = restore("f2")
    h.submit(event, "h1", window_s=3)
    assert wait_for(lambda: sink.calls, 5)
    h.clock.now += 5  # h1 expired
    h.submit(event, "h2", window_s=30)
    sink.gate.set()
    h.idle()
    assert sink.delivered == ["0"]
    assert [r.handle for r in h.confirmed] == ["h2"]
    assert h.dispatcher.counters["reattached"] == 1


def test_later_event_of_a_task_waits_while_an_earlier_one_is_unresolved(
        harness: Callable[..., Harness]) -> None:
    """PROCESSING fails once (retries = 0); FINISH, queued behind it, is not delivered and
    not confirmed; when PROCESSING comes back and is delivered, FINISH follows: the sink
    never sees FINISH before PROCESSING."""
    sink = RecordingSink()
    failures = iter(["HTTP 503"])
    sink.script = lambda d: next(failures, None) if d.event.status == "PROCESSING" else None
    h = harness([sink])
    processing, finish = task("t1", "PROCESSING"), task("t1", "FINISH")
    h.submit(processing, "p1")
    h.submit(finish, "f1")
    h.idle()
    assert sink.delivered == []
    assert h.confirmed == []
    assert h.dispatcher.counters["deferred"] == 1
    # VOD redelivers both, FINISH first.
    h.submit(finish, "f2")
    h.idle()
    assert sink.delivered == []
    h.submit(processing, "p2")
    h.idle()
    h.submit(finish, "f3")
    h.idle()
    assert sink.delivered == ["PROCESSING", "FINISH"]
    assert [r.handle for r in h.confirmed] == ["p2", "f3"]


def test_unresolved_block_lapses_if_the_earlier_event_never_returns(
        harness: Callable[..., Harness]) -> None:
    """An earlier event that fails and never comes back (confirmed by someone else) blocks
    its task only for unresolved_hold_s."""
    sink = RecordingSink()
    sink.script = lambda d: "HTTP 503" if d.event.status == "PROCESSING" else None
    h = harness([sink], unresolved_hold_s=60.0)
    h.submit(task("t2", "PROCESSING"), "p1")
    h.idle()
    h.submit(task("t2", "FINISH"), "f1")
    h.idle()
    assert sink.delivered == []
    h.clock.now += 61
    h.submit(task("t2", "FINISH"), "f2")
    h.idle()
    assert sink.delivered == ["FINISH"]


def test_reload_keeps_running_deliveries_on_their_sink_until_they_end(
        harness: Callable[..., Harness]) -> None:
    """A delivery that started before a reload finishes on the old sink (not closed under
    it, however long it runs); the old sink is closed when that delivery ends."""
    old, new = RecordingSink("s"), RecordingSink("s")
    h = harness([old])
    old.gate = threading.Event()
    h.submit(task("t3", "FINISH"), "h1")
    assert wait_for(lambda: old.calls, 5)
    h.dispatcher.reconfigure([Route(sink_config("s"), new)], Policy(), h.dead)
    assert not old.closed.is_set()
    h.submit(task("t4", "FINISH"), "h2")
    assert wait_for(lambda: new.delivered, 5)
    assert not old.closed.is_set()
    old.gate.set()
    h.idle()
    assert old.delivered == ["FINISH"]
    assert wait_for(old.closed.is_set, 5)
    assert not new.closed.is_set()


def test_reload_with_no_delivery_running_closes_the_old_sinks_at_once(
        harness: Callable[..., Harness]) -> None:
    """Nothing runs on the old sinks: they are closed by the reload itself."""
    old = RecordingSink("s")
    h = harness([old])
    h.dispatcher.reconfigure([Route(sink_config("s"), RecordingSink("s"))], Policy(), h.dead)
    assert old.closed.is_set()


def test_redelivery_of_a_dead_lettered_event_is_not_counted_as_a_duplicate(
        harness: Callable[..., Harness]) -> None:
    """The ledger has the event as dead-lettered: its redelivery is confirmed and counted
    as already_dead, not as a duplicate delivery."""
    sink = RecordingSink()
    h = harness([sink])
    event = task("t5", "FINISH")
    h.ledger.record([Outcome(event.key, "s", delivered=False, dead=True, error="x")])
    h.submit(event, "h1")
    h.idle()
    assert h.dispatcher.counters["duplicates"] == 0
    assert h.dispatcher.counters["already_dead"] == 1
    assert [r.handle for r in h.confirmed] == ["h1"]
    assert sink.calls == []


def test_ledger_lookup_failure_leaves_the_event_unconfirmed_and_counts_it_failed(
        harness: Callable[..., Harness]) -> None:
    """A ledger that cannot be read: nothing is delivered or confirmed, and it counts."""
    sink = RecordingSink()
    h = harness([sink])
    h.ledger.close()
    h.submit(task("t6", "FINISH"), "h1")
    h.idle()
    assert (sink.calls, h.confirmed) == ([], [])
    assert h.dispatcher.counters["failed"] == 1


def test_many_threads_submitting_identical_and_distinct_events_lose_none(
        harness: Callable[..., Harness]) -> None:
    """Under forced preemption, 8 threads submit 50 events each (half of them identical
    RestoreMedia bodies): every live handle is confirmed exactly once."""

    sink = RecordingSink()
    h = harness([sink])
    handles = [f"h{n}-{i}" for n in range(8) for i in range(50)]

    def submit(n: int) -> None:
        for i in range(50):
            event = restore("same") if i % 2 else task(f"t{n}-{i}", "FINISH")
            h.dispatcher.submit(event, Receipt(f"h{n}-{i}", None, h.clock.now + 30))

    with forced_preemption():
        threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        h.idle()
    assert sorted(r.handle for r in h.confirmed) == sorted(handles)
    assert len(sink.delivered) == len(handles)
