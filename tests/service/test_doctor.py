"""`procpoll doctor` against the in-process emulator: each check, its failure and its advice."""

from __future__ import annotations

import io
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from procpoll import cli
from procpoll.config import Config, parse_config
from procpoll.doctor import Doctor
from procpoll.emulator import Emulator
from procpoll.errors import PermanentApiError
from procpoll.vod import CredentialChain, VodApi
from tests.conftest import Receiver, emulator_env


def doctor_config(tmp_path: Path, emu: Emulator, sinks: list[dict[str, Any]],
                  **vod: Any) -> Config:
    """A config pointing at the emulator with the ledger and dead-letter dir in tmp_path."""
    return parse_config({
        "vod": {"endpoint": emu.endpoint, "scheme": "http", **vod},
        "ledger": {"path": str(tmp_path / "state" / "ledger.sqlite3")},
        "dead_letter": {"directory": str(tmp_path / "state" / "dead-letter")},
        # A config without sinks is refused; these checks are about the rest.
        "sinks": sinks or [{"name": "archive", "type": "file",
                            "path": str(tmp_path / "state" / "archive.jsonl")}],
    }, "<test>")


def run(cfg: Config, environ: dict[str, str], **kwargs: Any) -> tuple[bool, list[str]]:
    """Run the doctor; its verdict and printed lines."""
    out = io.StringIO()
    passed = Doctor(cfg, environ=environ, **kwargs).run(out)
    return passed, out.getvalue().splitlines()


def line(lines: list[str], name: str) -> str:
    """The status line of check `name`, with its fix line appended when there is one."""
    for index, text in enumerate(lines):
        if text.split("]", 1)[-1].strip().startswith(f"{name}:"):
            following = lines[index + 1] if index + 1 < len(lines) else ""
            return text + ("\n" + following if following.lstrip().startswith("fix:") else "")
    raise AssertionError(f"no line for {name!r} in {lines}")


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_every_check_passes_on_a_good_setup(tmp_path: Path, emulator: Emulator,
                                            receiver: Receiver) -> None:
    """Credentials, API, mode, sub-apps, each sink type and the ledger: all [ok]."""
    sinks = [{"name": "hook", "type": "webhook", "url": receiver.url},
             {"name": "archive", "type": "file", "path": str(tmp_path / "out" / "e.jsonl")},
             {"name": "db", "type": "sqlite", "path": str(tmp_path / "out" / "e.sqlite3")},
             {"name": "script", "type": "command", "argv": [sys.executable, "-c", "pass"]}]
    passed, lines = run(doctor_config(tmp_path, emulator, sinks, sub_app_ids=[1, 2]),
                        emulator_env(emulator))
    names = [text.split("]", 1)[1].split(":", 1)[0].strip() for text in lines]
    assert names == ["credentials", "api", "event mode", "sub-app 1", "sub-app 2",
                     "sink 'hook' (webhook)", "sink 'archive' (file)", "sink 'db' (sqlite)",
                     "sink 'script' (command)", "dead-letter", "ledger"]
    assert all(text.startswith("[ok]") for text in lines), lines
    assert passed
    assert "from the environment" in line(lines, "credentials")


def test_wrong_secret_key_fails_the_signature_check_with_advice(tmp_path: Path,
                                                                emulator: Emulator) -> None:
    """A key not matching the id: [FAIL] api with the code and the fix; API checks skipped."""
    environ = {**emulator_env(emulator), "TENCENTCLOUD_SECRET_KEY": "not-the-key"}
    passed, lines = run(doctor_config(tmp_path, emulator, []), environ)
    api = line(lines, "api")
    assert api.startswith("[FAIL] api:")
    assert "AuthFailure.SignatureFailure" in api
    assert "fix: the SecretKey does not belong to this SecretId" in api
    assert line(lines, "event mode").startswith("[skip]")
    assert "not-the-key" not in "\n".join(lines)
    assert not passed


def test_wrong_secret_id_says_it_is_unknown(tmp_path: Path, emulator: Emulator) -> None:
    """An id VOD does not know gets its own advice (CAM console, API keys)."""
    environ = {**emulator_env(emulator), "TENCENTCLOUD_SECRET_ID": "AKIDnobody1234567"}
    _, lines = run(doctor_config(tmp_path, emulator, []), environ)
    assert "AuthFailure.SecretIdNotFound" in line(lines, "api")
    assert "does not know this SecretId" in line(lines, "api")


def test_missing_credentials_list_where_they_were_looked_for(tmp_path: Path,
                                                             emulator: Emulator) -> None:
    """No credentials anywhere: [FAIL] with the sources tried, then the API checks are skipped."""
    passed, lines = run(doctor_config(tmp_path, emulator, [], sub_app_ids=[7]),
                        {"HOME": str(tmp_path)})
    credentials = line(lines, "credentials")
    assert credentials.startswith("[FAIL] credentials:")
    assert "TENCENTCLOUD_SECRET_ID" in credentials
    assert "LoadCredential" in credentials
    assert line(lines, "api").startswith("[skip]")
    assert line(lines, "sub-app 7").startswith("[skip]")
    assert not passed


def test_unreachable_api_says_what_to_check(tmp_path: Path, emulator: Emulator) -> None:
    """Nothing listening at the endpoint: a network failure with endpoint/DNS/firewall advice."""
    cfg = parse_config({"vod": {"endpoint": f"127.0.0.1:{closed_port()}", "scheme": "http"},
                        "ledger": {"path": str(tmp_path / "ledger.sqlite3")},
                        "sinks": [{"name": "out", "type": "stdout"}]}, "<test>")
    passed, lines = run(cfg, emulator_env(emulator))
    assert "ClientNetworkError" in line(lines, "api")
    assert "check [vod] endpoint" in line(lines, "api")
    assert not passed


class PushModeVod:
    """A VodApi whose applications deliver by normal (push) callback."""

    def pull(self, sub_app_id: int | None) -> list[Any]:
        return []

    def confirm(self, sub_app_id: int | None, handles: Sequence[str]) -> None:
        return None

    def describe_event_config(self, sub_app_id: int | None) -> dict[str, Any]:
        return {"Mode": "PUSH", "NotificationUrl": "https://app.example.com/cb"}

    def close(self) -> None:
        """Nothing to close."""


def test_push_mode_fails_and_says_how_to_switch(tmp_path: Path, emulator: Emulator) -> None:
    """Mode PUSH: [FAIL] event mode with the ModifyEventConfig command for each sub-app."""
    def factory(_chain: CredentialChain) -> VodApi:
        return PushModeVod()

    passed, lines = run(doctor_config(tmp_path, emulator, [], sub_app_ids=[5]),
                        emulator_env(emulator), client_factory=factory)
    mode = line(lines, "event mode")
    assert mode.startswith("[FAIL] event mode: PUSH for sub-app 5")
    assert "tccli vod ModifyEventConfig --Mode PULL --SubAppId 5" in mode
    assert not passed


class UnknownSubAppVod(PushModeVod):
    """A VodApi in PULL mode that does not know sub-app 9."""

    def describe_event_config(self, sub_app_id: int | None) -> dict[str, Any]:
        if sub_app_id == 9:
            raise PermanentApiError("InvalidParameterValue.SubAppId", "SubAppId is invalid.")
        return {"Mode": "PULL"}

    def close(self) -> None:
        """Nothing to close."""


def test_unknown_sub_app_fails_its_own_line(tmp_path: Path, emulator: Emulator) -> None:
    """A parameter error still proves the signature: api [ok], only that sub-app [FAIL]."""
    def factory(_chain: CredentialChain) -> VodApi:
        return UnknownSubAppVod()

    passed, lines = run(doctor_config(tmp_path, emulator, [], sub_app_ids=[9, 10]),
                        emulator_env(emulator), client_factory=factory)
    assert line(lines, "api").startswith("[ok]")
    assert line(lines, "event mode").startswith("[ok]")
    assert line(lines, "sub-app 9").startswith("[FAIL] sub-app 9: DescribeEventConfig: "
                                               "InvalidParameterValue.SubAppId")
    assert "not an application of this account" in line(lines, "sub-app 9")
    assert line(lines, "sub-app 10").startswith("[ok]")
    assert not passed


def test_unwritable_file_sink_path_fails(tmp_path: Path, emulator: Emulator) -> None:
    """A sink path under a regular file cannot be created: [FAIL] naming the key to change."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("", encoding="utf-8")
    sinks = [{"name": "archive", "type": "file", "path": str(blocker / "events.jsonl")}]
    passed, lines = run(doctor_config(tmp_path, emulator, sinks), emulator_env(emulator))
    sink = line(lines, "sink 'archive' (file)")
    assert sink.startswith("[FAIL]")
    assert "not a directory" in sink
    assert "fix: sinks[0].path:" in sink
    assert not passed


def test_write_probe_leaves_nothing_behind(tmp_path: Path, emulator: Emulator) -> None:
    """Checking that a sink's file can be created does not create it or its directory."""
    sinks = [{"name": "archive", "type": "file", "path": str(tmp_path / "new" / "e.jsonl")}]
    before = sorted(tmp_path.iterdir())
    run(doctor_config(tmp_path, emulator, sinks), emulator_env(emulator))
    assert sorted(tmp_path.iterdir()) == before


def test_unreachable_webhook_fails(tmp_path: Path, emulator: Emulator) -> None:
    """A webhook on a closed local port: [FAIL] with the host:port and what to check."""
    port = closed_port()
    sinks = [{"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{port}/cb"}]
    passed, lines = run(doctor_config(tmp_path, emulator, sinks), emulator_env(emulator))
    hook = line(lines, "sink 'hook' (webhook)")
    assert hook.startswith(f"[FAIL] sink 'hook' (webhook): cannot connect to 127.0.0.1:{port}")
    assert "receiver is running" in hook
    assert not passed


def test_missing_command_fails(tmp_path: Path, emulator: Emulator) -> None:
    """A command sink whose program does not exist: [FAIL] asking for an absolute path."""
    sinks = [{"name": "script", "type": "command", "argv": [str(tmp_path / "missing")]}]
    passed, lines = run(doctor_config(tmp_path, emulator, sinks), emulator_env(emulator))
    assert line(lines, "sink 'script' (command)").startswith("[FAIL]")
    assert "sinks[0].argv[0]" in line(lines, "sink 'script' (command)")
    assert not passed


def test_stdout_sink_to_a_fifo_is_checked_without_opening_it(tmp_path: Path,
                                                              emulator: Emulator) -> None:
    """A FIFO nobody reads would block an open(); doctor checks its permissions instead."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    sinks = [{"name": "pipe", "type": "stdout", "path": str(fifo)},
             {"name": "out", "type": "stdout"}]
    passed, lines = run(doctor_config(tmp_path, emulator, sinks), emulator_env(emulator))
    assert line(lines, "sink 'pipe' (stdout)") == f"[ok]   sink 'pipe' (stdout): {fifo} is writable"
    assert line(lines, "sink 'out' (stdout)").startswith("[ok]")
    assert passed


def test_existing_ledger_is_opened_for_writing(tmp_path: Path, emulator: Emulator) -> None:
    """A ledger file that is not a database fails the ledger check."""
    cfg = doctor_config(tmp_path, emulator, [])
    cfg.ledger.path.parent.mkdir(parents=True)
    cfg.ledger.path.write_bytes(b"this is not sqlite" * 100)
    passed, lines = run(cfg, emulator_env(emulator))
    assert line(lines, "ledger").startswith("[FAIL] ledger:")
    assert not passed


def test_command_exit_status_is_0_only_when_all_pass(tmp_path: Path, emulator: Emulator,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`procpoll doctor -c FILE` exits 0 on a good setup and 1 once a check fails."""
    for name, value in emulator_env(emulator).items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "procpoll.toml"
    base = (f'[vod]\nendpoint = "{emulator.endpoint}"\nscheme = "http"\n'
            f'[ledger]\npath = "{tmp_path / "ledger.sqlite3"}"\n'
            f'[[sinks]]\nname = "archive"\ntype = "file"\npath = "{tmp_path / "a.jsonl"}"\n')
    path.write_text(base, encoding="utf-8")
    assert cli.main(["doctor", "-c", str(path)]) == cli.EX_OK
    path.write_text(base + f'[[sinks]]\nname = "hook"\ntype = "webhook"\n'
                           f'url = "http://127.0.0.1:{closed_port()}/"\n', encoding="utf-8")
    assert cli.main(["doctor", "-c", str(path)]) == cli.EX_DOCTOR_FAILED
    assert "[FAIL] sink 'hook'" in capsys.readouterr().out
