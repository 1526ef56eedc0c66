"""Sink types: the registry from a config `type` to its options parser and builder."""

from __future__ import annotations

from procpoll.sinks import command, file, sqlite, stdout, webhook
from procpoll.sinks.base import Sink, SinkConfig, SinkType

SINK_TYPES: dict[str, SinkType] = {
    "webhook": webhook.TYPE,
    "file": file.TYPE,
    "command": command.TYPE,
    "sqlite": sqlite.TYPE,
    "stdout": stdout.TYPE,
}


def build_sink(config: SinkConfig) -> Sink:
    """Build the sink a validated SinkConfig describes."""
    return SINK_TYPES[config.type].build(config)


__all__ = ["SINK_TYPES", "Sink", "SinkConfig", "SinkType", "build_sink"]
