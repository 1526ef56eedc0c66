"""What the ledger costs per call, SQLite against PostgreSQL: µs per record() and claim().

    python bench/ledger_cost.py                      # 2,000 calls each, 1 and 8 threads
    python bench/ledger_cost.py --calls 500 --threads 1 4 16
    python bench/ledger_cost.py --postgres postgresql://postgres@127.0.0.1:5432/test

Each figure is wall time divided by calls, both backends in the same run on the same
machine. record() is one delivered outcome (a durable commit each); claim() is a new
occurrence with one sink. With N threads, N callers share one ledger object, as the
dispatch workers do: SQLite group-commits them, PostgreSQL spreads them over its pool.
The PostgreSQL ledger lives in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import platform
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402 -- after the sys.path line above

from procpoll.ledger import ClaimRequest, DeliveryLedger, Ledger, Outcome  # noqa: E402
from procpoll.ledger_pg import PostgresLedger  # noqa: E402

Call = Callable[[DeliveryLedger, str], None]

CALLS: dict[str, Call] = {
    "record(1 delivered)": lambda ledger, key: ledger.record(
        [Outcome(key, "s", delivered=True, ordering_key=f"task:{key}")]),
    "claim(1 sink)": lambda ledger, key: ledger.claim(
        ClaimRequest(key, ("s",), "bench", 30.0, f"task:{key}", 60.0)) and None,
}


def per_call_us(ledger: DeliveryLedger, call: Call, calls: int, threads: int) -> float:
    """Wall µs per call with `threads` callers sharing `ledger`, `calls` calls in all."""
    prefix = secrets.token_hex(4)
    each = calls // threads

    def work(n: int) -> None:
        for i in range(each):
            call(ledger, f"{prefix}-{n}-{i}")

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - started) / (each * threads) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--pool-size", type=int, default=4)
    args = parser.parse_args()
    schema = f"bench_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory() as tmp:
        backends: dict[str, DeliveryLedger] = {
            "sqlite": Ledger(Path(tmp) / "ledger.sqlite3", retention_s=86_400, shared=True),
            "postgresql": PostgresLedger(f"{args.postgres}?schema={schema}",
                                         retention_s=86_400, pool_size=args.pool_size),
        }
        print(f"# {platform.python_implementation()} {platform.python_version()}, "
              f"{args.calls} calls, PostgreSQL pool {args.pool_size}")
        print(f"{'call':<22}{'threads':>8}" + "".join(f"{name:>14}" for name in backends))
        try:
            for label, call in CALLS.items():
                for threads in args.threads:
                    figures = [per_call_us(ledger, call, args.calls, threads)
                               for ledger in backends.values()]
                    print(f"{label:<22}{threads:>8}"
                          + "".join(f"{us:>11.0f} µs" for us in figures))
        finally:
            for ledger in backends.values():
                ledger.close()
            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
