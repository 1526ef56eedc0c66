"""What recording a metric costs the daemon's threads: µs per call of each Metrics method.

    python bench/metrics_cost.py                 # 200,000 calls each, best of 5
    python bench/metrics_cost.py --calls 50000 --threads 4

Single-threaded figures are the floor. With --threads N, N threads call the same
method on the same label set at once, so lock hand-offs and GIL switches are in the
figure, as in the daemon where every dispatch worker records its deliveries.
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procpoll.metrics import Metrics  # noqa: E402 -- after the sys.path line above

# Each figure includes one Python call of the lambda (about 0.05 µs), as a caller pays too.
CALLS: dict[str, Callable[[Metrics], None]] = {
    "delivery(sink, outcome)": lambda m: m.delivery("app", "delivered"),
    "delivery(sink, outcome, seconds)": lambda m: m.delivery("app", "delivered", 0.02),
    "pulled(sub_app_id, 16)": lambda m: m.pulled(1400012345, 16),
    "confirmed(sub_app_id, 16)": lambda m: m.confirmed(1400012345, 16),
    "api_call(action, ok)": lambda m: m.api_call("PullEvents", "ok"),
    "ledger_commit(seconds)": lambda m: m.ledger_commit(0.004),
}


def single_thread_us(call: Callable[[Metrics], None], calls: int, repeat: int) -> float:
    """Best of `repeat` runs of `calls` calls, in µs per call."""
    metrics = Metrics()
    best_s = min(timeit.repeat(lambda: call(metrics), number=calls, repeat=repeat))
    return best_s / calls * 1e6


def threaded_us(call: Callable[[Metrics], None], calls: int, threads: int) -> float:
    """Wall time per call while `threads` threads each make `calls` calls, in µs."""
    metrics = Metrics()
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(calls):
            call(metrics)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - began) / (calls * threads) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000, help="calls per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="single-thread runs; best counts")
    parser.add_argument("--threads", type=int, default=8, help="threads of the contended run")
    args = parser.parse_args()

    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{args.calls:,} calls per figure")
    print(f"{'call':<36} {'µs/call':>8} {f'µs/call, {args.threads} threads':>22}")
    for name, call in CALLS.items():
        alone = single_thread_us(call, args.calls, args.repeat)
        contended = threaded_us(call, args.calls // args.threads, args.threads)
        print(f"{name:<36} {alone:>8.2f} {contended:>22.2f}")


if __name__ == "__main__":
    main()
