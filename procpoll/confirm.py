"""The confirmer: batches completed handles (≤ 16 per call, per sub-app) into ConfirmEvents.

A handle is sent as soon as its event completes; handles that complete while a call
is in flight ride in the next one. Transient failures are retried while the handle
is alive; a refused handle is dropped (VOD redelivers it, the ledger absorbs it).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog

from procpoll.dispatch import Receipt
from procpoll.errors import ApiError, ExpiredHandleError, PermanentApiError
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
                 on_progress: Callable[[], None] = lambda: None,
                 pacer: Pacer | None = None) -> None:
        self._factory = client_factory
        self._pacer = pacer
        self._clock = clock
        self._on_progress = on_progress
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
        if self._pacer is not None:
            self._pacer.wait()  # handles completing meanwhile ride in this call
        with self._cv:
            now = self._clock()
            batch: list[Receipt] = []
            while pending and len(batch) < MAX_HANDLES_PER_CONFIRM:
                receipt = pending.popleft()
                if receipt.deadline > now:
                    batch.append(receipt)
                else:
                    self.expired += 1
                    log.warning("events.confirm_expired", sub_app_id=app, handles=1)
            if batch:
                self._busy += 1
            else:
                self._sending[app] -= 1
                self._cv.notify_all()
            return batch

    def _run(self, app: int | None) -> None:
        api = self._factory()
        failures = 0
        while True:
            batch = self._take(app)
            if batch is None:
                return
            if not batch:
                continue
            try:
                retry = self._send(api, app, batch)
            except Exception:  # a bug must not silently end confirming for this sub-app
                log.exception("confirm.crashed", sub_app_id=app, handles=len(batch))
                retry = [r for r in batch if r.deadline > self._clock()]
            finally:
                with self._cv:
                    self._busy -= 1
                    self._sending[app] -= 1
                    self._cv.notify_all()
            if retry:
                failures += 1
                with self._cv:
                    self._queues[app].extendleft(reversed(retry))
                    self._cv.wait(min(2.0, 0.05 * 2 ** min(failures, 6)))
            else:
                failures = 0

    def _send(self, api: VodApi, app: int | None, batch: list[Receipt]) -> list[Receipt]:
        """Confirm a batch; return the receipts to try again."""
        try:
            api.confirm(app, [r.handle for r in batch])
        except ExpiredHandleError as exc:
            self._on_progress()
            if len(batch) == 1:
                self.expired += 1
                log.warning("events.confirm_refused", sub_app_id=app, code=exc.code,
                            reason="handle expired; VOD will redeliver and the ledger absorbs it")
                return []
            # Which handle was refused is not said: confirm the rest one by one.
            for receipt in batch:
                self._send(api, app, [receipt])
            return []
        except PermanentApiError as exc:
            self._on_progress()
            log.error("events.confirm_failed", sub_app_id=app, code=exc.code, error=exc.message,
                      handles=len(batch))
            return []
        except ApiError as exc:
            log.warning("events.confirm_retry", sub_app_id=app, code=exc.code, handles=len(batch))
            now = self._clock()
            return [r for r in batch if r.deadline > now]
        self._on_progress()
        with self._cv:
            self.confirmed += len(batch)
        log.info("events.confirmed", sub_app_id=app, count=len(batch))
        return []
