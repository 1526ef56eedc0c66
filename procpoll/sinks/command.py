"""The command sink: run an argv per event, the callback JSON on stdin; the exit status decides."""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from procpoll.cpu import unpinned
from procpoll.errors import SinkError
from procpoll.events import PROCEDURE_STATE_CHANGED
from procpoll.schema import Table
from procpoll.sinks.base import Delivery, Sink, SinkConfig, SinkType

log = structlog.get_logger("procpoll.sinks.command")

EX_TEMPFAIL = 75
"""The exit status (sysexits EX_TEMPFAIL) by which a command asks for a retry."""

OUTPUT_TAIL_BYTES = 4096
"""How much of the end of each of stdout and stderr is kept and logged."""

ENV_VALUE_MAX_CHARS = 4096
"""Event fields put in the environment are cut here: Linux refuses one over 128 KiB (E2BIG)."""

ENV_PREFIX = "PROCPOLL_"
_NOT_INHERITED = ("TENCENTCLOUD_", ENV_PREFIX)
_CHUNK = 65536
_REAP_AFTER_KILL_S = 5.0


@dataclass(frozen=True, slots=True)
class CommandOptions:
    """[[sinks]] keys of type "command"."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def parse_options(t: Table) -> CommandOptions:
    """Read the command sink's own keys: `argv` (required), `env`, `cwd`."""
    argv = t.claim("argv", None)
    if isinstance(argv, str):
        t.bad("argv", 'expected a list like ["/usr/local/bin/on-vod-event", "--verbose"]: '
                      "no shell splits a command line")
    elif not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        t.bad("argv", "expected a non-empty list of strings, the program first")
    elif not argv[0]:
        t.bad("argv", "the program (argv[0]) must not be empty")
    elif any("\0" in a for a in argv):
        t.bad("argv", "arguments cannot contain NUL")
    env: dict[str, str] = t.text_map("env", {})
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            t.bad(f"env.{name}", "an environment variable name is non-empty, without '=' or NUL")
        elif name.startswith(ENV_PREFIX):
            t.bad(f"env.{name}", f"{ENV_PREFIX}* variables are set by procpoll for each event")
        if "\0" in value:
            t.bad(f"env.{name}", "an environment value cannot contain NUL")
    valid = isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return CommandOptions(argv=tuple(argv) if valid else (), env=env,
                          cwd=t.file_path("cwd", None))


def env_value(text: str) -> str:
    """An event field made fit for the environment: no NUL, bounded, encodable.

    The full, exact value is always in the JSON on stdin.
    """
    text = text.replace("\0", "")[:ENV_VALUE_MAX_CHARS]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def event_environment(delivery: Delivery) -> dict[str, str]:
    """The PROCPOLL_* variables describing one delivery."""
    event = delivery.event
    values = {
        "PROCPOLL_EVENT_TYPE": event.event_type,
        "PROCPOLL_EVENT_KEY": event.key,
        "PROCPOLL_DELIVERY_ID": delivery.identity,
        "PROCPOLL_SUB_APP_ID": str(delivery.sub_app_id or 0),
        "PROCPOLL_ATTEMPT": str(delivery.attempt),
    }
    if event.event_type == PROCEDURE_STATE_CHANGED:
        values["PROCPOLL_TASK_ID"] = event.task_id or ""
        values["PROCPOLL_FILE_ID"] = event.file_id or ""
        values["PROCPOLL_STATUS"] = event.status or ""
    return {name: env_value(value) for name, value in values.items()}


class _Tail:
    """The last OUTPUT_TAIL_BYTES of a stream, and how many bytes it carried in all."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * OUTPUT_TAIL_BYTES:
            del self.data[:-OUTPUT_TAIL_BYTES]

    def text(self) -> str:
        return bytes(self.data[-OUTPUT_TAIL_BYTES:]).decode("utf-8", "replace")


@dataclass(slots=True)
class _Run:
    """What one process did: its output tails, and whether it outlived the deadline."""

    stdout: _Tail = field(default_factory=_Tail)
    stderr: _Tail = field(default_factory=_Tail)
    timed_out: bool = False


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` exits (Linux >= 5.3), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _exchange(proc: subprocess.Popen[bytes], body: bytes, deadline: float) -> _Run:
    """Feed `body` to stdin then EOF, keep the tails of stdout and stderr, until the exit.

    Stops reading once the process itself exits (a background child may keep the pipes
    open), or at `deadline`.
    """
    assert proc.stdin and proc.stdout and proc.stderr  # noqa: S101 -- all three are PIPE
    run = _Run()
    tails = {proc.stdout.fileno(): run.stdout, proc.stderr.fileno(): run.stderr}
    stdin_fd, pending = proc.stdin.fileno(), memoryview(body)
    exit_fd = _pidfd(proc.pid)
    with selectors.DefaultSelector() as selector:
        for fd in (*tails, stdin_fd):
            os.set_blocking(fd, False)
        for fd in tails:
            selector.register(fd, selectors.EVENT_READ)
        if exit_fd is not None:
            selector.register(exit_fd, selectors.EVENT_READ)
        if pending:
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        try:
            while any(fd != exit_fd for fd in selector.get_map()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    run.timed_out = True
                    return run
                for key, _ in selector.select(remaining):
                    if key.fd == stdin_fd:
                        pending = _feed(selector, proc, pending)
                    elif key.fd in tails:  # the exit descriptor only wakes the loop
                        _read(selector, key.fd, tails[key.fd])
                if exit_fd is not None and proc.poll() is not None:
                    # Exited: what it wrote is in the pipes now; don't wait for EOF.
                    _drain(selector, tails, deadline)
                    break
        finally:
            if exit_fd is not None:
                os.close(exit_fd)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        run.timed_out = True
    return run


def _feed(selector: selectors.BaseSelector, proc: subprocess.Popen[bytes],
          pending: memoryview) -> memoryview:
    """Write what the stdin pipe takes; close it (EOF) once all is written or nobody reads."""
    assert proc.stdin  # noqa: S101 -- stdin is a PIPE
    try:
        pending = pending[os.write(proc.stdin.fileno(), pending[:_CHUNK]):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        # The command exited or closed stdin without reading: its exit status decides.
        pending = pending[:0]
    if not pending:
        selector.unregister(proc.stdin.fileno())
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    return pending


def _read(selector: selectors.BaseSelector, fd: int, tail: _Tail) -> bool:
    """Read what is there; unregister the pipe at EOF. False when nothing more came now."""
    try:
        chunk = os.read(fd, _CHUNK)
    except BlockingIOError:
        return False
    if not chunk:
        selector.unregister(fd)
        return False
    tail.add(chunk)
    return True


def _drain(selector: selectors.BaseSelector, tails: Mapping[int, _Tail], deadline: float) -> None:
    """The process has exited: take what its pipes hold without waiting for more."""
    for fd, tail in tails.items():
        if fd in selector.get_map():
            while time.monotonic() < deadline and _read(selector, fd, tail):
                pass


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's whole process group (it leads its own session) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(_REAP_AFTER_KILL_S)


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:limit] if lines else ""


class CommandSink:
    """Runs the configured argv once per delivery, without a shell, in its own session."""

    def __init__(self, name: str, options: CommandOptions,
                 environ: Mapping[str, str] | None = None) -> None:
        self.name = name
        self._options = options
        base = os.environ if environ is None else environ
        # The VOD credentials stay with the daemon; PROCPOLL_* always describe this event.
        self._environ = {k: v for k, v in base.items() if not k.startswith(_NOT_INHERITED)}
        self._environ.update(options.env)
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def deliver(self, delivery: Delivery) -> None:
        """Run the command; return on exit 0, raise SinkError otherwise."""
        event = delivery.event
        deadline = time.monotonic() + delivery.timeout_s
        proc = self._start(delivery)
        with self._lock:
            self._running.add(proc)
            closed = self._closed
        try:
            if closed:  # close() ran while this command was starting
                _kill_group(proc)
            run = _exchange(proc, event.callback_body(), deadline)
            if run.timed_out:
                _kill_group(proc)
        finally:
            with self._lock:
                self._running.discard(proc)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        status = None if run.timed_out else proc.returncode
        self._log_output(delivery, run, status)
        if status == 0:
            return
        if run.timed_out:
            raise SinkError(f"timed out after {delivery.timeout_s:g} s; process group killed")
        assert status is not None  # noqa: S101 -- set once the process was reaped
        if self._closed and status < 0:
            raise SinkError("stopped by shutdown")
        hint = _last_line(run.stderr.text())
        suffix = f": {hint}" if hint else ""
        if status == EX_TEMPFAIL:
            raise SinkError(f"exit status 75 (EX_TEMPFAIL){suffix}", retryable=True)
        if status < 0:
            raise SinkError(f"killed by {_signal_name(-status)}{suffix}", retryable=False)
        raise SinkError(f"exit status {status}{suffix}", retryable=False)

    def _start(self, delivery: Delivery) -> subprocess.Popen[bytes]:
        argv, cwd = self._options.argv, self._options.cwd
        try:
            with unpinned():
                return subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, cwd=cwd,
                    env={**self._environ, **event_environment(delivery)},
                    start_new_session=True, close_fds=True,
                )
        except FileNotFoundError as exc:
            missing = exc.filename if exc.filename is not None else argv[0]
            what = "working directory" if cwd is not None and str(missing) == str(cwd) \
                else "program"
            raise SinkError(f"{what} not found: {missing}", retryable=False) from None
        except PermissionError as exc:
            raise SinkError(f"permission denied: {exc.filename or argv[0]}",
                            retryable=False) from None
        except OSError as exc:
            # E2BIG, ENOEXEC, ENOTDIR are the config's fault; EAGAIN/ENOMEM pass.
            raise SinkError(f"cannot start {argv[0]}: {exc.strerror or exc}",
                            retryable=exc.errno in {errno.EAGAIN, errno.ENOMEM}) from None

    def _log_output(self, delivery: Delivery, run: _Run, status: int | None) -> None:
        if not (run.stdout.total or run.stderr.total):
            return
        streams: dict[str, object] = {}
        for stream, tail in (("stdout", run.stdout), ("stderr", run.stderr)):
            if tail.total:
                streams[stream] = tail.text()
                streams[f"{stream}_bytes"] = tail.total
        emit = log.info if status == 0 else log.warning
        emit("sink.command_output", sink=self.name, event_key=delivery.event.key,
             task_id=delivery.event.task_id, attempt=delivery.attempt, exit_status=status,
             timed_out=run.timed_out, **streams)

    def close(self) -> None:
        """Kill the process groups of commands still running."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def build(config: SinkConfig) -> Sink:
    """Build a CommandSink from its config."""
    assert isinstance(config.options, CommandOptions)  # noqa: S101 -- the registry guarantees it
    return CommandSink(config.name, config.options)


TYPE = SinkType(parse_options=parse_options, build=build, secret_keys=("env",))
