"""Where a drained event's CPU goes by kind: user and system time, and thread switches.

    python bench/cpu_split.py [--seconds 8] [--rounds 2] [--before DIR]

The daemon drains a backlog on its default settings (one webhook sink, 20 ms API and
webhook latency, real payloads). Once 500 events are confirmed, the script reads the
daemon's user and system CPU and its threads' voluntary and involuntary context
switches from /proc, waits `--seconds`, and reads them again: figures per confirmed
event, start-up left out. With `--before`, the code in DIR runs right after the current
code, round after round, so both see the same host.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_events
from bench.harness import ROOT, DaemonProc, EmulatorProc, ReceiverProc, read_cpu


@dataclass(frozen=True)
class Counters:
    """CPU seconds and context switches of a process, all its threads."""

    at: float
    confirmed: int
    user_s: float
    system_s: float
    voluntary: int
    involuntary: int


def read_counters(pid: int, confirmed: int) -> Counters:
    user_s, system_s = read_cpu(pid)
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name == "voluntary_ctxt_switches":
                voluntary += int(value)
            elif name == "nonvoluntary_ctxt_switches":
                involuntary += int(value)
    return Counters(time.monotonic(), confirmed, user_s, system_s, voluntary, involuntary)


def measure(source: Path, seconds: float) -> str:
    """One drain of the code in `source`; its figures as one line."""
    workdir = Path(tempfile.mkdtemp(prefix="procpoll-split-"))
    receiver = ReceiverProc(20.0)
    backlog = workdir / "events.json"
    write_events(backlog, int(1500 * (seconds + 4)))
    emu = EmulatorProc(rate=100.0, latency_ms=20.0, from_file=backlog)
    daemon = DaemonProc(workdir, emu.endpoint, receiver.url, source=source)
    try:
        deadline = time.monotonic() + 60
        while emu.stats()["confirmed"] < 500:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon confirmed nothing within 60 s")
            time.sleep(0.05)
        start = read_counters(daemon.pid, emu.stats()["confirmed"])
        time.sleep(seconds)
        end = read_counters(daemon.pid, emu.stats()["confirmed"])
    finally:
        daemon.stop()
        emu.stop()
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    events = end.confirmed - start.confirmed
    user = (end.user_s - start.user_s) / events * 1000
    system = (end.system_s - start.system_s) / events * 1000
    return (f"{events / (end.at - start.at):7.0f} events/s  CPU ms/event: user {user:.3f}"
            f" + system {system:.3f} = {user + system:.3f}  context switches/event:"
            f" voluntary {(end.voluntary - start.voluntary) / events:.1f},"
            f" involuntary {(end.involuntary - start.involuntary) / events:.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, default=None,
                        help="a checkout of older code to run after the current one")
    args = parser.parse_args()
    sources = [("now", ROOT)] + ([("before", args.before)] if args.before else [])
    for _ in range(args.rounds):
        for name, source in sources:
            print(f"{name:6s} {measure(source, args.seconds)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
