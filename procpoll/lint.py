"""Semantic lint of a valid config: settings that parse but misbehave against the real VOD.

The schema (config.py) rejects what cannot work; this module warns about what works
badly: sinks that cannot finish inside the confirm window, event types no sink takes
that would be confirmed undelivered, filter names VOD does not document, a delivery
memory that forgets before VOD does, a ledger that a reboot wipes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from procpoll.config import DAY_S, Config
from procpoll.event_types import DOCUMENTED_EVENT_TYPES, KNOWN_EVENT_TYPES
from procpoll.sinks.base import SinkConfig

VOD_RETENTION_S = 4 * DAY_S
"""VOD keeps an event that was never confirmed for about four days."""

VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One warning: the dotted key to change and what goes wrong if it stays."""

    key: str
    what: str


def lint(config: Config, *, mounts: str | None = None) -> list[Finding]:
    """Every warning for `config`; `mounts` is /proc/self/mounts text (read when None)."""
    return [*_sink_budgets(config), *_unknown_event_types(config), *_unrouted(config),
            *_ledger(config, mounts)]


def sink_worst_case_s(sink: SinkConfig) -> float:
    """How long one delivery round may take: every attempt times out, every backoff is maximal."""
    attempts = sink.retries + 1
    backoff = sum(min(sink.backoff_max_s, sink.backoff_s * 2.0 ** (n - 1))
                  for n in range(1, attempts))
    return sink.timeout_s * attempts + backoff


def delivery_budget_s(config: Config) -> float:
    """How long the dispatcher may spend on an event before its handle must be confirmed."""
    return config.vod.confirm_window_s - config.daemon.confirm_margin_s


def _sink_budgets(config: Config) -> Iterable[Finding]:
    budget = delivery_budget_s(config)
    window = (f"{_s(budget)} before its confirm deadline (vod.confirm_window "
              f"{_s(config.vod.confirm_window_s)} - daemon.confirm_margin "
              f"{_s(config.daemon.confirm_margin_s)})")
    for index, sink in enumerate(config.sinks):
        worst = sink_worst_case_s(sink)
        if worst <= budget:
            continue
        attempts = sink.retries + 1
        yield Finding(
            f"sinks[{index}]",
            f"sink {sink.name!r} may need {_s(worst)} ({_s(sink.timeout_s)} timeout x "
            f"{attempts} attempt{'s' if attempts > 1 else ''} + "
            f"{_s(worst - sink.timeout_s * attempts)} backoff) but an event has {window}: "
            "later retries are cut short and the event waits for VOD to redeliver it; "
            "lower timeout or retries")


def _unknown_event_types(config: Config) -> Iterable[Finding]:
    # Near misses of a known type are config errors; these are far from every known one.
    for index, sink in enumerate(config.sinks):
        for event_type in sink.events or ():
            if event_type not in KNOWN_EVENT_TYPES:
                yield Finding(
                    f"sinks[{index}].events",
                    f"{event_type!r} is not an event type VOD documents: if VOD added it, "
                    "all is well; if it is a misspelling, this sink never receives the "
                    "events meant")


def _unrouted(config: Config) -> Iterable[Finding]:
    if config.daemon.unrouted != "confirm":
        return
    admitted: set[str] = set()
    for sink in config.sinks:
        if sink.events is None:
            return  # a sink without an events filter takes every type
        admitted.update(sink.events)
    missed = [t for t in DOCUMENTED_EVENT_TYPES if t not in admitted]
    if missed:
        yield Finding(
            "daemon.unrouted",
            f'"confirm" confirms events no sink selects without delivering them, and no '
            f"sink's events filter admits {len(missed)} documented event "
            f"type{'s' if len(missed) > 1 else ''}: {', '.join(missed)}; if VOD sends any "
            "of them they are gone. Add a sink without an events filter (e.g. a file sink) "
            "to keep them, or ignore this if the application never emits them")


def _ledger(config: Config, mounts: str | None) -> Iterable[Finding]:
    ledger, daemon = config.ledger, config.daemon
    if ledger.retention_s < VOD_RETENTION_S:
        yield Finding(
            "ledger.retention",
            f"{_days(ledger.retention_s)} is shorter than the ~4 days VOD keeps an unconfirmed "
            "event: one redelivered after its ledger row is pruned goes to every sink again; "
            f"use at least {int(VOD_RETENTION_S)}")
    if daemon.max_age_s > ledger.retention_s:
        yield Finding(
            "daemon.max_age",
            f"{_days(daemon.max_age_s)} is longer than ledger.retention "
            f"({_days(ledger.retention_s)}): the ledger forgets a failing event's age before "
            "it reaches max_age, so age never sends it to the dead-letter directory")
    if ledger.url:
        return  # a PostgreSQL ledger: its durability is the server's
    fstype = filesystem_type(ledger.path, _read_mounts() if mounts is None else mounts)
    if fstype in VOLATILE_FILESYSTEMS:
        yield Finding(
            "ledger.path",
            f"{ledger.path} is on a {fstype}: the delivery memory is lost at every reboot and "
            "events redelivered after it go to every sink again; put it on a disk "
            "(the systemd unit's StateDirectory, /var/lib/procpoll)")


def filesystem_type(path: Path, mounts: str) -> str | None:
    """The type of the filesystem `path` would live on, from /proc/self/mounts text."""
    try:
        target = str(path.resolve())  # follows symlinks: /var/lib/procpoll -> private/procpoll
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        target = str(path.absolute())
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # The last mount of the longest matching point is the one visible at `path`.
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def _read_mounts() -> str:
    try:
        return Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _unescape(field: str) -> str:
    """Mount points in /proc/self/mounts escape space, tab, newline and backslash in octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _s(seconds: float) -> str:
    return f"{seconds:g} s"


def _days(seconds: float) -> str:
    days = seconds / DAY_S
    return f"{days:.3g} day{'' if days == 1 else 's'} ({seconds:g} s)"
