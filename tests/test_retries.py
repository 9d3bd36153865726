"""Retries: a background store write tried again with a growing pause, until it lands or its deadline passes."""

from __future__ import annotations

import asyncio
import time

from sidecar.errors import StoreUnavailable
from sidecar.store.retries import Retries


async def gaps_of_refused_tries(retries: Retries, within: float) -> list[float]:
    """Run `retries` on a write the store always refuses, for `within` seconds: the time before each try (the first
    from the start). Asserts that it gave up, in time."""
    tries: list[float] = []

    async def refused() -> None:
        tries.append(time.monotonic())
        raise StoreUnavailable("store unreachable: ConnectionRefusedError")

    t0 = time.monotonic()
    assert not await retries.until(refused, t0 + within)
    assert time.monotonic() - t0 < within + 0.5
    return [b - a for a, b in zip([t0, *tries], tries, strict=False)]


async def test_retries_until_the_deadline_with_a_doubling_pause_then_give_up() -> None:
    gaps = await gaps_of_refused_tries(Retries(first=0.05, cap=0.1), 0.5)
    assert 4 <= len(gaps) <= 7, gaps  # 0.05, 0.1 (capped), 0.1, ... within 0.5 s
    assert gaps[0] >= 0.04 and all(g >= 0.09 for g in gaps[1:-1]), gaps  # the last: cut to the deadline


async def test_retries_make_no_more_tries_in_the_last_moments_before_the_deadline() -> None:
    """Tries at 0.05 s and 0.1 s, then 1.5 ms left: that is no time for another try. Before, the pause of what was
    left could end at once (uvloop's timers count whole milliseconds) and the write went out again and again."""
    gaps = await gaps_of_refused_tries(Retries(first=0.05, cap=0.05), 0.1015)
    assert 1 <= len(gaps) <= 2, gaps
    assert all(g >= 0.04 for g in gaps), gaps


async def test_retries_hurry_cuts_the_pause_under_way() -> None:
    landed: list[float] = []

    async def write() -> None:
        landed.append(time.monotonic())

    retries = Retries(first=30.0)  # a pause that would outlast the test
    task = asyncio.ensure_future(retries.until(write, time.monotonic() + 60))
    await asyncio.sleep(0.05)
    assert not task.done() and not landed
    retries.hurry()  # shutdown
    assert await asyncio.wait_for(task, timeout=2) is True
    assert len(landed) == 1
