"""Secrets: no secret id, key, session token or webhook secret in any output, at any level,
tracebacks included; not even a fragment of one."""

from __future__ import annotations

import base64
import io
import secrets
import signal
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from procpoll import logs
from procpoll.config import CredentialsConfig
from procpoll.emulator import Emulator, generate_events
from procpoll.vod import CredentialChain
from tests.conftest import wait_for
from tests.reliability.harness import DaemonProcess, FlakyReceiver, emulator_sections, write_config

FRAGMENT = 10  # no run of this many characters of a secret may appear anywhere


def random_text(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def fragments(secret: str) -> set[str]:
    return {secret[i:i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)}


def leaks(output: str, named: dict[str, str]) -> dict[str, list[str]]:
    """For each named secret, the fragments of it found in `output`."""
    found = {name: sorted(f for f in fragments(value) if f in output)
             for name, value in named.items()}
    return {name: hits for name, hits in found.items() if hits}


class Secrets:
    """Fresh credentials for one test: realistic lengths (an STS token is long)."""

    def __init__(self) -> None:
        self.secret_id = "AKID" + random_text(32)
        self.secret_key = random_text(32)
        self.token = random_text(420, string.ascii_letters + string.digits + "+/=_-")
        self.hmac_key = secrets.token_bytes(24)
        self.webhook_b64 = base64.b64encode(self.hmac_key).decode()
        self.webhook_secret = "whsec_" + self.webhook_b64
        self.bearer = random_text(40)

    def named(self) -> dict[str, str]:
        return {"secret_id": self.secret_id, "secret_key": self.secret_key,
                "session_token": self.token, "webhook_secret": self.webhook_secret,
                "webhook_secret_base64": self.webhook_b64,
                "webhook_key_hex": self.hmac_key.hex(),
                "webhook_key_repr": repr(self.hmac_key)[2:-1],
                "webhook_header_token": self.bearer}


@pytest.fixture
def creds() -> Secrets:
    return Secrets()


@pytest.fixture
def emu(creds: Secrets) -> Iterator[Emulator]:
    emulator = Emulator(secret_id=creds.secret_id, secret_key=creds.secret_key,
                        session_token=creds.token, confirm_window_s=3.0, hold_s=0.3,
                        seed=9).start()
    yield emulator
    emulator.stop()


def test_a_traceback_shows_no_part_of_a_long_secret_held_by_a_frame(creds: Secrets) -> None:
    """A logged exception whose frames hold the credentials (the Secrets, the environment)
    shows no fragment of them: a long token cut by repr truncation still counts."""
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    env = {"TENCENTCLOUD_SECRET_ID": creds.secret_id, "TENCENTCLOUD_SECRET_KEY":
           creds.secret_key, "TENCENTCLOUD_SESSION_TOKEN": creds.token}
    chain = CredentialChain(CredentialsConfig(), env)

    def sign_request(environ: dict[str, str]) -> None:
        held = chain.get()
        token = held.token
        assert token
        raise RuntimeError("signing failed")

    try:
        sign_request(env)
    except RuntimeError:
        structlog.get_logger("t").exception("pull.crashed")
    text = out.getvalue()
    assert "signing failed" in text
    assert leaks(text, creds.named()) == {}


def _check_output(config: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "procpoll", "check", "-c", str(config)],
                          env=env, capture_output=True, text=True, timeout=30, check=False)
    return done.stdout + done.stderr


@pytest.mark.timeout(90)
def test_no_secret_in_any_output_of_a_daemon_through_failures_and_tracebacks(
        tmp_path: Path, creds: Secrets, emu: Emulator) -> None:
    """Debug level, through deliveries, sink failures, a sink crash with traceback, a bad event,
    SIGHUP, a partition and auth failures, then SIGTERM; plus `procpoll check`: every byte
    written to stdout and stderr is free of any fragment of any secret."""
    receiver = FlakyReceiver(fail_rate=0.3, seed=2)
    config = write_config(tmp_path / "secrets.toml", emulator_sections(
        emu, tmp_path, log={"level": "debug"}, dead_letter={"directory": str(tmp_path / "dead")}),
        [{"name": "hook", "type": "webhook", "url": receiver.url, "secret": creds.webhook_secret,
          "headers": {"Authorization": f"Bearer {creds.bearer}"}, "retries": 1,
          "backoff": 0.05, "backoff_max": 0.1},
         # A host label past 63 characters makes the resolver's IDNA encoding raise at
         # each delivery (UnicodeError, not a network error): a real traceback.
         {"name": "crashy", "type": "webhook", "url": f"http://{'a' * 64}.invalid/hook",
          "events": ["FileDeleted"], "headers": {"X-Api-Token": creds.bearer}, "retries": 0,
          "max_attempts": 1}])
    env = {"TENCENTCLOUD_SECRET_ID": creds.secret_id, "TENCENTCLOUD_SECRET_KEY": creds.secret_key,
           "TENCENTCLOUD_SESSION_TOKEN": creds.token}
    daemon = DaemonProcess(config, tmp_path, env)
    try:
        daemon.start()
        emu.enqueue([*generate_events(30, seed=8),
                     {"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": ["1"]}},
                     {"EventType": "ProcedureStateChanged", "ProcedureStateChangeEvent": "x"}])
        assert emu.wait_drained(30), emu.stats()
        crashed = daemon.events("sink.crashed")
        assert crashed and crashed[0].get("exception"), "no traceback was exercised"
        daemon.send(signal.SIGHUP)
        assert wait_for(lambda: daemon.events("config.reloaded"), 10)
        emu.set_partition(True)
        assert wait_for(lambda: [r for r in daemon.events("api.pull_failed")
                                 if r.get("code") == "ClientNetworkError"], 20)
        emu.set_partition(False)
        emu.set_credentials(creds.secret_id, random_text(32), creds.token)
        assert wait_for(lambda: daemon.events("api.auth_failed"), 20)
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
        receiver.close()
    output = daemon.output() + _check_output(config, daemon.env)
    for path in (tmp_path / "dead").glob("*.json"):
        output += path.read_text(encoding="utf-8")
    assert "sink.failed" in output
    assert leaks(output, creds.named()) == {}
