"""structlog setup: one JSON object per line on stdout, secrets redacted from every line."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

REDACTED = "[redacted]"

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
_holders: dict[str, int] = {}  # registrations not yet forgotten, per value


def register_secret(value: str | None) -> None:
    """Never let `value` appear in a log line, whatever the level or traceback."""
    if not value or len(value) < 4:
        return
    with _secrets_lock:
        _holders[value] = _holders.get(value, 0) + 1
        if _holders[value] == 1:
            _publish()


def forget_secret(value: str | None) -> None:
    """Undo one register_secret(value): rotated-out credentials must not pile up forever."""
    with _secrets_lock:
        held = _holders.get(value or "", 0)
        if held > 1:
            _holders[value or ""] = held - 1
        elif held == 1:
            del _holders[value or ""]
            _publish()


def _publish() -> None:
    global _secrets  # noqa: PLW0603 -- one process-wide set, swapped atomically
    # Longest first, so a secret containing another is redacted whole.
    _secrets = tuple(sorted(_holders, key=len, reverse=True))


def redact(text: str) -> str:
    """`text` with every registered secret replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


# Tracebacks without frame locals: a local's repr is cut at 80 characters, so a long secret
# (an STS token) would show a prefix that redaction cannot recognise, and decoded key bytes
# never match their registered text at all.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    ExceptionDictTransformer(show_locals=False))


def json_line(event_dict: Mapping[str, Any], **dumps_kw: Any) -> str:
    """One log line as JSON (structlog's serializer): orjson, five times faster than json on
    a line of an event's dozen fields; json for what orjson refuses (integers past 64 bits,
    lone surrogates), as before."""
    try:
        return orjson.dumps(event_dict, default=dumps_kw.get("default"),
                            option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event_dict, ensure_ascii=False, **dumps_kw)


_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _render_redacted(renderer: Any, *, journal: bool) -> Any:
    def render(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        line = redact(str(renderer(logger, name, event_dict)))
        if journal:
            # journald strips "<N>" and files the line at that priority: `journalctl -p`.
            return f"<{_SYSLOG_PRIORITY.get(event_dict.get('level', ''), 6)}>{line}"
        return line

    return render


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journald stream systemd connected ($JOURNAL_STREAM=dev:ino)."""
    device_inode = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return device_inode == f"{st.st_dev}:{st.st_ino}"


class LineWriter:
    """structlog's logger: each line goes out in one write, newline included, and flushed.

    print() writes the text and its newline apart: two system calls per line when output
    is unbuffered (PYTHONUNBUFFERED, common in containers), and with `processes = N`
    another worker's line could land between them. One write of a line up to the pipe
    buffer (4 KiB) is never interleaved. None writes to whatever sys.stdout is then.
    """

    _lock = threading.Lock()  # one for all: several writers may share a stream

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        """Write `message` as one line."""
        out = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            out.write(message + "\n")
            out.flush()

    log = debug = info = warn = warning = err = error = critical = exception = msg
    fatal = failure = msg


class _StdlibBridge(logging.Handler):
    """Sends records of libraries (urllib3, the SDK) through the same JSON pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger(record.name)
        level = record.levelname.lower()
        kwargs: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            kwargs["exc_info"] = record.exc_info
        getattr(log, level if level in {"debug", "info", "warning", "error"} else "error")(
            "library.log", **kwargs
        )


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog (and route stdlib logging through it) for the whole process."""
    out = stream if stream is not None else sys.stdout
    renderer: Any = (
        structlog.processors.JSONRenderer(json_line)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            _DICT_TRACEBACKS if fmt == "json" else structlog.processors.format_exc_info,
            _render_redacted(renderer, journal=writes_to_journal(out)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_args: LineWriter(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(logging.WARNING)


def log_thread_crashes() -> None:
    """Send exceptions that end a thread through the JSON log (redacted), not to stderr."""
    threading.excepthook = _log_thread_crash


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """A thread that dies of an exception is logged like everything else: JSON, redacted."""
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("procpoll").error(
        "thread.crashed", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback))
