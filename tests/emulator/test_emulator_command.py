"""The `procpoll emulate` command: options, announcement, serving, clean exit on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tencentcloud.common import credential
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile

from procpoll.emulator import generate_events
from procpoll.emulator.command import EXIT_BAD_EVENT_FILE, EXIT_CANNOT_BIND, configure_parser

ROOT = Path(__file__).resolve().parents[2]


class Served:
    """A running `python -m procpoll.emulator.command` and the lines it printed so far."""

    def __init__(self, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "procpoll.emulator.command", "--port", "0", *options],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def field(self, prefix: str, timeout_s: float = 10) -> str:
        """The rest of the first printed line starting with `prefix`."""
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return line[len(prefix) :]
            printed = self._lines.get(timeout=timeout_s)
            assert printed is not None, f"exited before printing {prefix!r}: {self.lines}"
            self.lines.append(printed)

    def client(self, secret_id: str, secret_key: str) -> CommonClient:
        http = HttpProfile(protocol="http", endpoint=self.field("endpoint: "), reqTimeout=10)
        cred = credential.Credential(secret_id, secret_key)
        return CommonClient("vod", "2018-07-17", cred, "", profile=ClientProfile(httpProfile=http))

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Emulator subprocesses started by a test, killed at teardown if still running."""
    started: list[Served] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait(timeout=10)
        for stream in (run.process.stdout, run.process.stderr):
            if stream is not None:
                stream.close()


def test_cli_announces_endpoint_and_credentials_then_serves(served: list[Served]) -> None:
    """The command prints endpoint, scheme and credentials, serves events, exits 0 on SIGTERM."""
    run = Served("--events", "5", "--seed", "3", "--secret-id", "AKIDcli", "--secret-key", "k")
    served.append(run)
    endpoint = run.field("endpoint: ")
    assert endpoint.startswith("127.0.0.1:")
    assert run.field("scheme: ") == "http"
    assert (run.field("secret id: "), run.field("secret key: ")) == ("AKIDcli", "k")
    assert run.field("endpoint = ") == f'"{endpoint}"'
    response = run.client("AKIDcli", "k").call_json("PullEvents", {})["Response"]
    bodies = [{k: v for k, v in e.items() if k != "EventHandle"} for e in response["EventSet"]]
    assert bodies == generate_events(5, seed=3)
    assert run.terminate() == 0


def test_cli_loads_events_from_a_file_for_a_sub_app(served: list[Served], tmp_path: Path) -> None:
    """--from FILE with --sub-app-id N queues the file's bodies for SubAppId N."""
    path = tmp_path / "events.jsonl"
    bodies = generate_events(3, seed=4)
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies), encoding="utf-8")
    run = Served("--from", str(path), "--sub-app-id", "12", "--hold", "0.2")
    served.append(run)
    assert run.field("sub_app_ids = ") == "[12]"
    client = run.client("AKIDemulator", "emulator-secret-key")
    response = client.call_json("PullEvents", {"SubAppId": 12})["Response"]
    assert [{k: v for k, v in e.items() if k != "EventHandle"} for e in response["EventSet"]] == (
        bodies
    )
    assert run.terminate() == 0


def test_cli_refuses_an_unreadable_event_file(served: list[Served], tmp_path: Path) -> None:
    """A --from file that does not exist exits EX_DATAERR with the path on stderr."""
    run = Served("--from", str(tmp_path / "missing.json"))
    served.append(run)
    assert run.process.wait(timeout=10) == EXIT_BAD_EVENT_FILE
    assert run.process.stderr is not None
    assert "missing.json" in run.process.stderr.read()


@pytest.mark.parametrize(
    "formatter", [argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter]
)
def test_every_option_states_its_default_once(formatter: type[argparse.HelpFormatter]) -> None:
    """Each option's help says its default exactly once, with or without the defaults formatter."""
    parser = argparse.ArgumentParser(formatter_class=formatter)
    configure_parser(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 15
    for action in options:
        help_text = parser._get_formatter()._expand_help(action)
        assert help_text.count("(default: ") == 1, help_text
        assert "None" not in help_text, help_text


def test_cli_reports_a_port_in_use(served: list[Served]) -> None:
    """When the port is taken the command exits EX_UNAVAILABLE instead of serving."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = Served("--port", str(taken.getsockname()[1]))
        served.append(run)
        assert run.process.wait(timeout=10) == EXIT_CANNOT_BIND
