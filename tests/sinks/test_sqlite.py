"""The sqlite sink, read back with plain SQL: task state, outputs, other events, schema, readers."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procpoll.errors import SinkError
from procpoll.events import parse_callback_body
from procpoll.sinks import build_sink
from procpoll.sinks.sqlite import SCHEMA_VERSION, SqliteOptions, SqliteSink
from tests.sinks.conftest import delivery, load_event, procedure_event, sink_config

TRANSCODE = "ProcedureStateChanged-transcode-coverbysnapshot.json"


class Clock:
    """A settable wall clock for updated_at and received_at."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_sink(path: Path, clock: Clock | None = None) -> SqliteSink:
    """A sqlite sink on `path`."""
    return SqliteSink("db", SqliteOptions(path), now=clock or Clock())


@contextlib.contextmanager
def reader(path: Path) -> Iterator[sqlite3.Connection]:
    """A separate, plain connection, as a user's script or the sqlite3 shell would open."""
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()


def rows(path: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """The result of one query, as dicts."""
    with reader(path) as db:
        return [dict(r) for r in db.execute(sql, params)]


def task(path: Path, task_id: str) -> dict[str, Any]:
    """The procedure_tasks row of `task_id`."""
    [row] = rows(path, "SELECT * FROM procedure_tasks WHERE task_id = ?", task_id)
    return row


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the test's SQLite file goes."""
    return tmp_path / "state" / "vod.sqlite3"


def test_finish_event_fills_the_task_row(db_path: Path) -> None:
    """A FINISH event becomes one procedure_tasks row with the flow's typed columns."""
    event = load_event(TRANSCODE)
    make_sink(db_path).deliver(delivery(event, sub_app_id=1400000001))
    row = task(db_path, "1256768367-Procedure-475b72xxxcb177t1")
    assert json.loads(row.pop("event")) == dict(event.raw)
    assert row == {
        "task_id": "1256768367-Procedure-475b72xxxcb177t1", "file_id": "5285890784246869930",
        "file_name": "Animal World",
        "file_url": "https://1256768367.vod2.myqcloud.com/xxx/xxx/xxx.mp4",
        "status": "FINISH", "err_code": 0, "message": "", "sub_app_id": 1400000001,
        "session_context": None, "session_id": None, "all_succeeded": 1,
        "cover_url": "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx.100_0.jpg",
        "first_seen_at": "2023-11-14T22:13:20.000000Z",
        "updated_at": "2023-11-14T22:13:20.000000Z", "event_key": event.key,
    }


def test_one_output_row_per_subtask(db_path: Path) -> None:
    """Each media-processing sub-task becomes a procedure_outputs row, in result-set order."""
    make_sink(db_path).deliver(delivery(load_event(TRANSCODE)))
    outputs = rows(db_path, "SELECT seq, type, status, definition, url, size, duration, container,"
                            " width, height, bitrate, md5, image_urls FROM procedure_outputs"
                            " ORDER BY seq")
    assert outputs == [
        {"seq": 0, "type": "Transcode", "status": "SUCCESS", "definition": 20,
         "url": "https://1256768367.vod2.myqcloud.com/xxx/xxx/v.f20.mp4", "size": 4189073,
         "duration": 60.04700088501, "container": "mov,mp4,m4a,3gp,3g2,mj2", "width": 640,
         "height": 480, "bitrate": 552218, "md5": "eff7031ad7877865f9a3240e9ab165ad",
         "image_urls": None},
        {"seq": 1, "type": "CoverBySnapshot", "status": "SUCCESS", "definition": 10,
         "url": "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx.100_0.jpg", "size": None,
         "duration": None, "container": None, "width": None, "height": None, "bitrate": None,
         "md5": None, "image_urls": None},
    ]


def test_image_outputs_list_their_urls(db_path: Path) -> None:
    """Snapshot, sample and sprite outputs carry their image URLs as a JSON array."""
    make_sink(db_path).deliver(delivery(
        load_event("ProcedureStateChanged-snapshot-sample-sprite-cover.json")))
    outputs = {r["type"]: r for r in rows(db_path, "SELECT * FROM procedure_outputs")}
    assert len(json.loads(outputs["SnapshotByTimeOffset"]["image_urls"])) == 3
    assert outputs["SnapshotByTimeOffset"]["definition"] == 10
    assert json.loads(outputs["SampleSnapshot"]["image_urls"])[0].endswith("/xxx1.jpg")
    assert outputs["ImageSprites"]["url"].endswith("/xxx.vtt")
    assert json.loads(outputs["ImageSprites"]["output"])["TotalCount"] == 1


def test_failed_subtask_clears_all_succeeded(db_path: Path) -> None:
    """A FINISHed flow with a FAILed sub-task has all_succeeded = 0 and the failure in outputs."""
    event = load_event(TRANSCODE)
    raw = json.loads(event.callback_body())
    raw["ProcedureStateChangeEvent"]["MediaProcessResultSet"][0]["TranscodeTask"].update(
        Status="FAIL", ErrCode=30010, Message="source broken", Output={})
    make_sink(db_path).deliver(delivery(parse_callback_body(raw)))
    assert task(db_path, event.task_id or "")["all_succeeded"] == 0
    assert rows(db_path, "SELECT status, err_code, message, url FROM procedure_outputs "
                         "WHERE seq = 0") == [
        {"status": "FAIL", "err_code": 30010, "message": "source broken", "url": None}]


HUGE = 2**70  # beyond SQLite's signed 64-bit integers


def test_integers_beyond_64_bits_are_stored_not_crashed_on(db_path: Path) -> None:
    """Numbers beyond 64 bits are delivered: JSON keeps them exact, typed columns keep a value.

    sqlite3 cannot bind such an int; it is bound as its decimal text, which SQLite keeps as
    text in a TEXT column and turns into REAL in an INTEGER one (as it does such a literal).
    """
    raw = json.loads(procedure_event("huge", ErrCode=HUGE, FileId=HUGE).callback_body())
    item = raw["ProcedureStateChangeEvent"]["MediaProcessResultSet"][0]["TranscodeTask"]
    item.update(ErrCode=HUGE)
    item["Input"].update(Definition=HUGE)
    item["Output"].update(Size=HUGE, Duration=HUGE, Definition=HUGE, Width=HUGE, Bitrate=HUGE)
    make_sink(db_path).deliver(delivery(parse_callback_body(raw)))
    row = task(db_path, "huge")
    assert (row["file_id"], row["err_code"]) == (str(HUGE), float(HUGE))
    assert json.loads(row["event"]) == raw
    [output] = rows(db_path, "SELECT err_code, definition, size, duration, width, bitrate, output"
                             " FROM procedure_outputs WHERE type = 'Transcode'")
    assert json.loads(output.pop("output"))["Size"] == HUGE
    assert output == dict.fromkeys(
        ("err_code", "definition", "size", "duration", "width", "bitrate"), float(HUGE))


def test_processing_after_finish_does_not_regress(db_path: Path) -> None:
    """A PROCESSING event arriving after the FINISH leaves the FINISH row and its outputs."""
    clock = Clock()
    sink = make_sink(db_path, clock)
    finish = procedure_event("t1", "FINISH")
    sink.deliver(delivery(finish))
    clock.now += 60
    sink.deliver(delivery(procedure_event("t1", "PROCESSING")))
    row = task(db_path, "t1")
    assert (row["status"], row["event_key"]) == ("FINISH", finish.key)
    assert row["updated_at"] == "2023-11-14T22:13:20.000000Z"
    assert [r["status"] for r in rows(db_path, "SELECT status FROM procedure_outputs")] == \
        ["SUCCESS", "SUCCESS"]


def test_finish_after_processing_replaces_it(db_path: Path) -> None:
    """FINISH replaces PROCESSING, outputs included; first_seen_at stays the first arrival."""
    clock = Clock()
    sink = make_sink(db_path, clock)
    sink.deliver(delivery(procedure_event("t1", "PROCESSING")))
    assert [r["status"] for r in rows(db_path, "SELECT status FROM procedure_outputs")] == \
        ["PROCESSING", "PROCESSING"]
    clock.now += 90
    sink.deliver(delivery(procedure_event("t1", "FINISH")))
    row = task(db_path, "t1")
    assert (row["status"], row["all_succeeded"]) == ("FINISH", 1)
    assert (row["first_seen_at"], row["updated_at"]) == \
        ("2023-11-14T22:13:20.000000Z", "2023-11-14T22:14:50.000000Z")
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_outputs WHERE url IS NOT NULL") == \
        [{"n": 2}]


def test_later_finish_wins_over_an_earlier_finish(db_path: Path) -> None:
    """Between two FINISH events of a task the later arrival is kept."""
    sink = make_sink(db_path)
    sink.deliver(delivery(procedure_event("t1", "FINISH", Message="first")))
    sink.deliver(delivery(procedure_event("t1", "FINISH", Message="second")))
    assert task(db_path, "t1")["message"] == "second"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["PROCESSING", "FINISH"]), min_size=1, max_size=6))
def test_any_arrival_order_keeps_the_last_finish(statuses: list[str]) -> None:
    """Whatever the arrival order, the stored state is the last FINISH, else the last PROCESSING."""
    events = [procedure_event("t1", s, Message=f"n{i}") for i, s in enumerate(statuses)]
    finishes = [e for e in events if e.status == "FINISH"]
    expected = (finishes or events)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "db.sqlite3"
        sink = make_sink(path)
        for event in events:
            sink.deliver(delivery(event))
        sink.close()
        assert task(path, "t1")["event_key"] == expected.key
        assert rows(path, "SELECT count(*) AS n FROM procedure_outputs") == [{"n": 2}]


def test_other_event_types_go_to_events(db_path: Path) -> None:
    """Other types are stored whole in `events` with type, key, file and receipt time."""
    sink = make_sink(db_path)
    upload = load_event("NewFileUpload-basic.json")
    deleted = load_event("FileDeleted-basic.json")
    sink.deliver(delivery(upload, sub_app_id=7))
    sink.deliver(delivery(deleted))
    got = rows(db_path, "SELECT event_key, type, sub_app_id, file_id, received_at,"
                        " json_extract(event, '$.EventType') AS json_type"
                        " FROM events ORDER BY type")
    assert got == [
        {"event_key": deleted.key, "type": "FileDeleted", "sub_app_id": 0,
         "file_id": deleted.file_id, "received_at": "2023-11-14T22:13:20.000000Z",
         "json_type": "FileDeleted"},
        {"event_key": upload.key, "type": "NewFileUpload", "sub_app_id": 7,
         "file_id": "5285890784273533167", "received_at": "2023-11-14T22:13:20.000000Z",
         "json_type": "NewFileUpload"},
    ]
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_tasks") == [{"n": 0}]


def test_redelivery_is_idempotent(db_path: Path) -> None:
    """The same event delivered twice leaves one row; `received_at` keeps the first receipt."""
    clock = Clock()
    sink = make_sink(db_path, clock)
    upload = load_event("NewFileUpload-basic.json")
    finish = load_event(TRANSCODE)
    for _ in range(2):
        sink.deliver(delivery(upload))
        sink.deliver(delivery(finish))
        clock.now += 30
    assert rows(db_path, "SELECT received_at FROM events") == \
        [{"received_at": "2023-11-14T22:13:20.000000Z"}]
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_tasks") == [{"n": 1}]
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_outputs") == [{"n": 2}]


def test_procedure_event_without_a_task_id_goes_to_events(db_path: Path) -> None:
    """A ProcedureStateChanged without TaskId cannot be keyed as a task and is kept in `events`."""
    event = parse_callback_body({"EventType": "ProcedureStateChanged",
                        "ProcedureStateChangeEvent": {"Status": "FINISH", "FileId": "f1"}})
    make_sink(db_path).deliver(delivery(event))
    assert rows(db_path, "SELECT type, file_id, status FROM events") == \
        [{"type": "ProcedureStateChanged", "file_id": "f1", "status": "FINISH"}]


def test_schema_is_created_versioned_and_in_wal_mode(db_path: Path) -> None:
    """Opening creates the tables, sets user_version and switches the file to WAL."""
    make_sink(db_path).deliver(delivery(procedure_event()))
    with reader(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"procedure_tasks", "procedure_outputs", "events"}


def test_reopening_keeps_the_rows(db_path: Path) -> None:
    """A new sink on an existing file (a restart) keeps what was stored and adds to it."""
    first = make_sink(db_path)
    first.deliver(delivery(procedure_event("t1")))
    first.close()
    make_sink(db_path).deliver(delivery(procedure_event("t2")))
    assert [r["task_id"] for r in rows(db_path, "SELECT task_id FROM procedure_tasks "
                                                "ORDER BY task_id")] == ["t1", "t2"]


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    """A file written by a newer procpoll is not touched: the delivery fails without retry."""
    db_path.parent.mkdir(parents=True)
    with reader(db_path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(SinkError) as info:
        make_sink(db_path).deliver(delivery(procedure_event()))
    assert not info.value.retryable
    assert "schema version 99 is newer" in info.value.reason


def test_two_sinks_creating_one_file_at_once_both_work(db_path: Path) -> None:
    """Two processes (here: sinks) opening a new file together create the schema once."""
    sinks = [make_sink(db_path) for _ in range(4)]
    barrier = threading.Barrier(len(sinks))
    errors: list[BaseException] = []

    def deliver(n: int) -> None:
        barrier.wait(10)
        try:
            sinks[n].deliver(delivery(procedure_event(f"t{n}")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(len(sinks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_tasks") == [{"n": len(sinks)}]


def test_a_reader_neither_blocks_the_writer_nor_sees_half_a_commit(db_path: Path) -> None:
    """An open read transaction keeps its snapshot while the sink commits beside it."""
    sink = make_sink(db_path)
    sink.deliver(delivery(procedure_event("t0")))
    with reader(db_path) as db:
        db.execute("BEGIN")
        assert db.execute("SELECT count(*) FROM procedure_tasks").fetchone()[0] == 1
        sink.deliver(delivery(procedure_event("t1"), timeout_s=1.0))
        assert db.execute("SELECT count(*) FROM procedure_tasks").fetchone()[0] == 1
        db.execute("COMMIT")
        assert db.execute("SELECT count(*) FROM procedure_tasks").fetchone()[0] == 2


def test_concurrent_readers_always_see_tasks_with_all_their_outputs(db_path: Path) -> None:
    """While the sink writes, every read sees each task together with all of its outputs."""
    sink = make_sink(db_path)
    sink.deliver(delivery(procedure_event("warmup")))
    done = threading.Event()
    torn: list[int] = []

    def read() -> None:
        with reader(db_path) as db:
            while not done.is_set():
                torn.extend(r[0] for r in db.execute(
                    "SELECT count(o.seq) FROM procedure_tasks t LEFT JOIN procedure_outputs o"
                    " USING (task_id) GROUP BY t.task_id HAVING count(o.seq) != 2"))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for n in range(150):
            sink.deliver(delivery(procedure_event(f"t{n}", "PROCESSING" if n % 2 else "FINISH")))
    finally:
        done.set()
        thread.join(10)
    assert torn == []
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_tasks") == [{"n": 151}]


def test_a_locked_database_is_a_retryable_failure(db_path: Path) -> None:
    """If another writer holds the file past the timeout, the delivery fails retryably."""
    sink = make_sink(db_path)
    sink.deliver(delivery(procedure_event("t0")))
    with reader(db_path) as db:
        db.execute("BEGIN IMMEDIATE")
        with pytest.raises(SinkError) as info:
            sink.deliver(delivery(procedure_event("t1"), timeout_s=0.2))
        db.execute("ROLLBACK")
    assert info.value.retryable
    assert "locked" in info.value.reason
    sink.deliver(delivery(procedure_event("t1")))
    assert rows(db_path, "SELECT count(*) AS n FROM procedure_tasks") == [{"n": 2}]


# The three queries of the README, verbatim.
QUERY_OUTPUTS = """
SELECT t.file_id, t.file_name, o.type, o.definition, o.url, o.size
FROM procedure_tasks AS t JOIN procedure_outputs AS o USING (task_id)
WHERE t.status = 'FINISH' AND o.status = 'SUCCESS' AND o.url IS NOT NULL
ORDER BY t.updated_at DESC, o.seq;
"""
QUERY_FAILED = """
SELECT t.task_id, t.file_name, t.err_code, t.message,
       o.type AS failed_step, o.err_code AS step_err_code, o.message AS step_message
FROM procedure_tasks AS t LEFT JOIN procedure_outputs AS o
  ON o.task_id = t.task_id AND o.status = 'FAIL'
WHERE t.status = 'FINISH' AND NOT t.all_succeeded
ORDER BY t.updated_at DESC;
"""
QUERY_STUCK = """
SELECT task_id, file_id, file_name, first_seen_at, updated_at
FROM procedure_tasks
WHERE status = 'PROCESSING'
  AND updated_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')
ORDER BY updated_at;
"""


def test_readme_queries_answer_their_questions(db_path: Path) -> None:
    """The README's three queries list outputs, failed flows and stuck tasks as they claim."""
    clock = Clock()
    sink = make_sink(db_path, clock)
    sink.deliver(delivery(load_event(TRANSCODE)))
    clock.now += 1
    sink.deliver(delivery(procedure_event("stuck", "PROCESSING")))
    clock.now += 1
    broken = json.loads(procedure_event("broken").callback_body())
    broken["ProcedureStateChangeEvent"]["MediaProcessResultSet"][0]["TranscodeTask"].update(
        Status="FAIL", ErrCode=30010, Message="source broken", Output={})
    sink.deliver(delivery(parse_callback_body(broken)))
    outputs = rows(db_path, QUERY_OUTPUTS)
    assert [(r["type"], r["definition"]) for r in outputs] == \
        [("CoverBySnapshot", 10), ("Transcode", 20), ("CoverBySnapshot", 10)]
    assert [(r["task_id"], r["failed_step"], r["step_err_code"]) for r in
            rows(db_path, QUERY_FAILED)] == [("broken", "Transcode", 30010)]
    assert [r["task_id"] for r in rows(db_path, QUERY_STUCK)] == ["stuck"]


def test_config_reads_path() -> None:
    """`path` is read as a Path; it defaults to vod-events.sqlite3."""
    assert sink_config("sqlite", path="/var/lib/procpoll/vod.sqlite3").options == \
        SqliteOptions(Path("/var/lib/procpoll/vod.sqlite3"))
    assert sink_config("sqlite").options == SqliteOptions(Path("vod-events.sqlite3"))


def test_build_sink_makes_a_sqlite_sink(db_path: Path) -> None:
    """The registry builds the sqlite type into a working SqliteSink."""
    sink = build_sink(sink_config("sqlite", path=str(db_path)))
    sink.deliver(delivery(procedure_event()))
    sink.close()
    assert task(db_path, "1256-Procedure-t1")["status"] == "FINISH"
