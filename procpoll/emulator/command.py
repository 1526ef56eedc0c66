"""`procpoll emulate`: serve the VOD API emulator on a local port until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from procpoll.emulator.event_files import EventFileError, load_events
from procpoll.emulator.generator import generate_events
from procpoll.emulator.service import Emulator

EXIT_OK = 0
EXIT_BAD_EVENT_FILE = os.EX_DATAERR  # --from names an unreadable or malformed file
EXIT_CANNOT_BIND = os.EX_UNAVAILABLE  # the port is taken or the address is not local


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to `parser` (every help text states its default)."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    add(
        "--port",
        type=_non_negative_int,
        default=8765,
        help="port to bind, 0 for any free port (default: %(default)s)",
    )
    add(
        "--events",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="generate N realistic events at start (default: %(default)s)",
    )
    add(
        "--from",
        dest="from_file",
        metavar="FILE",
        default=None,
        help="queue the event bodies in FILE: JSON list, JSON lines or a PullEvents "
        f"response {_default('none')}",
    )
    add(
        "--sub-app-id",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="queue generated and loaded events for this SubAppId "
        f"{_default('the default application')}",
    )
    add(
        "--confirm-window",
        dest="confirm_window_s",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds a pulled event stays invisible awaiting confirmation (default: %(default)s)",
    )
    add(
        "--hold",
        dest="hold_s",
        type=_non_negative_float,
        default=5.0,
        metavar="S",
        help="seconds an empty PullEvents is held before ResourceNotFound (default: %(default)s)",
    )
    add(
        "--secret-id",
        default="AKIDemulator",
        metavar="ID",
        help="SecretId clients must sign with (default: %(default)s)",
    )
    add(
        "--secret-key",
        default="emulator-secret-key",
        metavar="KEY",
        help="SecretKey clients must sign with (default: %(default)s)",
    )
    add(
        "--session-token",
        default=None,
        metavar="TOKEN",
        help=f"require this X-TC-Token on every request {_default('none')}",
    )
    add(
        "--rate",
        type=_positive_float,
        default=None,
        metavar="N",
        help=f"allow N requests/s per action, RequestLimitExceeded beyond {_default('unlimited')}",
    )
    add(
        "--latency-ms",
        type=_non_negative_float,
        default=0.0,
        metavar="MS",
        help="delay added to every API reply (default: %(default)s)",
    )
    add(
        "--faults",
        type=_fault_rate,
        default=0.0,
        metavar="RATE",
        help="share 0..1 of API requests given a fault: InternalError, "
        "RequestLimitExceeded, HTTP 502, connection reset or a 120 s reply "
        "(default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help=f"seed for event generation and fault draws {_default('none, random')}",
    )
    add(
        "--strict-confirm",
        action="store_true",
        help="one bad handle makes ConfirmEvents confirm none of its batch; otherwise "
        f"the valid handles are confirmed {_default('off')}",
    )


def _default(text: str) -> str:
    # The empty "%(default).0s" stops ArgumentDefaultsHelpFormatter from appending a
    # second, less readable "(default: None)" when the caller's parser uses it.
    return f"(default: {text})%(default).0s"


def run(args: argparse.Namespace, *, stop: threading.Event | None = None) -> int:
    """Start the emulator from parsed options, print how to reach it, serve until signalled.

    Serving ends on SIGINT or SIGTERM (handled when called from the main thread) or when
    `stop` is set; either way the exit status is 0.
    """
    bodies = []
    if args.from_file is not None:
        try:
            bodies.extend(load_events(args.from_file))
        except EventFileError as exc:
            print(f"procpoll emulate: {exc}", file=sys.stderr)
            return EXIT_BAD_EVENT_FILE
    if args.events:
        bodies.extend(generate_events(args.events, args.seed))
    emulator = Emulator(
        host=args.host,
        port=args.port,
        secret_id=args.secret_id,
        secret_key=args.secret_key,
        session_token=args.session_token,
        confirm_window_s=args.confirm_window_s,
        hold_s=args.hold_s,
        rate=args.rate,
        latency_ms=args.latency_ms,
        faults=args.faults,
        seed=args.seed,
        strict_confirm=args.strict_confirm,
    )
    emulator.enqueue(bodies, args.sub_app_id)
    try:
        emulator.start()
    except OSError as exc:
        print(f"procpoll emulate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_BIND
    stop = stop or threading.Event()
    previous = _on_signals(stop)
    try:
        _announce(emulator, len(bodies), args.sub_app_id, args.confirm_window_s)
        while not stop.wait(1.0):
            pass
    finally:
        emulator.stop()
        _restore_signals(previous)
    print("procpoll emulate: stopped", flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m procpoll.emulator.command --help`."""
    parser = argparse.ArgumentParser(
        prog="procpoll emulate",
        description="Serve a local Tencent Cloud VOD API emulator (reliable callback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


def _announce(emulator: Emulator, queued: int, sub_app_id: int | None,
              confirm_window_s: float) -> None:
    env = {
        "TENCENTCLOUD_SECRET_ID": emulator.secret_id,
        "TENCENTCLOUD_SECRET_KEY": emulator.secret_key,
    }
    lines = [
        f"procpoll emulator listening on http://{emulator.endpoint}",
        f"endpoint: {emulator.endpoint}",
        "scheme: http",
        f"secret id: {emulator.secret_id}",
        f"secret key: {emulator.secret_key}",
    ]
    if emulator.session_token is not None:
        lines.append(f"session token: {emulator.session_token}")
        env["TENCENTCLOUD_SESSION_TOKEN"] = emulator.session_token
    app = "default application" if sub_app_id is None else f"SubAppId {sub_app_id}"
    lines += [
        f"queued events: {queued} ({app})",
        "env: " + " ".join(f"{name}={value}" for name, value in env.items()),
        f"stats: http://{emulator.endpoint}/_emulator/stats",
        "",
        config_text(emulator.endpoint, sub_app_id, confirm_window_s),
    ]
    print("\n".join(lines), flush=True)


def config_text(endpoint: str, sub_app_id: int | None, confirm_window_s: float) -> str:
    """A complete procpoll config for this emulator, to save as a file as printed.

    Whole, not a `vod = {...}` line: pasted under config.example.toml's own [vod] table,
    such a line redefines it and the file does not parse.
    """
    vod = [f"endpoint = {json.dumps(endpoint)}", 'scheme = "http"',
           f"confirm_window = {confirm_window_s:g}"]
    if sub_app_id:  # 0 is the default application: no sub_app_ids
        vod.append(f"sub_app_ids = [{sub_app_id}]")
    return "\n".join([
        "# procpoll config for this emulator: save as procpoll-emulator.toml, set the env",
        "# line above, then run: procpoll once --drain -c procpoll-emulator.toml",
        "[vod]", *vod, "",
        "[ledger]", 'path = "procpoll-emulator/ledger.sqlite3"', "",
        "[[sinks]]", 'name = "events"', 'type = "file"', 'path = "procpoll-emulator/events.jsonl"',
    ])


_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def _on_signals(stop: threading.Event) -> dict[signal.Signals, _SignalHandler]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; the caller sets `stop` instead

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[signal.Signals, _SignalHandler]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _fault_rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, not {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
