"""The Sink protocol, per-sink common settings and the sink-type registry entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from procpoll.events import Event
from procpoll.schema import Table


@dataclass(frozen=True, slots=True)
class Delivery:
    """One call of one sink for one event."""

    event: Event
    sub_app_id: int | None
    attempt: int
    timeout_s: float
    # Which occurrence of the event this is: the event key for the first, "key~n" for the
    # n-th notification with an identical body (see ledger.delivery_id). Receivers
    # deduplicate on it, so a second identical notification is not taken for a repeat.
    delivery_id: str = ""

    @property
    def identity(self) -> str:
        """The id to deduplicate this delivery on."""
        return self.delivery_id or self.event.key


class Sink(Protocol):
    """Something that takes an event and says whether it has it.

    `deliver` returns when the sink durably has the event; it raises `SinkError`
    otherwise (retryable or not). It must honour `delivery.timeout_s` itself.
    """

    name: str

    def deliver(self, delivery: Delivery) -> None:
        """Hand the event over, or raise SinkError."""

    def close(self) -> None:
        """Release connections, files and processes."""


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """The keys every sink has, plus its type's own options."""

    name: str
    type: str
    events: tuple[str, ...] | None
    statuses: tuple[str, ...] | None
    sub_app_ids: tuple[int, ...] | None
    timeout_s: float
    retries: int
    backoff_s: float
    backoff_max_s: float
    max_attempts: int
    options: object

    def wants(self, event: Event, sub_app_id: int | None) -> bool:
        """Whether this sink's filters select the event."""
        if self.events is not None and event.event_type not in self.events:
            return False
        if self.sub_app_ids is not None and (sub_app_id or 0) not in self.sub_app_ids:
            return False
        if self.statuses is not None:
            return event.event_type != "ProcedureStateChanged" or event.status in self.statuses
        return True


@dataclass(frozen=True, slots=True)
class SinkType:
    """How to read a sink type's own keys and build the sink from them."""

    parse_options: Callable[[Table], object]
    build: Callable[[SinkConfig], Sink]
    secret_keys: tuple[str, ...] = ()
