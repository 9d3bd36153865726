"""The circuit breaker's rules, on a clock the test moves (the breaker is plain logic: no store, no network)."""

from __future__ import annotations

import tracemalloc

import pytest

from sidecar.breaker import WINDOW_S, Breaker, Breakers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock | None = None) -> tuple[Clock, Breaker]:
    clock = clock or Clock()
    return clock, Breaker(threshold=5, cooldown=2.0, max_cooldown=30.0, clock=clock)


def test_a_dead_upstream_opens_the_breaker_after_threshold_failures() -> None:
    _, b = breaker()
    for _ in range(4):
        b.record(False, None)
    assert b.state == "closed" and b.allow()
    b.record(False, None)
    assert b.state == "open" and not b.allow() and b.retry_at() == 2.0


def test_timeouts_ending_together_after_a_healthy_batch_do_not_open_it() -> None:
    """A retry batch of 140 concurrent forwards, 2 % too slow: 135 successes, then 5 timeouts at once."""
    clock, b = breaker()
    for _ in range(135):
        b.record(True, None)
    clock.now += 2.0
    for _ in range(5):
        b.record(False, None)
    assert b.state == "closed" and b.allow()
    clock.now += WINDOW_S + 1  # the healthy answers age out; a streak now is the upstream's state
    for _ in range(5):
        b.record(False, None)
    assert b.state == "open"


def test_a_mostly_failing_upstream_opens_it() -> None:
    _, b = breaker()
    for _ in range(4):
        b.record(True, None)
    for _ in range(5):
        b.record(False, None)  # 5 of 9 failed: over half
    assert b.state == "open"


def test_forwards_ending_late_while_open_do_not_lengthen_the_cooldown() -> None:
    clock, b = breaker()
    for _ in range(5):
        b.record(False, None)
    clock.now += 0.5
    for _ in range(20):  # sent before it opened, failing now
        b.record(False, None)
    assert b.retry_at() == 1.5  # still the first cooldown, from when it opened


def test_a_failed_probe_doubles_the_cooldown_and_a_good_one_closes_it() -> None:
    clock, b = breaker()
    for _ in range(5):
        b.record(False, None)
    clock.now += 2.0
    probe = b.allow()
    assert b.state == "half_open" and probe and not b.allow()  # one probe at a time
    b.record(False, probe)
    assert b.state == "open" and b.retry_at() == 4.0
    clock.now += 4.0
    probe = b.allow()
    assert probe
    b.record(True, probe)
    assert b.state == "closed" and b.allow() and b.failures == 0


def test_a_late_failure_beside_the_probe_neither_doubles_the_cooldown_nor_frees_its_slot() -> None:
    """A forward let through while the breaker was closed fails after the cooldown, while the probe is still out
    (a 10 s timeout against a 2 s cooldown): it is not the probe's result. It doubled the cooldown and freed the
    probe slot, and once the doubled cooldown ended a second probe went out beside the first (a mutation audit)."""
    clock, b = breaker()
    early = b.allow()  # closed: let through; its answer takes long
    for _ in range(5):
        b.record(False, None)
    clock.now += 2.0
    probe = b.allow()
    assert probe is not None and probe is not early
    b.record(False, early)  # the early forward's timeout, the probe still out
    assert b.state == "half_open" and b.retry_at() == 0.0  # the cooldown is not doubled
    clock.now += 4.0
    assert b.allow() is None  # the probe is still out: no second one
    b.record(False, probe)
    assert b.state == "open" and b.retry_at() == 4.0  # the probe's own failure doubles it
    clock.now += 4.0
    assert b.allow() is not None


def test_only_the_probe_gives_back_the_probe_slot() -> None:
    """A forward let through while the breaker was closed waited for a connection slot; meanwhile the breaker
    opened, went half-open and let its probe out. The first forward's slot wait ended with nothing sent and gave
    back "the probe slot": a second probe went out beside the first (a review)."""
    clock, b = breaker()
    early = b.allow()  # closed: let through, then waits for a connection slot
    for _ in range(5):
        b.record(False, None)
    clock.now += 2.0
    probe = b.allow()
    assert b.state == "half_open" and probe is not None and probe is not early
    Breaker.release(early)  # its slot wait ended, nothing sent
    assert b.allow() is None  # the probe is still out: no second one
    Breaker.release(probe)  # the probe not sent after all: its slot is free again
    again = b.allow()
    assert again is not None and b.allow() is None
    Breaker.release(probe)  # an old grant gives back nothing
    assert b.allow() is None


def test_a_probe_gives_back_its_own_breakers_slot() -> None:
    """A probe taken on one receiver's breaker, its route moved to another receiver by a reload before the
    attempt: the slot given back was the new receiver's, and the old one's stayed taken for good (no forward to
    it, so no result to free it; a review)."""
    clock, old = breaker()
    _, new = breaker(clock)
    for b in (old, new):
        for _ in range(5):
            b.record(False, None)
    clock.now += 2.0
    taken_old, taken_new = old.allow(), new.allow()
    assert taken_old is not None and taken_new is not None
    Breaker.release(
        taken_old
    )  # given back where the attempt now looks: on whichever breaker, its own is freed
    assert old.allow() is not None and new.allow() is None


def test_the_log_says_when_a_circuit_opens_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was logged: an operator saw only 202s with `circuit_open` (an audit looked for the line)."""
    breakers = Breakers(threshold=2, cooldown=2.0)
    b = breakers.for_url("http://receiver:3000/hooks?x=1")
    b.record(False, None)
    assert not caplog.records
    b.record(False, None)
    b.record(False, None)  # open already: said once
    b.opened_at = 0.0  # the cooldown is over: a probe goes out and is answered
    b.record(True, None)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "upstream http://receiver:3000: circuit open after 2 failed forwards in a row: new events are queued "
            "(202) and retries wait, a probe every 2s or more",
        ),
        ("INFO", "upstream http://receiver:3000: circuit closed, it answers again"),
    ]


def test_breakers_one_per_origin_and_nothing_kept_per_query_string() -> None:
    """A path or query never changes which receiver is down: one breaker per scheme://host:port, and a client
    replaying one request under thousands of query strings does not grow memory (it grew ~70 MiB)."""
    breakers = Breakers()
    a = breakers.for_url("http://up:3000/hooks/a?x=1")
    assert breakers.for_url("http://up:3000/other") is a
    assert breakers.for_url("http://up:3001/hooks/a?x=1") is not a
    assert breakers.for_url("https://up:3000/hooks/a?x=1") is not a
    pad = "p" * 1000
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(5000):
            assert breakers.for_url(f"http://up:3000/hooks/a?n={i}&{pad}") is a
        grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 100_000


def test_a_forward_sent_before_it_opened_failing_after_the_cooldown_does_not_reopen_it() -> None:
    """Only the probe's failure reopens the breaker for longer. A forward sent while it was still closed can fail
    after the cooldown is over (a timeout of 10 s against a 2 s cooldown): it is no probe, and must neither double
    the cooldown nor restart it, or the probe that is due would be held back by a result older than the outage."""
    clock, b = breaker()
    for _ in range(5):
        b.record(False, None)
    clock.now += 2.5  # the cooldown is over, no probe out yet
    b.record(False, None)  # the late one
    assert b.state == "half_open" and b.retry_at() == 0.0
    assert b.allow() is not None  # the probe goes out now


def test_the_worker_pauses_only_when_every_receivers_circuit_is_open() -> None:
    """`all_open` lets the retry worker leave the schedule alone: only when no receiver can take a forward. One
    receiver down must not hold back the retries of routes whose receivers answer."""
    breakers = Breakers(threshold=1, cooldown=60.0)
    down = breakers.for_url("http://down:3000/hooks")
    up = breakers.for_url("http://up:3000/hooks")
    down.record(False, None)
    assert down.state == "open" and up.state == "closed"
    assert not breakers.all_open()
    up.record(False, None)
    assert breakers.all_open()
