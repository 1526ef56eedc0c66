"""The webhook sink against a local HTTP server, signatures checked by `standardwebhooks`."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from procpoll import logs
from procpoll.errors import SinkError
from procpoll.events import parse_callback_body
from procpoll.sinks import build_sink
from procpoll.sinks.base import Sink
from procpoll.sinks.transport import MAX_RESPONSE_BYTES
from tests.conftest import serve_on_loopback
from tests.sinks.conftest import (
    Recorder,
    config_problems,
    delivery,
    load_event,
    procedure_event,
    sink_config,
)


def new_secret() -> str:
    """A fresh Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def webhook(recorder: Recorder, **keys: Any) -> Sink:
    """A webhook sink posting to `recorder`."""
    return build_sink(sink_config("webhook", url=recorder.url, **keys))


def test_body_is_the_callback_body_byte_for_byte(recorder: Recorder) -> None:
    """The POST body is exactly the normal-callback JSON, sent as application/json."""
    event = load_event("ProcedureStateChanged-transcode-hls.json")
    webhook(recorder).deliver(delivery(event))
    [(headers, body)] = recorder.requests
    assert body == event.callback_body()
    assert headers["Content-Type"] == "application/json"


def test_signed_request_verifies_with_standardwebhooks(recorder: Recorder) -> None:
    """With a secret, the request carries id, timestamp and a v1 signature that verify."""
    secret = new_secret()
    event = procedure_event()
    webhook(recorder, secret=secret).deliver(delivery(event))
    [(headers, body)] = recorder.requests
    assert headers["webhook-id"] == event.key
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == dict(event.raw)


def test_signature_binds_the_id_and_the_body(recorder: Recorder) -> None:
    """Changing the body or the webhook-id makes the signature fail to verify."""
    secret = new_secret()
    webhook(recorder, secret=secret).deliver(delivery(procedure_event()))
    [(headers, body)] = recorder.requests
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"FINISH", b"FAILED"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "another"})


def test_webhook_id_is_stable_across_redeliveries(recorder: Recorder) -> None:
    """A redelivered event (new attempt, same payload) keeps its webhook-id; others differ."""
    sink = webhook(recorder, secret=new_secret())
    first = procedure_event("t1")
    again = parse_callback_body(dict(first.raw))
    other = procedure_event("t2")
    sink.deliver(delivery(first))
    sink.deliver(delivery(again, attempt=2))
    sink.deliver(delivery(other))
    ids = [headers["webhook-id"] for headers, _ in recorder.requests]
    assert ids == [first.key, first.key, other.key]


def test_rotated_secrets_sign_with_each(recorder: Recorder) -> None:
    """A list of secrets signs with each, so receivers on the old or the new one both verify."""
    new, old = new_secret(), new_secret()
    webhook(recorder, secret=[new, old]).deliver(delivery(procedure_event()))
    [(headers, body)] = recorder.requests
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_secret_file_holds_one_secret_per_line(recorder: Recorder, tmp_path: Path) -> None:
    """`secret_file` lines (blank lines ignored) are secrets, like a `secret` list."""
    new, old = new_secret(), new_secret()
    path = tmp_path / "webhook-secret"
    path.write_text(f"{new}\n\n{old}\n", encoding="utf-8")
    webhook(recorder, secret_file=str(path)).deliver(delivery(procedure_event()))
    [(headers, body)] = recorder.requests
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)


def test_unsigned_requests_carry_only_the_id(recorder: Recorder) -> None:
    """Without a secret the request has a webhook-id but no signature or timestamp."""
    event = procedure_event()
    webhook(recorder).deliver(delivery(event))
    [(headers, _)] = recorder.requests
    assert headers["webhook-id"] == event.key
    assert "webhook-signature" not in headers
    assert "webhook-timestamp" not in headers


def test_configured_headers_are_sent(recorder: Recorder) -> None:
    """`headers` are added to every request."""
    webhook(recorder, headers={"X-Source": "procpoll", "Authorization": "Bearer t0k3n"}).deliver(
        delivery(procedure_event()))
    [(headers, _)] = recorder.requests
    assert (headers["X-Source"], headers["Authorization"]) == ("procpoll", "Bearer t0k3n")


@pytest.mark.parametrize(("status", "retryable"), [
    (408, True), (425, True), (429, True), (500, True), (502, True), (503, True),
    (301, False), (400, False), (401, False), (404, False), (410, False), (422, False),
])
def test_non_2xx_answers_fail_and_say_whether_to_retry(recorder: Recorder, status: int,
                                                       retryable: bool) -> None:
    """Timeouts, throttling and 5xx are retryable; other non-2xx answers are not."""
    recorder.answer = lambda _n: status
    with pytest.raises(SinkError) as info:
        webhook(recorder).deliver(delivery(procedure_event()))
    assert (info.value.reason, info.value.retryable) == (f"HTTP {status}", retryable)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_answers_are_deliveries(recorder: Recorder, status: int) -> None:
    """Any 2xx answer means the receiver has the event."""
    recorder.answer = lambda _n: status
    webhook(recorder).deliver(delivery(procedure_event()))
    assert len(recorder.requests) == 1


def test_refused_connection_is_retryable() -> None:
    """Nobody listening is a retryable failure."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = build_sink(sink_config("webhook", url=f"http://127.0.0.1:{port}/vod"))
    with pytest.raises(SinkError) as info:
        sink.deliver(delivery(procedure_event()))
    assert (info.value.reason, info.value.retryable) == \
        ("ConnectionError posting to the webhook", True)


def test_slow_receiver_times_out_retryably(recorder: Recorder) -> None:
    """A receiver that does not answer within the timeout is a retryable failure."""
    recorder.hold.clear()
    with pytest.raises(SinkError) as info:
        webhook(recorder).deliver(delivery(procedure_event(), timeout_s=0.3))
    recorder.hold.set()
    assert (info.value.reason, info.value.retryable) == \
        ("ReadTimeout posting to the webhook: timed out after 0.3 s", True)


def test_secrets_never_reach_the_log(recorder: Recorder) -> None:
    """Configured secrets, with and without their prefix, are redacted from log lines."""
    secret = new_secret()
    webhook(recorder, secret=secret)
    assert logs.redact(f"a {secret} b") == "a [redacted] b"
    assert logs.redact(secret.removeprefix("whsec_")) == "[redacted]"


@pytest.mark.parametrize(("keys", "problem"), [
    ({"url": "ftp://x/"}, "sinks[0].url: expected an http:// or https:// URL, got 'ftp://x/'"),
    ({"secret": "whsec_!!!"}, "sinks[0].secret: a webhook secret is 'whsec_' followed by base64"),
    ({"secret": "whsec_" + base64.b64encode(b"short").decode()},
     "sinks[0].secret: a webhook secret must decode to at least 16 bytes"),
    ({"secret": 42}, "sinks[0].secret: expected a whsec_… string or a list of them (newest first)"),
    ({"headers": {"X-Token": "a\r\nX-Injected: 1"}},
     "sinks[0].headers: header 'X-Token' has a line break or NUL in its value"),
    ({"headers": {"Bad Name": "v"}}, "sinks[0].headers: header name 'Bad Name' is not a token"),
    ({"headers": {"X-Name": "Zoë ☃"}},
     "sinks[0].headers: header 'X-Name' has a character outside Latin-1 in its value"),
])
def test_config_problems_name_the_key(keys: dict[str, Any], problem: str) -> None:
    """Each invalid webhook key is reported with its dotted path and what was expected."""
    keys.setdefault("url", "https://app.example.com/vod")
    assert config_problems("webhook", **keys) == [f"<test>: {problem}"]


def test_bad_secret_in_file_names_secret_file(tmp_path: Path) -> None:
    """A malformed line of `secret_file` is reported against secret_file, not secret."""
    path = tmp_path / "secret"
    path.write_text("not-base64!\n", encoding="utf-8")
    assert config_problems("webhook", url="https://a.example/", secret_file=str(path)) == \
        ["<test>: sinks[0].secret_file: a webhook secret is 'whsec_' followed by base64"]


def test_unreadable_secret_file_is_a_config_problem(tmp_path: Path) -> None:
    """A secret_file that cannot be read is reported at check time."""
    [problem] = config_problems("webhook", url="https://a.example/",
                                secret_file=str(tmp_path / "missing"))
    assert problem.startswith("<test>: sinks[0].secret_file: cannot read: ")


Reply = Callable[[BaseHTTPRequestHandler, threading.Event], None]


@pytest.fixture
def scripted() -> Iterator[Callable[[Reply], tuple[str, list[int]]]]:
    """A loopback receiver whose reply is a function; it yields (URL, client port per request).

    The reply gets an Event set at teardown, so a trickling reply stops with the test.
    """
    stop = threading.Event()
    servers = []

    def start(reply: Reply) -> tuple[str, list[int]]:
        ports: list[int] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ports.append(self.client_address[1])
                try:
                    reply(self, stop)
                except OSError:
                    self.close_connection = True  # the client gave up

            def log_message(self, *_args: Any) -> None:
                return

        server = serve_on_loopback(Handler)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/vod", ports

    yield start
    stop.set()
    for server in servers:
        server.shutdown()
        server.server_close()


TRICKLE_S = 6.0
TRICKLE_STEP_S = 0.2


def trickle(data: bytes, handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """Send `data` one byte per step, over TRICKLE_S at most."""
    for i in range(min(len(data), int(TRICKLE_S / TRICKLE_STEP_S))):
        handler.wfile.write(data[i:i + 1])
        handler.wfile.flush()
        if stop.wait(TRICKLE_STEP_S):
            return


def trickled_head(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """The status line and headers, a byte at a time."""
    trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", handler, stop)


def trickled_body(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
    """The head at once, then a 30-byte body a byte at a time."""
    handler.send_response(200)
    handler.send_header("Content-Length", "30")
    handler.end_headers()
    handler.wfile.flush()
    trickle(b"x" * 30, handler, stop)


@pytest.mark.parametrize("reply", [trickled_head, trickled_body])
def test_trickling_receiver_cannot_outlast_the_timeout(
        scripted: Callable[[Reply], tuple[str, list[int]]], reply: Reply) -> None:
    """`timeout` bounds the whole attempt: a reply trickled over 6 s fails a 1 s attempt in ~1 s."""
    url, _ = scripted(reply)
    sink = build_sink(sink_config("webhook", url=url))
    started = time.monotonic()
    with pytest.raises(SinkError) as info:
        sink.deliver(delivery(procedure_event(), timeout_s=1.0))
    took_s = time.monotonic() - started
    sink.close()
    assert took_s < 3.0
    assert (info.value.reason, info.value.retryable) == \
        ("ReadTimeout posting to the webhook: timed out after 1 s", True)


BIG_BODY = b"x" * (10 * 1024 * 1024)


def big_answer(handler: BaseHTTPRequestHandler, _stop: threading.Event) -> None:
    """A 200 with a 10 MiB body."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(BIG_BODY)))
    handler.end_headers()
    handler.wfile.write(BIG_BODY)


def test_answer_body_read_is_capped_and_the_connection_dropped(
        scripted: Callable[[Reply], tuple[str, list[int]]]) -> None:
    """Of a 10 MiB answer at most 64 KiB is read; the next POST uses a fresh connection."""
    url, ports = scripted(big_answer)
    sink = build_sink(sink_config("webhook", url=url))
    tracemalloc.start()
    try:
        sink.deliver(delivery(procedure_event("t1")))
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sink.deliver(delivery(procedure_event("t2")))
    sink.close()
    assert peak_bytes < 16 * MAX_RESPONSE_BYTES
    assert len(ports) == 2
    assert ports[0] != ports[1]


def test_small_answers_keep_the_connection(
        scripted: Callable[[Reply], tuple[str, list[int]]]) -> None:
    """An answer with a small body is read whole and the connection is reused."""
    def small(handler: BaseHTTPRequestHandler, _stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")

    url, ports = scripted(small)
    sink = build_sink(sink_config("webhook", url=url))
    sink.deliver(delivery(procedure_event("t1")))
    sink.deliver(delivery(procedure_event("t2")))
    sink.close()
    assert len(ports) == 2
    assert ports[0] == ports[1]
