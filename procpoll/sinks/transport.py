"""How the webhook sink speaks HTTP: straight to the receiver, or through a proxy.

Straight: procpoll.httpconn, one kept-alive connection per worker thread, the request in
one send; a POST costs about half the CPU of urllib3 and a third of a requests.Session,
and the POST was the largest part of the daemon's CPU. The environment is read once,
the way requests reads it: HTTP(S)_PROXY/NO_PROXY (a proxied URL goes through urllib3's
proxy manager, as requests would send it), REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE, ~/.netrc.
Transport failures raise SinkError named as requests names them (ConnectionError,
ConnectTimeout, ReadTimeout, SSLError, ProxyError), so log reasons stay the same.

A sink's `timeout` bounds the whole attempt, not each socket operation (see httpconn).
At most 64 KiB of the answer's body is read; a connection with more unread is closed
rather than reused.
"""

from __future__ import annotations

import os
import ssl
from typing import Protocol
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
from procpoll.httpconn import Origin, TransportError

# Connections kept through a proxy: [daemon] concurrency is at most 1024, and a smaller
# pool would open and discard a connection per POST beyond it.
_PROXY_POOL_SIZE = 1024

# The status is all procpoll needs from an answer; reading an unbounded body would let a
# receiver hold the worker and its memory.
MAX_RESPONSE_BYTES = 64 * 1024


class Transport(Protocol):
    """POSTs to one URL; thread-safe."""

    def post(self, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST `body`; the HTTP status, or SinkError when no answer came."""

    def close(self) -> None:
        """Close every connection."""


def transport_for(url: str, verify_tls: bool) -> Transport:
    """The transport for `url`: direct, or through the proxy the environment names."""
    proxy = select_proxy(url, get_environ_proxies(url))
    if proxy:
        return ProxiedTransport(url, proxy, verify_tls)
    return DirectTransport(url, verify_tls)


def netrc_headers(url: str) -> dict[str, str]:
    """The Authorization header requests would add from ~/.netrc for `url`, if any."""
    auth = get_netrc_auth(url)
    return dict(urllib3.util.make_headers(basic_auth=":".join(auth))) if auth else {}


def _ca_bundle() -> str:
    return (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            or DEFAULT_CA_BUNDLE_PATH)


class DirectTransport:
    """POSTs straight to the receiver: an Origin (kept-alive connection per thread)."""

    def __init__(self, url: str, verify_tls: bool) -> None:
        parts = urlsplit(url)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        context: ssl.SSLContext | None = None
        if parts.scheme == "https" and verify_tls:
            context = ssl.create_default_context(cafile=_ca_bundle())
        elif parts.scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._origin = Origin(parts.hostname or "", parts.port, context)

    def post(self, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST over this thread's connection, opening it if needed, all within `timeout_s`."""
        try:
            return self._origin.post(self._target, body, headers, timeout_s,
                                     MAX_RESPONSE_BYTES).status
        except TransportError as exc:
            if exc.timed_out:
                raise SinkError(f"{exc.name} posting to the webhook: timed out after "
                                f"{timeout_s:g} s") from None
            raise SinkError(f"{exc.name} posting to the webhook") from None

    def close(self) -> None:
        """Close every thread's connection (a thread still using one sees it fail)."""
        self._origin.close()


class ProxiedTransport:
    """Through a proxy from the environment, with urllib3's proxy manager (as requests)."""

    def __init__(self, url: str, proxy: str, verify_tls: bool) -> None:
        self._url = url
        self._manager: urllib3.PoolManager = HTTPAdapter(
            pool_maxsize=_PROXY_POOL_SIZE).proxy_manager_for(
            proxy, cert_reqs="CERT_REQUIRED" if verify_tls else "CERT_NONE",
            ca_certs=_ca_bundle() if verify_tls else None)

    def post(self, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST through the proxy.

        urllib3 bounds the connect, and each read by what is left of `timeout_s` when it
        starts: unlike DirectTransport, a proxy trickling its answer can outlast the timeout.
        """
        try:
            response = self._manager.urlopen(
                "POST", self._url, body=body, headers=headers, redirect=False, retries=False,
                timeout=urllib3.Timeout(total=timeout_s), preload_content=False)
            try:
                if len(response.read(MAX_RESPONSE_BYTES + 1)) > MAX_RESPONSE_BYTES:
                    response.close()  # the rest stays unread: do not reuse the connection
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise SinkError(f"{_urllib3_failure(exc)} posting to the webhook") from None
        return response.status

    def close(self) -> None:
        """Close the pooled connections."""
        self._manager.clear()


def _urllib3_failure(exc: BaseException) -> str:
    if isinstance(exc, NewConnectionError):  # a subclass of ConnectTimeoutError
        return "ConnectionError"
    for kind, name in ((ConnectTimeoutError, "ConnectTimeout"), (ReadTimeoutError, "ReadTimeout"),
                       (SSLError, "SSLError"), (ProxyError, "ProxyError")):
        if isinstance(exc, kind):
            return name
    return "ConnectionError"
