"""Delivered marks of attempt 1, written in batches after the provider has its answer.

A mark is queued, then sent with the others in one script call: by the next claim (`RedisStore.claim` flushes
before it), or when `window` seconds have passed, or when `batch` are queued. Under load that is one call per loop
tick instead of one per event; at light load the marks ride in the same write as the next claim, so the store sees
one command batch per event instead of two. The order a client sees is kept: `flush` puts the marks on the store
connection before the claim that follows it, so a resend right after a 200 finds its event delivered. The event
has been durable since its claim: if this process dies before its mark lands, the lease brings the event back
(at-least-once, as for any crash mid-forward), and shutdown flushes and waits for the marks still queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from sidecar.errors import StoreError
from sidecar.store.records import AttemptRecord, EventRecord

log = logging.getLogger("sidecar.store")

Mark = tuple[str, str, AttemptRecord]  # route, dedupe id, the delivering attempt


class DeliveredMarks:
    def __init__(
        self,
        send: Callable[[Sequence[Mark], int], Awaitable[list[bool]]],
        window: float = 0.002,
        batch: int = 256,
    ) -> None:
        self._send = send  # puts the calls on the store connection before it returns (`RedisStore.ack_many`)
        self.window = window
        self.batch = batch
        self._queued: list[Mark] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()

    def add(self, rec: EventRecord, entry: AttemptRecord) -> None:
        self._queued.append((rec.route, rec.dedupe_id, entry))
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
        task = asyncio.ensure_future(self._outcome(self._send(marks, int(time.time() * 1000)), len(marks)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _outcome(self, sent: Awaitable[list[bool]], count: int) -> None:
        try:
            await sent
        except StoreError as exc:
            # Those events stay in flight under their leases: a replica re-delivers them later (at-least-once).
            log.warning("could not mark %d event(s) delivered (left to their leases): %s", count, exc)

    @property
    def pending(self) -> int:
        return len(self._queued) + len(self._writes)

    async def drain(self, timeout: float) -> None:
        """Write what is queued and wait (bounded) for the marks on their way; for shutdown."""
        self.flush()
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)
