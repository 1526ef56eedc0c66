"""`procpoll status`: what a service is doing, from its /metrics endpoint, else its ledger.

The endpoint (when `[metrics] listen` is set and answers) knows the live figures:
totals since the service started, events in flight, the oldest unconfirmed event and
the last answered pull of each sub-application. Without it, the ledger (opened read-only)
still says per sink what was delivered, what is failing and what went dead within its
retention. The dead-letter directory is always read: one JSON file per event set aside.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from procpoll.config import Config, load_config
from procpoll.errors import LedgerError
from procpoll.listen import client_host, split_listen

ENDPOINT_TIMEOUT_S = 2.0
LEDGER_BUSY_TIMEOUT_S = 2.0
CONFIRM_WINDOW_S = 30.0


@dataclass(frozen=True, slots=True)
class SinkFigures:
    """One sink's deliveries. From the endpoint: rounds since start. From the ledger: events
    delivered, events still failing (not yet delivered nor dead), events set aside."""

    delivered: int = 0
    failed: int = 0
    dead: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """The dead-letter directory: how many items wait there and since when."""

    directory: str
    files: int = 0
    oldest_age_s: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """Everything `procpoll status` says; `source` is "endpoint" or "ledger"."""

    source: str
    where: str
    note: str = ""
    sinks: dict[str, SinkFigures] = field(default_factory=dict)
    pulled: int | None = None
    confirmed: int | None = None
    in_flight: int | None = None
    oldest_unconfirmed_s: float | None = None
    last_pull_age_s: dict[str, float] = field(default_factory=dict)
    last_ledger_write_age_s: float | None = None
    dead_letters: DeadLetters | None = None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `procpoll status -c FILE [--json]`; its handler returns the exit status."""
    parser = subparsers.add_parser(
        "status", help="summarise a service: deliveries per sink, in flight, last pull, "
                       "dead letters",
        description="Read the running service's /metrics endpoint when [metrics] listen is "
                    "set and it answers, else the ledger (read-only), and count the "
                    "dead-letter files.")
    parser.add_argument("-c", "--config", type=Path, required=True,
                        help="the TOML config file of the service")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The handler of `procpoll status`: 0 once the summary is printed.

    A missing config file, a bad config or an unreadable ledger raise, and the CLI
    turns them into its exit statuses.
    """
    out = sys.stdout if out is None else out
    config = load_config(args.config)
    status = gather(configured_listen(config), config.ledger.path, config.dead_letter.directory)
    if args.json:
        print(json.dumps(asdict(status), indent=2, ensure_ascii=False), file=out)
    else:
        out.write(render(status))
    return 0


def configured_listen(config: Config) -> str:
    """`[metrics] listen` of the config, "" when that section does not exist or is off."""
    return str(getattr(getattr(config, "metrics", None), "listen", "") or "")


def gather(listen: str, ledger_path: Path, dead_letter_dir: Path | None, *,
           now_s: float | None = None) -> Status:
    """Ask the endpoint at `listen`; if it is off or silent, read the ledger instead."""
    now_s = time.time() if now_s is None else now_s
    dead_letters = None if dead_letter_dir is None else count_dead_letters(dead_letter_dir, now_s)
    if not listen:
        note = "no [metrics] listen in the config"
    else:
        url, reason = _metrics_url(listen)
        if url is not None:
            try:
                status = from_endpoint(url, now_s)
            except (OSError, ValueError) as exc:
                reason = f"{url} did not answer: {_reason(exc)}"
            else:
                return replace(status, dead_letters=dead_letters)
        note = reason
    return replace(from_ledger(ledger_path, now_s, note=note), dead_letters=dead_letters)


def from_endpoint(url: str, now_s: float) -> Status:
    """Live figures from a procpoll /metrics page; ValueError if the page is not procpoll's."""
    with urllib.request.urlopen(url, timeout=ENDPOINT_TIMEOUT_S) as reply:  # noqa: S310 -- http URL built from the config
        text = reply.read().decode("utf-8")
    sinks: dict[str, dict[str, int]] = {}
    totals = {"pulled": 0, "confirmed": 0}
    gauges: dict[str, float] = {}
    last_pull_age_s: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "procpoll_sink_deliveries_total":
                per_sink = sinks.setdefault(labels["sink"], {})
                per_sink[labels["outcome"]] = int(sample.value)
            elif name in ("procpoll_events_pulled_total", "procpoll_events_confirmed_total"):
                totals[name.split("_")[2]] += int(sample.value)
            elif name == "procpoll_last_pull_timestamp_seconds":
                last_pull_age_s[labels["sub_app_id"]] = max(0.0, now_s - sample.value)
            elif name in ("procpoll_events_in_flight", "procpoll_oldest_unconfirmed_seconds",
                          "procpoll_build_info"):
                gauges[name] = sample.value
    if "procpoll_build_info" not in gauges:
        raise ValueError("not a procpoll metrics page (no procpoll_build_info)")
    in_flight = gauges.get("procpoll_events_in_flight", math.nan)
    oldest_s = gauges.get("procpoll_oldest_unconfirmed_seconds", math.nan)
    return Status(
        source="endpoint", where=url, note="totals since the service started",
        sinks={sink: SinkFigures(delivered=o.get("delivered", 0), failed=o.get("failed", 0),
                                 dead=o.get("dead", 0)) for sink, o in sorted(sinks.items())},
        pulled=totals["pulled"], confirmed=totals["confirmed"],
        in_flight=int(in_flight) if math.isfinite(in_flight) else None,
        oldest_unconfirmed_s=oldest_s if math.isfinite(oldest_s) else None,
        last_pull_age_s=dict(sorted(last_pull_age_s.items())))


def from_ledger(path: Path, now_s: float, *, note: str = "") -> Status:
    """Per-sink figures from the ledger, opened read-only; a missing ledger is not created."""
    if not path.exists():
        return Status(source="ledger", where=str(path),
                      note=_join(note, "no ledger yet: nothing delivered"))
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                             timeout=LEDGER_BUSY_TIMEOUT_S)
        try:
            rows = db.execute(
                "SELECT sink, count(delivered_at), count(dead_at), "
                "count(*) - count(delivered_at) - count(dead_at), "
                "max(max(first_seen), coalesce(max(delivered_at), 0), "
                "coalesce(max(dead_at), 0)) "
                "FROM deliveries GROUP BY sink ORDER BY sink").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot read the ledger: {exc}") from exc
    last_s = max((row[4] for row in rows), default=None)
    return Status(
        source="ledger", where=str(path),
        note=_join(note, "events within the ledger's retention"),
        sinks={sink: SinkFigures(delivered=delivered, failed=failing, dead=dead)
               for sink, delivered, dead, failing, _ in rows},
        last_ledger_write_age_s=None if last_s is None else max(0.0, now_s - last_s))


def count_dead_letters(directory: Path, now_s: float) -> DeadLetters:
    """Count the items set aside (not the hidden temp files of a write in progress)."""
    try:
        if not directory.exists():
            return DeadLetters(directory=str(directory))
        mtimes = [entry.stat().st_mtime for entry in directory.iterdir()
                  if entry.suffix == ".json" and not entry.name.startswith(".")]
    except OSError as exc:
        return DeadLetters(directory=str(directory), error=_reason(exc))
    return DeadLetters(directory=str(directory), files=len(mtimes),
                       oldest_age_s=max(0.0, now_s - min(mtimes)) if mtimes else None)


def render(status: Status) -> str:
    """The human summary, one fact per line."""
    origin = "service endpoint" if status.source == "endpoint" else "ledger"
    lines = [f"procpoll status: from the {origin} {status.where}",
             f"  ({status.note})" if status.note else ""]
    if status.pulled is not None:
        lines.append(f"pulled {status.pulled}, confirmed {status.confirmed}")
    if status.sinks:
        width = max(len("sink"), *(len(name) for name in status.sinks))
        failed = "failed" if status.source == "endpoint" else "failing"
        lines.append(f"{'sink':<{width}}  {'delivered':>9}  {failed:>7}  {'dead':>6}")
        lines += [f"{name:<{width}}  {f.delivered:>9}  {f.failed:>7}  {f.dead:>6}"
                  for name, f in status.sinks.items()]
    else:
        lines.append("no deliveries recorded")
    if status.source == "endpoint":
        lines.append(f"in flight: {_or_unknown(status.in_flight)}")
        oldest = status.oldest_unconfirmed_s
        lines.append(f"oldest unconfirmed: {'unknown' if oldest is None else _age(oldest)} "
                     f"(handles expire after {CONFIRM_WINDOW_S:g} s)")
        lines += [f"last answered pull, {_sub_app(sub_app)}: {_age(age_s)} ago"
                  for sub_app, age_s in status.last_pull_age_s.items()] or [
                      "last answered pull: none yet"]
    elif status.last_ledger_write_age_s is not None:
        lines.append(f"last ledger write: {_age(status.last_ledger_write_age_s)} ago")
    lines.append(_dead_letter_line(status.dead_letters))
    return "".join(f"{line}\n" for line in lines if line)


def _dead_letter_line(dead: DeadLetters | None) -> str:
    if dead is None:
        return "dead letters: no [dead_letter] directory configured"
    if dead.error is not None:
        return f"dead letters: {dead.directory} unreadable: {dead.error}"
    if not dead.files or dead.oldest_age_s is None:
        return f"dead letters: none in {dead.directory}"
    return (f"dead letters: {dead.files} in {dead.directory}, "
            f"oldest {_age(dead.oldest_age_s)} ago")


def _metrics_url(listen: str) -> tuple[str | None, str]:
    """(URL of the /metrics page, "") or (None, why it cannot be asked)."""
    try:
        host, port = split_listen(listen)
    except ValueError as exc:
        return None, f"[metrics] listen: {exc}"
    if port == 0:
        return None, "[metrics] listen has port 0: the service picked a port we cannot know"
    host = client_host(host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics", ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def _or_unknown(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def _sub_app(label: str) -> str:
    return "default sub-app" if label == "0" else f"sub-app {label}"


def _age(seconds: float) -> str:
    """A duration a person reads at a glance: 4.2 s, 12 min, 3.5 h, 2.0 d."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3_600:.1f} h"
    return f"{seconds / 86_400:.1f} d"
