"""The confirmer: batches completed handles (≤ 16 per call, per sub-app) into ConfirmEvents.

A handle is sent as soon as its event completes; handles that complete while a call
is in flight ride in the next one. Transient failures are retried while the handle
is alive; a refused handle is dropped (VOD redelivers it, the ledger absorbs it).
Accepted handles are reported to `on_confirmed`, which records them in the ledger:
a notification whose confirmation is recorded and that comes back is a new one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import structlog

from procpoll.dispatch import Receipt
from procpoll.errors import ApiError, ExpiredHandleError, PermanentApiError
from procpoll.heartbeat import Heartbeat
from procpoll.metrics import Metrics
from procpoll.vod import MAX_HANDLES_PER_CONFIRM, Pacer, VodApi

log = structlog.get_logger("procpoll.confirm")


class Confirmer:
    """Confirm threads per sub-app, sharing one queue each.

    A call costs the same CPU whatever it carries, so batches are kept full: a handle is
    sent at once when no call of its sub-app is in flight; while one is, a second call
    starts only for a full batch of 16. Four threads per sub-app let full batches go out
    in parallel (two confirmed at most ~450 events/s). With a `pacer` (one for all
    sub-apps: the limit is per account) a thread waits for its slot *before* taking
    handles, so those completing meanwhile ride in the same call.
    """

    def __init__(self, client_factory: Callable[[], VodApi], sub_app_ids: list[int | None], *,
                 threads_per_app: int = 4, clock: Callable[[], float] = time.monotonic,
                 on_confirmed: Callable[[list[Receipt]], None] = lambda _receipts: None,
                 pacer: Pacer | None = None, heartbeat: Heartbeat | None = None,
                 call_limit_s: float = 30.0, metrics: Metrics | None = None) -> None:
        self._factory = client_factory
        self.pacer = pacer
        self._on_confirmed = on_confirmed
        self._heartbeat = heartbeat
        self._call_limit_s = call_limit_s
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._cv = threading.Condition()
        self._queues: dict[int | None, deque[Receipt]] = {app: deque() for app in sub_app_ids}
        self._busy = 0
        self._sending: dict[int | None, int] = dict.fromkeys(sub_app_ids, 0)  # calls begun
        self._closing = False
        self._threads = [
            threading.Thread(target=self._run, args=(app,), name=f"confirm-{app or 0}-{n}",
                             daemon=True)
            for app in sub_app_ids for n in range(threads_per_app)
        ]
        self.confirmed = 0
        self.expired = 0

    def start(self) -> None:
        """Start the confirm threads."""
        for thread in self._threads:
            thread.start()

    def submit(self, receipt: Receipt) -> None:
        """Queue a handle whose event is complete."""
        with self._cv:
            self._queues[receipt.sub_app_id].append(receipt)
            # Wake a thread only when it would send, not once per handle for nothing.
            if self._should_send(receipt.sub_app_id):
                self._cv.notify()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued handle was sent (or dropped); then let the threads exit."""
        with self._cv:
            drained = self._cv.wait_for(
                lambda: self._busy == 0 and not any(self._queues.values()), timeout_s)
            self._closing = True
            self._cv.notify_all()
        return drained

    def oldest_deadline(self) -> float | None:
        """The earliest deadline of the handles waiting to be sent (None when none wait)."""
        with self._cv:
            return min((r.deadline for queue in self._queues.values() for r in queue),
                       default=None)

    def _should_send(self, app: int | None) -> bool:
        pending = len(self._queues[app])
        return pending > 0 and (not self._sending[app] or pending >= MAX_HANDLES_PER_CONFIRM)

    def _take(self, app: int | None) -> list[Receipt] | None:
        with self._cv:
            pending = self._queues[app]
            self._cv.wait_for(lambda: self._closing or self._should_send(app))
            if not pending:
                return None
            self._sending[app] += 1
        if self.pacer is not None:
            self.pacer.wait()  # handles completing meanwhile ride in this call
        with self._cv:
            now = self._clock()
            batch: list[Receipt] = []
            while pending and len(batch) < MAX_HANDLES_PER_CONFIRM:
                receipt = pending.popleft()
                if receipt.deadline > now:
                    batch.append(receipt)
                else:
                    self.expired += 1
                    self._metrics.handles_expired()
                    log.warning("events.confirm_expired", sub_app_id=app, handles=1)
            if batch:
                self._busy += 1
            else:
                self._sending[app] -= 1
                self._cv.notify_all()
            return batch

    def _run(self, app: int | None) -> None:
        api = self._factory()
        try:
            self._confirm_loop(api, app)
        finally:
            api.close()

    def _confirm_loop(self, api: VodApi, app: int | None) -> None:
        failures = 0
        while True:
            batch = self._take(app)
            if batch is None:
                return
            if not batch:
                continue
            retry: list[Receipt] = []
            try:
                retry = self._send(api, app, batch)
            except Exception:  # a bug must not silently end confirming for this sub-app
                log.exception("confirm.crashed", sub_app_id=app, handles=len(batch))
                retry = [r for r in batch if r.deadline > self._clock()]
            finally:
                with self._cv:
                    # Put back before the call stops counting as busy: drain() must not
                    # see an empty queue and no call in flight while these are in hand.
                    self._queues[app].extendleft(reversed(retry))
                    self._busy -= 1
                    self._sending[app] -= 1
                    self._cv.notify_all()
            if retry:
                failures += 1
                with self._cv:
                    self._cv.wait(min(2.0, 0.05 * 2 ** min(failures, 6)))
            else:
                failures = 0

    def _call(self, api: VodApi, app: int | None, batch: list[Receipt]) -> None:
        busy: Any = nullcontext() if self._heartbeat is None else \
            self._heartbeat.busy("ConfirmEvents", self._call_limit_s)
        with busy:
            try:
                api.confirm(app, [r.handle for r in batch])
            except ApiError as exc:
                self._metrics.api_call("ConfirmEvents", exc.code)
                raise
        self._metrics.api_call("ConfirmEvents", "ok")

    def _send(self, api: VodApi, app: int | None, batch: list[Receipt]) -> list[Receipt]:
        """Confirm a batch; return the receipts to try again."""
        try:
            self._call(api, app, batch)
        except ExpiredHandleError as exc:
            if len(batch) == 1:
                self._expired(app, exc.code)
                return []
            # Which handle was refused is not said: confirm them one by one.
            return self._send_singly(api, app, batch)
        except PermanentApiError as exc:
            log.error("events.confirm_failed", sub_app_id=app, code=exc.code, error=exc.message,
                      handles=len(batch))
            return []
        except ApiError as exc:
            log.warning("events.confirm_retry", sub_app_id=app, code=exc.code, handles=len(batch))
            now = self._clock()
            return [r for r in batch if r.deadline > now]
        self._accepted(app, batch)
        return []

    def _send_singly(self, api: VodApi, app: int | None, batch: list[Receipt]) -> list[Receipt]:
        """After a refused batch: each handle alone, paced like any call; returns survivors
        of transient failures, to be retried like any other."""
        retry: list[Receipt] = []
        for receipt in batch:
            if self.pacer is not None:
                self.pacer.wait()
            try:
                self._call(api, app, [receipt])
            except ExpiredHandleError as exc:
                # Still live by our clock (it was sent inside its window): VOD may have
                # accepted it in the refused batch (some accept the valid handles of a batch)
                # and now refuses it as used. Recording it as confirmed errs toward one
                # duplicate if it comes back, never toward skipping a new notification.
                if receipt.deadline > self._clock():
                    self._accepted(app, [receipt], assumed=True)
                else:
                    self._expired(app, exc.code)
            except PermanentApiError as exc:
                log.error("events.confirm_failed", sub_app_id=app, code=exc.code,
                          error=exc.message, handles=1)
            except ApiError as exc:
                log.warning("events.confirm_retry", sub_app_id=app, code=exc.code, handles=1)
                if receipt.deadline > self._clock():
                    retry.append(receipt)
            else:
                self._accepted(app, [receipt])
        return retry

    def _expired(self, app: int | None, code: str) -> None:
        with self._cv:
            self.expired += 1
        self._metrics.handles_expired()
        log.warning("events.confirm_refused", sub_app_id=app, code=code,
                    reason="handle expired; VOD will redeliver and the ledger absorbs it")

    def _accepted(self, app: int | None, batch: list[Receipt], *, assumed: bool = False) -> None:
        with self._cv:
            self.confirmed += len(batch)
        self._metrics.confirmed(app, len(batch))
        if assumed:
            log.info("events.confirmed", sub_app_id=app, count=len(batch),
                     note="refused alone after a refused batch: taken as accepted by it")
        else:
            log.info("events.confirmed", sub_app_id=app, count=len(batch))
        self._on_confirmed(batch)
