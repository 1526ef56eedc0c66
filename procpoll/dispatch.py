"""Routing, per-task ordering, bounded concurrency and the per-sink retry policy.

Each pulled event becomes one `Work` item. Work items of one task (same ordering
key) run one at a time in arrival order; different tasks run on up to
`concurrency` worker threads. When an event comes back with a new handle while its
work is queued or running, the handle is attached to that work instead of starting
a second delivery; the newest live handle is confirmed when the work completes.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from procpoll.deadletter import DeadLetter
from procpoll.errors import LedgerError, SinkError
from procpoll.events import Event
from procpoll.ledger import Ledger, Outcome, SinkState
from procpoll.sinks.base import Delivery, Sink, SinkConfig

log = structlog.get_logger("procpoll.dispatch")

PULL_BATCH_MAX = 16
"""PullEvents returns at most this many events: the room a pull needs."""
UNROUTED_TYPES_REMEMBERED = 256
UNROUTED_TYPE_CHARS = 128


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery of an event by VOD: its handle and the moment it stops being confirmable."""

    handle: str
    sub_app_id: int | None
    deadline: float


@dataclass(slots=True)
class Work:
    """One event on its way to its sinks, with every handle VOD gave for it meanwhile."""

    event: Event
    sub_app_id: int | None
    receipts: list[Receipt] = field(default_factory=list)

    def latest_deadline(self) -> float:
        """The deadline of the newest handle."""
        return max(r.deadline for r in self.receipts)


@dataclass(frozen=True, slots=True)
class Route:
    """A configured sink and its settings."""

    config: SinkConfig
    sink: Sink


@dataclass(frozen=True, slots=True)
class Policy:
    """Dispatch settings taken from [daemon]."""

    concurrency: int = 16
    max_in_flight: int = 256
    unrouted: str = "confirm"
    max_age_s: float = 2 * 86_400.0
    confirm_margin_s: float = 2.0


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter for the n-th retry (1-based)."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt - 1, 30)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not cryptography


class Dispatcher:
    """Runs sink deliveries on a bounded pool and hands completed work to `confirm`."""

    def __init__(
        self,
        routes: Sequence[Route],
        ledger: Ledger,
        confirm: Callable[[Receipt, Event], None],
        *,
        policy: Policy,
        dead_letter: DeadLetter | None,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.routes = list(routes)
        self._ledger = ledger
        self._confirm = confirm
        self._policy = policy
        self.dead_letter = dead_letter
        self._stop = stop
        self._clock = clock
        self._lock = threading.Condition()
        self._by_key: dict[tuple[int | None, str], Work] = {}
        self._lanes: dict[str, deque[Work]] = {}
        self._ready: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._failure_streak = 0
        self._unrouted_seen: set[str] = set()
        self._reserved = 0  # room held for pulls in progress (PULL_BATCH_MAX each)
        self._threads: list[threading.Thread] = []
        self.counters = {"delivered": 0, "failed": 0, "duplicates": 0, "dead": 0,
                         "unrouted": 0, "reattached": 0}

    def reconfigure(self, routes: Sequence[Route], policy: Policy,
                    dead_letter: DeadLetter | None) -> list[Route]:
        """Swap sinks and policies (pool sizes stay); returns the routes replaced."""
        with self._lock:
            old, self.routes = self.routes, list(routes)
            self._policy = Policy(self._policy.concurrency, self._policy.max_in_flight,
                                  policy.unrouted, policy.max_age_s, policy.confirm_margin_s)
            self.dead_letter = dead_letter
        return old

    def start(self) -> None:
        """Start the worker threads."""
        for n in range(self._policy.concurrency):
            thread = threading.Thread(target=self._worker, name=f"dispatch-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, event: Event, receipt: Receipt) -> None:
        """Queue an event, or attach the receipt to the work already carrying it."""
        with self._lock:
            key = (receipt.sub_app_id, event.key)
            work = self._by_key.get(key)
            if work is not None:
                work.receipts.append(receipt)
                self._count("reattached")
                log.info("event.reattached", event_key=event.key, event_type=event.event_type,
                         task_id=event.task_id, handles=len(work.receipts))
                return
            work = Work(event, receipt.sub_app_id, [receipt])
            self._by_key[key] = work
            lane = self._lanes.setdefault(event.ordering_key, deque())
            lane.append(work)
            if len(lane) == 1:
                self._ready.put(work)

    @property
    def in_flight(self) -> int:
        """Events held in memory: queued or being delivered."""
        with self._lock:
            return len(self._by_key)

    def wait_capacity(self, timeout_s: float) -> bool:
        """Wait until a full pull fits under max_in_flight and reserve that room, to be given
        back by release_capacity(): pullers polling at once cannot overshoot together."""
        with self._lock:
            if not self._lock.wait_for(self._has_room, timeout_s):
                return False
            self._reserved += PULL_BATCH_MAX
            return True

    def release_capacity(self) -> None:
        """The reserving pull was submitted (its events now count themselves) or failed."""
        with self._lock:
            self._reserved -= PULL_BATCH_MAX
            self._lock.notify_all()

    def _has_room(self) -> bool:
        held = len(self._by_key) + self._reserved
        return held + PULL_BATCH_MAX <= self._policy.max_in_flight

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no work is queued or running."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._by_key, timeout_s)

    def pull_delay_s(self) -> float:
        """How long pullers should wait before the next pull: back-pressure while sinks fail."""
        streak = self._failure_streak
        return 0.0 if streak == 0 else backoff_s(streak, 0.5, 30.0)

    def close(self) -> None:
        """Let idle workers exit; running deliveries finish on their own."""
        for _ in self._threads:
            self._ready.put(None)

    def join(self, timeout_s: float) -> bool:
        """Wait for the workers to exit; False if some are still delivering."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _worker(self) -> None:
        while True:
            work = self._ready.get()
            if work is None or self._stop.is_set():
                return
            try:
                self._process(work)
            except Exception:
                log.exception("event.crashed", event_key=work.event.key)
            finally:
                self._finish(work)

    def _finish(self, work: Work) -> None:
        with self._lock:
            del self._by_key[(work.sub_app_id, work.event.key)]
            lane = self._lanes[work.event.ordering_key]
            lane.popleft()
            if lane:
                self._ready.put(lane[0])
            else:
                del self._lanes[work.event.ordering_key]
            # Wake waiters only when it matters to them: pullers as the count drops just
            # below their threshold, wait_idle at zero. A notify_all per event woke every
            # blocked puller for nothing, a context switch each.
            held = len(self._by_key)
            if held == 0 or held + self._reserved + PULL_BATCH_MAX == self._policy.max_in_flight:
                self._lock.notify_all()

    def _process(self, work: Work) -> None:
        event = work.event
        bound = log.bind(event_key=event.key, event_type=event.event_type, task_id=event.task_id,
                         file_id=event.file_id, status=event.status, sub_app_id=work.sub_app_id)
        wanted = [r for r in self.routes if r.config.wants(event, work.sub_app_id)]
        if not wanted:
            self._unrouted(work, bound)
            return
        try:
            states = self._ledger.states(event.key)
            todo = [r for r in wanted if not (r.config.name in states
                                              and states[r.config.name].done)]
            if not todo:
                self._count("duplicates")
                bound.info("event.duplicate", sinks=[r.config.name for r in wanted])
                self._complete(work, bound)
                return
            done = True
            for route in todo:
                outcome = self._deliver(work, route, states.get(route.config.name), bound)
                self._ledger.record([outcome])
                done = done and (outcome.delivered or outcome.dead)
        except LedgerError as exc:
            bound.error("ledger.write_failed", error=str(exc))
            self._note(success=False)
            return
        self._note(success=done)
        if done:
            self._complete(work, bound)
        else:
            self._count("failed")
            bound.warning("event.not_confirmed", reason="a sink did not take the event")

    def _deliver(self, work: Work, route: Route, state: SinkState | None,
                 bound: structlog.typing.FilteringBoundLogger) -> Outcome:
        cfg, event = route.config, work.event
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                route.sink.deliver(Delivery(event, work.sub_app_id, attempt, cfg.timeout_s))
            except SinkError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 -- a sink bug is a failed delivery
                bound.exception("sink.crashed", sink=cfg.name, attempt=attempt)
                error = SinkError(f"{type(exc).__name__}: {exc}")
            else:
                self._count("delivered")
                bound.info("event.delivered", sink=cfg.name, attempt=attempt,
                           duration_ms=round((time.monotonic() - started) * 1000, 1))
                return Outcome(event.key, cfg.name, delivered=True)
            bound.warning("sink.failed", sink=cfg.name, attempt=attempt, error=error.reason,
                          retryable=error.retryable)
            if not error.retryable or attempt > cfg.retries:
                break
            delay = backoff_s(attempt, cfg.backoff_s, cfg.backoff_max_s)
            budget_end = work.latest_deadline() - self._policy.confirm_margin_s
            if self._clock() + delay >= budget_end or self._stop.wait(delay):
                break
        return self._give_up(work, route, state, error, bound)

    def _give_up(self, work: Work, route: Route, state: SinkState | None, error: SinkError,
                 bound: structlog.typing.FilteringBoundLogger) -> Outcome:
        cfg, event = route.config, work.event
        rounds = (state.attempts if state else 0) + 1
        age_s = time.time() - state.first_seen if state else 0.0
        poison = rounds >= cfg.max_attempts or age_s >= self._policy.max_age_s
        if not poison:
            return Outcome(event.key, cfg.name, delivered=False, error=error.reason)
        if self.dead_letter is None:
            bound.error("event.poison", sink=cfg.name, rounds=rounds, error=error.reason,
                        action="left in VOD: configure [dead_letter] directory to set it aside")
            return Outcome(event.key, cfg.name, delivered=False, error=error.reason)
        try:
            path = self.dead_letter.write(event, work.sub_app_id, sink=cfg.name,
                                           reason=error.reason, rounds=rounds)
        except OSError as exc:
            bound.error("deadletter.write_failed", sink=cfg.name, error=str(exc))
            return Outcome(event.key, cfg.name, delivered=False, error=error.reason)
        self._count("dead")
        bound.error("event.dead_lettered", sink=cfg.name, rounds=rounds, path=str(path),
                    error=error.reason)
        return Outcome(event.key, cfg.name, delivered=False, dead=True, error=error.reason)

    def _unrouted(self, work: Work, bound: structlog.typing.FilteringBoundLogger) -> None:
        self._count("unrouted")
        # Types come from the API: remember a bounded number of bounded names, forgetting
        # all when full (they are then logged once more), so junk types cannot grow memory.
        seen = work.event.event_type[:UNROUTED_TYPE_CHARS]
        if seen not in self._unrouted_seen:
            if len(self._unrouted_seen) >= UNROUTED_TYPES_REMEMBERED:
                self._unrouted_seen.clear()
            self._unrouted_seen.add(seen)
            bound.info("event.unrouted", policy=self._policy.unrouted)
        if self._policy.unrouted == "confirm":
            self._complete(work, bound)

    def _complete(self, work: Work, bound: structlog.typing.FilteringBoundLogger) -> None:
        now = self._clock()
        with self._lock:
            live = [r for r in work.receipts if r.deadline > now]
        if not live:
            bound.warning("event.handle_expired",
                          reason="delivered after the confirm window; VOD will redeliver it "
                                 "and the ledger will absorb the duplicate")
            return
        self._confirm(max(live, key=lambda r: r.deadline), work.event)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _note(self, *, success: bool) -> None:
        with self._lock:
            self._failure_streak = 0 if success else min(self._failure_streak + 1, 30)
