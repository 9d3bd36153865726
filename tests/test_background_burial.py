"""A chaos soak: a first attempt's burial that lands in the background (the store refused it once) evicted the
oldest dead letter at the cap with no `dead-letter cap evicted` line and no `dead-lettered` line: the evicted
event vanished with no record naming it (and this process's eviction counter missed it)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import RUNTIME, create_app
from sidecar.errors import StoreError
from tests.conftest import Upstream, make_config
from tests.test_ingress import ROUTES, stripe_body, stripe_headers


async def test_a_background_burial_logs_what_the_cap_evicted(
    upstream: Upstream, redis_url: str, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=redis_url, extra="dlq: {max_length: 1}")
    app = create_app(config, redis_url=redis_url, run_worker=False)
    upstream.respond(400, 400)
    caplog.set_level(logging.INFO)
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        store = runtime.store
        body = stripe_body("evt_old")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert (await resp.json()).get("dead_lettered") is True  # the DLQ is at its cap of 1

        real, refused = store.bury, []

        async def bury_refused_once(*args, **kwargs):  # type: ignore[no-untyped-def]
            if not refused:
                refused.append(1)
                raise StoreError("NOREPLICAS Not enough good replicas to write.")
            return await real(*args, **kwargs)

        store.bury = bury_refused_once
        body = stripe_body("evt_new")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 202 and (await resp.json()).get("queued") is True
        for _ in range(100):  # the background landing
            if rdb.hget("sidecar:{dlq}:evicted", "stripe") == b"1" and not store._background:
                break
            await asyncio.sleep(0.05)
        assert rdb.hget("sidecar:{dlq}:evicted", "stripe") == b"1"  # the store did evict evt_old
        text = caplog.text
        assert "dead-letter cap evicted stripe/evt_old" in text
        assert "dead-lettered stripe/evt_new" in text
        assert runtime.dispatcher.tel.dlq_evicted["stripe"] == 1
