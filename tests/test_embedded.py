"""The embedded Valkey: its AOF rewrite child yields the CPU to the server that answers the sidecar."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import redis

from sidecar.store.embedded import CHILD_NICE, EmbeddedValkey

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="the child watch reads /proc/<pid>/task/<pid>/children (Linux)",
)


def _fill(client: redis.Redis, keys: int, size: int) -> None:
    value = b"x" * size
    for start in range(0, keys, 5_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(keys, start + 5_000)):
            pipe.set(f"k{i}", value)
        pipe.execute()


def test_rewrite_child_runs_at_lowest_priority(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    url = store.start()
    try:
        assert store.pid is not None
        server_nice = os.getpriority(os.PRIO_PROCESS, store.pid)
        client = redis.Redis.from_url(url)
        _fill(client, 150_000, 200)  # ~40 MB: a rewrite that lasts well past the watch interval
        rewrites = client.info("persistence")["aof_rewrites"]
        client.bgrewriteaof()
        child_nice = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if store.demoted and child_nice is None:
                try:
                    child_nice = os.getpriority(os.PRIO_PROCESS, store.demoted[-1])
                except ProcessLookupError:
                    child_nice = -1  # gone before it could be read: the assertion below says so
            info = client.info("persistence")
            if (
                info["aof_rewrites"] > rewrites
                and not info["aof_rewrite_in_progress"]
                and child_nice is not None
            ):
                break
            time.sleep(0.002)
        assert store.demoted, "no rewrite child was seen"
        assert child_nice == CHILD_NICE
        assert client.info("persistence")["aof_last_bgrewrite_status"] == "ok"
        assert (
            os.getpriority(os.PRIO_PROCESS, store.pid) == server_nice
        )  # the server itself keeps its priority
        client.close()
    finally:
        store.stop()


def test_stop_ends_the_child_watch(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    watcher = store._watcher
    try:
        assert watcher is not None and watcher.is_alive()
    finally:
        store.stop()
    assert not watcher.is_alive()
    assert store._watcher is None
