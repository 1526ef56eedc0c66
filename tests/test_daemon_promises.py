"""Promises of the daemon around the dispatcher: prune, once's status, signals, reload, limits."""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import Config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator
from procpoll.errors import LedgerError
from tests.conftest import Receiver, daemon_config, emulator_env, wait_for
from tests.test_daemon import file_sink, lines, task_event


def test_failed_prune_is_logged_and_does_not_stop_the_daemon(
        tmp_path: Path, emulator: Emulator, log_lines: Callable[[], list[dict[str, Any]]],
        run_daemon: Callable[[Config, dict[str, str]], Daemon],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """prune() raising LedgerError (a full disk) at start-up is logged; the daemon still
    starts, delivers and confirms."""
    def full_disk(_self: Any) -> int:
        raise LedgerError("ledger.sqlite3: prune failed: database or disk is full")

    monkeypatch.setattr("procpoll.ledger.Ledger.prune", full_disk)
    emulator.enqueue([task_event("t-prune")])
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    run_daemon(config, emulator_env(emulator))
    assert emulator.wait_drained(10)
    assert len(lines(tmp_path / "archive.jsonl")) == 1
    assert any(line["event"] == "ledger.prune_failed" for line in log_lines())


def test_once_exits_75_when_a_delivery_could_not_be_recorded(
        tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink took the event but the ledger write failed: nothing is confirmed, and once
    says so with 75 (not 0)."""
    def refuse(_self: Any, *_args: Any, **_kwargs: Any) -> None:
        raise LedgerError("ledger.sqlite3: write failed: disk I/O error")

    monkeypatch.setattr("procpoll.ledger.Ledger.record", refuse)
    emulator.enqueue([task_event("t-unrecorded")])
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    assert Daemon(config, environ=emulator_env(emulator)).once() == 75
    assert emulator.stats()["confirmed"] == 0


def test_once_exits_75_when_a_delivery_outlasts_the_wait(
        tmp_path: Path, emulator: Emulator, receiver: Receiver) -> None:
    """A delivery still running when once stops waiting is not success: 75."""
    receiver.delay_s = 2.0
    emulator.enqueue([task_event("t-slow")])
    config = daemon_config(tmp_path, emulator,
                           [{"name": "hook", "type": "webhook", "url": receiver.url,
                             "timeout": 3, "retries": 0}],
                           vod={"confirm_window": 0.3}, daemon={"confirm_margin": 0.1})
    assert Daemon(config, environ=emulator_env(emulator)).once() == 75


def test_stop_signal_handler_takes_no_lock(tmp_path: Path, emulator: Emulator) -> None:
    """The SIGTERM handler runs while the interrupted thread holds the stop event's own
    lock: it must only set a flag (Event.set() there would deadlock)."""
    daemon = Daemon(daemon_config(tmp_path, emulator, [file_sink(tmp_path)]),
                    environ=emulator_env(emulator))

    def interrupted_inside_the_lock() -> None:
        with daemon.stop_event._cond:  # what Event.wait/set hold
            daemon._on_stop_signal(signal.SIGTERM, None)
            daemon._on_reload_signal(signal.SIGHUP, None)

    thread = threading.Thread(target=interrupted_inside_the_lock, daemon=True)
    thread.start()
    thread.join(2)
    assert not thread.is_alive(), "the handler blocked on a lock"
    assert daemon._stop_requested and daemon._reload_requested
    daemon.ledger.close()


def test_reload_reports_restart_only_changes_against_the_running_values(
        tmp_path: Path, emulator: Emulator,
        log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """Change [vod] endpoint and confirm_window, reload twice: both reloads say a restart is
    needed for vod, and the running confirm window is not changed by either. Then a new
    number of processes: that needs a restart too (the supervisor starts the workers)."""
    path = tmp_path / "procpoll.toml"

    def write(window: float, endpoint: str, processes: int = 1) -> None:
        path.write_text(
            f'[vod]\nendpoint = "{endpoint}"\nscheme = "http"\nconfirm_window = {window}\n'
            f'[daemon]\nprocesses = {processes}\n'
            f'[ledger]\npath = "{tmp_path / "ledger.sqlite3"}"\n'
            f'[[sinks]]\nname = "a"\ntype = "file"\npath = "{tmp_path / "a.jsonl"}"\n',
            encoding="utf-8")

    from procpoll.config import load_config  # noqa: PLC0415

    write(3, emulator.endpoint)
    daemon = Daemon(load_config(path), environ=emulator_env(emulator), config_path=path)
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()), daemon=True)
    thread.start()
    try:
        write(9, "127.0.0.1:1")
        for _ in range(2):
            daemon.reload()
        reloads = [line for line in log_lines() if line["event"] == "config.reloaded"]
        assert [r["restart_required"] for r in reloads] == [["vod"], ["vod"]]
        assert daemon.config.vod.confirm_window_s == 3
        assert daemon.config.vod.endpoint == emulator.endpoint
        write(3, emulator.endpoint, processes=2)
        daemon.reload()
        reloads = [line for line in log_lines() if line["event"] == "config.reloaded"]
        assert reloads[-1]["restart_required"] == ["daemon.processes"]
        assert daemon.config.daemon.processes == 1
    finally:
        daemon.stop()
        thread.join(10)
    assert status == [0]


def test_oversized_pull_is_cut_to_the_room_a_pull_reserves(
        tmp_path: Path, emulator: Emulator) -> None:
    """A reply with more than 16 events (beyond the API's limit) takes only 16 into memory:
    max_in_flight holds; the rest stay unconfirmed in VOD and come back."""
    daemon = Daemon(daemon_config(tmp_path, emulator, [file_sink(tmp_path)]),
                    environ=emulator_env(emulator))
    gate = threading.Event()
    original = daemon.dispatcher.submit
    submitted: list[str] = []

    def hold(event: Any, receipt: Any) -> None:
        submitted.append(receipt.handle)
        original(event, receipt)

    daemon.dispatcher.submit = hold  # type: ignore[method-assign]
    items = [{**task_event(f"t{n}"), "EventHandle": f"h{n}"} for n in range(20)]
    daemon._accept(None, 0.0, items)
    assert len(submitted) == 16
    assert daemon.dispatcher.in_flight == 16
    gate.set()
    daemon.ledger.close()


def test_dead_lettered_events_are_not_counted_as_duplicates(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """A sink that always fails with max_attempts = 1: the event is dead-lettered; the
    final counters say dead 1 and duplicates 0."""
    receiver.status = lambda _body: 500
    emulator.enqueue([task_event("t-dead")])
    config = daemon_config(tmp_path, emulator,
                           [{"name": "hook", "type": "webhook", "url": receiver.url,
                             "retries": 0, "max_attempts": 1}],
                           dead_letter={"directory": str(tmp_path / "dead")})
    assert Daemon(config, environ=emulator_env(emulator)).once() == 0
    done = next(line for line in log_lines() if line["event"] == "daemon.once_done")
    assert (done["dead"], done["duplicates"], done["confirmed"]) == (1, 0, 1)
    assert wait_for(lambda: emulator.stats()["confirmed"] == 1, 5)


def test_pulling_stops_while_the_ledger_fails_and_resumes_when_it_answers(
        tmp_path: Path, emulator: Emulator, log_lines: Callable[[], list[dict[str, Any]]],
        run_daemon: Callable[[Config, dict[str, str]], Daemon]) -> None:
    """A ledger write fails (a database outage): nothing is confirmed, the pull loops stop
    pulling and probe the ledger with backoff instead; once it answers, the same process
    pulls again and the event is delivered and confirmed."""
    from tests.test_daemon import pull_calls  # noqa: PLC0415

    down = threading.Event()
    down.set()
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    daemon = run_daemon(config, emulator_env(emulator))
    ledger = daemon.ledger
    real_record, real_ping = ledger.record, ledger.ping

    def record(*args: Any, **kwargs: Any) -> None:
        if down.is_set():
            raise LedgerError("ledger: write failed: server closed the connection")
        real_record(*args, **kwargs)

    def ping() -> None:
        if down.is_set():
            raise LedgerError("ledger: read failed: connection refused")
        real_ping()

    ledger.record = record  # type: ignore[method-assign]
    ledger.ping = ping  # type: ignore[method-assign]
    emulator.enqueue([task_event("t-outage")])
    assert wait_for(lambda: any(r["event"] == "ledger.unavailable" for r in log_lines()), 10)
    # Pull loops already past their check finish that one pull (held up to 0.3 s): then
    # every loop is probing the ledger, and nothing more is pulled.
    wait_for(lambda: False, 1.0)
    pulls = pull_calls(emulator)
    assert not wait_for(lambda: pull_calls(emulator) > pulls, 1.5), "pulled while failing"
    assert emulator.stats()["confirmed"] == 0
    down.clear()
    assert emulator.wait_drained(20)
    assert any(r["event"] == "ledger.recovered" for r in log_lines())
    assert len(lines(tmp_path / "archive.jsonl")) >= 1


def test_workers_of_one_service_share_the_accounts_call_rate(
        tmp_path: Path, emulator: Emulator) -> None:
    """VOD's limit is per account and action: a worker of a service of 4 processes paces
    its pulls and its confirms to a quarter of `requests_per_s`, so the service stays under
    it."""
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    config = dataclasses.replace(config, vod=dataclasses.replace(config.vod,
                                                                 requests_per_s=90.0))
    daemon = Daemon(config, environ=emulator_env(emulator), shared_ledger=True, rate_shares=4)
    try:
        assert daemon.pull_pacer.rate == 22.5
        assert daemon.confirmer.pacer is not None and daemon.confirmer.pacer.rate == 22.5
    finally:
        daemon.ledger.close()
