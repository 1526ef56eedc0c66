"""The command line: exit statuses (a crash, an unreadable or sinkless config), argument
checks, and stderr lines tagged with their priority under journald."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


# --- clear exits instead of crash loops (real processes) -------------------------------------

COMMANDS = ["check", "doctor", "run", "once"]


def procpoll(*args: str, env_extra: dict[str, str] | None = None,
             **options: Any) -> subprocess.CompletedProcess[str]:
    """`python -m procpoll ARGS` in a child process, outside any journal and without VOD
    credentials from the environment unless `env_extra` gives some."""
    env = {k: v for k, v in os.environ.items()
           if k != "JOURNAL_STREAM" and not k.startswith("TENCENTCLOUD_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "procpoll", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False, **options)


def sinkless_config(tmp_path: Path) -> Path:
    path = tmp_path / "procpoll.toml"
    path.write_text(f'[ledger]\npath = "{tmp_path / "ledger.sqlite3"}"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_config_without_sinks_exits_78_from_every_command(tmp_path: Path, command: str) -> None:
    """No sinks would confirm every event undelivered: each command refuses with EX_CONFIG,
    saying why, before it locks or opens anything."""
    result = procpoll(command, "-c", str(sinkless_config(tmp_path)))
    assert result.returncode == cli.EX_CONFIG
    assert "sinks: no [[sinks]] table: every pulled event would be confirmed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["procpoll.toml"]


# root reads any file; without these two capabilities (as in a unit with an empty
# CapabilityBoundingSet=) it obeys the file mode like any user.
ROOT_WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _unreadable(kind: str, base: Path) -> tuple[Path, str, list[str]]:
    """A config path of `kind`, the reason the kernel gives, and a prefix for the command."""
    if kind == "a directory":
        return base, "Is a directory", []
    if kind == "under a file":
        (base / "procpoll.toml").write_text("", encoding="utf-8")
        return base / "procpoll.toml" / "procpoll.toml", "Not a directory", []
    path = base / "procpoll.toml"
    path.write_text("", encoding="utf-8")
    path.chmod(0)
    return path, "Permission denied", ROOT_WITHOUT_DAC if os.geteuid() == 0 else []


@pytest.mark.parametrize(("command", "kind"), [
    *((command, "a directory") for command in COMMANDS),
    ("check", "under a file"), ("run", "under a file"),
    ("check", "not readable"), ("run", "not readable"),
])
def test_unreadable_config_exits_66_with_one_line(tmp_path: Path, command: str,
                                                  kind: str) -> None:
    """A directory, a path through a file, or no read permission: exit 66 (EX_NOINPUT,
    which systemd does not restart) with one line naming the path and the reason."""
    path, reason, prefix = _unreadable(kind, tmp_path)
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip("running as root without setpriv: every file is readable")
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    result = subprocess.run([*prefix, sys.executable, "-m", "procpoll", command, "-c", str(path)],
                            env=env, text=True, capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (
        cli.EX_NOINPUT, f"procpoll: cannot read the config file {path}: {reason}\n")


SLOW_SINK = '[[sinks]]\nname = "slow"\ntype = "file"\npath = "{out}"\ntimeout = 10\n'


@pytest.mark.parametrize(("journal", "prefix"), [(True, "<3>"), (False, "")])
def test_fatal_lines_carry_priority_err_when_stderr_is_the_journal(
        tmp_path: Path, journal: bool, prefix: str) -> None:
    """stderr is the journal ($JOURNAL_STREAM = its device:inode): each fatal line starts
    with <3>, so `journalctl -p err` shows why; elsewhere the line is plain."""
    err = tmp_path / "stderr"
    with err.open("w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else "1:2"}
        subprocess.run([sys.executable, "-m", "procpoll", "check", "-c",
                        str(sinkless_config(tmp_path))],
                       env=env, stdout=subprocess.DEVNULL, stderr=stream, timeout=60, check=False)
    lines = err.read_text(encoding="utf-8").splitlines()
    assert lines
    assert all(line.startswith(f"{prefix}procpoll: config: ") for line in lines)


def test_check_warnings_carry_priority_warning_under_the_journal(tmp_path: Path) -> None:
    """Lint warnings are filed at priority warning (<4>), the --strict verdict at err (<3>)."""
    path = tmp_path / "procpoll.toml"
    path.write_text(f'[ledger]\npath = "{tmp_path / "l.sqlite3"}"\n'
                    + SLOW_SINK.format(out=tmp_path / "a.jsonl"), encoding="utf-8")
    err = tmp_path / "stderr"
    with err.open("w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-m", "procpoll", "check", "--strict", "-c", str(path)],
                       env=env, stdout=subprocess.DEVNULL, stderr=stream, timeout=60, check=False)
    warning, verdict = err.read_text(encoding="utf-8").splitlines()
    assert warning.startswith(f"<4>warning: {path}: sinks[0]: sink 'slow'")
    assert verdict == "<3>procpoll: check --strict: 1 warning(s)"


def test_check_does_not_import_the_sdk(tmp_path: Path) -> None:
    """`check` validates and lints without loading tencentcloud (fast, works without it)."""
    path = tmp_path / "procpoll.toml"
    path.write_text('[[sinks]]\nname = "out"\ntype = "stdout"\n', encoding="utf-8")
    probe = ("import sys; from procpoll import cli;"
             " status = cli.main(['check', '-c', sys.argv[1]]);"
             " print(status, sorted(m for m in sys.modules if m.startswith('tencentcloud')))")
    result = subprocess.run([sys.executable, "-c", probe, str(path)], text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.stdout.splitlines()[-1] == "0 []"


# --- check: what goes where -------------------------------------------------------------------

def webhook_config(tmp_path: Path) -> Path:
    path = tmp_path / "procpoll.toml"
    path.write_text(f'[ledger]\npath = "{tmp_path / "l.sqlite3"}"\n[[sinks]]\nname = "w"\n'
                    'type = "webhook"\nurl = "https://h.example/x"\n'
                    'headers = { X-Tenant = "acme", Authorization = "Bearer tok-9f8e", '
                    'X-Api-Key = "k-77", Cookie = "sid=c-55", X-Signature-Seed = "s-33" }\n',
                    encoding="utf-8")
    return path


def test_check_prints_only_ok_on_stdout_and_the_summary_on_stderr(tmp_path: Path) -> None:
    """Scripts read stdout: it is exactly "ok"; the effective config goes to stderr."""
    result = procpoll("check", "-c", str(webhook_config(tmp_path)))
    assert (result.returncode, result.stdout) == (cli.EX_OK, "ok\n")
    assert json.loads(result.stderr)["sinks"][0]["name"] == "w"


def test_check_json_prints_the_effective_config_on_stdout(tmp_path: Path) -> None:
    """`check --json`: stdout is one JSON document, the effective config."""
    result = procpoll("check", "--json", "-c", str(webhook_config(tmp_path)))
    assert result.returncode == cli.EX_OK
    assert json.loads(result.stdout)["ledger"]["path"] == str(tmp_path / "l.sqlite3")


def test_check_summary_shows_plain_headers_and_masks_secret_like_ones(tmp_path: Path) -> None:
    """Header values are shown unless the name looks like a credential (auth, token,
    secret, key, signature, cookie, password, any case)."""
    result = procpoll("check", "--json", "-c", str(webhook_config(tmp_path)))
    headers = json.loads(result.stdout)["sinks"][0]["options"]["headers"]
    assert headers == {"X-Tenant": "acme", "Authorization": "***", "X-Api-Key": "***",
                       "Cookie": "***", "X-Signature-Seed": "***"}


def test_output_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    """`procpoll check --json … | head -1`: the reader is gone before procpoll writes; it
    ends quietly (exit 1, as Python does on EPIPE), nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "procpoll", "check", "--json", "-c",
             str(webhook_config(tmp_path))],
            env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            check=False)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (cli.EX_BROKEN_PIPE, "")


# --- help --------------------------------------------------------------------------------------

HELPED = [["run"], ["once"], ["check"], ["doctor"], ["demo"], ["emulate"], ["status"],
          ["ledger"], ["ledger", "show"], ["ledger", "stats"], ["deadletter"],
          ["deadletter", "list"], ["deadletter", "show"], ["deadletter", "replay"]]


@pytest.mark.parametrize("words", HELPED, ids=" ".join)
def test_every_sub_command_help_says_what_it_does(
        words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each `--help` starts with a description or usage of its own and exits 0."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([*words, "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: procpoll {' '.join(words)}")
    description = out.split("\n\n")[1]
    assert not description.startswith(("positional", "options")), out


# --- credentials -------------------------------------------------------------------------------

@pytest.mark.parametrize(("present", "missing"), [
    ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"),
    ("TENCENTCLOUD_SECRET_KEY", "TENCENTCLOUD_SECRET_ID")])
def test_half_a_credential_pair_in_the_environment_names_the_missing_half(
        tmp_path: Path, present: str, missing: str) -> None:
    """Only the ID (or only the key) in the environment: exit 78 saying which is not set,
    not "no credentials found"."""
    path = tmp_path / "procpoll.toml"
    path.write_text(f'[ledger]\npath = "{tmp_path / "l.sqlite3"}"\n[credentials]\n'
                    f'profile_file = "{tmp_path / "none"}"\n[[sinks]]\nname = "o"\n'
                    'type = "stdout"\n', encoding="utf-8")
    result = procpoll("once", "-c", str(path), env_extra={present: "AKIDhalf"})
    assert result.returncode == cli.EX_CONFIG
    assert f"{missing} is not set ({present} is)" in result.stderr


@pytest.mark.parametrize("which", ["secret_id_file", "secret_key_file"])
def test_a_missing_key_file_is_named(tmp_path: Path, which: str) -> None:
    """[credentials] files: the one that does not exist is named, with the one found."""
    from procpoll.config import CredentialsConfig  # noqa: PLC0415
    from procpoll.errors import ConfigError  # noqa: PLC0415
    from procpoll.vod import CredentialChain  # noqa: PLC0415

    files = {"secret_id_file": tmp_path / "id", "secret_key_file": tmp_path / "key"}
    other = next(p for name, p in files.items() if name != which)
    other.write_text("value\n", encoding="utf-8")
    chain = CredentialChain(CredentialsConfig(**files, profile_file=tmp_path / "none"), {})
    with pytest.raises(ConfigError) as info:
        chain.get()
    assert str(info.value) == (f"credential file missing: {files[which]} ({other} is there: "
                               "the secret id and the secret key go together)")
