"""Day-to-day operation commands end to end on the emulator: `once --drain`, `ledger`,
`deadletter`, and the operator-facing output of `check` and `emulate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from procpoll import cli
from procpoll.config import Config
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
    assert Daemon(config, environ=env).once(drain=True) == 77
    assert time.monotonic() - started < 10
    assert emulator.stats()["actions"]["PullEvents"]["calls"] == 1


# --- ledger show / stats -----------------------------------------------------------------------

RESTORED = {"EventType": "RestoreMediaComplete",
            "RestoreMediaCompleteEvent": {"FileId": "5285890800000000009", "Status": 0}}


def run_once(tmp_path: Path, emu: Emulator) -> int:
    """`procpoll once` in this process, on the config file config_file() writes."""
    config = daemon_config(tmp_path, emu, [{"name": "archive", "type": "file",
                                            "path": str(tmp_path / "archive.jsonl")}])
    return Daemon(config, environ=emulator_env(emu)).once()


def test_ledger_show_lists_every_occurrence_and_its_confirmations(
        tmp_path: Path, emulator: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    """Two identical notifications, one after the other: `ledger show KEY --json` has the
    row of KEY and of KEY~1 for the sink, both delivered, and confirmations 0 and 1."""
    path = config_file(tmp_path, emulator)
    for _ in range(2):
        emulator.enqueue([RESTORED])
        assert run_once(tmp_path, emulator) == 0
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
    assert run_once(tmp_path, emulator) == 0
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
