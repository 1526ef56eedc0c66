"""HTTP/1.1 POSTs over kept-alive connections, each exchange bounded by one deadline.

The webhook sink's hot path, and the largest part of the daemon's CPU after the ledger:
so a request is written in one send (request line, headers and body together) and only
the answer is parsed by http.client. Writing the request through
http.client.HTTPConnection cost a second send per POST (headers, then body), each a
poll and a system call that gives up the GIL, and the Python of putrequest/putheader.

One deadline bounds the whole exchange: before each connect, send and receive the
socket's timeout is set to the time left, so a peer that trickles its answer a byte at
a time cannot hold a thread past it. Failures raise TransportError, named as requests
names them (ConnectionError, ConnectTimeout, ReadTimeout, SSLError).
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

# A header name is an RFC 9110 token; a value has no bare CR or LF (no header injection)
# and no NUL, as http.client's putheader checks.
_LEGAL_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_ILLEGAL_VALUE = re.compile(r"\n(?![ \t])|\r(?![ \t\n])|\x00").search
# struct timeval (time_t, suseconds_t: both a C long on Linux), for SO_RCVTIMEO/SO_SNDTIMEO.
_TIMEVAL = struct.Struct("@ll")
# A kept-alive connection idle longer than this is checked before reuse (the peer may
# have closed it); a busier one is not: a peer closing a connection idle for less is
# rare, and the POST on it then fails and is retried on a new connection.
_IDLE_CHECK_S = 1.0
# Set by post() itself, whatever the caller passes.
_FRAMING = frozenset({"content-length", "transfer-encoding"})


class TransportError(Exception):
    """No answer came: `name` says why, the way requests names it."""

    def __init__(self, name: str, timeout_s: float) -> None:
        super().__init__(name)
        self.name = name
        self.timeout_s = timeout_s

    @property
    def timed_out(self) -> bool:
        """Whether the deadline passed (ConnectTimeout or ReadTimeout)."""
        return self.name.endswith("Timeout")


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: its status, headers and (up to the limit asked for) body."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes


def check_header(name: str, value: str) -> str | None:
    """Why this header cannot be sent, or None when it can."""
    if not _LEGAL_NAME(name):
        return f"header name {name!r} is not a token"
    if _ILLEGAL_VALUE(value):
        return f"header {name!r} has a line break or NUL in its value"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return f"header {name!r} has a character outside Latin-1 in its value"
    return None


class Origin:
    """POSTs to one scheme://host:port, over a kept-alive connection per thread.

    A connection the peer closed while idle reads as ready (EOF) and is replaced before
    use, as urllib3 does; a connection whose exchange failed, or whose answer had more
    body than was read, is never reused.
    """

    def __init__(self, host: str, port: int | None, context: ssl.SSLContext | None) -> None:
        self._host = host
        self._context = context
        self._port = port if port is not None else (443 if context is not None else 80)
        default = 443 if context is not None else 80
        shown = f"[{host}]" if ":" in host else _host_header(host)
        self._host_header = shown if self._port == default else f"{shown}:{self._port}"
        if context is not None:
            context.sslsocket_class = _DeadlineTLSSocket
        self._local = threading.local()
        self._lock = threading.Lock()
        self._links: list[_Link] = []

    def post(self, target: str, body: bytes, headers: Mapping[str, str], timeout_s: float,
             max_body: int | None = None) -> Reply:
        """POST `body` to `target` within `timeout_s`; at most `max_body` bytes of the
        answer's body are read (None: all of it)."""
        request = self._request(target, body, headers)
        link = self._link()
        link.deadline.at = time.monotonic() + timeout_s
        try:
            if link.sock is None:
                link.sock = self._connect(link.deadline)
        except (OSError, http.client.HTTPException) as exc:
            link.close()
            raise TransportError(_failure(exc, "ConnectTimeout"), timeout_s) from None
        response: http.client.HTTPResponse | None = None
        try:
            link.sock.sendall(request)
            response = http.client.HTTPResponse(link.sock, method="POST")
            response.begin()
            data = response.read() if max_body is None else response.read(max_body)
        except (OSError, http.client.HTTPException) as exc:
            link.close(response)
            raise TransportError(_failure(exc, "ReadTimeout"), timeout_s) from None
        if response.will_close or not response.isclosed():
            link.close(response)  # the peer says so, or the body's rest is still unread
        link.used_at = time.monotonic()
        return Reply(response.status, response.msg, data)

    def close(self) -> None:
        """Close every thread's connection (a thread still using one sees it fail)."""
        with self._lock:
            for link in self._links:
                link.close()

    def _request(self, target: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {target} HTTP/1.1"]
        given = {name.lower() for name in headers}
        if "host" not in given:
            lines.append(f"Host: {self._host_header}")
        if "accept-encoding" not in given:
            lines.append("Accept-Encoding: identity")
        for name, value in headers.items():
            if name.lower() in _FRAMING:
                continue
            problem = check_header(name, value)
            if problem is not None:
                raise ValueError(problem)
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        return "\r\n".join(lines).encode("latin-1") + body

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is None:
            link = _Link()
            self._local.link = link
            with self._lock:
                self._links.append(link)
        elif (link.sock is not None and time.monotonic() - link.used_at > _IDLE_CHECK_S
              and _dropped(link.sock)):
            link.close()
        return link

    def _connect(self, deadline: _Deadline) -> socket.socket:
        sock = _open_socket(self._host, self._port, deadline)
        if self._context is None:
            return sock
        # The handshake is one operation to the ssl module: the timeout bounds all of it.
        sock.settimeout(deadline.time_left_s())
        try:
            # The context makes _DeadlineTLSSocket (see __init__).
            tls = cast(_DeadlineTLSSocket,
                       self._context.wrap_socket(sock, server_hostname=self._host))
        except BaseException:
            sock.close()
            raise
        tls.deadline = deadline
        return tls


class _Deadline:
    """When the current exchange must be over (monotonic s); shared by a link and its socket.

    One per link, updated per exchange, so an exchange allocates nothing for it.
    """

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = 0.0

    def time_left_s(self) -> float:
        """Seconds left, or TimeoutError if none are."""
        left_s = self.at - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("the exchange's deadline passed")
        return left_s


class _Link:
    """One thread's connection: its socket (None until connected) and deadline."""

    __slots__ = ("deadline", "sock", "used_at")

    def __init__(self) -> None:
        self.deadline = _Deadline()
        self.sock: socket.socket | None = None
        self.used_at = 0.0  # when its last exchange ended (monotonic s)

    def close(self, response: http.client.HTTPResponse | None = None) -> None:
        """Close the connection; the answer being read holds the socket open until it
        is closed too."""
        if response is not None:
            response.close()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every send and receive ends by its link's deadline.

    Once connected it blocks, with the kernel's own send and receive timeouts
    (SO_SNDTIMEO, SO_RCVTIMEO) set to the time left before each call. A Python socket
    timeout (settimeout) polls before every send and receive: a second system call each,
    and each gives up the GIL, which in a busy daemon means a thread switch or two. The
    answer is read through makefile(), whose reads all come down to recv_into.
    """

    deadline: _Deadline

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        """send until all is sent, each call within the time left."""
        view = memoryview(data).cast("B")
        while view:
            self._limit(socket.SO_SNDTIMEO)
            try:
                sent = self.send(view, flags)
            except BlockingIOError:  # the kernel's timeout
                raise TimeoutError("timed out") from None
            view = view[sent:]

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        """recv_into within the time left."""
        self._limit(socket.SO_RCVTIMEO)
        try:
            return super().recv_into(buffer, nbytes, flags)
        except BlockingIOError:  # the kernel's timeout; makefile() would read it as "no data"
            raise TimeoutError("timed out") from None

    def _limit(self, option: int) -> None:
        left_s = self.deadline.time_left_s()
        seconds = int(left_s)
        # A zero timeval means no timeout at all: never less than a microsecond.
        micros = max(int((left_s - seconds) * 1_000_000), 0 if seconds else 1)
        self.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(seconds, micros))


class _DeadlineTLSSocket(ssl.SSLSocket):
    """The TLS counterpart of _DeadlineSocket, on Python socket timeouts (the ssl module
    would read a kernel timeout as "want read"): SSLSocket.sendall writes through send."""

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
    # than the timeout overruns it. The deadline is checked as soon as it answers.
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _name, address in addresses:
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock.settimeout(deadline.time_left_s())
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)  # from now on the kernel's timeouts (see _DeadlineSocket)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
        else:
            return sock
    raise error


def _host_header(host: str) -> str:
    """The Host header's name as http.client writes it: ASCII as is, else IDNA (a name IDNA
    refuses is left for the resolver, which refuses it at connect)."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _dropped(sock: socket.socket) -> bool:
    """An idle kept-alive socket that is readable was closed (or sent junk): not reusable."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _failure(exc: BaseException, timeout_name: str) -> str:
    """The requests-style name of a transport failure (ConnectTimeout or ReadTimeout, …)."""
    if isinstance(exc, ssl.SSLError):
        return "SSLError"
    if isinstance(exc, TimeoutError):
        return timeout_name
    return "ConnectionError"
