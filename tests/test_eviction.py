"""A store that loses keys under the sidecar (a maxmemory-policy that evicts, or a key deleted by hand), and a full
store's lookup index: what the audit "memory" found. Eviction of a key is a DEL of that key."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis

from sidecar.keys import KeySpace
from sidecar.store import RedisStore
from sidecar.store.dead_letters import DeadLetters
from tests import test_store
from tests.test_store import KEYS, digest_record, entry, record
from tests.test_store_full import fill, small  # noqa: F401  (fixture)

store = test_store.store  # the same store fixture (a fixture)


async def test_a_scheduled_event_whose_hash_is_gone_is_dropped_and_said(
    store: RedisStore, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """take.lua dropped such a schedule entry silently: 305 events answered 202 lost under allkeys-lfu in the audit,
    with nothing in the log."""
    now = int(time.time() * 1000)
    rec = record("evt_evicted")
    assert (await store.claim(rec, now, 1_000)).claimed
    ev, sched, _, member = store.keys.locate("stripe", "evt_evicted")
    rdb.delete(ev)  # what eviction does
    shard = store.keys.shard_of("stripe", "evt_evicted")
    with caplog.at_level(logging.ERROR, logger="sidecar.store"):
        assert await store.take(shard, member, now + 2_000, 30_000) is None
    assert rdb.zscore(sched, member) is None
    # and no longer counted as pending (it fed /admin/stats, the pending gauge and the backlog alert for good)
    assert rdb.hget(store.keys.stats(shard), "stripe:pending") == b"0"
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(said) == 1 and "gone from the store" in said[0] and member in said[0], said


async def test_a_vanished_event_whose_counters_were_evicted_too_does_not_count_pending_below_zero(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """An evicting policy may take the shard's stats hash as well as the event: dropping the stale entry then
    counts nothing down (take.lua), rather than leave /admin/stats and the pending gauge at -1 for good."""
    now = int(time.time() * 1000)
    assert (await store.claim(record("evt_both"), now, 1_000)).claimed
    ev, _, stats, member = store.keys.locate("stripe", "evt_both")
    rdb.delete(ev, stats)  # both evicted
    shard = store.keys.shard_of("stripe", "evt_both")
    assert await store.take(shard, member, now + 2_000, 30_000) is None
    assert rdb.hget(stats, "stripe:pending") is None
    assert (await store.route_stats()).get("stripe", {}).get("pending", 0) == 0


async def test_a_dead_letter_whose_body_is_gone_is_not_replayed_empty(
    store: RedisStore, rdb: redis.Redis
) -> None:
    """Replayed, it was delivered with an empty body in place of its own and its dead letter removed."""
    now = int(time.time() * 1000)
    rec = record("evt_dead", body=b'{"id":"evt_dead","big":"payload"}')
    assert (await store.claim(rec, now, 1_000)).claimed
    item_id, _ = await store.bury(rec, 1, entry(1, 400), [], now, "rejected")
    rdb.delete(store.keys.dlq_body())  # evicted
    dl = DeadLetters(store)
    [item] = await dl.get_many([item_id])
    assert item.body is None
    assert await dl.bodies_missing([item_id, "0" * 24]) == [item_id]  # what a dry run leaves out
    from sidecar.admin import render_full
    from sidecar.admin_client import format_item

    shown = format_item(render_full(item))
    assert "body: (gone from the store: evicted; only the metadata and history are left)" in shown
    assert await dl.replay(item, now + 1, "test", "owner") == "body_missing"
    assert rdb.zscore(store.keys.dlq_items(), item_id) is not None  # kept
    assert (
        rdb.hget(store.keys.event(store.keys.shard_of("stripe", "evt_dead"), "stripe:evt_dead"), "st") == b"x"
    )


async def test_the_lookup_alias_of_an_accepted_claim_is_written_on_a_full_store(small) -> None:  # noqa: F811
    """A plain SET was refused at maxmemory: given up after a minute, every lookup and forget by the provider's id
    answered 404 "never seen" for an event the store held."""
    store = RedisStore.connect(
        small.connection_url, KeySpace("sidecar", 4), dedupe_ttl=3600, dlq_max_length=10
    )
    r = redis.Redis(port=small.port)
    try:
        await store.preload()
        fill(r)
        rec = digest_record("sha256:abc", "delivery-1", first_seen_ms=int(time.time() * 1000))
        store._index_alias(rec)
        await store.close()  # waits for the background write
        assert r.get(store.keys.alias("github", "delivery-1")) == b"sha256:abc"
    finally:
        r.config_set("maxmemory", 0)
        r.close()
        await store.close()


async def test_dlq_lengths_and_oldest_in_one_round_trip_each(store: RedisStore) -> None:
    now = int(time.time() * 1000)
    for i, route in enumerate(("a", "b", "b")):
        rec = record(f"evt_{i}", route=route)
        assert (await store.claim(rec, now, 1_000)).claimed
        await store.bury(rec, 1, entry(1, 400), [], now + i, "rejected")
    assert await store.dlq_lengths(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 0}
    assert await store.dlq_oldest_many(["a", "b"]) == {"a": float(now), "b": float(now + 1)}
    assert await store.dlq_lengths([]) == {}


async def test_a_policy_set_at_runtime_and_the_keys_it_evicts_are_said(
    own_valkey: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The evicting policy was checked only at start: set afterwards (CONFIG SET), nothing was ever said, and the
    keys it evicted (350 of 400 events answered 202, in the audit) were lost without a line. The process that warns
    at start looks again every SETTINGS_EVERY_S: a new warning once, and an error with the count of keys evicted."""
    from sidecar.app import SettingsWatch

    store = RedisStore.connect(own_valkey.connection_url, KEYS, dedupe_ttl=3600, dlq_max_length=3)
    r = redis.Redis(port=own_valkey.port)
    watch = SettingsWatch(store)
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.store"):
            await watch.check()
            assert not [m for m in caplog.messages if "maxmemory-policy" in m or "evicted" in m]
            await watch.check()  # not due yet: asks nothing
            r.config_set("maxmemory-policy", "allkeys-random")
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 2_000_000)
            for i in range(400):  # 4 MB into a 2 MB budget
                r.set(f"filler:{i}", b"x" * 10_000)
            assert int(r.info("stats")["evicted_keys"]) > 0
            watch.next_at = 0.0  # as SETTINGS_EVERY_S later
            await watch.check()
            watch.next_at = 0.0
            await watch.check()  # the same warning is not said again; no new evictions, no new error
        policy = [m for m in caplog.messages if "maxmemory-policy is allkeys-random" in m]
        evicted = [m for m in caplog.messages if m.startswith("the store evicted ")]
        assert len(policy) == 1 and len(evicted) == 1, caplog.messages
        assert "may be gone" in evicted[0]
    finally:
        r.config_set("maxmemory", 0)
        r.close()
        await store.close()


async def test_evictions_after_the_stores_counter_restarted_are_said(
    own_valkey: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A review: only an increase of INFO's evicted_keys was said, and the count restarts from 0 with the store (a
    restart, a failover to a replica, CONFIG RESETSTAT): what it evicted after that was said nowhere."""
    from sidecar.app import SettingsWatch

    store = RedisStore.connect(own_valkey.connection_url, KEYS, dedupe_ttl=3600, dlq_max_length=3)
    r = redis.Redis(port=own_valkey.port)
    watch = SettingsWatch(store)

    def evict(tag: str, n: int) -> None:
        r.config_set("maxmemory-policy", "allkeys-random")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 1_000_000)
        for i in range(n):
            r.set(f"filler:{tag}:{i}", b"x" * 10_000)
        r.config_set("maxmemory", 0)

    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.store"):
            await watch.check()
            evict("a", 400)
            watch.next_at = 0.0
            await watch.check()
            r.config_resetstat()
            r.flushall()
            evict("b", 200)
            assert 0 < int(r.info("stats")["evicted_keys"]) < watch.evicted  # type: ignore[operator]
            watch.next_at = 0.0
            await watch.check()
        said = [m for m in caplog.messages if m.startswith("the store evicted ")]
        assert len(said) == 2, said
    finally:
        r.config_set("maxmemory", 0)
        r.close()
        await store.close()
