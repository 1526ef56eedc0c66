"""The VOD API adapter: the only module that imports tencentcloud.

It owns the SDK client, the credential chain and the mapping of every SDK outcome
(errors, quirks, junk replies) onto procpoll's own error types.
"""

from __future__ import annotations

import configparser
import json
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import certifi
import orjson
import requests
from requests.utils import select_proxy
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
    TencentCloudSDKException,
)
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile

from procpoll.config import Config, CredentialsConfig, VodConfig
from procpoll.errors import (
    ApiError,
    AuthError,
    ConfigError,
    ExpiredHandleError,
    PermanentApiError,
    TransientApiError,
)
from procpoll.httpconn import Origin, Reply, TransportError
from procpoll.logs import forget_secret, register_secret

MAX_HANDLES_PER_CONFIRM = 16
REDACTED_CREDENTIAL_SETS = 4
"""Credential sets (current and recent) kept redacted; older rotations are forgotten."""
API_VERSION = "2018-07-17"
API_REQUESTS_PER_S = 100.0
"""VOD's limit per API action and account; each action is paced a little below it."""
API_PACE_PER_S = API_REQUESTS_PER_S * 0.95

_TRANSIENT_CODES = ("RequestLimitExceeded", "InternalError", "ClientNetworkError",
                    "ServerNetworkError", "FailedOperation.Timeout")


class VodApi(Protocol):
    """What the daemon needs from VOD."""

    def pull(self, sub_app_id: int | None) -> list[Any]:
        """PullEvents: the EventSet items ([] when the queue is empty)."""

    def confirm(self, sub_app_id: int | None, handles: Sequence[str]) -> None:
        """ConfirmEvents for ≤ 16 handles."""

    def describe_event_config(self, sub_app_id: int | None) -> dict[str, Any]:
        """DescribeEventConfig: the Response dict (Mode, NotificationUrl, …)."""

    def close(self) -> None:
        """Close the client's connections (its thread is done with it)."""


# --- credentials -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Secrets:
    """One set of API credentials and where they came from (never the values in logs)."""

    secret_id: str
    secret_key: str
    token: str | None
    source: str


class CredentialChain:
    """Finds credentials, first found wins, and re-reads files when they change.

    Order: environment, $CREDENTIALS_DIRECTORY (systemd LoadCredential=), the
    [credentials] files, the SDK profile file, the CVM role (only when configured:
    it calls the instance metadata service).
    """

    CREDENTIAL_NAMES = ("secret-id", "secret-key", "session-token")

    def __init__(self, config: CredentialsConfig, environ: Mapping[str, str] | None = None) -> None:
        self._config = config
        self._environ = dict(os.environ if environ is None else environ)
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self._current: Secrets | None = None
        self._redacted: deque[Secrets] = deque()  # the sets registered for redaction

    def tried(self) -> list[str]:
        """The sources this chain looks at, in order, for error messages."""
        creds_dir = self._environ.get("CREDENTIALS_DIRECTORY")
        sources = ["env TENCENTCLOUD_SECRET_ID/TENCENTCLOUD_SECRET_KEY"]
        sources.append(f"$CREDENTIALS_DIRECTORY/{{secret-id,secret-key}} ({creds_dir or 'unset'})")
        if self._config.secret_id_file:
            sources.append(f"files {self._config.secret_id_file}, {self._config.secret_key_file}")
        sources.append(f"profile file {', '.join(str(p) for p in self._profile_paths())}")
        sources.append(f"CVM role {self._config.cvm_role!r}" if self._config.cvm_role
                       else "CVM role (not configured: [credentials] cvm_role)")
        return sources

    def get(self) -> Secrets:
        """The current credentials; files are re-read when their mtime changes."""
        stamp = self._file_stamp()
        with self._lock:
            if self._current is None or stamp != self._stamp:
                self._current = self._resolve()
                self._stamp = stamp
                self._redact(self._current)
            return self._current

    def _redact(self, secrets: Secrets) -> None:
        """Redact these values from now on; forget sets older than the last few rotations."""
        self._redacted.append(secrets)
        for value in (secrets.secret_id, secrets.secret_key, secrets.token):
            register_secret(value)
        while len(self._redacted) > REDACTED_CREDENTIAL_SETS:
            old = self._redacted.popleft()
            for value in (old.secret_id, old.secret_key, old.token):
                forget_secret(value)

    def reload(self) -> Secrets:
        """Forget what was read and look again (SIGHUP)."""
        with self._lock:
            self._current = None
        return self.get()

    def get_credential_info(self) -> tuple[str, str, str | None]:
        """The SDK's credential interface: read at every request it signs."""
        secrets = self.get()
        return secrets.secret_id, secrets.secret_key, secrets.token

    def _file_paths(self) -> list[Path]:
        paths = [p for p in (self._config.secret_id_file, self._config.secret_key_file,
                             self._config.session_token_file) if p]
        creds_dir = self._environ.get("CREDENTIALS_DIRECTORY")
        if creds_dir:
            paths += [Path(creds_dir) / name for name in self.CREDENTIAL_NAMES]
        return paths + self._profile_paths()

    def _file_stamp(self) -> tuple[Any, ...]:
        stamp: list[Any] = []
        for path in self._file_paths():
            try:
                st = path.stat()
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def _profile_paths(self) -> list[Path]:
        if self._config.profile_file:
            return [self._config.profile_file]
        home = self._environ.get("HOME", "")
        paths = [Path(home) / ".tencentcloud" / "credentials"] if home else []
        return [*paths, Path("/etc/tencentcloud/credentials")]

    def _resolve(self) -> Secrets:
        env = self._environ
        _check_pair("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY", env)
        if env.get("TENCENTCLOUD_SECRET_ID") and env.get("TENCENTCLOUD_SECRET_KEY"):
            # The SDK's own env provider drops the session token; we do not.
            return _secrets(env["TENCENTCLOUD_SECRET_ID"], env["TENCENTCLOUD_SECRET_KEY"],
                            env.get("TENCENTCLOUD_SESSION_TOKEN"), "environment")
        creds_dir = env.get("CREDENTIALS_DIRECTORY")
        if creds_dir:
            names = [Path(creds_dir) / n for n in self.CREDENTIAL_NAMES]
            found = _read_files(names[0], names[1], names[2])
            if found:
                return _secrets(*found, source="credentials-directory")
        cfg = self._config
        if cfg.secret_id_file and cfg.secret_key_file:
            found = _read_files(cfg.secret_id_file, cfg.secret_key_file, cfg.session_token_file,
                                required=True)
            if found:
                return _secrets(*found, source="config-files")
        for path in self._profile_paths():
            profile = _read_profile(path)
            if profile:
                return _secrets(*profile, source=f"profile:{path}")
        if cfg.cvm_role:
            return _cvm_role(cfg.cvm_role)
        raise ConfigError("no VOD credentials found; tried: " + "; ".join(self.tried()))


def _secrets(secret_id: str, secret_key: str, token: str | None, source: str) -> Secrets:
    return Secrets(secret_id.strip(), secret_key.strip(), (token or "").strip() or None, source)


def _check_pair(id_name: str, key_name: str, env: Mapping[str, str]) -> None:
    """Half a pair in the environment is a mistake (a misspelt name): say which half is
    missing instead of quietly using the next source or reporting nothing found."""
    has_id, has_key = bool(env.get(id_name)), bool(env.get(key_name))
    if has_id != has_key:
        missing, present = (key_name, id_name) if has_id else (id_name, key_name)
        raise ConfigError(f"{missing} is not set ({present} is): set both, or neither to use "
                          "the next credential source")


def _read_files(id_path: Path, key_path: Path, token_path: Path | None,
                required: bool = False) -> tuple[str, str, str | None] | None:
    secret_id, secret_key = _read_secret(id_path), _read_secret(key_path)
    if secret_id is None and secret_key is None:
        if required:
            raise ConfigError(f"credential file missing: {id_path} and {key_path}")
        return None
    if secret_id is None or secret_key is None:
        missing, found = (id_path, key_path) if secret_id is None else (key_path, id_path)
        raise ConfigError(f"credential file missing: {missing} ({found} is there: "
                          "the secret id and the secret key go together)")
    for path, value in ((id_path, secret_id), (key_path, secret_key)):
        if not value.strip():
            raise ConfigError(f"credential file empty: {path}")
    token = _read_secret(token_path) if token_path is not None else None
    return secret_id, secret_key, token


def _read_secret(path: Path) -> str | None:
    """A credential file's text; None when it does not exist, ConfigError if unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"credential file unreadable: {exc}") from None


def _read_profile(path: Path) -> tuple[str, str, str | None] | None:
    parser = configparser.ConfigParser()
    try:
        if not parser.read(path, encoding="utf-8"):
            return None
    except (configparser.Error, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"profile file {path}: {exc}") from None
    section = parser["default"] if parser.has_section("default") else None
    if section is None or not section.get("secret_id") or not section.get("secret_key"):
        return None
    return section["secret_id"], section["secret_key"], section.get("token")


def _cvm_role(role: str) -> Secrets:
    from tencentcloud.common.credential import CVMRoleCredential  # noqa: PLC0415 -- opt-in path

    try:
        cred = CVMRoleCredential(None if role == "auto" else role)
        secret_id, secret_key, token = cred.get_credential_info()
    except Exception as exc:  # noqa: BLE001 -- the SDK raises anything from urlopen
        raise ConfigError(f"CVM role {role!r}: {type(exc).__name__}") from None
    if not secret_id or not secret_key:
        raise ConfigError(f"CVM role {role!r}: the metadata service gave no credentials")
    return _secrets(secret_id, secret_key, token, f"cvm-role:{role}")


# --- the client ------------------------------------------------------------------------


def classify(code: str, message: str, request_id: str | None = None) -> ApiError:
    """Map an API or SDK error code onto what the caller does next."""
    if code.startswith("AuthFailure") or code in {"UnauthorizedOperation", "InvalidCredential"}:
        return AuthError(code, message, request_id)
    if code.startswith(_TRANSIENT_CODES):
        return TransientApiError(code, message, request_id)
    return PermanentApiError(code, message, request_id)


class Pacer:
    """Spaces the calls of one action to `rate` per second, with bursts of `burst` calls.

    One per action, shared by all the threads making that call (the limit is per
    account), so that several pull or confirm threads together stay under it instead
    of being refused with RequestLimitExceeded and backing off. A caller waits for its
    slot in arrival order; `sleep` may return early (a stop event's wait).
    """

    def __init__(self, rate: float = API_PACE_PER_S, burst: int = 5, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self.rate = rate
        self._interval = 1.0 / rate
        self._slack = burst * self._interval
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0  # the theoretical time of the next call (GCRA)

    def wait(self) -> float:
        """Wait for this call's slot; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._next = max(self._next, now) + self._interval
            delay = self._next - self._slack - now
        if delay > 0:
            # Bounded by (threads waiting) / rate: a few tens of milliseconds.
            self._sleep(delay)
            return delay
        return 0.0


class _Client(CommonClient):  # type: ignore[misc]  # the SDK has no type hints
    """CommonClient that decodes each reply once, with orjson: `_response` finds errors in it."""

    def call_json(self, action: str, params: dict[str, Any], headers: Any = None,
                  options: Any = None) -> Any:
        """The SDK's call_json without its retryer (none is configured) and error check (the
        SDK's decodes the whole body, which call_json then decoded again with json)."""
        reply = self._call(action, params, options, headers)
        if isinstance(reply, Reply):  # from _DirectRequest
            status, content = reply.status, reply.body
        else:  # a requests.Response, through a proxy
            status, content = reply.status_code, reply.content
        if status != 200:
            raise TencentCloudSDKException("ServerNetworkError", content)
        return decode_reply(content)


class _DirectRequest:
    """The SDK's ApiRequest for an endpoint reached without a proxy: the signed request
    goes over one kept-alive connection of procpoll.httpconn, not a requests.Session.

    A call cost about 1.0 ms of CPU through requests and 0.45 ms this way, and a pull and
    a confirm are made for every 16 events. `request_timeout` bounds the whole call
    (connect, send, the long poll's answer), not each socket operation.
    """

    def __init__(self, scheme: str, endpoint: str, timeout_s: float) -> None:
        parts = urlsplit(f"{scheme}://{endpoint}")
        context = (ssl.create_default_context(cafile=certifi.where()) if scheme == "https"
                   else None)
        self._origin = Origin(parts.hostname or "", parts.port, context)
        self._timeout_s = timeout_s

    def send_request(self, request: Any) -> Reply:
        """POST the SDK's RequestInternal; TencentCloudSDKException when no answer came."""
        data = request.data
        body = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            return self._origin.post(request.uri or "/", body, request.header, self._timeout_s)
        except TransportError as exc:
            raise TencentCloudSDKException("ClientNetworkError", exc.name) from None

    def close(self) -> None:
        """Close the connection."""
        self._origin.close()


# Bytes of a reply, masked so that a number of at least 20 digits, or a negative one of 19,
# right after ":", "," or "[" (whitespace included) shows as ":" and a run of "0".
_NUMBER_MASK = bytes(
    ord("0") if chr(c).isdigit() and c < 128 else ord(":") if chr(c) in ":,[ \t\r\n"
    else ord("-") if c == ord("-") else ord("x") for c in range(256))
_TOO_BIG_FOR_ORJSON = (b":" + b"0" * 20, b":-" + b"0" * 19)


def decode_reply(content: bytes) -> Any:
    """The reply's JSON, decoded as json.loads decodes it, by orjson when it can.

    orjson is three times faster, but reads integers past 64 bits as floats (a bare FileId
    that long would lose digits) and refuses NaN, Infinity, BOMs, UTF-16 and escaped lone
    surrogates, which json accepts: those replies go to json (a masked scan finds long
    numbers at a fraction of the decoding's cost; one inside a string costs a fallback)."""
    masked = b":" + content.translate(_NUMBER_MASK)  # ":" for a reply that is a number
    if any(pattern in masked for pattern in _TOO_BIG_FOR_ORJSON):
        return json.loads(content)
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


class TencentVod:
    """VodApi over the SDK's CommonClient; one instance per thread (it owns a connection)."""

    def __init__(self, config: VodConfig, credentials: CredentialChain) -> None:
        http = HttpProfile(protocol=config.scheme, endpoint=config.endpoint,
                           reqTimeout=config.request_timeout_s, keepAlive=True)
        # Our own retry policy decides; the SDK's retryer sleeps after the last failure,
        # and its region breaker turns network errors into AttributeError.
        profile = ClientProfile(httpProfile=http, disable_region_breaker=True, language="en-US")
        self._client = _Client("vod", API_VERSION, credentials, config.region, profile=profile)
        url = f"{config.scheme}://{config.endpoint}/"
        connection = getattr(getattr(self._client, "request", None), "conn", None)
        if getattr(connection, "proxy", None) is None and not select_proxy(
                url, requests.utils.get_environ_proxies(url)):
            self._client.request = _DirectRequest(config.scheme, config.endpoint,
                                                  config.request_timeout_s)
            return
        session = getattr(connection, "_session", None)
        if isinstance(session, requests.Session):
            _read_environment_once(session, url)

    def pull(self, sub_app_id: int | None) -> list[Any]:
        """PullEvents; ResourceNotFound ('no event') is an empty list, not an error."""
        try:
            response = self._call("PullEvents", _with_app({}, sub_app_id))
        except PermanentApiError as exc:
            if exc.code == "ResourceNotFound":
                return []
            raise
        events = response.get("EventSet")
        if events is None:
            return []
        if not isinstance(events, list):
            raise TransientApiError("InvalidResponse", "EventSet is not a list")
        return events

    def confirm(self, sub_app_id: int | None, handles: Sequence[str]) -> None:
        """ConfirmEvents; a refused handle raises ExpiredHandleError."""
        if not 1 <= len(handles) <= MAX_HANDLES_PER_CONFIRM:
            raise ValueError(f"ConfirmEvents takes 1..16 handles, got {len(handles)}")
        try:
            self._call("ConfirmEvents", _with_app({"EventHandles": list(handles)}, sub_app_id))
        except PermanentApiError as exc:
            if exc.code.startswith("InvalidParameterValue"):
                raise ExpiredHandleError(exc.code, exc.message, exc.request_id) from None
            raise

    def describe_event_config(self, sub_app_id: int | None) -> dict[str, Any]:
        """DescribeEventConfig: how VOD delivers events to this application."""
        return self._call("DescribeEventConfig", _with_app({}, sub_app_id))

    def close(self) -> None:
        """Close the kept-alive connection (or the requests Session, through a proxy)."""
        request = self._client.request
        if isinstance(request, _DirectRequest):
            request.close()
            return
        session = getattr(getattr(request, "conn", None), "_session", None)
        if isinstance(session, requests.Session):
            session.close()

    def _call(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            body = self._client.call_json(action, params)
        except TencentCloudSDKException as exc:
            raise classify(str(exc.get_code() or "ClientError"), _text(exc.get_message()),
                           exc.get_request_id()) from None
        except (requests.RequestException, OSError) as exc:
            # The body is streamed: a reset while reading it escapes the SDK's wrapper.
            raise TransientApiError("ClientNetworkError", type(exc).__name__) from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # Not JSON, JSON without Response, or nested past what json.loads can decode:
            # the SDK lets these through unwrapped.
            raise TransientApiError("InvalidResponse", f"{type(exc).__name__} in reply") from None
        except ConfigError as exc:
            # The credential chain re-reads files while signing: one missing or empty
            # mid-rotation is a wait-for-the-operator failure, not a crash of the loop.
            raise AuthError("CredentialsUnavailable", str(exc)) from None
        return _response(body)


def _read_environment_once(session: requests.Session, url: str) -> None:
    """Take the proxy variables for our one endpoint now, not at every call.

    With trust_env, requests scans the whole environment twice and stats ~/.netrc on each
    request: 15 % of a call's CPU. The SDK passes its own HTTPS_PROXY choice per request;
    what requests would add (ALL_PROXY, NO_PROXY bypass) is read here once. No netrc: an
    entry for the endpoint's host would replace the request's signature with Basic auth.
    """
    session.proxies.update(requests.utils.get_environ_proxies(url))
    session.trust_env = False


def _response(body: Any) -> dict[str, Any]:
    """The Response object; an Error inside it raises (the SDK misses it on odd Content-Types)."""
    response = body.get("Response") if isinstance(body, dict) else None
    if not isinstance(response, dict):
        raise TransientApiError("InvalidResponse", "reply has no Response object")
    error = response.get("Error")
    if error is not None and not isinstance(error, dict):
        raise TransientApiError("InvalidResponse", "Response.Error is not an object")
    if isinstance(error, dict):
        raise classify(_text(error.get("Code")) or "UnknownError", _text(error.get("Message")),
                       _text(response.get("RequestId")) or None)
    return response


def _with_app(params: dict[str, Any], sub_app_id: int | None) -> dict[str, Any]:
    if sub_app_id is not None:
        params["SubAppId"] = sub_app_id
    return params


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value[:500].decode("utf-8", "replace")
    return "" if value is None else str(value)[:500]


def client_factory(config: Config, credentials: CredentialChain) -> Callable[[], VodApi]:
    """A zero-argument callable that builds one VodApi client (one per thread)."""
    return lambda: TencentVod(config.vod, credentials)
