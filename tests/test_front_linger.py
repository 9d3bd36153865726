"""A review: a 408 read_timeout now lingers (front.py `timed_out` -> `_refuse`), but the connection keeps the
in-flight budget of the body it no longer holds until the linger ends (LINGER_S): new bodies are refused 503."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.conftest import Upstream
from tests.test_front import connect, exchange, post, read_response
from tests.test_ingress import ROUTES, _padded, stripe_headers


async def test_a_408_gives_back_the_inflight_budget_at_once(sidecar_factory: Any, upstream: Upstream) -> None:
    from sidecar.app import RUNTIME

    client = await sidecar_factory(ROUTES, server="max_inflight_bytes: 100000, read_timeout: 1s")
    ingress = client.server.app[RUNTIME].ingress
    slow = _padded("evt_slow", 60_000)
    raw = post("/webhooks/stripe", slow, stripe_headers(slow))
    reader, writer = await connect(client)
    try:
        writer.write(raw[:-100])  # a body that never ends (a stalled provider connection)
        status, _, body = await asyncio.wait_for(read_response(reader), 10)
        assert (status, json.loads(body)) == (408, {"error": "read_timeout"})
        held_after_408 = ingress.inflight_bytes
        # a provider's good event right after the 408, while the timed-out connection lingers
        good = _padded("evt_good", 60_000)
        status2, _, body2 = await exchange(client, post("/webhooks/stripe", good, stripe_headers(good)))
    finally:
        writer.close()
    print("inflight after 408:", held_after_408, "next request:", status2, body2)
    assert held_after_408 == 0, (
        f"{held_after_408} bytes of the budget held by a connection that holds no body"
    )
    assert status2 == 200, (status2, body2)
    await asyncio.sleep(0)
    assert upstream.ids() == ["evt_good"]
