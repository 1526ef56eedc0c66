"""The VOD actions the emulator answers: parameter checks and the content of each reply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from procpoll.emulator.event_queue import MAX_BATCH, EventQueue, SubAppId

VERSION = "2018-07-17"
PULL_EVENTS = "PullEvents"
CONFIRM_EVENTS = "ConfirmEvents"
DESCRIBE_EVENT_CONFIG = "DescribeEventConfig"
DESCRIBE_EVENTS_STATE = "DescribeEventsState"

# Parameters each action accepts; anything else is UnknownParameter, as on VOD.
_PARAMETERS: dict[str, frozenset[str]] = {
    PULL_EVENTS: frozenset({"SubAppId", "ExtInfo"}),
    CONFIRM_EVENTS: frozenset({"EventHandles", "SubAppId", "ExtInfo"}),
    DESCRIBE_EVENT_CONFIG: frozenset({"SubAppId"}),
    DESCRIBE_EVENTS_STATE: frozenset({"SubAppId"}),
}
ACTIONS = frozenset(_PARAMETERS)


class ApiError(Exception):
    """An error reply: `Response.Error.Code` and `.Message`."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class ActionSettings:
    """The per-call knobs of the actions: long-poll hold and confirm batch policy."""

    hold_s: float
    strict_confirm: bool


def call(
    action: str, params: Mapping[str, Any], queue: EventQueue, settings: ActionSettings
) -> dict[str, Any]:
    """Run one action; returns the Response fields except RequestId, or raises ApiError."""
    allowed = _PARAMETERS.get(action)
    if allowed is None:
        raise ApiError("InvalidAction", f"The action `{action}` is not supported.")
    for name in params:
        if name not in allowed:
            raise ApiError("UnknownParameter", f"The parameter `{name}` is not recognized.")
    sub_app_id = _sub_app_id(params)
    if action == PULL_EVENTS:
        return _pull_events(queue, sub_app_id, settings)
    if action == CONFIRM_EVENTS:
        return _confirm_events(params, queue, sub_app_id, settings)
    if action == DESCRIBE_EVENTS_STATE:
        return {"CountOfEventsToPull": queue.pending_count(sub_app_id)}
    return {
        "Mode": "PULL",
        "NotificationUrl": "",
        "UploadMediaCompleteEventSwitch": "OFF",
        "DeleteMediaCompleteEventSwitch": "OFF",
        "PersistenceCompleteEventSwitch": "OFF",
    }


def params_from_query(query: Mapping[str, list[str]]) -> dict[str, Any]:
    """Rebuild JSON-like parameters from a GET query (`EventHandles.0=a&SubAppId=1`)."""
    params: dict[str, Any] = {}
    lists: dict[str, dict[int, str]] = {}
    for key, values in query.items():
        name, dot, index = key.partition(".")
        if dot and index.isdigit():
            lists.setdefault(name, {})[int(index)] = values[-1]
        elif name == "SubAppId" and values[-1].isdigit():
            params[name] = int(values[-1])
        else:
            params[key] = values[-1]
    for name, items in lists.items():
        params[name] = [items[i] for i in sorted(items)]
    return params


def _sub_app_id(params: Mapping[str, Any]) -> SubAppId:
    value = params.get("SubAppId")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError("InvalidParameterValue", "SubAppId must be a non-negative integer.")
    return value


def _pull_events(
    queue: EventQueue, sub_app_id: SubAppId, settings: ActionSettings
) -> dict[str, Any]:
    batch = queue.pull(sub_app_id, limit=MAX_BATCH, hold_s=settings.hold_s)
    if not batch:
        raise ApiError("ResourceNotFound", "no event")
    return {"EventSet": [{"EventHandle": handle, **body} for handle, body in batch]}


def _confirm_events(
    params: Mapping[str, Any], queue: EventQueue, sub_app_id: SubAppId, settings: ActionSettings
) -> dict[str, Any]:
    if "EventHandles" not in params:
        raise ApiError("MissingParameter", "The request is missing parameter `EventHandles`.")
    handles = params["EventHandles"]
    if not isinstance(handles, list) or not all(isinstance(h, str) for h in handles):
        raise ApiError("InvalidParameterValue", "EventHandles must be an array of strings.")
    if not 1 <= len(handles) <= MAX_BATCH:
        raise ApiError(
            "InvalidParameterValue",
            f"EventHandles must hold 1 to {MAX_BATCH} handles, not {len(handles)}.",
        )
    result = queue.confirm(handles, sub_app_id, strict=settings.strict_confirm)
    if result.refused:
        refused = "; ".join(f"{handle} ({why})" for handle, why in result.refused)
        raise ApiError(
            "InvalidParameterValue",
            f"Invalid EventHandles: {refused}. "
            f"{len(result.confirmed)} other handle(s) in this request were confirmed.",
        )
    return {}
