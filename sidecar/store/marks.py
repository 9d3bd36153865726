"""Delivered marks of attempt 1, written in batches after the provider has its answer.

A mark is queued, then sent with the others in one script call: by the next claim (`RedisStore.claim` flushes
before it), or when `window` seconds have passed, or when `batch` are queued. Under load that is one call per loop
tick instead of one per event; at light load the marks ride in the same write as the next claim, so the store sees
one command batch per event instead of two. The order a client sees is kept: `flush` puts the marks on the store
connection before the claim that follows it, so a resend right after a 200 finds its event delivered. The event
has been durable since its claim: if this process dies before its mark lands, the lease brings the event back
(at-least-once, as for any crash mid-forward), and shutdown flushes and waits for the marks still queued.

A batch the store fails (a stall, a failover) is sent again, off the hot path, until it lands (see `retries.py`):
dropped, its events would stay in flight and be delivered again when their leases run out. Retrying stops once the
latest lease in the batch has run out (the retry worker may have taken the events by then; a mark landing later
is still harmless, ack.lua marks an event delivered whoever attempted it), or when shutdown's wait is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from sidecar.errors import StoreError
from sidecar.store.records import AttemptRecord, EventRecord
from sidecar.store.retries import Retries

log = logging.getLogger("sidecar.store")

Mark = tuple[str, str, AttemptRecord]  # route, dedupe id, the delivering attempt
MAX_UNLANDED = 100_000  # marks kept past their leases (a few hundred bytes each)


def run_of(rec: EventRecord) -> int:
    """The run of attempts `rec` belongs to (replay.lua starts a new one, keeping `first_seen_ms`): a claim's run
    is its first sight, which a record made at the claim does not carry as `run`."""
    return rec.run or rec.first_seen_ms


class DeliveredMarks:
    def __init__(
        self,
        send: Callable[[Sequence[Mark], int], Awaitable[list[bool]]],
        retries: Retries,
        window: float = 0.002,
        batch: int = 256,
        clock: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._send = send  # puts the calls on the store connection before it returns (`RedisStore.ack_many`)
        self._retries = retries
        self._now_ms = clock  # the schedule's clock (lease ends are on it): the store's, see clock.py
        self.window = window
        self.batch = batch
        self._queued: list[Mark] = []
        # the queued marks' events' runs of attempts (`run_of`): which claim or replay each mark is for
        self._runs: list[int] = []
        self._lease_end = 0  # ms: the latest lease end of the queued marks' events
        self._sending = 0  # marks sent and not settled: on their way, or waiting to be sent again
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()
        # Marks that failed (store down, disk full) and have not landed yet, by (route, dedupe id), with their
        # time: kept after their leases run out, so the retry worker of this process, taking such an event again,
        # writes its mark instead of delivering it a second time (see `unlanded`)
        self._unlanded: dict[tuple[str, str], tuple[Mark, int, int]] = {}

    def add(self, rec: EventRecord, entry: AttemptRecord, lease_end_ms: int) -> None:
        """Queue the mark of `rec`, whose lease (held by this attempt) runs out at `lease_end_ms`."""
        self._queued.append((rec.route, rec.dedupe_id, entry))
        self._runs.append(run_of(rec))
        if lease_end_ms > self._lease_end:
            self._lease_end = lease_end_ms
        if len(self._queued) >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self.flush)

    def flush(self) -> None:
        """Send what is queued now (the store connection has it before this returns); the outcome comes later."""
        if not self._queued:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        marks, self._queued = self._queued, []
        runs, self._runs = self._runs, []
        lease_end, self._lease_end = self._lease_end, 0
        now_ms = self._now_ms()
        self._sending += len(marks)
        task = asyncio.ensure_future(self._outcome(self._send(marks, now_ms), marks, runs, now_ms, lease_end))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _outcome(
        self, sent: Awaitable[list[bool]], marks: list[Mark], runs: list[int], now_ms: int, lease_end: int
    ) -> None:
        try:
            await sent
        except StoreError as exc:
            await self._again(marks, runs, now_ms, lease_end, exc)
        finally:
            self._sending -= len(marks)

    async def _again(
        self, marks: list[Mark], runs: list[int], now_ms: int, lease_end: int, exc: StoreError
    ) -> None:
        count = len(marks)
        log.warning(
            "could not mark %d event(s) delivered (trying again while their leases last): %s", count, exc
        )
        for mark, run in zip(marks, runs, strict=True):
            self.keep(mark, now_ms, run)
        # the lease end, on the monotonic clock
        deadline = time.monotonic() + (lease_end - self._now_ms()) / 1000
        if await self._retries.until(lambda: self._send(marks, now_ms), deadline):
            log.info("marked %d event(s) delivered after the store failure", count)
            self.landed(marks)
        else:
            log.warning(
                "could not mark %d event(s) delivered before their leases ran out: kept, and written when the "
                "retry worker takes them again instead of a second delivery",
                count,
            )

    def keep(self, mark: Mark, now_ms: int, run: int) -> None:
        """Keep `mark` (made at `now_ms`, in the event's run of attempts `run`: see `run_of`), which has not landed,
        to be written when this process's retry worker takes its event again (see `unlanded`)."""
        self._unlanded[(mark[0], mark[1])] = (mark, now_ms, run)
        while len(self._unlanded) > MAX_UNLANDED:  # the oldest go: at worst delivered again, as before
            del self._unlanded[next(iter(self._unlanded))]

    def unlanded(self, rec: EventRecord) -> tuple[Mark, int] | None:
        """The delivered mark of this event, with its time, if this process delivered it and could not write its
        mark yet (the store failed for longer than the lease): the retry worker writes it instead of forwarding.
        Only for the run it was made in: an event replayed, or forgotten (admin) and claimed again, is not."""
        held = self._unlanded.get((rec.route, rec.dedupe_id))
        if held is None or held[2] != run_of(rec):
            return None
        return held[0], held[1]

    def landed(self, marks: Sequence[Mark]) -> None:
        for mark in marks:
            self._unlanded.pop((mark[0], mark[1]), None)

    @property
    def pending(self) -> int:
        """Marks not written yet: queued, on their way, or waiting to be sent again."""
        return len(self._queued) + self._sending

    async def settled(self, timeout: float) -> None:
        """Write what is queued and wait (bounded, nothing cancelled) for the marks on their way: an operator's
        look at an event just delivered, or its forget, must find it delivered, not in flight."""
        self.flush()
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)

    async def drain(self, timeout: float) -> None:
        """Write what is queued and wait (bounded) for the marks on their way, those waiting to be sent again
        included (sent again at once); for shutdown. Those still unwritten then are left to their leases."""
        self.flush()
        self._retries.hurry()
        if not self._writes:
            return
        _, left = await asyncio.wait(set(self._writes), timeout=timeout)
        if left:
            log.warning("shutdown: %d delivered mark(s) not written, left to their leases", self._sending)
            for task in left:
                task.cancel()
            await asyncio.wait(left)
