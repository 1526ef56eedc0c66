"""Chaos: API faults, a flaky webhook and SIGKILLs at random moments; nothing lost, nothing
confirmed early, duplicates only from the documented crash window."""

from __future__ import annotations

import pytest

from tests.reliability.scenarios import ChaosReport, run_chaos

CONCURRENCY = 4
SINKS = 2  # the webhook and the file sink of run_chaos
# The shared run (~30 s) is set up inside whichever test comes first.
pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> ChaosReport:
    """One bounded chaos run (~30 s) shared by the assertions below."""
    report = run_chaos(tmp_path_factory.mktemp("chaos"), events=400, chaos_s=25.0, seed=11,
                       fault_rate=0.25, sink_fail_rate=0.10, concurrency=CONCURRENCY)
    print(f"\nchaos: {report}")
    return report


def test_the_chaos_really_happened(chaos: ChaosReport) -> None:
    """Every fault kind was injected, the webhook refused calls and the daemon was killed often."""
    assert set(chaos.api_faults) == {"internal_error", "request_limit", "bad_gateway",
                                     "connection_reset", "slow_reply"}
    assert all(n > 0 for n in chaos.api_faults.values())
    assert chaos.sink_refusals > 0
    assert chaos.kills >= 6
    assert chaos.redelivered > 0


def test_every_event_reaches_every_sink_that_wants_it(chaos: ChaosReport) -> None:
    """After the chaos the queue drains: all events confirmed, none missing at any sink."""
    assert chaos.drained
    assert chaos.confirmed == chaos.events
    assert chaos.lost == []


def test_nothing_is_confirmed_before_its_sinks_have_it(chaos: ChaosReport) -> None:
    """At every ConfirmEvents, the event is at each wanting sink and in the ledger already."""
    assert chaos.early_confirms == []


def test_duplicates_come_only_from_the_crash_window(chaos: ChaosReport) -> None:
    """Each repeat at a sink was in the ledger-less window at a kill; a kill leaves at most
    one event per dispatch worker there, i.e. at most CONCURRENCY pairs per sink (the
    sinks of one event run in parallel)."""
    assert chaos.unexplained_duplicates == []
    assert chaos.worst_at_risk_per_kill <= CONCURRENCY
    assert chaos.duplicate_total <= chaos.at_risk <= chaos.kills * CONCURRENCY * SINKS


def test_the_last_run_stops_cleanly(chaos: ChaosReport) -> None:
    """After all the kills, SIGTERM still ends the daemon with status 0."""
    assert chaos.final_exit == 0
