"""EventQueue semantics on a fake clock: windows, redelivery order, refusal reasons, drain."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from procpoll.emulator.event_queue import EventQueue


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bodies(n: int) -> list[dict[str, Any]]:
    return [
        {"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": [str(i)]}} for i in range(n)
    ]


def file_ids(batch: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [body["FileDeleteEvent"]["FileIdSet"][0] for _, body in batch]


@pytest.fixture
def clock() -> FakeClock:
    """The fake clock driving the queue's windows."""
    return FakeClock()


@pytest.fixture
def queue(clock: FakeClock) -> EventQueue:
    """A queue with a 30 s confirm window on the fake clock."""
    return EventQueue(confirm_window_s=30.0, clock=clock)


def test_pulled_events_are_invisible_until_the_window_lapses(
    queue: EventQueue, clock: FakeClock
) -> None:
    """Within the window a pulled event is not pulled again; at the window's end it is."""
    queue.enqueue(bodies(1))
    first = queue.pull()
    clock.now += 29.9
    assert queue.pull() == []
    clock.now += 0.1
    second = queue.pull()
    assert file_ids(second) == file_ids(first)
    assert second[0][0] != first[0][0]
    assert queue.counts()["redelivered"] == 1


def test_redelivered_events_keep_their_place_in_line(queue: EventQueue, clock: FakeClock) -> None:
    """An expired event goes back ahead of events enqueued after it."""
    queue.enqueue(bodies(2))
    queue.pull(limit=1)
    queue.enqueue(bodies(3)[2:])
    clock.now += 30
    assert file_ids(queue.pull()) == ["0", "1", "2"]


def test_confirm_reports_why_each_handle_was_refused(queue: EventQueue, clock: FakeClock) -> None:
    """Refusals name the reason: expired (late), confirmed, repeated, unknown."""
    queue.enqueue(bodies(3))
    (h1, _), (h2, _), (h3, _) = queue.pull()
    assert queue.confirm([h1]).confirmed == (h1,)
    clock.now += 31
    result = queue.confirm([h1, h2, "bogus"])
    assert result.refused == ((h1, "confirmed"), (h2, "expired"), ("bogus", "unknown"))
    (h4, _), (h5, _) = queue.pull()
    repeated = queue.confirm([h4, h4])
    assert repeated.confirmed == (h4,)
    assert repeated.refused == ((h4, "repeated in this batch"),)
    assert h3 not in (h4, h5)
    assert queue.counts()["late_confirms"] == 1


def test_strict_confirm_changes_nothing_on_refusal(queue: EventQueue) -> None:
    """With strict=True a batch holding a bad handle confirms none of its good ones."""
    queue.enqueue(bodies(2))
    pulled = [handle for handle, _ in queue.pull()]
    assert queue.confirm([*pulled, "bogus"], strict=True).confirmed == ()
    assert queue.counts()["in_flight"] == 2
    assert queue.confirm(pulled, strict=True).confirmed == tuple(pulled)


def test_handles_belong_to_their_sub_app(queue: EventQueue) -> None:
    """A handle issued for one SubAppId is unknown to another."""
    queue.enqueue(bodies(1), sub_app_id=5)
    ((handle, _),) = queue.pull(5)
    assert queue.confirm([handle]).refused == ((handle, "unknown"),)
    assert queue.confirm([handle], 5).confirmed == (handle,)


def test_enqueue_copies_bodies_and_drops_event_handles(queue: EventQueue) -> None:
    """A stored body is a private copy without EventHandle; later caller edits do not leak."""
    body: dict[str, Any] = {"EventHandle": "old", "EventType": "X", "XEvent": {"A": [1]}}
    queue.enqueue([body])
    body["XEvent"]["A"].append(2)
    ((_, stored),) = queue.pull()
    assert stored == {"EventType": "X", "XEvent": {"A": [1]}}


def test_wait_drained_wakes_on_the_last_confirm(queue: EventQueue) -> None:
    """wait_drained blocks while events are in flight and returns True on the final confirm."""
    queue.enqueue(bodies(1))
    ((handle, _),) = queue.pull()
    assert not queue.wait_drained(0.01)
    confirmer = threading.Timer(0.05, lambda: queue.confirm([handle]))
    confirmer.start()
    assert queue.wait_drained(5)
    confirmer.join()


def test_close_releases_held_pulls(queue: EventQueue) -> None:
    """close() ends a pull held on an empty queue at once with no events."""
    results: list[list[tuple[str, dict[str, Any]]]] = []
    puller = threading.Thread(target=lambda: results.append(queue.pull(hold_s=30)))
    puller.start()
    assert queue.wait_held_pulls(1, 5)
    queue.close()
    puller.join(2)
    assert results == [[]]
