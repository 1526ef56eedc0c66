"""`[daemon] processes = N`: one supervisor process and N consumer processes sharing the ledger.

Each worker is a plain `procpoll run -c FILE` with PROCPOLL_WORKER set. The supervisor
is the service systemd sees: it listens on its own sd_notify socket (the sender of each
datagram is known from SCM_CREDENTIALS), tells systemd READY=1 once every worker is
ready, feeds systemd's watchdog only while every worker feeds its own, kills a worker
that went silent, restarts a worker that exited with backoff, passes SIGHUP on, stops
every worker at SIGTERM, and serves the one /metrics of the service.

Signal handlers only set plain attributes; the signal's byte on the wakeup socket
(signal.set_wakeup_fd) ends the main loop's wait, as in the daemon.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from procpoll.cli import EX_OK, METRICS_LISTEN_ENV, WORKER_ENV
from procpoll.config import Config
from procpoll.listen import split_listen
from procpoll.metrics_merge import merge_expositions
from procpoll.systemd import Notifier, watchdog_interval_s
from procpoll.work import backoff_s

log = structlog.get_logger("procpoll.supervisor")

"""Where a worker serves its own /metrics (the daemon reads it); workers pick a free port."""
WORKER_METRICS_LISTEN = "127.0.0.1:0"
DEFAULT_WATCHDOG_USEC = 60_000_000
# A worker's watchdog window starts once it is ready: before, it imports, opens the ledger
# and prunes it, which on a loaded machine can take longer than a short WatchdogSec.
STARTUP_GRACE_S = 60.0
ABORT_TO_KILL_S = 5.0  # SIGABRT lets faulthandler or a core show where it hung; then SIGKILL
RESTART_BACKOFF_BASE_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
HEALTHY_RUN_S = 60.0  # a worker that ran this long starts its restart backoff afresh
STOP_MARGIN_S = 10.0  # beyond a worker's shutdown_grace before it is killed at stop
STATUS_EVERY_S = 5.0
TICK_S = 0.25
SCRAPE_TIMEOUT_S = 5.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Environment systemd gives the service itself, never meant for the workers.
_SERVICE_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID",
                     "LISTEN_FDS", "LISTEN_FDNAMES")
# One part of the daemon's status line: "pulled 12", "oldest 0.4 s".
_STATUS_PART = re.compile(r"^(?P<label>[a-z ]+?) (?P<value>\d+(?:\.\d+)?)(?P<unit> s)?$")
_MAX_STATUS_PARTS = frozenset({"oldest"})


@dataclass(slots=True)
class _Worker:
    """One consumer process slot: the process running in it now and what it last said."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    last_ping: float = 0.0
    ready: bool = False
    status: str = ""
    metrics_port: int | None = None
    failures: int = 0  # exits in a row, each after less than HEALTHY_RUN_S
    restart_at: float | None = 0.0  # when to start the next process; None while one runs
    abort_sent_at: float | None = None
    kill_sent: bool = False
    was_ready: bool = False  # sent READY=1 since it started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """`procpoll run` with `[daemon] processes` above 1."""

    def __init__(self, config: Config, config_path: Path, *,
                 environ: Mapping[str, str] | None = None, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.config_path = config_path
        self._environ = dict(os.environ if environ is None else environ)
        self._notifier = notifier or Notifier.from_env(self._environ)
        self._clock = clock
        usec = self._environ.get("WATCHDOG_USEC", "")
        self._worker_watchdog_usec = int(usec) if usec.isdigit() and int(usec) else \
            DEFAULT_WATCHDOG_USEC
        self.workers = [_Worker(n) for n in range(1, config.daemon.processes + 1)]
        # Set by signal handlers: plain attributes, no lock (see the module doc).
        self._signals = 0
        self._last_signal = signal.SIGTERM.value
        self._reload_requested = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._killed_at_stop = False
        self._announced_ready = False
        self._reload_pending: set[int] | None = None
        self._status_sent = ""
        self._next_status = 0.0
        # Opened here, closed when run() ends: a private directory for the notify socket.
        self._notify_dir = tempfile.mkdtemp(prefix="procpoll-supervisor-")
        self._notify_path = str(Path(self._notify_dir) / "notify")
        self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Each datagram then carries its sender's pid: which worker said READY=1.
        self._notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify_sock.bind(self._notify_path)
        self._notify_sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._metrics_server: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None

    @property
    def worker_watchdog_s(self) -> float:
        """How long a worker may go without WATCHDOG=1 before it is killed."""
        return self._worker_watchdog_usec / 1_000_000

    # --- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM/SIGINT; returns the exit status."""
        self._open()
        try:
            log.info("supervisor.started", pid=os.getpid(), processes=len(self.workers),
                     worker_watchdog_s=self.worker_watchdog_s, metrics_port=self.metrics_port)
            return self._main_loop()
        finally:
            self._close()

    def _open(self) -> None:
        self._install_signals()
        if self.config.metrics.listen:
            self._serve_metrics(self.config.metrics.listen)

    def _close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        for sock in (self._notify_sock, self._wake_r, self._wake_w):
            sock.close()
        shutil.rmtree(self._notify_dir, ignore_errors=True)

    def _main_loop(self) -> int:
        systemd_interval_s = watchdog_interval_s(self._environ)
        next_feed = self._clock()
        while True:
            self._wait(TICK_S)
            self._read_notifications()
            now = self._clock()
            if self._signals > 1:
                return self._kill_all()
            if self._signals == 1 and not self._stopping:
                self._begin_stop(now)
            self._reap(now)
            if self._stopping:
                if not any(w.alive() for w in self.workers):
                    log.info("supervisor.stopped")
                    return EX_OK
                self._enforce_stop_deadline(now)
                continue
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self._start_due(now)
            self._watch_workers(now)
            self._report(now)
            if systemd_interval_s is not None and now >= next_feed and self._healthy(now):
                self._notifier.watchdog()
                next_feed = now + systemd_interval_s

    def _wait(self, timeout_s: float) -> None:
        """Sleep until a datagram, a signal or the timeout; then empty the wakeup socket."""
        select.select([self._wake_r, self._notify_sock], [], [], timeout_s)
        with contextlib.suppress(OSError):  # BlockingIOError: nothing more to read
            while self._wake_r.recv(256):
                pass

    # --- workers -------------------------------------------------------------------------

    def _start_due(self, now: float) -> None:
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker, now)

    def _start(self, worker: _Worker, now: float) -> None:
        env = {k: v for k, v in self._environ.items() if k not in _SERVICE_ONLY_ENV}
        env.update({WORKER_ENV: str(worker.number), "NOTIFY_SOCKET": self._notify_path,
                    "WATCHDOG_USEC": str(self._worker_watchdog_usec)})
        if self.config.metrics.listen:
            env[METRICS_LISTEN_ENV] = WORKER_METRICS_LISTEN
        argv = [sys.executable, "-m", "procpoll", "run", "-c", str(self.config_path)]
        try:
            # Inherited stdout and stderr: the workers' lines are JSON already.
            worker.proc = subprocess.Popen(argv, env=env)
        except OSError as exc:
            worker.failures += 1
            wait_s = backoff_s(worker.failures, RESTART_BACKOFF_BASE_S, RESTART_BACKOFF_MAX_S)
            worker.restart_at = now + wait_s
            log.error("supervisor.worker_start_failed", worker=worker.number, error=str(exc),
                      retry_in_s=round(wait_s, 2))
            return
        worker.started_at = worker.last_ping = now
        worker.ready = False
        worker.status = ""
        worker.metrics_port = None
        worker.restart_at = None
        worker.abort_sent_at = None
        worker.kill_sent = False
        worker.was_ready = False
        log.info("supervisor.worker_started", worker=worker.number, pid=worker.proc.pid)

    def _reap(self, now: float) -> None:
        for worker in self.workers:
            if worker.proc is None or worker.proc.returncode is not None:
                continue  # never started, or its exit is already handled
            status = worker.proc.poll()
            if status is None:
                continue
            if self._reload_pending is not None:
                self._reload_pending.discard(worker.number)
            worker.ready = False
            worker.metrics_port = None
            fields: dict[str, Any] = {"worker": worker.number, "pid": worker.proc.pid,
                                      "status": status, "ran_s": round(now - worker.started_at, 1)}
            if status < 0:
                fields["signal"] = signal.Signals(-status).name
            if self._stopping:
                log.info("supervisor.worker_exited", **fields)
                continue
            if now - worker.started_at > HEALTHY_RUN_S:
                worker.failures = 0
            worker.failures += 1
            wait_s = backoff_s(worker.failures, RESTART_BACKOFF_BASE_S, RESTART_BACKOFF_MAX_S)
            worker.restart_at = now + wait_s
            log.error("supervisor.worker_exited", **fields, restart_in_s=round(wait_s, 2))

    def _watch_workers(self, now: float) -> None:
        """A worker silent past its watchdog window gets SIGABRT, then SIGKILL."""
        for worker in self.workers:
            if not worker.alive() or worker.proc is None:
                continue
            if worker.abort_sent_at is None:
                silent_s = now - worker.last_ping
                if silent_s > self._allowed_silence_s(worker):
                    worker.abort_sent_at = now
                    log.error("supervisor.worker_unresponsive", worker=worker.number,
                              pid=worker.proc.pid, silent_s=round(silent_s, 1),
                              action="SIGABRT")
                    _signal(worker.proc, signal.SIGABRT)
                    # A stopped process acts on no signal but SIGKILL until continued.
                    _signal(worker.proc, signal.SIGCONT)
            elif not worker.kill_sent and now - worker.abort_sent_at > ABORT_TO_KILL_S:
                log.error("supervisor.worker_killed", worker=worker.number, pid=worker.proc.pid,
                          reason="did not exit after SIGABRT")
                _signal(worker.proc, signal.SIGKILL)
                worker.kill_sent = True

    def _running(self) -> list[tuple[_Worker, subprocess.Popen[bytes]]]:
        """The workers whose process runs (not reaped yet), with that process."""
        return [(w, w.proc) for w in self.workers
                if w.proc is not None and w.proc.returncode is None]

    def _healthy(self, now: float) -> bool:
        """Every worker runs and fed its watchdog within its window."""
        return all(w.alive() and w.abort_sent_at is None
                   and now - w.last_ping <= self._allowed_silence_s(w) for w in self.workers)

    def _allowed_silence_s(self, worker: _Worker) -> float:
        if worker.was_ready:
            return self.worker_watchdog_s
        return max(self.worker_watchdog_s, STARTUP_GRACE_S)

    # --- stop and reload -----------------------------------------------------------------

    def _begin_stop(self, now: float) -> None:
        self._stopping = True
        self._notifier.stopping()
        grace_s = self.config.daemon.shutdown_grace_s
        self._stop_deadline = now + grace_s + STOP_MARGIN_S
        running = self._running()
        log.info("supervisor.stopping", workers=len(running), grace_s=grace_s)
        for _worker, proc in running:
            _signal(proc, signal.SIGTERM)
            _signal(proc, signal.SIGCONT)

    def _enforce_stop_deadline(self, now: float) -> None:
        if self._killed_at_stop or now < self._stop_deadline:
            return
        self._killed_at_stop = True
        for worker, proc in self._running():
            log.error("supervisor.worker_killed", worker=worker.number, pid=proc.pid,
                      reason="still running after its shutdown grace")
            _signal(proc, signal.SIGKILL)

    def _kill_all(self) -> int:
        """A second stop signal: end every worker now and exit."""
        for _worker, proc in self._running():
            _signal(proc, signal.SIGKILL)
        for worker in self.workers:
            if worker.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(ABORT_TO_KILL_S)
        log.warning("supervisor.killed_workers", reason="second stop signal")
        return 128 + self._last_signal

    def _reload(self) -> None:
        running = self._running()
        self._notifier.reloading()
        self._reload_pending = {w.number for w, _proc in running}
        log.info("supervisor.reloading", workers=sorted(self._reload_pending))
        for worker, proc in running:
            worker.ready = False
            _signal(proc, signal.SIGHUP)

    # --- what the workers say, what systemd hears ----------------------------------------

    def _read_notifications(self) -> None:
        while True:
            try:
                data, ancillary, _flags, _addr = self._notify_sock.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return
            pid = _sender_pid(ancillary)
            worker = next((w for w in self.workers
                           if w.alive() and w.proc is not None and w.proc.pid == pid), None)
            if worker is None:
                continue  # a process that exited meanwhile, or not ours
            self._heard(worker, data.decode("utf-8", "replace"))

    def _heard(self, worker: _Worker, message: str) -> None:
        for line in message.splitlines():
            key, _, value = line.partition("=")
            if key == "WATCHDOG" and value == "1":
                worker.last_ping = self._clock()
            elif key == "READY" and value == "1":
                worker.ready = worker.was_ready = True
                if self._reload_pending is not None:
                    self._reload_pending.discard(worker.number)
            elif key in ("RELOADING", "STOPPING") and value == "1":
                worker.ready = False
            elif key == "STATUS":
                worker.status = value
            elif key == "X_PROCPOLL_METRICS_PORT" and value.isdigit():
                worker.metrics_port = int(value)

    def _report(self, now: float) -> None:
        """READY=1 once all workers are ready (and again after a reload); STATUS= a summary."""
        all_ready = all(w.ready and w.alive() for w in self.workers)
        if all_ready and not self._announced_ready:
            self._announced_ready = True
            self._notifier.ready(status=self._status_line())
            log.info("supervisor.ready", workers=len(self.workers))
        if self._reload_pending is not None and not self._reload_pending:
            self._reload_pending = None
            self._notifier.ready(status=self._status_line())
            log.info("supervisor.reloaded", workers=len(self.workers))
        line = self._status_line()
        # The workers' figures at most every few seconds; a change in readiness at once.
        readiness = line.partition(";")[0]
        if line != self._status_sent and (now >= self._next_status
                                          or readiness != self._status_sent.partition(";")[0]):
            self._status_sent = line
            self._next_status = now + STATUS_EVERY_S
            self._notifier.status(line)

    def _status_line(self) -> str:
        ready = sum(1 for w in self.workers if w.ready and w.alive())
        statuses = [w.status for w in self.workers if w.status and w.alive()]
        return f"{ready}/{len(self.workers)} workers ready; {combine_statuses(statuses)}"

    # --- signals -------------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # The C-level handler writes the signal number here: the main loop's select wakes.
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        # A handler (not the default) so a worker's exit wakes the loop at once.
        signal.signal(signal.SIGCHLD, self._on_child_signal)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Plain attributes only: a lock here could be the one the interrupted code holds.
        self._signals += 1
        self._last_signal = signum

    def _on_reload_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True

    def _on_child_signal(self, _signum: int, _frame: FrameType | None) -> None:
        return  # its byte on the wakeup socket is the point: the loop reaps at once

    # --- the service's one /metrics ------------------------------------------------------

    def _serve_metrics(self, listen: str) -> None:
        host, port = split_listen(listen)
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = supervisor.scrape()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                return

        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        server = server_class((host, port), Handler)
        server.daemon_threads = True
        self._metrics_server = server
        self.metrics_port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         name="metrics-endpoint", daemon=True).start()
        log.info("metrics.serving", listen=listen, port=self.metrics_port)

    def scrape(self) -> bytes:
        """Every worker's /metrics, merged; a worker that does not answer is left out."""
        texts = []
        for worker in list(self.workers):
            port = worker.metrics_port
            if port is None:
                continue
            url = f"http://127.0.0.1:{port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:
                    texts.append(reply.read().decode("utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("supervisor.scrape_failed", worker=worker.number, error=str(exc))
        return merge_expositions(texts)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def combine_statuses(statuses: list[str]) -> str:
    """The workers' status lines as one: numbers added up ("oldest" the largest) when every
    line has the same parts, else the first line as it is."""
    if not statuses:
        return "starting"
    parsed = [[_STATUS_PART.match(part) for part in s.split(", ")] for s in statuses]
    labels = [[m.group("label") if m else None for m in parts] for parts in parsed]
    if any(None in row or row != labels[0] for row in labels):
        return statuses[0]
    combined = []
    for i, label in enumerate(labels[0]):
        matches = [parts[i] for parts in parsed]
        values = [float(m.group("value")) for m in matches if m]
        unit = next((m.group("unit") or "" for m in matches if m), "")
        if label in _MAX_STATUS_PARTS:
            combined.append(f"{label} {max(values):.1f}{unit}")
        else:
            total = float(sum(values))
            combined.append(f"{label} {int(total) if total.is_integer() else total}{unit}")
    return ", ".join(combined)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                and len(data) >= _UCRED.size:
            pid: int = _UCRED.unpack(data[:_UCRED.size])[0]
            return pid
    return None


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        proc.send_signal(sig)
