"""Run-time switches the server threads consult: credentials, latency, partition, stopping.

Every wait here is a `Condition.wait` that `begin_stop` interrupts, so stopping the
emulator never waits out a partition, a slow reply or an added latency.
"""

from __future__ import annotations

import threading

from procpoll.emulator.signature import Credentials


class Controls:
    """Mutable settings shared by request threads, changed by the in-process API."""

    def __init__(self, credentials: Credentials, *, latency_ms: float = 0.0) -> None:
        self._cond = threading.Condition()
        self._credentials = credentials
        self._latency_ms = 0.0
        self._partitioned = False
        self._held = 0
        self._slow = 0
        self._stopping = False
        self.set_latency_ms(latency_ms)

    @property
    def credentials(self) -> Credentials:
        """The credentials requests must be signed with, as of now."""
        with self._cond:
            return self._credentials

    @credentials.setter
    def credentials(self, value: Credentials) -> None:
        with self._cond:
            self._credentials = value

    @property
    def latency_ms(self) -> float:
        """Delay added before each API reply."""
        return self._latency_ms

    def set_latency_ms(self, latency_ms: float) -> None:
        """Change the delay added before each API reply."""
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, not {latency_ms}")
        self._latency_ms = float(latency_ms)

    @property
    def partitioned(self) -> bool:
        """Whether API requests are currently held unanswered."""
        return self._partitioned

    @property
    def stopping(self) -> bool:
        """Whether the emulator is shutting down."""
        return self._stopping

    def set_partition(self, on: bool) -> None:
        """Start or end a partition: while on, API requests get no reply."""
        with self._cond:
            self._partitioned = on
            self._cond.notify_all()

    def wait_partition_over(self) -> bool:
        """Hold while partitioned; True to go on answering, False when stopping."""
        with self._cond:
            self._held += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._stopping or not self._partitioned)
            finally:
                self._held -= 1
            return not self._stopping

    def pause(self, seconds: float) -> bool:
        """Wait `seconds` unless stopping first; True when the full time passed."""
        if seconds <= 0:
            return not self._stopping
        with self._cond:
            return not self._cond.wait_for(lambda: self._stopping, seconds)

    def hold_slow_reply(self, seconds: float) -> None:
        """Wait out a slow-reply fault (`seconds`, or until stopping), counted as held."""
        with self._cond:
            self._slow += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._stopping, seconds)
            finally:
                self._slow -= 1

    def held(self) -> dict[str, int]:
        """Requests currently held by the partition and by slow-reply faults."""
        with self._cond:
            return {"partitioned": self._held, "slow_replies": self._slow}

    def wait_held(self, *, partitioned: int = 0, slow_replies: int = 0, timeout_s: float) -> bool:
        """Block until at least that many requests are held (for tests)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._held >= partitioned and self._slow >= slow_replies, timeout_s
            )

    def begin_stop(self) -> None:
        """Wake every wait in this object for good."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
