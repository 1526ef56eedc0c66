"""Event: one pulled notification (handle, type, raw payload, typed body), its key, and parsing."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from procpoll.errors import EventParseError
from procpoll.jsonread import as_text
from procpoll.procedure import ProcedureTask, parse_procedure_task

PROCEDURE_STATE_CHANGED = "ProcedureStateChanged"
_PROCEDURE_MEMBER = "ProcedureStateChangeEvent"
# The reference encodings: the callback body and the key's canonical form are defined as
# these encoders' output (an existing ledger's keys were hashed from it). Built once:
# json.dumps with any option builds a new encoder per call. Encoders keep no state between
# calls, so threads can share them.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# orjson writes the same bytes several times faster, except in the cases below, which fall
# back to the reference encoders: floats under 1e-4 (orjson "0.00001" and "1.5e-7", json
# "1e-05" and "1.5e-07"); NaN and ±Infinity (orjson null, json NaN); integers beyond 64 bits,
# non-str keys, nesting past 254 levels and lone surrogates (orjson refuses them). Only
# exact dict, list, str, int, float, bool and None are taken: subclasses, dataclasses and
# datetimes go to the reference, which refuses what is not JSON as before.
_ORJSON_EXACT_TYPES = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
                       | orjson.OPT_PASSTHROUGH_DATETIME)
_DIGITS = frozenset(b"0123456789")


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
    # Given by parsing, which encodes raw once for the key and the body; else built here.
    _callback_body: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._callback_body:
            object.__setattr__(self, "_callback_body", _encodings(self.raw)[1])

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
    return _hash(canonical_form(raw))


def _hash(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()[:32]


def canonical_form(raw: Mapping[str, Any]) -> bytes:
    """What event_key hashes: sorted keys, compact, UTF-8, null members dropped."""
    return _encodings(raw)[0]


def _encodings(raw: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(canonical form, callback body): byte for byte the reference encoders' output,
    written by orjson when it is sure to match, by the reference encoders otherwise."""
    try:
        body = orjson.dumps(raw, option=_ORJSON_EXACT_TYPES)
    except orjson.JSONEncodeError:
        return _reference(raw)
    # The canonical form holds the same tokens as the body, so one look covers both.
    if _floats_may_differ(body):
        return _reference(raw)
    if b"null" not in body:
        return orjson.dumps(raw, option=orjson.OPT_SORT_KEYS), body
    # A null (dropped from the key), or a NaN that orjson wrote as null.
    stripped = _without_nulls_if_finite(raw)
    if stripped is None:
        return _reference(raw)
    return orjson.dumps(stripped, option=orjson.OPT_SORT_KEYS), body


def _reference(raw: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The reference encoders' (canonical form, callback body)."""
    try:
        canonical = _CANONICAL.encode(raw)
        if ":null" in canonical:  # rare in a way that matters; skip the copy otherwise
            canonical = _CANONICAL.encode(_without_nulls(raw))
        return canonical.encode(), _COMPACT.encode(raw).encode()
    except (RecursionError, ValueError, TypeError) as exc:
        raise EventParseError("$", f"not serialisable as JSON ({type(exc).__name__})") from exc


def _floats_may_differ(data: bytes) -> bool:
    """Whether orjson's output may hold a float json writes otherwise: one under 1e-4
    ("0.0000…") or with an exponent (a digit, then "e-" or "e+"). A match inside a string
    only costs a fallback. Substring searches: a regex took 30 µs on a 2 kB event."""
    if b"0.0000" in data:
        return True
    for marker in (b"e-", b"e+"):
        at = data.find(marker, 1)
        while at != -1:
            if data[at - 1] in _DIGITS:
                return True
            at = data.find(marker, at + 2)
    return False


class _NotFinite(Exception):
    """A NaN or infinite float: orjson cannot write it as json does."""


def _without_nulls_if_finite(value: Any) -> Any:
    """_without_nulls(value), or None when a float in it is NaN or infinite (one walk)."""
    try:
        return _without_nulls_finite(value)
    except _NotFinite:
        return None


def _without_nulls_finite(value: Any) -> Any:
    # Only on what orjson took with _ORJSON_EXACT_TYPES: containers are exactly dict and
    # list, so `type(...) is` suffices (isinstance against Mapping cost more than orjson).
    kind = type(value)
    if kind is dict:
        return {k: _without_nulls_finite(v) for k, v in value.items() if v is not None}
    if kind is list:
        return [_without_nulls_finite(v) for v in value]
    if kind is float and not math.isfinite(value):
        raise _NotFinite
    return value


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
    canonical, callback_body = _encodings(raw)
    body = None
    if event_type == PROCEDURE_STATE_CHANGED:
        body = parse_procedure_task(raw.get(_PROCEDURE_MEMBER), _PROCEDURE_MEMBER)
    return Event(handle=handle, event_type=event_type, raw=raw, key=_hash(canonical),
                 body=body, _callback_body=callback_body)
