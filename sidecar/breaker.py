"""A per-upstream circuit breaker, so a dead receiver costs one Redis round trip per event, not one timeout.

    closed     forwards flow; `threshold` consecutive retryable failures open it, provided that at least
               MIN_FAILURE_SHARE of the forwards that ended in the last WINDOW_S failed
    open       no forwards: the ingress schedules new events at once (202) and the worker leaves the schedule
               alone, until `cooldown` has passed
    half-open  one probe forward is let through; success closes the breaker, failure opens it again with the
               cooldown doubled (capped at `max_cooldown`)

Why the share: forwards run concurrently, and failures by timeout all end late, together. A retry batch of 140
forwards to a healthy upstream that answers 2 % of them too slowly ends in 135 successes, then 5 timeouts "in a
row"; counted alone, that opened the breaker on an upstream that was 97 % healthy (an external soak saw events
held back 30-50 s at a time by it). And only the probe's failure reopens an open breaker for longer: forwards sent
before it opened and failing afterwards used to double the cooldown each, up to `max_cooldown`.

Per process, in memory: each replica learns the upstream's health from its own forwards.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]

log = logging.getLogger("sidecar.breaker")


class Grant:
    """Leave to forward from one breaker (`Breaker.allow`): while it was closed (one grant per breaker, kept), or
    its one probe while half-open. Only a probe's own grant gives its slot back, and on its own breaker: a forward
    let through while the breaker was closed, whose slot wait ended after it had opened, freed the probe's slot and
    let a second probe out beside it; and one whose route moved to another receiver by a reload meanwhile gave
    back the new receiver's slot, leaving the old one's taken for good (no forward to it, so no result to free
    it). The breaker it came from tells whether the route still leads to it (`Dispatcher.attempt`)."""

    __slots__ = ("breaker",)

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker

    def release(self) -> None:
        """No forward was made after all: give the probe slot back (nothing for a closed breaker's grant, or a
        probe since ended)."""
        if self.breaker._probe_out is self:
            self.breaker._probe_out = None


WINDOW_S = 10.0  # how far back the failure share looks
MIN_FAILURE_SHARE = 0.5
WINDOW_CAP = 4096  # forwards remembered at most (a busy upstream: the last few seconds of them)


@dataclass
class Breaker:
    threshold: int = 5
    cooldown: float = 2.0
    max_cooldown: float = 60.0
    clock: Callable[[], float] = time.monotonic
    name: str = ""  # the upstream origin, for the log
    failures: int = 0
    opened_at: float | None = None
    _current_cooldown: float = field(default=0.0, init=False)
    _probe_out: Grant | None = field(default=None, init=False)  # the probe out now
    _closed: Grant = field(init=False)  # what allow() answers while closed
    # (end time, ok) of the forwards that ended in the last WINDOW_S, and how many of them failed
    _recent: deque[tuple[float, bool]] = field(default_factory=deque, init=False)
    _recent_failures: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._closed = Grant(self)

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self._current_cooldown:
            return "half_open"
        return "open"

    def retry_at(self) -> float:
        """Seconds from now until the breaker lets a probe through (0 when it is not open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self._current_cooldown - self.clock())

    def allow(self) -> Grant | None:
        """May a forward go out now? In half-open state only one probe at a time is allowed. None when not; else
        a grant (see `Grant`)."""
        state = self.state
        if state == "closed":
            return self._closed
        if state == "half_open" and self._probe_out is None:
            self._probe_out = Grant(self)
            return self._probe_out
        return None

    @staticmethod
    def release(grant: Grant | None) -> None:
        """Give back what `allow()` granted when no forward was made after all (see `Grant.release`)."""
        if grant is not None:
            grant.release()

    def record(self, ok: bool, grant: Grant | None) -> None:
        """Report a forward's result: ok = the upstream answered at all with a non-retryable status. `grant`: the
        one `allow()` gave for it; only the probe's own result is the probe's (a forward sent while the breaker was
        closed and failing after the cooldown, the probe still out, doubled the cooldown and freed the probe's
        slot: a second probe went out beside the first; a mutation audit). Required, not defaulted: a caller that
        left it out would make a failed probe hold its slot for good (no probe again in the process)."""
        now = self.clock()
        self._remember(now, ok)
        probe = grant is not None and grant is self._probe_out
        if probe:
            self._probe_out = None
        if ok:
            if self.opened_at is not None:
                log.info("upstream %s: circuit closed, it answers again", self.name)
            self.failures = 0
            self.opened_at = None
            self._current_cooldown = 0.0
            self._probe_out = None  # a probe still out is a forward like any other once it is closed
            return
        self.failures += 1
        if self.opened_at is not None:
            if probe and now - self.opened_at >= self._current_cooldown:  # the probe failed: longer
                self._current_cooldown = min(self.max_cooldown, self._current_cooldown * 2)
                self.opened_at = now
            return  # else a forward sent before the breaker opened, ending late: it is open already
        if self.failures >= self.threshold and self._recent_failures >= MIN_FAILURE_SHARE * len(self._recent):
            self._current_cooldown = self.cooldown
            self.opened_at = now
            self._probe_out = None
            log.warning(
                "upstream %s: circuit open after %d failed forwards in a row: new events are queued (202) and "
                "retries wait, a probe every %gs or more",
                self.name,
                self.failures,
                self.cooldown,
            )

    def _remember(self, now: float, ok: bool) -> None:
        recent = self._recent
        recent.append((now, ok))
        self._recent_failures += not ok
        while recent and (now - recent[0][0] > WINDOW_S or len(recent) > WINDOW_CAP):
            self._recent_failures -= not recent.popleft()[1]


@dataclass
class Breakers:
    """One breaker per upstream origin (scheme://host:port)."""

    threshold: int = 5
    cooldown: float = 2.0
    max_cooldown: float = 60.0
    _by_origin: dict[str, Breaker] = field(default_factory=dict)

    def for_url(self, url: str) -> Breaker:
        # Nothing is kept per URL: a path or query string never changes which receiver is down, and a cache keyed
        # by them grew with every query string a client sent (10,000 entries of ~7 KB before it was cleared).
        return self._for_origin(_origin(url))

    def _for_origin(self, origin: str) -> Breaker:
        breaker = self._by_origin.get(origin)
        if breaker is None:
            breaker = Breaker(self.threshold, self.cooldown, self.max_cooldown, name=origin)
            self._by_origin[origin] = breaker
        return breaker

    def all_open(self) -> bool:
        return bool(self._by_origin) and all(b.state == "open" for b in self._by_origin.values())


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0]}"
