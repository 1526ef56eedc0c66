"""Bench plumbing: the child processes (emulator, webhook receiver, daemon) and /proc readings.

Every process under test runs apart from the others, so the CPU and RSS read from
/proc/<pid> for the daemon are the daemon's own, not the emulator's or the receiver's.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SECRET_ID = "AKIDbench"
SECRET_KEY = "bench-secret-key"
CREDENTIALS = {"TENCENTCLOUD_SECRET_ID": SECRET_ID, "TENCENTCLOUD_SECRET_KEY": SECRET_KEY}


class Child:
    """A child process; `ready` waits for a line of its stdout matching a pattern."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None,
                 stdout: IO[bytes] | None = None, cwd: Path = ROOT) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **(env or {})},
            stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.STDOUT)
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        if stdout is None:
            threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))

    def ready(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        """The first stdout line matching `pattern`; RuntimeError if none within the time."""
        deadline = time.monotonic() + timeout_s
        seen: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            if match := re.search(pattern, line):
                return match
        self.stop()
        raise RuntimeError(f"{self.argv[:4]} not ready: {''.join(seen)[-2000:]}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass(frozen=True)
class ProcReading:
    """One look at a process: CPU seconds used so far, RSS now and at its peak."""

    at: float
    cpu_s: float
    rss_mb: float
    hwm_mb: float


def read_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`, all threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) / CLOCK_TICKS, int(stat[12]) / CLOCK_TICKS


def read_proc(pid: int) -> ProcReading:
    """CPU (user + system, all threads) and memory of `pid` from /proc."""
    now = time.monotonic()
    cpu = sum(read_cpu(pid))
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return ProcReading(now, cpu, fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0))


def read_machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class EmulatorProc:
    """`procpoll emulate` in its own process, with the 100 req/s limit and API latency.

    By default through bench/emulator_host.py (Nagle off: replies take the latency asked
    for); `stock=True` runs `python -m procpoll emulate` as it is.
    """

    def __init__(self, *, rate: float, latency_ms: float, events: int = 0, seed: int = 1,
                 hold_s: float = 5.0, confirm_window_s: float = 30.0,
                 stock: bool = False, from_file: Path | None = None) -> None:
        entry = ([PY, "-m", "procpoll", "emulate"] if stock
                 else [PY, str(ROOT / "bench" / "emulator_host.py")])
        argv = [*entry, "--port", "0", "--rate", str(rate),
                "--latency-ms", str(latency_ms), "--hold", str(hold_s),
                "--confirm-window", str(confirm_window_s), "--events", str(events),
                "--seed", str(seed), "--secret-id", SECRET_ID, "--secret-key", SECRET_KEY]
        if from_file is not None:
            argv += ["--from", str(from_file)]
        self.child = Child(argv)
        self.endpoint = self.child.ready(r"listening on http://(\S+)", 120).group(1)
        host, port = self.endpoint.rsplit(":", 1)
        self._conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        self._conn.request(method, path, body=body,
                           headers={"Content-Type": "application/json"})
        reply = self._conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"emulator {method} {path}: {reply.status} {data[:200]!r}")
        return json.loads(data)

    def stats(self) -> dict[str, Any]:
        """The emulator's /_emulator/stats."""
        result: dict[str, Any] = self._request("GET", "/_emulator/stats")
        return result

    def enqueue_json(self, bodies_json: bytes) -> int:
        """Queue a JSON list of normal-callback bodies (already serialised)."""
        return int(self._request("POST", "/_emulator/events", bodies_json)["enqueued"])

    def stop(self) -> None:
        """Stop the emulator process."""
        self._conn.close()
        self.child.stop()


class ReceiverProc:
    """bench/webhook_receiver.py in its own process."""

    def __init__(self, latency_ms: float) -> None:
        self.child = Child([PY, str(ROOT / "bench" / "webhook_receiver.py"),
                            "--latency-ms", str(latency_ms)])
        self.url = self.child.ready(r"listening on (\S+)").group(1)

    def stats(self) -> dict[str, int]:
        """POSTs received and distinct webhook ids."""
        host_port = self.url.split("/")[2]
        host, port = host_port.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/stats")
            result: dict[str, int] = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return result

    def stop(self) -> None:
        """Stop the receiver process."""
        self.child.stop()


def toml_value(value: Any) -> str:
    """A Python scalar or list as TOML (enough for the bench's config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, document: dict[str, Any]) -> None:
    """Write a config: top-level tables, then [[sinks]]."""
    lines: list[str] = []
    for table, values in document.items():
        if table == "sinks":
            continue
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_value(v)}" for key, v in values.items()]
    for sink in document.get("sinks", []):
        lines.append("[[sinks]]")
        lines += [f"{key} = {toml_value(v)}" for key, v in sink.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class DaemonProc:
    """`procpoll run -c FILE` in its own process, its log in a file.

    A setting left None is not written, so the daemon runs with its own default (that of
    the source tree it runs from).
    """

    def __init__(self, workdir: Path, endpoint: str, webhook: str, *,
                 concurrency: int | None = None, pullers: int | None = None,
                 max_in_flight: int | None = None, log_level: str | None = None,
                 source: Path | None = None, extra: dict[str, dict[str, Any]] | None = None
                 ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "procpoll.toml"
        self.log_path = workdir / "procpoll.log"
        document: dict[str, Any] = {
            "vod": {"endpoint": endpoint, "scheme": "http", "request_timeout": 10},
            "ledger": {"path": str(workdir / "ledger.sqlite3")},
            # Only the settings a scenario overrides: the rest are the daemon's own defaults.
            "daemon": {k: v for k, v in (("concurrency", concurrency), ("pullers", pullers),
                                         ("max_in_flight", max_in_flight)) if v is not None},
            "log": {"level": log_level} if log_level is not None else {},
            "sinks": [{"name": "hook", "type": "webhook", "url": webhook, "timeout": 5,
                       "retries": 3}],
        }
        for table, values in (extra or {}).items():
            if table == "ledger" and values:
                document[table] = {}  # a url replaces the default path; both are an error
            document.setdefault(table, {}).update(values)
        write_config(self.config_path, document)
        env = dict(CREDENTIALS)
        env["PYTHONPATH"] = str(source or ROOT)
        self._log = self.log_path.open("wb")
        self.child = Child([PY, "-m", "procpoll", "run", "-c", str(self.config_path)],
                           env=env, stdout=self._log, cwd=workdir)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.child.pid

    def read(self) -> ProcReading:
        """CPU and memory now."""
        return read_proc(self.child.pid)

    def log_bytes(self) -> int:
        """Bytes of log written so far."""
        self._log.flush()
        return self.log_path.stat().st_size

    def stop(self) -> int | None:
        """SIGTERM and wait (graceful stop); returns the exit status."""
        status = self.child.stop()
        self._log.close()
        return status
