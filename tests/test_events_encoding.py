"""Tests for procpoll.events' encodings: the key's canonical form and the callback body are
byte for byte what the json module writes, whichever encoder wrote them."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procpoll.errors import EventParseError
from procpoll.events import Event, canonical_form, event_key, parse_callback_body, parse_event

PAYLOADS = Path(__file__).parent / "data" / "payloads"

# The contract, spelled with the standard library alone: what keys in existing ledgers were
# hashed from, and what receivers were sent.
CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def without_nulls(value: Any) -> Any:
    """`value` without null object members, at any depth (list items stay)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def reference_canonical(raw: dict[str, Any]) -> bytes:
    """The canonical form as the json module writes it, nulls dropped when present."""
    text = CANONICAL.encode(raw)
    if ":null" in text:
        text = CANONICAL.encode(without_nulls(raw))
    return text.encode()


def assert_like_json_module(raw: dict[str, Any]) -> None:
    """Key, canonical form and callback body equal the json module's, or both refuse raw."""
    try:
        expected_canonical = reference_canonical(raw)
        expected_body = COMPACT.encode(raw).encode()
    except (ValueError, TypeError, RecursionError):
        with pytest.raises(EventParseError):
            canonical_form(raw)
        return
    assert canonical_form(raw) == expected_canonical
    assert event_key(raw) == hashlib.sha256(expected_canonical).hexdigest()[:32]
    event = Event(handle="h", event_type="X", raw=raw, key="k", body=None)
    assert event.callback_body() == expected_body
    typed = {**raw, "EventType": "X"}
    parsed = parse_callback_body(typed)
    assert parsed.key == hashlib.sha256(reference_canonical(typed)).hexdigest()[:32]
    assert parsed.callback_body() == COMPACT.encode(typed).encode()


# Every kind of JSON value, and the values a fast encoder gets wrong: floats of every
# magnitude (with NaN and infinities, which the json module writes as NaN and Infinity),
# integers beyond 64 bits, any code point including lone surrogates, control characters.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62)
           | st.integers(max_value=-(2**62)) | st.floats() | TEXT)
KEYS = TEXT | st.sampled_from(["EventType", "TaskId", "a", "A", "é", "动", "😀", "\uffff"])
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(KEYS, kids, max_size=6),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(KEYS, JSON, max_size=6))
def test_encodings_equal_the_json_modules_on_any_json(raw: dict[str, Any]) -> None:
    """For any JSON object, the canonical form, key and callback body are the json
    module's bytes (sorted compact UTF-8 with nulls dropped; compact in key order)."""
    assert_like_json_module(raw)


def payload_objects() -> list[tuple[str, dict[str, Any]]]:
    """Every object in the payload corpus: the bodies, and each EventSet item without its handle."""
    found = []
    for path in sorted(PAYLOADS.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        items = [document]
        if isinstance(document, dict) and isinstance(document.get("Response"), dict):
            items = document["Response"].get("EventSet") or []
        found += [(path.name, {k: v for k, v in item.items() if k != "EventHandle"})
                  for item in items if isinstance(item, dict)]
    return found


@pytest.mark.parametrize(("name", "raw"), payload_objects(),
                         ids=[name for name, _ in payload_objects()])
def test_encodings_equal_the_json_modules_on_every_payload(name: str,
                                                           raw: dict[str, Any]) -> None:
    """Every payload of the corpus keeps the key and the body bytes it had."""
    assert_like_json_module(raw)


@pytest.mark.parametrize("number", [
    1e-5, 1.5e-7, 0.00009, 1e-10, -2.5e-6, 1e16, 1.5e16, 1e21, 1e300, 5e-324, -0.0, 0.0001,
    1e15, 123.456, math.nan, math.inf, -math.inf, 2**63, 2**64, 2**64 + 1, -(2**63) - 1,
    2**200,
])
def test_numbers_a_fast_encoder_writes_differently_keep_their_bytes(number: float) -> None:
    """Floats under 1e-4, exponents, NaN, ±Infinity and integers past 64 bits are written as
    the json module writes them (1e-05, not 0.00001; NaN, not null), in a member and a list."""
    assert_like_json_module({"EventType": "X", "V": number, "L": [number, None], "N": None})


def test_text_that_looks_like_a_float_changes_nothing() -> None:
    """Strings holding "0.0000" or "1e-5" keep the json module's bytes."""
    assert_like_json_module({"EventType": "X", "S": "0.00001", "T": "v1e-5", "U": ":1e+7"})


@dataclass
class Point:
    """A dataclass: orjson would write it, the json module refuses it."""

    x: int


@pytest.mark.parametrize("value", ["\ud800", {"\udfff": 1}, {1: "int key"}, {"a": (1, 2)},
                                   {"a": {"b": object()}}, Point(1), datetime.date(2025, 1, 6)])
def test_values_json_refuses_or_rewrites_are_handled_as_json_does(value: object) -> None:
    """A lone surrogate, a non-str key, a dataclass, a date or another object gives what the
    json module gives: EventParseError for what it refuses, its bytes for what it accepts."""
    assert_like_json_module({"EventType": "X", "V": value})


def test_subclasses_are_encoded_as_json_encodes_them() -> None:
    """A dict or str subclass in raw is written as the json module writes it."""

    class Text(str):
        __slots__ = ()

    class Members(dict[str, Any]):
        pass

    assert_like_json_module({"EventType": "X", "V": Members(b=Text("x"), a=1)})


def test_deep_nesting_keeps_its_bytes() -> None:
    """Nesting deeper than orjson's 254 levels (within json's) is encoded by json."""
    value: Any = "leaf"
    for _ in range(300):
        value = {"k": value}
    assert_like_json_module({"EventType": "X", "V": value})


def test_pulled_item_body_and_key_match_the_json_modules() -> None:
    """parse_event's key and body (computed together) equal the json module's bytes."""
    item = json.loads((PAYLOADS / "PullEvents-response-4events-apidoc.json").read_text(
        encoding="utf-8"))["Response"]["EventSet"][0]
    event = parse_event(item)
    raw = {k: v for k, v in item.items() if k != "EventHandle"}
    assert event.key == hashlib.sha256(reference_canonical(raw)).hexdigest()[:32]
    assert event.callback_body() == COMPACT.encode(raw).encode()
