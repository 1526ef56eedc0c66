"""The command line: sub-commands, and the one place errors become exit statuses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from procpoll import __version__, instance_lock, logs
from procpoll.config import Config, load_config
from procpoll.cpu import pin_process
from procpoll.errors import ConfigError, LedgerError, ProcpollError

EX_OK = 0
EX_DOCTOR_FAILED = 1
EX_NOT_FOUND = 1
EX_BROKEN_PIPE = 1  # what Python itself exits with after EPIPE
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# sd-daemon priorities: journald files a stderr line that starts with "<N>" at priority N.
PRIORITY_ERR = 3
PRIORITY_WARNING = 4

log = structlog.get_logger("procpoll.cli")


class ConfigUnreadable(ProcpollError):
    """The config file cannot be read (missing, a directory, no permission): exit 66
    (EX_NOINPUT), which the systemd unit does not restart on."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `procpoll` and `python -m procpoll`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return EX_USAGE
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        status = handler(args)
        # Inside the try: a reader that went away (`| head -1`) shows up at this flush.
        sys.stdout.flush()
    except BrokenPipeError:
        # The Python docs' recipe: point stdout at devnull so the interpreter's own flush
        # at exit does not raise again and print a traceback nobody asked for.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except ConfigUnreadable as exc:
        to_stderr(f"procpoll: {exc}")
        return EX_NOINPUT
    except FileNotFoundError as exc:
        to_stderr(f"procpoll: no such file: {exc.filename}")
        return EX_NOINPUT
    except ConfigError as exc:
        for line in exc.problems:
            to_stderr(f"procpoll: config: {line}")
        return EX_CONFIG
    except LedgerError as exc:
        to_stderr(f"procpoll: ledger: {exc}")
        return EX_CANTCREAT
    except instance_lock.InstanceLocked as exc:
        to_stderr(f"procpoll: {exc}")
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130
    except Exception:
        # A bug: logged once with its traceback; 70 is a status systemd restarts on.
        log.exception("procpoll.crashed", command=args.command)
        return EX_SOFTWARE
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procpoll",
        description="Reliable-callback daemon for Tencent Cloud VOD: pull events, deliver them "
                    "to sinks, confirm them only after delivery.")
    parser.add_argument("--version", action="version", version=f"procpoll {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", dest="command")

    run = sub.add_parser(
        "run", help="run the daemon until SIGTERM",
        description="Pull, deliver and confirm until SIGTERM or SIGINT; SIGHUP re-reads "
                    "the config file and the credentials. This is what the systemd unit runs.")
    _config_arg(run)
    run.set_defaults(func=_cmd_run)

    once = sub.add_parser(
        "once", help="pull one batch per sub-app (or --drain the queue), deliver, confirm, exit",
        description="Pull one batch per sub-app, deliver, confirm and exit; with --drain pull "
                    "until the queue answers empty (for cron and for catching up). Exit 0 = "
                    "all delivered, 75 = some not or another procpoll holds the ledger, "
                    "77 = credentials refused, 69 = API unreachable.")
    _config_arg(once)
    once.add_argument("--drain", action="store_true",
                      help="pull until the queue answers empty; a failed delivery ends the "
                           "drain (exit 75)")
    once.add_argument("--max-events", type=_positive_int, metavar="N",
                      help="with --drain, stop pulling once N events were pulled (a pull "
                           "brings up to 16)")
    once.set_defaults(func=_cmd_once)

    check = sub.add_parser(
        "check", help="validate a config file and lint it (exit 0, 78 or 66)",
        description="Validate the config file (errors: exit 78), then warn about settings that "
                    "parse but misbehave against VOD. Prints \"ok\" on stdout and the "
                    "effective config, secrets masked, on stderr.")
    _config_arg(check)
    check.add_argument("--strict", action="store_true",
                       help="treat warnings as errors (exit 78)")
    check.add_argument("--json", action="store_true",
                       help="print the effective config on stdout as JSON (instead of \"ok\" "
                            "on stdout and the summary on stderr)")
    check.set_defaults(func=_cmd_check)

    doctor = sub.add_parser(
        "doctor", help="check credentials, API, event mode, sinks and ledger (exit 0 = all ok)",
        description="Check the real setup in order and say what to fix: credentials, API "
                    "and signature, event mode (PULL), each sub-app, each sink, the ledger. "
                    "Exit 0 only if every check passes, 1 otherwise.")
    _config_arg(doctor)
    doctor.set_defaults(func=_cmd_doctor)

    demo = sub.add_parser(
        "demo", help="run the daemon against a local emulator with sample events",
        description="Start the VOD emulator with realistic events, run the daemon against it "
                    "with a file and a sqlite sink, show progress, and print a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--dir", type=Path, default=Path("procpoll-demo"),
                      help="where the sinks, ledger and log go (previous output is replaced)")
    demo.add_argument("--events", type=_positive_int, default=300, metavar="N",
                      help="how many events the emulator holds")
    demo.add_argument("--seed", type=int, default=7, help="seed of the event generator")
    demo.set_defaults(func=_cmd_demo)

    emulate = sub.add_parser(
        "emulate", help="serve a local VOD API emulator",
        description="Serve a local Tencent Cloud VOD API emulator (PullEvents, ConfirmEvents) "
                    "until SIGINT or SIGTERM, and print its credentials and a complete "
                    "procpoll config that uses it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from procpoll.emulator import command as emulator_command  # noqa: PLC0415 -- keep run light

    emulator_command.configure_parser(emulate)
    emulate.set_defaults(func=emulator_command.run)
    _ledger_parser(sub)
    _deadletter_parser(sub)
    from procpoll import status as status_command  # noqa: PLC0415 -- keep run light

    status_command.add_parser(sub)
    return parser


def _ledger_parser(sub: Any) -> None:
    ledger = sub.add_parser(
        "ledger", help="what the ledger knows about an event, and its totals",
        description="Read the delivery ledger ([ledger] path) read-only: safe while the "
                    "daemon runs.")
    commands = ledger.add_subparsers(metavar="ACTION", dest="action", required=True)
    show = commands.add_parser(
        "show", help="per sink: attempts, delivered, dead, last error, first seen; and the "
                     "confirmations (exit 1 if the ledger knows nothing of KEY)",
        description="Show the ledger rows of one event: its own and those of later identical "
                    "notifications (KEY~n), per sink, and the confirmations recorded for KEY.")
    show.add_argument("key", metavar="KEY", help="the event key (as logged: event_key)")
    stats = commands.add_parser(
        "stats", help="rows delivered, dead and failing, confirmations, the oldest row",
        description="Totals of the ledger: rows delivered, dead-lettered and failing (neither "
                    "yet), confirmations recorded, and the oldest row's time.")
    for parser in (show, stats):
        _config_arg(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON document")
    show.set_defaults(func=_cmd_ledger_show)
    stats.set_defaults(func=_cmd_ledger_stats)
    copy = commands.add_parser(
        "copy", help="copy every row of one ledger into another (SQLite to PostgreSQL)",
        description="Copy the deliveries and confirmations of one ledger into another, e.g. "
                    "an existing SQLite ledger into the PostgreSQL one several hosts will "
                    "share, so the move does not redeliver a week of events. Idempotent: a "
                    "second run writes nothing. Stop the daemons of the source first.")
    copy.add_argument("--from", dest="source", required=True, metavar="URL",
                      help="sqlite:///PATH, a file path, or postgresql://…")
    copy.add_argument("--to", dest="target", required=True, metavar="URL",
                      help="sqlite:///PATH, a file path, or postgresql://…")
    copy.add_argument("--retention", type=float, default=7 * 86_400.0, metavar="SECONDS",
                      help="rows first seen longer ago than this are not copied")
    copy.set_defaults(func=_cmd_ledger_copy)


def _deadletter_parser(sub: Any) -> None:
    deadletter = sub.add_parser(
        "deadletter", help="list, show and replay the events set aside in [dead_letter] directory",
        description="The dead-letter directory ([dead_letter] directory) holds one JSON file "
                    "per event a sink refused max_attempts times, and per pulled item that "
                    "was not an event (*.unparsed.json).")
    commands = deadletter.add_subparsers(metavar="ACTION", dest="action", required=True)
    listing = commands.add_parser(
        "list", help="each file with its reason, sink, rounds, event type and time",
        description="List the dead letters, oldest first: file, sink, rounds, event type, "
                    "reason and when it was set aside.")
    _config_arg(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    listing.set_defaults(func=_cmd_deadletter_list)
    show = commands.add_parser("show", help="print one dead letter",
                               description="Print one dead-letter file, as stored.")
    _config_arg(show)
    show.add_argument("file", metavar="FILE",
                      help="a file name in the dead-letter directory, or a path")
    show.set_defaults(func=_cmd_deadletter_show)
    replay = commands.add_parser(
        "replay", help="deliver dead letters to their sink again (exit 0 = all, 75 = not all)",
        description="Deliver each dead letter again to the sink that refused it (or to "
                    "--sink), with that sink's timeout, retries and backoff; record the "
                    "delivery in the ledger and only then remove the file. Unparsed items "
                    "are kept. Exit 0 when every file was replayed, 75 otherwise.")
    _config_arg(replay)
    replay.add_argument("--sink", metavar="NAME", help="deliver to this configured sink instead")
    replay.add_argument("files", metavar="FILE", nargs="*",
                        help="files to replay (default: every sink-failure dead letter)")
    replay.set_defaults(func=_cmd_deadletter_replay)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, required=True,
                        help="the TOML config file (see config.example.toml)")


def to_stderr(line: str, priority: int = PRIORITY_ERR) -> None:
    """Write one line to stderr, tagged with its priority when stderr is the journal.

    Without the tag journald files the line at "info", and `journalctl -p err` would show
    that the unit failed but not why.
    """
    if logs.writes_to_journal(sys.stderr):
        line = f"<{priority}>{line}"
    print(line, file=sys.stderr)


def _load(path: Path) -> Config:
    """The validated config; an unreadable file is one line and exit 66, not a traceback."""
    try:
        return load_config(path)
    except OSError as exc:
        raise ConfigUnreadable(f"cannot read the config file {path}: "
                               f"{exc.strerror or exc}") from None


WORKER_ENV = "PROCPOLL_WORKER"
"""Set by the supervisor in each consumer process it starts (the worker's number)."""
METRICS_LISTEN_ENV = "PROCPOLL_METRICS_LISTEN"
"""Set by the supervisor: where a worker serves its own metrics (it reports the port)."""


def _start(args: argparse.Namespace) -> tuple[Config, instance_lock.InstanceLock | None]:
    config = _load(args.config)
    lock = None
    # One procpoll (or one supervisor) per SQLite file: its workers share the lock's
    # protection; a PostgreSQL ledger is made for many consumers and needs none. Taken
    # before the daemon opens the ledger; never released: process exit drops it.
    if not config.ledger.url and not os.environ.get(WORKER_ENV):
        lock = instance_lock.acquire(config.ledger.path)
    logs.configure(config.log.level, config.log.format)
    logs.log_thread_crashes()
    return config, lock


def _cmd_run(args: argparse.Namespace) -> int:
    from procpoll.daemon import Daemon  # noqa: PLC0415 -- `check` must not import the SDK

    config, _lock = _start(args)
    worker = os.environ.get(WORKER_ENV)
    if config.daemon.processes > 1 and not worker:
        from procpoll.supervisor import Supervisor  # noqa: PLC0415 -- only with processes > 1

        return Supervisor(config, args.config).run()
    shared = bool(worker) or bool(config.ledger.url)
    # The workers of one service split the account's call rate between them.
    shares = config.daemon.processes if worker else 1
    cpu = _pin(worker) if config.daemon.pin_cpu else None
    return Daemon(config, config_path=args.config, shared_ledger=shared,
                  rate_shares=shares, cpu=cpu).run()


def _pin(worker: str | None) -> int | None:
    """Keep the process on one CPU, before the daemon starts its threads (they inherit it)."""
    try:
        return pin_process(int(worker) if worker and worker.isdigit() else None)
    except OSError as exc:
        log.warning(
            "daemon.cpu_not_pinned", error=str(exc),
            action="running on every CPU; allow sched_setaffinity or set daemon.pin_cpu = false")
        return None


def _cmd_once(args: argparse.Namespace) -> int:
    from procpoll.daemon import Daemon  # noqa: PLC0415 -- `check` must not import the SDK

    if args.max_events is not None and not args.drain:
        to_stderr("procpoll: once: --max-events needs --drain")
        return EX_USAGE
    config, _lock = _start(args)
    return Daemon(config).once(drain=args.drain, max_events=args.max_events)


def _cmd_check(args: argparse.Namespace) -> int:
    from procpoll.lint import lint  # noqa: PLC0415 -- only `check` needs it

    config = _load(args.config)
    findings = lint(config)
    for finding in findings:
        to_stderr(f"warning: {config.source}: {finding.key}: {finding.what}", PRIORITY_WARNING)
    if findings and args.strict:
        to_stderr(f"procpoll: check --strict: {len(findings)} warning(s)")
        return EX_CONFIG
    text = json.dumps(summary(config), indent=2, ensure_ascii=False)
    if args.json:
        print(text)
    else:
        # stdout says only the verdict, for scripts; the summary is for the reader.
        print("ok")
        print(text, file=sys.stderr)
    return EX_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from procpoll.doctor import Doctor  # noqa: PLC0415 -- imports the SDK

    config = _load(args.config)
    # Library warnings go to stderr; stdout is the checklist.
    logs.configure("warning", "console", stream=sys.stderr)
    return EX_OK if Doctor(config).run(sys.stdout) else EX_DOCTOR_FAILED


def _cmd_demo(args: argparse.Namespace) -> int:
    from procpoll.demo import run_demo  # noqa: PLC0415 -- imports the SDK and the emulator

    return run_demo(args.dir, args.events, seed=args.seed)


def _sqlite_ledger_path(config: Config) -> Path:
    if config.ledger.url:
        raise ConfigError(f"{config.source}: ledger.url: `procpoll ledger show|stats` read a "
                          "SQLite ledger; for PostgreSQL query the procpoll_deliveries and "
                          "procpoll_confirmations tables")
    return config.ledger.path


def _cmd_ledger_copy(args: argparse.Namespace) -> int:
    from procpoll.ledger_copy import copy_ledger  # noqa: PLC0415 -- only `ledger copy`

    counts = copy_ledger(args.source, args.target, retention_s=args.retention)
    print(json.dumps(counts))
    return EX_OK


def _cmd_ledger_show(args: argparse.Namespace) -> int:
    from procpoll import ledger_ops  # noqa: PLC0415 -- only `ledger` needs it

    record = ledger_ops.show(_sqlite_ledger_path(_load(args.config)), args.key)
    ledger_ops.print_show(record, sys.stdout, as_json=args.json)
    return EX_OK if record["deliveries"] or record["confirmations"] else EX_NOT_FOUND


def _cmd_ledger_stats(args: argparse.Namespace) -> int:
    from procpoll import ledger_ops  # noqa: PLC0415 -- only `ledger` needs it

    ledger_ops.print_stats(ledger_ops.stats(_sqlite_ledger_path(_load(args.config))), sys.stdout,
                           as_json=args.json)
    return EX_OK


def _cmd_deadletter_list(args: argparse.Namespace) -> int:
    from procpoll import deadletter_ops  # noqa: PLC0415 -- only `deadletter` needs it

    directory = deadletter_ops.directory_of(_load(args.config))
    deadletter_ops.print_list(deadletter_ops.letters(directory), sys.stdout, as_json=args.json)
    return EX_OK


def _cmd_deadletter_show(args: argparse.Namespace) -> int:
    from procpoll import deadletter_ops  # noqa: PLC0415 -- only `deadletter` needs it

    directory = deadletter_ops.directory_of(_load(args.config))
    letter = deadletter_ops.read(deadletter_ops.resolve(directory, args.file))
    if letter.record is None:
        if not letter.path.exists():
            raise FileNotFoundError(letter.path)
        to_stderr(f"procpoll: {letter.path}: {letter.problem}")
        return EX_DATAERR
    print(json.dumps(letter.record, indent=2, ensure_ascii=False))
    return EX_OK


def _cmd_deadletter_replay(args: argparse.Namespace) -> int:
    from procpoll import deadletter_ops  # noqa: PLC0415 -- imports every sink type

    config = _load(args.config)
    directory = deadletter_ops.directory_of(config)
    logs.configure("warning", "console", stream=sys.stderr)
    if args.files:
        paths = [deadletter_ops.resolve(directory, name) for name in args.files]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(missing[0])
    else:
        found = deadletter_ops.letters(directory)
        for letter in found:
            if letter.unparsed:
                to_stderr(f"kept {letter.path.name}: not an event "
                          f"({(letter.record or {}).get('reason')})", PRIORITY_WARNING)
        paths = [letter.path for letter in found if not letter.unparsed]
    results = deadletter_ops.Replayer(config, sink_override=args.sink).replay(paths)
    for result in results:
        if result.replayed:
            print(f"replayed {result.path.name} -> {result.sink}")
        else:
            to_stderr(f"{result.path.name}: {result.why}", PRIORITY_WARNING)
    return EX_OK if all(result.replayed for result in results) else EX_TEMPFAIL


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def summary(config: Config) -> dict[str, Any]:
    """The effective config as plain data, with every secret masked."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, bytes):
            return "***"
        if isinstance(value, Path):
            return str(value)
        return value

    data: dict[str, Any] = plain(config)
    for sink in data["sinks"]:
        options = sink.get("options") or {}
        if "headers" in options:
            options["headers"] = {name: "***" if secret_like(name) else value
                                  for name, value in options["headers"].items()}
    return data


SECRET_HEADER_WORDS = ("auth", "token", "secret", "key", "signature", "cookie", "password")


def secret_like(header: str) -> bool:
    """Whether a header's value is masked in output: its name suggests a credential."""
    name = header.lower()
    return any(word in name for word in SECRET_HEADER_WORDS)
