"""Typed reads of one TOML table, collecting every problem with its dotted key."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING: Any = object()


class Problems:
    """Every problem found in one file, each a line naming the file and the dotted key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        """Record that the value at `where` is wrong, and what was expected."""
        self.lines.append(f"{self.source}: {where}: {what}")


class Table:
    """One TOML table: typed getters that record problems instead of raising.

    Every getter returns a usable value (the default on error) so validation goes on
    and reports all problems at once; `finish()` reports keys nobody asked for.
    """

    def __init__(self, data: Any, where: str, problems: Problems) -> None:
        self.where = where
        self.problems = problems
        self._seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            problems.add(where, f"expected a table, got {_kind(data)}")
            data = {}
        self.data: Mapping[str, Any] = data

    def path(self, key: str) -> str:
        """The dotted name of `key` in this table."""
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        """Whether the key is present."""
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.problems.add(self.path(key), "required key is missing")
            return default
        return self.data[key]

    def claim(self, key: str, default: Any) -> Any:
        """The raw value of `key`, for a caller that validates it itself."""
        return self._get(key, default)

    def bad(self, key: str, what: str) -> None:
        """Record a problem with `key` found by the caller."""
        self.problems.add(self.path(key), what)

    def text(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> Any:
        """A string, optionally one of `choices`."""
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, str):
            self.bad(key, f"expected a string, got {_kind(value)}")
            return default
        if choices and value not in choices:
            self.bad(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
            return default
        return value

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        """A boolean."""
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            self.bad(key, f"expected true or false, got {_kind(value)}")
            return default
        return value

    def integer(self, key: str, default: Any = _MISSING, *, low: int | None = None,
            high: int | None = None) -> Any:
        """An integer within [low, high]."""
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, f"expected an integer, got {_kind(value)}")
            return default
        return self._in_range(key, value, low, high, default)

    def seconds(self, key: str, default: Any = _MISSING, *, low: float = 0.0,
                high: float | None = None, low_inclusive: bool = True) -> Any:
        """A duration in seconds (integer or float), finite and within range."""
        value = self._get(key, default)
        if value is default:
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            self.bad(key, f"expected a duration in seconds (a number), got {_kind(value)}")
            return default
        if value < low or (not low_inclusive and value == low):
            op = ">=" if low_inclusive else ">"
            self.bad(key, f"expected a duration {op} {low:g} s, got {value:g}")
            return default
        return self._in_range(key, float(value), None, high, default)

    def texts(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings, as a tuple."""
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.bad(key, "expected a list of strings")
            return default
        return tuple(value)

    def integers(self, key: str, default: Any = _MISSING, *, low: int | None = None) -> Any:
        """A list of integers, as a tuple."""
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            self.bad(key, "expected a list of integers")
            return default
        if low is not None and any(v < low for v in value):
            self.bad(key, f"expected integers >= {low}")
            return default
        return tuple(value)

    def text_map(self, key: str, default: Any = _MISSING) -> Any:
        """A table of string values, as a dict."""
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            self.bad(key, "expected a table of strings")
            return default
        return dict(value)

    def file_path(self, key: str, default: Any = _MISSING) -> Any:
        """A filesystem path (a non-empty string)."""
        value = self.text(key, default)
        if value is default or value is None:
            return value
        if not value:
            self.bad(key, "expected a non-empty path")
            return default
        return Path(value)

    def table(self, key: str) -> Table:
        """A nested table (an empty one when absent)."""
        return Table(self._get(key, {}), self.path(key), self.problems)

    def finish(self) -> None:
        """Report every key that no getter asked for, with the asked-for key it resembles."""
        for key in self.data:
            if key not in self._seen:
                self.problems.add(self.path(key), f"unknown key{self._suggestion(key)}")

    def _suggestion(self, key: str) -> str:
        found = difflib.get_close_matches(key.casefold(), sorted(self._seen), n=1)
        return f" (did you mean {self.path(found[0])}?)" if found else ""

    def _in_range(self, key: str, value: Any, low: Any, high: Any, default: Any) -> Any:
        if low is not None and value < low:
            self.bad(key, f"expected a value >= {low}, got {value}")
            return default
        if high is not None and value > high:
            self.bad(key, f"expected a value <= {high}, got {value}")
            return default
        return value


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)
