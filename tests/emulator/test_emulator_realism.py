"""Realism on demand: rate limits, injected faults, partitions, latency, prompt stop."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
    TencentCloudSDKException,
)

from procpoll.emulator import Emulator, Fault, generate_events


def outcome(client: CommonClient, action: str = "PullEvents", **params: Any) -> str:
    """ "ok" or the SDK's error code for one call."""
    try:
        client.call_json(action, params)
    except TencentCloudSDKException as exc:
        code: str = exc.get_code()
        return code
    return "ok"


def test_rate_limit_answers_request_limit_exceeded_per_action(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """Beyond `rate` requests/s for one action VOD's RequestLimitExceeded comes back."""
    emulator = start_emulator(rate=2)
    client = client_for(emulator)
    results = [outcome(client, "DescribeEventsState") for _ in range(6)]
    assert "RequestLimitExceeded" in results
    assert results[0] == "ok"
    assert outcome(client, "DescribeEventConfig") == "ok"  # another action, another bucket
    assert emulator.stats()["error_codes"]["RequestLimitExceeded"] >= 1


@pytest.mark.parametrize(
    ("kind", "sdk_code"),
    [
        (Fault.INTERNAL_ERROR, "InternalError"),
        (Fault.REQUEST_LIMIT, "RequestLimitExceeded"),
        (Fault.BAD_GATEWAY, "ServerNetworkError"),
        (Fault.CONNECTION_RESET, "ClientNetworkError"),
        (Fault.SLOW_REPLY, "ClientNetworkError"),
    ],
)
def test_each_fault_kind_reaches_the_sdk_and_hides_no_event(
    start_emulator: Callable[..., Emulator],
    client_for: Callable[..., CommonClient],
    kind: Fault,
    sdk_code: str,
) -> None:
    """A faulted PullEvents fails as the SDK expects for that kind and dequeues nothing."""
    emulator = start_emulator(faults=1.0)
    emulator.set_faults(1.0, [kind])
    emulator.enqueue(generate_events(3, seed=1))
    assert outcome(client_for(emulator, timeout_s=0.5)) == sdk_code
    stats = emulator.stats()
    assert stats["faults"] == {kind.value: 1}
    assert (stats["pending"], stats["in_flight"], stats["delivered"]) == (3, 0, 0)
    assert stats["actions"]["PullEvents"] == {"calls": 1, "errors": 1}


@pytest.mark.parametrize("kind", list(Fault))
def test_faulted_confirm_confirms_nothing(
    start_emulator: Callable[..., Emulator],
    client_for: Callable[..., CommonClient],
    kind: Fault,
) -> None:
    """A ConfirmEvents that gets any fault leaves its handles unconfirmed and still valid."""
    emulator = start_emulator()
    client = client_for(emulator, timeout_s=0.5)
    emulator.enqueue(generate_events(2, seed=2))
    pulled = client.call_json("PullEvents", {})["Response"]["EventSet"]
    batch = {"EventHandles": [event["EventHandle"] for event in pulled]}
    emulator.set_faults(1.0, [kind])
    assert outcome(client, "ConfirmEvents", **batch) != "ok"
    assert emulator.stats()["confirmed"] == 0
    emulator.set_faults(0.0)
    assert outcome(client, "ConfirmEvents", **batch) == "ok"
    assert emulator.wait_drained(1.0)


def fault_run(client_for: Callable[..., CommonClient], emulator: Emulator) -> list[str]:
    client = client_for(emulator, timeout_s=0.3)
    results: list[str] = []
    while set(emulator.stats()["faults"]) != {kind.value for kind in Fault}:
        assert len(results) < 60, results
        results.append(outcome(client, "DescribeEventConfig"))
    return results


def test_seeded_faults_mix_every_kind_reproducibly(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """faults=RATE mixes all five kinds; the same seed draws the same sequence."""
    first = fault_run(client_for, start_emulator(faults=0.8, seed=42))
    second = fault_run(client_for, start_emulator(faults=0.8, seed=42))
    assert first == second
    assert {"InternalError", "RequestLimitExceeded", "ServerNetworkError"} <= set(first)
    assert "ClientNetworkError" in first


def test_draining_through_faults_loses_no_event(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """Pull/confirm through 30% faults of every kind until drained: every event arrives once."""
    emulator = start_emulator(faults=0.3, seed=7, hold_s=0.1)
    client = client_for(emulator, timeout_s=0.3)
    bodies = generate_events(60, seed=3)
    emulator.enqueue(bodies)
    received: dict[str, int] = {}
    deadline = time.monotonic() + 25
    while emulator.stats()["confirmed"] < len(bodies):
        assert time.monotonic() < deadline, emulator.stats()
        try:
            pulled = client.call_json("PullEvents", {})["Response"]["EventSet"]
        except TencentCloudSDKException:
            continue
        for event in pulled:
            key = json.dumps({k: v for k, v in event.items() if k != "EventHandle"})
            received[key] = received.get(key, 0) + 1
        batch = {"EventHandles": [event["EventHandle"] for event in pulled]}
        while (result := outcome(client, "ConfirmEvents", **batch)) != "ok":
            assert result != "InvalidParameterValue", "a faulted confirm must not confirm"
    assert emulator.wait_drained(1.0)
    assert sorted(received) == sorted(json.dumps(body) for body in bodies)
    assert set(received.values()) == {1}
    assert sum(emulator.stats()["faults"].values()) > 0


def test_partition_holds_requests_until_lifted(
    emu: Emulator, client_for: Callable[..., CommonClient]
) -> None:
    """While partitioned a request gets no answer; lifting the partition answers it."""
    emu.set_partition(True)
    results: list[str] = []
    caller = threading.Thread(
        target=lambda: results.append(outcome(client_for(emu), "DescribeEventConfig"))
    )
    caller.start()
    assert emu.wait_held(partitioned=1, timeout_s=5)
    assert emu.stats()["held"]["partitioned"] == 1
    assert not results
    emu.set_partition(False)
    caller.join(5)
    assert results == ["ok"]


def test_partition_looks_like_a_timeout_to_the_sdk(
    emu: Emulator, client_for: Callable[..., CommonClient]
) -> None:
    """A client whose timeout passes during a partition sees ClientNetworkError."""
    emu.set_partition(True)
    assert outcome(client_for(emu, timeout_s=0.3), "DescribeEventConfig") == "ClientNetworkError"


def test_latency_delays_every_reply(emu: Emulator, vod: CommonClient) -> None:
    """set_latency_ms adds that delay before each API reply."""
    emu.set_latency_ms(300)
    started = time.monotonic()
    vod.call_json("DescribeEventConfig", {})
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("situation", ["held pull", "slow reply", "partition"])
def test_stop_is_prompt_while_requests_are_held(
    start_emulator: Callable[..., Emulator],
    client_for: Callable[..., CommonClient],
    situation: str,
) -> None:
    """stop() returns within a second during a 30 s long poll, a 120 s slow reply or a partition."""
    emulator = start_emulator(hold_s=30)
    if situation == "slow reply":
        emulator.set_faults(1.0, [Fault.SLOW_REPLY])
    if situation == "partition":
        emulator.set_partition(True)
    results: list[str] = []
    caller = threading.Thread(target=lambda: results.append(outcome(client_for(emulator))))
    caller.start()
    held = {
        "held pull": {"pulls": 1},
        "slow reply": {"slow_replies": 1},
        "partition": {"partitioned": 1},
    }[situation]
    assert emulator.wait_held(**held, timeout_s=5)
    started = time.monotonic()
    emulator.stop()
    assert time.monotonic() - started < 1.0
    caller.join(5)
    assert results
    assert results[0] in {"ResourceNotFound", "ClientNetworkError"}
    emulator.stop()  # idempotent


def test_settings_endpoint_changes_faults_partition_and_latency(emu: Emulator) -> None:
    """POST /_emulator/settings sets faults, fault kinds, partition and latency at run time."""
    url = f"http://{emu.endpoint}/_emulator/settings"
    settings = {"faults": 0.5, "fault_kinds": ["bad_gateway"], "partition": True, "latency_ms": 5}
    assert requests.post(url, json=settings, timeout=5).json() == {
        "faults": 0.5,
        "fault_kinds": ["bad_gateway"],
        "partition": True,
        "latency_ms": 5.0,
    }
    assert emu.stats()["held"]["partitioned"] == 0
    assert requests.post(url, json={"partition": "yes"}, timeout=5).status_code == 400
    assert requests.post(url, json={"fault_kinds": ["meteor"]}, timeout=5).status_code == 400
    assert requests.post(url, json={"colour": 1}, timeout=5).status_code == 400
    reset = requests.post(url, json={"faults": 0, "partition": False}, timeout=5).json()
    assert (reset["faults"], reset["partition"]) == (0.0, False)
