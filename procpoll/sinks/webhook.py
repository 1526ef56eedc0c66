"""The webhook sink: POST the normal-callback body, optionally signed per Standard Webhooks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3
from requests.adapters import HTTPAdapter
from requests.utils import (
    DEFAULT_CA_BUNDLE_PATH,
    get_environ_proxies,
    get_netrc_auth,
    select_proxy,
)
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from procpoll.errors import SinkError
from procpoll.logs import register_secret
from procpoll.schema import Table
from procpoll.sinks.base import Delivery, Sink, SinkConfig, SinkType

_RETRYABLE_STATUS = {408, 425, 429}
# Connections kept per receiver: [daemon] concurrency is at most 1024, and a smaller
# pool would open and discard a connection per POST beyond it.
_POOL_SIZE = 1024
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
        # One thread-safe keep-alive pool for all workers, straight on urllib3: a
        # requests.Session re-reads proxies and ~/.netrc from the environment and
        # re-merges its settings on every POST, which cost 3x the CPU of the POST itself.
        # The environment is read here, once, the way requests reads it.
        self._manager = _pool_manager(options.url, options.verify_tls)
        self._pool: urllib3.PoolManager | urllib3.HTTPConnectionPool = self._manager
        self._target = options.url
        if not isinstance(self._manager, urllib3.ProxyManager):
            parts = urlsplit(options.url)
            self._pool = self._manager.connection_from_url(options.url)
            self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = urllib3.HTTPHeaderDict({"Content-Type": "application/json",
                                          "User-Agent": "procpoll"})
        auth = get_netrc_auth(options.url)  # what requests would add from ~/.netrc
        if auth:
            headers.update(urllib3.util.make_headers(basic_auth=":".join(auth)))
        for key, value in options.headers.items():
            if key.lower() not in _PER_EVENT_HEADERS:
                headers[key] = value
        self._headers = dict(headers)

    def deliver(self, delivery: Delivery) -> None:
        """POST the event body; raise SinkError unless the receiver answers 2xx."""
        event = delivery.event
        body = event.callback_body()
        headers = {**self._headers, "webhook-id": event.key}
        if self._options.secrets:
            headers.update(signature_headers(self._options.secrets, event.key, body,
                                             int(time.time())))
        try:
            response = self._pool.urlopen("POST", self._target, body=body, headers=headers,
                                          timeout=delivery.timeout_s, redirect=False,
                                          retries=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise SinkError(f"{_failure_name(exc)} posting to the webhook") from None
        status = response.status
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in _RETRYABLE_STATUS
        raise SinkError(f"HTTP {status}", retryable=retryable)

    def close(self) -> None:
        """Close the pooled connections."""
        self._manager.clear()


def _pool_manager(url: str, verify_tls: bool) -> urllib3.PoolManager:
    """A pool honouring the environment as requests does: *_PROXY/NO_PROXY, the CA bundle."""
    cert_reqs, ca_certs = "CERT_NONE", None
    if verify_tls:
        cert_reqs = "CERT_REQUIRED"
        ca_certs = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                    or DEFAULT_CA_BUNDLE_PATH)
    proxy = select_proxy(url, get_environ_proxies(url))
    if proxy:
        manager: urllib3.PoolManager = HTTPAdapter(pool_maxsize=_POOL_SIZE).proxy_manager_for(
            proxy, cert_reqs=cert_reqs, ca_certs=ca_certs)
        return manager
    return urllib3.PoolManager(maxsize=_POOL_SIZE, cert_reqs=cert_reqs, ca_certs=ca_certs)


def _failure_name(exc: BaseException) -> str:
    """The transport failure as requests names it, so reasons in logs stay the same."""
    if isinstance(exc, NewConnectionError):  # a subclass of ConnectTimeoutError
        return "ConnectionError"
    for kind, name in ((ConnectTimeoutError, "ConnectTimeout"), (ReadTimeoutError, "ReadTimeout"),
                       (SSLError, "SSLError"), (ProxyError, "ProxyError")):
        if isinstance(exc, kind):
            return name
    return "ConnectionError"


def build(config: SinkConfig) -> Sink:
    """Build a WebhookSink from its config."""
    assert isinstance(config.options, WebhookOptions)  # noqa: S101 -- the registry guarantees it
    return WebhookSink(config.name, config.options)


TYPE = SinkType(parse_options=parse_options, build=build, secret_keys=("secret",))
