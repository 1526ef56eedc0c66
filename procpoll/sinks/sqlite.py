"""The sqlite sink: task-flow state and every other event in SQL tables, for reading with SQL.

`procedure_tasks` holds one row per task flow, upserted so that a FINISH never goes
back to PROCESSING when events arrive out of order; `procedure_outputs` holds one row
per media-processing sub-task of the stored state; `events` holds every other event.
The file is in WAL mode, so readers never block the daemon and always see whole commits.
Valid JSON never fails a delivery: an integer beyond SQLite's 64 bits is bound as its
decimal text (SQLite keeps it as REAL in an INTEGER column); the stored JSON is exact.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from procpoll.errors import SinkError
from procpoll.events import Event
from procpoll.procedure import (
    AdaptiveDynamicStreamingInfoItem,
    CoverBySnapshotTaskOutput,
    MediaAnimatedGraphicsItem,
    MediaImageSpriteItem,
    MediaProcessTaskResult,
    MediaSampleSnapshotItem,
    MediaSnapshotByTimeOffsetItem,
    MediaTranscodeItem,
    ProcedureTask,
)
from procpoll.schema import Table
from procpoll.sinks.base import Delivery, Sink, SinkConfig, SinkType

SCHEMA_VERSION = 1

# Each entry takes the schema from version i to i + 1, inside one transaction.
_MIGRATIONS = (
    """
    CREATE TABLE procedure_tasks (
        task_id         TEXT PRIMARY KEY,
        file_id         TEXT,
        file_name       TEXT,
        file_url        TEXT,
        status          TEXT,
        err_code        INTEGER,
        message         TEXT,
        sub_app_id      INTEGER NOT NULL,
        session_context TEXT,
        session_id      TEXT,
        all_succeeded   INTEGER NOT NULL,
        cover_url       TEXT,
        first_seen_at   TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        event_key       TEXT NOT NULL,
        event           TEXT NOT NULL
    );
    CREATE INDEX procedure_tasks_file_id ON procedure_tasks (file_id);
    CREATE INDEX procedure_tasks_status ON procedure_tasks (status, updated_at);
    CREATE TABLE procedure_outputs (
        task_id     TEXT NOT NULL REFERENCES procedure_tasks (task_id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        type        TEXT,
        status      TEXT,
        err_code    INTEGER,
        message     TEXT,
        definition  INTEGER,
        url         TEXT,
        size        INTEGER,
        duration    REAL,
        container   TEXT,
        width       INTEGER,
        height      INTEGER,
        bitrate     INTEGER,
        md5         TEXT,
        image_urls  TEXT,
        output      TEXT,
        PRIMARY KEY (task_id, seq)
    );
    CREATE TABLE events (
        event_key   TEXT PRIMARY KEY,
        type        TEXT NOT NULL,
        sub_app_id  INTEGER NOT NULL,
        task_id     TEXT,
        file_id     TEXT,
        status      TEXT,
        received_at TEXT NOT NULL,
        event       TEXT NOT NULL
    );
    CREATE INDEX events_type ON events (type, received_at);
    CREATE INDEX events_file_id ON events (file_id);
    """,
)

# A stored FINISH is only replaced by another FINISH; anything else is replaced by any
# later arrival. `excluded` is the incoming row.
_UPSERT_TASK = """
INSERT INTO procedure_tasks (task_id, file_id, file_name, file_url, status, err_code, message,
    sub_app_id, session_context, session_id, all_succeeded, cover_url, first_seen_at,
    updated_at, event_key, event)
VALUES (:task_id, :file_id, :file_name, :file_url, :status, :err_code, :message, :sub_app_id,
    :session_context, :session_id, :all_succeeded, :cover_url, :now, :now, :event_key, :event)
ON CONFLICT (task_id) DO UPDATE SET
    file_id = excluded.file_id, file_name = excluded.file_name, file_url = excluded.file_url,
    status = excluded.status, err_code = excluded.err_code, message = excluded.message,
    sub_app_id = excluded.sub_app_id, session_context = excluded.session_context,
    session_id = excluded.session_id, all_succeeded = excluded.all_succeeded,
    cover_url = excluded.cover_url, updated_at = excluded.updated_at,
    event_key = excluded.event_key, event = excluded.event
WHERE procedure_tasks.status IS NOT 'FINISH' OR excluded.status IS 'FINISH'
"""

_INSERT_OUTPUT = """
INSERT INTO procedure_outputs (task_id, seq, type, status, err_code, message, definition, url,
    size, duration, container, width, height, bitrate, md5, image_urls, output)
VALUES (:task_id, :seq, :type, :status, :err_code, :message, :definition, :url, :size,
    :duration, :container, :width, :height, :bitrate, :md5, :image_urls, :output)
"""

_INSERT_EVENT = """
INSERT INTO events (event_key, type, sub_app_id, task_id, file_id, status, received_at, event)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (event_key) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class SqliteOptions:
    """[[sinks]] keys of type "sqlite"."""

    path: Path


def parse_options(t: Table) -> SqliteOptions:
    """Read the sqlite sink's own key: `path`."""
    return SqliteOptions(path=t.file_path("path", Path("vod-events.sqlite3")))


def _iso(ts: float) -> str:
    """UTC ISO-8601 with microseconds and Z: sorts as text, parses in SQLite and jq."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SQL_INT_MIN = -(2**63)
_SQL_INT_MAX = 2**63 - 1


def bindable(row: dict[str, object]) -> dict[str, object]:
    """`row`, changed in place: integers sqlite3 cannot bind (beyond 64 bits) become text.

    JSON integers have no bound, and sqlite3 raises OverflowError on such an int.
    """
    for column, value in row.items():
        if isinstance(value, int) and not _SQL_INT_MIN <= value <= _SQL_INT_MAX:
            row[column] = str(value)
    return row


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def task_row(task: ProcedureTask, event: Event, sub_app_id: int | None) -> dict[str, object]:
    """The procedure_tasks columns of one ProcedureStateChanged event (without times)."""
    return bindable({
        "task_id": task.task_id, "file_id": task.file_id, "file_name": task.file_name,
        "file_url": task.file_url, "status": task.status, "err_code": task.err_code,
        "message": task.message, "sub_app_id": sub_app_id or 0,
        "session_context": task.session_context, "session_id": task.session_id,
        "all_succeeded": int(task.all_succeeded), "cover_url": task.cover_url,
        "event_key": event.key, "event": event.callback_body().decode(),
    })


def output_rows(task_id: str,
                results: tuple[MediaProcessTaskResult, ...]) -> Iterator[dict[str, object]]:
    """One procedure_outputs row per media-processing sub-task, in MediaProcessResultSet order."""
    for seq, result in enumerate(results):
        row: dict[str, object] = dict.fromkeys(
            ("status", "err_code", "message", "definition", "url", "size", "duration",
             "container", "width", "height", "bitrate", "md5", "image_urls", "output"))
        row.update(task_id=task_id, seq=seq, type=result.kind or result.type)
        sub = result.task
        if sub is not None:
            row.update(status=sub.status, err_code=sub.err_code, message=sub.message,
                       definition=sub.input.definition if sub.input else None)
            if sub.output is not None:
                row.update(_output_columns(sub.output))
                row["output"] = _json(sub.output.raw)
                if row["definition"] is None:
                    row["definition"] = getattr(sub.output, "definition", None)
        yield bindable(row)


def _output_columns(out: object) -> dict[str, object]:
    """The columns a sub-task's typed Output fills; the rest stays in the `output` JSON."""
    match out:
        case MediaTranscodeItem() | MediaAnimatedGraphicsItem():
            cols: dict[str, object] = {
                "url": out.url, "size": out.size, "container": out.container,
                "width": out.width, "height": out.height, "bitrate": out.bitrate, "md5": out.md5}
            if isinstance(out, MediaTranscodeItem):
                cols["duration"] = out.duration
            return cols
        case AdaptiveDynamicStreamingInfoItem():
            return {"url": out.url, "size": out.size, "container": out.package}
        case CoverBySnapshotTaskOutput():
            return {"url": out.cover_url}
        case MediaImageSpriteItem():
            return {"url": out.web_vtt_url, "width": out.width, "height": out.height,
                    "image_urls": _json(out.image_urls)}
        case MediaSampleSnapshotItem():
            urls = out.image_urls or tuple(p.url for p in out.pic_infos if p.url)
            return {"image_urls": _json(urls)}
        case MediaSnapshotByTimeOffsetItem():
            return {"image_urls": _json([p.url for p in out.pic_infos if p.url])}
    return {}


class SqliteSink:
    """Writes task state and events to one SQLite file, one commit per delivery."""

    def __init__(self, name: str, options: SqliteOptions,
                 now: Callable[[], float] = time.time) -> None:
        self.name = name
        self._options = options
        self._now = now
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._busy_ms = -1

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        path = self._options.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                 timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            raise SinkError(f"{path}: cannot open: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            _migrate(db, path)
        except sqlite3.Error as exc:
            db.close()
            raise SinkError(f"{path}: cannot prepare the schema: {exc}") from exc
        except SinkError:
            db.close()
            raise
        self._db = db
        return db

    def deliver(self, delivery: Delivery) -> None:
        """Upsert the event's rows and commit before returning."""
        with self._lock:
            db = self._open()
            try:
                busy_ms = int(delivery.timeout_s * 1000)
                if busy_ms != self._busy_ms:
                    db.execute(f"PRAGMA busy_timeout={busy_ms}")
                    self._busy_ms = busy_ms
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._write(db, delivery, _iso(self._now()))
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise SinkError(f"{self._options.path}: {exc}",
                                retryable=not isinstance(exc, sqlite3.IntegrityError)) from exc

    def _write(self, db: sqlite3.Connection, delivery: Delivery, now: str) -> None:
        event, sub_app_id = delivery.event, delivery.sub_app_id
        task = event.body
        if task is None or not task.task_id:
            # Keyed by the delivery id: a second notification with an identical body (a
            # file restored twice) is its own row, a redelivery is not.
            db.execute(_INSERT_EVENT, (delivery.identity, event.event_type, sub_app_id or 0,
                                       event.task_id, event.file_id, event.status, now,
                                       event.callback_body().decode()))
            return
        cursor = db.execute(_UPSERT_TASK, {**task_row(task, event, sub_app_id), "now": now})
        if cursor.rowcount == 0:
            return  # a FINISH is stored and this is not one: keep it and its outputs
        db.execute("DELETE FROM procedure_outputs WHERE task_id = ?", (task.task_id,))
        db.executemany(_INSERT_OUTPUT, output_rows(task.task_id, task.media_process_results))

    def close(self) -> None:
        """Close the connection (a later delivery reopens it)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
                self._busy_ms = -1


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the file to SCHEMA_VERSION in one transaction; refuse a newer file.

    The version is read inside the write transaction, so two processes opening a new
    file at once do not both create the tables.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SinkError(f"{path}: schema version {version} is newer than this procpoll "
                            f"understands ({SCHEMA_VERSION})", retryable=False)
        # executescript would commit on its own: run the statements one by one instead.
        for script in _MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")


def build(config: SinkConfig) -> Sink:
    """Build a SqliteSink from its config."""
    assert isinstance(config.options, SqliteOptions)  # noqa: S101 -- the registry guarantees it
    return SqliteSink(config.name, config.options)


TYPE = SinkType(parse_options=parse_options, build=build)
