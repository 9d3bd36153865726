"""What the upstream receives and what the provider gets back, on the edges an external check met: pass-through
requests keep their target and headers as sent, an ingress's X-Forwarded-Proto/Host reach the receiver, a 2xx with
a body too large to relay is still a delivery, a route's own upstream query keeps the request's, an upstream URL
with credentials is refused at load, and an event whose connection came too late is not sent but retried."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

import pytest

from sidecar.app import RUNTIME, create_app
from sidecar.config import load_text
from sidecar.errors import ConfigError
from sidecar.http1 import MAX_RESPONSE_BYTES
from sidecar.routes import target_url
from tests.conftest import FrontTestServer, Received, Upstream, make_config
from tests.test_front import exchange
from tests.test_ingress import ROUTES, STRIPE_SECRET, stripe_body, stripe_headers
from tests.test_worker import drain


@pytest.fixture
async def client(sidecar_factory: Any) -> Any:
    return await sidecar_factory(ROUTES)


async def test_pass_through_keeps_the_target_and_headers_as_sent(client: Any, upstream: Upstream) -> None:
    """A non-POST on a route path is passed through untouched (CONTRACT): aiohttp's client re-encoded the query
    (`%2F` → `/`, `%7E` → `~`, `[` → `%5B`) and added `Accept: */*` and `Content-Length: 0`."""
    target = "/webhooks/stripe?x=%2F&y=%20&z=a+b&w=%7E&u=%e2%82%ac&q=a%2Fb%3F%23c&b=[]"
    raw = f"GET {target} HTTP/1.1\r\nHost: hooks.example.com\r\nX-Custom: kept\r\nConnection: close\r\n\r\n"
    status, _, _ = await exchange(client, raw.encode())
    assert status == 200
    [got] = upstream.received
    assert (got.method, got.raw_path) == ("GET", target)
    assert "accept" not in got.headers and "content-length" not in got.headers
    assert got.headers["x-custom"] == "kept"


async def test_an_ingress_forwarded_proto_and_host_reach_the_receiver(
    client: Any, upstream: Upstream
) -> None:
    """Behind a TLS ingress the receiver saw `X-Forwarded-Proto: https` and the public host, and a receiver that
    checks a URL signature (Twilio, HubSpot) rebuilds the URL from them: the sidecar used to put its own `http`
    and Host in their place."""
    body = stripe_body("evt_xf")
    headers = {
        **stripe_headers(body),
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "hooks.example.com",
        "X-Forwarded-For": "203.0.113.7",
    }
    assert (await client.post("/webhooks/stripe", data=body, headers=headers)).status == 200
    [got] = upstream.received
    assert got.headers["x-forwarded-proto"] == "https"
    assert got.headers["x-forwarded-host"] == "hooks.example.com"
    assert got.headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"  # appended to, as before
    assert [k for k, _ in got.raw_headers if k.lower() == "x-forwarded-proto"] == ["X-Forwarded-Proto"]


async def test_a_2xx_with_a_body_too_large_to_relay_is_a_delivery(client: Any, upstream: Upstream) -> None:
    """The receiver took the event and said 200; only its answer's body is over the relay limit. It used to count
    as a failure: the event was delivered again on every retry and dead-lettered in the end."""
    upstream.respond(200, headers={"X-Receiver": "took-it"}, body=b"x" * (MAX_RESPONSE_BYTES + 1))
    body = stripe_body("evt_big_answer")
    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert resp.status == 200 and resp.headers["X-Receiver"] == "took-it"
    assert await resp.read() == b""
    again = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert (await again.json())["duplicate"] is True and (await again.json())["state"] == "delivered"
    assert upstream.ids() == ["evt_big_answer"]


async def test_a_pass_through_answer_too_large_is_refused_not_buffered(
    client: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-POST pass-through read the upstream's whole answer into memory, however large (an upstream audit);
    it is now bounded as the POST client bounds it, and the caller is told why, the log line how large."""
    upstream.respond(200, body=b"x" * (MAX_RESPONSE_BYTES + 1))
    with caplog.at_level(logging.INFO, logger="sidecar"):
        resp = await client.get("/webhooks/stripe?big=1")
    assert resp.status == 502
    assert await resp.json() == {"error": "upstream_unavailable", "detail": "response_too_large"}
    [line] = [r for r in caplog.records if r.getMessage() == "request" and r.__dict__.get("status") == 502]
    assert line.__dict__["error"] == "response_too_large"
    assert line.__dict__["detail"] == f"response body over {MAX_RESPONSE_BYTES} bytes"
    upstream.respond(200, body=b"y" * 1000)  # under the bound: relayed whole, as before
    resp = await client.get("/webhooks/stripe?small=1")
    assert resp.status == 200 and await resp.read() == b"y" * 1000


async def test_an_event_whose_connection_comes_too_late_is_not_sent_and_is_retried(
    aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: Any
) -> None:
    """`max_connections: 1` and a receiver holding the one connection: the audit saw such an event written with
    45 ms of its timeout left, recorded as a timeout and delivered twice. It is not sent now: the provider has its
    202 (first attempt past `answer_within`), and the event goes back, its attempt number returned, as often as no
    connection comes in time (no attempt of the event's, no failure of the receiver's: its breaker stays closed);
    once the connection is free it is delivered once, as attempt 1."""
    routes = f"""
    - name: stripe
      path: /webhooks/stripe
      provider: stripe
      secrets: ["{STRIPE_SECRET}"]
      answer_within: 300ms
    """
    retry = "{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0}"
    config = make_config(routes, upstream_url=upstream.url, redis_url=redis_url, retry=retry)
    config = replace(config, upstream=replace(config.upstream, timeout=1.0, max_connections=1))
    client = await aiohttp_client(FrontTestServer(create_app(config, redis_url=redis_url, run_worker=False)))
    runtime = client.server.app[RUNTIME]
    gate = asyncio.Event()

    async def held(rec: Received) -> None:
        if rec.body == b"hold":
            await asyncio.wait_for(gate.wait(), 5.0)

    async def given_back() -> dict[str, Any]:
        """The event once it is pending again (given back unattempted), or as it is after 3 s."""
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.0
        while (event := await runtime.store.get_event("stripe", "evt_late"))["raw_state"] != "p":
            if loop.time() > until:
                break
            await asyncio.sleep(0.02)
        return event

    upstream.behaviour = held
    http1 = runtime.dispatcher.forwarder._http1
    holder = asyncio.create_task(http1.post(upstream.url + "/hold", [], b"hold", 10.0))
    try:
        await asyncio.wait_for(upstream.arrived.wait(), 2.0)  # the one connection is taken
        body = stripe_body("evt_late")
        resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 202 and (await resp.json())["in_flight"] is True
        event = await given_back()
        assert (event["raw_state"], event["attempts"], event["history"]) == ("p", 0, [])
        await rdb_due_now(rdb, runtime, event)  # due again at once (it waits a second), still held:
        await asyncio.wait_for(runtime.worker.run_once(), 3.0)  # the worker's attempt is not sent either
        event = await given_back()
        assert (event["raw_state"], event["attempts"], event["history"]) == ("p", 0, [])
        assert upstream.ids() == [""]  # the holder alone
        assert runtime.dispatcher.breakers.for_url(upstream.url + "/webhooks/stripe").state == "closed"
    finally:
        gate.set()
    assert (await asyncio.wait_for(holder, 2.0)).status == 200
    await rdb_due_now(rdb, runtime, await runtime.store.get_event("stripe", "evt_late"))
    await drain(client, want=2, upstream=upstream)
    assert upstream.ids() == ["", "evt_late"]
    assert upstream.received[1].headers["x-sidecar-attempt"] == "1"
    event = await runtime.store.get_event("stripe", "evt_late")
    assert event["state"] == "delivered" and [h["status"] for h in event["history"]] == [200]
    assert runtime.telemetry.forward_attempts[("stripe", "retryable")] == 0  # nothing was sent: no forward


async def rdb_due_now(rdb: Any, runtime: Any, event: dict[str, Any]) -> None:
    """Make a pending event due now (instead of waiting out its due time)."""
    keys = runtime.store.keys
    member = f"stripe:{event['dedupe_id']}"
    rdb.zadd(keys.schedule(keys.shard_of("stripe", event["dedupe_id"])), {member: 0})


def _config(route_upstream: str | None = None, base: str = "http://127.0.0.1:3000/base") -> Any:
    own = "" if route_upstream is None else f", upstream: {json.dumps(route_upstream)}"
    text = f"""
upstream: {{url: "{base}"}}
routes:
  - {{name: r, path: /in, provider: none{own}}}
"""
    return load_text(text, source="<t>", env={})


@pytest.mark.parametrize(
    ("route_upstream", "path_qs", "expected"),
    [
        ("http://127.0.0.1:4000/hook", "/in?a=1&b=%20", "http://127.0.0.1:4000/hook?a=1&b=%20"),
        ("http://127.0.0.1:4000/hook?tenant=7", "/in?a=1", "http://127.0.0.1:4000/hook?tenant=7&a=1"),
        ("http://127.0.0.1:4000/hook?tenant=7", "/in", "http://127.0.0.1:4000/hook?tenant=7"),
        ("http://127.0.0.1:4000/hook?", "/in?a=1", "http://127.0.0.1:4000/hook?a=1"),
    ],
)
def test_a_route_upstream_keeps_the_request_query_after_its_own(
    route_upstream: str, path_qs: str, expected: str
) -> None:
    config = _config(route_upstream)
    assert target_url(config, config.routes[0], path_qs) == expected


@pytest.mark.parametrize(
    ("base", "path_qs", "expected"),
    [
        ("http://127.0.0.1:3000/base?k=v", "/in?a=1", "http://127.0.0.1:3000/base/in?k=v&a=1"),
        ("http://127.0.0.1:3000/base?k=v", "/in", "http://127.0.0.1:3000/base/in?k=v"),
        ("http://127.0.0.1:3000/?k=v", "/in?a=1", "http://127.0.0.1:3000/in?k=v&a=1"),
        ("http://127.0.0.1:3000/base/", "/in?a=1", "http://127.0.0.1:3000/base/in?a=1"),
    ],
)
def test_upstream_url_with_a_query_gets_the_request_path_on_its_path(
    base: str, path_qs: str, expected: str
) -> None:
    """An audit: `upstream.url` with a query (check-config said OK) sent `/base?k=v/in?a=1`, the request's path
    inside the query. The path joins the path, the request's query follows the URL's own."""
    config = _config(base=base)
    assert target_url(config, config.routes[0], path_qs) == expected


@pytest.mark.parametrize("base", ["http://127.0.0.1:3000/base", "http://127.0.0.1:3000/base?k=v"])
def test_an_absolute_form_target_without_a_path_asks_for_the_root(base: str) -> None:
    """RFC 9112 §3.2.2/RFC 3986 §6.2.3: `POST http://elsewhere?a=1` has the empty path, which is `/`: it is
    forwarded as `/?a=1` would be."""
    config = _config(base=base)
    route = config.routes[0]
    assert target_url(config, route, "http://elsewhere.test?a=1") == target_url(config, route, "/?a=1")
    assert target_url(config, route, "http://elsewhere.test") == target_url(config, route, "/")


@pytest.mark.parametrize("key", ["upstream.url", "routes[0].upstream"])
def test_an_upstream_url_with_credentials_is_refused_at_load(key: str) -> None:
    """POSTs went without them and pass-through requests with them (a 500 when the request had its own
    Authorization): refused, named, instead."""
    creds = "http://user:p%40ss@127.0.0.1:3000/ui"
    url, route = (
        (creds, "")
        if key == "upstream.url"
        else ("http://127.0.0.1:3000", f", upstream: {json.dumps(creds)}")
    )
    text = f'upstream: {{url: "{url}"}}\nroutes:\n  - {{name: r, path: /in, provider: none{route}}}\n'
    with pytest.raises(ConfigError, match=r"user:password@ in an upstream URL is not supported") as err:
        load_text(text, source="<t>", env={})
    assert "p%40ss" not in str(err.value)


def test_a_public_url_with_credentials_is_still_accepted() -> None:
    """`public_url` is only what the provider signed (never sent anywhere): its user info is the provider's."""
    text = (
        'upstream: {url: "http://127.0.0.1:3000"}\nroutes:\n  - {name: t, path: /t, provider: twilio, '
        'secrets: [x], public_url: "https://user:pw@hooks.example.com/t"}\n'
    )
    assert load_text(text, source="<t>", env={}).routes[0].public_url == "https://user:pw@hooks.example.com/t"


def test_forwarding_tracestate_goes_only_with_the_trace_it_belongs_to() -> None:
    """W3C Trace Context 3.3: `tracestate` belongs to its `traceparent`. The first attempt continues the provider's
    trace (a child of the inbound span) and keeps it; a retry is a trace of its own (linked, not a child), so the
    provider's `tracestate` must not ride along with another trace id (an audit: attempt 2 carried it)."""
    from sidecar.forwarder import upstream_headers
    from sidecar.store.records import EventRecord

    inbound = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    rec = EventRecord(
        "stripe",
        "evt_ts",
        "evt_ts",
        "POST",
        "/webhooks/stripe",
        (("Content-Type", "application/json"), ("tracestate", "congo=t61rcWkgMzE")),
        b"{}",
        traceparent=inbound,
    )
    child = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
    first = dict(upstream_headers(rec, 1, child))
    assert first["traceparent"] == child and first["tracestate"] == "congo=t61rcWkgMzE"
    retry = "00-0af7651916cd43dd8448eb211c80319c-b9c7c989f97918e1-01"
    later = dict(upstream_headers(rec, 2, retry))
    assert later["traceparent"] == retry and "tracestate" not in later
    assert "tracestate" not in dict(upstream_headers(rec, 2, None))


async def test_a_store_written_with_another_shard_count_is_refused_at_start(
    upstream: Upstream, redis_url: str, rdb: Any
) -> None:
    """`redis.shards` changed between two runs on one store: an event's keys are placed by its shard, so the
    queued retries of the old count were never found (108 of 140 stranded in an e2e audit) and resends of delivered
    events were claimed and delivered again, with no line said. The first run records its count; another refuses to
    start, naming both. The same count starts as before."""
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.errors import SidecarError

    routes = "- {name: plain, path: /webhooks/plain, provider: none, event_id: {header: X-Id}}"
    config = make_config(routes, upstream_url=upstream.url, redis_url=redis_url)
    async with TestClient(TestServer(create_app(config, redis_url=redis_url, run_worker=False))):
        pass
    assert rdb.get("sidecar:{meta}:shards") == b"4"
    other = replace(config, redis=replace(config.redis, shards=16))
    refused = TestClient(TestServer(create_app(other, redis_url=redis_url, run_worker=False)))
    try:
        with pytest.raises(SidecarError) as err:
            await refused.start_server()
    finally:
        await refused.close()  # its client session, opened before the server failed to start
    assert "redis.shards is 16 but the store's events were written with 4 shards" in str(err.value)
    assert "sidecar:{meta}:shards" in str(err.value)
    async with TestClient(TestServer(create_app(config, redis_url=redis_url, run_worker=False))):
        pass


async def test_a_store_refusing_every_write_is_logged_once_with_a_count_not_per_request(
    own_valkey: Any, aiohttp_client: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that refuses writes for one cause (MISCONF with its disk full; here NOREPLICAS) logged an ERROR line
    per refused request (2,194 in 12 s in an e2e audit): now once, then at most every 30 s with a count."""
    import redis as sync_redis

    from tests.conftest import FrontTestServer

    url = str(own_valkey.connection_url)
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=url)
    client = await aiohttp_client(FrontTestServer(create_app(config, redis_url=url, run_worker=False)))
    with sync_redis.Redis(host="127.0.0.1", port=own_valkey.port) as admin:
        admin.config_set("min-replicas-to-write", 1)  # every write refused: NOREPLICAS
        try:
            with caplog.at_level(logging.ERROR, logger="sidecar"):
                statuses = []
                for i in range(5):
                    body = stripe_body(f"evt_refused_{i}")
                    resp = await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
                    statuses.append(resp.status)
        finally:
            admin.config_set("min-replicas-to-write", 0)
    assert statuses == [503] * 5
    said = [r.getMessage() for r in caplog.records if "store failed a call" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 request(s) refused (503)") and "NOREPLICAS" in said[0], (
        said
    )
    # and when it is over, once, with the refusals not said yet (a review: they were lumped into the next episode)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidecar"):
        for i in range(2):
            body = stripe_body(f"evt_after_{i}")
            assert (
                await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
            ).status == 200
    over = [r.getMessage() for r in caplog.records if "succeed again" in r.getMessage()]
    assert over == ["store calls succeed again (4 more request(s) refused since the last report)"], over


async def test_a_full_store_written_with_another_shard_count_is_refused_at_start(
    upstream: Upstream, own_valkey: Any
) -> None:
    """A store at its maxmemory (noeviction) refuses the SET of the shard check, not its GET: the check was skipped
    with a warning and the sidecar ran with the other count for good (resends of delivered events delivered again
    once the store had room)."""
    import redis as sync_redis
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.errors import SidecarError

    url = str(own_valkey.connection_url)
    routes = "- {name: plain, path: /webhooks/plain, provider: none, event_id: {header: X-Id}}"
    config = make_config(routes, upstream_url=upstream.url, redis_url=url)
    async with TestClient(TestServer(create_app(config, redis_url=url, run_worker=False))):
        pass
    other = replace(config, redis=replace(config.redis, shards=16))
    with sync_redis.Redis(host="127.0.0.1", port=own_valkey.port) as admin:
        admin.config_set("maxmemory", 1)  # full: every write refused OOM
        refused = TestClient(TestServer(create_app(other, redis_url=url, run_worker=False)))
        try:
            with pytest.raises(
                SidecarError, match=r"redis\.shards is 16 but the store's events were written with 4"
            ):
                await refused.start_server()
        finally:
            await refused.close()  # its client session, opened before the server failed to start
            admin.config_set("maxmemory", 0)
