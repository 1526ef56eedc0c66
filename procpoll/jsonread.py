"""Tolerant typed reads of VOD JSON: a scalar mismatch reads as None, a wrong container raises."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import (
    TYPE_CHECKING,
    Any,
    TypeVar,
    dataclass_transform,
    overload,
)

from procpoll.errors import EventParseError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

JsonObject = Mapping[str, Any]
T = TypeVar("T")
M = TypeVar("M", bound="DataclassInstance")
Reader = Callable[[JsonObject, str, str], T]  # (object, key, path of the object) -> value


# --- scalars: a mismatch is never an error, it reads as None ---------------------------------


def as_text(value: object) -> str | None:
    """A JSON scalar as text: strings as they are, numbers as `str(value)`, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # an int longer than sys.get_int_max_str_digits()
            return None
    return None


def as_float(value: object) -> float | None:
    """A finite number, or a string that parses as one; booleans are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def as_int(value: object) -> int | None:
    """An integer, an integral float, or a string that parses as either; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def read_text(d: JsonObject, key: str, path: str) -> str | None:
    return as_text(d.get(key))


def read_int(d: JsonObject, key: str, path: str) -> int | None:
    return as_int(d.get(key))


def read_float(d: JsonObject, key: str, path: str) -> float | None:
    return as_float(d.get(key))


# --- structure: a wrong container type makes the object unusable, so it raises ---------------


def is_absent(value: object) -> bool:
    """VOD writes an empty member as missing, null, [] or {} depending on the year."""
    return value is None or (isinstance(value, list | dict) and not value)


def read_object(d: JsonObject, key: str, path: str) -> JsonObject | None:
    value = d.get(key)
    if is_absent(value):
        return None
    if not isinstance(value, dict):
        raise EventParseError(f"{path}.{key}", f"expected an object, got {type(value).__name__}")
    return value


def read_list(d: JsonObject, key: str, path: str) -> list[object]:
    value = d.get(key)
    if is_absent(value):
        return []
    if not isinstance(value, list):
        raise EventParseError(f"{path}.{key}", f"expected a list, got {type(value).__name__}")
    return value


def read_objects(d: JsonObject, key: str, path: str) -> Iterator[tuple[JsonObject, str]]:
    """Each item of the object list `d[key]`, with its path."""
    for i, item in enumerate(read_list(d, key, path)):
        item_path = f"{path}.{key}[{i}]"
        if not isinstance(item, dict):
            raise EventParseError(item_path, f"expected an object, got {type(item).__name__}")
        yield item, item_path


def read_texts(d: JsonObject, key: str, path: str) -> tuple[str, ...]:
    """A list of strings; items that are no scalar are left out (they stay in raw)."""
    return tuple(t for t in map(as_text, read_list(d, key, path)) if t is not None)


def read_ints(d: JsonObject, key: str, path: str) -> tuple[int, ...]:
    return tuple(n for n in map(as_int, read_list(d, key, path)) if n is not None)


def one(cls: type[M]) -> Reader[M | None]:
    def read(d: JsonObject, key: str, path: str) -> M | None:
        obj = read_object(d, key, path)
        return None if obj is None else build(cls, obj, f"{path}.{key}")

    return read


def many(cls: type[M]) -> Reader[tuple[M, ...]]:
    def read(d: JsonObject, key: str, path: str) -> tuple[M, ...]:
        return tuple(build(cls, item, item_path) for item, item_path in read_objects(d, key, path))

    return read


# --- declarative models: each field names its JSON key and its reader -------------------------


@overload
def member(key: str) -> str | None: ...
@overload
def member(key: str, read: Reader[T]) -> T: ...
def member(key: str, read: Reader[Any] = read_text) -> Any:
    """A model field read from JSON member `key` by `read` (default: as text).

    The overloads make mypy check each field's annotation against its reader's result.
    """
    return field(metadata={"json": (key, read)})


@dataclass_transform(frozen_default=True, field_specifiers=(member, field))
def model(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True, slots=True)`, with `member` fields known to type checkers."""
    return dataclass(frozen=True, slots=True)(cls)


def build(cls: type[M], d: JsonObject, path: str, **extra: object) -> M:
    """Read every `member` field of `cls` from `d`; `extra` supplies the others; raw is `d`."""
    values: dict[str, Any] = {"raw": d}
    for name, key, read in _members(cls):
        values[name] = read(d, key, path)
    values.update(extra)
    return cls(**values)


@functools.cache
def _members(cls: type[DataclassInstance]) -> tuple[tuple[str, str, Reader[Any]], ...]:
    """(field name, JSON key, reader) of each `member` field; computed once per class."""
    return tuple((f.name, *f.metadata["json"]) for f in fields(cls) if "json" in f.metadata)
