"""Soak: the reliability suite's chaos and memory scenarios, for as long as asked; prints figures.

    python bench/soak.py                          # 10 min of chaos, then 100k events for memory
    python bench/soak.py --chaos-s 3600 --memory-events 1000000
    python bench/soak.py --only memory --memory-events 100000 --json soak.json

Chaos: events fed at --rate while the emulator injects faults (InternalError, throttling,
502, connection reset, slow reply; --fault-rate in all, in equal shares), the webhook
refuses --sink-fail-rate of calls, and the daemon (a subprocess) is SIGKILLed at random
moments and restarted. Then the chaos stops and the last run drains the queue. Memory:
a daemon drains --memory-events into a file sink (no fsync) while its RSS is sampled.

Exit status 1 if a guarantee broke: an event lost, confirmed before its sinks had it, or a
duplicate not explained by a kill between a sink's success and the ledger commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.scenarios import (
    ChaosReport,
    MemoryReport,
    run_chaos,
    run_memory,
)


def _chaos_rows(report: ChaosReport, concurrency: int) -> list[tuple[str, str]]:
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report.api_faults.items()))
    return [
        ("events", f"{report.events}"),
        ("API faults injected", f"{report.api_fault_total} ({faults})"),
        ("webhook calls refused", f"{report.sink_refusals}"),
        ("SIGKILL + restart", f"{report.kills}"),
        ("redeliveries by the emulator", f"{report.redelivered}"),
        ("confirmed", f"{report.confirmed}"),
        ("lost (event, sink)", f"{len(report.lost)}"),
        ("confirmed before its sinks had it", f"{len(report.early_confirms)}"),
        ("duplicates at sinks", f"{report.duplicate_total} "
                                f"({', '.join(f'{k} {v}' for k, v in report.duplicates.items())})"),
        ("  in the crash window at a kill", f"{report.at_risk} "
                                            f"(bound: kills x concurrency x 2 sinks = "
                                            f"{report.kills * concurrency * 2})"),
        ("  unexplained", f"{len(report.unexplained_duplicates)}"),
        ("peak RSS", f"{report.peak_rss_kib / 1024:.1f} MiB"),
        ("wall time", f"{report.seconds:.0f} s"),
    ]


def _memory_rows(report: MemoryReport) -> list[tuple[str, str]]:
    marks = [report.rss_at(f) for f in (0.25, 0.5, 0.75, 1.0)]
    first = next((rss for confirmed, rss in report.samples if confirmed), 0)
    return [
        ("events", f"{report.events} ({report.rate:.0f}/s)"),
        ("RSS at the first confirm", f"{first / 1024:.1f} MiB"),
        ("RSS at 25/50/75/100 %", " / ".join(f"{m / 1024:.1f}" for m in marks) + " MiB"),
        ("growth 25 % -> 100 %", f"{(marks[3] - marks[0]) / 1024:.1f} MiB"),
        ("peak RSS", f"{report.peak_kib / 1024:.1f} MiB"),
        ("delivered lines", f"{report.delivered_lines}"),
    ]


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"\n{title}", f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=("chaos", "memory"), help="run one scenario")
    parser.add_argument("--chaos-s", type=float, default=600.0, help="seconds of chaos")
    parser.add_argument("--rate", type=float, default=20.0, help="events/s fed during chaos")
    parser.add_argument("--fault-rate", type=float, default=0.25,
                        help="share of API calls faulted (5 kinds, equal shares)")
    parser.add_argument("--sink-fail-rate", type=float, default=0.10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--memory-events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="keep logs and files here (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="procpoll-soak-"))
    results: dict[str, object] = {}
    broken = False
    if args.only in (None, "chaos"):
        chaos_dir = workdir / "chaos"
        chaos_dir.mkdir(parents=True, exist_ok=True)
        events = max(16, int(args.rate * args.chaos_s * 0.8))
        print(f"chaos: {args.chaos_s:.0f} s, {events} events, logs in {chaos_dir}", flush=True)
        chaos = run_chaos(chaos_dir, events=events, chaos_s=args.chaos_s, seed=args.seed,
                          fault_rate=args.fault_rate, sink_fail_rate=args.sink_fail_rate,
                          concurrency=args.concurrency,
                          drain_timeout_s=max(60.0, events / 50))
        print(_table("chaos", _chaos_rows(chaos, args.concurrency)))
        results["chaos"] = asdict(chaos)
        broken |= bool(chaos.lost or chaos.early_confirms or chaos.unexplained_duplicates
                       or not chaos.drained or chaos.final_exit != 0)
    if args.only in (None, "memory"):
        memory_dir = workdir / "memory"
        memory_dir.mkdir(parents=True, exist_ok=True)
        print(f"\nmemory: {args.memory_events} events, logs in {memory_dir}", flush=True)
        memory = run_memory(memory_dir, events=args.memory_events, seed=args.seed,
                            sample_s=0.5, timeout_s=max(600.0, args.memory_events / 50))
        print(_table("memory", _memory_rows(memory)))
        results["memory"] = {**asdict(memory), "rate": memory.rate, "peak_kib": memory.peak_kib}
        broken |= memory.delivered_lines != args.memory_events
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("\nFAILED: a guarantee broke (see above)" if broken else "\nok: every guarantee held")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
