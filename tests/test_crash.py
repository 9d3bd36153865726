"""Crash safety with real processes: `sidecar run` SIGKILLed between the claim and the upstream's answer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from sidecar.keys import KeySpace
from sidecar.store.records import parse_meta
from tests.conftest import Upstream
from tests.procs import SidecarProcess, free_port, silent_server, start_sidecar, wait_until

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


@pytest.mark.slow
async def test_embedded_store_killed_under_a_running_sidecar_comes_back_with_its_events(
    tmp_path: Path, upstream: Upstream, processes: list[SidecarProcess]
) -> None:
    """`redis.url: embedded`, the store SIGKILLed (an OOM kill, say) while `sidecar run` serves: until it is back
    the sidecar answers 503 (never a 2xx, never a 500); then it is started again from its append-only file, so a
    resend of an event accepted before the kill is a duplicate, and new events are delivered."""
    proc, port = start_sidecar(
        tmp_path / "sidecar.yaml",
        processes,
        redis_url="embedded",
        upstream_url=upstream.url,
        secret=SECRET,
        data_dir=tmp_path / "data",
    )
    assert proc.proc is not None
    url = f"http://127.0.0.1:{port}/webhooks/stripe"
    before = json.dumps({"id": "evt_before", "type": "invoice.paid"}).encode()
    during = json.dumps({"id": "evt_during", "type": "invoice.paid"}).encode()
    async with aiohttp.ClientSession() as client:

        async def send(body: bytes) -> tuple[int, dict]:
            async with client.post(url, data=body, headers=signed(body)) as resp:
                return resp.status, await resp.json()

        assert (await send(before))[0] == 200
        deadline = time.monotonic() + 10
        while (await send(before))[1].get("state") != "delivered":  # its batched delivered mark is written
            assert time.monotonic() < deadline, "evt_before was not marked delivered within 10 s"
            await asyncio.sleep(0.05)
        # appendfsync everysec: while a slow fsync runs, the store may hold its writes back for up to 2 s after
        # answering (the documented window; CI once killed it inside it and evt_before came back pending)
        await asyncio.sleep(2.5)
        pid = proc.proc.pid
        (valkey,) = (int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
        os.kill(valkey, signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 30
        while True:
            status, answer = await send(during)
            statuses.append(status)
            if status == 200:
                break
            assert status == 503 and answer["error"] == "store_unavailable", (status, answer)
            assert time.monotonic() < deadline, "the embedded store did not come back within 30 s"
            await asyncio.sleep(0.05)
        status, answer = await send(before)
        assert status == 200 and answer["duplicate"] is True and answer["state"] == "delivered"
    assert sorted(upstream.ids()) == ["evt_before", "evt_during"]
    assert "embedded valkey exited (killed by SIGKILL)" in proc.log()
    # said once its start returns, which can be after the sidecar's clients reconnected
    assert await wait_until(lambda: "embedded valkey is back at" in proc.log(), timeout=10)


@pytest.mark.slow
async def test_crash_sigterm_steps_share_one_shutdown_grace(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[SidecarProcess]
) -> None:
    """Shutdown's steps (the front's drain, the retry worker, first attempts still running after their 202, the
    delivered marks) share one `server.shutdown_grace` from SIGTERM, so the pod's termination grace period has
    to cover it once. Here the upstream never answers: one request is in flight in the front and one attempt runs
    on after its 202, each of which used to get the whole grace in turn (2 s + 2 s)."""
    hang = asyncio.Event()

    async def hold(_: object) -> None:
        await hang.wait()

    upstream.behaviour = hold
    port, grace = free_port(), 2.0
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"""
server: {{listen: "127.0.0.1:{port}", shutdown_grace: {grace}s}}
admin: {{listen: "127.0.0.1:{free_port()}", token: "t"}}
redis: {{url: "{redis_url}", shards: 4}}
upstream: {{url: "{upstream.url}", timeout: 30s}}
retry: {{base_delay: 1s, jitter: 0, lease: 60s}}
routes:
  - {{name: quick, path: /webhooks/quick, provider: stripe, secrets: ["{SECRET}"], answer_within: 100ms}}
  - {{name: stripe, path: /webhooks/stripe, provider: stripe, secrets: ["{SECRET}"]}}
"""
    )
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    assert proc.proc is not None
    late = json.dumps({"id": "evt_late", "type": "invoice.paid"}).encode()
    held = json.dumps({"id": "evt_held", "type": "invoice.paid"}).encode()
    async with aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{port}/webhooks"
        async with client.post(f"{base}/quick", data=late, headers=signed(late)) as resp:
            assert resp.status == 202 and (await resp.json())["in_flight"] is True  # its attempt goes on
        in_front = asyncio.create_task(client.post(f"{base}/stripe", data=held, headers=signed(held)))
        assert await wait_until(lambda: len(upstream.received) == 2, timeout=10)
        started = time.monotonic()
        proc.proc.terminate()
        code = await asyncio.to_thread(proc.proc.wait, 15)
        took = time.monotonic() - started
        with contextlib.suppress(aiohttp.ClientError):
            (await in_front).release()
    hang.set()
    assert code == 0
    assert took < grace + 1.5, f"shutdown took {took:.2f}s with a grace of {grace}s"
    for event in ("quick:evt_late", "stripe:evt_held"):  # both still leased: attempted again after the lease
        route = event.split(":")[0]
        assert rdb.hget(KEYS.event(KEYS.shard_of(route, event.split(":")[1]), event), "st") == b"f"


@pytest.mark.slow
async def test_crash_sigterm_with_a_dead_lettering_the_store_refuses_ends_within_the_grace(
    own_valkey: Any, tmp_path: Path, upstream: Upstream, processes: list[SidecarProcess]
) -> None:
    """The receiver rejects an event (400: dead-lettered at once) and the store refuses writes from then on
    (NOREPLICAS), so the burial goes on in the background, tried again and again. SIGTERM then waited 5 s past
    `server.shutdown_grace` for it (exit after 5.1 s with a 1 s grace); the event stays stored and scheduled for
    the next start, as any unfinished step's does."""
    admin = redis.Redis(port=own_valkey.port)

    def refuse_writes_from_now(_: object) -> web.Response:
        admin.config_set("min-replicas-to-write", 1)
        return web.Response(status=400)

    upstream.behaviour = refuse_writes_from_now
    port, grace = free_port(), 1.0
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"""
server: {{listen: "127.0.0.1:{port}", shutdown_grace: {grace}s}}
admin: {{listen: "127.0.0.1:{free_port()}", token: "t"}}
redis: {{url: "{own_valkey.connection_url}", shards: 4}}
upstream: {{url: "{upstream.url}", timeout: 5s}}
retry: {{base_delay: 1s, jitter: 0, lease: 30s}}
routes:
  - {{name: stripe, path: /webhooks/stripe, provider: stripe, secrets: ["{SECRET}"]}}
"""
    )
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    assert proc.proc is not None
    body = json.dumps({"id": "evt_refused_burial", "type": "invoice.paid"}).encode()
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{port}/webhooks/stripe"
            async with client.post(url, data=body, headers=signed(body)) as resp:
                # accepted: the receiver's 400 is the sidecar's to deal with, and so is the refused burial
                assert resp.status in (200, 202), await resp.text()
        await asyncio.sleep(0.5)  # the burial is refused and tried again in the background
        started = time.monotonic()
        proc.proc.terminate()
        code = await asyncio.to_thread(proc.proc.wait, 15)
        took = time.monotonic() - started
    finally:
        admin.config_set("min-replicas-to-write", 0)
    assert code == 0
    assert took < grace + 1.5, f"shutdown took {took:.2f}s with a grace of {grace}s"
    event = admin.hgetall(
        KEYS.event(KEYS.shard_of("stripe", "evt_refused_burial"), "stripe:evt_refused_burial")
    )
    assert event and event[b"st"] != b"d", event  # still stored, not marked delivered
    admin.close()


@pytest.mark.slow
async def test_crash_sigterm_with_a_retry_attempt_hanging_still_shuts_down_cleanly(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[SidecarProcess]
) -> None:
    """The retry worker is mid-attempt (the upstream never answers) when SIGTERM comes: once the grace is spent
    the attempt is cut short (its lease brings it back) and shutdown goes on to the marks and the store's close,
    exiting 0. It used to stop at the worker's timeout and exit 1 ("cannot listen")."""
    hang = asyncio.Event()

    async def hold(_: object) -> None:
        await hang.wait()

    proc, port = start_sidecar(
        tmp_path / "sidecar.yaml",
        processes,
        redis_url=redis_url,
        upstream_url=upstream.url,
        secret=SECRET,
        retry="{base_delay: 200ms, jitter: 0, lease: 60s}",
    )
    assert proc.proc is not None
    upstream.respond(503)
    body = json.dumps({"id": "evt_retrying", "type": "invoice.paid"}).encode()
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{port}/webhooks/stripe"
        async with client.post(url, data=body, headers=signed(body)) as resp:
            assert resp.status == 202
    upstream.behaviour = hold  # the retry worker's attempt will hang
    assert await wait_until(lambda: len(upstream.received) == 2, timeout=10)
    started = time.monotonic()
    proc.proc.terminate()
    code = await asyncio.to_thread(proc.proc.wait, 15)
    took = time.monotonic() - started
    hang.set()
    assert code == 0, proc.log()
    assert "cannot listen" not in proc.log() and "Traceback" not in proc.log()
    assert took < 1.0 + 3.0, f"shutdown took {took:.2f}s with a grace of 1s"
    shard = KEYS.shard_of("stripe", "evt_retrying")
    assert rdb.hget(KEYS.event(shard, "stripe:evt_retrying"), "st") == b"f"  # leased: attempted again later


@pytest.mark.slow
async def test_crash_sigterm_with_an_otlp_endpoint_that_never_answers_keeps_to_the_grace(
    tmp_path: Path,
    upstream: Upstream,
    redis_url: str,
    processes: list[SidecarProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exporters' last export is bounded by what is left of `server.shutdown_grace`: the OpenTelemetry SDK's
    own exit hooks waited out each exporter's timeout and retries in turn (an audit: 30 s past SIGTERM with a
    collector that accepts and never answers, 21 s with one that is down), so the pod was killed mid-rollout."""
    async with silent_server() as collector_port:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector_port}")
        cfg = tmp_path / "sidecar.yaml"
        proc, port = start_sidecar(
            cfg, processes, redis_url=redis_url, upstream_url=upstream.url, secret=SECRET
        )
        assert proc.proc is not None
        body = json.dumps({"id": "evt_otlp_exit", "type": "invoice.paid"}).encode()
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{port}/webhooks/stripe"
            async with client.post(url, data=body, headers=signed(body)) as resp:
                assert resp.status == 200, await resp.text()  # a span and metrics waiting to be exported
        started = time.monotonic()
        proc.proc.terminate()
        code = await asyncio.to_thread(proc.proc.wait, 60)
        took = time.monotonic() - started
    assert code == 0, proc.log()
    # write_config's grace is 1 s; the last export gets at least 1 s of its own
    assert took < 1 + 1 + 3, f"shutdown took {took:.2f}s: {proc.log()[-2000:]}"
    assert "the telemetry exporters did not finish their last export in time" in proc.log()
    assert upstream.ids() == ["evt_otlp_exit"]
