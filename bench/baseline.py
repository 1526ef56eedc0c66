"""The consumer VOD users write by hand: pull, POST each event in turn, confirm all, repeat.

Exactly the naive shape the issue describes, over the SDK's CommonClient, so the
benchmark can print procpoll's speed as a multiple of it. One concession to
fairness: the webhook POSTs share a requests.Session (kept-alive connection), which
makes this loop faster than the usual `requests.post(...)` per event.

    python bench/baseline.py --endpoint 127.0.0.1:PORT --webhook URL --seconds 10

prints one JSON object: events, seconds, events_per_s, pulls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import requests
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.credential import Credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile


def run(endpoint: str, webhook: str, seconds: float, max_events: int) -> dict[str, Any]:
    """Drain for `seconds` (or `max_events`); the clock starts at the first pulled event."""
    cred = Credential(os.environ["TENCENTCLOUD_SECRET_ID"], os.environ["TENCENTCLOUD_SECRET_KEY"])
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=endpoint,
                                                    reqTimeout=10))
    client = CommonClient("vod", "2018-07-17", cred, "", profile=profile)
    session = requests.Session()
    events = pulls = 0
    started: float | None = None
    deadline = time.monotonic() + seconds + 30  # until the first event arrives
    while time.monotonic() < deadline and events < max_events:
        try:
            reply = client.call_json("PullEvents", {})
        except TencentCloudSDKException as exc:
            if exc.get_code() in ("ResourceNotFound", "RequestLimitExceeded"):
                continue
            raise
        pulls += 1
        if started is None:
            started = time.monotonic()
            deadline = started + seconds
        handles = []
        for item in reply["Response"].get("EventSet") or []:
            handles.append(item.pop("EventHandle"))
            response = session.post(webhook, data=json.dumps(item),
                                    headers={"Content-Type": "application/json"}, timeout=10)
            response.raise_for_status()
        if handles:
            client.call_json("ConfirmEvents", {"EventHandles": handles})
            events += len(handles)
    elapsed = time.monotonic() - (started or time.monotonic())
    return {"events": events, "seconds": round(elapsed, 3),
            "events_per_s": round(events / elapsed, 1) if elapsed else 0.0, "pulls": pulls}


def main() -> int:
    """Command line: run the loop and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="emulator host:port")
    parser.add_argument("--webhook", required=True, help="receiver URL")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-events", type=int, default=1_000_000)
    args = parser.parse_args()
    print(json.dumps(run(args.endpoint, args.webhook, args.seconds, args.max_events)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
