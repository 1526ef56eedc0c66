"""The long-running scenarios, shared by the reliability tests (bounded) and bench/soak.py.

Each returns a report of figures; the caller decides what to assert or print.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procpoll.emulator import Emulator, generate_events
from procpoll.events import event_key
from tests.reliability.harness import (
    ConfirmAudit,
    DaemonProcess,
    FileSinkReader,
    FlakyReceiver,
    LedgerReader,
    emulator_sections,
    wait_until,
    write_config,
)

PROCEDURE_ONLY = ["ProcedureStateChanged"]


def credentials_env(emu: Emulator) -> dict[str, str]:
    """The emulator's credentials as the daemon reads them from the environment."""
    return {"TENCENTCLOUD_SECRET_ID": emu.secret_id, "TENCENTCLOUD_SECRET_KEY": emu.secret_key}


@dataclass
class ChaosReport:
    """What one chaos run did and what came out of it."""

    events: int = 0
    api_faults: dict[str, int] = field(default_factory=dict)
    sink_refusals: int = 0
    kills: int = 0
    confirmed: int = 0
    redelivered: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    at_risk: int = 0  # (event, sink) pairs at a sink but not in the ledger at some kill
    # The most pairs one kill newly left out of the ledger at one sink: each dispatch
    # worker has one event in that window, so at most `concurrency` per sink.
    worst_at_risk_per_kill: int = 0
    unexplained_duplicates: list[tuple[str, str]] = field(default_factory=list)
    early_confirms: list[tuple[str, str, str]] = field(default_factory=list)
    junk_lines: int = 0
    peak_rss_kib: int = 0
    final_exit: int | None = None
    drained: bool = False
    seconds: float = 0.0

    @property
    def duplicate_total(self) -> int:
        return sum(self.duplicates.values())

    @property
    def api_fault_total(self) -> int:
        return sum(self.api_faults.values())


def run_chaos(workdir: Path, *, events: int = 400, chaos_s: float = 25.0, seed: int = 1,
              fault_rate: float = 0.25, sink_fail_rate: float = 0.10,
              kill_after_s: tuple[float, float] = (0.3, 3.0), concurrency: int = 4,
              drain_timeout_s: float = 60.0) -> ChaosReport:
    """Events trickle in while the API faults, the webhook refuses and the daemon is SIGKILLed
    at random moments and restarted; then the chaos stops and the last run drains the queue.
    """
    started = time.monotonic()
    rng = random.Random(seed)
    report = ChaosReport(events=events)
    bodies = generate_events(events, seed=seed)
    keys = [event_key(b) for b in bodies]
    emu = Emulator(confirm_window_s=3.0, hold_s=0.5, seed=seed).start()
    receiver = FlakyReceiver(sink_fail_rate, seed=seed)
    archive = FileSinkReader(workdir / "archive.jsonl")
    ledger = LedgerReader(workdir / "ledger.sqlite3")
    daemon: DaemonProcess | None = None
    stop_feeding = threading.Event()
    try:
        config = workdir / "chaos.toml"
        write_config(config, emulator_sections(
            emu, workdir, daemon={"concurrency": concurrency, "pullers": 2, "shutdown_grace": 3},
            dead_letter={"directory": str(workdir / "dead")}), [
            {"name": "hook", "type": "webhook", "url": receiver.url, "timeout": 5,
             "retries": 2, "backoff": 0.05, "backoff_max": 0.2},
            {"name": "archive", "type": "file", "path": str(workdir / "archive.jsonl"),
             "events": PROCEDURE_ONLY},
        ])
        wants = {"hook": lambda _b: True,
                 "archive": lambda b: b.get("EventType") in PROCEDURE_ONLY}
        audit = ConfirmAudit(emu, ledger, {
            "hook": (wants["hook"], receiver.has),
            "archive": (wants["archive"], archive.has),
        })
        feeder = threading.Thread(target=_feed, args=(emu, bodies, chaos_s * 0.8, stop_feeding),
                                  daemon=True)
        feeder.start()
        emu.set_faults(fault_rate)
        daemon = DaemonProcess(config, workdir, credentials_env(emu))
        at_risk: set[tuple[str, str]] = set()
        chaos_end = started + chaos_s
        while time.monotonic() < chaos_end:
            daemon.start()
            kill_at = time.monotonic() + rng.uniform(*kill_after_s)
            while time.monotonic() < kill_at:
                report.peak_rss_kib = max(report.peak_rss_kib, daemon.rss_kib())
                time.sleep(0.05)
            daemon.kill()
            report.kills += 1
            wait_until(receiver.quiet, 5)
            # New to this kill: a pair left over from an earlier kill is not redelivered yet.
            window = _unrecorded(ledger, receiver, archive) - at_risk
            per_sink = Counter(sink for _key, sink in window)
            report.worst_at_risk_per_kill = max(report.worst_at_risk_per_kill,
                                                *per_sink.values(), 0)
            at_risk |= window
        feeder.join(chaos_s)
        emu.set_faults(0.0)
        receiver.fail_rate = 0.0
        pulls = _pull_calls(emu)
        daemon.start()
        # Signal handlers are installed before the first pull: SIGTERM is then a clean stop.
        wait_until(lambda: _pull_calls(emu) > pulls, 15)
        report.drained = emu.wait_drained(drain_timeout_s)
        report.peak_rss_kib = max(report.peak_rss_kib, daemon.rss_kib())
        report.final_exit = daemon.terminate()
        stats = emu.stats()
        report.api_faults = dict(stats["faults"])
        report.confirmed = stats["confirmed"]
        report.redelivered = stats["redelivered"]
        report.sink_refusals = receiver.refused
        report.early_confirms = list(audit.early)
        report.at_risk = len(at_risk)
        got = {"hook": receiver.counts(), "archive": archive.refresh()}
        report.junk_lines = archive.junk
        for sink, counts in got.items():
            report.lost += [(k, sink) for k, b in zip(keys, bodies, strict=True)
                            if wants[sink](b) and counts[k] == 0]
            report.duplicates[sink] = sum(n - 1 for n in counts.values() if n > 1)
            report.unexplained_duplicates += [(k, sink) for k, n in counts.items()
                                              if n > 1 and (k, sink) not in at_risk]
    finally:
        stop_feeding.set()
        if daemon is not None:
            daemon.stop()
        ledger.close()
        receiver.close()
        emu.stop()
    report.seconds = time.monotonic() - started
    return report


def _pull_calls(emu: Emulator) -> int:
    return int(emu.stats()["actions"].get("PullEvents", {}).get("calls", 0))


def _feed(emu: Emulator, bodies: list[dict[str, Any]], over_s: float,
          stop: threading.Event) -> None:
    """Enqueue `bodies` in small batches spread over `over_s` seconds."""
    chunks = max(1, int(over_s / 0.25))
    size = max(1, -(-len(bodies) // chunks))
    for start in range(0, len(bodies), size):
        emu.enqueue(bodies[start:start + size])
        if stop.wait(0.25):
            emu.enqueue(bodies[start + size:])
            return


def _unrecorded(ledger: LedgerReader, receiver: FlakyReceiver,
                archive: FileSinkReader) -> set[tuple[str, str]]:
    """(event key, sink) pairs a sink has but the ledger does not: the crash window's catch."""
    done = ledger.done()
    have = [(k, "hook") for k in receiver.counts()] + [(k, "archive") for k in archive.refresh()]
    return {pair for pair in have if pair not in done}


@dataclass
class MemoryReport:
    """RSS of a daemon working through `events` events."""

    events: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (confirmed, RSS KiB)
    seconds: float = 0.0
    delivered_lines: int = 0

    def rss_at(self, fraction: float) -> int:
        """RSS at the first sample where that fraction of the events was confirmed."""
        target = self.events * fraction
        return next(rss for confirmed, rss in self.samples if confirmed >= target)

    @property
    def peak_kib(self) -> int:
        return max(rss for _, rss in self.samples)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def run_memory(workdir: Path, *, events: int, seed: int = 5, sample_s: float = 0.25,
               timeout_s: float = 600.0) -> MemoryReport:
    """A daemon subprocess drains `events` events into a file sink (no fsync); RSS sampled."""
    report = MemoryReport(events=events)
    emu = Emulator(confirm_window_s=30.0, hold_s=0.3, seed=seed).start()
    daemon: DaemonProcess | None = None
    try:
        for start in range(0, events, 10_000):
            emu.enqueue(generate_events(min(10_000, events - start), seed=seed + start))
        config = write_config(workdir / "memory.toml", emulator_sections(
            emu, workdir, vod={"confirm_window": 30.0}, log={"level": "warning"}), [
            {"name": "archive", "type": "file", "path": str(workdir / "archive.jsonl"),
             "fsync": False}])
        daemon = DaemonProcess(config, workdir, credentials_env(emu)).start()
        began = time.monotonic()
        deadline = began + timeout_s
        while time.monotonic() < deadline:
            confirmed = emu.stats()["confirmed"]
            rss = daemon.rss_kib()
            if rss:
                report.samples.append((confirmed, rss))
            if confirmed >= events or not daemon.alive():
                break
            time.sleep(sample_s)
        report.seconds = time.monotonic() - began
        daemon.terminate()
        with (workdir / "archive.jsonl").open("rb") as lines:
            report.delivered_lines = sum(1 for _ in lines)
    finally:
        if daemon is not None:
            daemon.stop()
        emu.stop()
    return report
