"""procpoll.service under a real systemd 252: readiness, watchdog, outage, reload, stop, bad
config, two processes.

One systemd is booted for the module (tests/service/live_systemd.py), procpoll is installed in it
with /usr/bin/python3 exactly as the README says, the VOD emulator runs there as a transient unit,
and the unit file from systemd/ runs unchanged but for a drop-in with a short watchdog. Skipped
when this machine cannot boot it, unless PROCPOLL_REQUIRE_LIVE_SYSTEMD=1 (CI), which fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from procpoll import cli
from procpoll.emulator import generate_events
from tests.service.live_systemd import LiveSystemd, LiveSystemdError, unavailable_reason, wait_until

REQUIRE_ENV = "PROCPOLL_REQUIRE_LIVE_SYSTEMD"
REPO = Path(__file__).resolve().parents[2]
UNIT = "procpoll.service"
VENV = "/opt/procpoll"
SOURCE = "/opt/procpoll-src"
# DynamicUser= keeps the state directory here; /var/lib/procpoll is a symlink to it.
STATE_DIR = "/var/lib/private/procpoll"
SECRET_ID, SECRET_KEY = "AKIDlivesystemd", "live-systemd-secret-key"
WATCHDOG_S = 3.0
OUTAGE_S = 15.0
SINK_SLEEP_S = 3
START_S = 30.0

# Boot, install (pip from PyPI) and every check share the first test's time budget.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEST_DROP_IN = f"""\
[Service]
# Short enough that a wedged daemon is caught within a test.
WatchdogSec={WATCHDOG_S:g}s
# The checks that a restart does NOT happen then need to watch only a few seconds.
RestartSec=1s
"""

CONFIG = f"""\
[vod]
endpoint = "127.0.0.1:{{port}}"
scheme = "http"
{{extra}}
[[sinks]]
name = "slow"
type = "command"
# Markers in the working directory (the state directory) show when the delivery ran.
argv = ["sh", "-c", "touch delivering; sleep {SINK_SLEEP_S}; cat >/dev/null; touch delivered"]
timeout = 15
retries = 0
"""
# vod.request_timeout must exceed PullEvents' hold: procpoll exits 78 (EX_CONFIG) on it.
BAD_SETTING = "request_timeout = 3"


@dataclass
class Deployment:
    """procpoll.service and the emulator inside one booted systemd."""

    box: LiveSystemd
    emulator_port: int

    def status(self) -> dict[str, str]:
        """The unit's state, main process, restart count and last result."""
        return self.box.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts",
                             "Result", "ExecMainStatus")

    def ensure_running(self) -> dict[str, str]:
        """Start the unit if an earlier check left it stopped or failed; its status once active."""
        if self.status()["ActiveState"] != "active":
            self.box.run("systemctl", "reset-failed", UNIT, check=False)
            self.box.run("systemctl", "start", UNIT, check=False, timeout_s=START_S)
        assert wait_until(lambda: self.status()["ActiveState"] == "active", START_S), \
            self.journal()
        return self.status()

    @staticmethod
    def now() -> float:
        """A point in the journal's time (the clock is the host's), to read what follows it."""
        return time.time()

    def journal(self, since: float | None = None, priority: str | None = None) -> str:
        """procpoll.service's journal (systemd's lines about it included), message text only."""
        args = ["journalctl", "-u", UNIT, "-o", "cat", "--no-pager"]
        # Not --after-cursor: combined with -u/-p, journalctl 252 drops the first match after it.
        args += [f"--since=@{since:.6f}"] if since is not None else []
        args += ["-p", priority] if priority else []
        return self.box.run(*args).stdout

    def logged(self, event: str, since: float | None = None) -> bool:
        """Whether procpoll wrote a JSON log line with this `event` to the journal."""
        for line in self.journal(since).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    return True
        return False

    def configure(self, extra_vod: str = "") -> None:
        """Write /etc/procpoll/procpoll.toml pointing at the emulator."""
        text = CONFIG.format(port=self.emulator_port, extra=extra_vod)
        self.box.write("/etc/procpoll/procpoll.toml", text)

    def emulator(self, path: str, body: object = None) -> Any:
        """Call the emulator's control API from the host (the network is shared)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.emulator_port}{path}",
                                         data=data, method="GET" if data is None else "POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.load(reply)

    def state_file(self, name: str) -> Path:
        """A file in the service's state directory, seen from the host."""
        return self.box.path(f"{STATE_DIR}/{name}")


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"live systemd required ({REQUIRE_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"live systemd: {reason}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A booted systemd with procpoll installed, the emulator running and the unit in place."""
    reason = unavailable_reason()
    if reason is not None:
        _unavailable(reason)
    box = LiveSystemd(tmp_path_factory.mktemp("live-systemd"))
    try:
        try:
            box.boot()
        except LiveSystemdError as exc:
            _unavailable(f"systemd did not boot: {exc}")
        _install(box)
        deployment = Deployment(box, _start_emulator(box))
        _install_unit(deployment)
        yield deployment
    finally:
        box.down()


def _install(box: LiveSystemd) -> None:
    # The README's install: a venv of the system Python (a Python under /root, such as
    # pyenv's, is invisible to DynamicUser= and the unit would fail with 203/EXEC).
    shutil.copytree(REPO, box.path(SOURCE), ignore=shutil.ignore_patterns(
        ".*", "*.egg-info", "__pycache__", "build", "tests", "bench", "deploy"))
    box.run("/usr/bin/python3", "-m", "venv", VENV)
    box.run(f"{VENV}/bin/pip", "install", "--quiet", SOURCE, timeout_s=240)


def _start_emulator(box: LiveSystemd) -> int:
    # A transient unit, so it lives inside the container's cgroup and dies with it.
    box.run("systemd-run", "--unit=vod-emulator", f"{VENV}/bin/procpoll", "emulate",
            "--port", "0", "--hold", "1", "--secret-id", SECRET_ID, "--secret-key", SECRET_KEY)
    found: list[str] = []

    def announced() -> bool:
        log = box.run("journalctl", "-u", "vod-emulator", "-o", "cat").stdout
        found.extend(re.findall(r"listening on http://127\.0\.0\.1:(\d+)", log))
        return bool(found)

    assert wait_until(announced, START_S), "the emulator never said where it listens"
    return int(found[0])


def _install_unit(deployment: Deployment) -> None:
    box = deployment.box
    box.write(f"/etc/systemd/system/{UNIT}", (REPO / "systemd" / UNIT).read_text(encoding="utf-8"))
    box.write(f"/etc/systemd/system/{UNIT}.d/test-watchdog.conf", TEST_DROP_IN)
    deployment.configure()
    box.write("/etc/procpoll/secret-id", SECRET_ID + "\n", mode=0o600)
    box.write("/etc/procpoll/secret-key", SECRET_KEY + "\n", mode=0o600)
    box.run("systemctl", "daemon-reload")


@contextlib.contextmanager
def bad_config(deployment: Deployment) -> Iterator[None]:
    """An invalid config in place, the unit stopped and its failure state cleared."""
    deployment.box.run("systemctl", "stop", UNIT, timeout_s=START_S)
    deployment.box.run("systemctl", "reset-failed", UNIT, check=False)
    deployment.configure(BAD_SETTING)
    try:
        yield
    finally:
        deployment.configure()


# --- the checks (the outage late: requests it held could swallow a later event) ---------


def test_start_reaches_active_through_ready(deployed: Deployment) -> None:
    """`systemctl start` returns once procpoll sent READY=1 (Type=notify): the unit is active."""
    started = deployed.box.run("systemctl", "start", UNIT, check=False, timeout_s=START_S)
    assert started.returncode == 0, deployed.journal()
    assert deployed.box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == \
        "active", deployed.journal()
    assert wait_until(lambda: deployed.logged("daemon.started"), START_S), deployed.journal()


def test_watchdog_restarts_a_frozen_daemon(deployed: Deployment) -> None:
    """A SIGSTOPped main process misses WatchdogSec: systemd aborts it and starts a new one."""
    before = deployed.ensure_running()
    since = deployed.now()
    deployed.box.run("kill", "-STOP", before["MainPID"])

    def restarted() -> bool:
        now = deployed.status()
        return (int(now["NRestarts"]) > int(before["NRestarts"])
                and now["MainPID"] not in ("0", before["MainPID"])
                and now["ActiveState"] == "active")

    assert wait_until(restarted, WATCHDOG_S + START_S), deployed.journal(since)
    assert wait_until(lambda: "Watchdog timeout" in deployed.journal(since), START_S)


def test_reload_rereads_the_config_in_place(deployed: Deployment) -> None:
    """`systemctl reload` (SIGHUP): config.reloaded is logged, same process, still active."""
    before = deployed.ensure_running()
    since = deployed.now()
    deployed.box.run("systemctl", "reload", UNIT, timeout_s=START_S)
    assert wait_until(lambda: deployed.logged("config.reloaded", since),
                      START_S), deployed.journal(since)
    assert wait_until(lambda: deployed.status()["ActiveState"] == "active", START_S)
    assert deployed.status()["MainPID"] == before["MainPID"]


def test_stop_lets_a_running_delivery_finish_and_confirms_it(deployed: Deployment) -> None:
    """`systemctl stop` mid-delivery: the command sink's child is not killed (KillMode=mixed),
    the delivery completes, the event is confirmed and the unit stops with exit 0."""
    deployed.ensure_running()
    for marker in ("delivering", "delivered"):
        deployed.state_file(marker).unlink(missing_ok=True)
    confirmed_before = deployed.emulator("/_emulator/stats")["confirmed"]
    since = deployed.now()
    deployed.emulator("/_emulator/events", generate_events(1, seed=20))
    assert wait_until(deployed.state_file("delivering").exists, START_S), deployed.journal(since)

    deployed.box.run("systemctl", "stop", UNIT, timeout_s=START_S)

    status = deployed.status()
    assert (status["Result"], status["ExecMainStatus"]) == ("success", "0"), \
        deployed.journal(since)
    assert deployed.state_file("delivered").exists(), deployed.journal(since)
    assert deployed.emulator("/_emulator/stats")["confirmed"] == confirmed_before + 1


def test_encrypted_credentials_drop_in_and_its_check(deployed: Deployment) -> None:
    """With systemd/encrypted-credentials.conf the unit starts on .cred files only, and the
    README's check (busctl; `systemctl show` prints [unprintable] on 252) shows exactly that."""
    box = deployed.box
    dropin = f"/etc/systemd/system/{UNIT}.d/encrypted-credentials.conf"
    box.run("systemd-creds", "setup")
    for name, secret in (("secret-id", SECRET_ID), ("secret-key", SECRET_KEY)):
        box.run("systemd-creds", "encrypt", f"--name={name}", "-", f"/etc/procpoll/{name}.cred",
                input_text=secret + "\n")
    box.write(dropin, (REPO / "systemd" / "encrypted-credentials.conf").read_text(
        encoding="utf-8"))
    try:
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", UNIT, timeout_s=START_S)
        assert deployed.status()["ActiveState"] == "active", deployed.journal()
        shown = box.run("busctl", "get-property", "org.freedesktop.systemd1",
                        "/org/freedesktop/systemd1/unit/procpoll_2eservice",
                        "org.freedesktop.systemd1.Service", "LoadCredential",
                        "LoadCredentialEncrypted").stdout.splitlines()
        assert shown[0] == "a(ss) 0"
        assert shown[1].startswith("a(ss) 2 ")
        assert {"/etc/procpoll/secret-id.cred", "/etc/procpoll/secret-key.cred"} == \
            set(re.findall(r'"(/[^"]+)"', shown[1]))
    finally:
        box.path(dropin).unlink()
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", UNIT, check=False, timeout_s=START_S)


def test_api_outage_does_not_trip_the_watchdog(deployed: Deployment) -> None:
    """VOD unreachable for 15 s (5 watchdog periods): the daemon keeps running, no restart."""
    before = deployed.ensure_running()
    since = deployed.now()
    deployed.emulator("/_emulator/settings", {"partition": True})
    try:
        changed = wait_until(
            lambda: deployed.status()["MainPID"] != before["MainPID"], OUTAGE_S)
    finally:
        deployed.emulator("/_emulator/settings", {"partition": False})
        # Requests held by the partition, from calls that timed out long ago, are released
        # now; none may be left to swallow a later check's event.
        assert wait_until(
            lambda: deployed.emulator("/_emulator/stats")["held"]["partitioned"] == 0, START_S)
    after = deployed.status()
    assert not changed, deployed.journal(since)
    assert (after["NRestarts"], after["MainPID"], after["ActiveState"]) == \
        (before["NRestarts"], before["MainPID"], "active"), deployed.journal(since)


def test_bad_config_fails_with_78_and_is_not_restarted(deployed: Deployment) -> None:
    """An invalid config exits EX_CONFIG (78); RestartPreventExitStatus keeps it failed."""
    with bad_config(deployed):
        started = deployed.box.run("systemctl", "start", UNIT, check=False, timeout_s=START_S)
        assert started.returncode != 0
        failed = deployed.status()
        assert (failed["ActiveState"], failed["ExecMainStatus"]) == ("failed", str(cli.EX_CONFIG))
        # RestartSec is 1 s here: five times that without a new start means none is coming.
        assert not wait_until(lambda: deployed.status() != failed, 5.0), deployed.status()


def test_bad_config_reason_is_an_error_in_the_journal(deployed: Deployment) -> None:
    """`journalctl -u procpoll -p err` names the bad setting: the fatal line is priority err."""
    with bad_config(deployed):
        since = deployed.now()
        deployed.box.run("systemctl", "start", UNIT, check=False, timeout_s=START_S)
        # The service's stderr reaches the journal through its own stream, after systemd's
        # lines about the failure may have: wait for it.
        assert wait_until(
            lambda: "vod.request_timeout" in deployed.journal(since, priority="err"), START_S
        ), deployed.journal(since)


def test_two_processes_under_the_hardened_unit(deployed: Deployment) -> None:
    """`[daemon] processes = 2` under the unit as shipped (DynamicUser, ProtectProc=invisible,
    the syscall filter): READY=1 once both workers are up, each on a CPU of its own, events
    delivered and confirmed, each worker paced to half the call rate, and `systemctl stop`
    ends everything with 0."""
    box = deployed.box
    box.run("systemctl", "stop", UNIT, check=False, timeout_s=START_S)
    box.run("systemctl", "reset-failed", UNIT, check=False)
    deployed.configure('[daemon]\nprocesses = 2\n')
    try:
        since = deployed.now()
        started = box.run("systemctl", "start", UNIT, check=False, timeout_s=START_S)
        assert started.returncode == 0, deployed.journal(since)

        def records(event: str) -> list[dict[str, Any]]:
            found = []
            for line in deployed.journal(since).splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("event") == event:
                        found.append(record)
            return found

        assert wait_until(lambda: len(records("daemon.started")) == 2, START_S), \
            deployed.journal(since)
        assert {r["requests_per_s"] for r in records("daemon.started")} == {47.5}
        if len(os.sched_getaffinity(0)) >= 2:
            # The syscall filter lets each worker keep to a CPU of its own ([daemon] pin_cpu).
            cpus = [r["cpu"] for r in records("daemon.started")]
            assert all(isinstance(c, int) for c in cpus) and len(set(cpus)) == 2, cpus
        confirmed_before = deployed.emulator("/_emulator/stats")["confirmed"]
        deployed.emulator("/_emulator/events", generate_events(6, seed=31))
        assert wait_until(
            lambda: deployed.emulator("/_emulator/stats")["confirmed"] >= confirmed_before + 6,
            START_S), deployed.journal(since)
        box.run("systemctl", "stop", UNIT, timeout_s=START_S)
        status = deployed.status()
        assert (status["Result"], status["ExecMainStatus"]) == ("success", "0"), \
            deployed.journal(since)
        assert len(records("daemon.stopped")) == 2, deployed.journal(since)
    finally:
        deployed.configure()
        box.run("systemctl", "reset-failed", UNIT, check=False)
