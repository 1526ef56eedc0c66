"""What the dispatcher works with: receipts, work items, routes, the policy, and backoff.

A `Receipt` is one handle VOD gave for an event; a `Work` is one notification on its
way to its sinks with every handle that arrived for it; a `Route` is a configured sink.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from procpoll.events import Event
from procpoll.sinks.base import Sink, SinkConfig

log = structlog.get_logger("procpoll.dispatch")


def consumer_id() -> str:
    """This process as a claim owner: host, pid and start time (a reused pid differs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery of an event by VOD: its handle and the moment it stops being confirmable.

    Once the event is complete, `event_key` and `occurrence` say which notification the
    handle confirms, so the ledger can record that ConfirmEvents accepted it.
    """

    handle: str
    sub_app_id: int | None
    deadline: float
    event_key: str | None = None
    occurrence: int = 0


@dataclass(slots=True)
class Work:
    """One event on its way to its sinks, with every handle VOD gave for it meanwhile."""

    event: Event
    sub_app_id: int | None
    receipts: list[Receipt] = field(default_factory=list)
    after: Work | None = None  # an earlier notification with an identical body, in memory
    occurrence: int | None = None  # which occurrence of the key this is, once looked up

    def latest_deadline(self) -> float:
        """The deadline of the newest handle."""
        return max(r.deadline for r in self.receipts)

    def live(self, now: float) -> bool:
        """Whether one of its handles can still be confirmed."""
        return any(r.deadline > now for r in self.receipts)


@dataclass(frozen=True, slots=True)
class Route:
    """A configured sink and its settings."""

    config: SinkConfig
    sink: Sink


@dataclass(frozen=True, slots=True)
class Policy:
    """Dispatch settings taken from [daemon] (and the confirm window)."""

    concurrency: int = 16
    max_in_flight: int = 256
    unrouted: str = "confirm"
    max_age_s: float = 2 * 86_400.0
    confirm_margin_s: float = 2.0
    # How long a failed event blocks its task's later events without coming back: VOD
    # redelivers it one confirm window after its pull, so two windows is generous.
    unresolved_hold_s: float = 60.0


class UnresolvedTasks:
    """In one process: per task (ordering key), the events whose delivery failed and that
    have not come back delivered yet, each until a time after which it stops blocking."""

    _PURGE_AT = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_task: dict[str, dict[str, float]] = {}  # ordering key -> event key -> until

    def blocker(self, event: Event, now: float) -> str | None:
        """Another unresolved event of this event's task, if any."""
        with self._lock:
            pending = self._by_task.get(event.ordering_key)
            if not pending:
                return None
            for key in [k for k, until in pending.items() if until <= now]:
                del pending[key]
            if not pending:
                del self._by_task[event.ordering_key]
            return next((k for k in pending if k != event.key), None)

    def add(self, event: Event, until: float, now: float) -> None:
        """The event failed: it blocks its task until `until` unless resolved before."""
        with self._lock:
            if len(self._by_task) >= self._PURGE_AT:
                for ordering, pending in list(self._by_task.items()):
                    for key in [k for k, t in pending.items() if t <= now]:
                        del pending[key]
                    if not pending:
                        del self._by_task[ordering]
            self._by_task.setdefault(event.ordering_key, {})[event.key] = until

    def resolve(self, event: Event) -> None:
        """The event was delivered or set aside."""
        with self._lock:
            pending = self._by_task.get(event.ordering_key)
            if pending is not None:
                pending.pop(event.key, None)
                if not pending:
                    del self._by_task[event.ordering_key]


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter for the n-th retry (1-based)."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt - 1, 30)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not cryptography


def close_sinks(routes: Sequence[Route]) -> None:
    """Close each sink; a failure to close one does not stop the others."""
    for route in routes:
        try:
            route.sink.close()
        except Exception:  # closing one sink must not stop the others
            log.exception("sink.close_failed", sink=route.config.name)
