"""The webhook sink: POST the normal-callback body, optionally signed per Standard Webhooks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from procpoll.errors import SinkError
from procpoll.httpconn import check_header
from procpoll.logs import register_secret
from procpoll.schema import Table
from procpoll.sinks.base import Delivery, Sink, SinkConfig, SinkType
from procpoll.sinks.transport import netrc_headers, transport_for

_RETRYABLE_STATUS = {408, 425, 429}
_PER_EVENT_HEADERS = {"webhook-id", "webhook-timestamp", "webhook-signature"}


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    """[[sinks]] keys of type "webhook"."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    secrets: tuple[bytes, ...] = ()
    verify_tls: bool = True


def parse_options(t: Table) -> WebhookOptions:
    """Read the webhook sink's own keys; secrets come from `secret` or `secret_file`."""
    url = t.text("url", "")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in {"http", "https"} or not parts.netloc:
        t.bad("url", f"expected an http:// or https:// URL, got {url!r}")
    headers = t.text_map("headers", {})
    for name, value in headers.items():
        problem = check_header(name, value)
        if problem is not None:
            t.bad("headers", problem)
    secret = t.claim("secret", None)
    secret_file = t.file_path("secret_file", None)
    texts: list[tuple[str, str]] = []  # (key it came from, secret)
    if isinstance(secret, str):
        texts = [("secret", secret)]
    elif isinstance(secret, list) and all(isinstance(s, str) for s in secret):
        texts = [("secret", s) for s in secret]
    elif secret is not None:
        t.bad("secret", "expected a whsec_… string or a list of them (newest first)")
    if secret_file is not None:
        try:
            lines = secret_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            t.bad("secret_file", f"cannot read: {exc}")
        else:
            texts += [("secret_file", s.strip()) for s in lines if s.strip()]
    keys = []
    for key, text in texts:
        register_secret(text)
        try:
            keys.append(decode_secret(text))
        except ValueError as exc:
            t.bad(key, str(exc))
    return WebhookOptions(url=url, headers=headers, secrets=tuple(keys),
                          verify_tls=t.flag("verify_tls", True))


def decode_secret(text: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ("whsec_" + base64)."""
    body = text.removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret must decode to at least 16 bytes")
    register_secret(body)
    return key


def signature_headers(keys: tuple[bytes, ...], msg_id: str, body: bytes,
                      timestamp: int) -> dict[str, str]:
    """Standard Webhooks headers; one v1 signature per key so receivers can rotate."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signatures}


class WebhookSink:
    """POSTs each event; 2xx is delivered, 408/425/429/5xx and network errors are retried."""

    def __init__(self, name: str, options: WebhookOptions) -> None:
        self.name = name
        self._options = options
        self._transport = transport_for(options.url, options.verify_tls)
        headers = {"Content-Type": "application/json", "User-Agent": "procpoll",
                   **netrc_headers(options.url)}
        for key, value in options.headers.items():  # configured headers win, any case
            if key.lower() not in _PER_EVENT_HEADERS:
                for known in [k for k in headers if k.lower() == key.lower()]:
                    del headers[known]
                headers[key] = value
        self._headers = headers

    def deliver(self, delivery: Delivery) -> None:
        """POST the event body; raise SinkError unless the receiver answers 2xx."""
        event = delivery.event
        body = event.callback_body()
        identity = delivery.identity
        headers = {**self._headers, "webhook-id": identity}
        if self._options.secrets:
            headers.update(signature_headers(self._options.secrets, identity, body,
                                             int(time.time())))
        status = self._transport.post(body, headers, delivery.timeout_s)
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in _RETRYABLE_STATUS
        raise SinkError(f"HTTP {status}", retryable=retryable)

    def close(self) -> None:
        """Close the kept-alive connections."""
        self._transport.close()


def build(config: SinkConfig) -> Sink:
    """Build a WebhookSink from its config."""
    assert isinstance(config.options, WebhookOptions)  # noqa: S101 -- the registry guarantees it
    return WebhookSink(config.name, config.options)


TYPE = SinkType(parse_options=parse_options, build=build, secret_keys=("secret",))
