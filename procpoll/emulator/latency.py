"""Enqueue→confirm latency of confirmed events, as a cumulative log-bucket histogram.

Buckets grow by 5 %, so a percentile read from them is within 5 % of the true value.
The counts only ever grow: a benchmark takes two snapshots and reads the percentiles
of their difference, which covers exactly the events confirmed in between.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

_GROWTH = 1.05
_FLOOR_MS = 0.1


def bucket_of(latency_ms: float) -> int:
    """The bucket index holding `latency_ms` (bucket 0 holds everything ≤ 0.1 ms)."""
    if latency_ms <= _FLOOR_MS:
        return 0
    return 1 + int(math.log(latency_ms / _FLOOR_MS, _GROWTH))


def upper_ms(bucket: int) -> float:
    """The largest latency a bucket holds."""
    return _FLOOR_MS * _GROWTH**bucket


class LatencyHistogram:
    """Counts per bucket; not thread-safe (the event queue records under its own lock)."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()

    def record(self, latency_s: float) -> None:
        """Count one event confirmed `latency_s` seconds after it was enqueued."""
        self._counts[bucket_of(latency_s * 1000.0)] += 1

    def snapshot(self) -> dict[str, int]:
        """{bucket index as text: count}, non-empty buckets only (JSON-friendly)."""
        return {str(bucket): count for bucket, count in sorted(self._counts.items())}


def percentile_ms(counts: Mapping[str, int], q: float) -> float | None:
    """The q-th percentile (0..100) of a snapshot, or of a difference of two; None if empty."""
    buckets = sorted((int(b), n) for b, n in counts.items() if n > 0)
    total = sum(n for _, n in buckets)
    if not total:
        return None
    rank = max(1, math.ceil(total * q / 100.0))
    seen = 0
    for bucket, n in buckets:
        seen += n
        if seen >= rank:
            return round(upper_ms(bucket), 1)
    return round(upper_ms(buckets[-1][0]), 1)  # pragma: no cover - rank ≤ total
