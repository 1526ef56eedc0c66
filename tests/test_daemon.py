"""The daemon against the emulator: pull → deliver → remember → confirm, and what goes wrong."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import Config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator, generate_events
from procpoll.events import event_key
from procpoll.ledger import Ledger, Outcome
from tests.conftest import Receiver, daemon_config, emulator_env, wait_for


def task_event(task_id: str, status: str = "FINISH", **extra: Any) -> dict[str, Any]:
    """A minimal ProcedureStateChanged normal-callback body."""
    task = {"TaskId": task_id, "Status": status, "FileId": "5285890800000000001",
            "FileName": "clip", "MediaProcessResultSet": [], **extra}
    return {"EventType": "ProcedureStateChanged", "ProcedureStateChangeEvent": task}


@pytest.fixture
def start_daemon(run_daemon: Callable[[Config, dict[str, str]], Daemon],
                 ) -> Callable[[Config, Emulator], Daemon]:
    """Start Daemon.run in a thread with the emulator's credentials."""
    return lambda config, emu: run_daemon(config, emulator_env(emu))


def pull_calls(emu: Emulator) -> int:
    return int(emu.stats()["actions"].get("PullEvents", {}).get("calls", 0))


def file_sink(tmp_path: Path, name: str = "archive", **options: Any) -> dict[str, Any]:
    return {"name": name, "type": "file", "path": str(tmp_path / f"{name}.jsonl"), **options}


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


def test_every_event_reaches_the_sinks_and_is_confirmed(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """200 generated events: each one is delivered to both sinks exactly once, then confirmed."""
    bodies = generate_events(200, seed=3)
    emulator.enqueue(bodies)
    config = daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url},
        file_sink(tmp_path),
    ])
    start_daemon(config, emulator)
    assert emulator.wait_drained(30)
    stats = emulator.stats()
    assert stats["confirmed"] == 200
    assert stats["redelivered"] == 0
    assert sorted(map(json.dumps, receiver.received())) == sorted(map(json.dumps, bodies))
    assert sorted(map(json.dumps, lines(tmp_path / "archive.jsonl"))) == \
        sorted(map(json.dumps, bodies))


def test_webhook_body_is_the_normal_callback_body_byte_for_byte(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """The webhook receives the event without EventHandle, keys in order, non-ASCII kept."""
    body = task_event("t-bytes", FileName="视频 \"quoted\" $(x)")
    emulator.enqueue([body])
    start_daemon(daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url}]), emulator)
    assert emulator.wait_drained(10)
    assert receiver.bodies == [json.dumps(body, ensure_ascii=False,
                                          separators=(",", ":")).encode()]
    assert receiver.headers[0]["webhook-id"]


def test_no_confirm_before_the_sink_succeeds(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """While the webhook answers 503 nothing is confirmed; once it recovers, all is."""
    healthy = threading.Event()
    receiver.status = lambda _b: 200 if healthy.is_set() else 503
    emulator.enqueue([task_event(f"t{i}") for i in range(5)])
    start_daemon(daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url, "retries": 1,
         "backoff": 0.05, "backoff_max": 0.1}]), emulator)
    assert wait_for(lambda: emulator.stats()["redelivered"] >= 5, 15)
    assert emulator.stats()["confirmed"] == 0
    assert receiver.bodies == []
    healthy.set()
    assert emulator.wait_drained(30)
    assert emulator.stats()["confirmed"] == 5
    assert len(receiver.bodies) == 5


def test_redelivery_skips_the_sink_that_already_has_the_event(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """Sink A succeeds, sink B fails: after redelivery B is called again, A gets no duplicate."""
    healthy = threading.Event()
    receiver.status = lambda _b: 200 if healthy.is_set() else 500
    emulator.enqueue([task_event("t-fanout")])
    start_daemon(daemon_config(tmp_path, emulator, [
        file_sink(tmp_path, "a"),
        {"name": "b", "type": "webhook", "url": receiver.url, "retries": 0},
    ]), emulator)
    assert wait_for(lambda: emulator.stats()["redelivered"] >= 1, 15)
    healthy.set()
    assert emulator.wait_drained(20)
    assert len(lines(tmp_path / "a.jsonl")) == 1
    assert len(receiver.bodies) == 1


def test_redelivered_event_already_delivered_is_confirmed_without_calling_sinks(
        tmp_path: Path, emulator: Emulator,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """A notification the ledger has as delivered but not as confirmed (the process died
    before its confirm) comes back: it is confirmed, not delivered again."""
    body = task_event("t-known")
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    ledger = Ledger(config.ledger.path, retention_s=3600)
    ledger.record([Outcome(event_key(body), "archive", delivered=True)])
    ledger.close()
    emulator.enqueue([body])
    start_daemon(config, emulator)
    assert emulator.wait_drained(10)
    assert emulator.stats()["confirmed"] == 1
    assert lines(tmp_path / "archive.jsonl") == []


def test_identical_body_after_a_confirmed_one_is_a_new_notification(
        tmp_path: Path, emulator: Emulator,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """RestoreMediaComplete carries no id: restoring one file twice sends byte-identical
    bodies. The second comes after the first was confirmed, so it is delivered too."""
    body = {"EventType": "RestoreMediaComplete",
            "RestoreMediaCompleteEvent": {"FileId": "5285890800000000009", "Status": 0}}
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    emulator.enqueue([body])
    assert Daemon(config, environ=emulator_env(emulator)).once() == 0
    emulator.enqueue([body])
    start_daemon(config, emulator)
    assert emulator.wait_drained(10)
    assert emulator.stats()["confirmed"] == 2
    assert lines(tmp_path / "archive.jsonl") == [body, body]


def test_two_identical_live_notifications_in_one_pull_are_both_delivered(
        tmp_path: Path, emulator: Emulator,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """Two live handles with the same key are two notifications: each is delivered once,
    one after the other, and both handles are confirmed (none left to expire)."""
    body = {"EventType": "RestoreMediaComplete",
            "RestoreMediaCompleteEvent": {"FileId": "5285890800000000010", "Status": 0}}
    emulator.enqueue([body, body])
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    start_daemon(config, emulator)
    assert emulator.wait_drained(10)
    stats = emulator.stats()
    assert stats["confirmed"] == 2
    assert stats.get("redelivered", 0) == 0
    assert lines(tmp_path / "archive.jsonl") == [body, body]


def test_second_identical_notification_has_its_own_webhook_id(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """Receivers deduplicate on webhook-id: the second of two identical notifications
    carries the next occurrence's id (key~1), not the first one's."""
    body = {"EventType": "RestoreMediaComplete",
            "RestoreMediaCompleteEvent": {"FileId": "5285890800000000011", "Status": 0}}
    emulator.enqueue([body, body])
    config = daemon_config(tmp_path, emulator,
                           [{"name": "hook", "type": "webhook", "url": receiver.url}])
    start_daemon(config, emulator)
    assert emulator.wait_drained(10)
    key = event_key(body)
    assert [h["webhook-id"] for h in receiver.headers] == [key, f"{key}~1"]


def test_events_of_one_task_are_delivered_in_order_one_at_a_time(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """Ten updates of one task arrive at the sink in pull order, never two at once."""
    receiver.delay_s = 0.02
    active = []
    peak = []
    lock = threading.Lock()

    def status(body: bytes) -> int:
        with lock:
            active.append(1)
            peak.append(len(active))
        receiver_delay = 0.01
        threading.Event().wait(receiver_delay)
        with lock:
            active.pop()
        return 200

    receiver.status = status
    bodies = [task_event("t-order", "PROCESSING", Progress=i) for i in range(10)]
    emulator.enqueue(bodies)
    start_daemon(daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url}]), emulator)
    assert emulator.wait_drained(20)
    progress = [b["ProcedureStateChangeEvent"]["Progress"] for b in receiver.received()]
    assert progress == list(range(10))
    assert max(peak) == 1


def test_handle_arriving_during_long_work_is_attached_not_delivered_twice(
        tmp_path: Path, receiver: Receiver,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """A sink slower than the confirm window: the redelivered handle joins the running work,
    the sink is called once, and the newest handle is confirmed."""
    emu = Emulator(confirm_window_s=1.0, hold_s=0.2).start()
    try:
        calls = []
        release = threading.Event()

        def status(_body: bytes) -> int:
            calls.append(1)
            release.wait(10)
            return 200

        receiver.status = status
        emu.enqueue([task_event("t-slow")])
        config = daemon_config(tmp_path, emu, [
            {"name": "hook", "type": "webhook", "url": receiver.url, "timeout": 20}],
            vod={"confirm_window": 1.0}, daemon={"confirm_margin": 0.1})
        daemon = start_daemon(config, emu)
        assert wait_for(lambda: daemon.dispatcher.counters["reattached"] >= 1, 15)
        release.set()
        assert emu.wait_drained(15)
        assert len(calls) == 1
        assert emu.stats()["confirmed"] == 1
    finally:
        emu.stop()


def test_unrouted_events_are_confirmed_by_default(
        tmp_path: Path, emulator: Emulator,
        start_daemon: Callable[[Config, Emulator], Daemon]) -> None:
    """An event type no sink wants is confirmed so it cannot clog the queue."""
    emulator.enqueue([{"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": ["1"]}}])
    start_daemon(daemon_config(tmp_path, emulator, [
        file_sink(tmp_path, events=["ProcedureStateChanged"])]), emulator)
    assert emulator.wait_drained(10)
    assert lines(tmp_path / "archive.jsonl") == []


def test_unrouted_leave_keeps_events_in_vod(tmp_path: Path, emulator: Emulator) -> None:
    """With unrouted = "leave", an event no sink wants is not confirmed."""
    emulator.enqueue([{"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": ["1"]}}])
    config = daemon_config(tmp_path, emulator, [
        file_sink(tmp_path, events=["ProcedureStateChanged"])], daemon={"unrouted": "leave"})
    assert Daemon(config, environ=emulator_env(emulator)).once() == 0
    assert emulator.stats()["confirmed"] == 0


def test_poison_event_goes_to_dead_letter_then_is_confirmed(
        tmp_path: Path, emulator: Emulator, receiver: Receiver) -> None:
    """A sink that always refuses: after max_attempts rounds it is set aside and confirmed."""
    receiver.status = lambda _b: 400
    emulator.enqueue([task_event("t-poison")])
    config = daemon_config(tmp_path, emulator, [
        {"name": "hook", "type": "webhook", "url": receiver.url, "max_attempts": 2}],
        dead_letter={"directory": str(tmp_path / "dead")})
    daemon = Daemon(config, environ=emulator_env(emulator))
    assert daemon.once() == 75  # first round fails, event stays in VOD
    assert emulator.stats()["confirmed"] == 0
    emulator_window_passes = wait_for(lambda: emulator.stats()["pending"] == 1, 10)
    assert emulator_window_passes
    assert Daemon(config, environ=emulator_env(emulator)).once() == 0
    assert emulator.stats()["confirmed"] == 1
    [dead] = list((tmp_path / "dead").glob("*.json"))
    record = json.loads(dead.read_text(encoding="utf-8"))
    assert record["sink"] == "hook"
    assert record["event"]["ProcedureStateChangeEvent"]["TaskId"] == "t-poison"


def test_unparseable_event_is_dead_lettered_and_the_rest_of_the_batch_delivered(
        tmp_path: Path, emulator: Emulator) -> None:
    """A ProcedureStateChanged whose task is a string is set aside; its batch-mates arrive."""
    emulator.enqueue([task_event("t-good-1"),
                      {"EventType": "ProcedureStateChanged", "ProcedureStateChangeEvent": "junk"},
                      task_event("t-good-2")])
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)],
                           dead_letter={"directory": str(tmp_path / "dead")})
    assert Daemon(config, environ=emulator_env(emulator)).once() == 0
    assert emulator.stats()["confirmed"] == 3
    assert len(lines(tmp_path / "archive.jsonl")) == 2
    assert len(list((tmp_path / "dead").glob("*.unparsed.json"))) == 1


def test_ledger_records_each_delivery(tmp_path: Path, emulator: Emulator) -> None:
    """After a delivery the ledger holds (event key, sink) with delivered_at set."""
    emulator.enqueue([task_event("t-ledger")])
    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    assert Daemon(config, environ=emulator_env(emulator)).once() == 0
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        rows = db.execute("SELECT sink, attempts, delivered_at IS NOT NULL FROM deliveries")
        assert rows.fetchall() == [("archive", 1, 1)]


def test_missing_credentials_is_a_config_error(tmp_path: Path, emulator: Emulator) -> None:
    """No credential source at all: ConfigError listing what was tried."""
    from procpoll.errors import ConfigError  # noqa: PLC0415

    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)],
                           credentials={"profile_file": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="tried: env TENCENTCLOUD_SECRET_ID"):
        Daemon(config, environ={}).once()


def test_session_token_from_the_environment_is_sent(tmp_path: Path) -> None:
    """TENCENTCLOUD_SESSION_TOKEN is used (the SDK's own env provider drops it)."""
    emu = Emulator(session_token="tok-123", confirm_window_s=3, hold_s=0.2).start()
    try:
        emu.enqueue([task_event("t-token")])
        config = daemon_config(tmp_path, emu, [file_sink(tmp_path)])
        env = {**emulator_env(emu), "TENCENTCLOUD_SESSION_TOKEN": "tok-123"}
        assert Daemon(config, environ=env).once() == 0
        assert emu.stats()["confirmed"] == 1
    finally:
        emu.stop()


def test_sigterm_style_stop_returns_promptly_while_idle(
        tmp_path: Path, emulator: Emulator) -> None:
    """stop() during an idle long poll: run() returns 0 without waiting for more events."""
    daemon = Daemon(daemon_config(tmp_path, emulator, [file_sink(tmp_path)]),
                    environ=emulator_env(emulator))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()), daemon=True)
    thread.start()
    assert wait_for(lambda: pull_calls(emulator) >= 1, 10)
    daemon.stop()
    thread.join(10)
    assert status == [0]


def test_reload_swaps_sinks_and_keeps_the_old_config_when_invalid(
        tmp_path: Path, emulator: Emulator, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """SIGHUP with a valid file swaps the sinks; with a broken file the running config stays."""
    path = tmp_path / "procpoll.toml"

    def write(sink_name: str) -> None:
        path.write_text(
            f'[vod]\nendpoint = "{emulator.endpoint}"\nscheme = "http"\nconfirm_window = 3\n'
            f'[ledger]\npath = "{tmp_path / "ledger.sqlite3"}"\n'
            f'[[sinks]]\nname = "{sink_name}"\ntype = "file"\n'
            f'path = "{tmp_path / sink_name}.jsonl"\n', encoding="utf-8")

    write("first")
    from procpoll.config import load_config  # noqa: PLC0415

    daemon = Daemon(load_config(path), environ=emulator_env(emulator), config_path=path)
    write("second")
    daemon.reload()
    assert [r.config.name for r in daemon.dispatcher.routes] == ["second"]
    path.write_text("[vod\n", encoding="utf-8")
    daemon.reload()
    assert [r.config.name for r in daemon.dispatcher.routes] == ["second"]
    events = [line["event"] for line in log_lines()]
    assert events.count("config.reloaded") == 1
    assert "config.reload_failed" in events
    emulator.enqueue([task_event("t-after-reload")])
    daemon.dispatcher.start()
    daemon.confirmer.start()
    api = daemon._factory()
    sent_at, items = daemon._pull(api, None)
    api.close()
    daemon._accept(None, sent_at, items)
    assert emulator.wait_drained(10)
    daemon.stop()
    assert daemon._shutdown() == 0
    assert len(lines(tmp_path / "second.jsonl")) == 1
    assert not (tmp_path / "first.jsonl").exists()


def test_once_with_refused_credentials_exits_77(tmp_path: Path, emulator: Emulator) -> None:
    """`once` with a wrong key gives up after a few tries with EX_NOPERM, not a hang."""
    import procpoll.daemon as daemon_module  # noqa: PLC0415

    config = daemon_config(tmp_path, emulator, [file_sink(tmp_path)])
    env = {**emulator_env(emulator), "TENCENTCLOUD_SECRET_KEY": "wrong-key"}
    daemon = Daemon(config, environ=env)
    original = daemon_module.AUTH_BACKOFF_S
    daemon_module.AUTH_BACKOFF_S = 0.05
    try:
        assert daemon.once() == 77
    finally:
        daemon_module.AUTH_BACKOFF_S = original
    assert emulator.stats()["confirmed"] == 0
