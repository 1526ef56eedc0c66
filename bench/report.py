"""The benchmark's report: the machine, each target met or not, the tables (Markdown)."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": os.getloadavg()[0]}


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, met) rows."""
    drain_r, sus, base = results["drain"], results["sustained"], results["baseline"]
    ratio = drain_r["events_per_s"] / base["events_per_s"] if base["events_per_s"] else math.inf
    best = max([drain_r, sus, *results.get("sweep", [])], key=lambda r: r["events_per_s"])
    best_ratio = best["events_per_s"] / base["events_per_s"] if base["events_per_s"] else math.inf
    rows: list[tuple[str, str, str, bool | None]] = [
        ("events/s, backlog drain (1 sub-app)", "≥ 1,000",
         f"{drain_r['events_per_s']:,.0f}", drain_r["events_per_s"] >= 1000),
        (f"events/s, sustained at {sus['offered_per_s']:,.0f}/s offered", "≥ 1,000, kept up",
         f"{sus['events_per_s']:,.0f} (max backlog {sus['max_backlog']})",
         sus["offered_per_s"] >= 1000 and sus["events_per_s"] >= 0.97 * sus["offered_per_s"]),
        ("x baseline loop (drain; best run of this bench)", "≥ 25x",
         f"{ratio:.1f}x; {best_ratio:.1f}x ({best['scenario']}) "
         f"(loop: {base['events_per_s']:.1f} events/s)", ratio >= 25),
        ("CPU ms per event, drain (one process)", "≤ 0.8",
         str(drain_r["cpu_s_per_1000"]),
         drain_r["cpu_s_per_1000"] is not None and drain_r["cpu_s_per_1000"] <= 0.8),
        (f"enqueue→confirm p50 / p99 at {sus['offered_per_s']:,.0f}/s offered",
         "p99 < 250 ms", f"{sus['p50_ms']} / {sus['p99_ms']} ms",
         sus["p99_ms"] is not None and sus["p99_ms"] < 250),
    ]
    if "sustained_low" in results:
        low = results["sustained_low"]
        rows.append((f"enqueue→confirm p50 / p99 at {low['offered_per_s']:,.0f}/s offered "
                     f"(confirmed {low['events_per_s']:,.0f}/s, max backlog "
                     f"{low['max_backlog']})", "p99 < 250 ms",
                     f"{low['p50_ms']} / {low['p99_ms']} ms",
                     low["p99_ms"] is not None and low["p99_ms"] < 250))
    rows += [
        (f"idle CPU over {sus['idle_s']:.0f} s", "< 0.5 % of a core",
         f"{sus['idle_cpu_pct']} %",
         sus["idle_cpu_pct"] is not None and sus["idle_cpu_pct"] < 0.5),
        ("peak RSS (VmHWM)", "< 60 MB",
         f"{max(drain_r['rss_peak_mb'], sus['rss_peak_mb'])} MB",
         max(drain_r["rss_peak_mb"], sus["rss_peak_mb"]) < 60),
        ("RSS under load: 1/3 → end of feed → after idle (idle before: "
         f"{sus['rss_start_mb']} MB)", "flat",
         f"{sus['rss_third_mb']} → {sus['rss_fed_end_mb']} → {sus['rss_end_mb']} MB", None),
        ("CPU ms per event (drain / sustained)", "—",
         f"{drain_r['cpu_s_per_1000']} / {sus['cpu_s_per_1000']}", None),
    ]
    if "log_warning" in results:
        quiet = results["log_warning"]
        per_event = drain_r["log_bytes"] / max(drain_r["backlog"], 1)
        rows.append(("log level warning instead of the default info: events/s, CPU ms/event",
                     "—", f"{quiet['events_per_s']:,.0f}, {quiet['cpu_s_per_1000']} "
                     f"(at info: {per_event:.0f} log bytes/event)", None))
    duplicates = sum(r.get("duplicate_posts", 0) for r in _all_runs(results))
    rows.append(("duplicate webhook POSTs, all runs", "0", str(duplicates), duplicates == 0))
    return rows


def _all_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [v for v in results.values() if isinstance(v, dict) and "scenario" in v]
    runs += results.get("sweep", [])
    runs += [v for v in results.get("before", {}).values() if isinstance(v, dict)]
    return runs


def table(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    mark = {True: "yes", False: "**no**", None: ""}
    lines = ["| target | required | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {mark[d]} |" for a, b, c, d in targets(results)]
    if results.get("sweep"):
        lines += ["", "| concurrency | events/s | CPU s / 1,000 events | CPU % of a core | "
                  "host µs/parse |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {p['knobs']['concurrency']} | {p['events_per_s']:,.0f} | "
                  f"{p['cpu_s_per_1000']} | {p['cpu_pct_of_core']} | {p['host_parse_us']} |"
                  for p in results["sweep"]]
    if results.get("before"):
        lines += ["", *_before_after(results)]
    m = results["machine"]
    lines += ["", f"Machine: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, "
              f"Linux {m['kernel']}, load average {m['loadavg_at_start']:.2f} at start."]
    loads = [f"{r['scenario']} {r['machine_busy_pct']} % busy, others "
             f"{r['others_cpu_pct']} % of a CPU, {r['host_parse_us']} µs"
             for r in _all_runs(results)
             if r.get("machine_busy_pct") is not None and not r["scenario"].startswith("sweep")]
    if loads:
        lines.append("Shared machine during the runs (all CPUs busy; others = not the daemon, "
                     "emulator or receiver; host speed = µs to parse one event in the bench "
                     "process, lower is faster): " + "; ".join(loads) + ".")
    if results.get("sweep"):
        speeds = [p["host_parse_us"] for p in results["sweep"]]
        lines.append(f"Host speed during the sweep: {min(speeds)} to {max(speeds)} µs.")
    return "\n".join(lines)


def _before_after(results: dict[str, Any]) -> list[str]:
    """Old and new code from one run: the figures the targets are about, side by side."""
    before, loop = results["before"], results.get("baseline", {}).get("events_per_s")

    def row(label: str, pick: Any) -> str:
        values = []
        for side in (before, results):
            try:
                values.append(str(pick(side)))
            except (KeyError, TypeError, ZeroDivisionError):
                values.append("—")
        return f"| {label} | {values[0]} | {values[1]} |"

    return [
        "| same run | before | after |", "| --- | ---: | ---: |",
        row("drain events/s", lambda r: f"{r['drain']['events_per_s']:,.0f}"),
        row("drain CPU ms / event", lambda r: r["drain"]["cpu_s_per_1000"]),
        row(f"x the hand-written loop ({loop} events/s)",
            lambda r: f"{r['drain']['events_per_s'] / loop:.1f}x"),
        row("sustained (offered 1,000/s) events/s",
            lambda r: f"{r['sustained']['events_per_s']:,.0f}"),
        row("sustained CPU ms / event", lambda r: r["sustained"]["cpu_s_per_1000"]),
        row("p50 / p99 ms at 1,000/s offered",
            lambda r: f"{r['sustained']['p50_ms']} / {r['sustained']['p99_ms']}"),
        row("p50 / p99 ms at 600/s offered",
            lambda r: f"{r['sustained_low']['p50_ms']} / {r['sustained_low']['p99_ms']}"),
        row("idle CPU % of a core", lambda r: r["sustained"]["idle_cpu_pct"]),
        row("peak RSS MB (drain, sustained)",
            lambda r: f"{r['drain']['rss_peak_mb']}, {r['sustained']['rss_peak_mb']}"),
        row("host µs/parse (drain, sustained)",
            lambda r: f"{r['drain']['host_parse_us']}, {r['sustained']['host_parse_us']}"),
    ]
