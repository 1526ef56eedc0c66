"""What each sink costs per event, in-process: deliveries/s and µs per event, as a table.

    python bench/sinks_cost.py                  # 2,000 events per sink, files under /tmp
    python bench/sinks_cost.py --events 500 --dir /var/lib/procpoll

One thread delivers distinct ProcedureStateChanged events (the documented transcode +
cover sample, ~1.9 KB each) back to back to one sink, the way a dispatch worker calls
it. The webhook receiver (bench/webhook_receiver.py, no added latency, HTTP/1.1
keep-alive) runs in its own process so its CPU is not charged to the sink; stdout is
redirected to /dev/null for the stdout sink. Figures include durability: the file sink
fsyncs each line, the sqlite sink commits with synchronous=FULL.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procpoll.config import parse_config  # noqa: E402 -- after the sys.path line above
from procpoll.events import Event, parse_callback_body  # noqa: E402
from procpoll.sinks import build_sink  # noqa: E402
from procpoll.sinks.base import Delivery, Sink  # noqa: E402

SAMPLE = ROOT / "tests/data/payloads/ProcedureStateChanged-transcode-coverbysnapshot.json"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def make_events(count: int) -> list[Event]:
    """`count` distinct events (distinct TaskIds) built on the documented sample."""
    raw = json.loads(SAMPLE.read_text(encoding="utf-8"))
    events = []
    for n in range(count):
        item = copy.deepcopy(raw)
        item["ProcedureStateChangeEvent"]["TaskId"] = f"1256768367-Procedure-bench{n:06d}"
        events.append(parse_callback_body(item))
    return events


def build(table: dict[str, Any]) -> Sink:
    """A sink from one [[sinks]] table, through the real config parser."""
    return build_sink(parse_config({"sinks": [{"name": "bench", **table}]}, "<bench>").sinks[0])


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    """bench/webhook_receiver.py in its own process; yields its URL."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "webhook_receiver.py"),
                             "--port", "0", "--latency-ms", "0"],
                            # its shutdown cancels idle keep-alive reads noisily
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def stdout_to_devnull() -> Iterator[None]:
    """Point sys.stdout at /dev/null for the stdout sink, then restore it."""
    saved = sys.stdout
    with Path(os.devnull).open("w", encoding="utf-8") as null:
        sys.stdout = null
        try:
            yield
        finally:
            sys.stdout = saved


def measure(sink: Sink, events: list[Event]) -> dict[str, float]:
    """Deliver every event once; the rate and the per-event latency distribution."""
    sink.deliver(Delivery(events[0], None, 1, 10.0))  # open files, connections, schema
    times_ns = []
    started = time.perf_counter_ns()
    for event in events[1:]:
        t0 = time.perf_counter_ns()
        sink.deliver(Delivery(event, None, 1, 10.0))
        times_ns.append(time.perf_counter_ns() - t0)
    total_s = (time.perf_counter_ns() - started) / 1e9
    sink.close()
    us = sorted(t / 1000 for t in times_ns)
    return {"events": len(us), "seconds": total_s, "per_s": len(us) / total_s,
            "mean_us": statistics.fmean(us), "p50_us": us[len(us) // 2],
            "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))]}


def main() -> None:
    """Measure every sink and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where the file and sqlite sinks write")
    args = parser.parse_args()
    events = make_events(args.events + 1)
    results: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, receiver() as url:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("file (fsync)", {"type": "file", "path": f"{tmp}/events.jsonl"}),
            ("file (no fsync)", {"type": "file", "path": f"{tmp}/nosync.jsonl", "fsync": False}),
            ("sqlite (WAL, synchronous=FULL)", {"type": "sqlite", "path": f"{tmp}/vod.sqlite3"}),
            ("stdout > /dev/null", {"type": "stdout"}),
            ("command `true`", {"type": "command", "argv": ["true"]}),
            ("webhook (local, keep-alive)", {"type": "webhook", "url": url}),
            ("webhook, signed", {"type": "webhook", "url": url, "secret": SECRET}),
        ]
        for label, table in cases:
            sink = build(table)
            context = stdout_to_devnull() if table["type"] == "stdout" else contextlib.nullcontext()
            with context:
                results.append((label, measure(sink, events)))
        where = tmp
    print(f"procpoll sink cost: {args.events} events each, one thread, Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, files in {Path(where).parent}")
    print(f"{'sink':32} {'deliveries/s':>12} {'µs/event':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for label, r in results:
        print(f"{label:32} {r['per_s']:12,.0f} {r['mean_us']:9,.0f} {r['p50_us']:8,.0f} "
              f"{r['p99_us']:8,.0f}")


if __name__ == "__main__":
    main()
