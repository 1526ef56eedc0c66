"""`[daemon] processes = 3`: the supervisor and its workers as real processes on the emulator."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from procpoll import __version__
from procpoll.emulator import Emulator, generate_events
from tests.conftest import Receiver
from tests.reliability.harness import (
    DaemonProcess,
    NotifyListener,
    emulator_sections,
    wait_until,
    write_config,
)
from tests.reliability.scenarios import credentials_env

WORKERS = 3
# The supervisor's own WatchdogSec, which its workers get too: 3 s where the watchdog is under
# test; 20 s elsewhere, so a machine loaded by other tests cannot stall a worker past it.
WATCHDOG_USEC = 3_000_000
RELAXED_WATCHDOG_USEC = 20_000_000
# Wall clock minus monotonic clock: log timestamps (wall) against the listener's (monotonic).
_WALL_OFFSET_S = time.time() - time.monotonic()


@dataclass
class Service:
    """The supervisor process, the sd_notify listener standing in for systemd, the webhook."""

    supervisor: DaemonProcess
    notify: NotifyListener
    receiver: Receiver

    def workers(self) -> dict[int, int]:
        """Worker number → pid of the process started last in that slot."""
        return {r["worker"]: r["pid"] for r in self.supervisor.events("supervisor.worker_started")}

    def messages(self) -> list[str]:
        return [m for _, m in self.notify.messages]

    def ready_messages(self) -> list[str]:
        return [m for m in self.messages() if "READY=1" in m.splitlines()]

    def worker_log(self, event: str) -> list[dict[str, Any]]:
        """Log records of the workers (which share the supervisor's stdout)."""
        return self.supervisor.events(event)


def log_time(record: dict[str, Any]) -> float:
    """A log record's timestamp on the monotonic clock of this process."""
    return datetime.fromisoformat(record["timestamp"]).timestamp() - _WALL_OFFSET_S


@contextlib.contextmanager
def supervised(tmp_path: Path, emulator: Emulator, *, watchdog_usec: int = RELAXED_WATCHDOG_USEC,
               **daemon: Any) -> Iterator[Service]:
    """`procpoll run` with processes = 3 and a webhook sink; everything killed at the end."""
    receiver = Receiver()
    config = write_config(tmp_path / "procpoll.toml", emulator_sections(
        emulator, tmp_path, daemon={"processes": WORKERS, **daemon},
        metrics={"listen": "127.0.0.1:0"}),
        [{"name": "hook", "type": "webhook", "url": receiver.url}])
    notify = NotifyListener(tmp_path / "notify")
    supervisor = DaemonProcess(config, tmp_path, {
        **credentials_env(emulator), "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": str(watchdog_usec)})
    service = Service(supervisor.start(), notify, receiver)
    try:
        yield service
    finally:
        pids = [r["pid"] for r in supervisor.events("supervisor.worker_started")]
        supervisor.stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        notify.close()
        receiver.close()


def wait_ready(service: Service) -> None:
    assert wait_until(service.ready_messages, 30), service.supervisor.output()[-3000:]


def test_ready_only_once_every_worker_is_ready(tmp_path: Path, emulator: Emulator) -> None:
    """With one worker held (SIGSTOP) before it could start, systemd hears 2/3 ready but no
    READY=1; once that worker runs, READY=1 arrives, saying 3/3."""
    with supervised(tmp_path, emulator) as service:
        assert wait_until(lambda: len(service.workers()) == WORKERS, 10)
        held = service.workers()[3]
        os.kill(held, signal.SIGSTOP)
        assert wait_until(lambda: any(m.startswith("STATUS=2/3 workers ready")
                                      for m in service.messages()), 30), service.messages()
        assert service.ready_messages() == []
        os.kill(held, signal.SIGCONT)
        wait_ready(service)
        assert len(service.ready_messages()) == 1
        assert "STATUS=3/3 workers ready" in service.ready_messages()[0]
        # VOD's call limit is the account's: each worker paces to a third of the default 95/s.
        started = service.worker_log("daemon.started")
        assert [r["requests_per_s"] for r in started] == [31.67] * WORKERS


def test_sigterm_stops_every_worker_and_exits_0(tmp_path: Path, emulator: Emulator) -> None:
    """SIGTERM: STOPPING=1 to systemd, every worker stops on its own (daemon.stopped) and the
    supervisor exits 0 with none of them left running."""
    with supervised(tmp_path, emulator) as service:
        wait_ready(service)
        pids = list(service.workers().values())
        assert service.supervisor.terminate() == 0
        assert "STOPPING=1" in service.messages()
        assert len(service.worker_log("daemon.stopped")) == WORKERS
        assert sorted(r["pid"] for r in service.supervisor.events("supervisor.worker_exited")
                      ) == sorted(pids)
        assert all(r["status"] == 0
                   for r in service.supervisor.events("supervisor.worker_exited"))
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists()


def test_a_killed_worker_is_restarted_and_events_keep_flowing(
        tmp_path: Path, emulator: Emulator) -> None:
    """A worker SIGKILLed is logged as exited (by SIGKILL), started again with a new pid, and
    events enqueued afterwards are all delivered and confirmed."""
    with supervised(tmp_path, emulator) as service:
        wait_ready(service)
        emulator.enqueue(generate_events(30, seed=1))
        assert emulator.wait_drained(30)
        killed = service.workers()[2]
        os.kill(killed, signal.SIGKILL)
        assert wait_until(lambda: service.workers()[2] != killed, 10)
        exited = service.supervisor.events("supervisor.worker_exited")
        assert [(r["worker"], r.get("signal")) for r in exited if r["pid"] == killed] == [
            (2, "SIGKILL")], service.supervisor.output()[-4000:]
        assert Path(f"/proc/{service.workers()[2]}").exists()
        emulator.enqueue(generate_events(30, seed=2))
        assert emulator.wait_drained(30)
        assert len({h["webhook-id"] for h in service.receiver.headers}) == 60
        assert emulator.stats()["confirmed"] == 60


def test_sighup_reaches_every_worker(tmp_path: Path, emulator: Emulator) -> None:
    """SIGHUP to the supervisor: each worker reloads (config.reloaded), and systemd hears
    RELOADING=1 and then READY=1 again once all of them are done."""
    with supervised(tmp_path, emulator) as service:
        wait_ready(service)
        service.supervisor.send(signal.SIGHUP)
        assert wait_until(lambda: len(service.worker_log("config.reloaded")) == WORKERS, 15)
        assert wait_until(lambda: len(service.ready_messages()) == 2, 10)
        messages = service.messages()
        reloading = [i for i, m in enumerate(messages) if "RELOADING=1" in m.splitlines()]
        ready = [i for i, m in enumerate(messages) if "READY=1" in m.splitlines()]
        assert len(reloading) == 1
        assert ready[0] < reloading[0] < ready[1]
        assert service.supervisor.alive()


def test_watchdog_stops_while_a_worker_is_frozen(tmp_path: Path, emulator: Emulator) -> None:
    """A SIGSTOPped worker: after its 3 s window the supervisor stops feeding systemd's
    watchdog, aborts the worker (SIGABRT) and starts a new one; the feeding resumes then."""
    with supervised(tmp_path, emulator, watchdog_usec=WATCHDOG_USEC) as service:
        wait_ready(service)
        frozen = service.workers()[1]
        os.kill(frozen, signal.SIGSTOP)
        assert wait_until(lambda: service.workers()[1] != frozen, 15)
        unresponsive = service.supervisor.events("supervisor.worker_unresponsive")
        assert [(r["worker"], r["pid"]) for r in unresponsive] == [(1, frozen)]
        exited = service.supervisor.events("supervisor.worker_exited")
        assert [(r["pid"], r["signal"]) for r in exited] == [(frozen, "SIGABRT")]
        restarted_at = log_time(service.supervisor.events("supervisor.worker_started")[-1])
        assert wait_until(lambda: any(t > restarted_at for t in service.notify.watchdog_times()),
                          5)
        # Silent since its last ping: no feed from the end of its window until the restart.
        silenced_at = log_time(unresponsive[0])
        fed = service.notify.watchdog_times()
        assert [t for t in fed if silenced_at - 0.05 < t < restarted_at] == []
        assert any(t < silenced_at - 1.0 for t in fed)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_one_metrics_endpoint_sums_the_workers(tmp_path: Path, emulator: Emulator) -> None:
    """The supervisor's /metrics: pulled and confirmed equal what the emulator saw and the
    sum over the workers' own endpoints; deliveries add up to every event."""
    with supervised(tmp_path, emulator) as service:
        wait_ready(service)
        emulator.enqueue(generate_events(120, seed=5))
        assert emulator.wait_drained(30)
        stats = emulator.stats()
        supervisor_port = service.supervisor.events("supervisor.started")[0]["metrics_port"]
        pulled = ("procpoll_events_pulled_total", (("sub_app_id", "0"),))
        confirmed = ("procpoll_events_confirmed_total", (("sub_app_id", "0"),))
        delivered = ("procpoll_sink_deliveries_total",
                     (("outcome", "delivered"), ("sink", "hook")))

        def settled() -> bool:
            m = scrape(supervisor_port)
            return (m[confirmed] == stats["confirmed"]
                    and m[("procpoll_events_in_flight", ())] == 0)

        assert wait_until(settled, 10)
        worker_ports = [r["port"] for r in service.supervisor.events("metrics.serving")
                        if r["port"] != supervisor_port]
        assert len(worker_ports) == WORKERS
        each = [scrape(port) for port in worker_ports]
        total = scrape(supervisor_port)
        after = [scrape(port) for port in worker_ports]
        last_pull = ("procpoll_last_pull_timestamp_seconds", (("sub_app_id", "0"),))
        assert total[pulled] == stats["delivered"] == sum(m[pulled] for m in each)
        assert sum(1 for m in each if m[pulled]) >= 2  # the sum is really over several
        assert total[delivered] == 120
        assert total[("procpoll_build_info", (("version", __version__),))] == 1
        # The newest pull of any worker (between two scrapes of theirs), not a sum.
        assert max(m[last_pull] for m in each) <= total[last_pull] <= max(
            m[last_pull] for m in after)


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, emulator: Emulator) -> None:
    """Outside systemd nothing else reaps them: a SIGKILLed supervisor's workers notice
    their parent is gone and stop (daemon.orphaned) instead of pulling on unsupervised."""
    with supervised(tmp_path, emulator) as service:
        wait_ready(service)
        pids = list(service.workers().values())
        service.supervisor.kill()

        def gone(pid: int) -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            except FileNotFoundError:
                return True
            return state == "Z"  # exited; reaped by init

        assert wait_until(lambda: all(gone(pid) for pid in pids), 30), "workers outlived it"
