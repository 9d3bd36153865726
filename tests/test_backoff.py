"""backoff: pure timing rules."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from sidecar.backoff import delay, next_delay, parse_retry_after

POLICY = {"base": 5.0, "multiplier": 3.0, "max_delay": 3600.0}


@pytest.mark.parametrize(("attempt", "expected"), [(1, 5.0), (2, 15.0), (3, 45.0), (4, 135.0), (9, 3600.0)])
def test_backoff_exponential_and_capped_without_jitter(attempt: int, expected: float) -> None:
    assert delay(attempt, jitter=0.0, **POLICY) == expected


def test_backoff_jitter_stays_within_band_and_cap() -> None:
    rng = random.Random(7)
    values = [delay(2, jitter=0.2, rng=rng, **POLICY) for _ in range(500)]
    assert min(values) >= 15.0 * 0.8 and max(values) <= 15.0 * 1.2
    assert len({round(v, 6) for v in values}) > 100  # actually spread
    capped = [delay(20, jitter=0.5, rng=rng, **POLICY) for _ in range(100)]
    assert max(capped) <= 3600.0


def test_backoff_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("2", now=1000.0) == 2.0
    assert parse_retry_after(formatdate(1030.0, usegmt=True), now=1000.0) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(900.0, usegmt=True), now=1000.0) == 0.0
    assert parse_retry_after("soon", now=1000.0) is None
    # digits to str.isdigit() that float() refuses: a ValueError here answered a claimed event 500
    for odd in ("\u00b2", "1\u00b3", "\u2460", "\u0663"):
        assert parse_retry_after(odd, now=1000.0) is None, odd
    assert parse_retry_after(None, now=1000.0) is None


def test_backoff_retry_after_is_a_floor_and_is_clamped() -> None:
    assert next_delay(1, 30.0, jitter=0.2, **POLICY) == 30.0
    assert next_delay(1, 2.0, jitter=0.0, **POLICY) == 5.0  # shorter than the backoff: the backoff
    assert next_delay(1, 0.0, jitter=0.0, **POLICY) == 5.0  # "0" or a date already past: not at once
    assert next_delay(1, 99999.0, jitter=0.2, **POLICY) == 3600.0
    assert next_delay(2, None, jitter=0.0, **POLICY) == 15.0


@pytest.mark.parametrize(("attempt", "multiplier"), [(648, 3.0), (3, 1e308), (10_000, 2.0)])
def test_backoff_past_float_range_is_the_cap_not_an_overflow(attempt: int, multiplier: float) -> None:
    """3.0 ** 647 overflows a float: every attempt from 648 on (max_attempts: 1000) raised OverflowError after
    the forward went out, and the event came back only at its lease's end (a config fuzz)."""
    policy = {**POLICY, "multiplier": multiplier}
    assert delay(attempt, jitter=0.0, **policy) == 3600.0
    assert 0.0 <= delay(attempt, jitter=0.5, rng=random.Random(1), **policy) <= 3600.0


def test_backoff_with_a_zero_base_stays_zero_past_float_range() -> None:
    assert [delay(a, base=0.0, multiplier=3.0, max_delay=21600.0, jitter=0.0) for a in (1, 647, 648)] == [
        0.0
    ] * 3
