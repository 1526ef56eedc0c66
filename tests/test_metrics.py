"""Metrics: recorded figures are the scraped ones, over real HTTP; deploy/ uses only real names."""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # installed with `responses`, a test dependency; procpoll itself never needs it
from prometheus_client.parser import text_string_to_metric_families

from procpoll import __version__
from procpoll.listen import client_host, split_listen
from procpoll.metrics import Metrics
from tests.conftest import forced_preemption

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC_NAME = re.compile(r"\bprocpoll_[a-z0-9_]+\b")
SampleKey = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture
def served() -> Iterator[Metrics]:
    """A Metrics whose endpoint listens on a free loopback port."""
    metrics = Metrics()
    metrics.serve("127.0.0.1:0")
    try:
        yield metrics
    finally:
        metrics.close()


def scrape(metrics: Metrics) -> dict[SampleKey, float]:
    """GET /metrics and index every sample by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as reply:
        text = reply.read().decode("utf-8")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[SampleKey, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def record_one_of_each(metrics: Metrics) -> None:
    """One call of every recording method, with distinct values."""
    metrics.pulled(1400012345, 16)
    metrics.pulled(None, 3)
    metrics.confirmed(1400012345, 15)
    metrics.delivery("app", "delivered", 0.02)
    metrics.delivery("app", "failed", 3.0)
    metrics.delivery("archive", "dead")
    metrics.delivery("archive", "duplicate")
    metrics.api_call("PullEvents", "ok")
    metrics.api_call("ConfirmEvents", "InternalError")
    metrics.answered_pull(1400012345, 1_700_000_000.5)
    metrics.handles_expired(2)
    metrics.dead_letter("unparseable")
    metrics.ledger_commit(0.004)
    metrics.track(lambda: 7, lambda: 12.5)


def test_recorded_values_are_the_scraped_values(served: Metrics) -> None:
    """Each figure recorded comes back over HTTP with its name, labels and value."""
    record_one_of_each(served)
    s = scrape(served)
    assert value(s, "procpoll_events_pulled_total", sub_app_id="1400012345") == 16
    assert value(s, "procpoll_events_pulled_total", sub_app_id="0") == 3
    assert value(s, "procpoll_events_confirmed_total", sub_app_id="1400012345") == 15
    assert value(s, "procpoll_sink_deliveries_total", sink="app", outcome="delivered") == 1
    assert value(s, "procpoll_sink_deliveries_total", sink="app", outcome="failed") == 1
    assert value(s, "procpoll_sink_deliveries_total", sink="archive", outcome="dead") == 1
    assert value(s, "procpoll_sink_deliveries_total", sink="archive", outcome="duplicate") == 1
    assert value(s, "procpoll_sink_delivery_seconds_count", sink="app") == 2
    assert value(s, "procpoll_sink_delivery_seconds_sum", sink="app") == pytest.approx(3.02)
    assert value(s, "procpoll_sink_delivery_seconds_bucket", sink="app", le="0.025") == 1
    assert value(s, "procpoll_sink_delivery_seconds_bucket", sink="app", le="30.0") == 2
    assert ("procpoll_sink_delivery_seconds_count", frozenset({("sink", "archive")})) not in s
    assert value(s, "procpoll_api_calls_total", action="PullEvents", outcome="ok") == 1
    assert value(s, "procpoll_api_calls_total", action="ConfirmEvents",
                 outcome="InternalError") == 1
    assert value(s, "procpoll_last_pull_timestamp_seconds",
                 sub_app_id="1400012345") == 1_700_000_000.5
    assert value(s, "procpoll_handles_expired_total") == 2
    assert value(s, "procpoll_dead_letters_total", reason="unparseable") == 1
    assert value(s, "procpoll_dead_letters_total", reason="sink") == 0
    assert value(s, "procpoll_ledger_commit_seconds_count") == 1
    assert value(s, "procpoll_ledger_commit_seconds_sum") == pytest.approx(0.004)
    assert value(s, "procpoll_events_in_flight") == 7
    assert value(s, "procpoll_oldest_unconfirmed_seconds") == 12.5
    assert value(s, "procpoll_build_info", version=__version__) == 1


def test_a_new_sink_starts_every_outcome_at_zero(served: Metrics) -> None:
    """The first delivery of a sink creates all four outcome series, so a failure ratio has a
    denominator and increase() sees the first failure."""
    served.delivery("app", "failed")
    s = scrape(served)
    assert {outcome: value(s, "procpoll_sink_deliveries_total", sink="app", outcome=outcome)
            for outcome in ("delivered", "failed", "dead", "duplicate")} == {
        "delivered": 0, "failed": 1, "dead": 0, "duplicate": 0}


def test_declare_starts_sub_app_and_sink_series_at_zero(served: Metrics) -> None:
    """declare() makes the pulled/confirmed series of each sub-app and the outcomes of each
    sink exist at 0 before any event."""
    served.declare([None, 1400012345], ["app"])
    s = scrape(served)
    assert value(s, "procpoll_events_pulled_total", sub_app_id="0") == 0
    assert value(s, "procpoll_events_confirmed_total", sub_app_id="1400012345") == 0
    assert value(s, "procpoll_sink_deliveries_total", sink="app", outcome="dead") == 0


def test_tracked_figures_are_read_at_scrape_time(served: Metrics) -> None:
    """In-flight and oldest-unconfirmed come from the callbacks at each scrape, not a copy."""
    state = {"in_flight": 3, "oldest_s": 1.5}
    served.track(lambda: state["in_flight"], lambda: state["oldest_s"])
    assert value(scrape(served), "procpoll_events_in_flight") == 3
    state.update(in_flight=40, oldest_s=24.0)
    s = scrape(served)
    assert value(s, "procpoll_events_in_flight") == 40
    assert value(s, "procpoll_oldest_unconfirmed_seconds") == 24.0


def test_a_failing_tracking_callback_shows_as_nan_not_a_dead_endpoint(served: Metrics) -> None:
    """A callback that raises makes its gauge NaN; the scrape still answers with the rest."""
    def broken() -> int:
        raise RuntimeError("bug in the caller")

    served.pulled(None, 1)
    served.track(broken, lambda: 2.0)
    s = scrape(served)
    assert math.isnan(value(s, "procpoll_events_in_flight"))
    assert value(s, "procpoll_events_pulled_total", sub_app_id="0") == 1
    assert served.snapshot()["in_flight"] is None
    assert served.summary_line().startswith("pulled 1, confirmed 0, in flight ?, oldest 2.0 s")


def test_totals_are_exact_under_thread_contention() -> None:
    """Many threads recording at once, switching every microsecond, lose no increment."""
    metrics = Metrics()
    threads_n, calls_n = 16, 2_000
    start = threading.Barrier(threads_n)

    def work(index: int) -> None:
        sink = f"sink{index % 3}"
        start.wait()
        for _ in range(calls_n):
            metrics.pulled(index % 2 or None, 2)
            metrics.delivery(sink, "delivered", 0.01)
            metrics.confirmed(None, 1)

    with forced_preemption():
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    snapshot = metrics.snapshot()
    assert snapshot["pulled"] == threads_n * calls_n * 2
    assert snapshot["delivered"] == threads_n * calls_n
    assert snapshot["confirmed"] == threads_n * calls_n
    metrics.serve("127.0.0.1:0")
    try:
        s = scrape(metrics)
    finally:
        metrics.close()
    assert sum(value(s, "procpoll_sink_delivery_seconds_count", sink=f"sink{i}")
               for i in range(3)) == threads_n * calls_n


def test_snapshot_and_summary_line_total_every_label() -> None:
    """snapshot() sums over sub-apps and sinks; summary_line() says it in one line."""
    now_s = [1_700_000_100.0]
    metrics = Metrics(now=lambda: now_s[0])
    record_one_of_each(metrics)
    metrics.answered_pull(None, 1_700_000_090.0)
    assert metrics.snapshot() == {
        "pulled": 19, "confirmed": 15, "delivered": 1, "failed": 1, "dead": 1, "duplicate": 1,
        "in_flight": 7, "oldest_unconfirmed_s": 12.5,
        # The stalest sub-app counts: 1400012345 last answered 99.5 s ago.
        "last_pull_age_s": 99.5, "expired": 2}
    assert metrics.summary_line() == ("pulled 19, confirmed 15, in flight 7, oldest 12.5 s, "
                                      "failed 1, dead 1")


def test_snapshot_before_any_pull_has_no_pull_age() -> None:
    """Before the first answered pull the age is None, not an age since 1970."""
    snapshot = Metrics().snapshot()
    assert snapshot["last_pull_age_s"] is None
    assert snapshot["pulled"] == 0


@pytest.mark.parametrize(("call", "argument"), [("delivery", "lost"), ("dead_letter", "disk")])
def test_unknown_outcomes_are_refused(call: str, argument: str) -> None:
    """An outcome or reason outside the contract is a caller bug, refused at once."""
    metrics = Metrics()
    with pytest.raises(ValueError, match=argument):
        if call == "delivery":
            metrics.delivery("app", argument)
        else:
            metrics.dead_letter(argument)


def test_close_frees_the_port_and_recording_goes_on() -> None:
    """After close() the endpoint refuses connections; recording still works."""
    metrics = Metrics()
    metrics.serve("127.0.0.1:0")
    port = metrics.port
    metrics.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    metrics.pulled(None, 1)
    assert metrics.snapshot()["pulled"] == 1
    metrics.close()


def test_serving_twice_is_refused(served: Metrics) -> None:
    """A second serve() is a bug: one endpoint per Metrics."""
    with pytest.raises(RuntimeError, match="already serving"):
        served.serve("127.0.0.1:0")


@pytest.mark.parametrize(("listen", "parts"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    (":9464", ("", 9464)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9464", ("::1", 9464)),
])
def test_listen_addresses_split_into_host_and_port(listen: str, parts: tuple[str, int]) -> None:
    """host:port, an empty host (every interface) and bracketed IPv6 are accepted."""
    assert split_listen(listen) == parts


@pytest.mark.parametrize("listen", ["9464", "host:", "host:http", "host:70000", "::1:9464",
                                    "[nothost]:9464", "a b:1"])
def test_malformed_listen_addresses_are_refused(listen: str) -> None:
    """Anything but host:port with a port in 0..65535 is a ValueError naming the input."""
    with pytest.raises(ValueError, match=re.escape(repr(listen))):
        split_listen(listen)


def test_a_wildcard_bind_is_dialled_on_loopback() -> None:
    """A client reaching a server bound to every interface dials loopback."""
    assert [client_host(h) for h in ("", "0.0.0.0", "::", "10.0.0.5")] == [
        "127.0.0.1", "127.0.0.1", "::1", "10.0.0.5"]


# -- deploy/: the dashboard and the alerts speak the exported names ----------------------------


def alert_expressions() -> dict[str, str]:
    document = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text(encoding="utf-8"))
    return {rule["alert"]: rule["expr"] for group in document["groups"]
            for rule in group["rules"]}


def dashboard_expressions() -> list[str]:
    document = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    return [target["expr"] for panel in document["panels"] for target in panel["targets"]]


def exported_names(metrics: Metrics) -> tuple[set[str], set[str]]:
    """(every sample name, every family name) of a real scrape after one of each figure."""
    record_one_of_each(metrics)
    samples = {name for name, _ in scrape(metrics)}
    families = {name.removesuffix(suffix) for name in samples
                for suffix in ("_bucket", "_sum", "_count", "_total") if name.endswith(suffix)}
    return samples, families | samples


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_deploy_expressions_use_only_exported_metrics(served: Metrics, source: str) -> None:
    """Every procpoll_* name in an alert or panel expression is in a real scrape."""
    expressions = (list(alert_expressions().values()) if source == "alerts"
                   else dashboard_expressions())
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    _, known = exported_names(served)
    assert used, "no procpoll_* metric found in the expressions"
    assert used - known == set()


def test_dashboard_charts_every_exported_family(served: Metrics) -> None:
    """A figure procpoll exports has a panel: adding a metric without charting it fails here."""
    used = {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
    used_families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}
    samples, _ = exported_names(served)
    exported_families = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in samples
                         if not name.endswith("_created")}
    assert exported_families - used_families == set()


def test_alerts_cover_the_documented_conditions() -> None:
    """The five alerts exist, each on the figure it is about."""
    expressions = alert_expressions()
    assert {name: METRIC_NAME.findall(expr)[0] for name, expr in expressions.items()} == {
        "ProcpollNoAnsweredPull": "procpoll_last_pull_timestamp_seconds",
        "ProcpollConfirmNearDeadline": "procpoll_oldest_unconfirmed_seconds",
        "ProcpollDeadLettersGrowing": "procpoll_dead_letters_total",
        "ProcpollSinkFailing": "procpoll_sink_deliveries_total",
        "ProcpollHandlesExpiring": "procpoll_handles_expired_total",
    }
    assert "> 300" in expressions["ProcpollNoAnsweredPull"]
    assert "> 25" in expressions["ProcpollConfirmNearDeadline"]
    assert "[10m]" in expressions["ProcpollSinkFailing"]
    assert "> 0.1" in expressions["ProcpollSinkFailing"]
