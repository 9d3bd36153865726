"""The embedded Valkey: its AOF rewrite child yields the CPU to the server that answers the sidecar, and a server
that dies is started again with its data."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import redis

from sidecar.store.embedded import CHILD_NICE, EmbeddedValkey

needs_children_file = pytest.mark.skipif(
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


@needs_children_file
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


def _wait_restarted(store: EmbeddedValkey, restarts: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while store.restarts < restarts:
        assert time.monotonic() < deadline, f"the store was not started again within {timeout} s"
        time.sleep(0.02)


def test_a_store_that_dies_is_started_again_on_its_port_with_its_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    url = store.start()
    first = store.pid
    try:
        with redis.Redis.from_url(url) as client:
            client.set("accepted", "before the kill")
        assert first is not None
        with caplog.at_level("WARNING", logger="sidecar.store"):
            os.kill(first, signal.SIGKILL)
            _wait_restarted(store, 1)
        assert store.url == url and store.pid not in (None, first)
        with redis.Redis.from_url(url) as client:  # replayed from its append-only file
            assert client.get("accepted") == b"before the kill"
        messages = [r.getMessage() for r in caplog.records]
        assert any("embedded valkey exited (killed by SIGKILL)" in m for m in messages), messages
        assert any("embedded valkey is back at" in m for m in messages), messages
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # reaped, not left a zombie
        second = store.pid
    finally:
        store.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(second or 0, 0)  # stop() stops the server that was started again


def test_a_restart_that_fails_is_tried_again_until_the_store_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The append-only manifest is unreadable when the server dies (Valkey reads it only at startup): the first
    restarts fail and are tried again, backing off; once it is readable again, the store comes back whole."""
    store = EmbeddedValkey(tmp_path / "valkey")
    url = store.start()
    try:
        with redis.Redis.from_url(url) as client:
            client.set("accepted", "yes")
        (manifest,) = (tmp_path / "valkey").rglob("*.manifest")
        good = manifest.read_bytes()
        manifest.write_bytes(b"not a manifest\n")
        with caplog.at_level("WARNING", logger="sidecar.store"):
            os.kill(store.pid or 0, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while not any("did not start again" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no failed restart was logged within 20 s"
                time.sleep(0.02)
            assert store.restarts == 0
            manifest.write_bytes(good)
            _wait_restarted(store, 1)
        with redis.Redis.from_url(url) as client:
            assert client.get("accepted") == b"yes"
    finally:
        store.stop()


def test_stop_during_failing_restarts_returns(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    (manifest,) = (tmp_path / "valkey").rglob("*.manifest")
    manifest.write_bytes(b"not a manifest\n")
    os.kill(store.pid or 0, signal.SIGKILL)
    time.sleep(0.5)  # a few failed restarts
    started = time.monotonic()
    store.stop()
    assert time.monotonic() - started < 15
    assert store.restarts == 0 and store._watcher is None


def test_a_store_that_keeps_dying_young_is_restarted_after_a_growing_backoff(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    try:
        for restarts, backoff in ((1, 0.1), (2, 0.2), (3, 0.4)):  # each dies within STABLE_AFTER of its start
            os.kill(store.pid or 0, signal.SIGKILL)
            _wait_restarted(store, restarts)
            assert store._backoff == pytest.approx(backoff)
    finally:
        store.stop()
