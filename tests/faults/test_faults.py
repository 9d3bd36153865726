"""Faults under load, each checked against a ledger: every event sent, what the sidecar answered, what the upstream
acted on. After each fault: nothing answered 2xx is lost (it reached the upstream or the DLQ), and duplicates are
at most what was in flight when the fault hit. Real `sidecar run` processes, real Valkey, a real upstream, loopback
only; every loop bounded in count and time; every process stopped by the test (the `processes` fixture)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from sidecar.app import RUNTIME
from sidecar.keys import KeySpace
from tests.conftest import Upstream
from tests.faults.conftest import AofValkey
from tests.faults.harness import (
    STRIPE_SECRET,
    FaultUpstream,
    Ledger,
    Provider,
    event_body,
    report,
    stripe_headers,
    stripe_route,
    write_sidecar_config,
)
from tests.procs import SidecarProcess, free_port, wait_until

pytestmark = pytest.mark.slow

KEYS = KeySpace("sidecar", 4)


def start_sidecars(
    tmp_path: Path, processes: list[Any], n: int, *, redis_url: str, upstream_url: str, **config: Any
) -> list[tuple[int, SidecarProcess]]:
    started = []
    for i in range(n):
        port = free_port()
        path = write_sidecar_config(
            tmp_path / f"sidecar{i}.yaml",
            port=port,
            admin_port=free_port(),
            redis_url=redis_url,
            upstream_url=upstream_url,
            **config,
        )
        proc = SidecarProcess(path)
        processes.append(proc)
        proc.start(port)
        started.append((port, proc))
    return started


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/webhooks/stripe"


def dead_ids(client: redis.Redis) -> set[str]:
    return {json.loads(v)["event_id"] for v in client.hvals("sidecar:{dlq}:data")}


def stored(client: redis.Redis, event_id: str) -> bool:
    return bool(client.exists(KEYS.event(KEYS.shard_of("stripe", event_id), f"stripe:{event_id}")))


def states(client: redis.Redis, ids: list[str]) -> Counter[str]:
    pipe = client.pipeline(transaction=False)
    for event_id in ids:
        pipe.hget(KEYS.event(KEYS.shard_of("stripe", event_id), f"stripe:{event_id}"), "st")
    return Counter((st or b"-").decode() for st in pipe.execute())


async def settle(ledger: Ledger, delivered: Counter[str], client: redis.Redis, timeout: float = 40.0) -> bool:
    """Wait (bounded) until every event answered 2xx has been delivered or dead-lettered, as the upstream saw it
    and as the store records it (so redeliveries of events a dead process held have happened and are counted)."""
    accepted = sorted(ledger.accepted())

    def done() -> bool:
        if not set(accepted) <= set(delivered) | dead_ids(client):
            return False
        return set(states(client, accepted)) <= {"d", "x"}  # delivered or dead, none pending or in flight

    return await wait_until(done, timeout, 0.2)


def check(
    kind: str,
    fault: str,
    ledger: Ledger,
    up: FaultUpstream,
    client: redis.Redis,
    in_flight: int,
    unmarked: int = 0,
) -> dict:
    """`unmarked`: events already answered whose delivered marks could die with the store (see marks.py)."""
    figures = ledger.figures(up.delivered, dead_ids(client), in_flight + unmarked)
    report(kind, fault=fault, **figures, upstream_receipts=sum(up.receipts.values()))
    assert figures["lost"] == 0, figures
    assert figures["duplicated"] <= in_flight + unmarked, figures
    return figures


async def test_fault_sidecar_sigkill_under_load_loses_nothing(
    tmp_path: Path, fault_upstream: FaultUpstream, redis_url: str, rdb: redis.Redis, processes: list[Any]
) -> None:
    up = fault_upstream
    up.delay = 0.05  # forwards are in flight when the kill comes
    [(port, first)] = start_sidecars(tmp_path, processes, 1, redis_url=redis_url, upstream_url=up.url)
    ledger, ids = Ledger(), [f"evt_kill{i:04d}" for i in range(400)]
    async with Provider(ledger, [url(port)], concurrency=40) as provider:
        sending = asyncio.create_task(provider.deliver_all(ids))
        assert await wait_until(lambda: len(ledger.accepted()) >= 120, 30)
        in_flight = ledger.outstanding + up.active
        first.kill()
        await asyncio.sleep(0.3)
        again = SidecarProcess(first.config)  # the restart: same config, port and store
        processes.append(again)
        again.start(port)
        assert all(await sending)  # the provider's retries all got a 2xx in the end
    assert await settle(ledger, up.delivered, rdb)
    # A killed sidecar also takes the delivered marks it had queued (sidecar/store/marks.py: they wait up to 2 ms
    # for the next claim): up to one per provider connection, for events already answered. Those come back by
    # lease and are delivered again, never lost.
    check(
        "sidecar_sigkill",
        "SIGKILL of the sidecar under load, restarted",
        ledger,
        up,
        rdb,
        in_flight,
        unmarked=40,  # the provider's concurrency
    )


async def test_fault_two_replicas_one_sigkilled_loses_nothing(
    tmp_path: Path, fault_upstream: FaultUpstream, redis_url: str, rdb: redis.Redis, processes: list[Any]
) -> None:
    up = fault_upstream
    up.delay = 0.05
    (port_a, a), (port_b, _) = start_sidecars(
        tmp_path, processes, 2, redis_url=redis_url, upstream_url=up.url
    )
    ledger, ids = Ledger(), [f"evt_pair{i:04d}" for i in range(400)]
    async with Provider(ledger, [url(port_a), url(port_b)], concurrency=40) as provider:
        sending = asyncio.create_task(provider.deliver_all(ids))
        assert await wait_until(lambda: len(ledger.accepted()) >= 120, 30)
        in_flight = ledger.outstanding + up.active
        a.kill()  # its leased events come back to replica b when the lease runs out
        assert all(await sending)
    assert await settle(ledger, up.delivered, rdb)
    check(
        "replica_sigkill",
        "two replicas, one SIGKILLed under load",
        ledger,
        up,
        rdb,
        in_flight,
        unmarked=40,  # queued delivered marks die with the process, as in the test above
    )


async def test_fault_valkey_sigkill_and_restart_loses_nothing(
    tmp_path: Path, fault_upstream: FaultUpstream, aof_valkey: AofValkey, processes: list[Any]
) -> None:
    up = fault_upstream
    up.delay = 0.02
    [(port, _)] = start_sidecars(
        tmp_path, processes, 1, redis_url=aof_valkey.url, upstream_url=up.url, redis="timeout: 500ms"
    )
    client = aof_valkey.client()
    ledger, ids = Ledger(), [f"evt_vk{i:04d}" for i in range(300)]
    async with Provider(ledger, [url(port)], concurrency=20) as provider:
        sending = asyncio.create_task(provider.deliver_all(ids))
        assert await wait_until(lambda: len(ledger.accepted()) >= 100, 30)
        in_flight = ledger.outstanding + up.active
        aof_valkey.kill()  # SIGKILL: what the append-only file holds is all that survives
        await asyncio.sleep(1.0)
        aof_valkey.start()  # same port, same data dir
        assert all(await sending)
    assert await settle(ledger, up.delivered, client)
    # Besides the requests in flight, a killed store takes the delivered marks it had not yet written: marks are
    # batched (sidecar/store/marks.py) and ride with the next claims, so up to one per provider connection can be
    # on their way. Those events come back by lease: delivered again, never lost.
    figures = check(
        "valkey_sigkill",
        "Valkey SIGKILL + restart (AOF, fsync always)",
        ledger,
        up,
        client,
        in_flight,
        unmarked=20,  # the provider's concurrency
    )
    assert figures["answered_503"] + figures["connection_errors"] > 0  # the outage was felt, and answered
    assert all(stored(client, e) for e in ledger.accepted())  # every 2xx names an event the store holds
    client.close()


async def test_fault_valkey_paused_answers_503_then_recovers_by_itself(
    tmp_path: Path, fault_upstream: FaultUpstream, aof_valkey: AofValkey, processes: list[Any]
) -> None:
    timeout = 0.5
    up = fault_upstream
    [(port, _)] = start_sidecars(
        tmp_path, processes, 1, redis_url=aof_valkey.url, upstream_url=up.url, redis="timeout: 500ms"
    )
    client = aof_valkey.client()
    ledger = Ledger()
    sends: list[tuple[float, float, str, int | None, str | None, str | None]] = []
    pause: dict[str, float] = {}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def send(event_id: str) -> None:
            body = event_body(event_id)
            t0 = time.monotonic()
            try:
                async with http.post(url(port), data=body, headers=stripe_headers(body)) as resp:
                    payload = await resp.read()
                    error = json.loads(payload).get("error") if resp.status >= 400 else None
                    status: int | None = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, error, retry_after = None, type(exc).__name__, None
            sends.append((t0, time.monotonic(), event_id, status, error, retry_after))
            ledger.sent(event_id, status if status is not None else str(error))

        tasks = []
        start = time.monotonic()
        for i in range(400):  # one new event every 20 ms for ~4 s, the pause in the middle
            now = time.monotonic() - start
            if "from" not in pause and now >= 1.0:
                in_flight = sum(1 for t in tasks if not t.done()) + up.active
                aof_valkey.pause()  # SIGSTOP, for 4x the client timeout
                pause["from"] = time.monotonic()
            if "to" not in pause and now >= 3.0:
                aof_valkey.resume()
                pause["to"] = time.monotonic()
            if now >= 4.5:
                break
            tasks.append(asyncio.create_task(send(f"evt_pause{i:04d}")))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)

    p0, p1 = pause["from"], pause["to"]
    during = [s for s in sends if p0 + 0.05 <= s[0] <= p1 - (timeout + 0.1)]
    after = [s for s in sends if s[0] >= p1 + 1.0]
    assert len(during) >= 20 and after
    # Fail closed: nothing sent while the store was stuck got a 2xx; each got 503 store_unavailable + Retry-After,
    # in bounded time (the watchdog, not the provider's own timeout).
    assert {(s[3], s[4]) for s in during} == {(503, "store_unavailable")}, Counter(
        (s[3], s[4]) for s in during
    )
    assert all(s[5] for s in during)
    slowest = max(s[1] - s[0] for s in during)
    assert slowest < timeout + 1.0
    # Recovered by itself: no restart, no operator.
    assert all(s[3] is not None and s[3] < 300 for s in after), Counter(s[3] for s in after)

    refused = [e for e, got in ledger.answers.items() if e not in ledger.accepted()]
    async with Provider(ledger, [url(port)], concurrency=20) as provider:  # the provider retries the 503s
        assert all(await provider.deliver_all(refused))
    assert await settle(ledger, up.delivered, client)
    figures = check(
        "valkey_paused",
        "Valkey SIGSTOP 2 s (redis.timeout 500 ms), then SIGCONT",
        ledger,
        up,
        client,
        in_flight,
    )
    report(
        "valkey_paused_answers",
        fault="answers while Valkey was paused",
        sent_during_pause=len(during),
        answered_503_store_unavailable=len(during),
        answered_2xx_during_pause=0,
        slowest_answer_ms=round(slowest * 1000),
        first_2xx_after_resume_ms=round(
            1000 * (min(s[1] for s in sends if s[0] >= p1 and s[3] is not None and s[3] < 300) - p1)
        ),
    )
    assert figures["answered_2xx"] == figures["events"]
    client.close()


@pytest.mark.parametrize("mode", ["flap", "hang", "reset", "slow"])
async def test_fault_upstream_misbehaving_loses_nothing(
    mode: str,
    tmp_path: Path,
    fault_upstream: FaultUpstream,
    redis_url: str,
    rdb: redis.Redis,
    processes: list[Any],
) -> None:
    up = fault_upstream
    up.mode, up.timeout = mode, 1.0
    [(port, _)] = start_sidecars(
        tmp_path,
        processes,
        1,
        redis_url=redis_url,
        upstream_url=up.url,
        upstream="timeout: 1s, breaker: {cooldown: 200ms, max_cooldown: 500ms}",
    )
    ledger, ids = Ledger(), [f"evt_{mode}{i:04d}" for i in range(100)]
    async with Provider(ledger, [url(port)], concurrency=25) as provider:
        assert all(await provider.deliver_all(ids))
    if mode == "hang":
        up.mode = "ok"  # the upstream comes back; the hung requests are answered (too late to count)
        up.release.set()
    assert await settle(ledger, up.delivered, rdb)
    described = {
        "flap": "upstream flapping (503 half the time)",
        "hang": "upstream hanging past upstream.timeout, then back",
        "reset": "upstream closing the connection mid-response",
        "slow": "upstream answering in 0.1-1.5x upstream.timeout",
    }
    figures = check(f"upstream_{mode}", described[mode], ledger, up, rdb, in_flight=up.abandoned)
    assert figures["answered_2xx"] == len(ids)
    if mode in ("flap", "hang"):
        assert figures["duplicated"] == 0  # a 503 or a timeout with nothing acted on never duplicates


async def test_fault_unexpected_error_in_one_attempt_does_not_stop_the_retry_worker(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met by one event (here an exception injected into its forward) is logged; the worker carries on,
    delivers the others, and the event itself once its lease runs out."""
    client = await sidecar_factory(
        stripe_route(secret=STRIPE_SECRET),
        run_worker=True,
        retry="{base_delay: 50ms, multiplier: 1, jitter: 0, lease: 1s}",
    )
    upstream.respond(503, 503, 503)
    ids = ["evt_w_a", "evt_w_b", "evt_w_c"]
    for event_id in ids:
        body = event_body(event_id)
        assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    forwarder = client.server.app[RUNTIME].dispatcher.forwarder
    real_send = forwarder.send
    injected = []

    async def send(target: str, method: str, headers: Any, body: bytes, policy: Any) -> Any:
        if b"evt_w_b" in body and not injected:
            injected.append(1)
            raise RuntimeError("injected fault")
        return await real_send(target, method, headers, body, policy)

    monkeypatch.setattr(forwarder, "send", send)

    def delivered() -> set[str]:
        return {r.headers["x-sidecar-event-id"] for r in upstream.received[3:]}

    assert await wait_until(lambda: delivered() == set(ids), 15)
    assert injected
    worker = [t for t in asyncio.all_tasks() if t.get_name() == "retry-worker"]
    assert worker and not worker[0].done()
    report(
        "worker_unexpected_error",
        fault="exception injected into one retry attempt",
        events=3,
        answered_2xx=3,
        lost=0,
        duplicated=0,
        in_flight=1,
        worker_alive=1,
    )
