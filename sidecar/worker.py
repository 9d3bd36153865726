"""RetryWorker: take due (with a lease) -> forward -> ack | reschedule | bury.

Runs inside every `sidecar run` process. Any number of replicas may walk the same shards: `take.lua` re-checks
each event's due time inside the script, so every due event is taken by exactly one of them, and an event whose
taker died is due again when its lease runs out. `run_once()` drains what is due now and returns, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from sidecar.breaker import Grant
from sidecar.dispatch import CIRCUIT_WAIT, Dispatcher
from sidecar.errors import StoreError, StoreFull
from sidecar.logs import Tally
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
        self.concurrency = concurrency  # attempts at once (the app gives upstream.max_connections)
        # the running attempts, each with the size of the body it holds until it ends; their sum is kept within
        # server.max_inflight_bytes as the ingress keeps the bodies it reads
        self._running: dict[asyncio.Task[bool], int] = {}
        self.held_bytes = 0
        self._largest = 1  # the largest body an event may have (see _room)
        self._full = Tally(STORE_REPORT_EVERY)  # attempts a full store could not settle
        self._wake = asyncio.Event()  # a slot freed, or stop(): the loop need not wait out its poll
        self._made = 0  # attempts made, for run_once's count
        # where the next pass starts: replicas start at random shards, so they seldom contend for the same one
        self._next_shard = random.randrange(store.keys.shards)
        self.last_beat = time.monotonic()
        self._stopping = asyncio.Event()
        self._down = Tally(store_report_every)  # failed passes of the current store outage
        self._reached_store = False  # the current pass got an answer from the store
        # Housekeeping run once per loop (e.g. flushing batched counters to the store).
        self.periodic: list[Callable[[], Awaitable[None]]] = []

    async def run_once(self) -> int:
        """Attempt every event due now, across all shards, and wait for those attempts; return how many were made.
        For tests: `run` is the worker's loop."""
        self.last_beat = time.monotonic()
        made_before = self._made
        cutoff_ms = self.store.clock.now_ms()  # what a retry schedules meanwhile waits for the next call
        while True:
            await self._pass(cutoff_ms)
            if not self._running:
                return self._made - made_before
            await asyncio.wait(set(self._running), return_when=asyncio.FIRST_COMPLETED)

    async def _pass(self, due_by_ms: int | None = None) -> int:
        """Take what is due by `due_by_ms` (default: now), shard by shard, no more than there are free attempt
        slots, and start an attempt for each at once; return how many were taken. The attempts run on while the
        worker goes on: one slow upstream never holds back the other due events, and an event is taken only when
        it can be attempted at once, so its lease (which starts at the take) is not spent waiting for a slot."""
        if self.dispatcher.breakers.all_open():
            return 0  # every upstream is known down: leave the schedule alone until a probe is due
        shards = self.store.keys.shards
        first = self._next_shard
        self._next_shard = (first + 1) % shards  # a full worker starts its next pass one shard on
        taken_now = 0
        lease_ms = self._lease_ms()
        # A shard whose store node does not answer (one cluster node partitioned away) must not hold back the
        # others: its failure is raised once every other shard has had its turn, and the other shards of that node
        # are not tried again in this pass (each would cost a whole store timeout).
        failed: StoreError | None = None
        down: set[object] = set()
        for shard in ((first + i) % shards for i in range(shards)):
            node = self.store.node_of(shard)
            if node in down:
                continue
            while True:
                if self._stopping.is_set():  # shutting down: take nothing more (what is taken is attempted)
                    return taken_now
                free = min(self.concurrency - len(self._running), self._room())
                if free <= 0:
                    return taken_now
                limit = min(self.batch, free)
                # each lease starts when its event is taken (on the store's clock)
                now_ms = self.store.clock.now_ms()
                try:
                    taken = await self.store.take_due(shard, now_ms, lease_ms, limit, due_by_ms)
                except StoreError as exc:
                    failed = failed or exc
                    down.add(node)
                    break
                self._reached_store = True
                for t in taken:
                    task = asyncio.create_task(self._attempt(t), name="retry-attempt")
                    self._running[task] = size = len(t.record.body)
                    self.held_bytes += size
                    self._largest = max(self._largest, size)
                    task.add_done_callback(self._finished)
                taken_now += len(taken)
                if len(taken) < limit:
                    break
        if failed is not None:
            raise failed
        return taken_now

    def _room(self) -> int:
        """How many more events may be taken with the bodies held within `server.max_inflight_bytes`, each counted
        as large as `server.max_body_bytes` until taken (a take returns the bodies); at least one when none is
        held. A backlog of 1 MiB events, 100 at once (`upstream.max_connections`), took a process past a 256 MiB
        memory limit; small bodies still fill every slot, a take or two later."""
        server = self.dispatcher.config.server
        # each event not yet taken counts as the largest body it may have: the limit now, or a larger one it was
        # stored under (a reload that lowers max_body_bytes leaves the stored bodies as they are)
        self._largest = max(self._largest, server.max_body_bytes)
        room = (server.max_inflight_bytes - self.held_bytes) // self._largest
        return room if self.held_bytes else max(room, 1)

    def _finished(self, task: asyncio.Task[bool]) -> None:
        self.held_bytes -= self._running.pop(task, 0)
        if not task.cancelled() and task.exception() is None and task.result():
            self._made += 1
        self._wake.set()

    def _lease_ms(self) -> int:
        # One lease for the whole batch: the longest any route needs (routes only differ by retry.lease).
        return max(self.dispatcher.lease_ms(r) for r in self.dispatcher.config.routes)

    async def _attempt(self, taken: Taken) -> bool:
        """Forward one taken event, or give it back while its upstream's circuit is open. True if attempted."""
        rec, lease_end_ms = taken.record, taken.lease_end_ms
        route = self.dispatcher.route(rec.route)
        try:
            held = self.store.marks.unlanded(rec)
            if held is not None and taken.burial is None:
                # delivered by this process, its mark not written while the store failed (longer than the lease):
                # written now, the event not sent again
                mark, done_ms = held
                await self.store.ack_many([mark], done_ms)
                self.store.marks.landed([mark])
                log.info(
                    "%s/%s was delivered before the store failed: marked delivered now, not sent again",
                    rec.route,
                    rec.event_id,
                )
                return True
            # (a burial cut short is finished whatever the breaker says: nothing is sent)
            grant: Grant | None = None
            if route is not None and taken.burial is None:
                breaker = self.dispatcher.breaker(route)
                if not (grant := breaker.allow()):
                    wait = max(breaker.retry_at(), CIRCUIT_WAIT)
                    return await self.dispatcher.put_back(
                        route, rec, taken.attempt, taken.history, wait, lease_end_ms
                    )
            await self.dispatcher.attempt(
                rec, taken.attempt, taken.history, lease_end_ms=lease_end_ms, burial=taken.burial, grant=grant
            )
            if (unsaid := self._full.over()) is not None:
                log.warning(
                    "store settles attempts again (%d more not settled since the last report)", unsaid
                )
        except StoreFull as exc:  # a failing receiver's retries wait for their leases: said once a while
            self._full.say(
                log, logging.WARNING, "store full: %d attempt(s) not settled, left to their leases: %s", exc
            )
        except StoreError as exc:
            log.warning(
                "attempt %d of %s/%s not settled (its lease brings it back): %s",
                taken.attempt,
                rec.route,
                rec.event_id,
                exc,
            )
        except Exception:
            # A bug met by one event must not take the others (or the worker) down with it.
            log.exception(
                "attempt %d of %s/%s failed unexpectedly (its lease brings it back)",
                taken.attempt,
                rec.route,
                rec.event_id,
            )
        return True

    @property
    def store_report_every(self) -> float:
        return self._down.every

    @store_report_every.setter
    def store_report_every(self, seconds: float) -> None:
        self._down.every = seconds

    def _store_failed(self, exc: StoreError) -> None:
        since = self._down.count()
        if since is None:
            return
        if self._down.total == 1:
            log.warning(
                "retry worker: store unavailable: %s (retrying; reports again at most every %gs)",
                exc,
                self._down.every,
            )
            return
        log.warning(
            "retry worker: store still unavailable after %.0fs (%d failed pass(es) since the last report): %s",
            time.monotonic() - (self._down.began or 0.0),
            since,
            exc,
        )

    def _store_answered(self) -> None:
        began, failures = self._down.began, self._down.total
        if began is None:  # no outage under way
            return
        self._down.over()
        log.info(
            "retry worker: store available again after %.1fs (%d failed pass(es))",
            time.monotonic() - began,
            failures,
        )

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.last_beat = time.monotonic()
                self._reached_store = False
                # cleared before the pass, not before the wait: an attempt that ends during the pass or the
                # housekeeping frees its slot for the next pass at once (it waited out a whole poll)
                self._wake.clear()
                taken = 0
                try:
                    taken = await self._pass()
                except StoreError as exc:
                    self._store_failed(exc)
                except Exception:
                    # Left unhandled this would end the task silently: no retry in this process would run again.
                    log.exception("retry worker: unexpected error; carrying on")
                else:
                    # a pass that asked nothing (every circuit open) says nothing of the store
                    if self._reached_store:
                        self._store_answered()
                try:
                    for task in self.periodic:
                        await task()
                except Exception:  # housekeeping that failed is tried again next loop
                    log.exception("retry worker: housekeeping failed; carrying on")
                if taken == 0 or len(self._running) >= self.concurrency:
                    # nothing due, or no free slot: wait for the next poll, a freed slot or stop()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            if self._running:  # what was taken is attempted (the caller bounds this by the shutdown grace)
                await asyncio.wait(set(self._running))
        finally:
            if self._running:  # cut short (the grace is spent): leased, attempted again later
                cut = set(self._running)
                for attempt in cut:
                    attempt.cancel()
                await asyncio.wait(cut, timeout=1.0)  # let them unwind before the store and session close

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
