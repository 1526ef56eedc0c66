"""The in-process emulator: lifecycle (start, stop), event intake, stats, run-time controls."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from procpoll.emulator.api import ActionSettings
from procpoll.emulator.controls import Controls
from procpoll.emulator.event_queue import EventQueue
from procpoll.emulator.faults import Fault, FaultPlan, RateLimiter
from procpoll.emulator.request_stats import RequestStats
from procpoll.emulator.server import EmulatorServer
from procpoll.emulator.signature import Credentials

_STOP_JOIN_S = 2.0


class Emulator:
    """A local VOD API (PullEvents, ConfirmEvents, DescribeEventConfig, DescribeEventsState).

    ConfirmEvents with a bad handle (expired, unknown, already confirmed, repeated) answers
    InvalidParameterValue. By default the batch's valid handles are still confirmed;
    with `strict_confirm=True` one bad handle makes the whole batch confirm nothing.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        secret_id: str = "AKIDemulator",  # noqa: S107 - the emulator's published fake key
        secret_key: str = "emulator-secret-key",  # noqa: S107 - idem
        session_token: str | None = None,
        confirm_window_s: float = 30.0,
        hold_s: float = 5.0,
        rate: float | None = None,
        latency_ms: float = 0.0,
        faults: float = 0.0,
        seed: int | None = None,
        strict_confirm: bool = False,
    ) -> None:
        if hold_s < 0:
            raise ValueError(f"hold_s must be >= 0, not {hold_s}")
        self._host = host
        self._port = port
        self._hold_s = hold_s
        self._strict_confirm = strict_confirm
        self._queue = EventQueue(confirm_window_s=confirm_window_s)
        self._controls = Controls(
            Credentials(secret_id, secret_key, session_token), latency_ms=latency_ms
        )
        self._faults = FaultPlan(faults, seed=seed)
        self._limiter = RateLimiter(rate)
        self._request_stats = RequestStats()
        self._server: EmulatorServer | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()
        self._stopped = False

    def start(self) -> Emulator:
        """Bind and serve in a daemon thread; returns self. Raises OSError if binding fails."""
        with self._lifecycle:
            if self._server is not None or self._stopped:
                raise RuntimeError("an Emulator can be started once")
            self._server = EmulatorServer(
                (self._host, self._port),
                queue=self._queue,
                controls=self._controls,
                faults=self._faults,
                limiter=self._limiter,
                stats=self._request_stats,
                settings=self._action_settings,
                snapshot=self.stats,
            )
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"procpoll-emulator-{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; idempotent and prompt even while pulls or faults are holding."""
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
            self._controls.begin_stop()
            self._queue.close()
            server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join(_STOP_JOIN_S)
        server.server_close()
        server.end_connections(_STOP_JOIN_S)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """The address the server binds to."""
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """`host:port`, what procpoll's `[vod] endpoint` takes (with `scheme = "http"`)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def secret_id(self) -> str:
        """The SecretId requests must be signed with."""
        return self._controls.credentials.secret_id

    @property
    def secret_key(self) -> str:
        """The SecretKey requests must be signed with."""
        return self._controls.credentials.secret_key

    @property
    def session_token(self) -> str | None:
        """The X-TC-Token requests must carry, if any."""
        return self._controls.credentials.session_token

    def enqueue(self, bodies: Iterable[Mapping[str, Any]], sub_app_id: int | None = None) -> int:
        """Queue normal-callback bodies for `sub_app_id` (None: default app); returns count."""
        return self._queue.enqueue(bodies, sub_app_id)

    def stats(self) -> dict[str, Any]:
        """Event counts, request counts per action and error code, faults, held requests."""
        counts = self._queue.counts()
        held_pulls = counts.pop("held_pulls")
        return {
            **counts,
            **self._request_stats.snapshot(),
            "held": {"pulls": held_pulls, **self._controls.held()},
        }

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until nothing is pending or in flight; False if `timeout_s` passes first."""
        return self._queue.wait_drained(timeout_s)

    def wait_held(
        self, *, pulls: int = 0, partitioned: int = 0, slow_replies: int = 0, timeout_s: float
    ) -> bool:
        """Block until at least that many requests are held (long polls, partition, faults)."""
        return self._queue.wait_held_pulls(pulls, timeout_s) and self._controls.wait_held(
            partitioned=partitioned, slow_replies=slow_replies, timeout_s=timeout_s
        )

    def set_credentials(self, secret_id: str, secret_key: str, token: str | None = None) -> None:
        """Accept only requests signed with these credentials from now on."""
        self._controls.credentials = Credentials(secret_id, secret_key, token)

    def set_faults(self, rate: float, kinds: Iterable[Fault | str] | None = None) -> None:
        """Inject faults into `rate` (0..1) of API requests, drawn from `kinds` (default all)."""
        self._faults.set(rate, kinds)

    def set_partition(self, on: bool) -> None:
        """While on, API requests are accepted and left unanswered until off or stop."""
        self._controls.set_partition(on)

    def set_latency_ms(self, latency_ms: float) -> None:
        """Add `latency_ms` before every API reply."""
        self._controls.set_latency_ms(latency_ms)

    def _action_settings(self) -> ActionSettings:
        return ActionSettings(hold_s=self._hold_s, strict_confirm=self._strict_confirm)
