"""TC3-HMAC-SHA256 verification: each AuthFailure code, run-time credential changes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import requests
from tencentcloud.common import abstract_client
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
    TencentCloudSDKException,
)

from procpoll.emulator import Emulator
from procpoll.emulator.signature import Credentials, sign_headers, verify


def error_code(client: CommonClient, action: str = "DescribeEventsState") -> str:
    with pytest.raises(TencentCloudSDKException) as info:
        client.call_json(action, {})
    code: str = info.value.get_code()
    return code


def test_correctly_signed_request_is_served(vod: CommonClient) -> None:
    """A request the SDK signs with the configured id and key is answered normally."""
    assert "CountOfEventsToPull" in vod.call_json("DescribeEventsState", {})["Response"]


def test_wrong_secret_key_is_signature_failure(
    emu: Emulator, client_for: Callable[..., CommonClient]
) -> None:
    """The right SecretId signed with another key answers AuthFailure.SignatureFailure."""
    client = client_for(emu, secret_key="not-the-key")
    assert error_code(client) == "AuthFailure.SignatureFailure"


def test_unknown_secret_id_is_secret_id_not_found(
    emu: Emulator, client_for: Callable[..., CommonClient]
) -> None:
    """A SecretId the emulator does not know answers AuthFailure.SecretIdNotFound."""
    client = client_for(emu, secret_id="AKIDsomebodyelse")
    assert error_code(client) == "AuthFailure.SecretIdNotFound"


@pytest.mark.parametrize("skew_s", [-600, 600])
def test_timestamp_off_by_more_than_5_minutes_is_signature_expire(
    emu: Emulator, vod: CommonClient, monkeypatch: pytest.MonkeyPatch, skew_s: int
) -> None:
    """An SDK whose clock is 10 minutes off (either way) gets AuthFailure.SignatureExpire."""
    real_time = time.time
    monkeypatch.setattr(abstract_client, "time", SimpleNamespace(time=lambda: real_time() + skew_s))
    assert error_code(vod) == "AuthFailure.SignatureExpire"


def test_timestamp_within_5_minutes_is_accepted(
    vod: CommonClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four minutes of clock skew is within VOD's tolerance."""
    real_time = time.time
    monkeypatch.setattr(abstract_client, "time", SimpleNamespace(time=lambda: real_time() - 240))
    vod.call_json("DescribeEventsState", {})


def test_configured_token_is_required(
    start_emulator: Callable[..., Emulator], client_for: Callable[..., CommonClient]
) -> None:
    """With a session token configured, a missing or wrong X-TC-Token is TokenFailure."""
    emulator = start_emulator(session_token="tok-1")
    assert error_code(client_for(emulator)) == "AuthFailure.TokenFailure"
    assert error_code(client_for(emulator, token="tok-2")) == "AuthFailure.TokenFailure"
    client_for(emulator, token="tok-1").call_json("DescribeEventsState", {})


def test_credentials_can_be_rotated_at_run_time(
    emu: Emulator, client_for: Callable[..., CommonClient]
) -> None:
    """After set_credentials the old key is refused and the new one (with token) accepted."""
    old = client_for(emu)
    emu.set_credentials("AKIDrotated", "rotated-key", token="tok")
    assert error_code(old) == "AuthFailure.SecretIdNotFound"
    assert (emu.secret_id, emu.secret_key) == ("AKIDrotated", "rotated-key")
    client_for(emu, token="tok").call_json("DescribeEventsState", {})


def test_missing_authorization_is_signature_failure(emu: Emulator) -> None:
    """A request without an Authorization header answers AuthFailure.SignatureFailure."""
    headers = signed(emu, b"{}")
    del headers["Authorization"]
    assert post(emu, headers, b"{}") == "AuthFailure.SignatureFailure"


def test_malformed_authorization_is_invalid_authorization(emu: Emulator, vod: CommonClient) -> None:
    """An Authorization that is not TC3 (here the SDK's SkipSign "SKIP") is InvalidAuthorization."""
    with pytest.raises(TencentCloudSDKException) as info:
        vod.call_json("DescribeEventsState", {}, options={"SkipSign": True})
    assert info.value.get_code() == "AuthFailure.InvalidAuthorization"


def test_tampered_body_is_signature_failure(emu: Emulator) -> None:
    """Changing the body after signing breaks the payload hash: AuthFailure.SignatureFailure."""
    headers = signed(emu, b"{}")
    assert post(emu, headers, b'{"SubAppId": 1}') == "AuthFailure.SignatureFailure"


def test_verify_accepts_header_values_signed_as_sent_or_lower_cased() -> None:
    """A Host signed as sent (the SDK) or lower-cased (the docs' recipe) both verify."""
    creds = Credentials("AKID", "key")
    now = int(time.time())

    def headers_signed_with(host: str) -> dict[str, str]:
        headers = sign_headers(
            credentials=creds, host=host, action="A", version="v", body=b"", timestamp=now
        )
        received = {name.lower(): value for name, value in headers.items()}
        return {**received, "host": "VOD.Example:80"}

    for signed_host in ("VOD.Example:80", "vod.example:80"):
        headers = headers_signed_with(signed_host)
        result = verify(
            method="POST",
            path="/",
            query="",
            headers=headers,
            body=b"",
            credentials=creds,
            now=now,
        )
        assert result is None, signed_host


def signed(emu: Emulator, body: bytes) -> dict[str, str]:
    credentials = Credentials(emu.secret_id, emu.secret_key)
    return sign_headers(
        credentials=credentials,
        host=emu.endpoint,
        action="DescribeEventsState",
        version="2018-07-17",
        body=body,
        timestamp=int(time.time()),
    )


def post(emu: Emulator, headers: dict[str, str], body: bytes) -> str:
    reply = requests.post(f"http://{emu.endpoint}/", data=body, headers=headers, timeout=5)
    assert reply.headers["Content-Type"] == "application/json"
    code: str = json.loads(reply.content)["Response"]["Error"]["Code"]
    return code
