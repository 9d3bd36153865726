"""Background store writes that must land: tried again after a store failure until they land, or until landing
no longer helps (a deadline), with a short backoff (0.1 s doubling to 2 s).

Three writes go through here, all off the hot path: a batch of delivered marks (`marks.py`) and an attempt's
settling write (its dead letter, or the worker's delivered mark: `Dispatcher._landing`), which help until their
events' leases run out (the retry worker then attempts them again), and the alias of a digest-deduped event
(`RedisStore._index_alias`), which admin lookups need. The first try is the caller's own: a store that answers
never sees this module. At shutdown `hurry` cuts the backoff, so what is still unwritten is tried again within the
shutdown's bounded wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from sidecar.errors import StoreError

# A try that failed this close to the deadline is the last: a pause of the little time left can end at once (uvloop's
# timers count whole milliseconds), and the writes went out back to back (a test saw 10 in the last 1.5 ms).
LAST_TRY_WITHIN = 0.005


class Retries:
    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self._hurry = asyncio.Event()

    def hurry(self) -> None:
        """Shutting down: the waits under way end now, and later ones last `first` (no doubling)."""
        self._hurry.set()

    async def until(self, write: Callable[[], Awaitable[object]], deadline: float) -> bool:
        """Call `write` again, after a backoff, until it succeeds (True) or `deadline` passes (False; on
        `time.monotonic()`, which no clock step moves). Only store failures are retried: anything else is a bug, and
        propagates."""
        delay = self.first
        while (left := deadline - time.monotonic()) > 0:
            await self._pause(min(delay, left))
            try:
                await write()
                return True
            except StoreError:
                if deadline - time.monotonic() < LAST_TRY_WITHIN:
                    break  # that was the try cut to the deadline
                delay = self.first if self._hurry.is_set() else min(delay * 2, self.cap)
        return False

    async def _pause(self, seconds: float) -> None:
        if self._hurry.is_set():
            await asyncio.sleep(seconds)  # still a pause: a store that refuses at once must not be spun on
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), seconds)
