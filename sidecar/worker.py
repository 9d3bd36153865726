"""RetryWorker: take due (with a lease) -> forward -> ack | reschedule | bury.

Runs inside every `sidecar run` process. Any number of replicas may walk the same shards: `take.lua` re-checks
each event's due time inside the script, so every due event is taken by exactly one of them, and an event whose
taker died is due again when its lease runs out. `run_once()` drains what is due now and returns, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sidecar.dispatch import Dispatcher
from sidecar.errors import StoreError
from sidecar.store import RedisStore, Taken

log = logging.getLogger("sidecar.worker")

# With the store down, every pass fails (4 a second at the default poll): say so once with the reason, then at most
# once per this many seconds with a count, then once when it answers again.
STORE_REPORT_EVERY = 30.0


class RetryWorker:
    def __init__(
        self,
        store: RedisStore,
        dispatcher: Dispatcher,
        *,
        batch: int = 100,
        concurrency: int = 50,
        poll_interval: float = 0.25,
        store_report_every: float = STORE_REPORT_EVERY,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.batch = batch
        self.poll_interval = poll_interval
        self._limit = asyncio.Semaphore(concurrency)
        self.last_beat = time.monotonic()
        self._stopping = asyncio.Event()
        self.store_report_every = store_report_every
        self._down_since: float | None = None  # monotonic time of the first failed pass of this outage
        self._down_failures = 0  # failed passes in this outage
        self._down_reported = (0.0, 0)  # (when, failures then) of the last report
        self._reached_store = False  # the current pass got an answer from the store
        # Housekeeping run once per loop (e.g. flushing batched counters to the store).
        self.periodic: list[Callable[[], Awaitable[None]]] = []

    async def run_once(self) -> int:
        """Attempt every event due now, across all shards; return how many attempts were made."""
        self.last_beat = time.monotonic()
        if self.dispatcher.breakers.all_open():
            return 0  # every upstream is known down: leave the schedule alone until a probe is due
        done = 0
        for shard in range(self.store.keys.shards):
            while True:
                if self._stopping.is_set():  # shutting down: take nothing more (what is taken is attempted)
                    return done
                now_ms = int(time.time() * 1000)
                taken = await self.store.take_due(shard, now_ms, self._lease_ms(), self.batch)
                self._reached_store = True
                if not taken:
                    break
                done += sum(await asyncio.gather(*(self._attempt(t) for t in taken)))
                if len(taken) < self.batch:
                    break
        return done

    def _lease_ms(self) -> int:
        # One lease for the whole batch: the longest any route needs (routes only differ by retry.lease).
        return max(self.dispatcher.lease_ms(r) for r in self.dispatcher.config.routes)

    async def _attempt(self, taken: Taken) -> bool:
        """Forward one taken event, or give it back while its upstream's circuit is open. True if attempted."""
        rec = taken.record
        route = self.dispatcher.route(rec.route)
        breaker = self.dispatcher.breaker(route, rec.path_qs) if route is not None else None
        async with self._limit:
            try:
                if breaker is not None and not breaker.allow():
                    await self.dispatcher.defer(rec, taken.attempt, max(breaker.retry_at(), 0.5))
                    return False
                await self.dispatcher.attempt(rec, taken.attempt, taken.history)
            except StoreError as exc:
                log.warning(
                    "attempt %d of %s/%s not settled (its lease brings it back): %s",
                    taken.attempt,
                    rec.route,
                    rec.event_id,
                    exc,
                )
            except Exception:
                # A bug met by one event must not take the batch (and the worker task) down with it.
                log.exception(
                    "attempt %d of %s/%s failed unexpectedly (its lease brings it back)",
                    taken.attempt,
                    rec.route,
                    rec.event_id,
                )
        return True

    @property
    def store_failures(self) -> int:
        """Failed passes in the current store outage (0 while the store answers)."""
        return self._down_failures

    def _store_failed(self, exc: StoreError) -> None:
        now = time.monotonic()
        self._down_failures += 1
        if self._down_since is None:
            self._down_since = now
            self._down_reported = (now, 1)
            log.warning(
                "retry worker: store unavailable: %s (retrying; reports again at most every %gs)",
                exc,
                self.store_report_every,
            )
            return
        when, failures_then = self._down_reported
        if now - when >= self.store_report_every:
            self._down_reported = (now, self._down_failures)
            log.warning(
                "retry worker: store still unavailable after %.0fs (%d failed pass(es) since the last report): %s",
                now - self._down_since,
                self._down_failures - failures_then,
                exc,
            )

    def _store_answered(self) -> None:
        if self._down_since is None:
            return
        log.info(
            "retry worker: store available again after %.1fs (%d failed pass(es))",
            time.monotonic() - self._down_since,
            self._down_failures,
        )
        self._down_since, self._down_failures = None, 0

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._reached_store = False
            try:
                done = await self.run_once()
            except StoreError as exc:
                self._store_failed(exc)
                done = 0
            except Exception:
                # Left unhandled this would end the task silently: no retry in this process would run again.
                log.exception("retry worker: unexpected error; carrying on")
                done = 0
            else:
                if self._reached_store:  # a pass that asked nothing (every circuit open) says nothing of it
                    self._store_answered()
            for task in self.periodic:
                await task()
            if done == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.poll_interval)

    def stop(self) -> None:
        self._stopping.set()
