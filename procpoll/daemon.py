"""The daemon: pull loops, lifecycle, signals, the watchdog and `once`.

Threads: `pullers` pull loops per sub-app, the dispatcher's workers, the confirmer's
threads, and the main thread, which only waits, feeds the watchdog and handles
reload and stop. Signal handlers only set plain attributes; the signal's byte on
the wakeup socket (signal.set_wakeup_fd) ends the main loop's wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import select
import signal
import socket
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
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential,
    wait_random,
)

from procpoll import logs
from procpoll.cli import (
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    METRICS_LISTEN_ENV,
    WORKER_ENV,
)
from procpoll.config import Config, load_config
from procpoll.confirm import Confirmer
from procpoll.deadletter import DeadLetter
from procpoll.dispatch import (
    PULL_BATCH_MAX,
    Dispatcher,
    Policy,
    Receipt,
    Route,
    backoff_s,
    close_sinks,
)
from procpoll.errors import ApiError, AuthError, ConfigError, EventParseError, LedgerError
from procpoll.events import parse_event
from procpoll.heartbeat import Heartbeat
from procpoll.ledger import Confirmation, DeliveryLedger
from procpoll.ledger_open import open_ledger
from procpoll.metrics import Metrics
from procpoll.sinks import build_sink
from procpoll.systemd import Notifier, watchdog_interval_s
from procpoll.vod import CredentialChain, Pacer, Secrets, TencentVod, VodApi

log = structlog.get_logger("procpoll.daemon")

ONCE_PULL_ATTEMPTS = 3
AUTH_BACKOFF_S = 60.0
PULL_BACKOFF_MAX_S = 30.0
PRUNE_EVERY_S = 3600.0
PRUNE_RETRY_S = 300.0
STATUS_EVERY_S = 5.0
CREDENTIALS_CHECK_S = 1.0


class _Stopped(Exception):
    """The daemon is stopping: leave the retry loop."""


class Daemon:
    """One procpoll process: everything `procpoll run` and `procpoll once` need."""

    def __init__(self, config: Config, *, client_factory: Callable[[], VodApi] | None = None,
                 environ: dict[str, str] | None = None, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 config_path: Path | None = None, shared_ledger: bool = False,
                 rate_shares: int = 1, cpu: int | None = None) -> None:
        self.config = config
        self.cpu = cpu  # the CPU the process keeps to (procpoll/cpu.py), for the log
        self.credentials = CredentialChain(config.credentials, environ)
        self._factory = client_factory or (lambda: TencentVod(config.vod, self.credentials))
        self._notifier = notifier or Notifier.from_env(environ)
        self._clock = clock
        self.stop_event = threading.Event()
        # Set by signal handlers and stop(): plain attributes, no lock (see the module doc).
        self._stop_requested = False
        self._reload_requested = False
        self._signals = 0
        # The main loop's wakeup socket pair, opened by run().
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.heartbeat = Heartbeat(clock)
        self.apps: list[int | None] = list(config.vod.sub_app_ids) or [None]
        self.metrics = Metrics()
        self.metrics.declare(self.apps, [sink.name for sink in config.sinks])
        # Shared: other processes deliver from this ledger too (a PostgreSQL ledger always
        # is), so every delivery is claimed first.
        self.ledger: DeliveryLedger = open_ledger(config, shared=shared_ledger,
                                                  on_commit=self.metrics.ledger_commit)
        self._ledger_suspect = False
        self._config_path = config_path
        # VOD allows 100 calls/s per action and account: pulls of every sub-app share one
        # pacer, confirms another, so more threads overlap calls without being refused.
        # `rate_shares`: the processes of the service splitting that rate (its workers).
        share_per_s = config.vod.requests_per_s / rate_shares
        self.pull_pacer = Pacer(share_per_s, sleep=self.stop_event.wait)
        self._pull_gate = _PullGate()
        self.confirmer = Confirmer(self._factory, self.apps, clock=clock,
                                   on_confirmed=self._record_confirmed,
                                   pacer=Pacer(share_per_s),
                                   heartbeat=self.heartbeat,
                                   call_limit_s=self._api_call_limit_s(config),
                                   metrics=self.metrics)
        self.dispatcher = Dispatcher(
            [Route(sink, build_sink(sink)) for sink in config.sinks], self.ledger,
            lambda receipt, _event: self.confirmer.submit(receipt),
            policy=self._policy(config), dead_letter=self._dead_letter(config),
            stop=self.stop_event, clock=clock, heartbeat=self.heartbeat,
            on_delivery=self._on_delivery, on_ledger_error=self._ledger_failed)
        self._ledger_failures_in_row = 0
        self.metrics.track(lambda: self.dispatcher.in_flight, self._oldest_unconfirmed_s)
        self.ledger_failures = 0
        self._pullers: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Pull, deliver and confirm until SIGTERM/SIGINT; returns the exit status."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._install_signals()
        # A supervisor's worker serves on a port of its own choosing (METRICS_LISTEN_ENV)
        # and tells the supervisor which, so one endpoint can sum up the whole service.
        listen = os.environ.get(METRICS_LISTEN_ENV) or self.config.metrics.listen
        if listen:
            self.metrics.serve(listen)
            log.info("metrics.serving", listen=listen, port=self.metrics.port)
            if self.metrics.port is not None:
                self._notifier.send(x_procpoll_metrics_port=self.metrics.port)
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

    def once(self, *, drain: bool = False, max_events: int | None = None) -> int:
        """Pull, deliver, confirm, exit: one pull per sub-app, or with `drain` pull each
        sub-app until the queue answers empty (or `max_events` were pulled in all).

        0 = every pulled event delivered (or set aside), 75 = some were not (they stay in
        VOD), 77 = credentials refused, 69 = the API did not answer after a few tries.
        """
        self._announce()
        self.dispatcher.start()
        self.confirmer.start()
        api = self._factory()
        status = EX_OK
        budget = _PullBudget(max_events)
        try:
            for app in self.apps:
                self._once_app(api, app, budget, drain=drain)
        except AuthError as exc:
            log.error("api.auth_failed", code=exc.code, error=exc.message)
            status = EX_NOPERM
        except ApiError as exc:
            log.error("api.unavailable", code=exc.code, error=exc.message)
            status = EX_UNAVAILABLE
        finally:
            api.close()
        idle = self.dispatcher.wait_idle(self.config.vod.confirm_window_s * 4)
        drained = self.confirmer.drain(self.config.vod.confirm_window_s)
        self.stop_event.set()
        self.dispatcher.close()
        # A delivery still running finishes (and is recorded) within the grace, as at stop.
        self.dispatcher.join(self.config.daemon.shutdown_grace_s)
        self._close()
        counters = self.dispatcher.counters
        log.info("daemon.once_done", **counters, confirmed=self.confirmer.confirmed,
                 confirm_expired=self.confirmer.expired, ledger_failures=self.ledger_failures,
                 finished=idle, drained=drained, pulled=budget.pulled)
        # 0 only when every pulled event is in VOD's hands as confirmed: anything left
        # undelivered, unrecorded or unconfirmed comes back later, which is 75.
        incomplete = (counters["failed"] or counters["deferred"] or self.confirmer.expired
                      or self.ledger_failures or not idle or not drained)
        if status == EX_OK and incomplete:
            status = EX_TEMPFAIL
        return status

    def _once_app(self, api: VodApi, app: int | None, budget: _PullBudget, *,
                  drain: bool) -> None:
        """`once` for one sub-app: pull while draining, within max_in_flight like the pull
        loop. A failed delivery ends the drain: the run exits 75 anyway, and pulling on
        would only feed more events to a failing sink."""
        while not budget.spent():
            if not self.dispatcher.wait_capacity(self.config.vod.confirm_window_s * 4):
                log.warning("once.no_capacity", sub_app_id=app,
                            action="stopped pulling: deliveries did not finish")
                return
            try:
                sent_at, items = self._once_pull(api, app)
                self._accept(app, sent_at, items)
            finally:
                self.dispatcher.release_capacity()
            budget.pulled += min(len(items), PULL_BATCH_MAX)
            counters = self.dispatcher.counters
            if not drain or not items or counters["failed"] or counters["deferred"]:
                return

    def _once_pull(self, api: VodApi, app: int | None) -> tuple[float, list[Any]]:
        """PullEvents for `once`: a few tries while the API does not answer, but none after
        refused credentials, which a retry a minute later would not fix in a cron job."""
        retrying = Retrying(retry=retry_if_exception_type(ApiError)
                            & retry_if_not_exception_type(AuthError),
                            wait=_pull_wait, stop=stop_after_attempt(ONCE_PULL_ATTEMPTS),
                            sleep=self._sleep, before_sleep=_log_pull_error(app), reraise=True)
        for attempt in retrying:
            with attempt:
                return self._pull(api, app, max_attempts=1)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def stop(self) -> None:
        """Ask the daemon to stop (what SIGTERM does); safe from any thread."""
        self._stop_requested = True
        self._wake_main()

    def _wake_main(self) -> None:
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
                wake.send(b"\0")

    @staticmethod
    def _policy(config: Config) -> Policy:
        return Policy(concurrency=config.daemon.concurrency,
                      max_in_flight=config.daemon.max_in_flight, unrouted=config.daemon.unrouted,
                      max_age_s=config.daemon.max_age_s,
                      confirm_margin_s=config.daemon.confirm_margin_s,
                      unresolved_hold_s=2 * config.vod.confirm_window_s)

    @staticmethod
    def _api_call_limit_s(config: Config) -> float:
        """A pull or confirm call still running after this is hung (the SDK has its timeout)."""
        return 2 * config.vod.request_timeout_s + 5.0

    def _on_delivery(self, sink: str, outcome: str, seconds: float | None) -> None:
        self.metrics.delivery(sink, outcome, seconds)
        if outcome == "dead":
            self.metrics.dead_letter("sink")

    def _oldest_unconfirmed_s(self) -> float:
        """Age of the oldest pulled event not confirmed yet (its pull is its deadline minus
        the window); 0 when none is held."""
        deadlines = [d for d in (self.dispatcher.oldest_deadline(),
                                 self.confirmer.oldest_deadline()) if d is not None]
        if not deadlines:
            return 0.0
        pulled_at = min(deadlines) - self.config.vod.confirm_window_s
        return max(0.0, self._clock() - pulled_at)

    def _record_confirmed(self, receipts: list[Receipt]) -> None:
        """ConfirmEvents accepted these: remember it, so an identical later body is new."""
        done = [Confirmation(r.event_key, r.occurrence) for r in receipts
                if r.event_key is not None]
        if not done:
            return
        try:
            self.ledger.record_confirmed(done)
        except LedgerError as exc:
            self.ledger_failures += 1
            self._ledger_failed()
            log.error("ledger.write_failed", error=str(exc), confirmations=len(done),
                      consequence="an identical notification arriving later may be taken "
                                  "for a redelivery of these")

    @staticmethod
    def _dead_letter(config: Config) -> DeadLetter | None:
        directory = config.dead_letter.directory
        return DeadLetter(directory) if directory else None

    def _announce(self) -> None:
        secrets = self.credentials.get()
        log.info("daemon.started", pid=os.getpid(), cpu=self.cpu, credentials=secrets.source,
                 endpoint=self.config.vod.endpoint, sub_app_ids=[a or 0 for a in self.apps],
                 sinks=[r.config.name for r in self.dispatcher.routes],
                 ledger=self.ledger.name, shared_ledger=self.ledger.shared,
                 requests_per_s=round(self.pull_pacer.rate, 2))
        self._prune()

    def _prune(self) -> bool:
        """Forget old ledger rows; a failure (a full disk) is logged, never fatal."""
        try:
            removed = self.ledger.prune()
        except LedgerError as exc:
            log.error("ledger.prune_failed", error=str(exc), retry_in_s=PRUNE_RETRY_S)
            return False
        if removed:
            log.info("ledger.pruned", rows=removed)
        return True

    def _main_loop(self) -> None:
        interval = watchdog_interval_s()
        next_prune = self._clock() + PRUNE_EVERY_S
        next_status = self._clock() + STATUS_EVERY_S
        stats_every_s = self.config.log.stats_interval_s
        next_stats = self._clock() + stats_every_s if stats_every_s else None
        stuck_logged = False
        # A supervisor's worker outlives a supervisor killed outside systemd (SIGKILL):
        # it notices its parent changed and stops, rather than pulling on unsupervised.
        parent = os.getppid() if os.environ.get(WORKER_ENV) else None
        while True:
            self._wait_for_wake(min(interval or STATUS_EVERY_S, STATUS_EVERY_S))
            if parent is not None and os.getppid() != parent:
                log.warning("daemon.orphaned", action="stopping: the supervisor is gone")
                self._stop_requested = True
            now = self._clock()
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                self._notifier.status(self.metrics.summary_line())
            if next_stats is not None and now >= next_stats:
                next_stats = now + stats_every_s
                log.info("daemon.stats", **self.metrics.snapshot())
            if self._stop_requested:
                self.stop_event.set()
                return
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if interval is not None:
                # Fed while no loop overruns its bound, VOD answering or not: a restart
                # cannot end an API outage, but it does end a hang.
                overdue = self.heartbeat.overdue()
                if not overdue:
                    self._notifier.watchdog()
                    stuck_logged = False
                elif not stuck_logged:
                    stuck_logged = True
                    log.error("daemon.stuck", threads=overdue,
                              action="not feeding the watchdog: systemd will restart procpoll")
            if self._clock() >= next_prune:
                ok = self._prune()
                next_prune = self._clock() + (PRUNE_EVERY_S if ok else PRUNE_RETRY_S)

    def _wait_for_wake(self, timeout_s: float) -> None:
        """Sleep until a signal, stop() or the timeout; then empty the wakeup socket."""
        wake = self._wake_r
        if wake is None:  # not started by run()
            time.sleep(timeout_s)
            return
        select.select([wake], [], [], timeout_s)
        try:
            while wake.recv(256):
                pass
        except OSError:  # BlockingIOError: nothing more to read
            pass

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
        running = self.config
        # Restart-only settings keep their running values; the report compares with those,
        # not with the last file read, so a second reload still names what waits.
        restart = [name for name in ("vod", "credentials", "ledger", "metrics") if
                   getattr(new, name) != getattr(running, name)]
        pools = ("concurrency", "pullers", "max_in_flight", "processes", "pin_cpu")
        restart += [f"daemon.{name}" for name in pools
                    if getattr(new.daemon, name) != getattr(running.daemon, name)]
        applied = dataclasses.replace(
            new, vod=running.vod, credentials=running.credentials, ledger=running.ledger,
            metrics=running.metrics,
            daemon=dataclasses.replace(new.daemon, **{name: getattr(running.daemon, name)
                                                      for name in pools}))
        # Deliveries already running keep their sinks and settings; the old sinks close
        # when the last of them ends.
        self.dispatcher.reconfigure(routes, self._policy(applied), self._dead_letter(applied))
        old, self.config = running, applied
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
                 confirmed=self.confirmer.confirmed, confirm_expired=self.confirmer.expired,
                 **self.dispatcher.counters)
        return EX_OK

    def _close(self) -> None:
        self.metrics.close()
        close_sinks(self.dispatcher.routes)
        self.ledger.close()
        if threading.current_thread() is threading.main_thread() and self._wake_w is not None:
            signal.set_wakeup_fd(-1)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # The C-level handler writes the signal number here: the main loop's select wakes.
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Plain attributes only: a lock here could be the one the interrupted code holds.
        self._signals += 1
        if self._signals > 1:
            os._exit(128 + signum)
        self._stop_requested = True

    def _on_reload_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True

    # --- pulling -------------------------------------------------------------------------

    def _pull_loop(self, app: int | None) -> None:
        api = self._factory()
        try:
            while not self.stop_event.is_set():
                try:
                    if not self._pull_once(api, app):
                        return
                except Exception:  # a bug here must not leave the sub-app silently unpulled
                    log.exception("pull.crashed", sub_app_id=app)
                    self.stop_event.wait(5.0)
        finally:
            api.close()

    def _ledger_failed(self) -> None:
        """A ledger call failed: pulling pauses until the ledger answers again."""
        self._ledger_suspect = True

    def _ledger_answers(self, app: int | None) -> bool:
        """Never pull what cannot be recorded: while the ledger is failing, probe it with
        backoff instead of pulling; True once it answers again."""
        if not self._ledger_suspect:
            return True
        try:
            with self.heartbeat.busy("ledger ping", 30.0):
                self.ledger.ping()
        except LedgerError as exc:
            self._ledger_failures_in_row += 1
            wait_s = backoff_s(self._ledger_failures_in_row, 0.5, PULL_BACKOFF_MAX_S)
            log.error("ledger.unavailable", sub_app_id=app, error=str(exc),
                      action="not pulling", retry_in_s=round(wait_s, 2))
            self.stop_event.wait(wait_s)
            return False
        log.info("ledger.recovered", after_failures=self._ledger_failures_in_row)
        self._ledger_suspect = False
        self._ledger_failures_in_row = 0
        return True

    def _pull_once(self, api: VodApi, app: int | None) -> bool:
        """One iteration of a pull loop; False when the daemon is stopping."""
        if not self._ledger_answers(app):
            return not self.stop_event.is_set()
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
                self.pull_pacer.wait()
                if self.stop_event.is_set():
                    raise _Stopped
                sent_at = self._clock()
                try:
                    with self.heartbeat.busy("PullEvents", self._api_call_limit_s(self.config)):
                        items = api.pull(app)
                except ApiError as exc:
                    self.metrics.api_call("PullEvents", exc.code)
                    raise
                self.metrics.api_call("PullEvents", "ok")
                self.metrics.answered_pull(app, time.time())
                if items:
                    self.metrics.pulled(app, len(items))
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
        if len(items) > PULL_BATCH_MAX:
            # More than the API's limit: the room reserved for this pull (max_in_flight)
            # holds 16. The rest stay unconfirmed and come back in later pulls.
            log.warning("pull.oversized", sub_app_id=app, count=len(items), kept=PULL_BATCH_MAX)
            items = items[:PULL_BATCH_MAX]
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
        self.metrics.dead_letter("unparseable")
        self.confirmer.submit(Receipt(handle, app, deadline))


@dataclasses.dataclass(slots=True)
class _PullBudget:
    """How many events `once` pulled, against its optional limit."""

    limit: int | None
    pulled: int = 0

    def spent(self) -> bool:
        return self.limit is not None and self.pulled >= self.limit


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

