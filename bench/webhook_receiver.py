"""A lean webhook receiver for benchmarks: HTTP/1.1 keep-alive, a fixed delay per POST, 200.

Run as its own process so the daemon's CPU figures are its own:

    python bench/webhook_receiver.py --port 0 --latency-ms 20

prints `listening on http://127.0.0.1:PORT/hook`; `GET /stats` answers
{"posts": N, "unique": M} (M counts distinct `webhook-id` headers, so N - M are
duplicate deliveries). asyncio rather than http.server: a thread per connection
would cost the shared CPU far more than the daemon under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal


class Receiver:
    """Counts POSTs and distinct webhook ids; answers each POST after `latency_s`."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.posts = 0
        self.ids: set[bytes] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: as many requests as the client sends on it."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, length, webhook_id = _parse_head(head)
                if length:
                    await reader.readexactly(length)
                if method == b"GET":
                    body = json.dumps({"posts": self.posts, "unique": len(self.ids)}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                self.posts += 1
                if webhook_id is not None:
                    self.ids.add(webhook_id)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


def _parse_head(head: bytes) -> tuple[bytes, int, bytes | None]:
    lines = head.split(b"\r\n")
    method = lines[0].split(b" ", 1)[0]
    length, webhook_id = 0, None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"webhook-id":
            webhook_id = value.strip()
    return method, length, webhook_id


async def main(port: int, latency_ms: float) -> None:
    """Serve until SIGTERM or SIGINT."""
    receiver = Receiver(latency_ms / 1000.0)
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", port, backlog=512)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{bound}/hook", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.latency_ms))
