"""`procpoll deadletter list|show|replay`: inspect the dead-letter directory and deliver its
events again, through the configured sinks and their retry policy."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

from procpoll.config import Config
from procpoll.dispatch import backoff_s
from procpoll.errors import ConfigError, EventParseError, LedgerError, SinkError
from procpoll.events import Event, parse_callback_body
from procpoll.ledger import DeliveryLedger, Outcome
from procpoll.ledger_open import open_ledger
from procpoll.sinks import Sink, SinkConfig, build_sink
from procpoll.sinks.base import Delivery

log = structlog.get_logger("procpoll.deadletter")

UNPARSED_SUFFIX = ".unparsed.json"


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead-letter file as read: `record` is None when the file is not readable JSON."""

    path: Path
    record: dict[str, Any] | None
    problem: str | None = None

    @property
    def unparsed(self) -> bool:
        """An item that never became an event: there is nothing to replay."""
        return self.path.name.endswith(UNPARSED_SUFFIX)

    def summary(self) -> dict[str, Any]:
        """What `list` shows of it: file, kind, reason, sink, rounds, event type, time."""
        record = self.record or {}
        return {"file": self.path.name,
                "kind": "unparsed" if self.unparsed else "sink-failure",
                "reason": self.problem or record.get("reason"), "sink": record.get("sink"),
                "rounds": record.get("rounds"), "event_type": record.get("event_type"),
                "dead_lettered_at": record.get("dead_lettered_at")}


def directory_of(config: Config) -> Path:
    """The configured dead-letter directory; ConfigError when none is configured."""
    if not config.dead_letter.directory:
        raise ConfigError(f"{config.source}: dead_letter.directory: not set, so no event is "
                          "ever set aside and there is nothing to list or replay")
    return config.dead_letter.directory


def read(path: Path) -> Letter:
    """One file; an unreadable or malformed one is reported, not raised."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Letter(path, None, f"unreadable: {exc}")
    if not isinstance(record, dict):
        return Letter(path, None, "unreadable: not a JSON object")
    return Letter(path, record)


def letters(directory: Path) -> list[Letter]:
    """Every dead letter in the directory, oldest first (temp files of a write are skipped)."""
    if not directory.is_dir():
        return []
    found = [read(p) for p in directory.glob("*.json") if not p.name.startswith(".")]
    return sorted(found, key=lambda letter: (str(letter.summary()["dead_lettered_at"] or ""),
                                             letter.path.name))


def resolve(directory: Path, name: str) -> Path:
    """FILE as given on the command line: a path, or a file name in the directory."""
    given = Path(name)
    if given.exists() or given.parent != Path():
        return given
    return directory / name


def print_list(found: Sequence[Letter], out: TextIO, *, as_json: bool) -> None:
    """`deadletter list`: one line per file, or one JSON array."""
    rows = [letter.summary() for letter in found]
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False), file=out)
        return
    for row in rows:
        if row["kind"] == "unparsed":
            what = "unparsed (kept: nothing to replay)"
        else:
            what = f"sink={row['sink']} rounds={row['rounds']} type={row['event_type']}"
        print(f"{row['dead_lettered_at'] or '-'}  {row['file']}  {what}  "
              f"reason={row['reason']!r}", file=out)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What happened to one file: replayed (and removed) or kept, and why."""

    path: Path
    sink: str | None
    replayed: bool
    why: str


class Replayer:
    """Delivers dead letters again with each sink's own timeout, retries and backoff, records
    each success in the ledger, and removes a file only after both."""

    def __init__(self, config: Config, *, sink_override: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._config = config
        self._sink_override = sink_override
        self._sleep = sleep
        self._sinks_by_name = {sink.name: sink for sink in config.sinks}
        if sink_override is not None and sink_override not in self._sinks_by_name:
            raise ConfigError(f"{config.source}: --sink {sink_override!r}: no such sink; "
                              f"configured: {', '.join(self._sinks_by_name)}")
        self._built: dict[str, Sink] = {}
        self._ledger: DeliveryLedger | None = None

    def replay(self, paths: Iterable[Path]) -> list[ReplayResult]:
        """Replay each file in turn; sinks and the ledger are closed at the end."""
        try:
            return [self._replay_one(read(path)) for path in paths]
        finally:
            for sink in self._built.values():
                sink.close()
            if self._ledger is not None:
                self._ledger.close()

    def _replay_one(self, letter: Letter) -> ReplayResult:
        record = letter.record
        if letter.unparsed:
            reason = (record or {}).get("reason") or letter.problem
            return ReplayResult(letter.path, None, False, f"kept: not an event ({reason})")
        if record is None:
            return ReplayResult(letter.path, None, False, f"kept: {letter.problem}")
        name = self._sink_override or record.get("sink")
        sink_config = self._sinks_by_name.get(str(name))
        if sink_config is None:
            return ReplayResult(letter.path, name, False,
                                f"kept: sink {name!r} is not configured (use --sink)")
        # Files written before delivery ids existed carry only the event key, which is the
        # delivery id of a first occurrence.
        delivery_id = record.get("delivery_id") or record.get("event_key")
        body = record.get("event")
        if not isinstance(body, dict):
            return ReplayResult(letter.path, name, False, "kept: the file holds no event")
        try:
            event = parse_callback_body(body)
        except EventParseError as exc:
            return ReplayResult(letter.path, name, False, f"kept: the event does not parse: {exc}")
        if not isinstance(delivery_id, str) or not delivery_id:
            delivery_id = event.key
        sub_app_id = record.get("sub_app_id")
        error = self._deliver(sink_config, event,
                              sub_app_id if isinstance(sub_app_id, int) else None)
        if error is not None:
            return ReplayResult(letter.path, name, False, f"kept: {error}")
        try:
            self._ledger_open().record([Outcome(delivery_id, sink_config.name, delivered=True)])
        except LedgerError as exc:
            return ReplayResult(letter.path, name, False,
                                f"kept: delivered, but not recorded in the ledger: {exc}")
        _remove(letter.path)
        return ReplayResult(letter.path, name, True, "replayed")

    def _deliver(self, cfg: SinkConfig, event: Event, sub_app_id: int | None) -> str | None:
        """Deliver with the sink's retry policy; the last error, or None once delivered."""
        sink = self._built.get(cfg.name)
        if sink is None:
            sink = self._built[cfg.name] = build_sink(cfg)
        attempt = 0
        while True:
            attempt += 1
            try:
                sink.deliver(Delivery(event, sub_app_id, attempt, cfg.timeout_s))
            except SinkError as exc:
                error = exc
            except Exception as exc:  # a sink bug is a failed delivery, as in the dispatcher
                log.exception("sink.crashed", sink=cfg.name, attempt=attempt)
                error = SinkError(f"{type(exc).__name__}: {exc}")
            else:
                return None
            log.warning("sink.failed", sink=cfg.name, attempt=attempt, error=error.reason,
                        retryable=error.retryable)
            if not error.retryable or attempt > cfg.retries:
                return error.reason
            self._sleep(backoff_s(attempt, cfg.backoff_s, cfg.backoff_max_s))

    def _ledger_open(self) -> DeliveryLedger:
        if self._ledger is None:
            # Shared: the daemon may be running on the same ledger.
            self._ledger = open_ledger(self._config, shared=True)
        return self._ledger


def _remove(path: Path) -> None:
    """Unlink the file and make the removal durable, so a crash cannot resurrect it."""
    path.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
