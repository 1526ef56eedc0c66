"""The sink-type registry: every documented type is there and builds from a minimal table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from procpoll.sinks import SINK_TYPES, build_sink
from tests.sinks.conftest import sink_config


def test_every_documented_type_is_registered() -> None:
    """The five sink types of the README are the registry's keys."""
    assert set(SINK_TYPES) == {"webhook", "file", "command", "sqlite", "stdout"}


@pytest.mark.parametrize(("sink_type", "keys"), [
    ("webhook", {"url": "http://127.0.0.1:9/"}),
    ("file", {"path": "{tmp}/events.jsonl"}),
    ("command", {"argv": ["true"]}),
    ("sqlite", {"path": "{tmp}/vod.sqlite3"}),
    ("stdout", {}),
])
def test_each_type_builds_a_named_sink_without_touching_anything(
        tmp_path: Path, sink_type: str, keys: dict[str, Any]) -> None:
    """Building a sink creates no file and runs nothing; it carries its config name."""
    keys = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
            for k, v in keys.items()}
    sink = build_sink(sink_config(sink_type, **keys))
    assert sink.name == f"test-{sink_type}"
    sink.close()
    assert list(tmp_path.iterdir()) == []
