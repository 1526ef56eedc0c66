"""Request counters: calls and errors per action, replies per error code, injected faults."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class RequestStats:
    """Thread-safe tallies of what the HTTP front end answered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._codes: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()

    def call(self, action: str) -> None:
        """Count one request for `action`."""
        with self._lock:
            self._calls[action] += 1

    def error(self, action: str, code: str | None) -> None:
        """Count one failed reply for `action`; `code` is None for HTTP-level faults."""
        with self._lock:
            self._errors[action] += 1
            if code is not None:
                self._codes[code] += 1

    def fault(self, kind: str) -> None:
        """Count one injected fault."""
        with self._lock:
            self._faults[kind] += 1

    def snapshot(self) -> dict[str, Any]:
        """`actions` ({action: {calls, errors}}), `error_codes` and `faults` as plain dicts."""
        with self._lock:
            return {
                "actions": {
                    action: {"calls": calls, "errors": self._errors[action]}
                    for action, calls in sorted(self._calls.items())
                },
                "error_codes": dict(sorted(self._codes.items())),
                "faults": dict(sorted(self._faults.items())),
            }
