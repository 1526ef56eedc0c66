"""Bad input from the API: junk replies, broken items, hostile payloads. No crash, bad events
dead-lettered, good events of the same batch delivered."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import Config, parse_config
from procpoll.daemon import Daemon
from procpoll.emulator import Emulator, generate_events
from procpoll.errors import EventParseError
from procpoll.events import event_key, parse_event
from tests.conftest import daemon_config, emulator_env, wait_for
from tests.scripted_api import Answer, ApiCall, ScriptedApi

PAYLOADS = Path(__file__).parent.parent / "data" / "payloads"
SAMPLES = sorted(PAYLOADS.glob("ProcedureStateChanged-*.json"))
WRONG: list[Any] = [None, True, 7, -1.5, "x", [], {}, [None, 1], {"k": [1]}, "9" * 5000]
MEGABYTE = "長" * (1 << 20)
NO_EVENT = {"Response": {"Error": {"Code": "ResourceNotFound", "Message": "no event"},
                         "RequestId": "r-empty"}}
_JSON = "application/json"


def task(task_id: str, **extra: Any) -> dict[str, Any]:
    """A minimal, well-formed ProcedureStateChanged body."""
    return {"EventType": "ProcedureStateChanged",
            "ProcedureStateChangeEvent": {"TaskId": task_id, "Status": "FINISH",
                                          "FileId": "5285890800000000001", **extra}}


def nested(depth: int) -> Any:
    """`depth` levels of arrays around an object."""
    value: Any = {"leaf": 1}
    for _ in range(depth):
        value = [value]
    return value


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every node of a JSON tree with its path, the root included."""
    yield prefix, value
    children = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths(child, (*prefix, key))


def replaced(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of `body` with the node at `path` replaced."""
    copied = copy.deepcopy(body)
    if not path:
        return value if isinstance(value, dict) else {"EventType": "ProcedureStateChanged"}
    node: Any = copied
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copied


def wrong_type_variants(every_value: bool) -> Iterator[dict[str, Any]]:
    """Each sample with one node of its ProcedureStateChangeEvent given a wrong-typed value
    (all of WRONG, or one per node in rotation), each with a TaskId of its own."""
    n = 0
    for sample in SAMPLES:
        body = json.loads(sample.read_text(encoding="utf-8"))
        member = "ProcedureStateChangeEvent"
        for path, value in paths(body[member], (member,)):
            choices = WRONG if every_value else [WRONG[n % len(WRONG)]]
            for wrong in choices:
                if type(wrong) is type(value):
                    continue
                n += 1
                variant = replaced(body, path, wrong)
                task_ = variant.get(member)
                if isinstance(task_, dict) and path != (member, "TaskId"):
                    task_["TaskId"] = f"t-wrong-{n}"
                yield variant


def test_wrong_types_anywhere_in_a_procedure_task_parse_or_raise_event_parse_error() -> None:
    """Every node of every sample ProcedureTask, given every wrong type: an Event or an
    EventParseError, never another exception."""
    outcomes = {"parsed": 0, "rejected": 0}
    for n, body in enumerate(wrong_type_variants(every_value=True)):
        try:
            parse_event({"EventHandle": f"h{n}", **body})
        except EventParseError:
            outcomes["rejected"] += 1
        else:
            outcomes["parsed"] += 1
    assert outcomes["parsed"] > 1000
    assert outcomes["rejected"] > 100


# --- the daemon against the emulator: hostile but valid JSON -------------------------------


@pytest.fixture
def running(run_daemon: Callable[[Config, dict[str, str]], Daemon],
            ) -> Callable[[Config, dict[str, str]], Daemon]:
    """Start Daemon.run in a thread; stopped (exit 0 required) at teardown."""
    return run_daemon


def crashes(log_lines: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Log records of a loop or worker that hit an unexpected exception."""
    return [r for r in log_lines() if r["event"] in {"pull.crashed", "event.crashed",
                                                     "sink.crashed"}]


@pytest.mark.timeout(90)
def test_hostile_events_are_dead_lettered_and_their_batch_mates_delivered(
        tmp_path: Path, emulator: Emulator, log_lines: Callable[[], list[dict[str, Any]]],
        running: Callable[[Config, dict[str, str]], Daemon]) -> None:
    """Wrong types at every level, 1 MB strings, deep nesting, missing or odd EventType, mixed
    with good events in the same batches: all confirmed, each either delivered or set aside."""
    # Distinct notifications only: identical bodies are one event (one key, one file).
    hostile = list({event_key(v): v for v in wrong_type_variants(every_value=False)}.values())
    hostile += [
        {"ProcedureStateChangeEvent": {"TaskId": "no-type"}},
        {"EventType": None, "X": 1},
        {"EventType": ["ProcedureStateChanged"]},
        {"EventType": ""},
        {"EventType": "ProcedureStateChanged", "ProcedureStateChangeEvent": [1, 2]},
        task("t-mega-name", FileName=MEGABYTE),
        task("t-mega-result", MediaProcessResultSet=[{"Type": MEGABYTE}]),
        {"EventType": MEGABYTE[:100_000], "Payload": MEGABYTE},
        task("t-deep-extra", SessionContext=nested(400)),
        {"EventType": "ProcedureStateChanged",
         "ProcedureStateChangeEvent": nested(300)},
        task("t-deep-results", MediaProcessResultSet=nested(350)),
        task("t-nul-bidi", FileName="a\u0000b\u202e"),
    ]
    good = [task(f"t-good-{n}") for n in range(len(hostile) // 3)] + generate_events(50, seed=4)
    good_keys = {event_key(b) for b in good}
    mixed: list[dict[str, Any]] = []
    for n, body in enumerate(hostile):  # good events share batches with the hostile ones
        mixed.append(body)
        if n % 3 == 0 and good:
            mixed.append(good.pop())
    mixed += good
    emulator.enqueue(mixed)
    dead = tmp_path / "dead"
    daemon = running(daemon_config(tmp_path, emulator, [
        {"name": "archive", "type": "file", "path": str(tmp_path / "archive.jsonl"),
         "fsync": False}], dead_letter={"directory": str(dead)}), emulator_env(emulator))
    assert emulator.wait_drained(60), emulator.stats()
    delivered = [event_key(json.loads(line)) for line in
                 (tmp_path / "archive.jsonl").read_text(encoding="utf-8").splitlines()]
    set_aside = list(dead.glob("*.json"))
    assert emulator.stats()["confirmed"] == len(mixed)
    assert len(delivered) + len(set_aside) == len(mixed)
    assert good_keys <= set(delivered)
    assert set_aside, "some variants must be unusable"
    assert crashes(log_lines) == []
    assert all(t.is_alive() for t in daemon._pullers)  # the loops' health


# --- junk replies: a scripted loopback API shapes the HTTP exactly -----------------------------


class ScriptedVod:
    """PullEvents answers from a script, then 'no event'; ConfirmEvents handles recorded."""

    def __init__(self, script: list[tuple[int, str, bytes]]) -> None:
        self.script = deque(script)
        self.confirmed: list[str] = []
        self.pulls = 0
        self._lock = threading.Lock()

    def reply(self, call: ApiCall) -> Answer:
        if call.headers.get("X-TC-Action", "") == "ConfirmEvents":
            with self._lock:
                self.confirmed += call.json()["EventHandles"]
            return Answer(200, _JSON, b'{"Response": {"RequestId": "r-c"}}')
        with self._lock:
            self.pulls += 1
            step = self.script.popleft() if self.script else None
        if step is None:
            time.sleep(0.05)  # the long poll, shortened
            return Answer(200, _JSON, json.dumps(NO_EVENT).encode())
        status, content_type, body_ = step
        return Answer(status, content_type, body_)

    def done(self) -> bool:
        with self._lock:
            return not self.script


def envelope(events: Any) -> bytes:
    return json.dumps({"Response": {"EventSet": events, "RequestId": "r-1"}},
                      ensure_ascii=False).encode()


JUNK_REPLIES: list[tuple[str, tuple[int, str, bytes]]] = [
    ("html page", (200, "text/html", b"<html><body>502 Bad Gateway</body></html>")),
    ("not JSON", (200, _JSON, b"this is not json")),
    ("empty body", (200, _JSON, b"")),
    ("JSON without Response", (200, _JSON, b'{"Result": {"EventSet": []}}')),
    ("JSON list", (200, _JSON, b"[1, 2, 3]")),
    ("Response a string", (200, _JSON, b'{"Response": "ok"}')),
    ("Response null", (200, _JSON, b'{"Response": null}')),
    # An Error that is not an object is no error: the reply reads as an empty EventSet.
    ("Error a string", (200, _JSON, b'{"Response": {"Error": "boom", "RequestId": "r"}}')),
    ("Error without Message", (200, _JSON, b'{"Response": {"Error": {"Code": 5}}}')),
    ("EventSet a string", (200, _JSON, envelope("events"))),
    ("EventSet an object", (200, _JSON, envelope({"EventHandle": "h"}))),
    ("EventSet a number", (200, _JSON, envelope(16))),
    ("invalid UTF-8", (200, _JSON, b'{"Response": {"EventSet": [{"EventHandle": "h-utf8", '
                                   b'"EventType": "\xff\xfe\xc3"}], "RequestId": "r"}}')),
    ("nesting past the parser's limit", (200, _JSON, b'{"Response": ' + b"[" * 100_000
                                         + b"]" * 100_000 + b"}")),
    ("1 MB error message", (200, _JSON, json.dumps({"Response": {"Error": {
        "Code": "InternalError", "Message": MEGABYTE}, "RequestId": "r"}}).encode())),
    ("HTTP 500 with JSON", (500, _JSON, json.dumps(NO_EVENT).encode())),
]


@pytest.mark.timeout(60)
def test_junk_replies_are_retried_and_a_mixed_batch_is_sorted_out(
        tmp_path: Path, log_lines: Callable[[], list[dict[str, Any]]],
        running: Callable[[Config, dict[str, str]], Daemon]) -> None:
    """Every junk reply is a retried pull error (no crash, the loops live); then, in one batch,
    good events are delivered, items with a handle but no usable event are dead-lettered and
    confirmed, items without a handle are logged and left."""
    good = [{"EventHandle": f"good-{n}", **task(f"t-ok-{n}")} for n in range(3)]
    broken = [
        {"EventHandle": "bad-no-type", "ProcedureStateChangeEvent": {"TaskId": "x"}},
        {"EventHandle": "bad-type-int", "EventType": 7},
        {"EventHandle": "bad-task-list", "EventType": "ProcedureStateChanged",
         "ProcedureStateChangeEvent": ["TaskId"]},
        {"EventHandle": "bad-results", **task("t-r", MediaProcessResultSet="all done")},
    ]
    handleless = [{"EventType": "ProcedureStateChanged"}, {"EventHandle": 12, "EventType": "X"},
                  {"EventHandle": "", "EventType": "X"}, "a string", 42, None, []]
    batch = [good[0], *broken[:2], handleless[0], good[1], *broken[2:], *handleless[1:], good[2]]
    script: list[tuple[int, str, bytes]] = []
    for _name, junk in JUNK_REPLIES:  # each junk reply, then a normal empty answer
        script += [junk, (200, _JSON, json.dumps(NO_EVENT).encode())]
    script.append((200, _JSON, envelope(batch)))
    api = ScriptedVod(script)
    server = ScriptedApi(api.reply)
    config = parse_config({
        "vod": {"endpoint": server.endpoint, "scheme": "http", "request_timeout": 6},
        "ledger": {"path": str(tmp_path / "ledger.sqlite3")},
        "dead_letter": {"directory": str(tmp_path / "dead")},
        "sinks": [{"name": "archive", "type": "file", "path": str(tmp_path / "a.jsonl")}],
    }, "<bad-input>")
    try:
        daemon = running(config, {"TENCENTCLOUD_SECRET_ID": "AKIDbadinput",
                                  "TENCENTCLOUD_SECRET_KEY": "bad-input-key"})
        assert wait_for(api.done, 40), f"stuck with {len(api.script)} replies left"
        wanted = {"good-0", "good-1", "good-2", *(b["EventHandle"] for b in broken)}
        assert wait_for(lambda: wanted <= set(api.confirmed), 10), api.confirmed
        assert all(t.is_alive() for t in daemon._pullers)
        daemon.stop()
    finally:
        server.close()
    records = log_lines()
    assert crashes(log_lines) == []
    failures = [r for r in records if r["event"] == "api.pull_failed"]
    assert len(failures) >= len(JUNK_REPLIES) - 1  # all but "Error a string"
    assert sorted(api.confirmed) == sorted(wanted)
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(x)["ProcedureStateChangeEvent"]["TaskId"] for x in lines) == [
        "t-ok-0", "t-ok-1", "t-ok-2"]
    assert len(list((tmp_path / "dead").glob("*.unparsed.json"))) == len(broken)
    left = [r for r in records if r["event"] == "event.unparseable"]
    assert len(left) == len(handleless)
