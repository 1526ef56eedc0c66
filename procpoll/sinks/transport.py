"""How the webhook sink speaks HTTP: one kept-alive connection per worker thread.

Straight on http.client: a POST costs about half the CPU of urllib3 and a third of a
requests.Session (measured with 64 threads and a 20 ms receiver: 226, 404 and ~600 µs),
and the POST was the largest part of the daemon's CPU. The environment is read once,
the way requests reads it: HTTP(S)_PROXY/NO_PROXY (a proxied URL goes through urllib3's
proxy manager, as requests would send it), REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE, ~/.netrc.
Transport failures raise SinkError named as requests names them (ConnectionError,
ConnectTimeout, ReadTimeout, SSLError, ProxyError), so log reasons stay the same.

A sink's `timeout` bounds the whole attempt, not each socket operation: a receiver that
trickles its answer a byte at a time would otherwise hold a worker for as long as it
likes. Before each connect, send and receive the socket's timeout is set to the time
left. At most 64 KiB of the answer's body is read; a connection with more unread is
closed rather than reused.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Protocol, cast
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

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

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
    """A kept-alive http.client connection per thread to one receiver.

    A connection the receiver closed while idle reads as ready (EOF) and is replaced
    before use, as urllib3 does; a connection whose exchange failed, or whose answer
    had more than MAX_RESPONSE_BYTES of body, is never reused.
    """

    def __init__(self, url: str, verify_tls: bool) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "https" and verify_tls:
            self._context = ssl.create_default_context(cafile=_ca_bundle())
        elif parts.scheme == "https":
            self._context = ssl.create_default_context()
            self._context.check_hostname = False
            self._context.verify_mode = ssl.CERT_NONE
        if self._context is not None:
            self._context.sslsocket_class = _DeadlineTLSSocket
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[_Connection | _TLSConnection] = []

    def post(self, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST over this thread's connection, opening it if needed, all within `timeout_s`."""
        conn = self._connection()
        conn.deadline.at = time.monotonic() + timeout_s
        try:
            if conn.sock is None:
                conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise SinkError(_reason(exc, "ConnectTimeout", timeout_s)) from None
        try:
            conn.request("POST", self._target, body=body, headers=headers)
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise SinkError(_reason(exc, "ReadTimeout", timeout_s)) from None
        if response.will_close or not response.isclosed():
            conn.close()  # the receiver says so, or the body's rest is still unread
        return response.status

    def _connection(self) -> _Connection | _TLSConnection:
        conn: _Connection | _TLSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._context is not None:
                conn = _TLSConnection(self._host, self._port, context=self._context)
            else:
                conn = _Connection(self._host, self._port)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        elif conn.sock is not None and _dropped(conn.sock):
            conn.close()
        return conn

    def close(self) -> None:
        """Close every thread's connection (a thread still using one sees it fail)."""
        with self._lock:
            for conn in self._connections:
                conn.close()


class _Deadline:
    """When the current attempt must be over (monotonic s); shared by a connection and its socket.

    One per connection, updated per attempt, so an attempt allocates nothing for it.
    """

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = 0.0

    def time_left_s(self) -> float:
        """Seconds left, or TimeoutError if none are."""
        left_s = self.at - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("the attempt's deadline passed")
        return left_s


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every send and receive ends by its connection's deadline.

    http.client sends with sendall and reads through makefile(), whose reads all come
    down to recv_into.
    """

    deadline: _Deadline

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        """sendall, with the socket timeout set to the time left (it bounds the whole call)."""
        self.settimeout(self.deadline.time_left_s())
        super().sendall(data, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        """recv_into, with the socket timeout set to the time left."""
        self.settimeout(self.deadline.time_left_s())
        return super().recv_into(buffer, nbytes, flags)


class _DeadlineTLSSocket(ssl.SSLSocket):
    """The TLS counterpart of _DeadlineSocket: SSLSocket.sendall writes through send."""

    deadline: _Deadline

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        """send, with the socket timeout set to the time left."""
        self.settimeout(self.deadline.time_left_s())
        return super().send(data, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None,
                  flags: int = 0) -> int:
        """recv_into, with the socket timeout set to the time left."""
        self.settimeout(self.deadline.time_left_s())
        return super().recv_into(buffer, nbytes, flags)


def _open_socket(host: str, port: int, deadline: _Deadline) -> _DeadlineSocket:
    """A connected TCP socket to `host`, each address tried within the time left."""
    # getaddrinfo takes no timeout and cannot be interrupted portably: a resolver slower
    # than the sink's timeout overruns it. The deadline is checked as soon as it answers.
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _name, address in addresses:
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock.settimeout(deadline.time_left_s())
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
        else:
            return sock
    raise error


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose connect, sends and reads all end by `deadline`."""

    def __init__(self, host: str, port: int | None) -> None:
        super().__init__(host, port)
        self.deadline = _Deadline()

    def connect(self) -> None:
        """Resolve and connect within the time left."""
        self.sock = _open_socket(self.host, self.port, self.deadline)


class _TLSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose connect, handshake, sends and reads all end by `deadline`."""

    def __init__(self, host: str, port: int | None, context: ssl.SSLContext) -> None:
        super().__init__(host, port, context=context)
        self.deadline = _Deadline()
        self._tls_context = context

    def connect(self) -> None:
        """Resolve, connect and shake hands within the time left."""
        sock = _open_socket(self.host, self.port, self.deadline)
        # The handshake is one operation to the ssl module: the timeout bounds all of it.
        sock.settimeout(self.deadline.time_left_s())
        try:
            # The context makes _DeadlineTLSSocket (see DirectTransport.__init__).
            tls = cast(_DeadlineTLSSocket,
                       self._tls_context.wrap_socket(sock, server_hostname=self.host))
        except BaseException:
            sock.close()
            raise
        tls.deadline = self.deadline
        self.sock = tls


def _dropped(sock: socket.socket) -> bool:
    """An idle kept-alive socket that is readable was closed (or sent junk): not reusable."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _reason(exc: BaseException, timeout_name: str, timeout_s: float) -> str:
    """Why a direct POST failed, for SinkError."""
    name = _failure(exc, timeout_name)
    if name == timeout_name:
        return f"{name} posting to the webhook: timed out after {timeout_s:g} s"
    return f"{name} posting to the webhook"


def _failure(exc: BaseException, timeout_name: str) -> str:
    """The requests-style name of a transport failure (ConnectTimeout or ReadTimeout, …)."""
    if isinstance(exc, ssl.SSLError):
        return "SSLError"
    if isinstance(exc, TimeoutError):
        return timeout_name
    return "ConnectionError"


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
