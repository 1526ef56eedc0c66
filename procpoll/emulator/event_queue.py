"""The emulator's event store: one queue per SubAppId, confirm windows, handles, counts.

An event is *pending* until pulled, then *in flight* under a fresh handle until it is
confirmed or its confirm window lapses; a lapsed event is pending again and its next pull
issues a new handle (a redelivery). Retired handles (confirmed or expired) are remembered,
up to a bound, so a late or repeated confirm can be told apart from a made-up handle.

All state sits behind one `threading.Condition`: enqueue, confirm and close wake waiters,
and a held pull also wakes when the next confirm window of its queue lapses. Time comes
from the injected `clock`, so windows can be tested without sleeping.
"""

from __future__ import annotations

import heapq
import json
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from procpoll.emulator.latency import LatencyHistogram

SubAppId = int | None
MAX_BATCH = 16
_RETIRED_LIMIT = 200_000


@dataclass
class _Entry:
    seq: int
    body: dict[str, Any]
    deadline: float = 0.0
    deliveries: int = 0
    enqueued_at: float = 0.0


@dataclass
class _AppQueue:
    pending: list[tuple[int, _Entry]] = field(default_factory=list)  # heap by seq
    in_flight: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)  # deadline order
    retired: OrderedDict[str, str] = field(default_factory=OrderedDict)  # handle -> why
    enqueued: int = 0
    delivered: int = 0
    redelivered: int = 0
    confirmed: int = 0
    late_confirms: int = 0


@dataclass(frozen=True)
class ConfirmResult:
    """What a ConfirmEvents batch did: handles confirmed, and each refused handle's reason."""

    confirmed: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]


class EventQueue:
    """Thread-safe per-application queues with VOD's pull/confirm/redeliver semantics."""

    def __init__(
        self,
        *,
        confirm_window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if confirm_window_s <= 0:
            raise ValueError("confirm_window_s must be > 0")
        self.confirm_window_s = confirm_window_s
        self._clock = clock
        self._cond = threading.Condition()
        self._apps: dict[SubAppId, _AppQueue] = {}
        self._seq = 0
        self._handle_base = random.SystemRandom().randrange(10**17, 8 * 10**17)
        self._handles_issued = 0
        self._held_pulls = 0
        self._closed = False
        self._latency = LatencyHistogram()  # enqueue → confirm, all applications

    def enqueue(self, bodies: Iterable[Mapping[str, Any]], sub_app_id: SubAppId = None) -> int:
        """Queue normal-callback bodies (any EventHandle key is dropped); returns the count."""
        entries = []
        for body in bodies:
            if not isinstance(body, Mapping):
                raise TypeError(f"an event body must be a JSON object, not {type(body).__name__}")
            # A JSON round trip takes a private copy and refuses what could not be served.
            copy = json.loads(json.dumps(body, ensure_ascii=False))
            copy.pop("EventHandle", None)
            entries.append(copy)
        with self._cond:
            app = self._app(sub_app_id)
            now = self._clock()
            for copy in entries:
                self._seq += 1
                heapq.heappush(app.pending, (self._seq, _Entry(self._seq, copy, enqueued_at=now)))
            app.enqueued += len(entries)
            self._cond.notify_all()
        return len(entries)

    def pull(
        self, sub_app_id: SubAppId = None, *, limit: int = MAX_BATCH, hold_s: float = 0.0
    ) -> list[tuple[str, dict[str, Any]]]:
        """Take up to `limit` visible events, each under a new handle; hold up to `hold_s`.

        Returns [] when nothing became visible within the hold or the queue was closed.
        The returned bodies are shared, not copied: callers must not mutate them.
        """
        with self._cond:
            deadline = self._clock() + hold_s
            self._held_pulls += 1
            self._cond.notify_all()
            try:
                while True:
                    now = self._clock()
                    app = self._app(sub_app_id)
                    self._expire(app, now)
                    if app.pending:
                        return self._deliver(app, limit, now)
                    if self._closed or now >= deadline:
                        return []
                    wait_s = deadline - now
                    if app.in_flight:
                        next_lapse = next(iter(app.in_flight.values())).deadline
                        wait_s = min(wait_s, next_lapse - now)
                    self._cond.wait(max(wait_s, 0.001))
            finally:
                self._held_pulls -= 1

    def confirm(
        self, handles: Iterable[str], sub_app_id: SubAppId = None, *, strict: bool = False
    ) -> ConfirmResult:
        """Confirm handles of one application's queue.

        A handle is refused when it is expired (counted as a late confirm), already
        confirmed, repeated within the batch, or unknown to this application. Without
        `strict` the good handles are confirmed anyway; with `strict` one refusal
        confirms nothing.
        """
        with self._cond:
            app = self._app(sub_app_id)
            now = self._clock()
            self._expire(app, now)
            good: list[str] = []
            refused: list[tuple[str, str]] = []
            seen: set[str] = set()
            for handle in handles:
                if handle in seen:
                    refused.append((handle, "repeated in this batch"))
                elif handle in app.in_flight:
                    good.append(handle)
                else:
                    why = app.retired.get(handle, "unknown")
                    if why == "expired":
                        app.late_confirms += 1
                    refused.append((handle, why))
                seen.add(handle)
            if strict and refused:
                return ConfirmResult((), tuple(refused))
            for handle in good:
                entry = app.in_flight.pop(handle)
                self._latency.record(now - entry.enqueued_at)
                self._retire(app, handle, "confirmed")
            app.confirmed += len(good)
            if good:
                self._cond.notify_all()
            return ConfirmResult(tuple(good), tuple(refused))

    def pending_count(self, sub_app_id: SubAppId = None) -> int:
        """Events one application could pull right now."""
        with self._cond:
            app = self._app(sub_app_id)
            self._expire(app, self._clock())
            return len(app.pending)

    def counts(self) -> dict[str, Any]:
        """Totals and a per-application breakdown (keys "default" or the SubAppId as text)."""
        with self._cond:
            now = self._clock()
            per_app: dict[str, dict[str, int]] = {}
            for sub_app_id, app in self._apps.items():
                self._expire(app, now)
                per_app["default" if sub_app_id is None else str(sub_app_id)] = {
                    "pending": len(app.pending),
                    "in_flight": len(app.in_flight),
                    "enqueued": app.enqueued,
                    "delivered": app.delivered,
                    "redelivered": app.redelivered,
                    "confirmed": app.confirmed,
                    "late_confirms": app.late_confirms,
                }
            keys = ("pending", "in_flight", "enqueued", "delivered", "redelivered",
                    "confirmed", "late_confirms")  # fmt: skip
            totals: dict[str, Any] = {k: sum(a[k] for a in per_app.values()) for k in keys}
            totals["held_pulls"] = self._held_pulls
            totals["confirm_latency_buckets"] = self._latency.snapshot()
            totals["sub_apps"] = per_app
            return totals

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until nothing is pending or in flight anywhere; False on timeout or close."""

        def drained() -> bool:
            now = self._clock()
            for app in self._apps.values():
                self._expire(app, now)
            return self._closed or all(
                not app.pending and not app.in_flight for app in self._apps.values()
            )

        with self._cond:
            self._cond.wait_for(drained, timeout_s)
            return all(not app.pending and not app.in_flight for app in self._apps.values())

    def wait_held_pulls(self, count: int, timeout_s: float) -> bool:
        """Block until at least `count` pulls are being held (for tests of long polling)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held_pulls >= count, timeout_s)

    def close(self) -> None:
        """Release every held pull and drain waiter; later pulls return at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _app(self, sub_app_id: SubAppId) -> _AppQueue:
        app = self._apps.get(sub_app_id)
        if app is None:
            app = self._apps[sub_app_id] = _AppQueue()
        return app

    def _deliver(self, app: _AppQueue, limit: int, now: float) -> list[tuple[str, dict[str, Any]]]:
        batch: list[tuple[str, dict[str, Any]]] = []
        deadline = now + self.confirm_window_s
        while app.pending and len(batch) < limit:
            _, entry = heapq.heappop(app.pending)
            if entry.deliveries:
                app.redelivered += 1
            entry.deliveries += 1
            entry.deadline = deadline
            self._handles_issued += 1
            handle = str(self._handle_base + self._handles_issued)
            app.in_flight[handle] = entry
            batch.append((handle, entry.body))
        app.delivered += len(batch)
        return batch

    def _expire(self, app: _AppQueue, now: float) -> None:
        # One window length for every delivery keeps in_flight ordered by deadline.
        while app.in_flight:
            handle, entry = next(iter(app.in_flight.items()))
            if entry.deadline > now:
                return
            app.in_flight.popitem(last=False)
            self._retire(app, handle, "expired")
            heapq.heappush(app.pending, (entry.seq, entry))

    @staticmethod
    def _retire(app: _AppQueue, handle: str, why: str) -> None:
        app.retired[handle] = why
        if len(app.retired) > _RETIRED_LIMIT:
            app.retired.popitem(last=False)
