"""Configs that parse but would silently lose events are errors: no sinks, misspelt filters,
two writers on one file; unknown keys name the key that was probably meant."""

from __future__ import annotations

import itertools
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import pytest

from procpoll.config import parse_config
from procpoll.errors import ConfigError
from procpoll.event_types import KNOWN_EVENT_TYPES, TYPO_SIMILARITY


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(document, "cfg.toml")
    return info.value.problems


def file_sink(tmp_path: Path, name: str = "archive", **keys: Any) -> dict[str, Any]:
    return {"name": name, "type": "file", "path": str(tmp_path / f"{name}.jsonl"), **keys}


def with_ledger(tmp_path: Path, *sinks: dict[str, Any]) -> dict[str, Any]:
    return {"ledger": {"path": str(tmp_path / "ledger.sqlite3")}, "sinks": list(sinks)}


# --- no sinks -------------------------------------------------------------------------------


def test_no_sinks_is_an_error_saying_events_would_be_lost() -> None:
    """Without sinks, unrouted = "confirm" would confirm every event undelivered: refused."""
    [found] = problems({})
    assert found.startswith("cfg.toml: sinks: no [[sinks]] table: ")
    assert "confirmed to VOD undelivered" in found


def test_no_sinks_is_an_error_with_unrouted_leave_too() -> None:
    """With unrouted = "leave" nothing would ever be delivered either: still refused."""
    [found] = problems({"daemon": {"unrouted": "leave"}, "sinks": []})
    assert "stay in VOD undelivered" in found


def test_a_misspelt_sinks_table_is_named_with_the_right_spelling() -> None:
    """`[[sink]]` is an unknown key that points at `sinks`; the missing sinks are reported."""
    found = problems({"sink": [{"name": "a", "type": "stdout"}]})
    assert "cfg.toml: sink: unknown key (did you mean sinks?)" in found
    assert any(p.startswith("cfg.toml: sinks: no [[sinks]] table") for p in found)


# --- event types and statuses ---------------------------------------------------------------


@pytest.mark.parametrize("typo", ["ProcedureStateChange", "procedurestatechanged",
                                  "ProcedureStateChangedEvent"])
def test_event_type_close_to_a_known_one_is_an_error_with_a_suggestion(
        tmp_path: Path, typo: str) -> None:
    """A near miss would filter out every ProcedureStateChanged event: error, did you mean."""
    [found] = problems(with_ledger(tmp_path, file_sink(tmp_path, events=[typo])))
    assert found.startswith(f"cfg.toml: sinks[0].events: {typo!r} is not a VOD event type")
    assert "(did you mean 'ProcedureStateChanged'?)" in found


@pytest.mark.parametrize("name", ["MyCustomEvent", "AigcAudioTaskComplete"])
def test_event_type_far_from_every_known_one_is_accepted(tmp_path: Path, name: str) -> None:
    """VOD adds types, so a name unlike any known one parses (`check` warns about it)."""
    config = parse_config(with_ledger(tmp_path, file_sink(tmp_path, events=[name])), "cfg.toml")
    assert config.sinks[0].events == (name,)


def test_every_known_event_type_is_accepted(tmp_path: Path) -> None:
    """No known type is mistaken for a typo of another."""
    sink = file_sink(tmp_path, events=list(KNOWN_EVENT_TYPES))
    config = parse_config(with_ledger(tmp_path, sink), "cfg.toml")
    assert config.sinks[0].events == KNOWN_EVENT_TYPES


def test_typo_threshold_is_above_the_similarity_of_any_two_known_types() -> None:
    """A new type as different from its neighbours as today's types are gets a warning only."""
    closest_pair = max(SequenceMatcher(None, a.casefold(), b.casefold()).ratio()
                       for a, b in itertools.combinations(KNOWN_EVENT_TYPES, 2))
    assert closest_pair < TYPO_SIMILARITY


@pytest.mark.parametrize(("status", "hint"), [("FINISHED", " (did you mean 'FINISH'?)"),
                                              ("finish", " (did you mean 'FINISH'?)"),
                                              ("SUCCESS", "")])
def test_status_outside_the_task_flow_statuses_is_an_error(tmp_path: Path, status: str,
                                                          hint: str) -> None:
    """`statuses` compares ProcedureStateChanged's Status (PROCESSING, FINISH); any other
    value would make the sink skip every task flow."""
    [found] = problems(with_ledger(tmp_path, file_sink(tmp_path, statuses=[status])))
    assert found.startswith(f"cfg.toml: sinks[0].statuses: {status!r} is not a task-flow "
                            f"status{hint}: ")
    assert "'PROCESSING' or 'FINISH'" in found


def test_both_task_flow_statuses_are_accepted(tmp_path: Path) -> None:
    """PROCESSING and FINISH are the values VOD sends."""
    sink = file_sink(tmp_path, statuses=["PROCESSING", "FINISH"])
    config = parse_config(with_ledger(tmp_path, sink), "cfg.toml")
    assert config.sinks[0].statuses == ("PROCESSING", "FINISH")


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_key_in_a_sink_suggests_the_sink_key(tmp_path: Path) -> None:
    """A misspelt sink key names the key it resembles, with its dotted path."""
    [found] = problems(with_ledger(tmp_path, file_sink(tmp_path, retires=2)))
    assert found == "cfg.toml: sinks[0].retires: unknown key (did you mean sinks[0].retries?)"


def test_unknown_key_unlike_any_known_one_has_no_suggestion(tmp_path: Path) -> None:
    """No far-fetched guess: a key unlike every known one is just unknown."""
    [found] = problems({**with_ledger(tmp_path, file_sink(tmp_path)), "vod": {"zzz": 1}})
    assert found == "cfg.toml: vod.zzz: unknown key"


# --- two writers on one file ----------------------------------------------------------------


def test_file_and_sqlite_sinks_on_one_path_are_refused(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths are compared resolved: a relative and an absolute spelling of one file clash."""
    monkeypatch.chdir(tmp_path)
    found = problems(with_ledger(
        tmp_path, {"name": "a", "type": "file", "path": "out/events"},
        {"name": "b", "type": "sqlite", "path": str(tmp_path / "out" / ".." / "out" / "events")}))
    assert len(found) == 1
    assert found[0].startswith("cfg.toml: sinks[1].path: ")
    assert "also written by sink 'a' (sinks[0].path)" in found[0]


def test_a_symlink_to_another_sinks_file_is_refused(tmp_path: Path) -> None:
    """Two names of one file through a symlinked directory are one file."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    [found] = problems(with_ledger(
        tmp_path, {"name": "a", "type": "file", "path": str(tmp_path / "real" / "e.jsonl")},
        {"name": "b", "type": "stdout", "path": str(tmp_path / "link" / "e.jsonl")}))
    assert "sinks[1].path" in found and "sink 'a'" in found


def test_a_sink_writing_the_ledger_is_refused(tmp_path: Path) -> None:
    """A sink's file may not be the ledger's either."""
    [found] = problems(with_ledger(
        tmp_path, {"name": "db", "type": "sqlite", "path": str(tmp_path / "ledger.sqlite3")}))
    assert found.startswith("cfg.toml: sinks[0].path: ")
    assert "also written by the ledger (ledger.path)" in found


def test_sinks_on_standard_output_and_distinct_files_are_accepted(tmp_path: Path) -> None:
    """Several stdout sinks on "-" write whole lines to one stream: not a shared file."""
    config = parse_config(with_ledger(
        tmp_path, file_sink(tmp_path, "a"), file_sink(tmp_path, "b"),
        {"name": "c", "type": "stdout"}, {"name": "d", "type": "stdout", "path": "-"}),
        "cfg.toml")
    assert [s.name for s in config.sinks] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("path", ["-", "events.fifo"])
def test_a_stdout_sink_with_several_processes_is_refused(tmp_path: Path, path: str) -> None:
    """N processes writing one stream would interleave their lines (a pipe keeps only writes
    up to 4 KiB whole, and a torn line is known only to the process that tore it)."""
    document = with_ledger(tmp_path, {"name": "out", "type": "stdout", "path": path})
    document["daemon"] = {"processes": 2}
    found = problems(document)
    assert len(found) == 1
    assert "sinks[0].type" in found[0] and "interleave" in found[0]
    document["daemon"] = {"processes": 1}
    assert parse_config(document, "cfg.toml").sinks[0].name == "out"
