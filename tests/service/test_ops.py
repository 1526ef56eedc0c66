"""Day-to-day operation commands end to end on the emulator: `once --drain`, `ledger`,
`deadletter`, and the operator-facing output of `check` and `emulate`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from procpoll import cli
from procpoll.config import Config, load_config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator, generate_events
from procpoll.events import event_key
from procpoll.ledger import Ledger, Outcome
from tests.conftest import Receiver, daemon_config, emulator_env


def procpoll(*args: str, env: dict[str, str] | None = None,
             **options: Any) -> subprocess.CompletedProcess[str]:
    """`python -m procpoll ARGS` in a child process, outside any journal."""
    base = {k: v for k, v in os.environ.items()
            if k != "JOURNAL_STREAM" and not k.startswith("TENCENTCLOUD_")}
    return subprocess.run([sys.executable, "-m", "procpoll", *args], env={**base, **(env or {})},
                          text=True, capture_output=True, timeout=60, check=False, **options)


def config_file(tmp_path: Path, emu: Emulator, extra: str = "") -> Path:
    """A TOML config pointing at the emulator, a file sink "archive", a dead-letter directory."""
    path = tmp_path / "procpoll.toml"
    path.write_text(
        f'[vod]\nendpoint = "{emu.endpoint}"\nscheme = "http"\nconfirm_window = 3.0\n'
        f'[ledger]\npath = "{tmp_path / "ledger.sqlite3"}"\n'
        f'[dead_letter]\ndirectory = "{tmp_path / "dead"}"\n'
        f'[[sinks]]\nname = "archive"\ntype = "file"\npath = "{tmp_path / "archive.jsonl"}"\n'
        + extra, encoding="utf-8")
    return path


def archived(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "archive.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


# --- once --drain ------------------------------------------------------------------------------

def test_once_drain_empties_a_backlog_larger_than_one_pull(tmp_path: Path,
                                                           emulator: Emulator) -> None:
    """`once --drain` pulls until the queue answers empty: 100 events (seven pulls) are
    delivered and confirmed, and the exit status is 0."""
    emulator.enqueue(generate_events(100, seed=3))
    result = procpoll("once", "--drain", "-c", str(config_file(tmp_path, emulator)),
                      env=emulator_env(emulator))
    assert result.returncode == cli.EX_OK, result.stderr
    assert emulator.stats()["confirmed"] == 100
    assert len(archived(tmp_path)) == 100


def test_once_without_drain_pulls_one_batch(tmp_path: Path, emulator: Emulator) -> None:
    """Plain `once` keeps its meaning: one pull per sub-app, so 16 of 100 events."""
    emulator.enqueue(generate_events(100, seed=3))
    result = procpoll("once", "-c", str(config_file(tmp_path, emulator)),
                      env=emulator_env(emulator))
    assert result.returncode == cli.EX_OK, result.stderr
    assert emulator.stats()["confirmed"] == 16


def test_once_drain_max_events_stops_pulling_after_n(tmp_path: Path,
                                                     emulator: Emulator) -> None:
    """`--max-events 20` stops after the pull that reached 20: two pulls of 16, 32 events;
    the rest stays in VOD for the next run."""
    emulator.enqueue(generate_events(100, seed=3))
    result = procpoll("once", "--drain", "--max-events", "20",
                      "-c", str(config_file(tmp_path, emulator)), env=emulator_env(emulator))
    assert result.returncode == cli.EX_OK, result.stderr
    assert emulator.stats()["confirmed"] == 32
    assert emulator.stats()["pending"] == 68


def test_max_events_without_drain_is_a_usage_error(tmp_path: Path) -> None:
    """`--max-events` only bounds a drain: alone it is exit 64 before any work."""
    assert cli.main(["once", "--max-events", "5", "-c", str(tmp_path / "none.toml")]) \
        == cli.EX_USAGE


def test_once_drain_holds_no_more_than_max_in_flight(tmp_path: Path, emulator: Emulator,
                                                     receiver: Receiver) -> None:
    """While draining, `once` reserves room for each pull as the pull loop does: with
    max_in_flight = 16 and a slow receiver, at most 16 events are ever held, and all 80
    still arrive."""
    receiver.delay_s = 0.01
    emulator.enqueue(generate_events(80, seed=5))
    config: Config = daemon_config(tmp_path, emulator,
                                   [{"name": "hook", "type": "webhook", "url": receiver.url}],
                                   daemon={"max_in_flight": 16, "concurrency": 8})
    daemon = Daemon(config, environ=emulator_env(emulator))
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], daemon.dispatcher.in_flight)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert daemon.once(drain=True) == cli.EX_OK
    finally:
        done.set()
        sampler.join(5)
    assert 0 < peak[0] <= 16
    assert len(receiver.received()) == 80


def test_once_with_refused_credentials_exits_77_without_backing_off(
        tmp_path: Path, emulator: Emulator) -> None:
    """A refused key will not fix itself within a cron run: `once` exits 77 after the first
    PullEvents, not after two one-minute auth backoffs."""
    config = daemon_config(tmp_path, emulator, [{"name": "archive", "type": "file",
                                                 "path": str(tmp_path / "archive.jsonl")}])
    env = {**emulator_env(emulator), "TENCENTCLOUD_SECRET_KEY": "wrong-key"}
    started = time.monotonic()
    assert Daemon(config, environ=env).once(drain=True) == cli.EX_NOPERM
    assert time.monotonic() - started < 10
    assert emulator.stats()["actions"]["PullEvents"]["calls"] == 1


# --- ledger show / stats -----------------------------------------------------------------------

RESTORED = {"EventType": "RestoreMediaComplete",
            "RestoreMediaCompleteEvent": {"FileId": "5285890800000000009", "Status": 0}}


def run_once(path: Path, emu: Emulator) -> int:
    """`procpoll once` in this process, on a config file."""
    return Daemon(load_config(path), environ=emulator_env(emu)).once()


def test_ledger_show_lists_every_occurrence_and_its_confirmations(
        tmp_path: Path, emulator: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    """Two identical notifications, one after the other: `ledger show KEY --json` has the
    row of KEY and of KEY~1 for the sink, both delivered, and confirmations 0 and 1."""
    path = config_file(tmp_path, emulator)
    for _ in range(2):
        emulator.enqueue([RESTORED])
        assert run_once(path, emulator) == 0
    key = event_key(RESTORED)
    capsys.readouterr()
    assert cli.main(["ledger", "show", key, "--json", "-c", str(path)]) == cli.EX_OK
    record = json.loads(capsys.readouterr().out)
    assert [(row["delivery_id"], row["sink"], row["state"], row["attempts"])
            for row in record["deliveries"]] == [(key, "archive", "delivered", 1),
                                                 (f"{key}~1", "archive", "delivered", 1)]
    assert all(row["first_seen"] for row in record["deliveries"])
    assert [row["occurrence"] for row in record["confirmations"]] == [0, 1]


def test_ledger_show_text_names_the_last_error(tmp_path: Path, emulator: Emulator,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A failing row shows its state, attempts and last error in the text answer."""
    path = config_file(tmp_path, emulator)
    ledger = Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400)
    ledger.record([Outcome("k1", "hook", delivered=False, error="HTTP 503")])
    ledger.record([Outcome("k1", "hook", delivered=False, error="HTTP 502")])
    ledger.close()
    assert cli.main(["ledger", "show", "k1", "-c", str(path)]) == cli.EX_OK
    out = capsys.readouterr().out
    assert "k1  sink=hook  failing  attempts=2" in out
    assert "last_error='HTTP 502'" in out
    assert "no confirmation recorded" in out


def test_ledger_show_of_an_unknown_key_exits_1(tmp_path: Path, emulator: Emulator,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A key the ledger never saw (or one that only shares a prefix) is exit 1, like grep."""
    path = config_file(tmp_path, emulator)
    ledger = Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400)
    ledger.record([Outcome("k10", "hook", delivered=True)])
    ledger.close()
    assert cli.main(["ledger", "show", "k1", "-c", str(path)]) == cli.EX_NOT_FOUND
    assert "no delivery rows" in capsys.readouterr().out


def test_ledger_stats_counts_rows_by_state(tmp_path: Path, emulator: Emulator,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`ledger stats --json`: delivered, dead and failing rows, confirmations, oldest row."""
    path = config_file(tmp_path, emulator)
    emulator.enqueue([RESTORED])
    assert run_once(path, emulator) == 0
    ledger = Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400)
    ledger.record([Outcome("k-dead", "hook", delivered=False, dead=True, error="HTTP 400"),
                   Outcome("k-failing", "hook", delivered=False, error="HTTP 503")])
    ledger.close()
    capsys.readouterr()
    assert cli.main(["ledger", "stats", "--json", "-c", str(path)]) == cli.EX_OK
    totals = json.loads(capsys.readouterr().out)
    assert {k: totals[k] for k in ("delivered", "dead", "failing", "confirmations")} == {
        "delivered": 1, "dead": 1, "failing": 1, "confirmations": 1}
    assert totals["oldest_row"].startswith(time.strftime("%Y-", time.gmtime()))


def test_ledger_commands_never_create_or_change_the_ledger(tmp_path: Path,
                                                           emulator: Emulator) -> None:
    """Read-only: with no ledger file `ledger stats` exits 66 and creates none; on an
    existing ledger the file's bytes are unchanged after show and stats."""
    path = config_file(tmp_path, emulator)
    assert cli.main(["ledger", "stats", "-c", str(path)]) == cli.EX_NOINPUT
    assert not (tmp_path / "ledger.sqlite3").exists()
    ledger = Ledger(tmp_path / "ledger.sqlite3", retention_s=86_400)
    ledger.record([Outcome("k1", "hook", delivered=True)])
    ledger.close()
    before = (tmp_path / "ledger.sqlite3").read_bytes()
    assert cli.main(["ledger", "stats", "-c", str(path)]) == cli.EX_OK
    assert cli.main(["ledger", "show", "k1", "-c", str(path)]) == cli.EX_OK
    assert (tmp_path / "ledger.sqlite3").read_bytes() == before


# --- deadletter list / show / replay -----------------------------------------------------------

JUNK = {"EventType": "ProcedureStateChanged", "ProcedureStateChangeEvent": "junk"}


def hook_sink(receiver: Receiver, name: str = "hook") -> str:
    """A webhook sink that dead-letters at its first failed round, retrying twice within it."""
    return (f'[[sinks]]\nname = "{name}"\ntype = "webhook"\nurl = "{receiver.url}"\n'
            'max_attempts = 1\nretries = 2\nbackoff = 0.01\nbackoff_max = 0.02\n')


def dead_lettered(tmp_path: Path, emu: Emulator, receiver: Receiver,
                  bodies: list[dict[str, Any]], extra: str = "") -> Path:
    """Run `once` while the receiver answers 400: each event is set aside for "hook"."""
    receiver.status = lambda _body: 400
    path = config_file(tmp_path, emu, hook_sink(receiver) + extra)
    emu.enqueue(bodies)
    assert run_once(path, emu) == 0
    receiver.status = lambda _body: 200
    return path


def test_deadletter_list_shows_reason_sink_rounds_type_and_time(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`deadletter list --json`: the sink failure with its sink, rounds, type, reason and
    time; the unparsed item with its reason."""
    path = dead_lettered(tmp_path, emulator, receiver, [RESTORED, JUNK])
    capsys.readouterr()
    assert cli.main(["deadletter", "list", "--json", "-c", str(path)]) == cli.EX_OK
    rows = {row["kind"]: row for row in json.loads(capsys.readouterr().out)}
    failure, unparsed = rows["sink-failure"], rows["unparsed"]
    assert (failure["file"], failure["sink"], failure["rounds"], failure["event_type"]) == (
        f"{event_key(RESTORED)}.hook.json", "hook", 1, "RestoreMediaComplete")
    assert "400" in failure["reason"]
    assert failure["dead_lettered_at"].endswith("Z")
    assert unparsed["file"].endswith(".unparsed.json")
    assert "ProcedureStateChangeEvent" in unparsed["reason"]
    assert cli.main(["deadletter", "list", "-c", str(path)]) == cli.EX_OK
    assert "unparsed (kept: nothing to replay)" in capsys.readouterr().out


def test_deadletter_show_prints_the_stored_record(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`deadletter show FILE` (a name in the directory) prints the record, event included;
    a name that is not there is exit 66."""
    path = dead_lettered(tmp_path, emulator, receiver, [RESTORED])
    name = f"{event_key(RESTORED)}.hook.json"
    capsys.readouterr()
    assert cli.main(["deadletter", "show", name, "-c", str(path)]) == cli.EX_OK
    assert json.loads(capsys.readouterr().out)["event"] == RESTORED
    assert cli.main(["deadletter", "show", "nope.json", "-c", str(path)]) == cli.EX_NOINPUT


def test_deadletter_replay_delivers_records_then_removes(
        tmp_path: Path, emulator: Emulator, receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`deadletter replay` delivers the event to its sink, records it delivered in the
    ledger, removes the file and exits 0; the unparsed item is kept."""
    path = dead_lettered(tmp_path, emulator, receiver, [RESTORED, JUNK])
    assert cli.main(["deadletter", "replay", "-c", str(path)]) == cli.EX_OK
    assert receiver.received() == [RESTORED]
    assert [p.name for p in (tmp_path / "dead").iterdir()] == [
        next(p.name for p in (tmp_path / "dead").iterdir() if p.name.endswith(".unparsed.json"))]
    capsys.readouterr()
    assert cli.main(["ledger", "show", event_key(RESTORED), "--json", "-c", str(path)]) == 0
    states = {row["sink"]: row["state"] for row in json.loads(capsys.readouterr().out)
              ["deliveries"]}
    assert states == {"archive": "delivered", "hook": "delivered"}


def test_deadletter_replay_keeps_the_file_while_the_sink_refuses(
        tmp_path: Path, emulator: Emulator, receiver: Receiver) -> None:
    """A sink that still answers 503 gets its retries (1 + 2 attempts) and the file stays;
    exit 75."""
    path = dead_lettered(tmp_path, emulator, receiver, [RESTORED])
    attempts: list[bytes] = []

    def refuse(body: bytes) -> int:
        attempts.append(body)
        return 503

    receiver.status = refuse
    assert cli.main(["deadletter", "replay", "-c", str(path)]) == cli.EX_TEMPFAIL
    assert len(attempts) == 3
    assert (tmp_path / "dead" / f"{event_key(RESTORED)}.hook.json").exists()


def test_deadletter_replay_to_another_sink(tmp_path: Path, emulator: Emulator,
                                          receiver: Receiver) -> None:
    """`--sink NAME` delivers to that sink instead, and the ledger row is under its name."""
    other = tmp_path / "other.jsonl"
    path = dead_lettered(tmp_path, emulator, receiver, [RESTORED],
                         f'[[sinks]]\nname = "other"\ntype = "file"\npath = "{other}"\n'
                         'events = ["FileDeleted"]\n')
    assert cli.main(["deadletter", "replay", "--sink", "other", "-c", str(path)]) == cli.EX_OK
    assert [json.loads(line) for line in other.read_text(encoding="utf-8").splitlines()] \
        == [RESTORED]
    assert receiver.received() == []
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        assert db.execute("SELECT delivered_at IS NOT NULL FROM deliveries WHERE sink = 'other'"
                          ).fetchall() == [(1,)]


def test_deadletter_replay_of_an_old_file_records_its_event_key(
        tmp_path: Path, emulator: Emulator, receiver: Receiver) -> None:
    """A file written before delivery ids existed (only `event_key`) is replayed and recorded
    under that key."""
    path = dead_lettered(tmp_path, emulator, receiver, [RESTORED])
    dead = tmp_path / "dead" / f"{event_key(RESTORED)}.hook.json"
    record = json.loads(dead.read_text(encoding="utf-8"))
    del record["delivery_id"]
    dead.write_text(json.dumps(record), encoding="utf-8")
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        db.execute("DELETE FROM deliveries WHERE sink = 'hook'")
    assert cli.main(["deadletter", "replay", str(dead), "-c", str(path)]) == cli.EX_OK
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        assert db.execute("SELECT event_key FROM deliveries WHERE sink = 'hook' AND "
                          "delivered_at IS NOT NULL").fetchall() == [(event_key(RESTORED),)]
    assert not dead.exists()


def test_deadletter_replay_of_a_named_unparsed_item_keeps_it(
        tmp_path: Path, emulator: Emulator, receiver: Receiver) -> None:
    """Naming an unparsed item: nothing can be replayed, it is kept, exit 75."""
    path = dead_lettered(tmp_path, emulator, receiver, [JUNK])
    [junk] = (tmp_path / "dead").glob("*.unparsed.json")
    assert cli.main(["deadletter", "replay", junk.name, "-c", str(path)]) == cli.EX_TEMPFAIL
    assert junk.exists()


# --- emulate ------------------------------------------------------------------------------------

def test_emulate_prints_a_complete_config_that_drains_it(tmp_path: Path) -> None:
    """What `procpoll emulate` prints after the blank line, saved as a file as is, is a
    whole config ([vod], [ledger], a file sink): `once --drain` with the printed env
    delivers every queued event."""
    emulate = subprocess.Popen(
        [sys.executable, "-m", "procpoll", "emulate", "--port", "0", "--events", "20",
         "--confirm-window", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert emulate.stdout is not None
        printed: list[str] = []
        while not printed or printed[-1] != 'path = "procpoll-emulator/events.jsonl"':
            line = emulate.stdout.readline()
            assert line, f"emulate ended early: {printed}"
            printed.append(line.rstrip("\n"))
        env_line = next(line for line in printed if line.startswith("env: "))
        env = dict(pair.split("=", 1) for pair in env_line[len("env: "):].split())
        config = tmp_path / "procpoll-emulator.toml"
        config.write_text("\n".join(printed[printed.index("") + 1:]) + "\n", encoding="utf-8")
        result = procpoll("once", "--drain", "-c", str(config), env=env, cwd=tmp_path)
        assert result.returncode == cli.EX_OK, result.stderr
        events = tmp_path / "procpoll-emulator" / "events.jsonl"
        assert len(events.read_text(encoding="utf-8").splitlines()) == 20
    finally:
        emulate.terminate()
        emulate.communicate(timeout=10)


def test_ledger_copy_moves_deliveries_and_is_idempotent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ledger copy` carries every delivery and confirmation into the target ledger (here
    another SQLite file); a second run writes nothing; the target then knows the event."""
    source = Ledger(tmp_path / "old.sqlite3", retention_s=86_400)
    source.record([Outcome("k1", "hook", delivered=True), Outcome("k2", "hook", delivered=False,
                                                                  error="HTTP 503")])
    source.close()
    args = ["ledger", "copy", "--from", f"sqlite:///{tmp_path / 'old.sqlite3'}",
            "--to", f"sqlite:///{tmp_path / 'new.sqlite3'}"]
    assert cli.main(args) == cli.EX_OK
    first = json.loads(capsys.readouterr().out)
    assert first["deliveries_written"] == 2
    assert cli.main(args) == cli.EX_OK
    assert json.loads(capsys.readouterr().out)["deliveries_written"] == 0
    target = Ledger(tmp_path / "new.sqlite3", retention_s=86_400)
    assert target.states("k1")["hook"].delivered
    assert target.states("k2")["hook"].attempts == 1
    target.close()
