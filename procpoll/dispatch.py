"""Routing, per-task ordering, bounded concurrency and the per-sink retry policy.

Each pulled event becomes one `Work` item. Work items of one task (same ordering
key) run one at a time in arrival order; different tasks run on up to
`concurrency` worker threads. A task's event whose delivery failed stays
*unresolved* until a later round delivers it or sets it aside: meanwhile the
task's other events are not delivered (they stay unconfirmed and come back), so
a receiver never sees FINISH before PROCESSING.

VOD holds at most one live handle per notification. So a handle whose key matches
work in memory whose handles have all expired is a redelivery, attached to that
work (no second concurrent delivery; the newest live handle is confirmed when it
completes); one that arrives while the earlier handle is still live is a second
notification with an identical body, delivered after the first as the next
occurrence (see ledger.delivery_id).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import structlog

from procpoll.deadletter import DeadLetter
from procpoll.errors import LedgerError, SinkError
from procpoll.events import Event
from procpoll.heartbeat import Heartbeat
from procpoll.ledger import (
    ClaimRequest,
    ClaimResult,
    DeliveryLedger,
    Outcome,
    SinkState,
    delivery_id,
)
from procpoll.lint import sink_worst_case_s
from procpoll.sinks.base import Delivery
from procpoll.work import (
    Policy,
    Receipt,
    Route,
    UnresolvedTasks,
    Work,
    backoff_s,
    close_sinks,
    consumer_id,
)

__all__ = ["PULL_BATCH_MAX", "Dispatcher", "Policy", "Receipt", "Route", "Work", "backoff_s",
           "close_sinks"]

log = structlog.get_logger("procpoll.dispatch")

PULL_BATCH_MAX = 16
"""PullEvents returns at most this many events: the room a pull needs."""
UNROUTED_TYPES_REMEMBERED = 256
UNROUTED_TYPE_CHARS = 128
LEDGER_CALL_LIMIT_S = 30.0
"""A ledger read or commit taking longer than this is a hang, for the watchdog."""
CLAIM_MARGIN_S = 5.0
"""Lease time beyond the sinks' worst case: the ledger writes around the delivery."""
CLAIM_POLL_S = 0.25
"""How often a consumer waiting on another's claim looks at the ledger."""


def _attempts(states: dict[str, SinkState], route: Route) -> int:
    state = states.get(route.config.name)
    return state.attempts if state else 0


@dataclass(slots=True)
class _Generation:
    """The sinks and settings of one (re)load; its sinks close after their last delivery."""

    routes: list[Route]
    policy: Policy
    dead_letter: DeadLetter | None
    users: int = 0
    retired: bool = False


class Dispatcher:
    """Runs sink deliveries on a bounded pool and hands completed work to `confirm`."""

    def __init__(
        self,
        routes: Sequence[Route],
        ledger: DeliveryLedger,
        confirm: Callable[[Receipt, Event], None],
        *,
        policy: Policy,
        dead_letter: DeadLetter | None,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        heartbeat: Heartbeat | None = None,
        on_delivery: Callable[[str, str, float | None], None] | None = None,
        owner: str | None = None,
        on_ledger_error: Callable[[], None] | None = None,
    ) -> None:
        self._gen = _Generation(list(routes), policy, dead_letter)
        self._ledger = ledger
        self._confirm = confirm
        self._stop = stop
        self._clock = clock
        self._wall_clock = wall_clock
        self._heartbeat = heartbeat
        self._on_delivery = on_delivery or (lambda _sink, _outcome, _s: None)
        self._owner = owner or consumer_id()
        self._on_ledger_error = on_ledger_error or (lambda: None)
        self._sink_pool: ThreadPoolExecutor | None = None
        # A plain lock (taken several times per event; a Condition's `with` is Python code
        # over an RLock) and a condition on it for the few that wait.
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._by_key: dict[tuple[int | None, str], list[Work]] = {}
        self._held = 0  # work items in memory
        self._lanes: dict[str, deque[Work]] = {}
        self._ready: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._unresolved = UnresolvedTasks()
        self._failure_streak = 0
        self._unrouted_seen: set[str] = set()
        self._reserved = 0  # room held for pulls in progress (PULL_BATCH_MAX each)
        self._threads: list[threading.Thread] = []
        self.counters = {"delivered": 0, "failed": 0, "duplicates": 0, "dead": 0,
                         "already_dead": 0, "deferred": 0, "unrouted": 0, "reattached": 0,
                         "awaited": 0}

    @property
    def routes(self) -> list[Route]:
        """The sinks in force."""
        return self._gen.routes

    @property
    def dead_letter(self) -> DeadLetter | None:
        """The dead-letter directory in force."""
        return self._gen.dead_letter

    @property
    def policy(self) -> Policy:
        """The dispatch settings in force."""
        return self._gen.policy

    def reconfigure(self, routes: Sequence[Route], policy: Policy,
                    dead_letter: DeadLetter | None) -> None:
        """Swap sinks and policies (pool sizes stay).

        Deliveries already running finish on the sinks and settings they started with;
        the old sinks are closed when the last of them ends, not on a timer.
        """
        with self._mutex:
            old = self._gen
            kept = dataclasses.replace(policy, concurrency=old.policy.concurrency,
                                       max_in_flight=old.policy.max_in_flight)
            self._gen = _Generation(list(routes), kept, dead_letter)
            old.retired = True
            idle = old.users == 0
        if idle:
            close_sinks(old.routes)

    def start(self) -> None:
        """Start the worker threads."""
        for n in range(self._gen.policy.concurrency):
            thread = threading.Thread(target=self._worker, name=f"dispatch-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, event: Event, receipt: Receipt) -> None:
        """Queue an event, or attach the receipt to the work already carrying it."""
        with self._mutex:
            key = (receipt.sub_app_id, event.key)
            chain = self._by_key.get(key)
            if chain is not None:
                now = self._clock()
                for work in chain:
                    if not work.live(now):  # its handle expired: this is its redelivery
                        work.receipts.append(receipt)
                        self.counters["reattached"] += 1
                        log.info("event.reattached", event_key=event.key,
                                 event_type=event.event_type, task_id=event.task_id,
                                 handles=len(work.receipts))
                        return
            # No earlier handle of this key has expired: a new notification.
            work = Work(event, receipt.sub_app_id, [receipt],
                        after=chain[-1] if chain else None)
            if chain is None:
                self._by_key[key] = [work]
            else:
                chain.append(work)
            self._held += 1
            lane = self._lanes.setdefault(event.ordering_key, deque())
            lane.append(work)
            if len(lane) == 1:
                self._ready.put(work)

    @property
    def in_flight(self) -> int:
        """Events held in memory: queued or being delivered."""
        with self._mutex:
            return self._held

    def oldest_deadline(self) -> float | None:
        """The earliest first-handle deadline of the work in memory (None when idle)."""
        with self._mutex:
            return min((chain[0].receipts[0].deadline for chain in self._by_key.values()),
                       default=None)

    def wait_capacity(self, timeout_s: float) -> bool:
        """Wait until a full pull fits under max_in_flight and reserve that room, to be given
        back by release_capacity(): pullers polling at once cannot overshoot together."""
        with self._mutex:
            if not self._changed.wait_for(self._has_room, timeout_s):
                return False
            self._reserved += PULL_BATCH_MAX
            return True

    def release_capacity(self) -> None:
        """The reserving pull was submitted (its events now count themselves) or failed."""
        with self._mutex:
            self._reserved -= PULL_BATCH_MAX
            self._changed.notify_all()

    def _has_room(self) -> bool:
        return self._held + self._reserved + PULL_BATCH_MAX <= self._gen.policy.max_in_flight

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no work is queued or running."""
        with self._mutex:
            return self._changed.wait_for(lambda: self._held == 0, timeout_s)

    def pull_delay_s(self) -> float:
        """How long pullers should wait before the next pull: back-pressure while sinks fail."""
        streak = self._failure_streak
        return 0.0 if streak == 0 else backoff_s(streak, 0.5, 30.0)

    def close(self) -> None:
        """Let idle workers exit; running deliveries finish on their own."""
        for _ in self._threads:
            self._ready.put(None)
        with self._mutex:
            pool, self._sink_pool = self._sink_pool, None
        if pool is not None:
            pool.shutdown(wait=False)

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
            with self._mutex:
                gen = self._gen
                gen.users += 1
            try:
                self._process(work, gen)
            except Exception:
                log.exception("event.crashed", event_key=work.event.key)
            finally:
                self._finish(work, gen)

    def _finish(self, work: Work, gen: _Generation) -> None:
        with self._mutex:
            gen.users -= 1
            retire = gen.retired and gen.users == 0
            key = (work.sub_app_id, work.event.key)
            chain = self._by_key[key]
            chain.remove(work)
            if not chain:
                del self._by_key[key]
            for later in chain:
                if later.after is work:
                    # Keep its number: the next one continues after it, not from scratch.
                    later.after = work if work.occurrence is not None else work.after
            self._held -= 1
            lane = self._lanes[work.event.ordering_key]
            lane.popleft()
            if lane:
                self._ready.put(lane[0])
            else:
                del self._lanes[work.event.ordering_key]
            # Wake waiters only when it matters to them: pullers as the count drops just
            # below their threshold, wait_idle at zero. A notify_all per event woke every
            # blocked puller for nothing, a context switch each.
            held = self._held
            if held == 0 or held + self._reserved + PULL_BATCH_MAX == gen.policy.max_in_flight:
                self._changed.notify_all()
        if retire:
            close_sinks(gen.routes)

    def _busy(self, what: str, limit_s: float) -> Any:
        return nullcontext() if self._heartbeat is None else self._heartbeat.busy(what, limit_s)

    def _process(self, work: Work, gen: _Generation) -> None:
        event = work.event
        bound = log.bind(event_key=event.key, event_type=event.event_type, task_id=event.task_id,
                         file_id=event.file_id, status=event.status, sub_app_id=work.sub_app_id)
        wanted = [r for r in gen.routes if r.config.wants(event, work.sub_app_id)]
        if not wanted:
            self._unrouted(work, gen, bound)
            return
        # On a shared ledger the claim checks the task's order against every consumer.
        if not self._ledger.shared and self._deferred(work, bound):
            return
        try:
            after = work.after.occurrence if work.after is not None else None
            with self._busy("ledger lookup", LEDGER_CALL_LIMIT_S):
                occurrence, states = self._ledger.lookup(event.key, -1 if after is None else after)
            if occurrence != (0 if after is None else after + 1) and not work.live(self._clock()):
                # A confirmation moved this key on, and every handle here has expired: the
                # handles may predate that confirmation (another consumer got this same
                # notification after ours lapsed, and confirmed it). A live handle proves
                # they do not (VOD holds one live handle per notification); without one,
                # a new notification would come back live, so deliver nothing now.
                self._count("duplicates")
                bound.info("event.stale_handle", occurrence=occurrence,
                           reason="its handles expired before a confirmation of this key; "
                                  "a new notification would come back with a live handle")
                return
            work.occurrence = occurrence
            if occurrence:
                bound = bound.bind(occurrence=occurrence)
            todo = [r for r in wanted if not (r.config.name in states
                                              and states[r.config.name].done)]
            if not todo:
                self._already_done(wanted, states, bound)
                self._resolve(work)
                self._complete(work, bound)
                return
            delivered: dict[str, tuple[int, float]] = {}  # for the log: attempts, seconds
            done = self._deliver_all(work, todo, states, gen, bound, delivered=delivered)
            if done is None:
                return  # deferred, or left to VOD while another consumer delivers
        except LedgerError as exc:
            bound.error("ledger.write_failed", error=str(exc))
            self._on_ledger_error()
            self._count("failed")
            self._unresolved_add(work, gen)
            self._note(success=False)
            return
        self._note(success=done)
        if done:
            if delivered:
                # The event's one line at info: every sink it reached now, how, how long.
                bound.info("event.delivered", sinks=list(delivered),
                           attempts={name: a for name, (a, _) in delivered.items()},
                           duration_ms={name: round(seconds * 1000, 1)
                                        for name, (_, seconds) in delivered.items()})
            self._resolve(work)
            self._complete(work, bound)
        else:
            self._count("failed")
            self._unresolved_add(work, gen)
            bound.warning("event.not_confirmed", reason="a sink did not take the event")

    def _deliver_all(self, work: Work, todo: list[Route], states: dict[str, SinkState],
                     gen: _Generation, bound: structlog.typing.FilteringBoundLogger, *,
                     delivered: dict[str, tuple[int, float]]) -> bool | None:
        """Deliver to the sinks still missing this occurrence; True when every one has it
        (or set it aside), False when one failed, None when nothing more can be done now.

        On a shared ledger each sink is claimed first: a sink another live consumer holds
        is waited for, not delivered twice; its expired claim is taken over. `delivered`
        collects (attempts, seconds) per sink that took it, for the event's log line.
        """
        event = work.event
        did = delivery_id(event.key, work.occurrence or 0)
        pending = todo
        done = True
        while pending:
            mine, held = pending, {}
            if self._ledger.shared:
                result = self._claim(did, pending, event.ordering_key, gen)
                if result.blocked_by is not None:
                    self._defer(work, result.blocked_by, bound)
                    return None
                mine = [r for r in pending if r.config.name in result.acquired]
                held = dict(result.held)
            outcomes = self._deliver_routes(work, mine, states, gen, bound,
                                            delivered=delivered)
            if outcomes:
                with self._busy("ledger write", LEDGER_CALL_LIMIT_S):
                    self._ledger.record(outcomes)
                done = done and all(o.delivered or o.dead for o in outcomes)
            if not held:
                break
            waited = self._await_others(work, [r for r in pending if r.config.name in held],
                                        held=held, before=states, gen=gen, bound=bound)
            if waited is None:
                return None
            pending = waited
        return done

    def _claim(self, did: str, routes: list[Route], ordering_key: str,
               gen: _Generation) -> ClaimResult:
        # The lease covers the slowest sink's whole round (they run in parallel) and a
        # margin for the ledger writes around it.
        lease_s = max(sink_worst_case_s(r.config) for r in routes) + CLAIM_MARGIN_S
        request = ClaimRequest(did, tuple(r.config.name for r in routes), self._owner, lease_s,
                               ordering_key, gen.policy.unresolved_hold_s)
        with self._busy("ledger claim", LEDGER_CALL_LIMIT_S):
            return self._ledger.claim(request)

    def _deliver_routes(self, work: Work, routes: list[Route], states: dict[str, SinkState],
                        gen: _Generation, bound: structlog.typing.FilteringBoundLogger, *,
                        delivered: dict[str, tuple[int, float]]) -> list[Outcome]:
        """One round per sink; several sinks of one event run in parallel, so their worst
        cases do not add up inside the confirm window."""
        if len(routes) <= 1:
            return [self._deliver(work, r, states.get(r.config.name), gen, bound,
                                  delivered=delivered)
                    for r in routes]
        futures = [self._pool().submit(self._deliver, work, r, states.get(r.config.name), gen,
                                       bound, delivered=delivered) for r in routes]
        return [f.result() for f in futures]

    def _pool(self) -> ThreadPoolExecutor:
        with self._mutex:
            if self._sink_pool is None:
                self._sink_pool = ThreadPoolExecutor(
                    max_workers=max(2, self._gen.policy.concurrency),
                    thread_name_prefix="sink")
            return self._sink_pool

    def _await_others(self, work: Work, routes: list[Route], *,
                      held: dict[str, tuple[str, float]], before: dict[str, SinkState],
                      gen: _Generation,
                      bound: structlog.typing.FilteringBoundLogger) -> list[Route] | None:
        """Another consumer is delivering these sinks: wait for its outcome.

        Returns the sinks to claim again (its lease expired, or it failed), [] when all
        are done, None when the handle's window ends first (VOD redelivers the event).
        """
        event = work.event
        self._count("awaited")
        bound.info("event.claimed_elsewhere", sinks=sorted(held),
                   owners=sorted({owner for owner, _ in held.values()}))
        expires = {name: self._clock() + left for name, (_, left) in held.items()}
        budget_end = work.latest_deadline() - gen.policy.confirm_margin_s
        while True:
            if self._stop.wait(CLAIM_POLL_S) or self._clock() >= budget_end:
                bound.info("event.left_to_vod", sinks=sorted(held),
                           reason="another consumer still holds the delivery; the event "
                                  "comes back and is confirmed once it is recorded")
                return None
            with self._busy("ledger lookup", LEDGER_CALL_LIMIT_S):
                states = self._ledger.states(event.key, work.occurrence or 0)
            open_routes = [r for r in routes if not (r.config.name in states
                                                     and states[r.config.name].done)]
            if not open_routes:
                for route in routes:
                    self._on_delivery(route.config.name, "duplicate", None)
                return []
            now = self._clock()
            # Its lease expired (the owner died), or it recorded a failed round.
            retry = [r for r in open_routes if expires[r.config.name] <= now
                     or _attempts(states, r) > _attempts(before, r)]
            if retry:
                return retry

    def _defer(self, work: Work, blocker: str,
               bound: structlog.typing.FilteringBoundLogger) -> None:
        self._count("deferred")
        bound.info("event.deferred", waiting_for=blocker,
                   reason="an earlier event of this task is not delivered yet; this one "
                          "stays unconfirmed and comes back after it")

    def _already_done(self, wanted: list[Route], states: dict[str, SinkState],
                      bound: structlog.typing.FilteringBoundLogger) -> None:
        """Every wanted sink has this occurrence: a redelivery (or one set aside before)."""
        names = [r.config.name for r in wanted]
        if all(states[name].delivered for name in names):
            self._count("duplicates")
            for name in names:
                self._on_delivery(name, "duplicate", None)
            bound.info("event.duplicate", sinks=names)
        else:
            self._count("already_dead")
            bound.info("event.already_dead_lettered", sinks=names)

    def _deferred(self, work: Work, bound: structlog.typing.FilteringBoundLogger) -> bool:
        """Whether an earlier event of the same task is unresolved: then this one waits."""
        blocker = self._unresolved.blocker(work.event, self._clock())
        if blocker is None:
            return False
        self._defer(work, blocker, bound)
        return True

    def _unresolved_add(self, work: Work, gen: _Generation) -> None:
        self._unresolved.add(work.event, self._clock() + gen.policy.unresolved_hold_s,
                             self._clock())

    def _resolve(self, work: Work) -> None:
        self._unresolved.resolve(work.event)

    def _deliver(self, work: Work, route: Route, state: SinkState | None, gen: _Generation,
                 bound: structlog.typing.FilteringBoundLogger, *,
                 delivered: dict[str, tuple[int, float]]) -> Outcome:
        cfg, event = route.config, work.event
        did = delivery_id(event.key, work.occurrence or 0)
        attempt = 0
        while True:
            attempt += 1
            started = self._clock()
            try:
                # A sink that ignores its own timeout by more than this is hung.
                with self._busy(f"sink {cfg.name}", cfg.timeout_s * 2 + 5.0):
                    route.sink.deliver(Delivery(event, work.sub_app_id, attempt, cfg.timeout_s,
                                                did))
            except SinkError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 -- a sink bug is a failed delivery
                bound.exception("sink.crashed", sink=cfg.name, attempt=attempt)
                error = SinkError(f"{type(exc).__name__}: {exc}")
            else:
                elapsed = self._clock() - started
                self._count("delivered")
                self._on_delivery(cfg.name, "delivered", elapsed)
                # Each sink at debug; the event's one info line sums them up (_process).
                delivered[cfg.name] = (attempt, elapsed)
                bound.debug("sink.delivered", sink=cfg.name, attempt=attempt,
                            duration_ms=round(elapsed * 1000, 1))
                return Outcome(did, cfg.name, delivered=True, ordering_key=event.ordering_key)
            self._on_delivery(cfg.name, "failed", self._clock() - started)
            bound.warning("sink.failed", sink=cfg.name, attempt=attempt, error=error.reason,
                          retryable=error.retryable)
            if not error.retryable or attempt > cfg.retries:
                break
            delay = backoff_s(attempt, cfg.backoff_s, cfg.backoff_max_s)
            budget_end = work.latest_deadline() - gen.policy.confirm_margin_s
            if self._clock() + delay >= budget_end or self._stop.wait(delay):
                break
        return self._give_up(work, route, error, did=did, state=state, gen=gen, bound=bound)

    def _give_up(self, work: Work, route: Route, error: SinkError, *, did: str,
                 state: SinkState | None, gen: _Generation,
                 bound: structlog.typing.FilteringBoundLogger) -> Outcome:
        cfg, event = route.config, work.event
        rounds = (state.attempts if state else 0) + 1
        age_s = self._wall_clock() - state.first_seen if state else 0.0
        poison = rounds >= cfg.max_attempts or age_s >= gen.policy.max_age_s
        if not poison:
            return Outcome(did, cfg.name, delivered=False, error=error.reason,
                           ordering_key=event.ordering_key)
        if gen.dead_letter is None:
            bound.error("event.poison", sink=cfg.name, rounds=rounds, error=error.reason,
                        action="left in VOD: configure [dead_letter] directory to set it aside")
            return Outcome(did, cfg.name, delivered=False, error=error.reason,
                           ordering_key=event.ordering_key)
        try:
            path = gen.dead_letter.write(event, work.sub_app_id, sink=cfg.name,
                                         reason=error.reason, rounds=rounds, delivery_id=did)
        except OSError as exc:
            bound.error("deadletter.write_failed", sink=cfg.name, error=str(exc))
            return Outcome(did, cfg.name, delivered=False, error=error.reason,
                           ordering_key=event.ordering_key)
        self._count("dead")
        self._on_delivery(cfg.name, "dead", None)
        bound.error("event.dead_lettered", sink=cfg.name, rounds=rounds, path=str(path),
                    error=error.reason)
        return Outcome(did, cfg.name, delivered=False, dead=True, error=error.reason,
                       ordering_key=event.ordering_key)

    def _unrouted(self, work: Work, gen: _Generation,
                  bound: structlog.typing.FilteringBoundLogger) -> None:
        self._count("unrouted")
        # Types come from the API: remember a bounded number of bounded names, forgetting
        # all when full (they are then logged once more), so junk types cannot grow memory.
        seen = work.event.event_type[:UNROUTED_TYPE_CHARS]
        with self._mutex:
            first = seen not in self._unrouted_seen
            if first:
                if len(self._unrouted_seen) >= UNROUTED_TYPES_REMEMBERED:
                    self._unrouted_seen.clear()
                self._unrouted_seen.add(seen)
        if first:
            bound.info("event.unrouted", policy=gen.policy.unrouted)
        if gen.policy.unrouted == "confirm":
            self._complete(work, bound)

    def _complete(self, work: Work, bound: structlog.typing.FilteringBoundLogger) -> None:
        now = self._clock()
        with self._mutex:
            live = [r for r in work.receipts if r.deadline > now]
        if not live:
            bound.warning("event.handle_expired",
                          reason="delivered after the confirm window; VOD will redeliver it "
                                 "and the ledger will absorb the duplicate")
            return
        newest = max(live, key=lambda r: r.deadline)
        if work.occurrence is not None:
            newest = dataclasses.replace(newest, event_key=work.event.key,
                                         occurrence=work.occurrence)
        self._confirm(newest, work.event)

    def _count(self, name: str) -> None:
        with self._mutex:
            self.counters[name] += 1

    def _note(self, *, success: bool) -> None:
        with self._mutex:
            self._failure_streak = 0 if success else min(self._failure_streak + 1, 30)
