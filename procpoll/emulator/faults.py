"""Realism on demand: which injected fault a request gets, and per-action rate limits."""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class Fault(enum.StrEnum):
    """The kinds of misbehaviour the emulator can inject, mixed in equal shares."""

    INTERNAL_ERROR = "internal_error"  # API error reply InternalError
    REQUEST_LIMIT = "request_limit"  # API error reply RequestLimitExceeded
    BAD_GATEWAY = "bad_gateway"  # HTTP 502 with a text body
    CONNECTION_RESET = "connection_reset"  # socket closed with RST, no reply
    SLOW_REPLY = "slow_reply"  # held far past any sane client timeout


SLOW_REPLY_S = 120.0


class FaultPlan:
    """Draws, per request, whether to inject a fault and which; reproducible from a seed."""

    def __init__(self, rate: float = 0.0, *, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._random = random.Random(seed)  # noqa: S311 - reproducible draws, not secrets
        self._rate = 0.0
        self._kinds: tuple[Fault, ...] = tuple(Fault)
        self.set(rate)

    @property
    def rate(self) -> float:
        """Probability in [0, 1] that a request gets a fault."""
        return self._rate

    @property
    def kinds(self) -> tuple[Fault, ...]:
        """The fault kinds currently drawn from."""
        return self._kinds

    def set(self, rate: float, kinds: Iterable[Fault | str] | None = None) -> None:
        """Change the fault rate and, optionally, restrict the kinds drawn from."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within 0..1, not {rate}")
        chosen = tuple(Fault) if kinds is None else tuple(Fault(k) for k in kinds)
        if not chosen:
            raise ValueError("at least one fault kind is needed")
        with self._lock:
            self._rate = rate
            self._kinds = chosen

    def draw(self) -> Fault | None:
        """The fault for the next request, or None for a normal reply."""
        with self._lock:
            if self._rate <= 0.0 or self._random.random() >= self._rate:
                return None
            return self._random.choice(self._kinds)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per action: `rate` requests/s sustained, bursts of up to `rate`."""

    def __init__(
        self, rate: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, not {rate}")
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, action: str) -> bool:
        """Take a token for `action`; False means answer RequestLimitExceeded."""
        if self.rate is None:
            return True
        capacity = max(self.rate, 1.0)
        with self._lock:
            now = self._clock()
            bucket = self._buckets.setdefault(action, _Bucket(capacity, now))
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True
