"""One forward attempt of a stored event, and what it means for the event: delivered, rescheduled or dead.

The ingress makes attempt 1 right after the claim; the retry worker makes every later one (and replays). Both go
through `Dispatcher.attempt`, so there is one code path from "we hold the event" to its next state.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sidecar.backoff import next_delay, parse_retry_after
from sidecar.breaker import Breaker, Breakers, Grant
from sidecar.config import Config, RouteConfig
from sidecar.errors import StoreError
from sidecar.forwarder import Forwarder, Outcome, upstream_headers
from sidecar.http1 import POOL_TIMEOUT
from sidecar.logs import Tally
from sidecar.routes import RouteTable, target_url
from sidecar.store import AttemptRecord, Burial, EventRecord, RedisStore
from sidecar.store.marks import run_of
from sidecar.telemetry import AnySpan, Telemetry

log = logging.getLogger("sidecar.dispatch")
T = TypeVar("T")

# Seconds a provider waits for an answer less a margin for the network: Slack, Discord and Zoom give 3 s, PagerDuty
# 5 s (providers.md); Shopify 5 s in all, 1 s of it to connect, then it resends and, after 8 failures in a row, may
# delete the subscription (shopify.dev, "HTTPS webhook delivery"); Square and GitHub 10 s (Square's "Troubleshoot
# webhooks" resends; GitHub records a failed delivery, resent only by hand). HubSpot's deadline has been quoted as
# 1 s, 2 s (its docs as quoted on community.hubspot.com, 2019) and 5 s: 1.5 s, because its retries may re-batch
# the notifications, and a new batch of ones already delivered is a new event to the claim. Routes of other
# providers wait for the attempt unless they set `answer_within`. (X's 3 s is for its CRC handshake, which the
# sidecar answers itself.)
ANSWER_WITHIN = {
    "slack": 2.5,
    "discord": 2.5,
    "zoom": 2.5,
    "pagerduty": 4.5,
    "shopify": 4.0,
    "square": 9.0,
    "github": 9.0,
    "hubspot": 1.5,
}

# A store write that settles an attempt (its delivered mark, its dead letter) and fails is tried again while the
# attempt's lease lasts, less this margin (past it, another replica may take the event). Left to the lease, the event
# was attempted again: a rejected one sent again and, when accepted that time, both delivered and dead-lettered (a
# dead letter whose write timed out in a store stall lands all the same); a delivered one delivered twice.
SETTLE_MARGIN = 2.0

# How long an event whose forward was not sent (no connection slot in time: http1.PoolTimeout) waits before it is
# tried again: the slots it waited for free up as the receiver answers.
NOT_SENT_WAIT = 1.0

# An event of a route this process does not know, which no reload of this process removed, may belong to a route a
# newer config added on another replica or worker (a rolling update of k8s/base rolls every config edit): it is put
# back for UNKNOWN_ROUTE_WAIT instead of being dead-lettered, until it is UNKNOWN_ROUTE_GRACE old.
UNKNOWN_ROUTE_WAIT = 30.0
CIRCUIT_WAIT = 0.5  # an event put back for an open circuit is taken again no sooner than this (worker too)
UNKNOWN_ROUTE_GRACE_MS = 15 * 60 * 1000
# unknown-route put-backs and lapsed leases are logged once, then with a count at most this often
REPORT_EVERY_S = 60.0


def _age_left(route: RouteConfig, since_ms: int, now_ms: int) -> float:
    """Seconds until an event counted from `since_ms` is older than its route's `retry.max_age` (<= 0: it is).
    Its last attempt is made then: a backoff reaching past it is cut short to it, rather than the event being
    dead-lettered `expired` at once, before it was that old (with `max_delay: 6h`, up to 6 h early)."""
    return route.retry.max_age - (now_ms - since_ms) / 1000


@dataclass(frozen=True, slots=True)
class Disposition:
    kind: Literal["delivered", "queued", "dead"]
    outcome: Outcome
    next_attempt_ms: int | None = None
    dead_letter_id: str | None = None


class Dispatcher:
    def __init__(self, config: Config, store: RedisStore, forwarder: Forwarder, telemetry: Telemetry) -> None:
        self.table = RouteTable.build(config)  # swapped whole by a reload
        self.tel = telemetry
        self.store = store
        self.forwarder = forwarder
        b = config.upstream.breaker
        self.breakers = Breakers(b.threshold, b.cooldown, b.max_cooldown)
        # routes a reload of this process removed (their events are dead-lettered as `route_removed` at once)
        self.removed_routes: set[str] = set()
        self._unknown = Tally(REPORT_EVERY_S)
        self._lapsed = Tally(REPORT_EVERY_S)

    def swap(self, table: RouteTable) -> None:
        """A reload's new route table; remembers which routes it removed."""
        old, new = set(self.table.by_name), set(table.by_name)
        self.removed_routes = (self.removed_routes | (old - new)) - new
        self.table = table

    def lease_ms(self, route: RouteConfig) -> int:
        """How long an in-flight attempt holds its event before another replica may take it.

        Longer than the forward can take (up to the forwarder's timeout waiting for a connection slot, then as much
        for the exchange; the forwarder's timeout, which a reload does not change: a reload that
        lowered `upstream.timeout` must not shorten leases under forwards still bound by the old one), so a live
        attempt is never doubled; short enough that an event held by a killed process comes back soon.
        """
        lease = route.retry.lease or (2 * self.forwarder.timeout + 20.0)  # a slot's wait, then the exchange
        return int(lease * 1000)

    def answer_within(self, route: RouteConfig) -> float | None:
        """How long a provider's request may wait for the first attempt; None: as long as the attempt takes
        (the forwarder's timeout at most: `upstream.timeout` as the process started). The route's `answer_within`, else its provider's known deadline less a
        margin: a provider that gives up first counts a failure and sends again, whatever we did with it."""
        within = route.answer_within if route.answer_within is not None else ANSWER_WITHIN.get(route.provider)
        return within if within is not None and within < self.forwarder.timeout else None

    @property
    def config(self) -> Config:
        return self.table.config

    def route_names(self) -> list[str]:
        """The routes configured now (a reload swaps the table; the config the process started with is older)."""
        return [r.name for r in self.config.routes]

    def route(self, name: str) -> RouteConfig | None:
        route = self.table.by_name.get(name)
        return route.cfg if route is not None else None

    async def attempt(
        self,
        rec: EventRecord,
        attempt: int,
        history: list[dict[str, Any]] | None = None,
        parent: AnySpan | None = None,
        lease_end_ms: int | None = None,
        burial: Burial | None = None,
        grant: Grant | None = None,
    ) -> Disposition:
        """Forward `rec` once and settle the result. `parent` is the inbound span (attempt 1 in the ingress);
        the worker's attempts have none: they start a trace linked to the one the event arrived with.
        `lease_end_ms` (store clock): when this attempt's hold on the event ends; attempt 1's is the claim's.
        `burial`: the event's burial was begun (its dead letter perhaps written) and cut short: it is finished,
        and nothing is sent (sent again, the event could be delivered while its dead letter stays listed).
        `grant`: what the caller's `Breaker.allow()` answered, given back when nothing is sent after all."""
        if burial is not None:
            outcome = Outcome("permanent", burial.entry.status, burial.entry.error, 0.0)
            return await self._bury(
                rec,
                attempt,
                outcome,
                history or [],
                burial.reason,
                lease_end_ms,
                burial.entry,
                burial.dead_ms,
            )
        table = self.table
        found = table.by_name.get(rec.route)
        if found is None:
            age_ms = self.store.clock.now_ms() - rec.first_seen_ms
            if rec.route not in self.removed_routes and age_ms < UNKNOWN_ROUTE_GRACE_MS:
                # Not removed here: likely a route a newer config on another replica added (a rollout).
                # jittered, so the replicas that know the route get their turn at it
                due_ms = await self.defer(rec, attempt, UNKNOWN_ROUTE_WAIT * random.uniform(0.2, 1.0))
                self._unknown.say(
                    log,
                    logging.WARNING,
                    "%d event(s) of routes this process does not know put back for the replicas that know them "
                    "(dead-lettered as route_removed once %d min old), e.g. route=%s event_id=%s",
                    UNKNOWN_ROUTE_GRACE_MS // 60000,
                    rec.route,
                    rec.event_id,
                )
                return Disposition(
                    "queued", Outcome("retryable", None, "route_unknown", 0.0), next_attempt_ms=due_ms
                )
            # The route was removed from config while the event waited: keep it visible for operators.
            outcome = Outcome("permanent", None, "route_removed", 0.0)
            return await self._bury(rec, attempt, outcome, history or [], "route_removed", lease_end_ms)
        route = found.cfg
        if lease_end_ms is None:  # not given: the claim's lease, from the event's first sight
            lease_end_ms = rec.first_seen_ms + self.lease_ms(route)
        if attempt > route.retry.max_attempts:
            # Its attempts are spent: the last was cut short (a crash, a shutdown past its grace) or settled without
            # its store write landing (its dead letter written, the event not marked dead). Not sent again: buried.
            # Nothing is forwarded: a half-open breaker's probe slot that the caller took for it is given back
            # (kept, the breaker would let no forward through again in this process).
            Breaker.release(grant)
            outcome = Outcome("permanent", None, "attempts_spent", 0.0)
            return await self._bury(rec, attempt, outcome, history or [], "exhausted", lease_end_ms)
        if lease_end_ms <= self.store.clock.now_ms():
            # The hold this attempt was given ran out before it began (the store call that claimed or took the
            # event was that slow: redis-py trying an unreachable node again). Another worker may be taking the
            # event right now: not sent from here (no store write either, which could undo that worker's take). It
            # is due again already; the attempt number the take counted is spent.
            Breaker.release(grant)  # not sent: a probe slot taken for it is given back
            self._lapsed.say(
                log,
                logging.WARNING,
                "%d attempt(s) not sent: their lease ran out before they began (a slow store), e.g. route=%s "
                "event_id=%s; attempted again from the schedule",
                rec.route,
                rec.event_id,
            )
            return Disposition(
                "queued", Outcome("retryable", None, "lease_lapsed", 0.0), next_attempt_ms=lease_end_ms
            )
        breaker = self.breaker(route)
        if grant is not None and grant.breaker is not breaker:
            # a reload moved the route to another receiver after the caller's allow(): the old receiver's probe
            # slot is given back (it is not tried, so it learns nothing; kept, no forward would reach it again from
            # this process), and the new receiver's breaker is asked (sent past it, a forward could go out beside
            # its probe, or to a receiver whose circuit is open)
            grant.release()
            grant = breaker.allow()
            if grant is None:
                due_ms = await self.defer(rec, attempt, max(breaker.retry_at(), CIRCUIT_WAIT))
                return Disposition(
                    "queued", Outcome("retryable", None, "circuit_open", 0.0), next_attempt_ms=due_ms
                )
        url = target_url(table.config, route, rec.path_qs)
        span = self.tel.start_forward(rec.route, rec.event_id, attempt, parent, rec.traceparent)
        outcome = await self.forwarder.send(
            url,
            rec.method,
            upstream_headers(rec, attempt, self.tel.traceparent(span), found.upstream_key),
            rec.body,
            found.policy,
        )
        self.tel.end(span, outcome.error, outcome.status)
        if outcome.error == POOL_TIMEOUT:
            # This process's connection slots were all busy and nothing was sent: no failure of the receiver's (its
            # breaker is not told; a probe slot is given back) and no attempt of the event's, which goes back with
            # its attempt number returned, due again in a moment (defer.lua).
            Breaker.release(grant)
            due_ms = await self.defer(rec, attempt, NOT_SENT_WAIT)
            return Disposition("queued", outcome, next_attempt_ms=due_ms)
        labels = self.tel.count_forward(rec.route, outcome.kind, outcome.duration)
        breaker.record(outcome.kind != "retryable", grant)
        disposition = await self.settle(
            route,
            rec,
            attempt,
            outcome,
            history or [],
            lease_end_ms,
            background=parent is not None,
        )
        if disposition.kind == "delivered":
            self.tel.delivery_lag.record(max(0, self.store.clock.now_ms() - rec.first_seen_ms) / 1000, labels)
        if parent is None and log.isEnabledFor(logging.INFO):
            log.info(
                "attempt",
                extra={
                    "route": rec.route,
                    "event_id": rec.event_id,
                    "outcome": disposition.kind,
                    "status": outcome.status,
                    "attempt": attempt,
                    "duration_ms": round(outcome.duration * 1000, 3),
                    "trace_id": self.tel.trace_id(span),
                    "error": outcome.error,
                    **({"detail": outcome.detail} if outcome.detail else {}),
                },
            )
        return disposition

    def breaker(self, route: RouteConfig) -> Breaker:
        """The breaker of the route's receiver: one per origin, which only the configured URL chooses (a request's
        path and query never change it, see `target_url`), so no target URL is built to find it."""
        return self.breakers.for_url(route.upstream or self.config.upstream.url)

    async def put_back(
        self,
        route: RouteConfig,
        rec: EventRecord,
        attempt: int,
        history: list[dict[str, Any]],
        wait: float,
        lease_end_ms: int,
    ) -> bool:
        """Give a taken event back for `wait` seconds without attempting it (its upstream's circuit is open; at most
        until it reaches its `retry.max_age`), or, once it is past it, dead-letter it (`expired`) as a failed
        attempt would be: without this an event waited for its turn at a probe for as long as the circuit stayed
        open, however old it got. True if it was dead-lettered.

        A run that has made no attempt yet (attempt 1) counts its age from when the run began: a replay's own time,
        not the event's first sight. Counted from first sight, a replay of events older than `max_age` while the
        breaker was half-open buried again, at once and unsent, every one the probe did not take (the runbook
        promises each one attempt per replay)."""
        since_ms = max(rec.first_seen_ms, rec.run) if attempt <= 1 else rec.first_seen_ms
        left = _age_left(route, since_ms, self.store.clock.now_ms())
        if left <= 0:
            outcome = Outcome("retryable", None, "circuit_open", 0.0)
            await self._bury(rec, attempt, outcome, history, "expired", lease_end_ms)
            return True
        await self.defer(rec, attempt, min(wait, left))
        return False

    async def defer(self, rec: EventRecord, attempt: int, wait: float) -> int:
        """Put a taken event back without attempting it (its upstream's circuit is open, or no connection came in
        time); return when it is due again."""
        # rounded up: a put-back until an event's max_age must find it past it, not a millisecond short of it
        due_ms = self.store.clock.now_ms() + math.ceil(wait * 1000)
        await self.store.defer(rec.route, rec.dedupe_id, attempt, due_ms, rec.fence)
        return due_ms

    async def settle(
        self,
        route: RouteConfig,
        rec: EventRecord,
        attempt: int,
        outcome: Outcome,
        history: list[dict[str, Any]],
        lease_end_ms: int,
        background: bool = False,
    ) -> Disposition:
        now_ms = self.store.clock.now_ms()  # the schedule's clock: the store's (see store/clock.py)
        entry = AttemptRecord(now_ms, attempt, outcome.status, outcome.error, outcome.duration * 1000)
        if outcome.kind == "delivered":
            if background:
                # The provider's answer need not wait for this round trip: see store/marks.py. Attempt 1's lease
                # is the claim's, from the event's first sight (`Ingress` claims with now = first_seen_ms).
                self.store.marks.add(rec, entry, lease_end_ms)
            else:
                try:
                    await self._landing(
                        lambda: self.store.ack(rec.route, rec.dedupe_id, entry, now_ms),
                        f"marking {rec.route}/{rec.event_id} delivered",
                        lease_end_ms,
                    )
                except StoreError as exc:
                    # The event stays in flight under its lease: this process's retry worker, taking it again,
                    # writes the mark kept here instead of sending it; another process re-delivers it.
                    self.store.marks.keep((rec.route, rec.dedupe_id, entry), now_ms, run_of(rec))
                    log.warning("could not mark %s/%s delivered: %s", rec.route, rec.event_id, exc)
            return Disposition("delivered", outcome)
        if outcome.kind == "permanent":
            return await self._bury(
                rec, attempt, outcome, history, "rejected", lease_end_ms, entry, background=background
            )
        retry = route.retry
        if attempt >= retry.max_attempts:
            return await self._bury(
                rec, attempt, outcome, history, "exhausted", lease_end_ms, entry, background=background
            )
        asked = parse_retry_after(outcome.retry_after, time.time())  # an HTTP date: wall clock
        wait = next_delay(
            attempt,
            asked,
            base=retry.base_delay,
            multiplier=retry.multiplier,
            max_delay=retry.max_delay,
            jitter=retry.jitter,
        )
        left = _age_left(route, rec.first_seen_ms, now_ms)
        # the backoff is cut short at max_age, the receiver's Retry-After is not (contract: honour it): a receiver
        # that wants no request before the event is max_age old gets none, the event is dead-lettered now
        if left <= 0 or (asked is not None and min(asked, retry.max_delay) > left):
            return await self._bury(
                rec, attempt, outcome, history, "expired", lease_end_ms, entry, background=background
            )
        due_ms = now_ms + math.ceil(min(wait, left) * 1000)
        await self.store.retry(rec.route, rec.dedupe_id, attempt, due_ms, entry, rec.fence)
        return Disposition("queued", outcome, next_attempt_ms=due_ms)

    async def _landing(
        self,
        write: Callable[[], Awaitable[T]],
        what: str,
        lease_end_ms: int | None,
        background: bool = False,
        on_landed: Callable[[T], None] | None = None,
    ) -> T:
        """`write`, tried again after a store failure while the lease lasts (see SETTLE_MARGIN); raises the first
        failure when it never lands. With `background` (attempt 1, whose provider is waiting), the tries go on
        off the request's path, and the failure is raised at once: the provider is told the event is queued.
        `on_landed` gets what the write answered whenever it lands, on the path or off it (what it did is said
        either way: a dead letter's evictions)."""
        try:
            result = await write()
        except StoreError as exc:
            left = (lease_end_ms - self.store.clock.now_ms()) / 1000 - SETTLE_MARGIN if lease_end_ms else 0.0
            if left <= 0:
                raise
            log.warning("%s failed (trying again while the lease lasts): %s", what, exc)
            deadline = time.monotonic() + left
            landed: list[T] = []

            async def once() -> None:
                landed.append(await write())

            async def again() -> bool:
                if await self.store.again_until(once, deadline):
                    log.info("%s landed after the store failure", what)
                    if on_landed is not None:
                        on_landed(landed[0])
                    return True
                log.warning("gave up %s before its lease ran out: the event is attempted again then", what)
                return False

            if background:
                self.store.in_background(again())
                raise
            if await again():
                return landed[0]
            raise
        if on_landed is not None:
            on_landed(result)
        return result

    async def _bury(
        self,
        rec: EventRecord,
        attempt: int,
        outcome: Outcome,
        history: list[dict[str, Any]],
        reason: str,
        lease_end_ms: int | None,
        entry: AttemptRecord | None = None,
        dead_ms: int | None = None,
        background: bool = False,
    ) -> Disposition:
        # `dead_ms`: a burial cut short, finished here, is the same burial (the version its dead letter was written
        # as, if it was: dlq_add.lua then writes nothing again)
        now_ms = self.store.clock.now_ms() if dead_ms is None else dead_ms
        entry = entry or AttemptRecord(
            now_ms, attempt, outcome.status, outcome.error, outcome.duration * 1000
        )
        said = [f"status {outcome.status}"] if outcome.status is not None else []
        if outcome.error is not None:
            said.append(f"error {outcome.error}")

        def report(written: tuple[str, list[Any]]) -> None:
            log.warning(
                "dead-lettered %s/%s after %d attempt(s): %s (%s)",
                rec.route,
                rec.event_id,
                entry.attempt,
                reason,
                ", ".join(said) or "no answer",
            )
            for ev in written[1]:
                log.error("dead-letter cap evicted %s/%s (item %s)", ev.route, ev.event_id, ev.id)
                self.tel.dlq_evicted[ev.route] += 1

        written = await self._landing(
            lambda: self.store.bury(rec, attempt, entry, history, now_ms, reason),  # both steps idempotent
            f"dead-lettering {rec.route}/{rec.event_id}",
            lease_end_ms,
            background,
            on_landed=report,
        )
        return Disposition("dead", outcome, dead_letter_id=written[0])
