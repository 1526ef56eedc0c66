"""Test equipment for the reliability suite and bench/soak.py: the daemon as a subprocess,
a flaky webhook receiver, an audit of every confirm, a sd_notify listener, a TOML writer.

Nothing here imports pytest, so bench/soak.py can drive the same scenarios.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from procpoll.emulator import Emulator
from procpoll.events import event_key
from tests.conftest import serve_on_loopback

_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


def wait_until(condition: Callable[[], Any], timeout_s: float, step_s: float = 0.02) -> Any:
    """Poll `condition` until truthy or the deadline; return its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step_s)


# --- config --------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a TOML basic string for this text
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]],
                 sinks: Iterable[Mapping[str, Any]]) -> Path:
    """Write a procpoll TOML file: `sections` ([vod], [ledger]…) then [[sinks]]."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    for sink in sinks:
        lines.append("[[sinks]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in sink.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def emulator_sections(emu: Emulator, workdir: Path, **overrides: Mapping[str, Any]
                      ) -> dict[str, dict[str, Any]]:
    """[vod], [ledger] and [daemon] for a daemon against `emu`, state under `workdir`."""
    sections: dict[str, dict[str, Any]] = {
        "vod": {"endpoint": emu.endpoint, "scheme": "http", "request_timeout": 6,
                "confirm_window": 3.0},
        "ledger": {"path": str(workdir / "ledger.sqlite3")},
        "daemon": {"confirm_margin": 0.5, "shutdown_grace": 5},
        "log": {"level": "info"},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


# --- the daemon as a process ---------------------------------------------------------------


class DaemonProcess:
    """`python -m procpoll run -c FILE`, restartable; every run's stdout/stderr kept in files."""

    def __init__(self, config: Path, workdir: Path, env: Mapping[str, str]) -> None:
        self.config = config
        self.workdir = workdir
        base = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV}
        self.env = {**base, "HOME": str(workdir), "PYTHONUNBUFFERED": "1", **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.outputs: list[Path] = []

    def start(self) -> DaemonProcess:
        """Spawn a new run (the previous one must have exited)."""
        assert self.proc is None or self.proc.poll() is not None, "still running"
        self.runs += 1
        out = self.workdir / f"daemon-{self.runs}.out"
        err = self.workdir / f"daemon-{self.runs}.err"
        self.outputs += [out, err]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "procpoll", "run", "-c", str(self.config)],
                env=self.env, cwd=self.workdir, stdout=stdout, stderr=stderr)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, exactly a crash."""
        if self.alive():
            self.send(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.alive():
            self.send(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def rss_kib(self) -> int:
        """Resident set size now (0 once it exited)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def output(self) -> str:
        """Everything every run wrote, stdout and stderr."""
        return "".join(p.read_text(encoding="utf-8", errors="replace")
                       for p in self.outputs if p.exists())

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines of every run (non-JSON lines skipped)."""
        found = []
        for path in self.outputs:
            if path.suffix != ".out" or not path.exists():
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    found.append(record)
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log records whose `event` is `name`."""
        return [r for r in self.records() if r.get("event") == name]

    def stop(self) -> None:
        """Make sure nothing is left running (test teardown)."""
        if self.alive():
            self.kill()


# --- sinks seen from outside ---------------------------------------------------------------


class FlakyReceiver:
    """A webhook receiver that refuses `fail_rate` of POSTs (503) and records what it took.

    `accepted` holds (webhook-id, monotonic time) per 2xx answer, duplicates included.
    """

    def __init__(self, fail_rate: float = 0.0, seed: int = 0) -> None:
        self.fail_rate = fail_rate
        self.accepted: list[tuple[str, float]] = []
        self._counts: Counter[str] = Counter()
        self.refused = 0
        self.busy = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.busy += 1
                try:
                    self.rfile.read(int(self.headers.get("Content-Length", "0")))
                    key = self.headers.get("webhook-id", "")
                    with receiver._lock:
                        refuse = receiver._random.random() < receiver.fail_rate
                        if refuse:
                            receiver.refused += 1
                        else:
                            receiver.accepted.append((key, time.monotonic()))
                            receiver._counts[key] += 1
                    self.send_response(503 if refuse else 204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with receiver._lock:
                        receiver.busy -= 1

            def log_message(self, *_args: Any) -> None:
                return

        self.server = serve_on_loopback(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def counts(self) -> Counter[str]:
        """How many times each event key was accepted."""
        with self._lock:
            return Counter(self._counts)

    def has(self, key: str) -> bool:
        """Whether the event with this key was accepted at least once."""
        with self._lock:
            return self._counts[key] > 0

    def quiet(self) -> bool:
        """No request being handled right now."""
        with self._lock:
            return self.busy == 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FileSinkReader:
    """Reads a file sink's JSON lines as event keys, incrementally; a cut last line waits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._lock = threading.Lock()
        self.keys: Counter[str] = Counter()
        self.junk = 0

    def refresh(self) -> Counter[str]:
        """Read what was appended since the last call; returns all keys so far."""
        with self._lock:
            self._read_appended()
            return Counter(self.keys)

    def has(self, key: str) -> bool:
        """Whether the file holds the event with this key (reading what was appended)."""
        with self._lock:
            if not self.keys[key]:
                self._read_appended()
            return self.keys[key] > 0

    def _read_appended(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                self.keys[event_key(json.loads(line))] += 1
            except ValueError:
                self.junk += 1  # a line a crash cut short, then a fresh line was started
        self._offset += end


class LedgerReader:
    """Read-only questions to the daemon's ledger from the test process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def done(self, event_key_: str | None = None) -> set[tuple[str, str]]:
        """(event key, sink) pairs recorded delivered or dead (for one key, or all)."""
        with self._lock:
            if self._db is None:
                if not self.path.exists():
                    return set()
                self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            query = ("SELECT event_key, sink FROM deliveries WHERE "
                     "(delivered_at IS NOT NULL OR dead_at IS NOT NULL)")
            if event_key_ is None:
                rows = self._db.execute(query).fetchall()
            else:
                rows = self._db.execute(query + " AND event_key = ?", (event_key_,)).fetchall()
            return {(k, s) for k, s in rows}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


# --- the emulator seen from outside --------------------------------------------------------


SinkProbe = Callable[[str], bool]
"""Whether a sink has the event with this key."""


class ConfirmAudit:
    """At every ConfirmEvents the emulator honours, checks the event is already at each sink
    that wants it and recorded in the ledger; a miss is an early confirm.

    It wraps the emulator's queue (private, but ours): the checks run before the reply
    leaves, i.e. while the daemon still waits for the confirm to succeed.
    """

    def __init__(self, emu: Emulator, ledger: LedgerReader,
                 sinks: Mapping[str, tuple[Callable[[dict[str, Any]], bool], SinkProbe]]) -> None:
        self.ledger = ledger
        self.sinks = sinks
        self.confirmed: list[str] = []
        self.early: list[tuple[str, str, str]] = []  # (event key, sink, what was missing)
        queue = emu._queue  # the emulator exposes no per-handle confirm hook
        original = queue.confirm

        def confirm(handles: Iterable[str], sub_app_id: int | None = None, *,
                    strict: bool = False) -> Any:
            handles = list(handles)
            with queue._cond:  # same lock: no expiry between lookup and confirm
                app = queue._apps.get(sub_app_id)
                bodies = {h: app.in_flight[h].body for h in handles
                          if app is not None and h in app.in_flight}
                result = original(handles, sub_app_id, strict=strict)
            for handle in result.confirmed:
                self._check(bodies[handle])
            return result

        queue.confirm = confirm  # type: ignore[method-assign]

    def _check(self, body: dict[str, Any]) -> None:
        key = event_key(body)
        self.confirmed.append(key)
        recorded = {sink for _, sink in self.ledger.done(key)}
        for sink, (wants, has) in self.sinks.items():
            if not wants(body):
                continue
            if not has(key):
                self.early.append((key, sink, "not at the sink"))
            if sink not in recorded:
                self.early.append((key, sink, "not in the ledger"))


# --- systemd -------------------------------------------------------------------------------


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    def watchdog_times(self) -> list[float]:
        """When each WATCHDOG=1 arrived."""
        with self._lock:
            return [t for t, m in self.messages if "WATCHDOG=1" in m.splitlines()]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self._sock.close()
