"""The daemon's /metrics endpoint after a real run on the emulator: figures match what VOD saw."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from procpoll.config import Config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator, generate_events
from tests.conftest import daemon_config, emulator_env, wait_for
from tests.test_daemon import file_sink


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_scraped_figures_equal_what_the_emulator_saw(
        tmp_path: Path, emulator: Emulator,
        run_daemon: Callable[[Config, dict[str, str]], Daemon]) -> None:
    """120 events through a file sink: pulled, confirmed and delivered equal the emulator's
    counts, nothing is left in flight or unconfirmed, and the API calls were counted."""
    emulator.enqueue(generate_events(120, seed=5))
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)],
                           metrics={"listen": "127.0.0.1:0"})
    daemon = run_daemon(config, emulator_env(emulator))
    assert emulator.wait_drained(30)
    assert wait_for(lambda: daemon.metrics.port, 5)
    stats = emulator.stats()

    def settled() -> bool:
        m = scrape(daemon.metrics.port)
        return (m[("procpoll_events_confirmed_total", (("sub_app_id", "0"),))]
                == stats["confirmed"] and m[("procpoll_events_in_flight", ())] == 0)

    assert wait_for(settled, 10)
    m = scrape(daemon.metrics.port)
    assert m[("procpoll_events_pulled_total", (("sub_app_id", "0"),))] == stats["delivered"]
    assert m[("procpoll_sink_deliveries_total",
              (("outcome", "delivered"), ("sink", "archive")))] == 120
    assert m[("procpoll_sink_deliveries_total", (("outcome", "failed"), ("sink", "archive")))] == 0
    assert m[("procpoll_oldest_unconfirmed_seconds", ())] == 0
    assert m[("procpoll_api_calls_total", (("action", "ConfirmEvents"), ("outcome", "ok")))] >= 8
    assert m[("procpoll_last_pull_timestamp_seconds", (("sub_app_id", "0"),))] > 0
    assert m[("procpoll_ledger_commit_seconds_count", ())] >= 1
