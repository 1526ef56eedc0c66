"""TOML configuration → frozen dataclasses; every check of the file's shape lives here."""

from __future__ import annotations

import importlib.util
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from procpoll.errors import ConfigError
from procpoll.event_types import KNOWN_EVENT_TYPES, PROCEDURE_STATUSES, closest
from procpoll.listen import split_listen
from procpoll.schema import Problems, Table
from procpoll.sinks import SINK_TYPES
from procpoll.sinks.base import SinkConfig
from procpoll.sinks.file import FileOptions
from procpoll.sinks.sqlite import SqliteOptions
from procpoll.sinks.stdout import STDOUT, StdoutOptions

VOD_HOLD_S = 5.0
"""PullEvents holds an idle request this long; the client timeout must exceed it."""

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class VodConfig:
    """[vod]: where the API is and how to call it."""

    endpoint: str = "vod.tencentcloudapi.com"
    scheme: str = "https"
    region: str = ""
    sub_app_ids: tuple[int, ...] = ()
    request_timeout_s: float = 10.0
    confirm_window_s: float = 30.0
    requests_per_s: float = 95.0


@dataclass(frozen=True, slots=True)
class CredentialsConfig:
    """[credentials]: optional files holding the secrets, and the opt-in CVM role."""

    secret_id_file: Path | None = None
    secret_key_file: Path | None = None
    session_token_file: Path | None = None
    profile_file: Path | None = None
    cvm_role: str = ""


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """[ledger]: the delivery memory, a SQLite file (`path`) or a PostgreSQL server (`url`).

    `url` is "" for SQLite (a sqlite:// URL sets `path`), else the postgresql:// URL.
    """

    path: Path = Path("ledger.sqlite3")
    retention_s: float = 7 * DAY_S
    url: str = ""
    pool_size: int = 4  # PostgreSQL connections per process


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """[daemon]: concurrency, policies and lifecycle."""

    concurrency: int = 32
    pullers: int = 4
    max_in_flight: int = 256
    unrouted: str = "confirm"
    max_age_s: float = 2 * DAY_S
    confirm_margin_s: float = 2.0
    shutdown_grace_s: float = 10.0
    processes: int = 1  # consumer processes under one supervisor ("auto" = the CPUs allowed)
    pin_cpu: bool = True  # each consumer process on one CPU (procpoll/cpu.py)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: level and format of the JSON log on stdout."""

    level: str = "info"
    format: str = "json"
    stats_interval_s: float = 60.0  # a daemon.stats line this often (0 = never)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: the Prometheus /metrics endpoint ("" = off)."""

    listen: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetterConfig:
    """[dead_letter]: where poison events go before they are confirmed ("" = nowhere)."""

    directory: Path | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration."""

    source: str = "<defaults>"
    vod: VodConfig = field(default_factory=VodConfig)
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dead_letter: DeadLetterConfig = field(default_factory=DeadLetterConfig)
    sinks: tuple[SinkConfig, ...] = ()


def default_ledger_path(environ: dict[str, str] | None = None) -> Path:
    """Under $STATE_DIRECTORY (systemd StateDirectory=) when set, else the working directory."""
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state or ".") / "ledger.sqlite3"


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem.

    A file that cannot be read (missing, a directory, no permission) raises OSError so
    the CLI can exit 66 (EX_NOINPUT).
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax: {exc}") from None
    return parse_config(document, str(path))


def parse_config(document: dict[str, Any], source: str) -> Config:
    """Validate a decoded TOML document into a Config; raise ConfigError listing every problem."""
    problems = Problems(source)
    top = Table(document, "", problems)
    vod = _vod(top.table("vod"))
    credentials = _credentials(top.table("credentials"))
    ledger = _ledger(top.table("ledger"))
    daemon = _daemon(top.table("daemon"))
    log = _log(top.table("log"))
    metrics = _metrics(top.table("metrics"))
    dead_letter = _dead_letter(top.table("dead_letter"))
    sinks = _sinks(top, problems, ledger, daemon)
    top.finish()
    if problems.lines:
        raise ConfigError(problems.lines)
    return Config(source=source, vod=vod, credentials=credentials, ledger=ledger, daemon=daemon,
                  log=log, metrics=metrics, dead_letter=dead_letter, sinks=sinks)


def _vod(t: Table) -> VodConfig:
    d = VodConfig()
    vod = VodConfig(
        endpoint=t.text("endpoint", d.endpoint),
        scheme=t.text("scheme", d.scheme, choices=("https", "http")),
        region=t.text("region", d.region),
        sub_app_ids=t.integers("sub_app_ids", d.sub_app_ids, low=1),
        request_timeout_s=t.seconds("request_timeout", d.request_timeout_s, high=300),
        confirm_window_s=t.seconds("confirm_window", d.confirm_window_s, low=0, low_inclusive=False,
                                   high=300),
        requests_per_s=_rate(t, "requests_per_s", d.requests_per_s),
    )
    if not vod.endpoint or "/" in vod.endpoint:
        t.bad("endpoint", f"expected host[:port] without scheme or path, got {vod.endpoint!r}")
    if vod.request_timeout_s <= VOD_HOLD_S:
        t.bad("request_timeout", f"must be > {VOD_HOLD_S:g} s: PullEvents holds an idle request "
                                 f"that long (got {vod.request_timeout_s:g})")
    if len(set(vod.sub_app_ids)) != len(vod.sub_app_ids):
        t.bad("sub_app_ids", "duplicate sub-application id")
    t.finish()
    return vod


def _rate(t: Table, key: str, default: float) -> float:
    value = t.claim(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 10_000:
        t.bad(key, f"expected a number of calls per second in (0, 10000], got {value!r}")
        return default
    return float(value)


def _credentials(t: Table) -> CredentialsConfig:
    d = CredentialsConfig()
    creds = CredentialsConfig(
        secret_id_file=t.file_path("secret_id_file", d.secret_id_file),
        secret_key_file=t.file_path("secret_key_file", d.secret_key_file),
        session_token_file=t.file_path("session_token_file", d.session_token_file),
        profile_file=t.file_path("profile_file", d.profile_file),
        cvm_role=t.text("cvm_role", d.cvm_role),
    )
    if (creds.secret_id_file is None) != (creds.secret_key_file is None):
        t.bad("secret_id_file", "secret_id_file and secret_key_file go together")
    for key in ("secret_id", "secret_key", "session_token"):
        if t.claim(key, None) is not None:
            t.bad(key, f"secrets do not belong in the config file: use {key}_file, "
                       "the environment or systemd LoadCredential=")
    t.finish()
    return creds


def _ledger(t: Table) -> LedgerConfig:
    path = t.file_path("path", default_ledger_path())
    url = t.text("url", "").strip()
    if url and t.has("path"):
        t.bad("url", "give either ledger.url or ledger.path (the SQLite shorthand), not both")
    elif url:
        path, url = _ledger_url(t, url, path)
    ledger = LedgerConfig(
        path=path,
        retention_s=t.seconds("retention", LedgerConfig().retention_s, low=60),
        url=url,
        pool_size=t.integer("pool_size", LedgerConfig().pool_size, low=1, high=100),
    )
    t.finish()
    return ledger


def _ledger_url(t: Table, url: str, path: Path) -> tuple[Path, str]:
    """(path, url) of a [ledger] url: a SQLite file's path with url "", or a PostgreSQL URL."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite" and rest:
        return Path(rest), ""
    if scheme not in ("postgresql", "postgres"):
        got = f"scheme {scheme!r}" if rest else "no scheme"  # the URL may hold a password
        t.bad("url", f"expected sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE, "
                     f"got {got}")
        return path, ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing the port is the check: it raises when malformed
    except ValueError as exc:
        t.bad("url", f"malformed PostgreSQL URL: {exc}")
        return path, ""
    if not all(parse_qs(parts.query, keep_blank_values=True).get("schema", ())):
        t.bad("url", "schema= needs a schema name")
    missing = [name for name in ("psycopg", "psycopg_pool") if importlib.util.find_spec(name)
               is None]
    if missing:
        t.bad("url", f"a PostgreSQL ledger needs {' and '.join(missing)}: "
                     "pip install 'procpoll[postgresql]'")
    return path, url


def _daemon(t: Table) -> DaemonConfig:
    d = DaemonConfig()
    daemon = DaemonConfig(
        concurrency=t.integer("concurrency", d.concurrency, low=1, high=1024),
        pullers=t.integer("pullers", d.pullers, low=1, high=16),
        max_in_flight=t.integer("max_in_flight", d.max_in_flight, low=16, high=100_000),
        unrouted=t.text("unrouted", d.unrouted, choices=("confirm", "leave")),
        max_age_s=t.seconds("max_age", d.max_age_s, low=1),
        confirm_margin_s=t.seconds("confirm_margin", d.confirm_margin_s, high=20),
        shutdown_grace_s=t.seconds("shutdown_grace", d.shutdown_grace_s, high=600),
        processes=_processes(t, d.processes),
        pin_cpu=t.flag("pin_cpu", d.pin_cpu),
    )
    t.finish()
    return daemon


def _processes(t: Table, default: int) -> int:
    """[daemon] processes: a count, or "auto" for the CPUs this process may use (its
    CPUAffinity= or container's cpuset, else the machine's)."""
    if t.has("processes") and t.claim("processes", None) == "auto":
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0)) or 1
        return os.cpu_count() or 1
    value: int = t.integer("processes", default, low=1, high=256)
    return value


def _log(t: Table) -> LogConfig:
    d = LogConfig()
    log = LogConfig(
        level=t.text("level", d.level, choices=("debug", "info", "warning", "error")),
        format=t.text("format", d.format, choices=("json", "console")),
        stats_interval_s=t.seconds("stats_interval", d.stats_interval_s),
    )
    t.finish()
    return log


def _metrics(t: Table) -> MetricsConfig:
    listen = t.text("listen", MetricsConfig().listen).strip()
    if listen:
        try:
            split_listen(listen)
        except ValueError as exc:
            t.bad("listen", str(exc))
    t.finish()
    return MetricsConfig(listen=listen)


def _dead_letter(t: Table) -> DeadLetterConfig:
    directory = t.text("directory", "")
    t.finish()
    return DeadLetterConfig(directory=Path(directory) if directory else None)


def _sinks(top: Table, problems: Problems, ledger: LedgerConfig,
           daemon: DaemonConfig) -> tuple[SinkConfig, ...]:
    raw = top.claim("sinks", [])
    if not isinstance(raw, list):
        top.bad("sinks", "expected an array of tables ([[sinks]])")
        return ()
    if not raw:
        top.bad("sinks", _no_sinks(daemon.unrouted))
    sinks: list[SinkConfig] = []
    names: set[str] = set()
    writers: dict[Path, str] = {} if ledger.url else {
        _resolved(ledger.path): "the ledger (ledger.path)"}
    for index, item in enumerate(raw):
        t = Table(item, f"sinks[{index}]", problems)
        sink = _sink(t)
        if sink is None:
            continue
        if sink.name in names:
            t.bad("name", f"duplicate sink name {sink.name!r}")
        names.add(sink.name)
        _claim_output(t, sink, writers)
        if isinstance(sink.options, StdoutOptions) and daemon.processes > 1:
            t.bad("type", f"a stdout sink writes one stream, and the {daemon.processes} "
                          "processes of daemon.processes would interleave their lines in it; "
                          "use a file sink, or daemon.processes = 1")
        sinks.append(sink)
    return tuple(sinks)


def _no_sinks(unrouted: str) -> str:
    if unrouted == "confirm":
        fate = ("every pulled event would be confirmed to VOD undelivered "
                '(daemon.unrouted = "confirm") and be gone')
    else:
        fate = "every pulled event would stay in VOD undelivered until it expires (~4 days)"
    return f"no [[sinks]] table: {fate}; add at least one [[sinks]]"


def _claim_output(t: Table, sink: SinkConfig, writers: dict[Path, str]) -> None:
    """Refuse a second writer of one file: a file sink undoes a failed write by truncating
    the file to where its line began, which can cut a line another writer appended since."""
    path = _output_path(sink)
    if path is None:
        return
    resolved = _resolved(path)
    if resolved in writers:
        t.bad("path", f"{path} is also written by {writers[resolved]}: two writers on one file "
                      "corrupt each other's lines; give each sink its own path")
        return
    writers[resolved] = f"sink {sink.name!r} ({t.path('path')})"


def _output_path(sink: SinkConfig) -> Path | None:
    options = sink.options
    if isinstance(options, FileOptions | SqliteOptions):
        return options.path
    if isinstance(options, StdoutOptions) and options.path != STDOUT:
        return Path(options.path)
    return None


def _resolved(path: Path) -> Path:
    """`path` made absolute with symlinks followed, so two spellings of one file compare equal."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return path.absolute()


def _sink(t: Table) -> SinkConfig | None:
    name = t.text("name", "")
    if t.has("name") and not name.strip():
        t.bad("name", "expected a non-empty name")
    kind = t.text("type", "", choices=tuple(SINK_TYPES))
    events = t.texts("events", None)
    for event_type in events or ():
        _check_event_type(t, event_type)
    statuses = t.texts("statuses", None)
    for status in statuses or ():
        _check_status(t, status)
    sub_app_ids = t.integers("sub_app_ids", None, low=0)
    timeout_s = t.seconds("timeout", 5.0, low=0, low_inclusive=False, high=3600)
    retries = t.integer("retries", 3, low=0, high=100)
    backoff_s = t.seconds("backoff", 0.5, high=60)
    backoff_max_s = t.seconds("backoff_max", 5.0, high=600)
    max_attempts = t.integer("max_attempts", 10, low=1, high=10_000)
    if kind not in SINK_TYPES:
        return None
    options = SINK_TYPES[kind].parse_options(t)
    t.finish()
    return SinkConfig(name=name, type=kind, events=events, statuses=statuses,
                      sub_app_ids=sub_app_ids, timeout_s=timeout_s, retries=retries,
                      backoff_s=backoff_s, backoff_max_s=backoff_max_s,
                      max_attempts=max_attempts, options=options)


def _check_event_type(t: Table, event_type: str) -> None:
    """A near miss of a known type is a typo that would filter out every event of that type.

    A name far from every known type is allowed (VOD adds types); `check` warns about it.
    """
    if event_type in KNOWN_EVENT_TYPES:
        return
    guess = closest(event_type, KNOWN_EVENT_TYPES)
    if guess is not None:
        t.bad("events", f"{event_type!r} is not a VOD event type (did you mean {guess!r}?): "
                        f"this sink would never receive {guess} events")


def _check_status(t: Table, status: str) -> None:
    if status in PROCEDURE_STATUSES:
        return
    guess = closest(status, PROCEDURE_STATUSES, cutoff=0.6)
    hint = f" (did you mean {guess!r}?)" if guess else ""
    known = " or ".join(map(repr, PROCEDURE_STATUSES))
    t.bad("statuses", f"{status!r} is not a task-flow status{hint}: statuses compares the "
                      f"Status of ProcedureStateChanged events, which is {known} "
                      "(events of other types pass this filter)")
