"""The store's clock, read locally: what every replica times its schedule by.

Due times, leases and event ages are absolute times compared inside the store's scripts with times other replicas
wrote. Taken from each process's own wall clock, a replica whose clock ran ahead took events whose leases had not
run out yet (another replica still had them in flight: the receiver got them twice), and a wall clock stepped by
NTP did the same within one process. So the sidecar times its schedule by one clock, the store's (`TIME`, on the
node of shard 0 for a cluster): read at start and every `RESYNC_S`, and carried forward in between by this
process's monotonic clock, which no step moves. Until the store has answered once, the local wall clock stands in.

Provider timestamps (signature tolerances) are not schedule times: those stay on the local wall clock, as the
providers' SDKs check them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

# How often the store's clock is read again (drift of the local monotonic clock is parts per million).
RESYNC_S = 60.0
# A reading whose round trip took longer than this is not precise enough to take (a loaded or distant store).
MAX_RTT_S = 0.5
# The wall clock and the monotonic clock moved apart by this much since the last reading: read again now. A VM
# resumed from a pause (kvmclock stands still while it is stopped) or a host resumed from suspend has a monotonic
# clock that did not count the pause, so the carried clock is that far behind; the wall clock, put right by the
# hypervisor or NTP, shows it. (A wall clock stepped by NTP also triggers it: one more TIME, harmless.)
MAX_APART_S = 1.0


class StoreClock:
    def __init__(self) -> None:
        self._base_ms = time.time() * 1000  # the store's time at `_base_mono`, once synced
        self._base_mono = time.monotonic()
        self._wall_minus_mono = time.time() - self._base_mono  # at the last reading (see MAX_APART_S)
        self.synced_at: float | None = None  # monotonic time of the last reading taken
        self._tried_at: float | None = None  # monotonic time of the last reading asked for, taken or not
        self._jumped = False  # the clocks moved apart since the last reading taken: read again every second

    def now_ms(self) -> int:
        return int(self._base_ms + (time.monotonic() - self._base_mono) * 1000)

    def due_for_sync(self) -> bool:
        """Time to read the store's clock again: every RESYNC_S, and until a reading is taken, every second
        (not on every loop of the worker: a store that is down or slow is not asked on each pass); at once when the
        wall clock and the monotonic clock moved apart (MAX_APART_S)."""
        if self._tried_at is None:
            return True
        mono = time.monotonic()
        if abs(time.time() - mono - self._wall_minus_mono) > MAX_APART_S:
            self._wall_minus_mono = time.time() - mono  # asked once per jump, not on every pass
            self._jumped = True
            return True
        since = mono - self._tried_at
        return since >= (RESYNC_S if self.synced_at is not None and not self._jumped else 1.0)

    async def sync(self, read_time: Callable[[], Awaitable[tuple[int, int]]]) -> bool:
        """Read the store's clock (`read_time` answers TIME's seconds and microseconds); False when the reading
        came too slowly to trust. Store errors propagate."""
        sent = self._tried_at = time.monotonic()
        seconds, micros = await read_time()
        back = time.monotonic()
        if back - sent > MAX_RTT_S:
            return False
        self._base_ms = seconds * 1000 + micros / 1000
        self._base_mono = (sent + back) / 2  # the server read its clock about halfway
        self._wall_minus_mono = time.time() - time.monotonic()
        self._jumped = False
        self.synced_at = back
        return True
