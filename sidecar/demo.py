"""`sidecar demo`: a one-minute tour on loopback, with nothing installed but this package.

Starts the embedded Valkey, a small demo receiver and the sidecar in front of it, sends signed Stripe-style
sample events — a valid one, its duplicate, a forgery, one the receiver fails twice, one it rejects — and prints
what happened to each, then the dead-letter list.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import tempfile
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.app import RUNTIME, create_app
from sidecar.config import load_text
from sidecar.logs import setup_logging
from sidecar.store.embedded import EmbeddedValkey

SECRET = "whsec_demo_secret"
CONFIG = """
server: {{listen: "127.0.0.1:0"}}
admin: {{listen: "127.0.0.1:0", token: "demo"}}
redis: {{url: "{redis}", shards: 4}}
upstream: {{url: "{receiver}", timeout: 2s}}
retry: {{base_delay: 300ms, multiplier: 2, max_delay: 2s, jitter: 0, max_attempts: 5}}
logging: {{level: warning}}
routes:
  - name: stripe
    path: /webhooks/stripe
    provider: stripe
    secrets: ["{secret}"]
"""


def sign(body: bytes, secret: str = SECRET) -> dict[str, str]:
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


class DemoReceiver:
    """The 'legacy receiver': fails `evt_flaky` twice, rejects `evt_reject`, accepts everything else."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.log: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        event_id = request.headers.get("X-Sidecar-Event-Id", "?")
        attempt = request.headers.get("X-Sidecar-Attempt", "?")
        self.seen[event_id] += 1
        status = 200
        if event_id == "evt_flaky" and self.seen[event_id] <= 2:
            status = 503
        elif event_id == "evt_reject":
            status = 400
        self.log.append(f"  receiver got {event_id} (attempt {attempt}) -> {status}")
        return web.json_response({"received": event_id}, status=status)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def tour(redis_url: str, out: Any = print) -> int:
    receiver = DemoReceiver()
    receiver_app = web.Application()
    receiver_app.router.add_route("*", "/{tail:.*}", receiver.handle)
    receiver_runner, receiver_url = await _serve(receiver_app)
    config = load_text(CONFIG.format(redis=redis_url, receiver=receiver_url, secret=SECRET), source="<demo>")
    app = create_app(config, redis_url=redis_url)
    sidecar_runner, sidecar_url = await _serve(app)
    runtime = app[RUNTIME]
    await runtime.store.client.flushdb()
    url = f"{sidecar_url}/webhooks/stripe"
    out(f"demo: receiver on {receiver_url}, sidecar on {sidecar_url}, store {redis_url}\n")

    def event(event_id: str) -> bytes:
        return json.dumps({"id": event_id, "object": "event", "type": "invoice.paid"}).encode()

    steps = [
        ("a valid event", event("evt_valid"), None),
        ("the same event again (a provider retry)", event("evt_valid"), None),
        ("a forgery (signed with the wrong secret)", event("evt_forged"), "whsec_attacker"),
        ("an event the receiver fails twice", event("evt_flaky"), None),
        ("an event the receiver rejects", event("evt_reject"), None),
    ]
    try:
        async with aiohttp.ClientSession() as http:
            for n, (what, body, secret) in enumerate(steps, 1):
                async with http.post(url, data=body, headers=sign(body, secret or SECRET)) as resp:
                    answer = await resp.text()
                    out(f"{n}. {what}\n   sidecar answered {resp.status} {answer.strip()}")
                while receiver.log:
                    out(receiver.log.pop(0))
            out("\nwaiting for the retry worker to deliver evt_flaky ...")
            deadline = time.monotonic() + 20
            state = None
            while time.monotonic() < deadline:
                ev = await runtime.store.get_event("stripe", "evt_flaky")
                state = ev["state"] if ev else None
                if state == "delivered":
                    break
                await asyncio.sleep(0.1)
            while receiver.log:
                out(receiver.log.pop(0))
            out(f"   evt_flaky is {state}")
            out("\ndead letters:")
            dead = await runtime.store.client.zrange(runtime.store.keys.dlq_items(), 0, -1)
            for item_id in dead:
                raw = await runtime.store.client.hget(runtime.store.keys.dlq_data(), item_id)
                item = json.loads(raw)
                out(
                    f"  {item['id']}  route={item['route']} event={item['event_id']} attempts={item['attempts']}"
                    f" last_status={item['last_status']} reason={item['reason']}"
                )
            if not dead:
                out("  (none)")
            delivered = sorted(e for e, n in receiver.seen.items() if e != "evt_reject")
            out(f"\nsummary: receiver saw {dict(receiver.seen)}; delivered once each: {delivered};")
            out(
                "the forgery never reached it, the duplicate was answered by the sidecar, the rejection is in the DLQ."
            )
            out(
                "next: `sidecar dlq list` / `sidecar dlq replay` against a running sidecar (docs/runbook.md)."
            )
            return 0 if state == "delivered" and len(dead) == 1 else 1
    finally:
        await sidecar_runner.cleanup()
        await receiver_runner.cleanup()


def run_demo() -> int:
    setup_logging("error", "text")  # the tour's own lines tell the story; errors still show
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as data_dir:
        store = EmbeddedValkey(data_dir)
        url = store.start()
        try:
            return asyncio.run(tour(url))
        finally:
            store.stop()
