"""End-to-end throughput of procpoll against the emulator: one command, JSON + a table + a plot.

    python bench/throughput.py            # the full run, a few minutes
    python bench/throughput.py --quick    # the same scenarios, shorter (about a minute)

The emulator (100 requests/s per action, 20 ms per reply), the webhook receiver
(20 ms per POST) and the daemon each run in their own process; the daemon's CPU and
RSS come from /proc/<pid>. The daemon runs with its DEFAULT settings (concurrency,
pullers, max_in_flight, log level info) unless an option overrides one, and the events
are real payloads (bench/corpus.py: tests/data/payloads, 80 % ProcedureStateChanged).
Scenarios:

- baseline: bench/baseline.py, the hand-written pull → POST each → confirm loop;
- drain: a preloaded backlog, drained as fast as the daemon can (events/s, CPU);
- sustained: events fed at a fixed offered rate (1,000/s); enqueue→confirm p50/p99
  from the emulator's histogram, RSS over time, then idle CPU with nothing to do;
- sustained-low: the same at a rate with headroom (600/s), for latency when keeping up;
- log warning: the drain again at log level "warning", to price the default log;
- sweep: events/s against [daemon] concurrency (the plot);
- before (with --before DIR): drain and sustained with the daemon run from another
  source tree, for before/after figures from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import realistic_events, write_events
from bench.harness import (
    CREDENTIALS,
    PY,
    ROOT,
    DaemonProc,
    EmulatorProc,
    ReceiverProc,
    read_machine,
    read_proc,
)
from bench.report import machine, table
from procpoll.emulator import generate_events
from procpoll.emulator.latency import percentile_ms

RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Knobs:
    """The [daemon] settings a scenario overrides; None leaves the daemon's default."""

    concurrency: int | None = None
    pullers: int | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True)
class Setup:
    """What every scenario shares: the API and webhook conditions and where to work."""

    rate: float
    api_latency_ms: float
    webhook_latency_ms: float
    workdir: Path


# --- one sample of everything -------------------------------------------------------------


def _sample(emu: EmulatorProc, daemon: DaemonProc, receiver: ReceiverProc) -> dict[str, Any]:
    stats = emu.stats()
    reading = daemon.read()
    actions = stats.get("actions", {})
    busy, total = read_machine()
    return {
        "machine_busy_s": busy, "machine_s": total,
        "servers_cpu_s": read_proc(emu.child.pid).cpu_s + read_proc(receiver.child.pid).cpu_s,
        "t": reading.at, "cpu_s": reading.cpu_s, "rss_mb": reading.rss_mb,
        "hwm_mb": reading.hwm_mb, "confirmed": stats["confirmed"],
        "backlog": stats["pending"] + stats["in_flight"],
        "redelivered": stats["redelivered"], "latency": stats["confirm_latency_buckets"],
        "pulls": actions.get("PullEvents", {}).get("calls", 0),
        "confirms": actions.get("ConfirmEvents", {}).get("calls", 0),
        "limited": stats.get("error_codes", {}).get("RequestLimitExceeded", 0),
    }


def _window(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """Rates and costs between two samples."""
    events = end["confirmed"] - start["confirmed"]
    seconds = end["t"] - start["t"]
    cpu = end["cpu_s"] - start["cpu_s"]
    latency = {k: n - start["latency"].get(k, 0) for k, n in end["latency"].items()}
    pulls = end["pulls"] - start["pulls"]
    machine = end["machine_s"] - start["machine_s"]
    busy = end["machine_busy_s"] - start["machine_busy_s"]
    servers = end["servers_cpu_s"] - start["servers_cpu_s"]
    cpus = os.cpu_count() or 1
    return {
        "events": events, "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds, 1) if seconds > 0 else 0.0,
        "cpu_s_per_1000": round(cpu / events * 1000, 3) if events else None,
        "cpu_ms_per_event": round(cpu / events * 1000, 3) if events else None,
        "cpu_pct_of_core": round(cpu / seconds * 100, 1) if seconds > 0 else None,
        "p50_ms": percentile_ms(latency, 50), "p99_ms": percentile_ms(latency, 99),
        "pull_calls_per_s": round(pulls / seconds, 1) if seconds > 0 else 0.0,
        "confirm_calls_per_s": round((end["confirms"] - start["confirms"]) / seconds, 1)
        if seconds > 0 else 0.0,
        "events_per_confirm": round(events / max(end["confirms"] - start["confirms"], 1), 1),
        "rate_limited": end["limited"] - start["limited"],
        "redelivered": end["redelivered"] - start["redelivered"],
        # How loaded the shared machine was: all CPUs, and the part not ours (neither the
        # daemon nor the emulator and receiver), in % of one CPU.
        "machine_busy_pct": round(busy / machine * 100, 1) if machine > 0 else None,
        "others_cpu_pct": round((busy - cpu - servers) / machine * cpus * 100, 1)
        if machine > 0 else None,
    }


def _finish(name: str, daemon: DaemonProc, emu: EmulatorProc, receiver: ReceiverProc,
            result: dict[str, Any]) -> dict[str, Any]:
    received = receiver.stats()
    result["webhook_posts"] = received["posts"]
    result["duplicate_posts"] = received["posts"] - received["unique"]
    result["log_bytes"] = daemon.log_bytes()
    result["exit_status"] = daemon.stop()
    emu.stop()
    receiver.stop()
    shown = ("events_per_s", "cpu_ms_per_event", "duplicate_posts", "idle_cpu_pct",
             "rss_peak_mb", "others_cpu_pct")
    if "offered_per_s" in result:  # enqueue→confirm means something when fed, not drained
        shown += ("p50_ms", "p99_ms")
    print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k in shown),
          flush=True)
    return result


_CALIBRATION = generate_events(300, seed=99)


def host_speed_us() -> float:
    """µs to parse one event here, now (best of 3): how fast this shared host is running.

    The same code took from 130 to 250 µs within an hour on the 2-CPU machine of the
    README, so every scenario records it next to its figures.
    """
    from procpoll.events import parse_event  # noqa: PLC0415 -- only for the calibration

    items = [{"EventHandle": str(i), **body} for i, body in enumerate(_CALIBRATION)]
    best = math.inf
    for _ in range(3):
        started = time.process_time()
        for item in items:
            parse_event(item)
        best = min(best, time.process_time() - started)
    return round(best / len(items) * 1e6, 1)


def _start(setup: Setup, name: str, knobs: Knobs, *, events: int, seed: int,
           log_level: str | None = None, source: Path | None = None
           ) -> tuple[EmulatorProc, ReceiverProc, DaemonProc, float]:
    speed = host_speed_us()
    workdir = setup.workdir / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    backlog = workdir / "events.json"
    write_events(backlog, events, seed)
    receiver = ReceiverProc(setup.webhook_latency_ms)
    emu = EmulatorProc(rate=setup.rate, latency_ms=setup.api_latency_ms, from_file=backlog)
    daemon = DaemonProc(workdir, emu.endpoint, receiver.url, concurrency=knobs.concurrency,
                        pullers=knobs.pullers, max_in_flight=knobs.max_in_flight,
                        log_level=log_level, source=source)
    return emu, receiver, daemon, speed


# --- scenarios ----------------------------------------------------------------------------


def drain(setup: Setup, name: str, knobs: Knobs, *, events: int, max_s: float, seed: int,
          warmup_s: float = 0.0, log_level: str | None = None,
          source: Path | None = None) -> dict[str, Any]:
    """Preload `events`, start the daemon, time it from its first confirm to the last."""
    emu, receiver, daemon, speed = _start(setup, name, knobs, events=events, seed=seed,
                                          log_level=log_level, source=source)
    samples = [_sample(emu, daemon, receiver)]
    deadline = time.monotonic() + max_s + 15
    while time.monotonic() < deadline and samples[-1]["confirmed"] < events:
        time.sleep(0.2)
        samples.append(_sample(emu, daemon, receiver))
        first = next((s for s in samples if s["confirmed"] > 0), None)
        if first and samples[-1]["t"] - first["t"] >= max_s + warmup_s:
            break
    first = next((s for s in samples if s["confirmed"] > 0), samples[-1])
    start = next((s for s in samples if s["t"] - first["t"] >= warmup_s), first)
    result = {"scenario": name, "knobs": asdict(knobs), "log_level": log_level or "default",
              "host_parse_us": speed,
              "backlog": events, "drained": samples[-1]["confirmed"] >= events,
              **_window(start, samples[-1]),
              "rss_peak_mb": round(max(s["hwm_mb"] for s in samples), 1)}
    return _finish(name, daemon, emu, receiver, result)


def sustained(setup: Setup, knobs: Knobs, *, offered: float, seconds: float, warmup_s: float,
              idle_s: float, seed: int, source: Path | None = None,
              name: str = "sustained") -> dict[str, Any]:
    """Feed `offered` events/s for `seconds`; then measure idle CPU over `idle_s`."""
    tick_s = 0.05
    per_tick = max(1, round(offered * tick_s))
    ticks = int(seconds / tick_s)
    bodies = realistic_events(per_tick * ticks, seed=seed)
    chunks = [json.dumps(bodies[i * per_tick:(i + 1) * per_tick]).encode()
              for i in range(ticks)]
    del bodies
    emu, receiver, daemon, speed = _start(setup, name, knobs, events=0, seed=seed,
                                          source=source)
    _wait(lambda: emu.stats()["held"]["pulls"] >= 1, 30)  # the daemon is up and pulling
    samples = [_sample(emu, daemon, receiver)]
    began = time.monotonic()
    for i, chunk in enumerate(chunks):
        delay = began + i * tick_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        emu.enqueue_json(chunk)
        if i % 10 == 9:
            samples.append(_sample(emu, daemon, receiver))
    fed_end = _sample(emu, daemon, receiver)
    samples.append(fed_end)
    total = per_tick * ticks
    _wait(lambda: emu.stats()["confirmed"] >= total, 60)
    drained = _sample(emu, daemon, receiver)
    samples.append(drained)
    warm = next(s for s in samples if s["t"] - began >= warmup_s)
    feed = _window(warm, fed_end)
    latency = _window(warm, drained)
    time.sleep(1.0)  # let the last confirms and pull loops settle into their long poll
    idle_start = _sample(emu, daemon, receiver)
    time.sleep(idle_s)
    idle_end = _sample(emu, daemon, receiver)
    idle_valid = idle_s > 0 and drained["confirmed"] >= total  # else it was still working
    rss = [round(s["rss_mb"], 1) for s in samples]
    third = next(s for s in samples if s["t"] - began >= seconds / 3)
    result = {
        "scenario": name, "knobs": asdict(knobs), "offered_per_s": per_tick / tick_s,
        "host_parse_us": speed,
        "fed": total, "all_confirmed": drained["confirmed"] >= total,
        **{k: feed[k] for k in ("events", "seconds", "events_per_s", "cpu_s_per_1000",
                                "cpu_pct_of_core", "pull_calls_per_s", "confirm_calls_per_s",
                                "events_per_confirm", "rate_limited", "redelivered",
                                "machine_busy_pct", "others_cpu_pct")},
        "max_backlog": max(s["backlog"] for s in samples),
        "p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"],
        "latency_events": latency["events"],
        "idle_s": round(idle_end["t"] - idle_start["t"], 1),
        "idle_cpu_pct": round((idle_end["cpu_s"] - idle_start["cpu_s"])
                              / (idle_end["t"] - idle_start["t"]) * 100, 2)
        if idle_valid else None,
        "idle_api_calls": idle_end["pulls"] + idle_end["confirms"]
        - idle_start["pulls"] - idle_start["confirms"],
        "rss_start_mb": rss[0], "rss_third_mb": round(third["rss_mb"], 1),
        "rss_fed_end_mb": round(fed_end["rss_mb"], 1), "rss_end_mb": round(idle_end["rss_mb"], 1),
        "rss_peak_mb": round(max(s["hwm_mb"] for s in [*samples, idle_end]), 1),
        "rss_samples_mb": rss[:: max(1, len(rss) // 20)],
    }
    return _finish(name, daemon, emu, receiver, result)


def baseline(setup: Setup, *, seconds: float, seed: int) -> dict[str, Any]:
    """bench/baseline.py against a preloaded emulator."""
    backlog = setup.workdir / "baseline-events.json"
    write_events(backlog, int(seconds * 80) + 200, seed)
    receiver = ReceiverProc(setup.webhook_latency_ms)
    emu = EmulatorProc(rate=setup.rate, latency_ms=setup.api_latency_ms, from_file=backlog)
    try:
        out = subprocess.run(
            [PY, str(ROOT / "bench" / "baseline.py"), "--endpoint", emu.endpoint,
             "--webhook", receiver.url, "--seconds", str(seconds)],
            env={**os.environ, **CREDENTIALS}, capture_output=True, text=True, check=True,
            timeout=seconds + 60)
        result: dict[str, Any] = {"scenario": "baseline", **json.loads(out.stdout)}
    finally:
        emu.stop()
        receiver.stop()
    print(f"  baseline: events_per_s={result['events_per_s']}", flush=True)
    return result


def sweep(setup: Setup, knobs: Knobs, concurrencies: list[int], *, seconds: float,
          seed: int) -> list[dict[str, Any]]:
    """Time-bounded drains at each concurrency: events/s against concurrency."""
    points = []
    for n, concurrency in enumerate(concurrencies):
        # max_in_flight grows with concurrency past the default's 256, or workers starve.
        in_flight = max(knobs.max_in_flight or 256, 4 * concurrency)
        point = Knobs(concurrency, knobs.pullers, in_flight)
        backlog = int(min(1700.0, 60.0 * concurrency) * (seconds + 2)) + 500
        points.append(drain(setup, f"sweep-c{concurrency}", point, events=backlog,
                            max_s=seconds, warmup_s=1.0, seed=seed + n))
    return points


def _wait(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    """Run every scenario, write JSON and PNG, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer sweep points")
    parser.add_argument("--rate", type=float, default=100.0, help="API requests/s per action")
    parser.add_argument("--api-latency-ms", type=float, default=20.0)
    parser.add_argument("--webhook-latency-ms", type=float, default=20.0)
    parser.add_argument("--offered", type=float, default=1000.0,
                        help="events/s fed in the sustained scenario")
    parser.add_argument("--latency-offered", type=float, default=600.0,
                        help="events/s fed in a second sustained run, for latency with headroom")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="[daemon] concurrency (default: the daemon's own)")
    parser.add_argument("--pullers", type=int, default=None,
                        help="[daemon] pullers (default: the daemon's own)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="[daemon] max_in_flight (default: the daemon's own)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenarios: baseline,drain,sustained,log,sweep")
    parser.add_argument("--before", type=Path, default=None,
                        help="also run drain and sustained with the daemon from this source tree")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "throughput.png")
    args = parser.parse_args()
    quick = args.quick
    only = set(filter(None, args.only.split(","))) or {"baseline", "drain", "sustained", "log",
                                                        "sweep"}
    knobs = Knobs(args.concurrency, args.pullers, args.max_in_flight)
    setup = Setup(args.rate, args.api_latency_ms, args.webhook_latency_ms,
                  Path(tempfile.mkdtemp(prefix="procpoll-bench-")))
    results: dict[str, Any] = {
        "machine": machine(), "quick": quick, "knobs": asdict(knobs),
        "conditions": {"api_rate_per_s": args.rate, "api_latency_ms": args.api_latency_ms,
                       "webhook_latency_ms": args.webhook_latency_ms},
        "command": " ".join(["python", *sys.argv]),
    }
    started = time.monotonic()
    drain_events, drain_s = (5_000, 10.0) if quick else (20_000, 30.0)
    sus_s, idle_s = (10.0, 10.0) if quick else (30.0, 30.0)
    try:
        if "baseline" in only:
            results["baseline"] = baseline(setup, seconds=5.0 if quick else 10.0, seed=11)
        # With --before, each "before" run follows its "after" run at once: this host's
        # speed drifts over minutes, so runs far apart would compare the host, not the code.
        if args.before is not None:
            results["before"] = {"source": str(args.before)}
        if "drain" in only:
            results["drain"] = drain(setup, "drain", knobs, events=drain_events,
                                     max_s=drain_s, seed=21)
            if args.before is not None:
                results["before"]["drain"] = drain(setup, "before-drain", knobs,
                                                   events=drain_events, max_s=drain_s, seed=21,
                                                   source=args.before)
        if "sustained" in only:
            results["sustained"] = sustained(setup, knobs, offered=args.offered,
                                             seconds=sus_s, warmup_s=3.0, idle_s=idle_s,
                                             seed=31)
            if args.before is not None:
                results["before"]["sustained"] = sustained(
                    setup, knobs, offered=args.offered, seconds=sus_s, warmup_s=3.0,
                    idle_s=min(idle_s, 10.0), seed=31, source=args.before,
                    name="before-sustained")
            if args.latency_offered:
                results["sustained_low"] = sustained(
                    setup, knobs, offered=args.latency_offered, seconds=sus_s * 2 / 3,
                    warmup_s=3.0, idle_s=0.0, seed=35, name="sustained-low")
                if args.before is not None:
                    results["before"]["sustained_low"] = sustained(
                        setup, knobs, offered=args.latency_offered, seconds=sus_s * 2 / 3,
                        warmup_s=3.0, idle_s=0.0, seed=35, source=args.before,
                        name="before-sustained-low")
        if "log" in only:
            results["log_warning"] = drain(setup, "log-warning", knobs,
                                           events=drain_events // 2, max_s=drain_s, seed=41,
                                           log_level="warning")
        if "sweep" in only:
            points = [1, 8, 32, 64] if quick else [1, 4, 8, 16, 32, 64, 128]
            results["sweep"] = sweep(setup, knobs, points, seconds=4.0 if quick else 6.0,
                                     seed=51)
    finally:
        shutil.rmtree(setup.workdir, ignore_errors=True)
    results["bench_seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if {"baseline", "drain"} <= only:
        loop, fast = results["baseline"]["events_per_s"], results["drain"]
        print(f"\ndrain: {fast['events_per_s']:,.0f} events/s, {fast['cpu_ms_per_event']} ms CPU "
              f"per event, {fast['events_per_s'] / max(loop, 0.1):.1f}x the hand-written loop "
              f"({loop} events/s)")
    if {"baseline", "drain", "sustained"} <= only:
        print()
        print(table(results))
    print(f"\nresults: {args.out} ({results['bench_seconds']} s)")
    if results.get("sweep"):
        try:
            from bench.plot import plot  # noqa: PLC0415 -- matplotlib is a bench-only extra
        except ImportError:
            print("no plot: pip install 'procpoll[bench]' (matplotlib)")
        else:
            plot(results, args.png)
            print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
