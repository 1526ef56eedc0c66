"""Scaling past one core: backlog drain with `processes = 1` and `2`, on SQLite and PostgreSQL.

Same conditions as throughput.py (emulator at 100 calls/s per action and 20 ms per call,
webhook at 20 ms, realistic payloads, the daemon's default settings otherwise), one run
for all four rows, so the ratios compare like with like. CPU is summed over the daemon's
process tree (the supervisor and its workers).

    python bench/scaling.py                   # about 2 minutes
    python bench/scaling.py --events 3000 --postgres ""   # SQLite only
    python bench/scaling.py --before /tmp/pp-before        # old and new code, alternating
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from corpus import write_events
from harness import (
    CLOCK_TICKS,
    DaemonProc,
    EmulatorProc,
    ReceiverProc,
    read_machine,
)

from procpoll.ledger_pg import split_url


def tree_cpu_s(pid: int) -> float:
    """User + system CPU of `pid` and every live descendant."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            pending.extend(int(c) for c in children)
    return total


def drop_schema(url: str) -> None:
    """Remove a row's PostgreSQL ledger schema."""
    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def drain(workdir: Path, events: int, processes: int, ledger: dict[str, Any],
          max_s: float, daemon_extra: dict[str, Any] | None = None,
          source: Path | None = None) -> dict[str, Any]:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    backlog = workdir / "events.json"
    write_events(backlog, events, seed=5)
    receiver = ReceiverProc(20.0)
    emu = EmulatorProc(rate=100.0, latency_ms=20.0, from_file=backlog)
    daemon = DaemonProc(workdir, emu.endpoint, receiver.url,
                        extra={"daemon": {"processes": processes, **(daemon_extra or {})},
                               "ledger": ledger}, source=source)
    try:
        first: tuple[float, float, int, tuple[float, float]] | None = None
        last = first
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            time.sleep(0.2)
            confirmed = emu.stats()["confirmed"]
            sample = (time.monotonic(), tree_cpu_s(daemon.pid), confirmed, read_machine())
            if first is None and confirmed > 0:
                first = sample
            last = sample
            if confirmed >= events:
                break
        if first is None or last is None:
            log = daemon.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{processes} process(es) on {ledger or 'sqlite'}: nothing was "
                             f"confirmed in {max_s:.0f} s; the daemon's log ends:\n{log}")
        seconds = last[0] - first[0]
        done = last[2] - first[2]
        busy = last[3][0] - first[3][0]
        total = last[3][1] - first[3][1]
        return {"code": "before" if source else "this tree", "processes": processes,
                "ledger": "postgresql" if "url" in ledger else "sqlite",
                "events": events, "drained": last[2] >= events,
                "events_per_s": round(done / seconds, 1) if seconds else 0.0,
                "cpu_ms_per_event": round((last[1] - first[1]) / done * 1000, 3) if done else 0,
                "machine_busy": round(busy / total, 2) if total else 0.0}
    finally:
        daemon.child.stop()
        emu.child.stop()
        receiver.child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--max-s", type=float, default=60.0)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                        help='PostgreSQL server for the shared-ledger rows ("" = skip them)')
    parser.add_argument("--before", type=Path, default=None,
                        help="also run each row with the daemon from this source tree, "
                             "alternating with this one (a git worktree of an older commit)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="procpoll-scaling-"))
    rows = []
    backends = ["sqlite"] + (["postgresql"] if args.postgres else [])
    try:
        for backend in backends:
            for processes in (1, 2):
                for source in ([args.before] if args.before else []) + [None]:
                    # A fresh ledger per row: it must not find an earlier row's deliveries.
                    ledger: dict[str, Any] = {} if backend == "sqlite" else {
                        "url": f"{args.postgres}?schema=bench_{secrets.token_hex(4)}"}
                    name = f"{backend}-{processes}{'-before' if source else ''}"
                    try:
                        row = drain(root / name, args.events, processes, ledger, args.max_s,
                                    source=source)
                    finally:
                        if "url" in ledger:
                            drop_schema(ledger["url"])
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nmachine: {os.cpu_count()} CPUs; events/s and CPU ms per event, same run")
    base = {(r["code"], r["ledger"]): r for r in rows if r["processes"] == 1}
    for row in rows:
        ratio = row["events_per_s"] / base[row["code"], row["ledger"]]["events_per_s"]
        print(f"  {row['code']:<9}  {row['ledger']:<10} processes={row['processes']}  "
              f"{row['events_per_s']:>7} events/s  {row['cpu_ms_per_event']:>6} ms CPU/event  "
              f"x{ratio:.2f}  machine busy {row['machine_busy']:.0%}")


if __name__ == "__main__":
    main()
