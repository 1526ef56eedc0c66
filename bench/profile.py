"""Profile the daemon while it drains a backlog: py-spy samples, summed per function.

    python bench/profile.py [--seconds 10] [--concurrency N] [--source DIR]

Runs the same emulator / receiver / daemon processes as bench/throughput.py (the
daemon's default settings, log level info, real payloads from bench/corpus.py), attaches
`py-spy record --format raw` to the daemon (with --gil: only samples of the thread
holding the GIL, i.e. where the CPU goes; without: also threads py-spy sees as
running, which includes some blocking socket reads and lock waits), and prints the functions with
the most samples, self and inclusive, as a share of all on-CPU samples. The collapsed
stacks are kept in bench/results/profile.txt for flame graphs.

With --perf, Linux `perf record` samples the daemon instead, kernel included, and the
summary is per shared object and symbol: how much of the CPU is the interpreter, SQLite,
and the kernel switching threads (py-spy sees none of the kernel's share).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.corpus import write_events
from bench.harness import ROOT, DaemonProc, EmulatorProc, ReceiverProc


def summarise(collapsed: str, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")[1:]]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{total} samples on CPU", "", "self %  function"]
    out += [f"{n / total * 100:5.1f}  {name}" for name, n in own.most_common(top)]
    out += ["", "incl %  function"]
    out += [f"{n / total * 100:5.1f}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> int:
    """Drain a backlog under py-spy and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=None, help="default: the daemon's")
    parser.add_argument("--pullers", type=int, default=None, help="default: the daemon's")
    parser.add_argument("--max-in-flight", type=int, default=None, help="default: the daemon's")
    parser.add_argument("--log-level", default=None, help="default: the daemon's (info)")
    parser.add_argument("--source", type=Path, default=None, help="run the daemon from here")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL: Python CPU, without blocked threads")
    parser.add_argument("--idle", action="store_true",
                        help="every thread, waiting or not: where the wall-clock time goes")
    parser.add_argument("--perf", action="store_true",
                        help="sample with Linux perf, kernel included, per symbol")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.txt")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="procpoll-profile-"))
    receiver = ReceiverProc(20.0)
    backlog = workdir / "events.json"
    write_events(backlog, int(1700 * (args.seconds + 4)))
    emu = EmulatorProc(rate=100.0, latency_ms=20.0, from_file=backlog)
    daemon = DaemonProc(workdir, emu.endpoint, receiver.url, concurrency=args.concurrency,
                        pullers=args.pullers, max_in_flight=args.max_in_flight,
                        log_level=args.log_level, source=args.source)
    try:
        deadline = time.monotonic() + 30
        while emu.stats()["confirmed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = emu.stats()["confirmed"]
        started = time.monotonic()
        if args.perf:
            summary = _perf(daemon.pid, args.seconds, workdir, args.top)
            print(f"{(emu.stats()['confirmed'] - before) / (time.monotonic() - started):.0f}"
                  f" events/s while profiled\n")
            print(summary)
            return 0
        raw = workdir / "raw.txt"
        subprocess.run([py_spy, "record", "--pid", str(daemon.pid), "--duration",
                        str(int(args.seconds)), "--rate", "200", "--format", "raw",
                        "--output", str(raw), "--nonblocking",
                        *(["--gil"] if args.gil else []), *(["--idle"] if args.idle else [])],
                       check=True, capture_output=True)
        events = emu.stats()["confirmed"] - before
        rate = events / (time.monotonic() - started)
        collapsed = raw.read_text()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(collapsed)
        print(f"{rate:.0f} events/s while profiled\n")
        print(summarise(collapsed, args.top))
    finally:
        daemon.stop()
        emu.stop()
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _perf(pid: int, seconds: float, workdir: Path, top: int) -> str:
    """`perf record` on `pid` for `seconds`; the top symbols, self time, kernel included."""
    data = workdir / "perf.data"
    subprocess.run(["perf", "record", "--freq", "999", "--pid", str(pid), "--output",
                    str(data), "--", "sleep", str(seconds)], check=True, capture_output=True)

    def report(sort: str, rows: int) -> list[str]:
        text = subprocess.run(["perf", "report", "--input", str(data), "--stdio", "--sort",
                               sort], check=True, capture_output=True, text=True).stdout
        return [line for line in text.splitlines()
                if line.strip() and not line.startswith("#")][:rows]

    return "\n".join(["share  object", *report("dso", 6), "", "share  object  symbol",
                      *report("dso,sym", top)])


if __name__ == "__main__":
    sys.exit(main())
