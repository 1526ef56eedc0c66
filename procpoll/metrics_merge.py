"""One /metrics for a service of several processes: each worker's exposition merged into one.

Samples with equal name and labels are added up (counters, histogram buckets, sums and
counts, the in-flight gauge), except the figures where a sum means nothing: the newest
pull, the oldest unconfirmed event and the build info take the largest value, a
`_created` timestamp the earliest. A worker that restarted starts its counters at 0
again; Prometheus' rate() and increase() treat the drop as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Point-in-time figures of the service as a whole: the most recent, the oldest, the version.
MAX_FAMILIES = frozenset({
    "procpoll_last_pull_timestamp_seconds",
    "procpoll_oldest_unconfirmed_seconds",
    "procpoll_build_info",
})
_CREATED = "_created"

_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class _Family:
    """One metric family being merged: its header and its samples in first-seen order."""

    def __init__(self, name: str, documentation: str, kind: str) -> None:
        self.name = name
        self.documentation = documentation
        self.kind = kind
        self.values: dict[_SampleKey, float] = {}

    def add(self, sample_name: str, labels: dict[str, str], value: float) -> None:
        key = (sample_name, tuple(sorted(labels.items())))
        known = self.values.get(key)
        if known is None:
            self.values[key] = value
        elif self.name in MAX_FAMILIES:
            self.values[key] = max(known, value)
        elif self.name.endswith(_CREATED):
            self.values[key] = min(known, value)
        else:
            self.values[key] = known + value

    def metric(self) -> Metric:
        metric = Metric(self.name, self.documentation, self.kind)
        for (sample_name, labels), value in self.values.items():
            metric.add_sample(sample_name, dict(labels), value)
        return metric


class _Merged(Collector):
    """The merged families, in the shape generate_latest renders."""

    def __init__(self, families: Iterable[_Family]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return (family.metric() for family in self._families)


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Merge Prometheus text expositions into one, rendered with HELP and TYPE lines.

    Raises ValueError when a text is not the Prometheus text format.
    """
    families: dict[str, _Family] = {}
    for text in texts:
        for parsed in text_string_to_metric_families(text):
            family = families.get(parsed.name)
            if family is None:
                family = families[parsed.name] = _Family(parsed.name, parsed.documentation,
                                                         parsed.type)
            for sample in parsed.samples:
                family.add(sample.name, sample.labels, sample.value)
    return generate_latest(_Merged(families.values()))
