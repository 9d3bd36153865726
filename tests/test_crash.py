"""Crash safety with real processes: `sidecar run` SIGKILLed between the claim and the upstream's answer."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest
import redis

from sidecar.keys import KeySpace
from sidecar.store.records import parse_meta
from tests.conftest import Upstream
from tests.procs import SidecarProcess, start_sidecar

SECRET = "whsec_crash_test"
KEYS = KeySpace("sidecar", 4)


def signed(body: bytes) -> dict[str, str]:
    t = int(time.time())
    sig = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


@pytest.mark.slow
async def test_crash_sigkill_mid_forward_leaves_event_stored_and_scheduled_then_delivered(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[SidecarProcess]
) -> None:
    hang = asyncio.Event()

    async def hold(_: object) -> None:
        await hang.wait()  # the upstream never answers the first attempt

    upstream.behaviour = hold
    cfg = tmp_path / "sidecar.yaml"
    first, port = start_sidecar(cfg, processes, redis_url=redis_url, upstream_url=upstream.url, secret=SECRET)

    body = json.dumps({"id": "evt_crash", "type": "invoice.paid"}).encode()
    async with aiohttp.ClientSession() as client:
        send = asyncio.create_task(
            client.post(f"http://127.0.0.1:{port}/webhooks/stripe", data=body, headers=signed(body))
        )
        await asyncio.wait_for(upstream.arrived.wait(), timeout=10)  # claimed, forward in flight
        first.kill()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(send, timeout=10)

    shard = KEYS.shard_of("stripe", "evt_crash")
    stored = rdb.hgetall(KEYS.event(shard, "stripe:evt_crash"))
    assert stored[b"body"] == body
    assert stored[b"st"] == b"f"  # in flight under a lease
    lease_deadline = rdb.zscore(KEYS.schedule(shard), "stripe:evt_crash")
    assert lease_deadline is not None and lease_deadline > stored_first(stored)
    meta = parse_meta(stored[b"meta"])
    assert meta["m"] == "POST" and meta["p"] == "/webhooks/stripe"

    # A new process (a restart, or any replica) delivers it once the lease runs out.
    upstream.behaviour = None
    hang.set()
    second = SidecarProcess(cfg)
    processes.append(second)
    second.start(port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(upstream.received) < 2:
        await asyncio.sleep(0.1)
    assert upstream.ids() == ["evt_crash", "evt_crash"]
    assert upstream.received[1].headers["x-sidecar-attempt"] == "2"
    assert upstream.received[1].body == body
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and rdb.hget(KEYS.event(shard, "stripe:evt_crash"), "st") != b"d":
        await asyncio.sleep(0.05)
    assert rdb.hget(KEYS.event(shard, "stripe:evt_crash"), "st") == b"d"


def stored_first(stored: dict[bytes, bytes]) -> int:
    return int(stored[b"first"])


@pytest.mark.slow
async def test_crash_sigterm_lets_in_flight_forward_finish(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[SidecarProcess]
) -> None:
    # the forward is in flight when SIGTERM arrives, and ends within shutdown_grace (1 s)
    upstream.delay = 0.5
    proc, port = start_sidecar(
        tmp_path / "sidecar.yaml", processes, redis_url=redis_url, upstream_url=upstream.url, secret=SECRET
    )
    body = json.dumps({"id": "evt_term", "type": "invoice.paid"}).encode()
    async with aiohttp.ClientSession() as client:
        send = asyncio.create_task(
            client.post(f"http://127.0.0.1:{port}/webhooks/stripe", data=body, headers=signed(body))
        )
        await asyncio.wait_for(upstream.arrived.wait(), timeout=10)
        assert proc.proc is not None
        proc.proc.terminate()  # SIGTERM mid-forward
        resp = await asyncio.wait_for(send, timeout=10)
        assert resp.status == 200  # the provider got the upstream's answer, not a dropped connection
        assert await resp.json() == {"ok": True}
    assert proc.proc.wait(timeout=10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # no longer accepting
    shard = KEYS.shard_of("stripe", "evt_term")
    assert rdb.hget(KEYS.event(shard, "stripe:evt_term"), "st") == b"d"
