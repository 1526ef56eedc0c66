"""Reading event bodies from files: a JSON list, JSON lines, or a PullEvents response."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from procpoll.errors import ProcpollError


class EventFileError(ProcpollError):
    """An event file cannot be read or holds something that is not an event body."""


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """Normal-callback bodies from `path`, in file order, without any EventHandle.

    Accepted: a JSON list of bodies; one body; a PullEvents response
    (`{"Response": {"EventSet": [...]}}`); or JSON lines, one body per line.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EventFileError(f"{file}: cannot read: {exc}") from exc
    try:
        document: Any = json.loads(text)
    except json.JSONDecodeError:
        items = _json_lines(file, text)
    else:
        items = _items(file, document)
    bodies = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise EventFileError(f"{file}: item {index}: an event body must be a JSON object")
        bodies.append({key: value for key, value in item.items() if key != "EventHandle"})
    return bodies


def _items(file: Path, document: Any) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        response = document.get("Response")
        if isinstance(response, dict) and "EventSet" in response:
            event_set = response["EventSet"]
            if event_set is None:
                return []
            if not isinstance(event_set, list):
                raise EventFileError(f"{file}: Response.EventSet must be a list")
            return event_set
        return [document]
    raise EventFileError(f"{file}: expected a JSON list or object of event bodies")


def _json_lines(file: Path, text: str) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EventFileError(f"{file}:{number}: not JSON: {exc.msg}") from exc
    return items
