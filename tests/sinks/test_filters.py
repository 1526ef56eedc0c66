"""The filters every sink has (`events`, `statuses`, `sub_app_ids`), as parsed from config."""

from __future__ import annotations

from typing import Any

import pytest

from procpoll.events import Event
from procpoll.sinks.base import SinkConfig
from tests.sinks.conftest import config_problems, load_event, procedure_event, sink_config

UPLOAD = load_event("NewFileUpload-basic.json")
FINISH = procedure_event("t1", "FINISH")
PROCESSING = procedure_event("t1", "PROCESSING")


def filtered(**keys: Any) -> SinkConfig:
    """A file sink's config with the given filter keys."""
    return sink_config("file", path="/tmp/unused.jsonl", **keys)


def test_no_filters_select_everything() -> None:
    """A sink without filters wants every event of every sub-application."""
    config = filtered()
    assert all(config.wants(e, app) for e in (UPLOAD, FINISH, PROCESSING) for app in (None, 7))


@pytest.mark.parametrize(("event", "wanted"), [(UPLOAD, False), (FINISH, True)])
def test_events_selects_by_type(event: Event, wanted: bool) -> None:
    """`events` lists the event types the sink wants."""
    assert filtered(events=["ProcedureStateChanged"]).wants(event, None) is wanted


@pytest.mark.parametrize(("event", "wanted"), [(FINISH, True), (PROCESSING, False),
                                               (UPLOAD, True)])
def test_statuses_select_task_flow_states_only(event: Event, wanted: bool) -> None:
    """`statuses` filters ProcedureStateChanged by Status and lets other types through."""
    assert filtered(statuses=["FINISH"]).wants(event, None) is wanted


@pytest.mark.parametrize(("sub_app_id", "wanted"), [(None, True), (0, True),
                                                    (1400000001, False)])
def test_sub_app_id_zero_is_the_default_application(sub_app_id: int | None,
                                                    wanted: bool) -> None:
    """`sub_app_ids = [0]` selects events pulled for the account's default application."""
    assert filtered(sub_app_ids=[0]).wants(FINISH, sub_app_id) is wanted


def test_sub_app_ids_select_by_application() -> None:
    """`sub_app_ids` lists the sub-applications whose events the sink wants."""
    config = filtered(sub_app_ids=[1400000001])
    assert config.wants(FINISH, 1400000001)
    assert not config.wants(FINISH, 1400000002)
    assert not config.wants(FINISH, None)


def test_filters_combine_with_and() -> None:
    """An event must pass every filter the sink sets."""
    config = filtered(events=["ProcedureStateChanged"], statuses=["FINISH"],
                      sub_app_ids=[1400000001])
    assert config.wants(FINISH, 1400000001)
    assert not config.wants(PROCESSING, 1400000001)
    assert not config.wants(FINISH, None)
    assert not config.wants(UPLOAD, 1400000001)


def test_an_empty_list_selects_nothing() -> None:
    """`events = []` is a filter that matches no event (it is not "no filter")."""
    assert not filtered(events=[]).wants(FINISH, None)


@pytest.mark.parametrize(("keys", "problem"), [
    ({"events": "ProcedureStateChanged"}, "sinks[0].events: expected a list of strings"),
    ({"statuses": [1]}, "sinks[0].statuses: expected a list of strings"),
    ({"sub_app_ids": ["1400000001"]}, "sinks[0].sub_app_ids: expected a list of integers"),
    ({"sub_app_ids": [-1]}, "sinks[0].sub_app_ids: expected integers >= 0"),
])
def test_filter_problems_name_the_key(keys: dict[str, Any], problem: str) -> None:
    """Malformed filters are config problems naming the dotted key."""
    assert config_problems("file", path="/tmp/unused.jsonl", **keys) == [f"<test>: {problem}"]
