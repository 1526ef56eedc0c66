"""The VOD actions as the real SDK sees them: pull, confirm, redelivery, sub-apps, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from tencentcloud.common import credential
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
    TencentCloudSDKException,
)
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile

from procpoll.emulator import Emulator, generate_events


def pull(client: CommonClient, **params: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.call_json("PullEvents", params)["Response"]["EventSet"]
    return events


def handles(events: list[dict[str, Any]]) -> list[str]:
    return [event["EventHandle"] for event in events]


def error_code(call: Callable[[], object]) -> str:
    with pytest.raises(TencentCloudSDKException) as info:
        call()
    code: str = info.value.get_code()
    return code


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `predicate` until true or the deadline (for state only visible over HTTP)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_pull_returns_at_most_16_events_in_enqueue_order(emu: Emulator, vod: CommonClient) -> None:
    """40 queued events come back as batches of 16, 16 and 8, in the order enqueued."""
    bodies = generate_events(40, seed=1)
    emu.enqueue(bodies)
    batches = [pull(vod) for _ in range(3)]
    assert [len(b) for b in batches] == [16, 16, 8]
    received = [{k: v for k, v in e.items() if k != "EventHandle"} for b in batches for e in b]
    assert received == bodies


def test_each_event_item_is_handle_plus_normal_callback_body(
    emu: Emulator, vod: CommonClient
) -> None:
    """An EventSet item is {"EventHandle": h, **body} with a handle unique in the batch."""
    body = {"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": ["1"]}}
    emu.enqueue([body, {**body, "FileDeleteEvent": {"FileIdSet": ["2"]}}])
    response = vod.call_json("PullEvents", {})["Response"]
    assert set(response) == {"EventSet", "RequestId"}
    first = response["EventSet"][0]
    assert next(iter(first)) == "EventHandle"
    assert {k: v for k, v in first.items() if k != "EventHandle"} == body
    assert len(set(handles(response["EventSet"]))) == 2


def test_confirm_removes_events_and_drains(emu: Emulator, vod: CommonClient) -> None:
    """Confirming every pulled handle empties the queue and counts them as confirmed."""
    emu.enqueue(generate_events(20, seed=2))
    while (stats := emu.stats())["pending"]:
        vod.call_json("ConfirmEvents", {"EventHandles": handles(pull(vod))})
        assert stats["pending"] > emu.stats()["pending"]
    assert emu.wait_drained(1.0)
    stats = emu.stats()
    assert (stats["confirmed"], stats["in_flight"], stats["redelivered"]) == (20, 0, 0)
    assert stats["actions"]["ConfirmEvents"] == {"calls": 2, "errors": 0}


def test_empty_queue_answers_resource_not_found_after_the_hold(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """With nothing to pull, PullEvents holds ~hold_s then fails with ResourceNotFound/no event."""
    emulator = start_emulator(hold_s=0.3)
    started = time.monotonic()
    with pytest.raises(TencentCloudSDKException) as info:
        client_for(emulator).call_json("PullEvents", {})
    elapsed = time.monotonic() - started
    assert (info.value.get_code(), info.value.get_message()) == ("ResourceNotFound", "no event")
    assert 0.25 <= elapsed < 2.0
    assert emulator.stats()["error_codes"] == {"ResourceNotFound": 1}


def test_enqueue_wakes_a_held_pull_at_once(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """A pull held on an empty queue returns as soon as an event is enqueued, not at hold end."""
    emulator = start_emulator(hold_s=5.0)
    result: list[list[dict[str, Any]]] = []
    puller = threading.Thread(target=lambda: result.append(pull(client_for(emulator))))
    puller.start()
    assert emulator.wait_held(pulls=1, timeout_s=5)
    enqueued_at = time.monotonic()
    emulator.enqueue(generate_events(1, seed=3))
    puller.join(5)
    assert time.monotonic() - enqueued_at < 2.0
    assert len(result) == 1
    assert len(result[0]) == 1


def test_unconfirmed_event_is_redelivered_with_a_new_handle(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """After the confirm window the same body comes back under a fresh handle: a redelivery."""
    emulator = start_emulator(confirm_window_s=0.3, hold_s=2.0)
    client = client_for(emulator)
    emulator.enqueue(generate_events(1, seed=4))
    first = pull(client)
    pulled_at = time.monotonic()
    second = pull(client)  # held until the window lapses, then woken by the expiry
    assert time.monotonic() - pulled_at < 1.5
    assert handles(first) != handles(second)
    strip = [{k: v for k, v in e.items() if k != "EventHandle"} for e in first + second]
    assert strip[0] == strip[1]
    assert emulator.stats()["redelivered"] == 1


def test_expired_handle_is_refused_and_counted_late(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """Confirming after the window answers InvalidParameterValue and counts a late confirm."""
    emulator = start_emulator(confirm_window_s=0.2)
    client = client_for(emulator)
    emulator.enqueue(generate_events(1, seed=5))
    stale = handles(pull(client))
    assert wait_until(lambda: emulator.stats()["pending"] == 1, 2.0)
    code = error_code(lambda: client.call_json("ConfirmEvents", {"EventHandles": stale}))
    assert code == "InvalidParameterValue"
    stats = emulator.stats()
    assert (stats["late_confirms"], stats["confirmed"], stats["pending"]) == (1, 0, 1)


def test_default_batch_confirms_the_valid_handles_despite_a_bad_one(
    emu: Emulator, vod: CommonClient
) -> None:
    """Default policy: a bad handle fails the call, but the batch's valid handles are confirmed."""
    emu.enqueue(generate_events(3, seed=6))
    good = handles(pull(vod))
    batch = {"EventHandles": [*good, "no-such-handle"]}
    assert error_code(lambda: vod.call_json("ConfirmEvents", batch)) == "InvalidParameterValue"
    assert emu.stats()["confirmed"] == 3
    assert emu.wait_drained(0.5)


def test_strict_batch_confirms_nothing_when_one_handle_is_bad(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """strict_confirm: one bad handle rejects the whole batch; the good handles stay valid."""
    emulator = start_emulator(strict_confirm=True)
    client = client_for(emulator)
    emulator.enqueue(generate_events(3, seed=7))
    good = handles(pull(client))
    batch = {"EventHandles": [*good, "no-such-handle"]}
    assert error_code(lambda: client.call_json("ConfirmEvents", batch)) == "InvalidParameterValue"
    assert emulator.stats()["confirmed"] == 0
    client.call_json("ConfirmEvents", {"EventHandles": good})
    assert emulator.stats()["confirmed"] == 3


@pytest.mark.parametrize("count", [0, 17])
def test_confirm_needs_1_to_16_handles(emu: Emulator, vod: CommonClient, count: int) -> None:
    """ConfirmEvents with 0 or 17 handles is InvalidParameterValue and confirms nothing."""
    emu.enqueue(generate_events(17, seed=8))
    pulled = handles(pull(vod)) + handles(pull(vod))
    batch = {"EventHandles": pulled[:count]}
    assert error_code(lambda: vod.call_json("ConfirmEvents", batch)) == "InvalidParameterValue"
    assert emu.stats()["confirmed"] == 0


def test_confirming_twice_is_refused(emu: Emulator, vod: CommonClient) -> None:
    """A handle already confirmed is InvalidParameterValue the second time, not a late confirm."""
    emu.enqueue(generate_events(1, seed=9))
    batch = {"EventHandles": handles(pull(vod))}
    vod.call_json("ConfirmEvents", batch)
    assert error_code(lambda: vod.call_json("ConfirmEvents", batch)) == "InvalidParameterValue"
    assert (emu.stats()["confirmed"], emu.stats()["late_confirms"]) == (1, 0)


def test_sub_app_queues_are_isolated(emu: Emulator, vod: CommonClient) -> None:
    """Each SubAppId (absent = default app) has its own queue and its own handles."""
    emu.enqueue(generate_events(2, seed=10))
    emu.enqueue(generate_events(3, seed=11), sub_app_id=1500000001)
    assert len(pull(vod, SubAppId=1500000001)) == 3
    default = pull(vod)
    assert len(default) == 2
    assert error_code(lambda: pull(vod, SubAppId=1500000002)) == "ResourceNotFound"
    wrong_app = {"EventHandles": handles(default), "SubAppId": 1500000001}
    assert error_code(lambda: vod.call_json("ConfirmEvents", wrong_app)) == (
        "InvalidParameterValue"
    )
    vod.call_json("ConfirmEvents", {"EventHandles": handles(default)})
    per_app = emu.stats()["sub_apps"]
    assert per_app["default"]["confirmed"] == 2
    assert per_app["1500000001"]["in_flight"] == 3


def test_describe_event_config_reports_pull_mode(vod: CommonClient) -> None:
    """DescribeEventConfig answers Mode PULL, an empty URL and the three switches OFF."""
    response = vod.call_json("DescribeEventConfig", {})["Response"]
    assert response.pop("RequestId")
    assert response == {
        "Mode": "PULL",
        "NotificationUrl": "",
        "UploadMediaCompleteEventSwitch": "OFF",
        "DeleteMediaCompleteEventSwitch": "OFF",
        "PersistenceCompleteEventSwitch": "OFF",
    }


def test_describe_events_state_counts_events_to_pull(emu: Emulator, vod: CommonClient) -> None:
    """DescribeEventsState.CountOfEventsToPull is the number of events a pull could get now."""
    emu.enqueue(generate_events(20, seed=12))
    pull(vod)
    assert vod.call_json("DescribeEventsState", {})["Response"]["CountOfEventsToPull"] == 4


def test_unknown_action_is_invalid_action(vod: CommonClient) -> None:
    """An action the emulator does not serve answers InvalidAction."""
    assert error_code(lambda: vod.call_json("DescribeMediaInfos", {})) == "InvalidAction"


def test_other_version_is_no_such_version(emu: Emulator) -> None:
    """A version other than 2018-07-17 answers NoSuchVersion."""
    http = HttpProfile(protocol="http", endpoint=emu.endpoint, reqTimeout=5)
    cred = credential.Credential(emu.secret_id, emu.secret_key)
    client = CommonClient("vod", "2024-07-18", cred, "", profile=ClientProfile(httpProfile=http))
    assert error_code(lambda: client.call_json("PullEvents", {})) == "NoSuchVersion"


def test_unknown_parameter_is_refused(vod: CommonClient) -> None:
    """A parameter the action does not take answers UnknownParameter, as VOD does."""
    assert error_code(lambda: vod.call_json("PullEvents", {"Limit": 5})) == "UnknownParameter"


def test_replies_are_exactly_application_json(emu: Emulator) -> None:
    """Every API reply, error or not, is HTTP 200 with Content-Type exactly application/json."""
    reply = requests.post(f"http://{emu.endpoint}/", data=b"{}", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert set(reply.json()["Response"]) == {"Error", "RequestId"}


def test_get_requests_are_signed_and_served_too(
    emu: Emulator, client_for: Callable[..., CommonClient]
) -> None:
    """The SDK's GET form (query-string parameters, EventHandles.N) pulls and confirms."""
    client = client_for(emu, method="GET")
    emu.enqueue(generate_events(2, seed=13), sub_app_id=7)
    pulled = pull(client, SubAppId=7)
    client.call_json("ConfirmEvents", {"EventHandles": handles(pulled), "SubAppId": 7})
    assert emu.stats()["confirmed"] == 2


def test_events_can_be_enqueued_and_stats_read_over_http(emu: Emulator, vod: CommonClient) -> None:
    """POST /_emulator/events queues bodies (list or one, ?sub_app_id=N); GET stats reports."""
    base = f"http://{emu.endpoint}/_emulator"
    bodies = generate_events(3, seed=14)
    assert requests.post(f"{base}/events", json=bodies, timeout=5).json() == {"enqueued": 3}
    one = requests.post(f"{base}/events?sub_app_id=9", json=bodies[0], timeout=5)
    assert one.json() == {"enqueued": 1}
    assert len(pull(vod)) == 3
    assert len(pull(vod, SubAppId=9)) == 1
    stats = requests.get(f"{base}/stats", timeout=5).json()
    assert stats["enqueued"] == 4
    assert stats["in_flight"] == 4
    assert stats["actions"]["PullEvents"] == {"calls": 2, "errors": 0}
    bad = requests.post(f"{base}/events", json=[1, 2], timeout=5)
    assert bad.status_code == 400
