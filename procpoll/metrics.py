"""Prometheus metrics: every figure procpoll exports, its /metrics endpoint, and the status line.

Names and labels are a contract (deploy/ dashboards and alerts, `procpoll status`):

    procpoll_events_pulled_total{sub_app_id}          events PullEvents handed over
    procpoll_events_confirmed_total{sub_app_id}       events ConfirmEvents accepted
    procpoll_sink_deliveries_total{sink,outcome}      delivered | failed | dead | duplicate
    procpoll_sink_delivery_seconds{sink}              histogram of one sink call
    procpoll_api_calls_total{action,outcome}          "ok" or the API error code
    procpoll_last_pull_timestamp_seconds{sub_app_id}  unix time of the last answered pull
    procpoll_handles_expired_total                    handles that expired before their confirm
    procpoll_dead_letters_total{reason}               sink | unparseable
    procpoll_ledger_commit_seconds                    histogram of one ledger group commit
    procpoll_events_in_flight                         events held in memory, read at scrape
    procpoll_oldest_unconfirmed_seconds               age of the oldest unconfirmed pull
    procpoll_build_info{version}                      always 1

`sub_app_id` is the number, "0" for the account's default application.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

from procpoll import __version__
from procpoll.listen import split_listen

DELIVERY_OUTCOMES = ("delivered", "failed", "dead", "duplicate")
DEAD_LETTER_REASONS = ("sink", "unparseable")
# A sink call is cut at its timeout (5 s by default, rarely above 30 s, the confirm window).
DELIVERY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A group commit is one fsync: milliseconds on a healthy disk, seconds on a sick one.
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def sub_app_label(sub_app_id: int | None) -> str:
    """The `sub_app_id` label value: the number, "0" for the account's default application."""
    return "0" if sub_app_id is None else str(sub_app_id)


class Metrics:
    """Every figure procpoll exports; thread-safe; cheap enough to call per event.

    Label children are cached per label set, so a call is one dict lookup and one
    locked add. Totals for the log and status line are read back from the same
    counters, so the line and a scrape never disagree.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 now: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.port: int | None = None
        self._now = now
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._children: dict[tuple[object, ...], Any] = {}
        self._children_lock = threading.Lock()
        self._in_flight: Callable[[], int] = lambda: 0
        self._oldest_unconfirmed_s: Callable[[], float] = lambda: 0.0
        r = self.registry
        self._pulled = Counter("procpoll_events_pulled", "Events PullEvents handed over.",
                               ["sub_app_id"], registry=r)
        self._confirmed = Counter("procpoll_events_confirmed", "Events ConfirmEvents accepted.",
                                  ["sub_app_id"], registry=r)
        self._deliveries = Counter("procpoll_sink_deliveries",
                                   "Delivery rounds of an event to a sink, by outcome.",
                                   ["sink", "outcome"], registry=r)
        self._delivery_s = Histogram("procpoll_sink_delivery_seconds",
                                     "Duration of one sink call.", ["sink"],
                                     buckets=DELIVERY_BUCKETS_S, registry=r)
        self._api_calls = Counter("procpoll_api_calls", "VOD API calls, by action and outcome "
                                  "(ok or the API error code).", ["action", "outcome"],
                                  registry=r)
        self._last_pull = Gauge("procpoll_last_pull_timestamp_seconds",
                                "Unix time of the last pull the API answered (events or empty).",
                                ["sub_app_id"], registry=r)
        self._expired = Counter("procpoll_handles_expired",
                                "Event handles that expired before they were confirmed.",
                                registry=r)
        self._dead_letters = Counter("procpoll_dead_letters",
                                     "Events set aside in the dead-letter directory, by reason.",
                                     ["reason"], registry=r)
        self._commit_s = Histogram("procpoll_ledger_commit_seconds",
                                   "Duration of one ledger group commit.",
                                   buckets=COMMIT_BUCKETS_S, registry=r)
        in_flight = Gauge("procpoll_events_in_flight",
                          "Events held in memory: queued, being delivered or awaiting confirm.",
                          registry=r)
        in_flight.set_function(lambda: _guarded(self._in_flight))
        oldest = Gauge("procpoll_oldest_unconfirmed_seconds",
                       "Age of the oldest pulled, unconfirmed event (handles last 30 s).",
                       registry=r)
        oldest.set_function(lambda: _guarded(self._oldest_unconfirmed_s))
        Gauge("procpoll_build_info", "procpoll's version; always 1.", ["version"],
              registry=r).labels(__version__).set(1)
        # Series that exist from the start, so rate() and increase() see their first rise.
        for reason in DEAD_LETTER_REASONS:
            self._dead_letters.labels(reason)

    # -- recording (called from the daemon's threads) ---------------------------------

    def declare(self, sub_app_ids: Iterable[int | None], sinks: Iterable[str]) -> None:
        """Start the per-sub-app and per-sink series at 0, so rates exist before the first event."""
        for sub_app_id in sub_app_ids:
            self._child("pulled", sub_app_id, self._pulled)
            self._child("confirmed", sub_app_id, self._confirmed)
        for sink in sinks:
            self._new_delivery_child(sink, DELIVERY_OUTCOMES[0])

    def pulled(self, sub_app_id: int | None, count: int) -> None:
        """`count` events arrived from one PullEvents of `sub_app_id`."""
        self._child("pulled", sub_app_id, self._pulled).inc(count)

    def confirmed(self, sub_app_id: int | None, count: int) -> None:
        """ConfirmEvents accepted `count` handles of `sub_app_id`."""
        self._child("confirmed", sub_app_id, self._confirmed).inc(count)

    def delivery(self, sink: str, outcome: str, seconds: float | None = None) -> None:
        """One delivery round to `sink` ended in `outcome`; `seconds` is the sink call's time."""
        key = ("delivery", sink, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._new_delivery_child(sink, outcome)
        child.inc()
        if seconds is not None:
            timer = self._children.get(("delivery_s", sink))
            if timer is None:
                timer = self._remember(("delivery_s", sink), self._delivery_s.labels(sink))
            timer.observe(seconds)

    def api_call(self, action: str, outcome: str) -> None:
        """One VOD API call of `action` ended with `outcome`: "ok" or the API error code."""
        key = ("api", action, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._remember(key, self._api_calls.labels(action, outcome))
        child.inc()

    def answered_pull(self, sub_app_id: int | None, unix_s: float) -> None:
        """The API answered a pull of `sub_app_id` at `unix_s` (with events or empty)."""
        self._child("last_pull", sub_app_id, self._last_pull).set(unix_s)

    def handles_expired(self, count: int = 1) -> None:
        """`count` handles expired before their confirm; VOD will redeliver those events."""
        self._expired.inc(count)

    def dead_letter(self, reason: str) -> None:
        """One event went to the dead-letter directory: "sink" (kept failing) or "unparseable"."""
        if reason not in DEAD_LETTER_REASONS:
            raise ValueError(f"dead-letter reason must be one of {DEAD_LETTER_REASONS}, "
                             f"got {reason!r}")
        self._dead_letters.labels(reason).inc()

    def ledger_commit(self, seconds: float) -> None:
        """One ledger group commit (write and fsync) took `seconds`."""
        self._commit_s.observe(seconds)

    def track(self, in_flight: Callable[[], int],
              oldest_unconfirmed_s: Callable[[], float]) -> None:
        """Read in-flight count and oldest unconfirmed age from these callbacks at each scrape."""
        self._in_flight = in_flight
        self._oldest_unconfirmed_s = oldest_unconfirmed_s

    # -- reading ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain totals since start, for the log and status line.

        A tracking callback that fails reads as None (in flight) or NaN (oldest).

        `last_pull_age_s` is the age of the stalest sub-application's last answered pull
        (None before any answer): the one an operator must look at.
        """
        outcomes = dict.fromkeys(DELIVERY_OUTCOMES, 0)
        for labels, value in _totals(self._deliveries):
            outcomes[labels["outcome"]] = outcomes.get(labels["outcome"], 0) + int(value)
        pulls = [value for _, value in _samples(self._last_pull, "")]
        in_flight = _guarded(self._in_flight)
        return {
            "pulled": int(sum(v for _, v in _totals(self._pulled))),
            "confirmed": int(sum(v for _, v in _totals(self._confirmed))),
            **outcomes,
            "in_flight": int(in_flight) if math.isfinite(in_flight) else None,
            "oldest_unconfirmed_s": _guarded(self._oldest_unconfirmed_s),
            "last_pull_age_s": max(0.0, self._now() - min(pulls)) if pulls else None,
            "expired": int(sum(v for _, v in _totals(self._expired))),
        }

    def summary_line(self) -> str:
        """One line for sd_notify STATUS= and the shutdown log."""
        s = self.snapshot()
        in_flight = "?" if s["in_flight"] is None else s["in_flight"]
        return (f"pulled {s['pulled']}, confirmed {s['confirmed']}, in flight {in_flight}, "
                f"oldest {s['oldest_unconfirmed_s']:.1f} s, failed {s['failed']}, "
                f"dead {s['dead']}")

    # -- the endpoint -------------------------------------------------------------------

    def serve(self, listen: str) -> None:
        """Serve GET /metrics on "host:port" from a daemon thread; port 0 picks one (`self.port`).

        Raises ValueError for a malformed address and OSError when it cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError(f"metrics endpoint already serving on port {self.port}")
        host, port = split_listen(listen)
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        server = server_class((host, port), MetricsHandler.factory(self.registry))
        self._server = server
        self.port = server.server_address[1]
        # close() waits up to one poll interval; ten idle wake-ups a second cost ~0.02 % CPU.
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="metrics-endpoint", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the endpoint and free its port; recording keeps working."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    # -- children cache -----------------------------------------------------------------

    def _child(self, figure: str, sub_app_id: int | None, family: Any) -> Any:
        key = (figure, sub_app_id)
        child = self._children.get(key)
        if child is None:
            child = self._remember(key, family.labels(sub_app_label(sub_app_id)))
        return child

    def _new_delivery_child(self, sink: str, outcome: str) -> Any:
        if outcome not in DELIVERY_OUTCOMES:
            raise ValueError(f"delivery outcome must be one of {DELIVERY_OUTCOMES}, "
                             f"got {outcome!r}")
        # Every outcome of a new sink starts at 0, so a failure ratio has a denominator
        # series from the first failure on.
        for other in DELIVERY_OUTCOMES:
            self._remember(("delivery", sink, other), self._deliveries.labels(sink, other))
        return self._children[("delivery", sink, outcome)]

    def _remember(self, key: tuple[object, ...], child: Any) -> Any:
        # labels() returns the same child for the same values; the lock only keeps
        # the dict's writers from racing, readers go without it.
        with self._children_lock:
            return self._children.setdefault(key, child)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _guarded(read: Callable[[], float]) -> float:
    """A tracked figure's callback, which must never fail a scrape or a status line."""
    try:
        value = float(read())
    except Exception:  # noqa: BLE001 -- a bug in a callback shows as NaN, not as a dead endpoint
        return math.nan
    return value


def _samples(family: Counter | Gauge, suffix: str) -> Iterable[tuple[dict[str, str], float]]:
    for metric in family.collect():
        for sample in metric.samples:
            if sample.name == metric.name + suffix:
                yield sample.labels, sample.value


def _totals(family: Counter) -> Iterable[tuple[dict[str, str], float]]:
    return _samples(family, "_total")
