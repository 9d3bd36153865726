"""The dlq.max_length cap while a drain holds the oldest dead letters: a new dead letter must not re-walk every held
item (dlq_add.lua is one script: the whole store waits for it). A held drain of a full DLQ (default hold 10 minutes)
made every dead-lettering walk all the held items: at the default cap of 10,000, 5-9 ms of Valkey per dead letter,
dead-lettering 825 -> 222/s and another route's p99 22 -> 116 ms in an external scale audit."""

from __future__ import annotations

import json
import time

import redis

from sidecar.keys import KeySpace
from sidecar.store import AttemptRecord, EventRecord, RedisStore
from sidecar.store.dead_letters import DeadLetters

KEYS = KeySpace("sidecar", 4)
CAP = 200


def _record(event_id: str) -> EventRecord:
    body = json.dumps({"id": event_id}, separators=(",", ":")).encode()
    return EventRecord(
        route="stripe",
        event_id=event_id,
        dedupe_id=event_id,
        method="POST",
        path_qs="/webhooks/stripe",
        headers=[("content-type", "application/json")],
        body=body,
        first_seen_ms=int(time.time() * 1000),
    )


def _hget_calls(rdb: redis.Redis) -> int:
    return int(rdb.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))


async def _bury(store: RedisStore, event_id: str, now: int) -> list[str]:
    rec = _record(event_id)
    await store.claim(rec, now, 30_000)
    entry = AttemptRecord(now, 1, 400, None, 1.0)
    return [e.id for e in (await store.bury(rec, 1, entry, [], now, "rejected"))[1]]


async def test_dead_letters_past_a_held_full_dlq_do_not_rewalk_the_held_items(
    redis_url: str, rdb: redis.Redis
) -> None:
    store = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=CAP)
    try:
        now = int(time.time() * 1000)
        for i in range(CAP):
            await _bury(store, f"old_{i}", now + i)
        dl = DeadLetters(store)
        held = await dl.get_many(await dl.ids())
        assert len(held) == CAP
        for item in held:  # a held drain has streamed the whole (full) DLQ and not removed anything yet
            assert await dl.take(item, "a-drain", 600_000) == "taken"
        before = _hget_calls(rdb)
        evicted: list[str] = []
        adds = 2 * CAP
        for i in range(adds):
            evicted += await _bury(store, f"new_{i}", now + CAP + i)
        hgets = _hget_calls(rdb) - before
        # what the cap does is unchanged: nothing held is evicted, the DLQ is over the cap by what is held, and the
        # oldest items not held go first
        assert rdb.zcard(KEYS.dlq_items()) == 2 * CAP
        assert len(evicted) == adds - CAP
        left = await dl.get_many(await dl.ids())
        assert {i.id for i in held} <= {i.id for i in left}
        assert sorted(i.event_id for i in left if i.event_id.startswith("new_")) == sorted(
            f"new_{i}" for i in range(adds - CAP, adds)
        )
        # ... at a bounded cost per dead letter, not one walk of every held item (200 here: 40,000+ HGETs)
        assert hgets < 10 * adds, f"{hgets} HGETs for {adds} dead letters past {CAP} held items"
        # an item given back is the oldest not held: the next dead letter evicts it first (and, the cap's worth of
        # items not held being one more now, the oldest new one too)
        assert await dl.take(held[5], "a-drain", 0) == "taken"
        assert (await _bury(store, "after_give_back", now + 3 * CAP))[0] == held[5].id
        # a hold its owner shortens (and that then ends) is not a hold: its item is evicted next
        assert await dl.take(held[7], "a-drain", 1) == "taken"
        time.sleep(0.01)
        assert (await _bury(store, "after_lease_end", now + 3 * CAP + 1))[0] == held[7].id
    finally:
        await store.close()


async def test_a_hold_that_ends_by_itself_in_the_held_head_is_evicted_again(
    redis_url: str, rdb: redis.Redis
) -> None:
    """The remembered held head stands only until the first of its holds ends: that item is evicted then."""
    store = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=3)
    try:
        now = int(time.time() * 1000)
        for i in range(3):
            await _bury(store, f"h_{i}", now + i)
        dl = DeadLetters(store)
        first, middle, last = await dl.get_many(await dl.ids())
        assert await dl.take(first, "a-drain", 600_000) == "taken"
        assert await dl.take(middle, "a-drain", 300) == "taken"  # ends by itself in 0.3 s
        assert await dl.take(last, "a-drain", 600_000) == "taken"
        assert await _bury(store, "n_0", now + 10) == []  # over the cap by what is held
        assert await _bury(store, "n_1", now + 11) == []
        time.sleep(0.35)
        assert await _bury(store, "n_2", now + 12) == [middle.id]
        assert rdb.zcard(KEYS.dlq_items()) == 5
    finally:
        await store.close()


async def test_an_item_written_inside_the_held_head_ends_it(redis_url: str, rdb: redis.Redis) -> None:
    """A dead letter written before the remembered held head's end (a replica's clock behind, an earlier life
    moved) is not held: it counts toward the cap, and is the oldest item not held when the cap evicts (kept, the
    remembered head counted it as held and skipped it)."""
    store = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=3)
    try:
        now = int(time.time() * 1000)
        for i in (0, 10, 20):
            await _bury(store, f"h_{i}", now + i)
        dl = DeadLetters(store)
        h0, h10, h20 = await dl.get_many(await dl.ids())
        for item in (h0, h10):
            assert await dl.take(item, "a-drain", 600_000) == "taken"
        # held items do not count toward the cap: the third one past it evicts the oldest item not held
        assert await _bury(store, "n_100", now + 100) == []
        assert await _bury(store, "n_110", now + 110) == []
        assert await _bury(store, "n_120", now + 120) == [h20.id]  # the held head remembered: h_0, h_10
        for item in await dl.get_many([i for i in await dl.ids() if i not in (h0.id, h10.id)]):
            assert await dl.remove(item)
        assert await _bury(store, "early", now + 5) == []  # between h_0 and h_10, under the cap
        (early,) = [i for i in await dl.ids() if i not in (h0.id, h10.id)]
        assert await _bury(store, "late_1", now + 200) == []
        assert await _bury(store, "late_2", now + 210) == [early]
        assert rdb.zcard(KEYS.dlq_items()) == 4
    finally:
        await store.close()
