"""The systemd units: the contract with the daemon, `systemd-analyze` verify and exposure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from procpoll import cli, daemon
from procpoll.config import Config, DaemonConfig, VodConfig
from procpoll.vod import CredentialChain

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("procpoll.service", "procpoll@.service")
MAX_EXPOSURE = 1.5
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze is not installed on this machine")

Directive = tuple[str, str, str]


def directives(name: str) -> list[Directive]:
    """(section, key, value) of every assignment, in order (keys may repeat)."""
    section, found = "", []
    for raw in (SYSTEMD_DIR / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def values(name: str, key: str, section: str = "Service") -> list[str]:
    """Every value assigned to `key` in `section`."""
    return [v for s, k, v in directives(name) if s == section and k == key]


def seconds(text: str) -> float:
    """A systemd time span such as 60s, 10min or 45 (seconds)."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h)?", text):
        total += float(number) * {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "": 1}[unit]
    return total


def runnable_copy(tmp_path: Path, name: str, *, instance: str | None = None,
                  dropins: tuple[Path, ...] = ()) -> Path:
    """The unit copied to tmp_path with ExecStart at this interpreter (verify checks it exists).

    Returns the path to pass to systemd-analyze: the unit itself, or for a template the
    instance name next to it (systemd loads the template for it).
    """
    text = (SYSTEMD_DIR / name).read_text(encoding="utf-8")
    text, replaced = re.subn(r"^ExecStart=/opt/procpoll/bin/procpoll ",
                             f"ExecStart={sys.executable} -m procpoll ", text, flags=re.MULTILINE)
    assert replaced == 1
    (tmp_path / name).write_text(text, encoding="utf-8")
    unit = name.replace("@.", f"@{instance}.") if instance else name
    if dropins:
        directory = tmp_path / f"{unit}.d"
        directory.mkdir()
        for dropin in dropins:
            shutil.copy(dropin, directory / dropin.name)
    return tmp_path / unit


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze with a deadline."""
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)


# --- the contract, read from the files -----------------------------------------------------


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_notify_with_sighup_reload(name: str) -> None:
    """The daemon says READY=1 itself and reloads on SIGHUP (systemd 252 has no notify-reload)."""
    assert values(name, "Type") == ["notify"]
    assert values(name, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values(name, "NotifyAccess") == ["main"]


def test_main_unit_runs_the_config_in_etc() -> None:
    """procpoll.service runs `procpoll run` on /etc/procpoll/procpoll.toml."""
    assert values("procpoll.service", "ExecStart") == [
        "/opt/procpoll/bin/procpoll run -c /etc/procpoll/procpoll.toml"]


def test_template_runs_one_config_file_per_instance() -> None:
    """procpoll@NAME.service reads NAME.toml and keeps its own ledger and credentials."""
    name = "procpoll@.service"
    assert values(name, "ExecStart") == ["/opt/procpoll/bin/procpoll run -c /etc/procpoll/%i.toml"]
    assert values(name, "StateDirectory") == ["procpoll-%i"]
    assert values(name, "User") == ["procpoll-%i"]
    assert all("%i" in v for v in values(name, "LoadCredential"))


@pytest.mark.parametrize("name", UNITS)
def test_bad_config_is_not_restarted(name: str) -> None:
    """Restart on failure, except EX_CONFIG (78), which a restart cannot fix."""
    assert values(name, "Restart") == ["on-failure"]
    assert values(name, "RestartPreventExitStatus") == [f"{cli.EX_NOINPUT} {cli.EX_CONFIG}"]


@pytest.mark.parametrize("name", UNITS)
def test_crash_loop_ends_in_failed(name: str) -> None:
    """Restarting every RestartSec, the burst fits in the interval: the unit ends 'failed'."""
    burst = int(values(name, "StartLimitBurst", "Unit")[0])
    interval = seconds(values(name, "StartLimitIntervalSec", "Unit")[0])
    restart = seconds(values(name, "RestartSec")[0])
    assert (burst - 1) * restart < interval


@pytest.mark.parametrize("name", UNITS)
def test_a_daemon_that_keeps_hanging_is_retried_not_failed(name: str) -> None:
    """Watchdog restarts (at most one per WatchdogSec + RestartSec) stay under the burst."""
    burst = int(values(name, "StartLimitBurst", "Unit")[0])
    interval = seconds(values(name, "StartLimitIntervalSec", "Unit")[0])
    cycle = seconds(values(name, "WatchdogSec")[0]) + seconds(values(name, "RestartSec")[0])
    assert (burst - 1) * cycle > interval


@pytest.mark.parametrize("name", UNITS)
def test_a_hung_api_call_is_restarted_within_two_minutes(name: str) -> None:
    """A call hung past procpoll's bound stops the pings; WatchdogSec later systemd restarts it."""
    hung_after_s = daemon.Daemon._api_call_limit_s(Config())
    assert hung_after_s + seconds(values(name, "WatchdogSec")[0]) <= 120


@pytest.mark.parametrize("name", UNITS)
def test_stop_timeout_covers_the_grace_period(name: str) -> None:
    """systemd waits longer than the daemon's shutdown grace plus one last API call."""
    needed = DaemonConfig().shutdown_grace_s + VodConfig().request_timeout_s
    assert seconds(values(name, "TimeoutStopSec")[0]) > needed


@pytest.mark.parametrize("name", UNITS)
def test_stop_signals_only_the_daemon(name: str) -> None:
    """SIGTERM reaches procpoll alone (KillMode=mixed): command sinks' children keep running
    through the shutdown grace instead of dying with it; SIGKILL comes after procpoll exits."""
    assert values(name, "KillMode") == ["mixed"]
    assert values(name, "KillSignal") in ([], ["SIGTERM"])
    assert values(name, "SendSIGKILL") in ([], ["yes"])


@pytest.mark.parametrize("name", UNITS)
def test_credentials_use_the_names_the_daemon_reads(name: str) -> None:
    """LoadCredential= ids are the file names CredentialChain looks for."""
    ids = {v.partition(":")[0] for v in values(name, "LoadCredential")}
    assert ids == {"secret-id", "secret-key"}
    assert ids <= set(CredentialChain.CREDENTIAL_NAMES)


@pytest.mark.parametrize("name", UNITS)
def test_runs_as_a_dynamic_user_with_state_and_config_dirs(name: str) -> None:
    """No fixed account: a transient user, /var/lib for the ledger, /etc/procpoll read-only."""
    assert values(name, "DynamicUser") == ["yes"]
    assert values(name, "ConfigurationDirectory") == ["procpoll"]
    assert len(values(name, "StateDirectory")) == 1
    assert values(name, "ProtectSystem") == ["strict"]


def test_template_has_the_same_sandbox_as_the_main_unit() -> None:
    """The two units' [Service] sections differ only where the instance name is needed."""
    per_instance = {"ExecStart", "User", "StateDirectory", "WorkingDirectory", "LoadCredential"}

    def sandbox(name: str) -> list[Directive]:
        return [d for d in directives(name) if d[0] == "Service" and d[1] not in per_instance]

    assert sandbox("procpoll@.service") == sandbox("procpoll.service")


# --- systemd-analyze -------------------------------------------------------------------------


@needs_analyze
@pytest.mark.parametrize(("name", "instance"), [("procpoll.service", None),
                                                ("procpoll@.service", "media")])
def test_verify_is_clean(tmp_path: Path, name: str, instance: str | None) -> None:
    """`systemd-analyze verify` accepts the unit without a single message."""
    result = analyze("verify", runnable_copy(tmp_path, name, instance=instance))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_verify_is_clean_with_the_encrypted_credentials_drop_in(tmp_path: Path) -> None:
    """The systemd-creds drop-in shipped in systemd/ parses cleanly on top of the unit."""
    unit = runnable_copy(tmp_path, "procpoll.service",
                         dropins=(SYSTEMD_DIR / "encrypted-credentials.conf",))
    result = analyze("verify", unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_verify_would_report_a_broken_unit(tmp_path: Path) -> None:
    """The 'clean' criterion above catches a directive systemd 252 does not know."""
    unit = runnable_copy(tmp_path, "procpoll.service")
    unit.write_text(unit.read_text(encoding="utf-8").replace("Type=notify", "Type=notify-reload"),
                    encoding="utf-8")
    result = analyze("verify", unit)
    assert "notify-reload" in result.stderr


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_exposure_is_at_most_1_5(tmp_path: Path, name: str) -> None:
    """`systemd-analyze security --offline=yes` rates the unit 1.5 or better."""
    path = tmp_path / name
    shutil.copy(SYSTEMD_DIR / name, path)
    result = analyze("security", "--offline=yes", path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE
