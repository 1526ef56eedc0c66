"""The benchmark's events: real payloads from tests/data/payloads, made distinct, mixed.

Every body is a copy of a published or captured payload (the ProcedureStateChanged
samples of each media-process type, NewFileUpload, FileDeleted, the *Complete types,
captured PullEvents replies), with its TaskId and FileId values made unique so that no
two events share a key or a task. 80 % are ProcedureStateChanged, as in a VOD
application that transcodes what it uploads; the bodies average about 1.7 kB (the
files alone, unweighted, 1.3 kB).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).resolve().parent.parent / "tests" / "data" / "payloads"
PROCEDURE_SHARE = 0.8
_IDENTIFIERS = frozenset({"TaskId", "FileId", "taskId", "fileId", "Vid"})


def templates() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ProcedureStateChanged bodies, other bodies) from every payload file with an EventType."""
    procedure: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for path in sorted(PAYLOADS.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        items = [document]
        if isinstance(document, dict) and isinstance(document.get("Response"), dict):
            items = document["Response"].get("EventSet") or []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("EventType"), str):
                continue
            body = {k: v for k, v in item.items() if k != "EventHandle"}
            (procedure if body["EventType"] == "ProcedureStateChanged" else others).append(body)
    return procedure, others


def _renamed(value: Any, suffix: str) -> Any:
    """`value` with every identifier (TaskId, FileId, FileIdSet items) ending in `suffix`."""
    if isinstance(value, dict):
        out = {}
        for key, member in value.items():
            if key in _IDENTIFIERS and isinstance(member, str):
                out[key] = f"{member}-{suffix}"
            elif key == "FileIdSet" and isinstance(member, list):
                out[key] = [f"{m}-{suffix}" if isinstance(m, str) else m for m in member]
            else:
                out[key] = _renamed(member, suffix)
        return out
    if isinstance(value, list):
        return [_renamed(v, suffix) for v in value]
    return value


def realistic_events(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """`n` distinct normal-callback bodies drawn from the payload corpus (same seed, same list)."""
    procedure, others = templates()
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        pool = procedure if rng.random() < PROCEDURE_SHARE else others
        template = rng.choice(pool)
        body = _renamed(template, f"s{seed}n{i}")
        if body == template:  # no identifier to rename: a marker keeps it distinct
            body["BenchSequence"] = i
        bodies.append(body)
    return bodies


def write_events(path: Path, n: int, seed: int = 1) -> float:
    """Write `n` bodies as a JSON list for `procpoll emulate --from`; returns bytes per body."""
    bodies = realistic_events(n, seed)
    sizes = [len(json.dumps(b, ensure_ascii=False, separators=(",", ":")).encode())
             for b in bodies]
    path.write_text(json.dumps(bodies, ensure_ascii=False), encoding="utf-8")
    return sum(sizes) / max(len(sizes), 1)
