"""Durations as operators write them: `500ms`, `30s`, `5m`, `72h`, `1d`, `1h30m`; a bare number is seconds."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator

EXPECTED = "expected a duration like 500ms, 30s, 5m, 72h"

# A deadline on data from a socket, once due, waits this long (one more poll of the sockets) before it fails.
# After a pause of the whole process (SIGSTOP, a frozen cgroup or VM, a long GC) the deadline and data that
# arrived meanwhile are due together, and the loop runs due timers before it reads (uvloop runs timers before
# its poll; asyncio's poll, interrupted by the resume, returns nothing): failed at once, a receiver's answer
# already in the socket buffer was counted a timeout (the event delivered again), a store's reply a 503, a
# request that came in time a 408.
EXPIRY_GRACE = 0.01


@contextlib.asynccontextmanager
async def graced_timeout(seconds: float) -> AsyncIterator[None]:
    """`asyncio.timeout(seconds)` whose expiry, once due, gives the sockets one more poll (EXPIRY_GRACE): what
    arrived in time, read then, ends the block before the timeout does. Raises TimeoutError."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as timeout:
        timer = loop.call_later(seconds, lambda: timeout.reschedule(loop.time() + EXPIRY_GRACE))
        try:
            yield
        finally:
            timer.cancel()


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
# what `parse_duration` takes as text (surrounding spaces aside): a bare number of seconds, or parts like 1h30m
PATTERN = rf"(?:{_NUMBER}|(?:{_NUMBER}(?:ms|s|m|h|d))+)"
_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
# `ms` comes before `m` in the alternation so that "500ms" is not read as 500 minutes followed by garbage.
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_BARE = re.compile(_NUMBER)


def parse_duration(value: object) -> float:
    """Seconds for a duration given as text or as a number of seconds. Raises ValueError saying what is wrong.

    The error message never repeats the value: a mistyped key can put a secret where a duration belongs.
    """
    if isinstance(value, bool):  # bool is an int; `true` is never a duration
        raise ValueError(EXPECTED)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value.strip())
    else:
        raise ValueError(EXPECTED)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(EXPECTED)
    if seconds < 0:
        raise ValueError(f"{EXPECTED}; a duration cannot be negative")
    return seconds


def _parse_text(text: str) -> float:
    if text.startswith("-") and (_BARE.fullmatch(text[1:]) or _DURATION.fullmatch(text[1:])):
        raise ValueError(f"{EXPECTED}; a duration cannot be negative")
    if _BARE.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError(EXPECTED)
    return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text))
