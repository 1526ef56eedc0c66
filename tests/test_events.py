"""Tests for procpoll.events: pulled items become Events with stable keys and exact bodies."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procpoll.errors import EventParseError
from procpoll.events import Event, event_key, parse_callback_body, parse_event

DATA = Path(__file__).parent / "data"
PAYLOADS = DATA / "payloads"
NOT_AN_EVENT = {"ConfirmEvents-response.json"}
WITHOUT_EVENT_TYPE = "PullEvents-response-ComposeMediaComplete-no-EventType.json"
EVENT_FILES = sorted(
    p.name for p in PAYLOADS.glob("*.json") if p.name not in NOT_AN_EVENT | {WITHOUT_EVENT_TYPE}
)


def load(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text(encoding="utf-8"))


def body_event(name: str) -> Event:
    return parse_callback_body(load(name), handle="h")


def procedure_item(handle: str = "h1", status: str = "FINISH") -> dict[str, Any]:
    item = load("PullEvents-response-ProcedureStateChanged.json")["Response"]["EventSet"][0]
    item["EventHandle"] = handle
    item["ProcedureStateChangeEvent"]["Status"] = status
    return dict(item)


@pytest.mark.parametrize("name", EVENT_FILES)
def test_every_payload_sample_parses(name: str) -> None:
    """Each official sample parses, orders by task or file, and is left untouched."""
    doc = load(name)
    before = copy.deepcopy(doc)
    if "Response" in doc:
        items = doc["Response"]["EventSet"]
        events = [parse_event(item) for item in items]
        for event, item in zip(events, items, strict=True):
            assert event.handle == item["EventHandle"]
            assert event.raw == {k: v for k, v in item.items() if k != "EventHandle"}
    else:
        events = [parse_callback_body(doc)]
        assert events[0].raw == doc
    assert events
    for event in events:
        assert event.event_type == event.raw["EventType"]
        assert re.fullmatch(r"[0-9a-f]{32}", event.key)
        assert (event.body is not None) == (event.event_type == "ProcedureStateChanged")
        assert not event.ordering_key.startswith("key:")
    assert doc == before


def test_markdown_callback_samples_parse() -> None:
    """Both JSON samples of the ProcedureStateChanged doc parse to the same cover and task."""
    text = (DATA / "procedure-state-changed-callback.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", text, re.DOTALL)]
    assert len(blocks) == 2
    pushed = parse_callback_body(blocks[0])
    pulled = parse_event(blocks[1]["Response"]["EventSet"][0])
    assert pulled.handle == "EventHandleX"
    assert pushed.body is not None
    assert pulled.body is not None
    cover = "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx.100_0.jpg"
    assert pushed.body.cover_url == pulled.body.cover_url == cover
    assert pushed.task_id == pulled.task_id == "1256768367-Procedure-475b72xxxcb177t1"


def test_item_without_event_type_is_rejected() -> None:
    """The published ComposeMediaComplete item lacking EventType is refused, naming EventType."""
    item = load(WITHOUT_EVENT_TYPE)["Response"]["EventSet"][0]
    with pytest.raises(EventParseError) as err:
        parse_event(item)
    assert err.value.path == "EventType"


@pytest.mark.parametrize("item", [None, [], "EventHandle", 7, 1.5, True])
def test_non_object_item_is_rejected(item: object) -> None:
    """An EventSet item that is not a JSON object is a parse error at the root."""
    with pytest.raises(EventParseError) as err:
        parse_event(item)
    assert err.value.path == "$"


@pytest.mark.parametrize("handle", ["", 7, None, ["h"], {"h": 1}, "<missing>"])
def test_bad_handle_is_rejected(handle: object) -> None:
    """EventHandle must be present and a non-empty string."""
    item: dict[str, object] = {"EventType": "NewFileUpload", "FileUploadEvent": {"FileId": "1"}}
    if handle != "<missing>":
        item["EventHandle"] = handle
    with pytest.raises(EventParseError) as err:
        parse_event(item)
    assert err.value.path == "EventHandle"


@pytest.mark.parametrize("event_type", ["", 3, None, {"x": 1}, ["NewFileUpload"], "<missing>"])
def test_bad_event_type_is_rejected(event_type: object) -> None:
    """EventType must be present and a non-empty string."""
    item: dict[str, object] = {"EventHandle": "h"}
    if event_type != "<missing>":
        item["EventType"] = event_type
    with pytest.raises(EventParseError) as err:
        parse_event(item)
    assert err.value.path == "EventType"


def test_raw_is_the_item_without_handle_in_its_order() -> None:
    """raw drops EventHandle wherever it sits, keeps the other members' order, copies the item."""
    item = {"EventType": "X", "EventHandle": "h", "B": 1, "A": {"z": 1, "y": 2}}
    event = parse_event(item)
    assert list(event.raw) == ["EventType", "B", "A"]
    assert json.dumps(event.raw) == json.dumps({"EventType": "X", "B": 1, "A": {"z": 1, "y": 2}})
    assert "EventHandle" in item


def test_unknown_event_type_passes_through() -> None:
    """A type procpoll has never heard of is an Event with no typed body."""
    item = {
        "EventHandle": "h",
        "EventType": "HologramComplete",
        "HologramCompleteEvent": {"TaskId": "t-9", "Status": "FINISH", "FileId": "42"},
        "Extra": [1, {"deep": None}],
    }
    event = parse_event(item)
    assert event.body is None
    assert (event.task_id, event.status, event.file_id) == ("t-9", "FINISH", "42")
    assert event.raw["Extra"] == [1, {"deep": None}]


@pytest.mark.parametrize("payload", [None, {}, "<missing>"])
def test_procedure_event_without_payload_has_no_body(payload: object) -> None:
    """A ProcedureStateChanged item whose payload is null, {} or absent still parses."""
    item: dict[str, object] = {"EventHandle": "h", "EventType": "ProcedureStateChanged"}
    if payload != "<missing>":
        item["ProcedureStateChangeEvent"] = payload
    event = parse_event(item)
    assert event.body is None
    assert event.ordering_key == f"key:{event.key}"


@pytest.mark.parametrize("payload", ["x", 5, [1], True])
def test_procedure_payload_of_wrong_type_is_rejected(payload: object) -> None:
    """A ProcedureStateChangeEvent that is not an object is an error naming that member."""
    item = {"EventHandle": "h", "EventType": "ProcedureStateChanged"}
    with pytest.raises(EventParseError) as err:
        parse_event({**item, "ProcedureStateChangeEvent": payload})
    assert err.value.path == "ProcedureStateChangeEvent"


def test_nested_wrong_type_is_rejected_with_its_path() -> None:
    """A sub-task output of the wrong type is reported with its full JSON path."""
    item = procedure_item()
    item["ProcedureStateChangeEvent"]["MediaProcessResultSet"][0]["TranscodeTask"]["Output"] = "x"
    with pytest.raises(EventParseError) as err:
        parse_event(item)
    path = "ProcedureStateChangeEvent.MediaProcessResultSet[0].TranscodeTask.Output"
    assert err.value.path == path


def test_other_types_do_not_type_a_stray_procedure_member() -> None:
    """Only ProcedureStateChanged reads ProcedureStateChangeEvent; others keep it raw."""
    item = {"EventHandle": "h", "EventType": "NewFileUpload", "ProcedureStateChangeEvent": "junk"}
    assert parse_event(item).body is None


def test_key_ignores_the_handle() -> None:
    """A redelivery (same notification, new handle) has the same key."""
    assert parse_event(procedure_item("h1")).key == parse_event(procedure_item("h2")).key


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.update(Status="PROCESSING"),
        lambda t: t["MediaProcessResultSet"][0]["TranscodeTask"].update(Progress=50),
    ],
    ids=["status", "progress"],
)
def test_key_changes_with_the_notification(change: Any) -> None:
    """Two notifications that differ in anything have different keys."""
    item = procedure_item()
    changed = copy.deepcopy(item)
    change(changed["ProcedureStateChangeEvent"])
    assert parse_event(item).key != parse_event(changed).key


def test_key_ignores_member_order() -> None:
    """Reordering members (at any depth) changes the body bytes but not the key."""
    raw = {"EventType": "X", "XEvent": {"A": 1, "B": [{"c": 1, "d": 2}]}}
    reordered = {"XEvent": {"B": [{"d": 2, "c": 1}], "A": 1}, "EventType": "X"}
    assert event_key(raw) == event_key(reordered)
    body = parse_callback_body(raw).callback_body()
    assert body != parse_callback_body(reordered).callback_body()


def test_key_is_a_truncated_sha256_of_canonical_json() -> None:
    """The key is 32 hex characters of sha256 over sorted, compact, UTF-8 JSON."""
    raw = {"b": "动物", "a": 1}
    canonical = '{"a":1,"b":"动物"}'.encode()
    assert event_key(raw) == hashlib.sha256(canonical).hexdigest()[:32]


def test_callback_body_round_trips_in_order() -> None:
    """callback_body is raw as compact UTF-8 JSON, member order kept, non-ASCII unescaped."""
    event = body_event("ProcedureStateChanged-adaptivedynamicstreaming-drm.json")
    body = event.callback_body()
    assert json.loads(body) == event.raw
    assert list(json.loads(body)) == list(event.raw)
    assert body == json.dumps(event.raw, ensure_ascii=False, separators=(",", ":")).encode()
    assert "动物世界".encode() in body


def test_callback_body_is_computed_once() -> None:
    """Repeated calls return the very same bytes object."""
    event = body_event("NewFileUpload-basic.json")
    assert event.callback_body() is event.callback_body()


def test_bare_integer_file_id_is_exact() -> None:
    """A FileId sent as a JSON number > 2**53 reads as its exact digits; raw keeps the int."""
    event = body_event("ComposeMediaComplete-basic.json")
    assert event.file_id == "5285485487985271490"
    assert event.raw["ComposeMediaCompleteEvent"]["Output"]["FileId"] == 5285485487985271490
    assert b'"FileId":5285485487985271490' in event.callback_body()


def test_integer_status_reads_as_text() -> None:
    """RestoreMediaComplete's Status 0 reads as "0"."""
    assert body_event("RestoreMediaComplete.json").status == "0"


def test_lowercase_draft_members_are_found() -> None:
    """The draft RestoreMedia payload with camelCase members still yields file and status."""
    event = body_event("RestoreMediaComplete-draft-lowercase-keys.json")
    assert (event.file_id, event.status) == ("5285890784273533167", "0")


def test_file_deleted_uses_the_first_file_id() -> None:
    """FileDeleted has only FileIdSet: its first id is the event's file."""
    event = body_event("FileDeleted-basic.json")
    assert event.file_id == "24961954183381008"
    assert event.ordering_key == "file:24961954183381008"


def test_payload_member_without_event_suffix_is_found() -> None:
    """WechatPublishComplete's payload member has no "Event" suffix; its TaskId is found."""
    event = body_event("WechatPublishComplete.json")
    assert event.task_id == "Wechat-f5ac8127b3b6b85cdc13f237c6005d8"
    assert event.ordering_key == "task:Wechat-f5ac8127b3b6b85cdc13f237c6005d8"


def test_ordering_key_prefers_task_then_file_then_key() -> None:
    """ordering_key is the task when known, else the file, else the event itself."""
    flow = parse_event(procedure_item())
    assert flow.ordering_key == "task:1256768367-Procedure-475b72xxxcb177t1"
    upload = body_event("NewFileUpload-basic.json")
    assert (upload.task_id, upload.ordering_key) == (None, "file:5285890784273533167")
    bare = parse_callback_body({"EventType": "X", "XEvent": {"TaskId": ""}})
    assert bare.ordering_key == f"key:{bare.key}"


def test_deeply_nested_junk_is_a_parse_error() -> None:
    """100,000 nested lists in an unknown member fail as EventParseError, not a crash."""
    junk: list[Any] = []
    for _ in range(100_000):
        junk = [junk]
    with pytest.raises(EventParseError) as err:
        parse_event({"EventHandle": "h", "EventType": "X", "Junk": junk})
    assert err.value.path == "$"


@pytest.mark.parametrize(
    "value", [{1, 2}, b"bytes", json.loads('"\\ud800"')], ids=["set", "bytes", "lone-surrogate"]
)
def test_unencodable_values_are_parse_errors(value: object) -> None:
    """Values that cannot become a UTF-8 JSON body are EventParseError at the root."""
    with pytest.raises(EventParseError) as err:
        parse_event({"EventHandle": "h", "EventType": "X", "Junk": value})
    assert err.value.path == "$"


def test_megabyte_strings_are_fine() -> None:
    """1 MB strings in known and unknown members parse and forward intact."""
    big = "動" * 1_000_000
    item = procedure_item()
    item["ProcedureStateChangeEvent"]["FileName"] = big
    item["Blob"] = big
    event = parse_event(item)
    assert event.body is not None
    assert event.body.file_name == big
    assert len(event.callback_body()) > 6_000_000


@pytest.mark.parametrize("body", [None, [], "x", 3])
def test_callback_body_must_be_an_object(body: Any) -> None:
    """parse_callback_body refuses anything but a JSON object."""
    with pytest.raises(EventParseError) as err:
        parse_callback_body(body)
    assert err.value.path == "$"


# --- property: any JSON-like value parses or is refused with EventParseError -----------------

NAMES = st.sampled_from(
    [
        "EventHandle", "EventType", "ProcedureStateChangeEvent", "FileUploadEvent", "Type",
        "TaskId", "FileId", "FileIdSet", "Status", "ErrCode", "ErrCodeExt", "Message", "Input",
        "Output", "MetaData", "VideoStreamSet", "DynamicRangeInfo", "PicInfoSet", "ImageUrlSet",
        "WaterMarkDefinition", "CoverUrl", "Definition", "Url", "SubStreamSet",
    ]
) | st.text("abcEé动", max_size=6)  # fmt: skip
WORDS = st.sampled_from(
    [
        "ProcedureStateChanged", "Transcode", "ImageSprite", "ImageSprites", "CoverBySnapshot",
        "SampleSnapshot", "SnapshotByTimeOffset", "AnimatedGraphics", "AdaptiveDynamicStreaming",
        "Porn", "SUCCESS", "FAIL", "PROCESSING", "FINISH", "1080", "",
    ]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**53, max_value=2**80)
    | st.floats()
    | st.text(max_size=10)
    | WORDS
)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(NAMES, kids, max_size=5),
    max_leaves=6,
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good`, except one time in eight any JSON junk."""
    return st.integers(0, 7).flatmap(lambda n: JSON if n == 0 else good)


def objects(
    required: dict[str, st.SearchStrategy[Any]] | None = None, **optional: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the `required` members, any subset of `optional` ones, and junk members."""
    known = st.fixed_dictionaries(
        {k: mostly(v) for k, v in (required or {}).items()},
        optional={k: mostly(v) for k, v in optional.items()},
    )
    junk = st.dictionaries(NAMES, JSON, max_size=1)
    return st.builds(lambda extra, fields: {**extra, **fields}, junk, known)


OUTPUT = objects(
    VideoStreamSet=st.lists(objects(DynamicRangeInfo=objects(Type=WORDS)), max_size=2),
    PicInfoSet=st.lists(objects(Url=st.text(max_size=5)), max_size=2),
    ImageUrlSet=st.lists(SCALARS, max_size=2),
    CoverUrl=st.text(max_size=5),
    Url=st.text(max_size=5),
)
SUBTASK = objects(
    {"Status": WORDS, "Output": OUTPUT}, ErrCode=SCALARS, ErrCodeExt=WORDS, Input=objects()
)
MEDIA_MEMBERS = [
    ("Transcode", "TranscodeTask"),
    ("ImageSprite", "ImageSpriteTask"),
    ("CoverBySnapshot", "CoverBySnapshotTask"),
    ("SnapshotByTimeOffset", "SnapshotByTimeOffsetTask"),
    ("Unheard", "UnheardTask"),
]
MEDIA_RESULT = st.sampled_from(MEDIA_MEMBERS).flatmap(
    lambda tm: objects({"Type": st.just(tm[0]), tm[1]: SUBTASK})
)
TASK = objects(
    {"Status": WORDS, "MediaProcessResultSet": st.lists(MEDIA_RESULT, min_size=1, max_size=2)},
    TaskId=st.text(max_size=5),
    FileId=SCALARS,
    MetaData=objects(VideoStreamSet=st.lists(objects(), max_size=2)),
    AiContentReviewResultSet=st.lists(objects({"Type": WORDS, "PornTask": SUBTASK}), max_size=2),
)
PSC = "ProcedureStateChanged"
ENVELOPE = objects(
    {
        "EventHandle": st.text(min_size=1, max_size=5),
        "EventType": st.sampled_from([PSC, PSC, PSC, "NewFileUpload", "X"]),
        "ProcedureStateChangeEvent": TASK,
    },
    FileUploadEvent=objects(FileId=SCALARS, TaskId=SCALARS),
)
ITEMS = mostly(ENVELOPE)


@settings(max_examples=300, deadline=None, database=None)
@given(ITEMS)
def test_any_json_parses_or_raises_event_parse_error(item: Any) -> None:
    """parse_event returns an Event or raises EventParseError, and raw round-trips exactly."""
    before = json.dumps(item)
    try:
        event = parse_event(item)
    except EventParseError as err:
        assert isinstance(err.path, str)
        assert json.dumps(item) == before
        return
    expected = {k: v for k, v in item.items() if k != "EventHandle"}
    assert json.dumps(event.raw) == json.dumps(expected)
    assert json.dumps(item) == before
    assert event.ordering_key
    assert isinstance(event.callback_body(), bytes)
    for value in (event.task_id, event.file_id, event.status):
        assert value is None or isinstance(value, str)
    if event.body is not None:
        assert isinstance(event.body.all_succeeded, bool)
        assert isinstance(event.body.failed_subtasks, list)
        assert event.body.cover_url is None or isinstance(event.body.cover_url, str)
        assert isinstance(event.body.outputs("Transcode"), list)


def test_null_members_hash_as_missing_ones() -> None:
    """A redelivery whose body has a new null member (VOD sometimes sends null, sometimes
    omits the member) keeps its key: it must not look like a new notification."""
    plain = {"EventType": "FileDeleted",
             "FileDeleteEvent": {"FileIdSet": ["528589"], "FileDeleteResultInfo": []}}
    with_nulls = {"EventType": "FileDeleted", "NewMember": None,
                  "FileDeleteEvent": {"FileIdSet": ["528589"], "FileDeleteResultInfo": [],
                                      "Extra": None}}
    assert event_key(with_nulls) == event_key(plain)
    # Nulls inside lists are positions, not members: they still count.
    assert event_key({"EventType": "X", "L": [None]}) != event_key({"EventType": "X", "L": []})
    # A null that is the only difference between two real values still differs from a value.
    assert event_key({"EventType": "X", "A": None}) != event_key({"EventType": "X", "A": 0})
