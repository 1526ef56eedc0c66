"""The dead-letter directory: one JSON file per event set aside, with the reason."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from procpoll.events import Event


class DeadLetter:
    """Writes poison events durably (write, fsync, rename) so they can be inspected and replayed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, event: Event, sub_app_id: int | None, *, sink: str, reason: str,
              rounds: int, delivery_id: str | None = None) -> Path:
        """Set a delivered-nowhere event aside; raises OSError when the disk refuses.

        `delivery_id` names the occurrence (see ledger.delivery_id) so that a second
        notification with an identical body gets its own file.
        """
        name = delivery_id or event.key
        record = {"reason": reason, "sink": sink, "rounds": rounds, "sub_app_id": sub_app_id,
                  "event_key": event.key, "delivery_id": name, "event_type": event.event_type,
                  "event": event.raw}
        return self._store(f"{_safe(name)}.{_safe(sink)}", record)

    def write_unparsed(self, item: Any, sub_app_id: int | None, *, reason: str, key: str) -> Path:
        """Set aside a pulled item that could not be parsed, as received."""
        record = {"reason": reason, "sub_app_id": sub_app_id, "event_key": key, "item": item}
        return self._store(f"{key}.unparsed", record)

    def _store(self, stem: str, record: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        record["dead_lettered_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = json.dumps(record, ensure_ascii=False, default=repr).encode("utf-8", "replace")
        final = self.directory / f"{stem}.json"
        temp = self.directory / f".{stem}.{os.getpid()}.tmp"
        try:
            with temp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            temp.replace(final)
        except OSError:
            # A full disk leaves a cut temp file: remove it, or it holds space the ledger
            # (often on the same disk) needs, and stays if the event never comes back.
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_~" else "_" for c in name)[:64]
