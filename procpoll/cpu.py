"""Keeping a consumer process on one CPU: its threads hand the GIL to each other there.

A Python process runs Python on one core at a time, whatever its threads. Spread over
several CPUs, each hand-off of the GIL wakes a thread on another CPU while the thread
that let go (for a socket send, a SQLite step, a log write) comes back at once and must
sleep until the GIL is free again: two context switches for what, on one CPU, costs none.
On a 2-vCPU host this took a third of the daemon's CPU (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from pathlib import Path

# (the CPU, every CPU allowed before) once pin_process has pinned this process; set once,
# at start, before the threads that read it exist.
_pinned: tuple[int, frozenset[int]] | None = None


def choose_cpu(allowed: Collection[int], *, worker: int | None, current: int | None) -> int:
    """The CPU for a process: a supervisor's workers take the allowed CPUs in turn (worker
    1 the lowest); a lone process stays where the kernel put it, which spreads several
    services over the host as the kernel spread them."""
    cpus = sorted(allowed)
    if not cpus:
        raise ValueError("no CPU is allowed")
    if worker is not None:
        return cpus[(worker - 1) % len(cpus)]
    return current if current is not None and current in allowed else cpus[0]


def pin_process(worker: int | None) -> int | None:
    """Move every thread of this process to one CPU of those it may use; threads started
    later inherit it. Returns the CPU, or None when there is nothing to choose (not Linux,
    one CPU allowed). Raises OSError when the system refuses (a seccomp filter), with
    every thread back on the CPUs it had."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    cpu = choose_cpu(allowed, worker=worker, current=_current_cpu())
    try:
        for thread_id in _thread_ids():
            os.sched_setaffinity(thread_id, {cpu})
    except OSError:
        # Refused part way: give back what was taken, so no thread is left alone on a CPU.
        for thread_id in _thread_ids():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread_id, allowed)
        raise
    global _pinned  # noqa: PLW0603 -- one per process, set before any thread reads it
    _pinned = (cpu, frozenset(allowed))
    return cpu


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """The calling thread back on every CPU it was allowed, for a child process started
    inside: a child inherits its parent thread's CPUs, and a sink's command is no part of
    the daemon's GIL."""
    pinned = _pinned
    if pinned is None:
        yield
        return
    cpu, allowed = pinned
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, allowed)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def _thread_ids() -> list[int]:
    try:
        return [int(entry.name) for entry in Path("/proc/self/task").iterdir()]
    except OSError:  # no /proc: the calling thread only (threads made later inherit it)
        return [0]


def _current_cpu() -> int | None:
    """The CPU this thread last ran on (field 39 of /proc/self/stat), if readable."""
    try:
        fields = Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[36]) if len(fields) > 36 and fields[36].isdigit() else None
