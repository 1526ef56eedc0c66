"""Liveness for the watchdog: is any thread stuck in a unit of work past its bound?

systemd's watchdog should restart a hung procpoll, not a healthy one waiting out an
API outage. So the watchdog is not fed by "VOD answered" but by the absence of
overruns: each pull call, confirm call, sink attempt and ledger write runs inside
`busy(limit_s)`; a thread that stays inside longer than its limit (a deadlock, a
call that ignores its timeout) is overdue, and the main loop stops feeding the
watchdog. Idle threads blocked on an empty queue are not busy, so they never count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    """One thread's current unit of work (`started` is None while idle)."""

    thread: str
    what: str = ""
    started: float | None = None
    limit_s: float = 0.0


class Heartbeat:
    """Per-thread busy markers, read by the main loop; cheap enough to use per event."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._local = threading.local()
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()  # only to register a thread's slot, once

    @contextmanager
    def busy(self, what: str, limit_s: float) -> Iterator[None]:
        """Mark this thread busy with `what` for at most `limit_s` seconds."""
        slot = self._slot()
        # Plain attribute writes: the reader takes no lock, and sees each field whole.
        slot.what, slot.limit_s, slot.started = what, limit_s, self._clock()
        try:
            yield
        finally:
            slot.started = None

    def overdue(self) -> list[str]:
        """The threads busy past their limit, as "thread: what (N s)"; [] when all is well."""
        now = self._clock()
        late = []
        for slot in list(self._slots):
            started = slot.started
            if started is not None and now - started > slot.limit_s:
                late.append(f"{slot.thread}: {slot.what} ({now - started:.0f} s)")
        return late

    def _slot(self) -> _Slot:
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            slot = _Slot(threading.current_thread().name)
            self._local.slot = slot
            with self._lock:
                # Slots of finished threads are dropped here, so the list stays as long
                # as the live threads that ever worked.
                alive = {t.name for t in threading.enumerate()}
                self._slots = [s for s in self._slots if s.thread in alive]
                self._slots.append(slot)
        return slot
