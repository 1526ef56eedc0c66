"""Merging the workers' /metrics into one, and their status lines into one."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from procpoll.metrics import Metrics
from procpoll.metrics_merge import merge_expositions
from procpoll.supervisor import combine_statuses


def _worker(pulled: int, delivery_s: float, last_pull_unix_s: float, in_flight: int,
            oldest_s: float) -> str:
    metrics = Metrics()
    metrics.declare([None], ["hook"])
    metrics.pulled(None, pulled)
    metrics.delivery("hook", "delivered", delivery_s)
    metrics.answered_pull(None, last_pull_unix_s)
    metrics.track(lambda: in_flight, lambda: oldest_s)
    return generate_latest(metrics.registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_counters_histograms_and_in_flight_add_up_point_figures_take_the_max() -> None:
    """Two workers: counters, histogram buckets/sum/count and in-flight are sums; the last
    pull, the oldest unconfirmed age and the build info are the largest value."""
    text = merge_expositions([_worker(3, 0.2, 100.0, 2, 4.0), _worker(4, 0.02, 200.0, 5, 1.0)])
    merged = _samples(text.decode())
    assert merged[("procpoll_events_pulled_total", (("sub_app_id", "0"),))] == 7
    assert merged[("procpoll_sink_delivery_seconds_count", (("sink", "hook"),))] == 2
    assert merged[("procpoll_sink_delivery_seconds_sum", (("sink", "hook"),))] == 0.22
    assert merged[("procpoll_sink_delivery_seconds_bucket", (("le", "0.025"), ("sink", "hook")))
                  ] == 1
    assert merged[("procpoll_sink_delivery_seconds_bucket", (("le", "0.25"), ("sink", "hook")))
                  ] == 2
    assert merged[("procpoll_events_in_flight", ())] == 7
    assert merged[("procpoll_last_pull_timestamp_seconds", (("sub_app_id", "0"),))] == 200
    assert merged[("procpoll_oldest_unconfirmed_seconds", ())] == 4
    assert [v for (name, _), v in merged.items() if name == "procpoll_build_info"] == [1]


def test_the_merged_text_has_help_and_type_lines() -> None:
    """The merge renders the Prometheus text format with each family's HELP and TYPE."""
    text = merge_expositions([_worker(1, 0.1, 1.0, 0, 0.0)]).decode()
    assert "# HELP procpoll_events_pulled_total Events PullEvents handed over.\n" in text
    assert "# TYPE procpoll_events_pulled_total counter\n" in text
    assert "# TYPE procpoll_sink_delivery_seconds histogram\n" in text


def test_no_worker_answering_gives_an_empty_exposition() -> None:
    """Before any worker reports its port the endpoint answers, with nothing in it."""
    assert merge_expositions([]) == b""


def test_status_lines_of_the_same_shape_are_added_up() -> None:
    """The daemon's summary lines: counts are summed, the oldest age is the largest."""
    assert combine_statuses([
        "pulled 10, confirmed 9, in flight 1, oldest 0.5 s, failed 0, dead 0",
        "pulled 5, confirmed 5, in flight 0, oldest 2.0 s, failed 1, dead 0",
    ]) == "pulled 15, confirmed 14, in flight 1, oldest 2.0 s, failed 1, dead 0"


def test_status_lines_of_other_shapes_show_the_first() -> None:
    """Lines that do not line up (one says "pulling", a figure is "?") show the first as is."""
    assert combine_statuses(["pulling", "pulled 1, confirmed 1"]) == "pulling"
    assert combine_statuses(["pulled 1, in flight ?", "pulled 2, in flight 0"]) \
        == "pulled 1, in flight ?"
    assert combine_statuses([]) == "starting"
