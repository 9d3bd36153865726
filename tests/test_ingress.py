"""The ingest path end to end: real sidecar, real Valkey, real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import replace
from typing import Any

import pytest
import redis

from sidecar.keys import KeySpace
from tests.conftest import Upstream, open_circuit

STRIPE_SECRET = "whsec_test_secret"
STRIPE_OLD = "whsec_old_secret"
GITHUB_SECRET = "It's a Secret to Everybody"
KEYS = KeySpace("sidecar", 4)

ROUTES = f"""
- name: stripe
  path: /webhooks/stripe
  provider: stripe
  secrets: ["{STRIPE_SECRET}", "{STRIPE_OLD}"]
- name: stripe2
  path: /webhooks/stripe2
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
- name: github
  path: /webhooks/github
  provider: github
  secrets: ["{GITHUB_SECRET}"]
- name: typed
  path: /webhooks/typed
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  types: ["invoice.*"]
- name: passthru
  path: /webhooks/passthru
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  dedupe: false
- name: slack
  path: /webhooks/slack
  provider: slack
  secrets: ["slack-signing-secret"]
- name: slackpass
  path: /webhooks/slackpass
  provider: slack
  secrets: ["slack-signing-secret"]
  handshake: pass
- name: plain
  path: /webhooks/plain
  provider: none
  event_id: {{header: X-Event-Id}}
"""


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, t: int | None = None) -> dict[str, str]:
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


def stripe_body(event_id: str, type_: str = "invoice.paid") -> bytes:
    return json.dumps({"id": event_id, "object": "event", "type": type_, "data": {"x": "é ü"}}).encode()


def github_headers(body: bytes, delivery: str) -> dict[str, str]:
    sig = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={sig}",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
    }


def slack_headers(body: bytes, secret: str = "slack-signing-secret") -> dict[str, str]:
    ts = str(int(time.time()))
    sig = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Signature": f"v0={sig}",
        "X-Slack-Request-Timestamp": ts,
        "Content-Type": "application/json",
    }


@pytest.fixture
async def client(sidecar_factory: Any) -> Any:
    return await sidecar_factory(ROUTES)


def stored_keys(rdb: redis.Redis) -> list[bytes]:
    """What requests stored: every key but the shard count a sidecar records at start."""
    return sorted(k for k in rdb.keys("*") if k != KEYS.layout().encode())


async def test_ingress_forwards_new_event_byte_for_byte(client: Any, upstream: Upstream) -> None:
    body = stripe_body("evt_1")
    headers = {
        **stripe_headers(body),
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "dropped",
    }
    resp = await client.post("/webhooks/stripe?a=1&b=2", data=body, headers=headers)
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    assert resp.headers["X-Upstream"] == "yes"  # upstream's headers come back
    assert resp.headers["X-Sidecar-Event-Id"] == "evt_1"
    [got] = upstream.received
    assert got.body == body
    assert got.path_qs == "/webhooks/stripe?a=1&b=2"
    assert got.headers["stripe-signature"] == headers["Stripe-Signature"]
    assert got.headers["x-custom"] == "kept"
    assert "x-hop" not in got.headers
    assert got.headers["x-sidecar-event-id"] == "evt_1"
    assert got.headers["x-sidecar-attempt"] == "1"
    assert got.headers["x-sidecar-route"] == "stripe"
    assert got.headers["x-forwarded-for"] == "127.0.0.1"
    assert got.headers["x-forwarded-proto"] == "http"
    assert got.headers["x-forwarded-host"].startswith("127.0.0.1:")


async def test_ingress_a_clients_own_sidecar_headers_do_not_reach_the_receiver(
    client: Any, upstream: Upstream
) -> None:
    """`X-Sidecar-Event-Id`, `-Attempt` and `-Route` are the sidecar's word to the receiver: a sender's own lines of
    those names are dropped, not forwarded beside ours (a receiver reading the first line would dedupe on an id
    the sender chose)."""
    body = stripe_body("evt_own")
    headers = [
        *stripe_headers(body).items(),
        ("X-Sidecar-Event-Id", "evt_forged"),
        ("X-Sidecar-Attempt", "9"),
        ("X-Sidecar-Route", "other"),
    ]
    assert (await client.post("/webhooks/stripe", data=body, headers=headers)).status == 200
    [got] = upstream.received
    sidecar = [(k.lower(), v) for k, v in got.raw_headers if k.lower().startswith("x-sidecar-")]
    assert sorted(sidecar) == [
        ("x-sidecar-attempt", "1"),
        ("x-sidecar-event-id", "evt_own"),
        ("x-sidecar-route", "stripe"),
    ]


async def test_ingress_an_expect_header_is_answered_here_not_forwarded(
    client: Any, upstream: Upstream
) -> None:
    """`Expect: 100-continue` belongs to the provider's connection, which the sidecar answered itself: the stored
    event goes upstream without it (forwarding.NOT_FORWARDED), on the first attempt and every retry."""
    body = stripe_body("evt_expect")
    headers = {**stripe_headers(body), "Expect": "100-continue"}
    resp = await client.post("/webhooks/stripe", data=body, headers=headers)
    assert resp.status == 200 and await resp.json() == {"ok": True}
    [got] = upstream.received
    assert got.body == body
    assert "expect" not in got.headers


async def test_ingress_duplicate_after_delivery_reports_delivered(client: Any, upstream: Upstream) -> None:
    body = stripe_body("evt_dup")
    assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 200
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 200
    assert await resp.json() == {"duplicate": True, "event_id": "evt_dup", "state": "delivered"}
    assert resp.headers["X-Sidecar-Event-Id"] == "evt_dup"
    assert len(upstream.received) == 1


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        ("tamper", "invalid_signature"),
        ("wrong_secret", "invalid_signature"),
        ("stale", "timestamp_out_of_tolerance"),
        ("missing", "invalid_signature"),
    ],
)
async def test_ingress_rejects_bad_signature_without_claim_or_forward(
    client: Any, upstream: Upstream, rdb: redis.Redis, mutate: str, error: str
) -> None:
    body = stripe_body("evt_bad")
    headers = stripe_headers(body)
    if mutate == "tamper":
        body = body.replace(b"evt_bad", b"evt_bae")
    elif mutate == "wrong_secret":
        headers = stripe_headers(body, secret="whsec_wrong")
    elif mutate == "stale":
        headers = stripe_headers(body, t=int(time.time()) - 3600)
    else:
        del headers["Stripe-Signature"]
    resp = await client.post("/webhooks/stripe", data=body, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"] == error
    assert upstream.received == []
    assert stored_keys(rdb) == []


async def test_ingress_accepts_second_configured_secret(client: Any, upstream: Upstream) -> None:
    body = stripe_body("evt_rot")
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body, secret=STRIPE_OLD))
    assert resp.status == 200
    assert upstream.ids() == ["evt_rot"]


async def test_ingress_50_concurrent_copies_forward_once(client: Any, upstream: Upstream) -> None:
    upstream.delay = 0.05  # keep the first forward in flight while the copies arrive
    body = stripe_body("evt_race")
    resps = await asyncio.gather(
        *(client.post("/webhooks/stripe", data=body, headers=stripe_headers(body)) for _ in range(50))
    )
    statuses = sorted(r.status for r in resps)
    assert statuses == [200] * 50
    payloads = [await r.json() for r in resps]
    assert sum(1 for p in payloads if p.get("duplicate")) == 49
    assert upstream.ids() == ["evt_race"]


async def test_ingress_interleaved_distinct_events_each_forwarded_once(
    client: Any, upstream: Upstream
) -> None:
    bodies = [stripe_body(f"evt_{i}") for i in range(20)]
    sends = [
        client.post("/webhooks/stripe", data=b, headers=stripe_headers(b)) for _ in range(10) for b in bodies
    ]
    resps = await asyncio.gather(*sends)
    assert all(r.status == 200 for r in resps)
    assert sorted(upstream.ids()) == sorted(f"evt_{i}" for i in range(20))


async def test_ingress_same_event_id_on_two_routes_is_two_events(client: Any, upstream: Upstream) -> None:
    body = stripe_body("evt_shared")
    r1 = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    r2 = await client.post("/webhooks/stripe2", data=body, headers=stripe_headers(body))
    assert (r1.status, r2.status) == (200, 200)
    assert [r.headers["x-sidecar-route"] for r in upstream.received] == ["stripe", "stripe2"]


async def test_ingress_replay_under_forged_header_id_neither_blocks_nor_duplicates(
    client: Any, upstream: Upstream
) -> None:
    body_a = b'{"ref":"refs/heads/main","after":"aaa"}'
    body_b = b'{"ref":"refs/heads/main","after":"bbb"}'
    # The real delivery A.
    assert (
        await client.post("/webhooks/github", data=body_a, headers=github_headers(body_a, "id-A"))
    ).status == 200
    # An attacker replays A's signed bytes under B's id before B arrives: not forwarded again.
    replay = await client.post("/webhooks/github", data=body_a, headers=github_headers(body_a, "id-B"))
    assert replay.status == 200
    # named by the id it is stored (and found by the admin API) under, not the replay's (an e2e audit)
    answer = await replay.json()
    assert answer["duplicate"] is True and answer["event_id"] == "id-A", answer
    assert replay.headers["X-Sidecar-Event-Id"] == "id-A"
    # The real B still gets through.
    real_b = await client.post("/webhooks/github", data=body_b, headers=github_headers(body_b, "id-B"))
    assert real_b.status == 200
    assert "duplicate" not in await real_b.json()
    assert [r.body for r in upstream.received] == [body_a, body_b]
    assert upstream.ids() == ["id-A", "id-B"]


async def queued_and_pending(client: Any, event_id: str) -> dict[str, Any]:
    """POST a Stripe event the upstream fails: answered 202 queued; its resend is a duplicate, pending. The first
    answer's body."""
    body = stripe_body(event_id)
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 202
    payload = await resp.json()
    assert payload["queued"] is True and payload["event_id"] == event_id
    again = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert await again.json() == {"duplicate": True, "event_id": event_id, "state": "pending"}
    return payload


async def test_ingress_retryable_failure_queues_and_resend_is_pending(
    client: Any, upstream: Upstream
) -> None:
    upstream.respond(503)
    payload = await queued_and_pending(client, "evt_q")
    assert payload["next_attempt_at"].endswith("Z")


async def test_ingress_first_attempt_settling_late_leaves_a_replayed_run_alone(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """The ingress's attempt 1 belongs to the claim's run of attempts (its first sight): hung past its lease while
    another replica's attempt 2 buried the event and an operator's replay took it again as the replay's attempt 1,
    its late 503 must not pass the fence as that attempt 1 and pull the replayed event back onto the schedule (it
    would be sent again while in flight)."""
    from aiohttp import web

    from sidecar.app import RUNTIME
    from sidecar.store import AttemptRecord
    from sidecar.store.dead_letters import DeadLetters

    store = client.server.app[RUNTIME].dispatcher.store
    gate = asyncio.Event()

    async def hang_then_fail(_: Any) -> web.Response:
        await gate.wait()
        return web.Response(status=503)

    upstream.behaviour = hang_then_fail
    post = asyncio.create_task(client.post("/webhooks/plain", data=b"run", headers={"X-Event-Id": "e-run"}))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    shard = KEYS.shard_of("plain", "e-run")
    later = store.clock.now_ms() + 60_000  # past the claim's lease (24 s here)
    [second] = await store.take_due(shard, later, 30_000, 10)  # another replica's attempt 2
    await store.bury(second.record, 2, AttemptRecord(later, 2, 400, None, 1.0), [], later + 100, "rejected")
    dl = DeadLetters(store)
    [item] = (await dl.page()).items
    assert await dl.replay(await dl.get(item.id), later + 200, "fixed", "op") == "replayed"
    [replayed] = await store.take_due(shard, later + 200, 30_000, 10)
    assert replayed.attempt == 1
    gate.set()
    assert (await post).status == 202
    member = "plain:e-run"
    assert rdb.hget(KEYS.event(shard, member), "st") == b"f"
    assert rdb.zscore(KEYS.schedule(shard), member) == replayed.lease_end_ms
    assert len(upstream.received) == 1


async def test_ingress_bug_in_first_attempt_answers_queued_not_500(
    client: Any, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met while settling attempt 1 (a `Retry-After: ²` once raised ValueError there) answered the provider
    500 for an event already claimed and stored: it is queued, and the lease brings it back."""

    def broken(value: str | None, now: float) -> float | None:
        raise ValueError(value)

    monkeypatch.setattr("sidecar.dispatch.parse_retry_after", broken)
    upstream.respond(503)
    await queued_and_pending(client, "evt_bug")
    assert len(upstream.received) == 1


async def test_ingress_unreachable_upstream_queues(sidecar_factory: Any, upstream: Upstream) -> None:
    upstream.url = "http://127.0.0.1:1"  # nothing listens on port 1
    client = await sidecar_factory(ROUTES)
    body = stripe_body("evt_down")
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 202
    assert (await resp.json())["queued"] is True


async def test_ingress_permanent_rejection_dead_letters(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.respond(400)
    body = stripe_body("evt_400")
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 202
    assert await resp.json() == {"dead_lettered": True, "event_id": "evt_400"}
    assert rdb.zcard("sidecar:{dlq}:items") == 1
    again = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert (await again.json())["state"] == "dead"


async def test_ingress_a_redirect_is_queued_not_dead_lettered(client: Any, upstream: Upstream) -> None:
    """A 302 to a login page (an auth proxy in front of the receiver, a moved URL) dead-lettered the event at once
    as a rejection (a review): a redirect is not followed, and retried, as the providers themselves do."""
    upstream.respond(302, headers={"Location": "/login"})
    body = stripe_body("evt_302")
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 202
    answer = await resp.json()
    assert answer["queued"] is True and answer["event_id"] == "evt_302"
    assert [r.path_qs for r in upstream.received] == ["/webhooks/stripe"]  # not followed to /login
    again = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert (await again.json())["state"] == "pending"


async def test_ingress_no_route_is_404(client: Any) -> None:
    resp = await client.post("/nowhere", data=b"{}")
    assert resp.status == 404
    assert await resp.json() == {"error": "no_route"}


async def test_ingress_body_too_large_is_413_with_and_without_length(client: Any, upstream: Upstream) -> None:
    big = b"x" * 70_000
    resp = await client.post("/webhooks/stripe", data=big, headers=stripe_headers(big))
    assert resp.status == 413
    assert await resp.json() == {"error": "body_too_large"}

    async def chunks():
        for _ in range(70):
            yield b"y" * 1000

    resp = await client.post("/webhooks/stripe", data=chunks(), headers={"Stripe-Signature": "t=1,v1=00"})
    assert resp.status == 413
    assert upstream.received == []


async def test_ingress_body_of_exactly_max_body_bytes_is_taken_on_every_path(
    client: Any, upstream: Upstream
) -> None:
    """`max_body_bytes` (65536 here) is the largest body taken, not the smallest refused: announced by its
    Content-Length (the front's path, and aiohttp's under `Expect: 100-continue`) or chunked (counted as read)."""
    limit = 65_536
    body = b"z" * limit

    async def chunked():
        for i in range(0, limit, 4096):
            yield body[i : i + 4096]

    for i, (data, extra) in enumerate([(body, {}), (body, {"Expect": "100-continue"}), (chunked(), {})]):
        resp = await client.post("/webhooks/plain", data=data, headers={"X-Event-Id": f"max-{i}", **extra})
        assert resp.status == 200, (i, resp.status)
    assert upstream.ids() == ["max-0", "max-1", "max-2"]
    assert all(r.body == body for r in upstream.received)
    over = b"z" * (limit + 1)
    resp = await client.post(
        "/webhooks/plain", data=over, headers={"X-Event-Id": "over", "Expect": "100-continue"}
    )
    assert resp.status == 413


async def test_ingress_signed_body_without_id_is_400(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    body = b'{"object":"event","type":"invoice.paid"}'
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 400
    # the answer says which extractor found nothing (a wrong `{json: …}` path is a common first-day mistake)
    assert await resp.json() == {"error": "no_event_id", "detail": "no usable event id from event_id: auto"}
    assert upstream.received == [] and stored_keys(rdb) == []


async def test_ingress_store_unreachable_is_503_fail_closed(sidecar_factory: Any, upstream: Upstream) -> None:
    from sidecar.app import create_app
    from tests.conftest import make_config

    config = make_config(ROUTES, upstream_url=upstream.url, redis_url="redis://127.0.0.1:1")
    app = create_app(config, redis_url="redis://127.0.0.1:1", run_worker=False)
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(app)) as client:
        body = stripe_body("evt_503")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 503
        assert (await resp.json())["error"] == "store_unavailable"
        assert int(resp.headers["Retry-After"]) > 0
    assert upstream.received == []


async def test_ingress_a_start_cut_short_closes_what_it_opened(
    upstream: Upstream, redis_url: str, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that fails once the store, the upstream session and the retry worker are up (here an error injected
    where the metric series are zeroed) closes all three before the error goes on. Left open, the process (or a
    test) that built the app waited ~2 min for the session's transports when its event loop closed (an audit)."""
    from aiohttp import web

    import sidecar.app as app_module
    from sidecar.telemetry import Telemetry
    from tests.conftest import make_config
    from tests.procs import wait_until

    def connected() -> int:
        return len(rdb.client_list())

    before = connected()
    opened: list[Any] = []

    class Recording(app_module.Forwarder):  # type: ignore[misc]
        def __init__(self, session: Any, timeout: float, http1: Any) -> None:
            opened.append(session)
            super().__init__(session, timeout, http1)

    monkeypatch.setattr(app_module, "Forwarder", Recording)
    telemetry = Telemetry()

    def fail(routes: Any) -> None:
        raise RuntimeError("injected at start")

    monkeypatch.setattr(telemetry, "zero_series", fail)
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=redis_url)
    app = app_module.create_app(config, redis_url=redis_url, run_worker=True, telemetry=telemetry)
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="injected at start"):
        await runner.setup()
    [session] = opened
    assert session.closed
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "retry-worker"]
    assert await wait_until(lambda: connected() <= before, 5.0, 0.05), rdb.client_list()


async def test_ingress_a_start_cancelled_while_its_worker_forwards_loses_nothing(
    upstream: Upstream, redis_url: str, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A start cancelled while a worker started with `reload_at_start` still reloads, its retry worker already
    forwarding a queued event into a receiver that hangs: the start ends at once and leaves no task or store
    connection behind; the event, leased by the cut attempt, is delivered by the next start (a review)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.app import create_app
    from sidecar.reload import Reloader
    from tests.conftest import make_config
    from tests.procs import wait_until

    retry = "{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0, lease: 1s}"
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=redis_url, retry=retry)
    upstream.respond(503)  # the first attempt fails: the event waits in the schedule
    async with TestClient(TestServer(create_app(config, redis_url=redis_url, run_worker=False))) as client:
        body = stripe_body("evt_cut_start")
        assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    released = asyncio.Event()

    async def hang(rec: Any) -> None:
        await released.wait()  # then 200

    upstream.behaviour = hang
    held = asyncio.Event()

    async def held_reload(self: Reloader, reason: str, text: str | None = None) -> bool:
        await held.wait()
        return True

    monkeypatch.setattr(Reloader, "reload", held_reload)
    path = tmp_path / "sidecar.yaml"
    path.write_text("routes: []\n")
    before = len(rdb.client_list())
    app = create_app(
        config, redis_url=redis_url, run_worker=True, config_path=str(path), reload_at_start=True
    )
    setup = asyncio.create_task(web.AppRunner(app).setup())
    try:
        assert await wait_until(lambda: len(upstream.received) == 2, 10.0)  # the retry, hanging
        started = time.monotonic()
        setup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await setup
        assert time.monotonic() - started < 2.0
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert not names & {"retry-worker", "config-watch", "otlp-gauges"}, names
        assert await wait_until(lambda: len(rdb.client_list()) <= before, 5.0), rdb.client_list()
    finally:
        released.set()
        held.set()
    upstream.behaviour = None
    runner = web.AppRunner(create_app(config, redis_url=redis_url, run_worker=True))
    await runner.setup()
    try:
        assert await wait_until(
            lambda: len(upstream.received) == 3, 10.0
        )  # once the cut attempt's lease is over
        assert upstream.ids() == ["evt_cut_start"] * 3
        assert [r.headers["x-sidecar-attempt"] for r in upstream.received] == ["1", "2", "3"]
    finally:
        await runner.cleanup()


async def test_ingress_a_claim_the_store_refused_gives_the_breakers_probe_slot_back(
    upstream: Upstream,
) -> None:
    """Half-open, the upstream's breaker lets one probe forward out: a request that took it and whose claim the
    store then refused (503) made no forward, so the slot is given back. Kept, no forward would be let out again
    (every new event queued, every retry put back unsent) until a restart."""
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.app import RUNTIME, create_app
    from tests.conftest import make_config

    config = make_config(ROUTES, upstream_url=upstream.url, redis_url="redis://127.0.0.1:1")
    app = create_app(config, redis_url="redis://127.0.0.1:1", run_worker=False)
    async with TestClient(TestServer(app)) as client:
        dispatcher = app[RUNTIME].dispatcher
        breaker = dispatcher.breaker(dispatcher.table.by_name["stripe"].cfg)
        open_circuit(breaker)  # its cooldown over: the next request's forward is the probe
        assert breaker.state == "half_open"
        body = stripe_body("evt_probe")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 503
        assert breaker.allow() is not None  # the probe slot is free again
    assert upstream.received == []


async def test_ingress_a_duplicate_gives_the_breakers_probe_slot_back(
    client: Any, upstream: Upstream
) -> None:
    """A provider's resend of an event already held, arriving while the breaker is half-open, takes the probe slot
    and is answered `duplicate` without a forward: the slot is given back, or no forward would be let out again."""
    from sidecar.app import RUNTIME

    assert (await client.post("/webhooks/plain", data=b"once", headers={"X-Event-Id": "e-dup"})).status == 200
    dispatcher = client.server.app[RUNTIME].dispatcher
    breaker = dispatcher.breaker(dispatcher.table.by_name["plain"].cfg)
    open_circuit(breaker)  # its cooldown over: the next forward is the probe
    assert breaker.state == "half_open"
    resp = await client.post("/webhooks/plain", data=b"once", headers={"X-Event-Id": "e-dup"})
    assert resp.status == 200 and (await resp.json())["duplicate"] is True
    assert breaker.allow() is not None  # the probe slot is free again
    assert upstream.ids() == ["e-dup"]


async def test_ingress_types_filter_answers_filtered(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    body = stripe_body("evt_t1", type_="customer.created")
    resp = await client.post("/webhooks/typed", data=body, headers=stripe_headers(body))
    assert resp.status == 200
    assert await resp.json() == {"filtered": True}
    assert resp.headers["X-Sidecar-Event-Id"] == "evt_t1"  # CONTRACT: every answer, when an id is known
    ok = stripe_body("evt_t2", type_="invoice.paid")
    assert (await client.post("/webhooks/typed", data=ok, headers=stripe_headers(ok))).status == 200
    assert upstream.ids() == ["evt_t2"]


async def test_ingress_dedupe_false_passes_through_synchronously(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.respond(500, body=b"upstream broke")
    body = stripe_body("evt_pt")
    resp = await client.post("/webhooks/passthru", data=body, headers=stripe_headers(body))
    assert resp.status == 500
    assert await resp.read() == b"upstream broke"
    assert stored_keys(rdb) == []  # never claimed, never scheduled
    again = await client.post("/webhooks/passthru", data=body, headers=stripe_headers(body))
    assert again.status == 200  # no dedupe: forwarded again
    assert len(upstream.received) == 2


async def test_ingress_non_post_passes_through_untouched(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    resp = await client.get("/webhooks/stripe?probe=1")
    assert resp.status == 200
    [got] = upstream.received
    assert (got.method, got.path_qs) == ("GET", "/webhooks/stripe?probe=1")
    assert stored_keys(rdb) == []
    # no event: nothing that reads as a delivery attempt (it carried X-Sidecar-Attempt: 1)
    assert "x-sidecar-attempt" not in got.headers and "x-sidecar-event-id" not in got.headers


async def test_ingress_slack_url_verification_answered_not_claimed(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    body = json.dumps({"token": "t", "challenge": "c-123", "type": "url_verification"}).encode()
    resp = await client.post("/webhooks/slack", data=body, headers=slack_headers(body))
    assert resp.status == 200
    assert (await resp.json())["challenge"] == "c-123"
    assert upstream.received == [] and stored_keys(rdb) == []
    forged = await client.post("/webhooks/slack", data=body, headers=slack_headers(body, secret="nope"))
    assert forged.status == 401


async def test_ingress_github_ping_is_answered_not_claimed(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """providers.md §24: GitHub's ping (sent when a hook is made) is "just 2xx after verification", never claimed
    or queued. It was stored and forwarded as an event (a conformance audit): with the receiver failing, retried
    and dead-lettered; its resend answered `duplicate`."""
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    for delivery in ("ping-1", "ping-2", "ping-1"):
        headers = {**github_headers(body, delivery), "X-GitHub-Event": "ping"}
        resp = await client.post("/webhooks/github", data=body, headers=headers)
        assert resp.status == 200 and await resp.json() == {"ping": True}
    assert upstream.received == [] and stored_keys(rdb) == []
    forged = {**github_headers(body, "ping-3"), "X-GitHub-Event": "ping", "X-Hub-Signature-256": "sha256=00"}
    assert (await client.post("/webhooks/github", data=body, headers=forged)).status == 401


async def test_ingress_slack_ssl_check_with_more_fields_is_answered_and_never_relayed(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """Bolt answers any `ssl_check=1` form 200 unverified; one with a `team_id` was refused 401 here. Its other
    fields are unsigned: answered by the sidecar even with `handshake: pass`, never relayed."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in ("/webhooks/slack", "/webhooks/slackpass"):
        resp = await client.post(path, data=b"ssl_check=1&token=t&team_id=T1", headers=form)
        assert resp.status == 200 and await resp.read() == b""
    assert upstream.received == [] and stored_keys(rdb) == []


async def test_ingress_handshake_pass_mode_relays_upstream(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.respond(200, body=b'{"challenge":"from-upstream"}', headers={"Content-Type": "application/json"})
    body = json.dumps({"token": "t", "challenge": "c-9", "type": "url_verification"}).encode()
    resp = await client.post("/webhooks/slackpass", data=body, headers=slack_headers(body))
    assert resp.status == 200
    assert await resp.json() == {"challenge": "from-upstream"}
    assert len(upstream.received) == 1 and stored_keys(rdb) == []


async def test_ingress_unverified_route_uses_configured_header_id(client: Any, upstream: Upstream) -> None:
    r1 = await client.post("/webhooks/plain", data=b"one", headers={"X-Event-Id": "e-1"})
    r2 = await client.post("/webhooks/plain", data=b"one", headers={"X-Event-Id": "e-1"})
    r3 = await client.post("/webhooks/plain", data=b"one")
    assert (r1.status, r2.status, r3.status) == (200, 200, 400)
    assert (await r2.json())["duplicate"] is True
    assert upstream.ids() == ["e-1"]


async def test_ingress_event_id_unfit_for_use_as_is_gets_a_stable_stand_in(
    client: Any, upstream: Upstream
) -> None:
    """A signed id that is not printable ASCII or is over 256 characters was refused 400 no_event_id, and so was
    every resend: never delivered. It now stands in as its digest (still a duplicate when resent); an empty id is
    still no id."""
    body = json.dumps({"id": "", "type": "invoice.paid"}).encode()
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert (resp.status, (await resp.json())["error"]) == (400, "no_event_id")
    unfit = ["a\nb", "x" * 300, "é"]
    for odd in unfit:
        body = json.dumps({"id": odd, "type": "invoice.paid"}).encode()
        first = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        again = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        stand_in = "id-sha256:" + hashlib.sha256(odd.encode()).hexdigest()
        assert first.status == 200 and first.headers["X-Sidecar-Event-Id"] == stand_in, odd
        assert (await again.json()) == {"duplicate": True, "event_id": stand_in, "state": "delivered"}
    assert upstream.ids() == ["id-sha256:" + hashlib.sha256(odd.encode()).hexdigest() for odd in unfit]
    upstream.received.clear()
    body = json.dumps({"id": 12345, "type": "invoice.paid"}).encode()
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status in (200, 400)  # a numeric id is usable or cleanly refused, never a 500
    assert upstream.ids() in ([], ["12345"])


async def test_ingress_json_id_in_body_nested_past_recursion_limit_is_400(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    client = await sidecar_factory(
        f"""
        - name: ghjson
          path: /webhooks/ghjson
          provider: github
          secrets: ["{GITHUB_SECRET}"]
          event_id: {{json: id}}
        """
    )
    # deeper than the interpreter parses (Python 3.13 takes 2,000 levels; 3.11 and 3.12 do not), within 64 KiB
    body = b'{"id":"evt_deep","x":' + b"[" * 32_000 + b"]" * 32_000 + b"}"
    headers = github_headers(body, "deliv-deep")

    async def chunked():  # no Content-Length: aiohttp's own request path, not the front's fast path
        yield body

    for data in (body, chunked()):
        resp = await client.post("/webhooks/ghjson", data=data, headers=headers)
        assert resp.status == 400
        assert await resp.json() == {
            "error": "no_event_id",
            "detail": "no usable event id from event_id: {json: id}",
        }
    assert upstream.received == [] and stored_keys(rdb) == []


async def test_ingress_json_id_path_through_a_list_takes_an_index_in_range_only(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """`{json: events.1.id}` indexes a list: an index past its end is no id (400 no_event_id), not a 500."""
    client = await sidecar_factory(
        """
        - name: listed
          path: /webhooks/listed
          provider: none
          event_id: {json: events.1.id}
        """
    )
    found = await client.post("/webhooks/listed", data=b'{"events": [{"id": "a"}, {"id": "b"}]}')
    assert found.status == 200 and found.headers["X-Sidecar-Event-Id"] == "b"
    short = await client.post("/webhooks/listed", data=b'{"events": [{"id": "a"}]}')
    assert short.status == 400
    assert await short.json() == {
        "error": "no_event_id",
        "detail": "no usable event id from event_id: {json: events.1.id}",
    }
    assert upstream.ids() == ["b"]


async def test_ingress_json_id_that_is_a_boolean_is_no_id(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """`{json: id}` finding `true` or `false` has no event id (400), not the id "True" that every such body shares
    (each later one answered as its duplicate, never delivered)."""
    client = await sidecar_factory(
        """
        - name: flagged
          path: /webhooks/flagged
          provider: none
          event_id: {json: id}
        """
    )
    for flag in (b"true", b"false"):
        resp = await client.post("/webhooks/flagged", data=b'{"id": %s, "n": 1}' % flag)
        assert resp.status == 400 and (await resp.json())["error"] == "no_event_id"
    assert upstream.received == [] and stored_keys(rdb) == []


ANSWER_ROUTES = f"""
- name: quick
  path: /webhooks/quick
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  answer_within: 200ms
- name: slack
  path: /webhooks/slack
  provider: slack
  secrets: ["slack-signing-secret"]
- name: always202
  path: /webhooks/always202
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  answer_within: 0s
- name: patient
  path: /webhooks/patient
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  answer_within: 1500ms
"""


async def _state(
    rdb: redis.Redis, route: str, event_id: str, want: bytes, timeout: float = 3.0
) -> bytes | None:
    deadline = time.monotonic() + timeout
    while True:
        state = rdb.hget(KEYS.locate(route, event_id)[0], "st")
        if state == want or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)


async def test_ingress_answer_within_answers_202_and_the_attempt_goes_on(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    client = await sidecar_factory(ANSWER_ROUTES)
    upstream.delay = 1.5  # slower than the route's answer_within (200 ms)
    body = stripe_body("evt_aw1")
    resp = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
    assert resp.status == 202
    answer = await resp.json()
    assert answer.pop("next_attempt_at").endswith("Z")  # when the claim's lease runs out
    assert answer == {"queued": True, "event_id": "evt_aw1", "in_flight": True}
    assert rdb.hget(KEYS.locate("quick", "evt_aw1")[0], "st") == b"f"  # answered while the attempt is out
    # the provider sends again while the attempt is still on its way: a duplicate, not a second forward
    dup = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
    assert (await dup.json())["state"] == "pending"
    assert await _state(rdb, "quick", "evt_aw1", b"d") == b"d"  # the attempt went on and delivered it
    assert upstream.ids() == ["evt_aw1"]
    dup = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
    assert (await dup.json())["state"] == "delivered"


async def test_ingress_answer_within_relays_an_answer_that_came_while_the_process_was_stopped(
    sidecar_factory: Any,
) -> None:
    """The process stopped (SIGSTOP, a frozen container) past answer_within while the receiver answered in 0.3 s:
    on the resume answer_within's timer ran before the answer in the socket's buffer was read, and the provider got
    202 in_flight instead of the receiver's answer (a pause audit)."""
    from tests.test_http1 import receiver_in_another_process, this_process_stopped

    with receiver_in_another_process() as url:
        client = await sidecar_factory(
            f"""
            - name: quick
              path: /webhooks/quick
              provider: stripe
              secrets: ["{STRIPE_SECRET}"]
              upstream: {url}
              answer_within: 500ms
            """
        )
        body = stripe_body("evt_stopped")
        with this_process_stopped():
            resp = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
        assert (resp.status, await resp.read()) == (200, b"ok")


async def test_ingress_answer_within_relays_an_upstream_that_answers_in_time(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory(ANSWER_ROUTES)
    body = stripe_body("evt_aw2")
    resp = await client.post("/webhooks/patient", data=body, headers=stripe_headers(body))
    assert resp.status == 200 and resp.headers["X-Upstream"] == "yes" and await resp.json() == {"ok": True}
    # answer_within 0: always answered 202 at once, the forward made all the same
    body = stripe_body("evt_aw3")
    resp = await client.post("/webhooks/always202", data=body, headers=stripe_headers(body))
    assert resp.status == 202 and (await resp.json())["queued"] is True
    for _ in range(60):
        if "evt_aw3" in upstream.ids():
            break
        await asyncio.sleep(0.05)
    assert upstream.ids() == ["evt_aw2", "evt_aw3"]


async def test_ingress_answer_within_slow_failure_is_scheduled_for_retry(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    client = await sidecar_factory(ANSWER_ROUTES)
    upstream.delay = 0.5
    upstream.respond(503)
    body = stripe_body("evt_aw4")
    resp = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
    assert resp.status == 202 and (await resp.json())["in_flight"] is True
    # the attempt's 503 settles the event onto the retry schedule, as a 503 waited for would have
    assert await _state(rdb, "quick", "evt_aw4", b"p") == b"p"
    ev, sched, _, member = KEYS.locate("quick", "evt_aw4")
    assert rdb.zscore(sched, member) is not None and rdb.hget(ev, "n") == b"1"


async def test_ingress_answer_within_defaults_and_shutdown_waits_for_the_attempt(
    upstream: Upstream, redis_url: str, rdb: redis.Redis
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.app import RUNTIME, create_app
    from tests.conftest import make_config

    config = make_config(ANSWER_ROUTES, upstream_url=upstream.url, redis_url=redis_url)
    app = create_app(config, redis_url=redis_url, run_worker=False)
    upstream.delay = 0.5
    async with TestClient(TestServer(app)) as client:
        dispatcher = app[RUNTIME].dispatcher
        within = {r.name: dispatcher.answer_within(r) for r in config.routes}
        # Slack's own 2.5 s default is moot under this test's 2 s upstream.timeout: the attempt ends first anyway
        assert within == {"quick": 0.2, "slack": None, "always202": 0.0, "patient": 1.5}
        body = stripe_body("evt_aw5")
        resp = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
        assert resp.status == 202
    # the app has shut down: it waited for the attempt, and the event is delivered, not left to its lease
    assert rdb.hget(KEYS.locate("quick", "evt_aw5")[0], "st") == b"d"
    assert upstream.ids() == ["evt_aw5"]


def test_ingress_answer_within_provider_defaults() -> None:
    """Providers with a known deadline get it less a margin; a route's own value wins; none beyond the upstream
    timeout (the attempt ends first anyway)."""
    from sidecar.config import load_text
    from sidecar.dispatch import Dispatcher
    from sidecar.forwarder import Forwarder
    from sidecar.telemetry import Telemetry

    text = """
upstream: {url: "http://127.0.0.1:3000", timeout: 10s}
routes:
  - {name: s, path: /s, provider: slack, secrets: [x]}
  - {name: z, path: /z, provider: zoom, secrets: [x]}
  - {name: p, path: /p, provider: pagerduty, secrets: [x]}
  - {name: t, path: /t, provider: stripe, secrets: [x]}
  - {name: o, path: /o, provider: slack, secrets: [x], answer_within: 1s}
  - {name: l, path: /l, provider: stripe, secrets: [x], answer_within: 12s}
  - {name: sh, path: /sh, provider: shopify, secrets: [x]}
  - {name: sq, path: /sq, provider: square, secrets: [x], public_url: "https://example.com/sq"}
  - {name: g, path: /g, provider: github, secrets: [x]}
  - {name: hs, path: /hs, provider: hubspot, secrets: [x], public_url: "https://example.com/hs"}
"""
    config = load_text(text, source="<t>", env={})
    # only the config and the forwarder's timeout (upstream.timeout as started) are read
    forwarder = Forwarder(None, config.upstream.timeout)  # type: ignore[arg-type]
    dispatcher = Dispatcher(config, None, forwarder, Telemetry())  # type: ignore[arg-type]
    within = {r.name: dispatcher.answer_within(r) for r in config.routes}
    assert within == {
        "s": 2.5,
        "z": 2.5,
        "p": 4.5,
        "t": None,
        "o": 1.0,
        "l": None,
        "sh": 4.0,
        "sq": 9.0,
        "g": 9.0,
        "hs": 1.5,
    }
    assert (
        dispatcher.answer_within(replace(config.routes[0], provider="x")) is None
    )  # its 3 s is the handshake


def hold_upstream(upstream: Upstream) -> asyncio.Event:
    """The upstream holds every request until the event returned is set."""
    gate = asyncio.Event()

    async def hold(rec: Any) -> None:
        await gate.wait()

    upstream.behaviour = hold
    return gate


def _padded(event_id: str, size: int) -> bytes:
    return json.dumps({"id": event_id, "type": "invoice.paid", "pad": "x" * size}).encode()


async def held_by_upstream(
    client: Any, upstream: Upstream, event_id: str
) -> tuple[bytes, Any, asyncio.Event]:
    """Post a 60 KB event the upstream holds, its body held against the in-flight budget meanwhile: the body, the
    post (a future) and the gate that lets the upstream answer."""
    gate = hold_upstream(upstream)
    body = _padded(event_id, 60_000)
    held = asyncio.ensure_future(client.post("/webhooks/stripe", data=body, headers=stripe_headers(body)))
    await asyncio.wait_for(upstream.arrived.wait(), 10)
    return body, held, gate


async def test_ingress_bodies_over_the_inflight_budget_are_503_overloaded(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """An audit: 500 concurrent 1 MiB uploads took the sidecar to 930 MB, nothing bounding what it held. Past
    `server.max_inflight_bytes` a body is refused 503 `overloaded` (unclaimed: the provider sends it again), by the
    front (a Content-Length) and by aiohttp's path (chunked) alike, and the budget is given back once answered."""
    from sidecar.app import RUNTIME

    client = await sidecar_factory(ROUTES, server="max_inflight_bytes: 100000")
    ingress = client.server.app[RUNTIME].ingress
    first, held, gate = await held_by_upstream(client, upstream, "evt_big1")
    assert ingress.inflight_bytes == len(first)

    second = _padded("evt_big2", 60_000)
    resp = await client.post("/webhooks/stripe", data=second, headers=stripe_headers(second))
    assert resp.status == 503
    assert await resp.json() == {"error": "overloaded"}
    assert resp.headers["Retry-After"] == "5"

    async def chunks() -> Any:
        for start in range(0, len(second), 10_000):
            yield second[start : start + 10_000]

    resp = await client.post("/webhooks/stripe", data=chunks(), headers=stripe_headers(second))
    assert resp.status == 503
    assert await resp.json() == {"error": "overloaded"}
    small = stripe_body("evt_small")  # fits beside the held one
    upstream.behaviour = None
    resp = await client.post("/webhooks/stripe", data=small, headers=stripe_headers(small))
    assert resp.status == 200

    gate.set()
    assert (await asyncio.wait_for(held, 10)).status == 200
    resp = await client.post("/webhooks/stripe", data=second, headers=stripe_headers(second))
    assert resp.status == 200  # the budget was given back
    assert upstream.ids() == ["evt_big1", "evt_small", "evt_big2"]
    assert ingress.inflight_bytes == 0
    assert ingress.tel.requests[("stripe", "overloaded")] == 2


async def test_ingress_a_connection_lost_mid_body_gives_its_budget_back(sidecar_factory: Any) -> None:
    from sidecar.app import RUNTIME

    client = await sidecar_factory(ROUTES, server="max_inflight_bytes: 100000")
    ingress = client.server.app[RUNTIME].ingress
    body = _padded("evt_cut", 60_000)
    head = (
        f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in stripe_headers(body).items())
        + "\r\n"
    ).encode()
    _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head + body[:1000])
    await writer.drain()
    for _ in range(100):
        if ingress.inflight_bytes:
            break
        await asyncio.sleep(0.02)
    assert ingress.inflight_bytes == 1000  # what arrived, not the Content-Length
    writer.close()
    for _ in range(100):
        if not ingress.inflight_bytes:
            break
        await asyncio.sleep(0.02)
    assert ingress.inflight_bytes == 0


async def test_ingress_heads_without_bodies_hold_no_budget(sidecar_factory: Any, upstream: Upstream) -> None:
    """A review: the budget was taken from the announced Content-Length at the head, so 64 heads announcing 1 MiB
    (6 KB sent in all) held it for read_timeout and real deliveries got 503. It counts bytes as they arrive."""
    from sidecar.app import RUNTIME

    client = await sidecar_factory(ROUTES, server="max_inflight_bytes: 100000")
    ingress = client.server.app[RUNTIME].ingress
    head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    writers = []
    for _ in range(10):  # 600,000 bytes announced against a 100,000-byte budget
        _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(head)
        await writer.drain()
        writers.append(writer)
    try:
        await asyncio.sleep(0.2)
        assert ingress.inflight_bytes == 0
        body = stripe_body("evt_real")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 200
    finally:
        for writer in writers:
            writer.close()


async def test_ingress_a_first_attempt_going_on_after_its_202_keeps_its_budget(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A review: a route with answer_within (GitHub, Square, Slack, ... by default) answers 202 while the first
    attempt goes on with the body; the budget came back at the answer, so 30 such bodies of 60 KB were held
    against a 200,000-byte budget and nothing was refused. The attempt's body now counts until it ends."""
    from sidecar.app import RUNTIME

    routes = (
        ROUTES
        + '- {name: quick, path: /webhooks/quick, provider: stripe, secrets: ["whsec_test_secret"], answer_within: 0s}\n'
    )
    client = await sidecar_factory(routes, server="max_inflight_bytes: 200000")
    ingress = client.server.app[RUNTIME].ingress
    gate = hold_upstream(upstream)
    statuses = []
    for i in range(6):
        body = _padded(f"evt_late_{i}", 60_000)
        resp = await client.post("/webhooks/quick", data=body, headers=stripe_headers(body))
        statuses.append(resp.status)
    assert statuses[:3] == [202, 202, 202] and set(statuses[3:]) == {503}, statuses
    assert 180_000 <= ingress.inflight_bytes <= 200_000
    gate.set()
    for _ in range(200):
        if not ingress.late:
            break
        await asyncio.sleep(0.02)
    assert not ingress.late and ingress.inflight_bytes == 0
