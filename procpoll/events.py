"""Event: one pulled notification (handle, type, raw payload, typed body), its key, and parsing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from procpoll.errors import EventParseError
from procpoll.jsonread import as_text
from procpoll.procedure import ProcedureTask, parse_procedure_task

PROCEDURE_STATE_CHANGED = "ProcedureStateChanged"
_PROCEDURE_MEMBER = "ProcedureStateChangeEvent"
# Built once: json.dumps with any option builds a new encoder per call, a quarter of its
# cost on a 2 kB event. Encoders keep no state between calls, so threads can share them.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: the receipt to confirm (`handle`) and the notification itself (`raw`).

    `raw` is the EventSet item without EventHandle, i.e. exactly the body VOD would have
    pushed as a normal callback. `body` is typed for ProcedureStateChanged only.
    """

    handle: str
    event_type: str
    raw: Mapping[str, Any] = field(repr=False)
    key: str
    body: ProcedureTask | None = field(repr=False)
    _callback_body: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        body = _COMPACT.encode(self.raw).encode()
        object.__setattr__(self, "_callback_body", body)

    def callback_body(self) -> bytes:
        """The normal-callback JSON body: raw in its key order, compact, UTF-8."""
        return self._callback_body

    @property
    def task_id(self) -> str | None:
        """The TaskId of the task flow or of the payload, if it has one."""
        if self.body is not None:
            return self.body.task_id
        return as_text(_member(_payload(self.raw), "TaskId"))

    @property
    def file_id(self) -> str | None:
        """The media file the event is about (for edits and compositions: the file made)."""
        if self.body is not None:
            return self.body.file_id
        payload = _payload(self.raw)
        found = _member(payload, "FileId")
        if found is None and isinstance(output := payload.get("Output"), dict):
            found = output.get("FileId")
        if found is None and isinstance(ids := payload.get("FileIdSet"), list) and ids:
            found = ids[0]
        return as_text(found)

    @property
    def status(self) -> str | None:
        """The Status of the task flow or of the payload, as text (RestoreMedia sends 0)."""
        if self.body is not None:
            return self.body.status
        return as_text(_member(_payload(self.raw), "Status"))

    @property
    def ordering_key(self) -> str:
        """Events sharing this key are delivered in order: same task, else same file."""
        if task_id := self.task_id:
            return f"task:{task_id}"
        if file_id := self.file_id:
            return f"file:{file_id}"
        return f"key:{self.key}"


def _payload(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The type's payload object: the first object member named "...Event" or "...Complete".

    Most types use "<X>Event"; WechatPublishComplete and ExtractBlindWatermarkComplete do not.
    """
    for name, value in raw.items():
        if isinstance(value, dict) and name.endswith(("Event", "Complete")):
            return value
    return {}


def _member(payload: Mapping[str, Any], name: str) -> object:
    """payload[name], or its camelCase spelling (a RestoreMedia draft used `fileId`)."""
    found = payload.get(name)
    return payload.get(name[0].lower() + name[1:]) if found is None else found


def event_key(raw: Mapping[str, Any]) -> str:
    """The event's identity: a hash of its canonical JSON (the handle is not part of raw).

    A redelivery of one notification has the same key; two notifications that differ in
    anything (PROCESSING vs FINISH, a progress update) have different keys. A member that
    is null hashes as if it were missing: VOD sometimes sends null members and sometimes
    omits them, and a redelivery must not look new because of that.
    """
    try:
        canonical = _CANONICAL.encode(raw)
        if ":null" in canonical:  # rare in a way that matters; skip the copy otherwise
            canonical = _CANONICAL.encode(_without_nulls(raw))
        data = canonical.encode()
    except (RecursionError, ValueError, TypeError) as exc:
        raise EventParseError("$", f"not serialisable as JSON ({type(exc).__name__})") from exc
    return hashlib.sha256(data).hexdigest()[:32]


def _without_nulls(value: Any) -> Any:
    """`value` with every null object member removed, at any depth (list items stay)."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parse_event(item: object) -> Event:
    """One EventSet item as an Event; EventParseError (and only that) when it cannot be one."""
    if not isinstance(item, dict):
        raise EventParseError("$", f"expected an object, got {type(item).__name__}")
    handle = item.get("EventHandle")
    if not isinstance(handle, str) or not handle:
        raise EventParseError("EventHandle", "missing, or not a non-empty string")
    return _parse({k: v for k, v in item.items() if k != "EventHandle"}, handle)


def parse_callback_body(body: Mapping[str, Any], handle: str = "") -> Event:
    """A normal-callback body (an event without EventHandle) as an Event, e.g. from a file."""
    if not isinstance(body, Mapping):
        raise EventParseError("$", f"expected an object, got {type(body).__name__}")
    return _parse(dict(body), handle)


def _parse(raw: dict[str, Any], handle: str) -> Event:
    event_type = raw.get("EventType")
    if not isinstance(event_type, str) or not event_type:
        raise EventParseError("EventType", "missing, or not a non-empty string")
    key = event_key(raw)
    body = None
    if event_type == PROCEDURE_STATE_CHANGED:
        body = parse_procedure_task(raw.get(_PROCEDURE_MEMBER), _PROCEDURE_MEMBER)
    return Event(handle=handle, event_type=event_type, raw=raw, key=key, body=body)
