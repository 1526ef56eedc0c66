"""The daemon: pull loops, lifecycle, signals, the watchdog and `once`.

Threads: `pullers` pull loops per sub-app, the dispatcher's workers, the confirmer's
threads, and the main thread, which only waits, feeds the watchdog and handles
reload and stop. Signal handlers only set flags.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
)

from procpoll import logs
from procpoll.config import Config, load_config
from procpoll.confirm import Confirmer
from procpoll.deadletter import DeadLetter
from procpoll.dispatch import PULL_BATCH_MAX, Dispatcher, Policy, Receipt, Route
from procpoll.errors import ApiError, AuthError, ConfigError, EventParseError
from procpoll.events import parse_event
from procpoll.ledger import Ledger
from procpoll.sinks import build_sink
from procpoll.systemd import Notifier, watchdog_interval_s
from procpoll.vod import CredentialChain, Pacer, Secrets, TencentVod, VodApi

log = structlog.get_logger("procpoll.daemon")

EX_OK = 0
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
ONCE_PULL_ATTEMPTS = 3
AUTH_BACKOFF_S = 60.0
PULL_BACKOFF_MAX_S = 30.0
PRUNE_EVERY_S = 3600.0
CREDENTIALS_CHECK_S = 1.0
_NO_ANSWER_CODES = {"ClientNetworkError", "ServerNetworkError", "InvalidResponse"}


class _Stopped(Exception):
    """The daemon is stopping: leave the retry loop."""


class Daemon:
    """One procpoll process: everything `procpoll run` and `procpoll once` need."""

    def __init__(self, config: Config, *, client_factory: Callable[[], VodApi] | None = None,
                 environ: dict[str, str] | None = None, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 config_path: Path | None = None) -> None:
        self.config = config
        self.credentials = CredentialChain(config.credentials, environ)
        self._factory = client_factory or (lambda: TencentVod(config.vod, self.credentials))
        self._notifier = notifier or Notifier.from_env(environ)
        self._clock = clock
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._signals = 0
        self._last_answer = clock()
        self.apps: list[int | None] = list(config.vod.sub_app_ids) or [None]
        self.ledger = Ledger(config.ledger.path, retention_s=config.ledger.retention_s)
        self._config_path = config_path
        # VOD allows 100 calls/s per action and account: pulls of every sub-app share one
        # pacer, confirms another, so more threads overlap calls without being refused.
        self._pull_pacer = Pacer(config.vod.requests_per_s, sleep=self.stop_event.wait)
        self._pull_gate = _PullGate()
        self.confirmer = Confirmer(self._factory, self.apps, clock=clock,
                                   on_progress=self._answered,
                                   pacer=Pacer(config.vod.requests_per_s))
        self.dispatcher = Dispatcher(
            [Route(sink, build_sink(sink)) for sink in config.sinks], self.ledger,
            lambda receipt, _event: self.confirmer.submit(receipt),
            policy=self._policy(config), dead_letter=self._dead_letter(config),
            stop=self.stop_event, clock=clock)
        self._pullers: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Pull, deliver and confirm until SIGTERM/SIGINT; returns the exit status."""
        self._install_signals()
        self._announce()
        self.dispatcher.start()
        self.confirmer.start()
        for app in self.apps:
            for n in range(self.config.daemon.pullers):
                thread = threading.Thread(target=self._pull_loop, args=(app,), daemon=True,
                                          name=f"pull-{app or 0}-{n}")
                thread.start()
                self._pullers.append(thread)
        self._notifier.ready(status="pulling")
        self._main_loop()
        return self._shutdown()

    def once(self) -> int:
        """One pull per sub-app, deliver, confirm, exit.

        0 = every pulled event delivered (or set aside), 75 = some were not (they stay in
        VOD), 77 = credentials refused, 69 = the API did not answer after a few tries.
        """
        self._announce()
        self.dispatcher.start()
        self.confirmer.start()
        api = self._factory()
        status = EX_OK
        try:
            for app in self.apps:
                sent_at, items = self._pull(api, app, max_attempts=ONCE_PULL_ATTEMPTS)
                self._accept(app, sent_at, items)
        except AuthError as exc:
            log.error("api.auth_failed", code=exc.code, error=exc.message)
            status = EX_NOPERM
        except ApiError as exc:
            log.error("api.unavailable", code=exc.code, error=exc.message)
            status = EX_UNAVAILABLE
        self.dispatcher.wait_idle(self.config.vod.confirm_window_s * 4)
        self.confirmer.drain(self.config.vod.confirm_window_s)
        self.stop_event.set()
        self.dispatcher.close()
        self._close()
        log.info("daemon.once_done", **self.dispatcher.counters, confirmed=self.confirmer.confirmed)
        if status == EX_OK and self.dispatcher.counters["failed"]:
            status = EX_TEMPFAIL
        return status

    def stop(self) -> None:
        """Ask the daemon to stop (what SIGTERM does)."""
        self.stop_event.set()
        self._wake.set()

    @staticmethod
    def _policy(config: Config) -> Policy:
        return Policy(concurrency=config.daemon.concurrency,
                      max_in_flight=config.daemon.max_in_flight, unrouted=config.daemon.unrouted,
                      max_age_s=config.daemon.max_age_s,
                      confirm_margin_s=config.daemon.confirm_margin_s)

    @staticmethod
    def _dead_letter(config: Config) -> DeadLetter | None:
        directory = config.dead_letter.directory
        return DeadLetter(directory) if directory else None

    def _announce(self) -> None:
        secrets = self.credentials.get()
        log.info("daemon.started", pid=os.getpid(), credentials=secrets.source,
                 endpoint=self.config.vod.endpoint, sub_app_ids=[a or 0 for a in self.apps],
                 sinks=[r.config.name for r in self.dispatcher.routes],
                 ledger=str(self.config.ledger.path))
        removed = self.ledger.prune()
        if removed:
            log.info("ledger.pruned", rows=removed)

    def _main_loop(self) -> None:
        interval = watchdog_interval_s()
        next_prune = self._clock() + PRUNE_EVERY_S
        while not self.stop_event.is_set():
            self._wake.wait(min(interval or 5.0, 5.0))
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if interval is not None and self._clock() - self._last_answer < interval * 2:
                self._notifier.watchdog()
            if self._clock() >= next_prune:
                next_prune = self._clock() + PRUNE_EVERY_S
                self.ledger.prune()

    def reload(self) -> None:
        """SIGHUP: re-read credentials and the config file; swap in what can change live.

        An invalid file keeps the running config (config.reload_failed). Sinks, filters,
        policies, the dead-letter directory and the log settings change at once; [vod],
        [ledger] and the pool sizes need a restart, which the log says.
        """
        self._notifier.reloading()
        try:
            source = self.credentials.reload().source
            new = load_config(self._config_path) if self._config_path else self.config
            routes = [Route(sink, build_sink(sink)) for sink in new.sinks]
        except (ConfigError, OSError) as exc:
            log.error("config.reload_failed", error=str(exc), action="kept the running config")
            self._notifier.ready(status="pulling (reload failed)")
            return
        old = self.config
        restart = [name for name in ("vod", "credentials", "ledger") if
                   getattr(new, name) != getattr(old, name)]
        if (new.daemon.concurrency, new.daemon.pullers, new.daemon.max_in_flight) != (
                old.daemon.concurrency, old.daemon.pullers, old.daemon.max_in_flight):
            restart.append("daemon.concurrency/pullers/max_in_flight")
        retired = self.dispatcher.reconfigure(routes, self._policy(new), self._dead_letter(new))
        # Deliveries already running keep their sink; close the old ones after they finish.
        longest = max((r.config.timeout_s for r in retired), default=0.0)
        closer = threading.Timer(longest + 1.0, _close_sinks, args=(retired,))
        closer.daemon = True
        closer.start()
        self.config = new
        if new.log != old.log:
            logs.configure(new.log.level, new.log.format)
        log.info("config.reloaded", credentials=source, sinks=[r.config.name for r in routes],
                 restart_required=restart)
        self._notifier.ready(status="pulling")

    def _shutdown(self) -> int:
        grace = self.config.daemon.shutdown_grace_s
        deadline = time.monotonic() + grace
        self._notifier.stopping()
        log.info("daemon.stopping", in_flight=self.dispatcher.in_flight, grace_s=grace)
        self.dispatcher.close()
        finished = self.dispatcher.join(grace)
        self.confirmer.drain(max(0.5, deadline - time.monotonic()))
        self._close()
        log.info("daemon.stopped", abandoned=0 if finished else self.dispatcher.in_flight,
                 confirmed=self.confirmer.confirmed, **self.dispatcher.counters)
        return EX_OK

    def _close(self) -> None:
        _close_sinks(self.dispatcher.routes)
        self.ledger.close()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(128 + signum)
        self.stop()

    def _on_reload_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True
        self._wake.set()

    # --- pulling -------------------------------------------------------------------------

    def _answered(self) -> None:
        self._last_answer = self._clock()

    def _pull_loop(self, app: int | None) -> None:
        api = self._factory()
        while not self.stop_event.is_set():
            try:
                if not self._pull_once(api, app):
                    return
            except Exception:  # a bug here must not leave the sub-app silently unpulled
                log.exception("pull.crashed", sub_app_id=app)
                self.stop_event.wait(5.0)

    def _pull_once(self, api: VodApi, app: int | None) -> bool:
        """One iteration of a pull loop; False when the daemon is stopping."""
        if not self.dispatcher.wait_capacity(1.0):
            return True
        try:
            delay = self.dispatcher.pull_delay_s()
            if delay:
                log.info("pull.backpressure", sub_app_id=app, wait_s=round(delay, 2))
                if self.stop_event.wait(delay):
                    return False
            if not self._pull_gate.enter(app, 1.0):
                return True
            full = False
            try:
                sent_at, items = self._pull(api, app)
                full = len(items) >= PULL_BATCH_MAX
            except _Stopped:
                return False
            finally:
                self._pull_gate.leave(app, full=full)
            self._accept(app, sent_at, items)
        finally:
            self.dispatcher.release_capacity()
        return True

    def _pull(self, api: VodApi, app: int | None,
              max_attempts: int | None = None) -> tuple[float, list[Any]]:
        """PullEvents, retried with capped, jittered backoff until it answers or we stop."""
        stop = stop_after_attempt(max_attempts) if max_attempts else stop_never
        retrying = Retrying(retry=retry_if_exception_type(ApiError), wait=_pull_wait, stop=stop,
                            sleep=self._sleep, before_sleep=_log_pull_error(app), reraise=True)
        for attempt in retrying:
            with attempt:
                self._pull_pacer.wait()
                if self.stop_event.is_set():
                    raise _Stopped
                sent_at = self._clock()
                try:
                    items = api.pull(app)
                except ApiError as exc:
                    if exc.code not in _NO_ANSWER_CODES:
                        self._answered()
                    raise
                self._answered()
                return sent_at, items
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _sleep(self, seconds: float) -> None:
        """Back off; new credentials (a rewritten file, SIGHUP) end the wait at once, so a
        fixed key is used within a second, not at the end of the auth backoff."""
        end = time.monotonic() + seconds
        before = self._credentials_now()
        while (left := end - time.monotonic()) > 0:
            if self.stop_event.wait(min(left, CREDENTIALS_CHECK_S)):
                raise _Stopped
            if self._credentials_now() is not before:
                return

    def _credentials_now(self) -> Secrets | None:
        """The credentials in use (re-read if their files changed); None if unreadable."""
        try:
            return self.credentials.get()
        except ConfigError:
            return None

    def _accept(self, app: int | None, sent_at: float, items: list[Any]) -> None:
        deadline = sent_at + self.config.vod.confirm_window_s
        if items:
            log.debug("events.pulled", sub_app_id=app, count=len(items))
        for item in items:
            try:
                event = parse_event(item)
            except EventParseError as exc:
                self._set_aside(app, item, exc, deadline)
                continue
            self.dispatcher.submit(event, Receipt(event.handle, app, deadline))

    def _set_aside(self, app: int | None, item: Any, exc: EventParseError, deadline: float) -> None:
        """An item that is not an event: dead-letter it and confirm it, or leave it in VOD."""
        handle = item.get("EventHandle") if isinstance(item, dict) else None
        # Without the handle, like an event key: a redelivery is the same item, same file.
        stable = {k: v for k, v in item.items() if k != "EventHandle"} \
            if isinstance(item, dict) else item
        key = hashlib.sha256(repr(stable).encode("utf-8", "replace")).hexdigest()[:32]
        bound = log.bind(sub_app_id=app, event_key=key, path=exc.path, error=exc.reason)
        if not isinstance(handle, str) or not handle:
            bound.error("event.unparseable", action="no handle: cannot confirm it")
            return
        dead_letter = self.dispatcher.dead_letter
        if dead_letter is None:
            bound.error("event.unparseable", action="left in VOD: no [dead_letter] directory")
            return
        try:
            path = dead_letter.write_unparsed(item, app, reason=str(exc), key=key)
        except OSError as err:
            bound.error("deadletter.write_failed", error=str(err))
            return
        bound.error("event.dead_lettered", path=str(path))
        self.confirmer.submit(Receipt(handle, app, deadline))


class _PullGate:
    """While pulls come back partial (the queue is empty), one pull per sub-app at a time.

    A pull costs the same CPU whatever it carries. With the queue empty, one pull in
    flight sees each new event within a round trip; more pullers would only split the
    same events into more, smaller pulls. After a full batch (a backlog), all pull.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._in_flight: dict[int | None, int] = {}
        self._backlog: dict[int | None, bool] = {}

    def enter(self, app: int | None, timeout_s: float) -> bool:
        """Wait for this puller's turn; False if it did not come within `timeout_s`."""
        with self._cv:
            if not self._cv.wait_for(
                    lambda: self._backlog.get(app, True) or not self._in_flight.get(app),
                    timeout_s):
                return False
            self._in_flight[app] = self._in_flight.get(app, 0) + 1
            return True

    def leave(self, app: int | None, *, full: bool) -> None:
        """The pull is over: `full` (16 events) means more are likely waiting."""
        with self._cv:
            self._in_flight[app] -= 1
            self._backlog[app] = full
            self._cv.notify_all()


def _close_sinks(routes: list[Route]) -> None:
    for route in routes:
        try:
            route.sink.close()
        except Exception:  # closing one sink must not stop the others
            log.exception("sink.close_failed", sink=route.config.name)


def _pull_wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, AuthError):
        # Keys get rotated: try about once a minute, not in a tight loop.
        return random.uniform(AUTH_BACKOFF_S * 0.9, AUTH_BACKOFF_S * 1.1)  # noqa: S311 -- jitter
    return float(_EXPONENTIAL(state))


# 0.5 s, 1 s, 2 s … capped at 30 s, plus up to 0.5 s of jitter: never a zero wait.
_EXPONENTIAL = wait_exponential(multiplier=0.5, max=PULL_BACKOFF_MAX_S) + wait_random(0, 0.5)


def _log_pull_error(app: int | None) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait_s = state.next_action.sleep if state.next_action else 0.0
        fields: dict[str, Any] = {"sub_app_id": app, "attempt": state.attempt_number,
                                  "wait_s": round(wait_s, 2)}
        if isinstance(exc, ApiError):
            fields.update(code=exc.code, error=exc.message, request_id=exc.request_id)
        if isinstance(exc, AuthError):
            log.error("api.auth_failed", **fields)
        else:
            log.warning("api.pull_failed", **fields)

    return before_sleep

