"""TC3-HMAC-SHA256: verify a received VOD API request, and sign one the same way the SDK does.

Verification rebuilds the canonical request from what was *received* (method, path, raw
query, the headers named in SignedHeaders, raw body), derives the signing key from the
secret key looked up by the SecretId, and compares in constant time. The order of the
checks decides which `AuthFailure.*` code a bad request gets; it is documented on `verify`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

ALGORITHM = "TC3-HMAC-SHA256"
SERVICE = "vod"
MAX_SKEW_S = 300
_TERMINATOR = "tc3_request"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credentials:
    """What the emulator accepts: one secret id/key pair and, optionally, a session token."""

    secret_id: str
    secret_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(secret_id={self.secret_id!r}, secret_key=***, session_token=***)"


@dataclass(frozen=True)
class Rejection:
    """Why a request was refused: the API error code and message to answer with."""

    code: str
    message: str


@dataclass(frozen=True)
class _Authorization:
    secret_id: str
    date: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


def verify(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: Credentials,
    now: float,
) -> Rejection | None:
    """Return None when the request is correctly signed by `credentials`, else the rejection.

    `headers` must have lower-case keys. Checks, in order: Authorization present
    (SignatureFailure) and well-formed (InvalidAuthorization); X-TC-Timestamp an integer
    (InvalidAuthorization); SecretId known (SecretIdNotFound); timestamp within 5 minutes of
    `now` (SignatureExpire); scope date/service and signature (SignatureFailure); session
    token when one is configured (TokenFailure).
    """
    raw_auth = headers.get("authorization", "").strip()
    if not raw_auth:
        return Rejection("AuthFailure.SignatureFailure", "The Authorization header is missing.")
    auth = _parse_authorization(raw_auth)
    if auth is None:
        return Rejection(
            "AuthFailure.InvalidAuthorization",
            "The Authorization header is not a valid TC3-HMAC-SHA256 authorization.",
        )
    timestamp_text = headers.get("x-tc-timestamp", "").strip()
    if not timestamp_text.isdigit():
        return Rejection(
            "AuthFailure.InvalidAuthorization", "X-TC-Timestamp is missing or not an integer."
        )
    if not hmac.compare_digest(auth.secret_id.encode(), credentials.secret_id.encode()):
        return Rejection(
            "AuthFailure.SecretIdNotFound",
            "The SecretId is not found, please ensure that your SecretId is correct.",
        )
    timestamp = int(timestamp_text)
    if abs(now - timestamp) > MAX_SKEW_S:
        return Rejection(
            "AuthFailure.SignatureExpire",
            f"Signature expired. Timestamp is {timestamp}, server time is {int(now)}; "
            f"the difference must not exceed {MAX_SKEW_S} s.",
        )
    failure = Rejection(
        "AuthFailure.SignatureFailure",
        "The provided credentials could not be validated. Please check your signature is correct.",
    )
    if (
        auth.date != utc_date(timestamp)
        or auth.service != SERVICE
        or auth.terminator != _TERMINATOR
        or not {"content-type", "host"} <= set(auth.signed_headers)
        or any(name not in headers for name in auth.signed_headers)
    ):
        return failure
    payload = (
        _UNSIGNED_PAYLOAD.encode()
        if headers.get("x-tc-content-sha256") == _UNSIGNED_PAYLOAD
        else body
    )
    # The docs lower-case header values in the canonical form; the Python SDK signs them
    # as sent. Both spellings are accepted so either kind of client verifies.
    candidates = {
        signature(
            secret_key=credentials.secret_key,
            method=method,
            path=path,
            query=query,
            headers={name: transform(headers[name]) for name in auth.signed_headers},
            payload=payload,
            timestamp=timestamp,
        )
        for transform in (str.strip, _lower_strip)
    }
    if not any(hmac.compare_digest(c.encode(), auth.signature.encode()) for c in candidates):
        return failure
    if credentials.session_token is not None:
        token = headers.get("x-tc-token", "")
        if not hmac.compare_digest(token.encode(), credentials.session_token.encode()):
            return Rejection("AuthFailure.TokenFailure", "The session token is missing or invalid.")
    return None


def signature(
    *,
    secret_key: str,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    payload: bytes,
    timestamp: int,
) -> str:
    """The hex TC3 signature over the given canonical parts (`headers`: signed ones only)."""
    names = sorted(headers)
    canonical_headers = "".join(f"{name}:{headers[name]}\n" for name in names)
    canonical_request = "\n".join(
        [
            method,
            path,
            query,
            canonical_headers,
            ";".join(names),
            hashlib.sha256(payload).hexdigest(),
        ]
    )
    date = utc_date(timestamp)
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            str(timestamp),
            f"{date}/{SERVICE}/{_TERMINATOR}",
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = _hmac(f"TC3{secret_key}".encode(), date)
    key = _hmac(key, SERVICE)
    key = _hmac(key, _TERMINATOR)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def sign_headers(
    *,
    credentials: Credentials,
    host: str,
    action: str,
    version: str,
    body: bytes,
    timestamp: int,
) -> dict[str, str]:
    """Headers for a JSON POST to `/` signed like the Python SDK signs (for tools and tests)."""
    content_type = "application/json"
    sig = signature(
        secret_key=credentials.secret_key,
        method="POST",
        path="/",
        query="",
        headers={"content-type": content_type, "host": host},
        payload=body,
        timestamp=timestamp,
    )
    headers = {
        "Content-Type": content_type,
        "Host": host,
        "X-TC-Action": action,
        "X-TC-Version": version,
        "X-TC-Timestamp": str(timestamp),
        "Authorization": (
            f"{ALGORITHM} Credential={credentials.secret_id}/{utc_date(timestamp)}/{SERVICE}/"
            f"{_TERMINATOR}, SignedHeaders=content-type;host, Signature={sig}"
        ),
    }
    if credentials.session_token is not None:
        headers["X-TC-Token"] = credentials.session_token
    return headers


def utc_date(timestamp: int) -> str:
    """The UTC calendar date of a Unix timestamp, as the credential scope spells it."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def _parse_authorization(raw: str) -> _Authorization | None:
    algorithm, _, rest = raw.partition(" ")
    if algorithm != ALGORITHM:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
    try:
        scope = fields["Credential"].split("/")
        signed = fields["SignedHeaders"]
        sig = fields["Signature"]
    except KeyError:
        return None
    if len(scope) != 4 or not signed or not sig:
        return None
    secret_id, date, service, terminator = scope
    return _Authorization(
        secret_id=secret_id,
        date=date,
        service=service,
        terminator=terminator,
        signed_headers=tuple(name.strip().lower() for name in signed.split(";")),
        signature=sig.lower(),
    )


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def _lower_strip(value: str) -> str:
    return value.strip().lower()
