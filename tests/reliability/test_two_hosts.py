"""Two hosts, one PostgreSQL ledger: consumers in separate network namespaces share a queue.

Each "host" is a network namespace joined to this one by a veth pair; its procpoll reaches
the emulator, the webhook receiver and PostgreSQL over that link (PostgreSQL through a
small TCP relay, since the server listens on loopback). Taking a host's link down is a host
dying: its claims expire and the other host delivers what it left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from procpoll.emulator import Emulator, generate_events
from tests.conftest import wait_for
from tests.pg import fresh_schema_url

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"pp-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class Host:
    """A network namespace with a veth link to this one: `.addr` is this side's address."""

    def __init__(self, index: int) -> None:
        tag = secrets.token_hex(2)
        self.name = f"pp-host{index}-{tag}"
        self.outer = f"pp{index}o{tag}"
        self.inner = f"pp{index}i{tag}"
        self.subnet = f"10.231.{index + 10}"
        self.addr = f"{self.subnet}.1"
        for argv in (["ip", "netns", "add", self.name],
                     ["ip", "link", "add", self.outer, "type", "veth", "peer", "name",
                      self.inner],
                     ["ip", "link", "set", self.inner, "netns", self.name],
                     ["ip", "addr", "add", f"{self.addr}/30", "dev", self.outer],
                     ["ip", "link", "set", self.outer, "up"],
                     self.exec_argv("ip", "addr", "add", f"{self.subnet}.2/30", "dev", self.inner),
                     self.exec_argv("ip", "link", "set", self.inner, "up"),
                     self.exec_argv("ip", "link", "set", "lo", "up")):
            subprocess.run(argv, check=True, capture_output=True)

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """The host drops off the network."""
        subprocess.run(self.exec_argv("ip", "link", "set", self.inner, "down"), check=True)

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, check=False)


class Relay:
    """TCP relay from 0.0.0.0:port to PostgreSQL on loopback."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("0.0.0.0", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            # Like the network: data a dead host never acknowledges fails the connection
            # (after 5 s) instead of filling buffers and stalling the server's side.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        # Either side gone: close both, as a broken TCP connection would.
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


class Receiver:
    """Webhook receiver on every address; one body in 8 answers after `slow_s`."""

    def __init__(self, slow_s: float) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if int(self.headers["webhook-id"][:2], 16) % 8 == 0:
                    time.sleep(slow_s)  # a slow receiver, on purpose
                with receiver.lock:
                    receiver.ids.append(self.headers["webhook-id"])
                self.send_response(200 if body else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    reason = _netns_unavailable()
    if reason is not None:
        if os.environ.get("PROCPOLL_REQUIRE_NETNS") == "1":
            pytest.fail(f"PROCPOLL_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)
    made = [Host(1), Host(2)]
    try:
        yield made
    finally:
        for host in made:
            host.remove()


def _config(path: Path, host: Host, emulator: Emulator, relay: Relay, receiver: Receiver,
            ledger_url: str) -> Path:
    schema_query = ledger_url.split("?", 1)[1]
    path.write_text(
        f'[vod]\nendpoint = "{host.addr}:{emulator.endpoint.rsplit(":", 1)[1]}"\n'
        f'scheme = "http"\nconfirm_window = 2\nrequest_timeout = 6\n'
        f'[ledger]\nurl = "postgresql://postgres@{host.addr}:{relay.port}/test?{schema_query}"\n'
        f'[daemon]\nconfirm_margin = 0.3\nshutdown_grace = 5\n'
        f'[[sinks]]\nname = "hook"\ntype = "webhook"\n'
        f'url = "http://{host.addr}:{receiver.port}/"\ntimeout = 5\nretries = 0\n',
        encoding="utf-8")
    return path


@pytest.mark.timeout(180)
def test_two_hosts_share_a_queue_without_duplicates_and_survive_one_dying(
        hosts: list[Host], tmp_path: Path) -> None:
    """300 events, a confirm window (2 s) shorter than one delivery in 8 (3 s), two hosts
    on one PostgreSQL ledger: every event is delivered and confirmed, none twice. Then one
    host drops off the network mid-run: 0 events lost; duplicates only from the claims the
    dead host held (reported)."""
    emulator = Emulator(host="0.0.0.0", confirm_window_s=2.0, hold_s=0.5, seed=11).start()
    relay = Relay(("127.0.0.1", 5432))
    receiver = Receiver(slow_s=3.0)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    try:
        with fresh_schema_url() as ledger_url:
            env = {**os.environ, "TENCENTCLOUD_SECRET_ID": emulator.secret_id,
                   "TENCENTCLOUD_SECRET_KEY": emulator.secret_key, "PYTHONPATH": str(REPO)}
            for host in hosts:
                config = _config(tmp_path / f"{host.name}.toml", host, emulator, relay,
                                 receiver, ledger_url)
                log = (tmp_path / f"{host.name}.log").open("wb")
                logs.append(log)
                procs.append(subprocess.Popen(
                    host.exec_argv(sys.executable, "-m", "procpoll", "run", "-c", str(config)),
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
            bodies = generate_events(300, seed=11)
            emulator.enqueue(bodies)
            assert emulator.wait_drained(120), "the queue did not drain"
            first = _report(receiver, "both hosts")
            assert first["duplicates"] == 0
            assert first["distinct"] == 300

            # Host 2 dies mid-run: 200 more events.
            emulator.enqueue(generate_events(200, seed=12))
            assert wait_for(lambda: len(receiver.ids) > first["received"] + 20, 30)
            hosts[1].cut()
            assert emulator.wait_drained(120), "events were lost when a host died"
            second = _report(receiver, "host 2 cut mid-run")
            assert second["distinct"] == 500
            assert procs[0].poll() is None, "host 1 died too"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for log in logs:
            log.close()
        receiver.close()
        relay.close()
        emulator.stop()


def _report(receiver: Receiver, label: str) -> dict[str, int]:
    with receiver.lock:
        ids = list(receiver.ids)
    figures = {"received": len(ids), "distinct": len(set(ids)),
               "duplicates": len(ids) - len(set(ids))}
    print(f"\n{label}: {json.dumps(figures)}")
    return figures
