"""The confirmer, the pacer and the pull gate, one step at a time with a fake VodApi."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from procpoll.confirm import Confirmer
from procpoll.daemon import _PullGate
from procpoll.dispatch import Receipt
from procpoll.errors import ApiError, ExpiredHandleError
from procpoll.vod import Pacer
from tests.conftest import forced_preemption, wait_for


class FakeVod:
    """Records ConfirmEvents calls; `answers` scripts each call (an exception or None)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answers: list[BaseException | None] = []
        self.lock = threading.Lock()

    def pull(self, sub_app_id: int | None) -> list[Any]:
        return []

    def confirm(self, sub_app_id: int | None, handles: Sequence[str]) -> None:
        with self.lock:
            self.calls.append(list(handles))
            answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer

    def describe_event_config(self, sub_app_id: int | None) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Nothing to close."""


class CountingPacer(Pacer):
    """A pacer that never waits but counts the slots taken."""

    def __init__(self) -> None:
        super().__init__(1000.0, sleep=lambda _s: None)
        self.waits = 0

    def wait(self) -> float:
        self.waits += 1
        return 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vod() -> FakeVod:
    return FakeVod()


@pytest.fixture
def confirmed() -> list[Receipt]:
    return []


@pytest.fixture
def make(vod: FakeVod, confirmed: list[Receipt]) -> Iterator[Any]:
    made: list[Confirmer] = []

    def build(**kwargs: Any) -> Confirmer:
        kwargs.setdefault("clock", Clock())
        confirmer = Confirmer(lambda: vod, [None], threads_per_app=1,
                              on_confirmed=confirmed.extend, **kwargs)
        confirmer.start()
        made.append(confirmer)
        return confirmer

    yield build
    for confirmer in made:
        confirmer.drain(2)


def receipt(handle: str, deadline: float = 130.0, key: str | None = "k") -> Receipt:
    return Receipt(handle, None, deadline, event_key=key)


def test_confirmed_receipts_are_reported_for_the_ledger(
        make: Any, vod: FakeVod, confirmed: list[Receipt]) -> None:
    """Handles ConfirmEvents accepted reach on_confirmed with their key and occurrence."""
    confirmer = make()
    confirmer.submit(Receipt("h1", None, 130.0, event_key="k1", occurrence=2))
    assert confirmer.drain(5)
    assert vod.calls == [["h1"]]
    assert [(r.event_key, r.occurrence) for r in confirmed] == [("k1", 2)]


def test_refused_batch_falls_back_to_paced_singles_and_retries_transient_failures(
        make: Any, vod: FakeVod, confirmed: list[Receipt]) -> None:
    """A batch refused as expired is confirmed one handle at a time through the pacer; a
    single refused for the rate limit is retried, not dropped."""
    pacer = CountingPacer()
    confirmer = make(pacer=pacer)
    gate = threading.Event()
    vod.answers = [None]  # the first call (h0, sent alone) holds the sub-app busy
    original = vod.confirm

    def slow_first(app: int | None, handles: Sequence[str]) -> None:
        if handles == ["h0"]:
            gate.wait(5)
        original(app, handles)

    vod.confirm = slow_first  # type: ignore[method-assign]
    confirmer.submit(receipt("h0"))
    assert wait_for(lambda: vod.calls or confirmer._busy, 5)
    batch = [receipt(f"h{n}") for n in range(1, 17)]
    vod.answers = [None, ExpiredHandleError("InvalidParameterValue", "expired"),
                   *[None] * 3, ApiError("RequestLimitExceeded", "slow down")]
    for r in batch:
        confirmer.submit(r)
    gate.set()
    assert confirmer.drain(10)
    singles = [c for c in vod.calls if len(c) == 1 and c != ["h0"]]
    assert ["h4"] in singles and singles.count(["h4"]) == 2  # refused once, retried
    assert sorted(r.handle for r in confirmed) == sorted(["h0", *[r.handle for r in batch]])
    assert pacer.waits >= 16  # each single took a slot


def test_single_refused_after_a_refused_batch_is_taken_as_accepted_if_still_live(
        make: Any, vod: FakeVod, confirmed: list[Receipt]) -> None:
    """Some VOD answers accept the valid handles of a refused batch: a handle refused alone
    afterwards while still live is recorded as confirmed (erring toward a duplicate)."""
    confirmer = make()
    vod.answers = [ExpiredHandleError("InvalidParameterValue", "bad handle"),
                   ExpiredHandleError("InvalidParameterValue", "used"), None]
    # Two handles queued before the thread can send: they go out as one batch.
    with confirmer._cv:
        confirmer._queues[None].extend([receipt("a"), receipt("b")])
        confirmer._cv.notify()
    assert confirmer.drain(5)
    assert vod.calls == [["a", "b"], ["a"], ["b"]]
    assert sorted(r.handle for r in confirmed) == ["a", "b"]


def test_expired_receipts_are_not_sent_and_are_counted(make: Any, vod: FakeVod) -> None:
    """A handle past its deadline when its turn comes is dropped and counted as expired."""
    clock = Clock()
    confirmer = make(clock=clock)
    confirmer.submit(receipt("late", deadline=clock.now - 1))
    assert confirmer.drain(5)
    assert vod.calls == []
    assert confirmer.expired == 1


def test_drain_waits_for_a_failed_batch_being_put_back(
        make: Any, vod: FakeVod, confirmed: list[Receipt]) -> None:
    """Under forced preemption, a transient failure puts the batch back before the call
    stops counting: drain() never reports done while a handle is still unconfirmed."""
    with forced_preemption():
        for n in range(20):
            vod.answers = [ApiError("InternalError", "try again")]
            confirmed.clear()
            confirmer = make()
            confirmer.submit(receipt(f"r{n}"))
            drained = confirmer.drain(5)
            assert not drained or [r.handle for r in confirmed] == [f"r{n}"]


def test_pacer_spaces_calls_after_the_burst() -> None:
    """At 10 calls/s with a burst of 2: two calls go at once, then one every 100 ms."""
    clock = Clock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))

    pacer = Pacer(10.0, burst=2, clock=clock, sleep=sleep)
    waits = [pacer.wait() for _ in range(5)]
    assert [round(w, 6) for w in waits] == [0.0, 0.0, 0.1, 0.2, 0.3]
    assert slept == [0.1, 0.2, 0.3]


def test_pull_gate_lets_one_pull_in_at_a_time_while_the_queue_is_short() -> None:
    """After a partial pull only one pull per sub-app is in flight; after a full one (a
    backlog) several may be."""
    gate = _PullGate()
    assert gate.enter(None, 0.1)
    gate.leave(None, full=False)
    assert gate.enter(None, 0.1)
    assert not gate.enter(None, 0.05)  # the queue looked empty: one at a time
    gate.leave(None, full=True)
    assert gate.enter(None, 0.1)
    assert gate.enter(None, 0.1)  # backlog: all pullers pull
