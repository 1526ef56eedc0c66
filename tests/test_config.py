"""Config: defaults, every problem reported with file and dotted key, `procpoll check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from procpoll.cli import main
from procpoll.config import Config, default_ledger_path, load_config, parse_config
from procpoll.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

SINK = {"name": "archive", "type": "file", "path": "events.jsonl"}
"""The one sink a config needs to be valid (without sinks every event would be lost)."""


def problems(document: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(document, "cfg.toml")
    return info.value.problems


def with_sink(document: dict[str, object]) -> dict[str, object]:
    """`document` plus the minimal sink, so only the problems under test are reported."""
    return {**document, "sinks": [SINK]}


def test_empty_document_gives_the_documented_defaults() -> None:
    """Every key has a default except the sinks."""
    config = parse_config(with_sink({}), "cfg.toml")
    assert config.vod.endpoint == "vod.tencentcloudapi.com"
    assert config.vod.request_timeout_s == 10.0
    assert config.daemon.concurrency == 32
    assert config.vod.requests_per_s == 95.0
    assert config.daemon.unrouted == "confirm"
    assert config.daemon.pin_cpu is True
    assert config.ledger.retention_s == 7 * 86_400
    assert [sink.name for sink in config.sinks] == ["archive"]


def test_example_config_passes_check() -> None:
    """config.example.toml is valid and names every section."""
    config = load_config(REPO / "config.example.toml")
    assert {s.type for s in config.sinks} >= {"webhook", "file"}
    assert main(["check", "--strict", "-c", str(REPO / "config.example.toml")]) == 0


def test_auto_processes_are_the_cpus_this_process_may_use() -> None:
    """`processes = "auto"` counts the CPUs of the affinity mask (CPUAffinity=, a
    container's cpuset), which is what the workers keep to, not every CPU of the host."""
    config = parse_config(with_sink({"daemon": {"processes": "auto"}}), "cfg.toml")
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    assert config.daemon.processes == (len(mask) if mask else os.cpu_count())


def test_pin_cpu_takes_true_or_false_only() -> None:
    """A pin_cpu that is no boolean is named, with what it takes."""
    assert parse_config(with_sink({"daemon": {"pin_cpu": False}}), "cfg.toml").daemon.pin_cpu \
        is False
    assert problems(with_sink({"daemon": {"pin_cpu": "yes"}})) == [
        "cfg.toml: daemon.pin_cpu: expected true or false, got a string"]


def test_unknown_keys_are_errors_naming_the_dotted_key() -> None:
    """Typos are reported, never ignored: top level, nested and inside a sink."""
    found = problems({"vodd": {}, "vod": {"endpont": "x"},
                      "sinks": [{"name": "a", "type": "file", "path": "x", "colour": 1}]})
    assert "cfg.toml: vodd: unknown key (did you mean vod?)" in found
    assert "cfg.toml: vod.endpont: unknown key (did you mean vod.endpoint?)" in found
    assert "cfg.toml: sinks[0].colour: unknown key" in found


def test_wrong_types_and_ranges_are_all_reported_at_once() -> None:
    """Several problems in one file come back together, each with what was expected."""
    found = problems(with_sink({"vod": {"request_timeout": "10", "sub_app_ids": [1, "2"]},
                                "daemon": {"concurrency": 0, "unrouted": "drop"}}))
    assert len(found) == 4
    assert any("vod.request_timeout: expected a duration" in p for p in found)
    assert any("vod.sub_app_ids: expected a list of integers" in p for p in found)
    assert any("daemon.concurrency: expected a value >= 1" in p for p in found)
    assert any("daemon.unrouted: expected one of 'confirm', 'leave'" in p for p in found)


def test_request_timeout_must_exceed_the_long_poll_hold() -> None:
    """request_timeout <= 5 s would time out every idle pull."""
    [found] = problems(with_sink({"vod": {"request_timeout": 5}}))
    assert "vod.request_timeout: must be > 5 s" in found


def test_duplicate_sink_names_and_bad_sink_types() -> None:
    """Sink names are unique; the type must be a known one."""
    found = problems({"sinks": [{"name": "a", "type": "file", "path": "x"},
                                {"name": "a", "type": "file", "path": "y"},
                                {"name": "b", "type": "carrier-pigeon"}]})
    assert any("sinks[1].name: duplicate sink name 'a'" in p for p in found)
    assert any("sinks[2].type: expected one of" in p for p in found)


def test_secrets_in_the_config_file_are_refused() -> None:
    """secret_key in [credentials] is an error pointing at the safe alternatives."""
    [found] = problems(with_sink({"credentials": {"secret_key": "abc"}}))
    assert "credentials.secret_key: secrets do not belong in the config file" in found


def test_durations_accept_integers_and_decimals() -> None:
    """Durations are seconds, as int or float."""
    config = parse_config(with_sink({"vod": {"request_timeout": 7.5},
                                     "daemon": {"shutdown_grace": 3}}), "cfg.toml")
    assert config.vod.request_timeout_s == 7.5
    assert config.daemon.shutdown_grace_s == 3.0


def test_webhook_url_must_be_http() -> None:
    """A webhook sink needs an http(s) URL."""
    [found] = problems({"sinks": [{"name": "w", "type": "webhook", "url": "ftp://x"}]})
    assert "sinks[0].url: expected an http:// or https:// URL" in found


def test_ledger_defaults_under_state_directory() -> None:
    """systemd's $STATE_DIRECTORY holds the ledger when set."""
    assert default_ledger_path({"STATE_DIRECTORY": "/var/lib/procpoll"}) == \
        Path("/var/lib/procpoll/ledger.sqlite3")
    assert default_ledger_path({}) == Path("ledger.sqlite3")


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A TOML syntax error is a ConfigError with the file and line."""
    path = tmp_path / "bad.toml"
    path.write_text('[vod]\nendpoint = "x"\n[[sinks]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.toml: TOML syntax: .*line 3"):
        load_config(path)


SINK_TOML = '[[sinks]]\nname = "archive"\ntype = "file"\npath = "events.jsonl"\n'


@pytest.mark.parametrize(("content", "status"), [
    ('[vod]\nendpoint = "vod.tencentcloudapi.com"\n' + SINK_TOML, 0),
    ('[vod]\nrequest_timeout = 3\n' + SINK_TOML, 78),
    ("[vod\n", 78),
])
def test_check_exit_status(tmp_path: Path, content: str, status: int,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """`procpoll check` exits 0 for a good file, 78 for a bad one."""
    path = tmp_path / "c.toml"
    path.write_text(content, encoding="utf-8")
    assert main(["check", "-c", str(path)]) == status
    out, err = capsys.readouterr()
    assert out.startswith("ok") if status == 0 else "config:" in err


def test_check_missing_file_exits_66(tmp_path: Path) -> None:
    """A missing config file is EX_NOINPUT, from a real process."""
    result = subprocess.run([sys.executable, "-m", "procpoll", "check", "-c",
                             str(tmp_path / "nope.toml")], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 66
    assert "nope.toml" in result.stderr


def test_check_summary_masks_webhook_secrets(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The effective-config summary never prints a webhook secret or header value."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    path = tmp_path / "c.toml"
    path.write_text(f'[[sinks]]\nname = "w"\ntype = "webhook"\nurl = "https://h/x"\n'
                    f'secret = "{secret}"\nheaders = {{ Authorization = "Bearer tok-9f8e" }}\n',
                    encoding="utf-8")
    assert main(["check", "-c", str(path)]) == 0
    human = capsys.readouterr()
    assert main(["check", "--json", "-c", str(path)]) == 0
    data = capsys.readouterr()
    for text in (human.out, human.err, data.out):
        assert "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" not in text
        assert "tok-9f8e" not in text
    assert '"w"' in data.out  # the summary is there, masked


def test_config_is_frozen() -> None:
    """Config objects cannot be mutated after validation."""
    config = Config()
    with pytest.raises(AttributeError):
        config.vod.endpoint = "x"  # type: ignore[misc]
