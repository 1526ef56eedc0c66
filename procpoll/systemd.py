"""sd_notify(3) without a dependency: readiness, status, reload, stopping and the watchdog."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Notifier:
    """Tells the service manager about state changes; does nothing outside systemd."""

    address: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read $NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
        raw = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):
            return cls("\0" + raw[1:])
        return cls(raw if raw.startswith("/") else None)

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=value lines; failures are ignored, as sd_notify advises."""
        if self.address is None:
            return False
        payload = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(payload.encode("utf-8"))
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """READY=1, with an optional status line."""
        return self.send(ready=1, status=status) if status else self.send(ready=1)

    def status(self, text: str) -> bool:
        """STATUS=, one line."""
        return self.send(status=text.replace("\n", " "))

    def reloading(self) -> bool:
        """RELOADING=1 and MONOTONIC_USEC in one datagram, as notify-reload requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(reloading=1, monotonic_usec=usec)

    def stopping(self) -> bool:
        """STOPPING=1."""
        return self.send(stopping=1)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop made progress."""
        return self.send(watchdog=1)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of WatchdogSec=, or None when the manager expects no keep-alives from this process."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
