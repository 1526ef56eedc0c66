"""The SDK adapter: every reply shape the SDK can produce maps onto procpoll's errors."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

from procpoll.config import CredentialsConfig, VodConfig
from procpoll.errors import (
    AuthError,
    ConfigError,
    ExpiredHandleError,
    PermanentApiError,
    TransientApiError,
)
from procpoll.vod import CredentialChain, TencentVod, decode_reply
from tests.scripted_api import DROP, HANG, ScriptedApi

ENV = {"TENCENTCLOUD_SECRET_ID": "AKIDtest", "TENCENTCLOUD_SECRET_KEY": "key-test"}


@pytest.fixture
def server() -> Iterator[ScriptedApi]:
    """The API's side: each test queues the answers."""
    scripted = ScriptedApi()
    yield scripted
    scripted.close()


@pytest.fixture
def api(server: ScriptedApi) -> Iterator[TencentVod]:
    config = VodConfig(endpoint=server.endpoint, scheme="http", request_timeout_s=6)
    client = TencentVod(config, CredentialChain(CredentialsConfig(), ENV))
    yield client
    client.close()


def error(code: str, message: str = "m") -> dict[str, Any]:
    return {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": "r-1"}}


def test_pull_returns_the_event_set(api: TencentVod, server: ScriptedApi) -> None:
    """EventSet items come back as decoded dicts, SubAppId is sent when configured."""
    server.queue({"Response": {"EventSet": [{"EventHandle": "h", "EventType": "X"}],
                               "RequestId": "r"}})
    assert api.pull(1500000001) == [{"EventHandle": "h", "EventType": "X"}]
    sent = server.calls[0].json()
    assert sent == {"SubAppId": 1500000001}
    assert server.calls[0].headers["X-TC-Action"] == "PullEvents"


@pytest.mark.parametrize("body", [
    error("ResourceNotFound", "no event"),
    {"Response": {"EventSet": None, "RequestId": "r"}},
    {"Response": {"EventSet": [], "RequestId": "r"}},
    {"Response": {"RequestId": "r"}},
])
def test_empty_queue_shapes_are_an_empty_list(api: TencentVod, server: ScriptedApi,
                                              body: dict[str, Any]) -> None:
    """'no event', null and missing EventSet all mean empty, never an error."""
    server.queue(body)
    assert api.pull(None) == []


@pytest.mark.parametrize(("code", "kind"), [
    ("AuthFailure.SignatureFailure", AuthError),
    ("AuthFailure.SecretIdNotFound", AuthError),
    ("UnauthorizedOperation", AuthError),
    ("RequestLimitExceeded", TransientApiError),
    ("RequestLimitExceeded.UinLimitExceeded", TransientApiError),
    ("InternalError", TransientApiError),
    ("FailedOperation.InvalidVodUser", PermanentApiError),
    ("InvalidParameterValue", PermanentApiError),
])
def test_api_error_codes_are_classified(api: TencentVod, server: ScriptedApi, code: str,
                                        kind: type) -> None:
    """Auth, transient and permanent codes raise the matching procpoll error."""
    server.queue(error(code))
    with pytest.raises(kind) as info:
        api.pull(None)
    assert info.value.code == code


def test_error_with_charset_content_type_is_still_an_error(api: TencentVod,
                                                           server: ScriptedApi) -> None:
    """The SDK ignores errors unless Content-Type is exactly application/json; we do not."""
    server.queue(error("AuthFailure.SignatureFailure"),
                 content_type="application/json; charset=utf-8")
    with pytest.raises(AuthError):
        api.pull(None)


@pytest.mark.parametrize(("body", "status", "content_type"), [
    ("<html>bad gateway</html>", 502, "text/html"),
    ("not json at all", 200, "application/json"),
    (b"\xff\xfe\x00junk", 200, "application/json"),
    ('{"NoResponse": 1}', 200, "application/json"),
    ('{"Response": "string"}', 200, "application/json"),
    ('{"Response": {"EventSet": {"a": 1}}}', 200, "application/json"),
    ('{"Response": {"Error": "string", "RequestId": "r"}}', 200, "application/json"),
    ("[1, 2]", 200, "application/json"),
])
def test_junk_replies_are_transient(api: TencentVod, server: ScriptedApi, body: Any, status: int,
                                    content_type: str) -> None:
    """Non-200, non-JSON, invalid UTF-8 and shapeless JSON are retried, never a crash."""
    server.queue(body, status=status, content_type=content_type)
    with pytest.raises(TransientApiError):
        api.pull(None)


def test_network_errors_are_transient(server: ScriptedApi) -> None:
    """A connection dropped unanswered and an answer later than request_timeout (the whole
    call's bound) become TransientApiError."""
    config = VodConfig(endpoint=server.endpoint, scheme="http", request_timeout_s=0.5)
    api = TencentVod(config, CredentialChain(CredentialsConfig(), ENV))
    server.queue_answer(DROP)
    server.queue_answer(HANG)
    for reason in ("ConnectionError", "ReadTimeout"):
        with pytest.raises(TransientApiError) as info:
            api.pull(None)
        assert (info.value.code, info.value.message) == ("ClientNetworkError", reason)
    server.queue({"Response": {"EventSet": [], "RequestId": "r"}})
    assert api.pull(None) == []  # a fresh connection after the failed ones
    api.close()


def test_confirm_refused_handle_is_an_expired_handle(api: TencentVod, server: ScriptedApi) -> None:
    """InvalidParameterValue on ConfirmEvents means the handle expired."""
    server.queue(error("InvalidParameterValue"))
    with pytest.raises(ExpiredHandleError):
        api.confirm(None, ["h1"])


def test_confirm_sends_the_handles(api: TencentVod, server: ScriptedApi) -> None:
    """ConfirmEvents carries EventHandles and SubAppId."""
    server.queue({"Response": {"RequestId": "r"}})
    api.confirm(7, ["a", "b"])
    assert server.calls[0].json() == {
        "EventHandles": ["a", "b"], "SubAppId": 7}


def test_confirm_refuses_more_than_16_handles(api: TencentVod, server: ScriptedApi) -> None:
    """The API takes at most 16 handles; asking for more is a programming error."""
    with pytest.raises(ValueError, match=r"1\.\.16"):
        api.confirm(None, [str(n) for n in range(17)])


# --- credentials ------------------------------------------------------------------------


def chain(tmp_path: Path, env: dict[str, str], **files: Any) -> CredentialChain:
    config = CredentialsConfig(profile_file=tmp_path / "no-profile", **files)
    return CredentialChain(config, env)


def test_environment_wins_and_keeps_the_session_token(tmp_path: Path) -> None:
    """Env credentials come first and TENCENTCLOUD_SESSION_TOKEN is kept."""
    found = chain(tmp_path, {**ENV, "TENCENTCLOUD_SESSION_TOKEN": "tok"}).get()
    assert (found.secret_id, found.secret_key, found.token, found.source) == \
        ("AKIDtest", "key-test", "tok", "environment")


def test_systemd_credentials_directory(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/secret-id and secret-key (LoadCredential=) are read."""
    (tmp_path / "secret-id").write_text("AKIDdir\n", encoding="utf-8")
    (tmp_path / "secret-key").write_text("key-dir\n", encoding="utf-8")
    found = chain(tmp_path, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).get()
    assert (found.secret_id, found.secret_key, found.source) == \
        ("AKIDdir", "key-dir", "credentials-directory")


def test_config_files_are_reread_when_they_change(tmp_path: Path) -> None:
    """Rotating the key file is picked up on the next request, without a restart."""
    id_file, key_file = tmp_path / "id", tmp_path / "key"
    id_file.write_text("AKIDfile", encoding="utf-8")
    key_file.write_text("old-key", encoding="utf-8")
    creds = chain(tmp_path, {}, secret_id_file=id_file, secret_key_file=key_file)
    assert creds.get_credential_info()[1] == "old-key"
    key_file.write_text("new-key-longer", encoding="utf-8")
    os.utime(key_file, ns=(1, 10**18))
    assert creds.get_credential_info()[1] == "new-key-longer"


def test_profile_file(tmp_path: Path) -> None:
    """The SDK's INI profile file is read."""
    profile = tmp_path / "credentials"
    profile.write_text("[default]\nsecret_id = AKIDprof\nsecret_key = key-prof\n",
                       encoding="utf-8")
    found = CredentialChain(CredentialsConfig(profile_file=profile), {}).get()
    assert (found.secret_id, found.source) == ("AKIDprof", f"profile:{profile}")


def test_nothing_found_is_a_config_error_listing_the_sources(tmp_path: Path) -> None:
    """No credentials anywhere: ConfigError naming each place looked at."""
    with pytest.raises(ConfigError) as info:
        chain(tmp_path, {}).get()
    message = str(info.value)
    for source in ("env TENCENTCLOUD_SECRET_ID", "$CREDENTIALS_DIRECTORY", "profile file",
                   "CVM role"):
        assert source in message


def test_configured_file_missing_is_a_config_error(tmp_path: Path) -> None:
    """secret_id_file pointing nowhere is reported, not skipped."""
    with pytest.raises(ConfigError, match="credential file missing"):
        chain(tmp_path, {}, secret_id_file=tmp_path / "a", secret_key_file=tmp_path / "b").get()


# --- the reply decoder: json.loads' result, from orjson when it gives the same ----------------

REPLY_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62)
                 | st.integers(max_value=-(2**62)) | st.floats() | st.text(max_size=8))
REPLY_JSON = st.recursive(
    REPLY_SCALARS,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids,
                                                               max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(REPLY_JSON, st.sampled_from([None, 2]), st.booleans())
def test_reply_decoding_equals_json_loads(value: Any, indent: int | None, ascii_only: bool
                                          ) -> None:
    """Any reply (big integers, NaN, ±Infinity, any text, compact or indented) decodes to
    what json.loads gives: the same values of the same types (an int stays an int)."""
    content = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    expected = json.loads(content)
    assert json.dumps(decode_reply(content)) == json.dumps(expected)


@pytest.mark.parametrize("content", [
    b'{"FileId":18446744073709551616}', b'{"FileId": 123456789012345678901234}',
    b'[-9223372036854775809]', b'{"a":\n  [\n    -12345678901234567890\n  ]}',
    b'{"a":NaN,"b":-Infinity}', b'\xef\xbb\xbf{"a":1}', b'{"a":"\\ud800"}',
    '{"a":1}'.encode("utf-16"),
])
def test_replies_orjson_reads_otherwise_decode_as_json_does(content: bytes) -> None:
    """Integers past 64 bits keep every digit; NaN, a BOM, UTF-16 and lone surrogates are
    read as json.loads reads them."""
    assert json.dumps(decode_reply(content)) == json.dumps(json.loads(content))


def test_pulled_bare_integer_past_64_bits_keeps_its_digits(api: TencentVod,
                                                           server: ScriptedApi) -> None:
    """A pulled event with a bare integer too long for 64 bits comes back as that exact int."""
    server.queue('{"Response": {"EventSet": [{"EventHandle": "h", "EventType": "X", '
          '"XEvent": {"FileId": 52854854879852714901234}}], "RequestId": "r"}}')
    assert api.pull(None)[0]["XEvent"]["FileId"] == 52854854879852714901234


# --- the environment, read once per client -----------------------------------------------------


def test_a_netrc_entry_does_not_replace_the_signature(tmp_path: Path, server: ScriptedApi,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A ~/.netrc entry for the endpoint's host leaves the TC3 signature in Authorization
    (requests would have put Basic auth from it in its place)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password hunter2\n", encoding="utf-8")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    config = VodConfig(endpoint=server.endpoint, scheme="http", request_timeout_s=6)
    api = TencentVod(config, CredentialChain(CredentialsConfig(), ENV))
    server.queue({"Response": {"EventSet": [], "RequestId": "r"}})
    assert api.pull(None) == []
    assert server.calls[0].headers["Authorization"].startswith("TC3-HMAC-SHA256 ")
    api.close()


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself with an empty PullEvents reply."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append(self.path)
        body = json.dumps({"Response": {"EventSet": [], "RequestId": "r"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        """Quiet: the test reads `seen`."""


def test_all_proxy_from_the_environment_is_still_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALL_PROXY (read once when the client is built, not at every call) still routes calls
    through the proxy."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                     "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        config = VodConfig(endpoint="vod.invalid:9", scheme="http", request_timeout_s=6)
        api = TencentVod(config, CredentialChain(CredentialsConfig(), ENV))
        assert api.pull(None) == []
        assert _Proxy.seen == ["http://vod.invalid:9/"]
        api.close()
    finally:
        server.shutdown()
        server.server_close()


@responses.activate
def test_through_a_proxy_the_sdks_requests_transport_maps_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a proxy in the environment the SDK's own requests transport carries the calls:
    its replies, junk and network errors map onto the same procpoll errors."""
    for name in ("ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    url = "http://vod.test:9/"
    responses.add(responses.POST, url, json={"Response": {"EventSet": [{"EventHandle": "h"}],
                                                          "RequestId": "r"}})
    responses.add(responses.POST, url, json=error("RequestLimitExceeded"))
    responses.add(responses.POST, url, body="<html>bad gateway</html>", status=502)
    responses.add(responses.POST, url, body=requests.ConnectionError("reset"))
    config = VodConfig(endpoint="vod.test:9", scheme="http", request_timeout_s=6)
    api = TencentVod(config, CredentialChain(CredentialsConfig(), ENV))
    assert api.pull(None) == [{"EventHandle": "h"}]
    for code in ("RequestLimitExceeded", "ServerNetworkError", "ClientNetworkError"):
        with pytest.raises(TransientApiError) as info:
            api.pull(None)
        assert info.value.code == code
    assert responses.calls[0].request.headers["X-TC-Action"] == "PullEvents"
    api.close()
