"""Kept-alive POSTs: one deadline bounds sending and reading, idle connections are checked."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from procpoll.httpconn import Origin, TransportError

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawPeer:
    """A loopback TCP server run by a function of each accepted connection."""

    def __init__(self, serve: Callable[[socket.socket], object]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._serve = serve
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._serve(conn)

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(10)


def read_request(conn: socket.socket) -> bytes:
    """One request (headers and Content-Length body), or b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    return head


@pytest.fixture
def peers() -> Iterator[list[RawPeer]]:
    made: list[RawPeer] = []
    yield made
    for peer in made:
        peer.close()


def test_a_peer_that_never_reads_cannot_hold_a_send_past_the_deadline(
        peers: list[RawPeer]) -> None:
    """A body far larger than the socket buffers, to a peer that reads nothing: the send
    ends at the deadline with a timeout, not when the peer decides."""
    stop = threading.Event()
    peers.append(peer := RawPeer(lambda conn: stop.wait(30)))
    origin = Origin("127.0.0.1", peer.port, None)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        origin.post("/", b"x" * (64 * 1024 * 1024), {}, 1.0)
    elapsed = time.monotonic() - started
    stop.set()
    origin.close()
    assert info.value.timed_out
    assert elapsed < 10  # bounded by the deadline, far from the peer's 30 s


def test_request_is_one_write_with_its_framing(peers: list[RawPeer]) -> None:
    """Request line, Host, the caller's headers and Content-Length arrive before the body,
    and a caller's own framing headers are not sent."""
    heads: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        while head := read_request(conn):
            heads.append(head)
            conn.sendall(OK)

    peers.append(peer := RawPeer(serve))
    origin = Origin("127.0.0.1", peer.port, None)
    reply = origin.post("/hook?a=1", b"{}", {"X-Token": "t", "Content-Length": "999"}, 5.0)
    origin.close()
    assert (reply.status, reply.body) == (200, b"ok")
    lines = heads[0].split(b"\r\n")
    assert lines[0] == b"POST /hook?a=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{peer.port}".encode() in lines
    assert b"X-Token: t" in lines
    assert [x for x in lines if x.lower().startswith(b"content-length")] == [
        b"Content-Length: 2"]


def test_a_busy_connection_is_reused_and_an_idle_one_closed_by_the_peer_replaced(
        peers: list[RawPeer]) -> None:
    """Back-to-back POSTs share a connection; after the peer closed it while idle past the
    check's threshold, the next POST goes out on a new connection and succeeds."""
    def serve(conn: socket.socket) -> None:
        for _ in range(2):  # two exchanges, then the peer closes the idle connection
            if not read_request(conn):
                return
            conn.sendall(OK)

    peers.append(peer := RawPeer(serve))
    origin = Origin("127.0.0.1", peer.port, None)
    assert origin.post("/", b"1", {}, 5.0).status == 200
    assert origin.post("/", b"2", {}, 5.0).status == 200
    assert peer.connections == 1
    time.sleep(1.3)  # idle past the check's threshold (1 s); the peer has closed by now
    assert origin.post("/", b"3", {}, 5.0).status == 200
    origin.close()
    assert peer.connections == 2


def test_a_header_that_could_inject_is_refused() -> None:
    """A line break in a header value is never written (no request splitting)."""
    origin = Origin("127.0.0.1", 9, None)
    with pytest.raises(ValueError, match="line break"):
        origin.post("/", b"", {"X-A": "v\r\nX-B: injected"}, 1.0)
    origin.close()
