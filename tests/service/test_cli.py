"""The command line around the new sub-commands: exit status of a crash, argument checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procpoll import cli, lint


def test_unexpected_exception_exits_70_with_one_log_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """A bug in any command is logged once (procpoll.crashed, traceback) and exits EX_SOFTWARE."""
    def broken(*_args: Any, **_kwargs: Any) -> list[lint.Finding]:
        raise RuntimeError("boom")

    monkeypatch.setattr(lint, "lint", broken)
    path = tmp_path / "procpoll.toml"
    path.write_text(f'[ledger]\npath = "{tmp_path / "l.sqlite3"}"\n[[sinks]]\nname = "a"\n'
                    f'type = "file"\npath = "{tmp_path / "a.jsonl"}"\n', encoding="utf-8")
    assert cli.main(["check", "-c", str(path)]) == cli.EX_SOFTWARE
    crashed = [line for line in log_lines() if line["event"] == "procpoll.crashed"]
    assert len(crashed) == 1
    assert crashed[0]["command"] == "check"
    assert "boom" in json.dumps(crashed[0]["exception"])


@pytest.mark.parametrize("events", ["0", "-3", "many"])
def test_demo_rejects_a_bad_event_count(events: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--events` takes a whole number >= 1; anything else is a usage error before any work."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(["demo", "--events", events])
    assert stopped.value.code == 2
    assert "--events" in capsys.readouterr().err


def test_doctor_requires_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    """`procpoll doctor` without -c is a usage error."""
    with pytest.raises(SystemExit):
        cli.main(["doctor"])
    assert "-c/--config" in capsys.readouterr().err
