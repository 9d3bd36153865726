"""Pure retry timing: attempt number -> delay. Exponential, capped, jittered; an upstream Retry-After wins."""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime


def delay(
    attempt: int,
    *,
    base: float,
    multiplier: float,
    max_delay: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt `attempt` (1 = the first forward).

    base * multiplier**(attempt-1), capped at max_delay, then spread by ±jitter (a fraction) so that replicas and
    events that failed together do not come back together; never above max_delay, never negative.
    """
    try:
        raw = 0.0 if base <= 0 else min(max_delay, base * multiplier ** max(0, attempt - 1))
    except OverflowError:  # 3.0 ** 647 and past: far beyond any max_delay
        raw = max_delay
    spread = (rng or random).uniform(-jitter, jitter) if jitter else 0.0
    return max(0.0, min(max_delay, raw * (1.0 + spread)))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date. None when absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() is also true of "²" or "①", which float() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def next_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base: float,
    multiplier: float,
    max_delay: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """The delay before the next attempt: the backoff, or the upstream's Retry-After when that is longer (clamped to
    max_delay). Retry-After is when the upstream wants no request before, not a replacement for the backoff: taken
    as the delay, `Retry-After: 0` or a date already past (a receiver's fixed maintenance end, a clock apart) spent
    every attempt within a second and dead-lettered the event while the receiver was still down."""
    backoff = delay(attempt, base=base, multiplier=multiplier, max_delay=max_delay, jitter=jitter, rng=rng)
    if retry_after is not None:
        return min(max_delay, max(backoff, retry_after))
    return backoff
