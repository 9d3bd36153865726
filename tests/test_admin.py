"""The admin API against a real Valkey and a real upstream: auth, the dead-letter list (paging, filters, replay,
drain, delete), events, stats, the OpenAPI document, and a property run that never sees a 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import redis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.admin import AdminApi, create_admin_app
from sidecar.admin_spec import SCHEMAS, document
from sidecar.app import RUNTIME, create_app
from sidecar.config import AdminConfig
from sidecar.keys import KeySpace
from sidecar.store import AttemptRecord, EventRecord, RedisStore
from sidecar.store.dead_letters import DeadLetters
from tests.conftest import JsonErrorTestServer, Upstream, make_config
from tests.procs import dribbling, free_port
from tests.test_ingress import GITHUB_SECRET, STRIPE_SECRET, github_headers, stripe_body, stripe_headers

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYS = KeySpace("sidecar", 4)
FAST = "{base_delay: 100ms, multiplier: 1, max_delay: 1s, jitter: 0}"
ROUTES = f"""
- name: stripe
  path: /webhooks/stripe
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  retry: {{max_attempts: 2}}
- name: stripe2
  path: /webhooks/stripe2
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
- name: github
  path: /webhooks/github
  provider: github
  secrets: ["{GITHUB_SECRET}"]
"""
SEED_HEADERS = (("Content-Type", "application/json"), ("Stripe-Signature", "t=1,v1=ab"))


@dataclass
class Admin:
    main: Any  # test client of the inbound app
    http: Any  # test client of the admin app

    @property
    def store(self) -> RedisStore:
        return self.main.server.app[RUNTIME].store

    @property
    def worker(self) -> Any:
        return self.main.server.app[RUNTIME].worker

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.http.get(path, headers=AUTH, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return await self.http.post(path, json=body, headers=AUTH, **kw)

    async def delete(self, path: str, **kw: Any) -> Any:
        return await self.http.delete(path, headers=AUTH, **kw)


@pytest.fixture
async def admin(sidecar_factory: Any, aiohttp_client: Any) -> Admin:
    main = await sidecar_factory(ROUTES, retry=FAST)
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    return Admin(main, http)


async def bury_many(
    store: RedisStore,
    n: int,
    *,
    route: str = "stripe",
    prefix: str = "evt",
    status: int | None = 503,
    error: str | None = None,
    dead_ms: int | None = None,
    same_ms: int = 1,
    body: bytes | None = None,
    seen_ms: int | None = None,
) -> list[str]:
    """Dead letters the fast way: claim + bury through the store, as the dispatcher does. `same_ms` items share
    each dead_at millisecond (ties are ordered by id)."""
    base = dead_ms or int(time.time() * 1000) - 60_000
    seen = base - 5_000 if seen_ms is None else seen_ms

    async def one(i: int) -> str:
        eid = f"{prefix}_{i:05d}"
        rec = EventRecord(
            route, eid, eid, "POST", f"/webhooks/{route}", SEED_HEADERS, body or stripe_body(eid),
            first_seen_ms=seen,
        )  # fmt: skip
        await store.claim(rec, seen, 30_000)
        entry = AttemptRecord(base - 4_000, 1, status, error, 5.0)
        item_id, _ = await store.bury(rec, 1, entry, [], base + i // same_ms, "rejected")
        return item_id

    ids: list[str] = []
    for start in range(0, n, 200):
        ids += await asyncio.gather(*(one(i) for i in range(start, min(start + 200, n))))
    return ids


async def deliver(admin: Admin, upstream: Upstream, want: int, until: float = 10.0) -> None:
    """Drive the retry worker (bounded) until the upstream has `want` requests."""
    deadline = time.monotonic() + until
    while time.monotonic() < deadline and len(upstream.received) < want:
        await admin.worker.run_once()
        await asyncio.sleep(0.01)


async def dead_via_ingress(admin: Admin, upstream: Upstream, event_id: str, route: str = "stripe") -> str:
    """A real dead letter: the upstream answers 400 (permanent) to the ingress's first attempt."""
    upstream.respond(400)
    body = stripe_body(event_id)
    resp = await admin.main.post(f"/webhooks/{route}", data=body, headers=stripe_headers(body))
    assert (await resp.json())["dead_lettered"] is True
    [item] = (await (await admin.get(f"/admin/dlq?route={route}")).json())["items"][-1:]
    assert item["event_id"] == event_id
    return str(item["id"])


# -- auth, health, errors ---------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/admin/dlq"),
    ("GET", "/admin/dlq/abc"),
    ("DELETE", "/admin/dlq/abc"),
    ("POST", "/admin/dlq/replay"),
    ("POST", "/admin/dlq/drain"),
    ("GET", "/admin/events/stripe/evt_1"),
    ("DELETE", "/admin/events/stripe/evt_1"),
    ("GET", "/admin/stats"),
    ("GET", "/admin/openapi.json"),
    ("GET", "/admin/nonexistent"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
async def test_admin_auth_401_without_or_with_wrong_token(
    admin: Admin, rdb: redis.Redis, method: str, path: str, headers: dict[str, str]
) -> None:
    await bury_many(admin.store, 1)
    resp = await admin.http.request(method, path, headers=headers, json={"all": True})
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthorized"
    assert rdb.zcard(KEYS.dlq_items()) == 1  # nothing was replayed, drained or deleted


async def test_admin_auth_refusals_are_logged_once_then_counted(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong token is a warning naming the call and the client; a flood of them is one line, not one each.
    Before, a 401 left no trace in the sidecar's log."""
    with caplog.at_level(logging.INFO, logger="sidecar.admin"):
        for _ in range(5):
            resp = await admin.http.get("/admin/stats", headers={"Authorization": "Bearer guess-7f3c"})
            assert resp.status == 401
        assert (await admin.get("/admin/stats")).status == 200
    [line] = [r for r in caplog.records if "refused 401" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.__dict__["client"] == "127.0.0.1"
    assert "GET '/admin/stats'" in line.getMessage() and "wrong bearer token" in line.getMessage()
    assert "guess-7f3c" not in line.getMessage()  # what was given is not logged: it may be a near-miss token


async def test_admin_auth_header_that_is_not_utf8_is_401_not_500(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    for value in (b"Bearer \xff", b"Bearer " + TOKEN.encode() + b"\xff", b"\xff " + TOKEN.encode()):
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.http.port)
        writer.write(
            b"GET /admin/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: %s\r\n\r\n" % value
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), (value, answer[:200])
        assert b'"unauthorized"' in answer
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("path", ["/admin/dlq/replay", "/admin/dlq/drain"])
async def test_admin_body_dribble_gets_408_after_read_timeout_and_is_closed(
    sidecar_factory: Any, aiohttp_client: Any, path: str
) -> None:
    main = await sidecar_factory(ROUTES, retry=FAST, server="read_timeout: 1s")
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    started = time.monotonic()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n".encode())
    writer.write(f"Authorization: Bearer {TOKEN}\r\n\r\n{{".encode())
    async with dribbling(writer, b" "):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 6)
        answered = time.monotonic() - started
        rest = await asyncio.wait_for(reader.read(), 5)  # the JSON body, then the close
        closed = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 408 ") and b'"read_timeout"' in rest
    assert answered < 3 and closed - answered < 3.5, (answered, closed)


async def test_admin_malformed_chunk_is_a_400_at_once_not_a_408(
    sidecar_factory: Any, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked body whose second chunk size is not hex: llhttp's error went into a 400 queued for after the
    handler, which waited for the rest of the body until read_timeout and answered 408."""
    main = await sidecar_factory(ROUTES, retry=FAST, server="read_timeout: 5s")
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    await bury_many(main.server.app[RUNTIME].store, 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    head = "POST /admin/dlq/replay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    writer.write(f"{head}Authorization: Bearer {TOKEN}\r\n\r\n2\r\n{{}}\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler is reading the body
    writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
    try:
        answer = await asyncio.wait_for(reader.read(), 4)  # the answer, then the close
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1, answer
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body == {"error": "bad_request", "detail": "malformed body framing (a chunk size or chunk end)"}
    assert await DeadLetters(main.server.app[RUNTIME].store).count() == 1  # nothing replayed
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_admin_closed_when_no_token_configured(
    aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: redis.Redis
) -> None:
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=redis_url)
    config = dataclasses.replace(config, admin=AdminConfig("127.0.0.1:0"))
    main = await aiohttp_client(create_app(config, redis_url=redis_url, run_worker=False))
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    resp = await http.get("/admin/stats", headers={"Authorization": "Bearer "})
    assert resp.status == 401
    assert "not configured" in (await resp.json())["detail"]


async def test_admin_health_ready_metrics_need_no_token(admin: Admin) -> None:
    assert (await admin.http.get("/healthz")).status == 200
    ready = await admin.http.get("/readyz")
    assert ready.status == 200 and (await ready.json()) == {"ready": True}
    assert (await admin.http.get("/metrics")).status == 200


async def test_admin_errors_are_json_for_unknown_paths_and_methods(admin: Admin) -> None:
    for resp, status, error in [
        (await admin.get("/admin/nope"), 404, "not_found"),
        (await admin.http.get("/nope"), 404, "not_found"),
        (await admin.http.put("/admin/dlq", headers=AUTH), 405, "method_not_allowed"),
        (await admin.post("/admin/dlq/replay", data=b"{not json"), 400, "bad_request"),
        (await admin.post("/admin/dlq/replay", data=io.BytesIO(b"x" * (2 << 20))), 413, "body_too_large"),
        # the POST-only actions are not dead letter ids
        (await admin.get("/admin/dlq/replay"), 405, "method_not_allowed"),
        (await admin.get("/admin/dlq/drain"), 405, "method_not_allowed"),
        (await admin.delete("/admin/dlq/drain"), 405, "method_not_allowed"),
        (await admin.get("/admin/dlq/replayx"), 404, "not_found"),
    ]:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"] == error
        if status == 405:
            assert resp.headers["Allow"] == ("GET" if resp.url.path == "/admin/dlq" else "POST")


async def test_admin_events_on_a_route_not_configured_says_so(admin: Admin) -> None:
    unknown = await admin.get("/admin/events/stripee/evt_1")
    assert unknown.status == 404
    assert "no route 'stripee' is configured" in (await unknown.json())["detail"]
    known = await admin.get("/admin/events/stripe/evt_1")
    assert known.status == 404 and "never seen" in (await known.json())["detail"]


# -- listing and paging -----------------------------------------------------------------------------------------


async def test_admin_dlq_list_items_have_contract_fields(admin: Admin, upstream: Upstream) -> None:
    item_id = await dead_via_ingress(admin, upstream, "evt_fields")
    page = await (await admin.get("/admin/dlq")).json()
    assert page["total"] == 1 and page["next_cursor"] is None
    [item] = page["items"]
    assert item["id"] == item_id
    assert item["route"] == "stripe" and item["event_id"] == "evt_fields"
    assert item["attempts"] == 1 and item["last_status"] == 400 and item["last_error"] is None
    assert item["reason"] == "rejected"
    rfc3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(rfc3339, item["first_seen_at"]) and re.fullmatch(rfc3339, item["dead_at"])
    assert item["first_seen_at"] <= item["dead_at"]


async def test_admin_dlq_list_1000_items_pages_of_100_each_seen_once(admin: Admin) -> None:
    ids = await bury_many(admin.store, 1000, same_ms=7)  # ties on dead_at: ordered by id
    seen: list[str] = []
    cursor = None
    for _ in range(20):  # bounded: 10 pages expected
        query = "limit=100" + (f"&cursor={cursor}" if cursor else "")
        page = await (await admin.get(f"/admin/dlq?{query}")).json()
        assert page["total"] == 1000
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 1000 and set(seen) == set(ids)
    assert cursor is None


async def test_admin_dlq_list_a_last_page_exactly_full_has_no_next_cursor(admin: Admin) -> None:
    """`next_cursor` only when items follow the page (dlq_page.lua's `more`): a DLQ of exactly `limit` items is
    one page, not one page and a cursor to an empty one."""
    await bury_many(admin.store, 10)
    whole = await (await admin.get("/admin/dlq?limit=10")).json()
    assert whole["total"] == 10 and len(whole["items"]) == 10 and whole["next_cursor"] is None
    first = await (await admin.get("/admin/dlq?limit=5")).json()
    assert len(first["items"]) == 5 and first["next_cursor"] is not None
    rest = await (await admin.get(f"/admin/dlq?limit=5&cursor={first['next_cursor']}")).json()
    assert len(rest["items"]) == 5 and rest["next_cursor"] is None


async def test_admin_dlq_list_cursor_stays_valid_while_items_come_and_go(admin: Admin) -> None:
    base = int(time.time() * 1000) - 60_000
    await bury_many(admin.store, 30, dead_ms=base, same_ms=3)
    first = await (await admin.get("/admin/dlq?limit=10")).json()
    seen = [i["id"] for i in first["items"]]
    # The page's last item and an unseen one are removed, and new items arrive later than all.
    assert (await admin.delete(f"/admin/dlq/{seen[-1]}")).status == 200
    rest = await (await admin.get(f"/admin/dlq?limit=30&cursor={first['next_cursor']}")).json()
    unseen_victim = rest["items"][5]["id"]
    assert (await admin.delete(f"/admin/dlq/{unseen_victim}")).status == 200
    await bury_many(admin.store, 5, prefix="late", dead_ms=base + 1000)
    cursor = first["next_cursor"]
    for _ in range(10):
        page = await (await admin.get(f"/admin/dlq?limit=7&cursor={cursor}")).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 30 - 1 + 5
    assert unseen_victim not in seen


async def test_admin_dlq_list_filters_route_since_until_status(admin: Admin) -> None:
    base = 1_700_000_000_000
    many = 100  # every group shares one dead_at
    await bury_many(admin.store, 4, status=503, dead_ms=base, same_ms=many)
    await bury_many(admin.store, 3, prefix="e429", status=429, dead_ms=base + 10_000, same_ms=many)
    await bury_many(
        admin.store, 2, prefix="econn", status=None, error="refused", dead_ms=base + 20_000, same_ms=many
    )
    await bury_many(
        admin.store, 5, route="stripe2", prefix="o", status=500, dead_ms=base + 30_000, same_ms=many
    )

    async def total(query: str) -> int:
        resp = await admin.get(f"/admin/dlq?{query}")
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert len(body["items"]) == body["total"]
        return int(body["total"])

    assert await total("") == 14
    assert await total("route=stripe") == 9
    assert await total("route=stripe2") == 5
    assert await total("status=503") == 4
    assert await total("status=5xx") == 9
    assert await total("status=4XX") == 3
    assert await total("status=error") == 2
    assert await total("route=stripe&status=5xx") == 4
    assert await total("since=1700000010") == 10  # epoch seconds, inclusive
    # both bounds inclusive: one moment selects what died in it, it is no "since after until"
    assert await total("since=1700000010&until=1700000010") == 3
    assert await total("since=2023-11-14T22:13:30Z&until=2023-11-14T22:13:30Z") == 3
    assert await total("since=2023-11-14T22:13:30Z&until=2023-11-14T22:13:40.000Z") == 5
    assert await total("until=2023-11-14T23:13:20%2B01:00") == 4  # an offset other than Z
    # an empty value is a parameter not given: the contract's own `?route=&limit=&cursor=` was refused 400 (a
    # conformance audit), `route=` was 404 "no route ''"
    assert await total("route=&limit=&cursor=") == 14
    assert await total("route=stripe2&limit=&cursor=&since=&until=&status=") == 5
    page = await (await admin.get("/admin/dlq?status=5xx&limit=3")).json()
    assert page["total"] == 9 and len(page["items"]) == 3 and page["next_cursor"]
    rest = await (await admin.get(f"/admin/dlq?status=5xx&limit=100&cursor={page['next_cursor']}")).json()
    assert len(rest["items"]) == 6 and rest["next_cursor"] is None
    # a page that ends exactly with the last match names no next page (a cursor to an empty page is a lie)
    exact = await (await admin.get("/admin/dlq?status=5xx&limit=9")).json()
    assert len(exact["items"]) == 9 and exact["next_cursor"] is None


async def test_admin_dlq_list_status_filter_pages_across_scan_steps(admin: Admin) -> None:
    base = int(time.time() * 1000) - 60_000
    want = set(await bury_many(admin.store, 400, prefix="a", status=503, dead_ms=base, same_ms=5))
    await bury_many(admin.store, 400, prefix="b", status=404, dead_ms=base, same_ms=5)  # interleaved by id
    seen: list[str] = []
    query = "status=5xx&limit=90"
    for _ in range(10):
        page = await (await admin.get(f"/admin/dlq?{query}")).json()
        assert page["total"] == 400
        assert all(i["last_status"] == 503 for i in page["items"])
        seen += [i["id"] for i in page["items"]]
        if page["next_cursor"] is None:
            break
        query = f"status=5xx&limit=90&cursor={page['next_cursor']}"
    assert len(seen) == 400 and set(seen) == want


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "limit=%C2%B2",
        "cursor=garbage",
        "cursor=1-XYZ",
        "since=yesterday",
        "since=2024-01-01T00:00:00",  # no offset
        "until=99999999999999",
        "since=2024-01-02T00:00:00Z&until=2024-01-01T00:00:00Z",
        "status=600",
        "status=5x",
        "colour=red",
    ],
)
async def test_admin_dlq_list_bad_filters_400(admin: Admin, query: str) -> None:
    resp = await admin.get(f"/admin/dlq?{query}")
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "bad_request" and body["detail"]


async def test_admin_dlq_list_unknown_route_404(admin: Admin) -> None:
    for route in ("nosuch", "BAD/route"):
        resp = await admin.get("/admin/dlq", params={"route": route})
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"


# -- one item ---------------------------------------------------------------------------------------------------


async def test_admin_dlq_show_item_with_headers_body_history(admin: Admin, upstream: Upstream) -> None:
    upstream.respond(503, 503)
    body = stripe_body("evt_show")
    resp = await admin.main.post("/webhooks/stripe?x=1", data=body, headers=stripe_headers(body))
    assert resp.status == 202
    await asyncio.sleep(0.15)
    await deliver(admin, upstream, 2)
    [summary] = (await (await admin.get("/admin/dlq")).json())["items"]
    item = await (await admin.get(f"/admin/dlq/{summary['id']}")).json()
    assert {k: item[k] for k in summary} == summary
    assert item["body"] == body.decode() and "body_base64" not in item
    assert item["method"] == "POST" and item["path"] == "/webhooks/stripe?x=1"
    names = [h[0].lower() for h in item["headers"]]
    assert "stripe-signature" in names and all(len(h) == 2 for h in item["headers"])
    assert [h["attempt"] for h in item["history"]] == [1, 2]
    assert [h["status"] for h in item["history"]] == [503, 503]
    assert all(h["duration_ms"] >= 0 and h["at"].endswith("Z") for h in item["history"])
    assert item["reason"] == "exhausted" and item["attempts"] == 2


async def test_admin_dlq_show_binary_body_as_base64(admin: Admin) -> None:
    [item_id] = await bury_many(admin.store, 1, body=b"\xff\xfe\x00binary")
    item = await (await admin.get(f"/admin/dlq/{item_id}")).json()
    assert item["body_base64"] == "//4AYmluYXJ5" and "body" not in item


@pytest.mark.parametrize("item_id", ["0123456789abcdef01234567", "not-hex", "x" * 300])
async def test_admin_dlq_show_and_delete_unknown_id_404(admin: Admin, item_id: str) -> None:
    for resp in (await admin.get(f"/admin/dlq/{item_id}"), await admin.delete(f"/admin/dlq/{item_id}")):
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"


async def test_admin_dlq_delete_removes_item_and_logs_reason(
    admin: Admin, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    keep, gone = await bury_many(admin.store, 2)
    with caplog.at_level(logging.INFO, logger="sidecar.admin"):
        resp = await admin.delete(f"/admin/dlq/{gone}", params={"reason": "bogus test event"})
    assert resp.status == 200 and (await resp.json()) == {"deleted": True, "id": gone}
    assert rdb.zrange(KEYS.dlq_items(), 0, -1) == [keep.encode()]
    assert not rdb.hexists(KEYS.dlq_body(), gone) and not rdb.hexists(KEYS.dlq_data(), gone)
    assert rdb.zrange(KEYS.dlq_route("stripe"), 0, -1) == [keep.encode()]
    [line] = [r.getMessage() for r in caplog.records if r.name == "sidecar.admin"]
    assert gone in line and "bogus test event" in line and "evt_00001" in line


@contextlib.contextmanager
def answers_lost(monkeypatch: pytest.MonkeyPatch, script: str) -> Iterator[None]:
    """Inside, every DeadLetters runs its `script` (an attribute: `_remove`, `_forget`) as redis-py does when the
    answer is lost (a connection reset after the command went out): it runs, and is sent again, with the same
    arguments, on a new connection."""
    init = DeadLetters.__init__

    def resending(self: DeadLetters, store: Any) -> None:
        init(self, store)
        once = getattr(self, script)

        async def twice(keys: list[Any], args: list[Any]) -> Any:
            await once(keys=keys, args=args)
            return await once(keys=keys, args=args)

        setattr(self, script, twice)

    with monkeypatch.context() as m:
        m.setattr(DeadLetters, "__init__", resending)
        yield


async def test_admin_dlq_delete_whose_store_answer_was_lost_answers_deleted(
    admin: Admin, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal ran, its answer was lost, and redis-py sent it again: the second run found the item gone and
    the operator was told 404 for a delete that had worked. A removal's own resend is answered removed; another
    remover of the same version is still told it is gone."""
    keep, gone = await bury_many(admin.store, 2)
    stale = await DeadLetters(admin.store).get(gone)
    assert stale is not None
    with answers_lost(monkeypatch, "_remove"):
        resp = await admin.delete(f"/admin/dlq/{gone}")
        assert resp.status == 200 and (await resp.json()) == {"deleted": True, "id": gone}
    assert rdb.zrange(KEYS.dlq_items(), 0, -1) == [keep.encode()]
    assert not await DeadLetters(admin.store).remove(stale)  # someone else's copy: gone
    assert 0 < rdb.pttl(KEYS.dlq_gone(gone, stale.dead_ms)) <= 60_000  # the marker does not stay


# -- replay -----------------------------------------------------------------------------------------------------


async def test_admin_dlq_replay_by_id_goes_through_worker_attempt_1_history_kept(
    admin: Admin, upstream: Upstream, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    item_id = await dead_via_ingress(admin, upstream, "evt_replay")
    pending_before = (await admin.store.route_stats())["stripe"].get("pending", 0)
    with caplog.at_level(logging.INFO, logger="sidecar.admin"):
        resp = await admin.post("/admin/dlq/replay", {"ids": [item_id], "reason": "receiver fixed"})
    assert (await resp.json()) == {
        "replayed": 1,
        "skipped": {"pending": 0, "delivered": 0, "busy": 0, "gone": 0},
    }
    assert rdb.zcard(KEYS.dlq_items()) == 0
    ev = await (await admin.get("/admin/events/stripe/evt_replay")).json()
    assert ev["state"] == "pending" and ev["attempts"] == 0 and ev["next_attempt_at"]
    shard = KEYS.shard_of("stripe", "evt_replay")
    assert rdb.ttl(KEYS.event(shard, "stripe:evt_replay")) == -1  # no TTL while pending
    assert (await admin.store.route_stats())["stripe"]["pending"] == pending_before + 1
    await deliver(admin, upstream, 2)
    assert upstream.ids() == ["evt_replay", "evt_replay"]
    again = upstream.received[1]
    assert again.headers["x-sidecar-attempt"] == "1"  # attempts start again
    assert again.body == upstream.received[0].body
    assert again.headers["stripe-signature"] == upstream.received[0].headers["stripe-signature"]
    ev = await (await admin.get("/admin/events/stripe/evt_replay")).json()
    assert ev["state"] == "delivered"
    assert [h.get("status") for h in ev["history"]] == [400, None, 200]
    assert ev["history"][1]["reason"] == "receiver fixed" and ev["history"][1]["replayed_at"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "sidecar.admin"]
    assert item_id in line and "receiver fixed" in line and "replayed=1" in line


async def test_admin_dlq_replay_keeps_when_the_event_was_first_seen(admin: Admin, upstream: Upstream) -> None:
    """A replay starts the attempts again, not the event's life: its `first_seen_at` stays the provider's first
    send (what `retry.max_age`, the delivery lag and the dead letter's `first_seen_at` count from), also in the
    dead letter it makes when it fails again."""
    from sidecar.admin import rfc3339

    seen_ms = int(time.time() * 1000) - 3_600_000  # an hour ago
    [item_id] = await bury_many(admin.store, 1, seen_ms=seen_ms)
    assert (await (await admin.post("/admin/dlq/replay", {"ids": [item_id]})).json())["replayed"] == 1
    ev = await (await admin.get("/admin/events/stripe/evt_00000")).json()
    assert ev["state"] == "pending" and ev["first_seen_at"] == rfc3339(seen_ms)
    upstream.respond(400)  # rejected again: dead-lettered again
    await deliver(admin, upstream, 1)
    [item] = (await (await admin.get("/admin/dlq")).json())["items"]
    assert item["event_id"] == "evt_00000" and item["first_seen_at"] == rfc3339(seen_ms)


async def test_admin_dlq_replay_500_by_route_each_delivered_once(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    await bury_many(admin.store, 500)
    await bury_many(admin.store, 3, route="stripe2", prefix="keep")
    resp = await admin.post("/admin/dlq/replay", {"route": "stripe", "reason": "upstream back"})
    assert (await resp.json())["replayed"] == 500
    await deliver(admin, upstream, 500, until=20)
    for _ in range(3):  # a few more passes: nothing else may arrive
        await admin.worker.run_once()
    counts: dict[str, int] = {}
    for event_id in upstream.ids():
        counts[event_id] = counts.get(event_id, 0) + 1
    assert len(counts) == 500 and set(counts.values()) == {1}
    assert rdb.zcard(KEYS.dlq_route("stripe")) == 0
    assert rdb.zcard(KEYS.dlq_route("stripe2")) == 3
    stats = await (await admin.get("/admin/stats")).json()
    assert stats["routes"]["stripe"]["dead"] == 0 and stats["routes"]["stripe"]["pending"] == 0


async def test_admin_dlq_replay_cut_short_by_the_store_says_how_far_it_got(
    admin: Admin, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store stops answering part way through a replay (here: its writes paused, for real, after the 150th
    item began). The answer was a bare 503 `store unreachable`, read as "nothing replayed" while 199 of 1,200 had
    been (an e2e audit); it now says how many were, and that running it again is safe."""
    from sidecar.store.dead_letters import DeadLetters

    await bury_many(admin.store, 300)
    original, calls = DeadLetters.replay, 0

    async def replay_then_pause(self: DeadLetters, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 150:
            rdb.client_pause(5000, all=False)  # writes (and scripts) wait: the store's timeout answers them
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(DeadLetters, "replay", replay_then_pause)
    try:
        resp = await admin.post("/admin/dlq/replay", {"route": "stripe"})
    finally:
        rdb.client_unpause()
    body = await resp.json()
    assert resp.status == 503 and body["error"] == "store_unavailable" and body["partial"] is True, body
    assert 100 <= body["replayed"] < 300, body
    assert f"{body['replayed']} of 300 replayed" in body["detail"] and "run it again" in body["detail"]
    assert resp.headers["Retry-After"] == "1"
    listed = document()["paths"]["/admin/dlq/replay"]["post"]["responses"]["503"]
    assert "partial" in listed["description"]
    assert {"partial", "replayed", "skipped"} <= set(SCHEMAS["Error"]["properties"])
    left = rdb.zcard(KEYS.dlq_items())
    assert left <= 300 - body["replayed"]  # what it counted has left the DLQ
    monkeypatch.setattr(DeadLetters, "replay", original)
    again = await (await admin.post("/admin/dlq/replay", {"route": "stripe"})).json()
    assert again["replayed"] + sum(again["skipped"].values()) == left, again
    # what the cut replay left half done stays listed: an item it took (busy until its lease ends), or one it
    # scheduled but had not removed yet (its event pending); everything else has left the DLQ
    assert rdb.zcard(KEYS.dlq_items()) == again["skipped"]["busy"] + again["skipped"]["pending"]


async def test_admin_dlq_replay_of_hundreds_opens_few_store_connections(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    """The items of a batch are replayed 16 at a time: with all 100 at once, the store client's pool opened a
    connection for each and kept them all (an external soak: 17 connections before a replay, 101 after)."""

    def clients() -> int:
        return sum(1 for c in rdb.client_list() if c.get("lib-name") == "redis-py")

    await bury_many(admin.store, 300)
    await admin.get("/admin/stats")  # the pool's usual connections are open
    before = clients()
    resp = await admin.post("/admin/dlq/replay", {"route": "stripe"})
    assert (await resp.json())["replayed"] == 300
    opened = clients() - before
    assert opened <= 20, f"the replay left {opened} more store connections open"
    await deliver(admin, upstream, 300, until=20)


async def test_admin_dlq_replay_same_item_twice_concurrently_delivers_once(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    ids = await bury_many(admin.store, 20)
    resps = await asyncio.gather(
        *(admin.post("/admin/dlq/replay", {"ids": ids}) for _ in range(2)),
        admin.post("/admin/dlq/replay", {"route": "stripe"}),
    )
    replayed = [(await r.json()).get("replayed", 0) for r in resps]
    assert sum(replayed) == 20
    await deliver(admin, upstream, 20)
    for _ in range(3):
        await admin.worker.run_once()
    assert sorted(upstream.ids()) == sorted(f"evt_{i:05d}" for i in range(20))
    assert rdb.zcard(KEYS.dlq_items()) == 0


async def test_dead_letters_replay_twice_concurrently_schedules_once(admin: Admin, rdb: redis.Redis) -> None:
    [item_id] = await bury_many(admin.store, 1)
    dl = DeadLetters(admin.store)
    item = await dl.get(item_id)
    assert item is not None
    now = int(time.time() * 1000)
    outcomes = await asyncio.gather(*(dl.replay(item, now, "twice", f"operator-{i}") for i in range(10)))
    # one takes the item and replays it; the others find it held, or gone (removed by the one)
    assert outcomes.count("replayed") == 1 and set(outcomes) <= {"replayed", "busy", "gone"}
    shard = KEYS.shard_of("stripe", "evt_00000")
    assert rdb.zcard(KEYS.schedule(shard)) == 1
    assert (await admin.store.route_stats())["stripe"]["pending"] == 1


async def test_admin_dlq_replay_counts_an_item_removed_after_the_selection_as_gone(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item another replay or drain removed between the id check and the read was counted nowhere: every
    count 0 in the answer and in the log line."""
    ids = await bury_many(admin.store, 2)
    dl = DeadLetters(admin.store)
    selection = AdminApi.selection

    async def then_removed(api: AdminApi, body: dict[str, Any], selector: str) -> tuple[str, list[str]]:
        chosen = await selection(api, body, selector)
        item = await dl.get(ids[0])
        assert item is not None and await dl.remove(item)  # as a concurrent replay or drain would
        return chosen

    monkeypatch.setattr(AdminApi, "selection", then_removed)
    resp = await admin.post("/admin/dlq/replay", {"ids": ids})
    assert (await resp.json()) == {
        "replayed": 1,
        "skipped": {"pending": 0, "delivered": 0, "busy": 0, "gone": 1},
    }


async def test_admin_dlq_replay_crash_between_schedule_and_remove_loses_nothing(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    """The replay script ran but the process died before removing the dead letter: the item is still there, and
    a second replay schedules nothing more (the event remembers the dead letter it came from) but removes the
    item, which a drain would otherwise hand out again while its event is on its way."""
    [item_id] = await bury_many(admin.store, 1)
    dl = DeadLetters(admin.store)
    item = await dl.get(item_id)
    assert item is not None
    assert await dl.schedule(item, int(time.time() * 1000), "crash") == "replayed"  # step 1 only: the "crash"
    assert rdb.zcard(KEYS.dlq_items()) == 1
    second = await admin.post("/admin/dlq/replay", {"ids": [item_id]})
    assert (await second.json()) == {
        "replayed": 1,
        "skipped": {"pending": 0, "delivered": 0, "busy": 0, "gone": 0},
    }
    assert rdb.zcard(KEYS.dlq_items()) == 0
    assert (await admin.store.route_stats())["stripe"]["pending"] == 1
    await deliver(admin, upstream, 1)
    for _ in range(3):
        await admin.worker.run_once()
    assert upstream.ids() == ["evt_00000"]


async def test_dead_letters_replay_script_run_twice_schedules_once(admin: Admin, rdb: redis.Redis) -> None:
    """replay.lua run again for the same dead letter (the client resends it after a lost answer) answers
    scheduled without scheduling again; a different dead letter of a pending event is still left alone."""
    [item_id] = await bury_many(admin.store, 1)
    dl = DeadLetters(admin.store)
    item = await dl.get(item_id)
    assert item is not None
    now = int(time.time() * 1000)
    assert await dl.schedule(item, now, "first") == "replayed"
    assert await dl.schedule(item, now + 5, "resent") == "replayed"
    shard = KEYS.shard_of("stripe", "evt_00000")
    assert rdb.zcard(KEYS.schedule(shard)) == 1
    assert (await admin.store.route_stats())["stripe"]["pending"] == 1
    hist = rdb.hget(KEYS.event(shard, "stripe:evt_00000"), "hist")
    assert hist is not None and hist.count(b"replayed_at_ms") == 1
    other = dataclasses.replace(item, dead_ms=item.dead_ms - 1)
    assert await dl.schedule(other, now + 10, "older copy") == "pending"


@pytest.mark.parametrize("ran", ["ran", "ran-then-delivered", "not-run", "not-run-pending-again"])
async def test_admin_dlq_replay_whose_schedule_answer_was_lost_says_what_happened(
    admin: Admin, upstream: Upstream, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch, ran: str
) -> None:
    """replay.lua ran and its answer was lost for good (redis-py's resend failed too): the replay answered 503
    "0 of 1 replayed" and kept the item, though its event was on the schedule (a model-based test). The event
    remembers the dead letter it came from: the replay is counted and the item removed. Delivered before the
    read (another replica's worker), the item is obsolete and removed, as replay.lua run again would (a review).
    When the script never ran, the 503 and the item stand: also when the event is pending again meanwhile (forgotten
    and sent again by its provider), which is no sign that this item was scheduled."""
    from sidecar.errors import StoreUnavailable

    [item_id] = await bury_many(admin.store, 1)
    if ran == "not-run-pending-again":
        assert (await admin.delete("/admin/events/stripe/evt_00000")).status == 200
        upstream.respond(503)
        body = stripe_body("evt_00000")
        resp = await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        assert resp.status == 202
    reschedule = RedisStore.reschedule

    async def answer_lost(self: RedisStore, keys: list[str], args: list[Any]) -> Any:
        if not ran.startswith("not-run"):
            await reschedule(self, keys, args)
        if ran == "ran-then-delivered":
            await deliver(admin, upstream, 1)
        raise StoreUnavailable("connection reset by peer")

    with monkeypatch.context() as m:
        m.setattr(RedisStore, "reschedule", answer_lost)
        resp = await admin.post("/admin/dlq/replay", {"ids": [item_id]})
    body = await resp.json()
    shard = KEYS.shard_of("stripe", "evt_00000")
    if ran == "ran-then-delivered":
        assert resp.status == 200 and body["skipped"]["delivered"] == 1, body
        assert rdb.zcard(KEYS.dlq_items()) == 0 and upstream.ids() == ["evt_00000"]
    elif ran == "ran":
        assert resp.status == 200 and body["replayed"] == 1, body
        assert rdb.zcard(KEYS.dlq_items()) == 0
        assert rdb.zcard(KEYS.schedule(shard)) == 1
        await deliver(admin, upstream, 1)
        assert upstream.ids() == ["evt_00000"]
    elif ran == "not-run-pending-again":
        assert resp.status == 503 and body["replayed"] == 0 and body["partial"] is True, body
        # kept: nothing was scheduled from it
        assert rdb.zrange(KEYS.dlq_items(), 0, -1) == [item_id.encode()]
    else:
        assert resp.status == 503 and body["replayed"] == 0 and body["partial"] is True, body
        assert rdb.zrange(KEYS.dlq_items(), 0, -1) == [item_id.encode()]
        assert rdb.zcard(KEYS.schedule(shard)) == 0
        # and it is not held: replayed at once when the store answers again
        again = await (await admin.post("/admin/dlq/replay", {"ids": [item_id]})).json()
        assert again["replayed"] == 1, again


async def test_admin_dlq_replay_keeps_a_newer_dead_letter_of_the_same_event(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    """Replayed, failed again and re-buried (same id, later dead_at) before the first replay removed the old
    version: the removal must not take the new one."""
    [item_id] = await bury_many(admin.store, 1)
    dl = DeadLetters(admin.store)
    old = await dl.get(item_id)
    assert old is not None
    assert (await (await admin.post("/admin/dlq/replay", {"ids": [item_id]})).json())["replayed"] == 1
    upstream.respond(400)
    await deliver(admin, upstream, 1)
    new = await dl.get(item_id)
    assert new is not None and new.dead_ms > old.dead_ms
    assert not await dl.remove(old)
    assert rdb.zscore(KEYS.dlq_items(), item_id) == new.dead_ms
    # a replay working from the copy read before (another operator's, on another replica) sends nothing again
    # and leaves the new version's history alone
    assert await dl.replay(old, int(time.time() * 1000), "stale copy", "operator-b") == "gone"
    for _ in range(3):
        await admin.worker.run_once()
    assert upstream.ids() == ["evt_00000"]
    shown = await (await admin.get(f"/admin/dlq/{item_id}")).json()
    assert [("replayed_at" in h) for h in shown["history"]] == [False, True, False]


async def test_admin_dlq_replay_dry_run_counts_and_changes_nothing(admin: Admin, rdb: redis.Redis) -> None:
    ids = await bury_many(admin.store, 7)
    await bury_many(admin.store, 2, route="stripe2", prefix="o")
    for body, want in [
        ({"all": True, "dry_run": True}, 9),
        ({"route": "stripe", "dry_run": True}, 7),
        ({"ids": ids[:3], "dry_run": True, "reason": "check"}, 3),
    ]:
        resp = await admin.post("/admin/dlq/replay", body)
        assert (await resp.json()) == {"would_replay": want, "busy": 0}
    assert rdb.zcard(KEYS.dlq_items()) == 9


async def test_admin_dlq_replay_dry_run_leaves_out_what_a_drain_holds(admin: Admin, rdb: redis.Redis) -> None:
    """A held drain has the route's items: the real replay would skip them as busy, so the dry run must not count
    them as would-be replays (an audit: it said 20, the replay then replayed 0). A hold that ended counts again."""
    held = await bury_many(admin.store, 3)
    free = await bury_many(admin.store, 2, route="stripe2", prefix="o")
    drain_id, _ = await held_drain(admin, {"hold": "1s", "route": "stripe"})
    dry = await admin.post("/admin/dlq/replay", {"all": True, "dry_run": True})
    assert (await dry.json()) == {"would_replay": 2, "busy": 3}
    real = await admin.post("/admin/dlq/replay", {"ids": [*held, *free]})
    assert (await real.json()) == {
        "replayed": 2,
        "skipped": {"pending": 0, "delivered": 0, "busy": 3, "gone": 0},
    }
    deadline = time.monotonic() + 10
    while (await (await admin.post("/admin/dlq/replay", {"ids": held, "dry_run": True})).json())["busy"]:
        assert time.monotonic() < deadline, "the drain's 1 s hold did not end"
        await asyncio.sleep(0.1)
    again = await admin.post("/admin/dlq/replay", {"ids": held, "dry_run": True})
    assert (await again.json()) == {"would_replay": 3, "busy": 0}
    assert drain_id and rdb.zcard(KEYS.dlq_items()) == 3


async def test_admin_dlq_replay_dry_run_leaves_out_what_has_lost_its_body(
    admin: Admin, rdb: redis.Redis
) -> None:
    """An item whose stored body was evicted is kept by a replay (`body_missing`), not delivered empty: the dry run
    must not count it as a would-be replay, and both answers say how many were left out that way."""
    ids = await bury_many(admin.store, 3)
    rdb.hdel(KEYS.dlq_body(), ids[0])  # what an allkeys-* maxmemory-policy does
    dry = await admin.post("/admin/dlq/replay", {"all": True, "dry_run": True})
    assert (await dry.json()) == {"would_replay": 2, "busy": 0, "body_missing": 1}
    real = await admin.post("/admin/dlq/replay", {"all": True})
    assert (await real.json()) == {
        "replayed": 2,
        "skipped": {"pending": 0, "delivered": 0, "busy": 0, "gone": 0, "body_missing": 1},
    }
    assert [m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)] == [ids[0]]  # kept, the only record left


async def test_admin_dlq_replay_dry_run_counts_an_item_held_and_without_its_body_once(
    admin: Admin, rdb: redis.Redis
) -> None:
    """The replay looks at an item's body before it takes it: one both held by a drain and without its body is
    skipped as `body_missing`. The dry run counted it under both (busy 3 and body_missing 1 of 3 items, where the
    replay said busy 2; a mutation audit)."""
    ids = await bury_many(admin.store, 3)
    await held_drain(admin, {"hold": "30s"})  # a held drain holds all three
    rdb.hdel(KEYS.dlq_body(), ids[0])  # one body evicted
    dry = await (await admin.post("/admin/dlq/replay", {"all": True, "dry_run": True})).json()
    real = await (await admin.post("/admin/dlq/replay", {"all": True})).json()
    assert dry == {"would_replay": 0, "busy": 2, "body_missing": 1}, dry
    assert real["replayed"] == 0 and real["skipped"]["busy"] == 2 and real["skipped"]["body_missing"] == 1, (
        real
    )


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "all",
        {},
        {"all": False},
        {"all": "yes"},
        {"ids": []},
        {"ids": "abc"},
        {"ids": [1, 2]},
        {"ids": ["a"], "route": "stripe"},
        {"all": True, "dry_run": "yes"},
        {"all": True, "reason": 5},
        {"all": True, "reason": "x" * 1001},
        {"all": True, "dryrun": True},
    ],
)
async def test_admin_dlq_replay_bad_body_400(admin: Admin, rdb: redis.Redis, body: Any) -> None:
    await bury_many(admin.store, 1)
    resp = await admin.post("/admin/dlq/replay", body)
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    assert rdb.zcard(KEYS.dlq_items()) == 1


async def test_admin_dlq_replay_unknown_ids_or_route_404_and_nothing_replayed(
    admin: Admin, rdb: redis.Redis
) -> None:
    [known] = await bury_many(admin.store, 1)
    resp = await admin.post("/admin/dlq/replay", {"ids": [known, "0123456789abcdef01234567", "nope"]})
    assert resp.status == 404
    body = await resp.json()
    assert body["error"] == "not_found" and body["ids"] == ["0123456789abcdef01234567", "nope"]
    # an id listed a moment ago may have been replayed by another operator since: the answer says so
    assert "replayed, drained or deleted since they were listed" in body["detail"], body
    resp = await admin.post("/admin/dlq/replay", {"route": "nosuch"})
    assert resp.status == 404
    assert rdb.zcard(KEYS.dlq_items()) == 1


async def test_admin_ambiguous_requests_are_refused_not_resolved_silently(
    admin: Admin, rdb: redis.Redis
) -> None:
    """A body giving a key twice was read as its last value: `{"all": true, "dry_run": true, "dry_run": false}`
    did a real replay of the whole DLQ; a repeated query parameter was read as its first value."""
    await bury_many(admin.store, 3)
    headers = {**AUTH, "Content-Type": "application/json"}
    for raw in (
        b'{"all": true, "dry_run": true, "dry_run": false}',
        b'{"route": "stripe", "route": "nosuch", "dry_run": true}',
    ):
        resp = await admin.http.post("/admin/dlq/replay", data=raw, headers=headers)
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "bad_request" and "more than once" in body["detail"], (
            body
        )
    for url in (
        "/admin/dlq?route=stripe&route=stripe2",
        "/admin/dlq?limit=1&limit=2",
        "/admin/openapi.json?x=1",
    ):
        resp = await admin.get(url)
        assert resp.status == 400 and (await resp.json())["error"] == "bad_request", url
    assert rdb.zcard(KEYS.dlq_items()) == 3  # nothing replayed
    assert (await admin.get("/admin/dlq?route=stripe&limit=2")).status == 200


# -- drain ------------------------------------------------------------------------------------------------------


async def test_admin_dlq_drain_100_streams_ndjson_and_empties_store(
    admin: Admin, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await bury_many(admin.store, 100)
    with caplog.at_level(logging.INFO, logger="sidecar.admin"):
        resp = await admin.post("/admin/dlq/drain", {"reason": "archive"})
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        text = await resp.text()
    lines = text.splitlines()
    assert len(lines) == 100
    items = [json.loads(line) for line in lines]
    assert sorted(i["id"] for i in items) == sorted(ids)
    assert all(i["body"] and i["headers"] and i["history"] for i in items)
    assert (
        rdb.zcard(KEYS.dlq_items()) == 0 and rdb.hlen(KEYS.dlq_data()) == 0 and rdb.hlen(KEYS.dlq_body()) == 0
    )
    [line] = [r.getMessage() for r in caplog.records if r.name == "sidecar.admin"]
    assert "drained=100" in line and "archive" in line and "evt_" not in line


@pytest.mark.parametrize(("budget", "batches"), [(524288, [2, 2, 2, 1]), (131072, [1] * 7)])
async def test_admin_dlq_drain_reads_ahead_a_quarter_of_the_inflight_budget(
    sidecar_factory: Any,
    aiohttp_client: Any,
    rdb: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
    batches: list[int],
) -> None:
    """A drain read its next 50 items' bodies at once, outside any budget: four drains at once of 1 MiB dead
    letters took the shipped pod (256Mi) past its memory limit (review20). It reads ahead what a quarter of
    `server.max_inflight_bytes` holds at `server.max_body_bytes` each (512 KiB / 4 / 64 KiB = 2), and one at a
    time under four bodies' worth (mut6: a batch of 0 was a 500)."""
    main = await sidecar_factory(ROUTES, retry=FAST, server=f"max_inflight_bytes: {budget}")
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    admin = Admin(main, http)
    ids = await bury_many(admin.store, 7)
    asked: list[int] = []
    real = DeadLetters.get_many

    async def get_many(self: DeadLetters, wanted: list[str]) -> Any:
        asked.append(len(wanted))
        return await real(self, wanted)

    monkeypatch.setattr(DeadLetters, "get_many", get_many)
    resp = await admin.post("/admin/dlq/drain", {"reason": "archive"})
    assert resp.status == 200
    items = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert sorted(i["id"] for i in items) == sorted(ids)
    assert asked == batches and rdb.zcard(KEYS.dlq_items()) == 0


async def test_admin_dlq_drain_by_route_leaves_other_routes(admin: Admin, rdb: redis.Redis) -> None:
    await bury_many(admin.store, 5)
    await bury_many(admin.store, 4, route="stripe2", prefix="o")
    resp = await admin.post("/admin/dlq/drain", {"route": "stripe2"})
    lines = (await resp.text()).splitlines()
    assert len(lines) == 4 and all(json.loads(x)["route"] == "stripe2" for x in lines)
    assert rdb.zcard(KEYS.dlq_items()) == 5 and rdb.zcard(KEYS.dlq_route("stripe2")) == 0
    empty = await admin.post("/admin/dlq/drain", {"route": "stripe2"})
    assert empty.status == 200 and await empty.text() == ""
    for body, status in [({"route": "nosuch"}, 404), ({"route": "stripe", "x": 1}, 400), ([1], 400)]:
        resp = await admin.post("/admin/dlq/drain", body)
        assert resp.status == status
    assert rdb.zcard(KEYS.dlq_items()) == 5


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _read_line(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\r\n"):
        out += _read_exactly(sock, 1)
    return out


def open_drain(port: int, timeout: float, *, close: bool = False) -> socket.socket:
    """A drain request on a new connection with a small receive buffer, its answer's head read: the socket is at
    the first chunk of the body."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(timeout)
    try:
        sock.connect(("127.0.0.1", port))
        connection = "Connection: close\r\n" if close else ""
        request = (
            "POST /admin/dlq/drain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\n{connection}Content-Length: 2\r\n\r\n{{}}"
        )
        sock.sendall(request.encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += _read_exactly(sock, 1)
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    except BaseException:
        sock.close()
        raise
    return sock


def read_chunk(sock: socket.socket) -> bytes:
    """One chunk of a chunked body, byte-exact (b"" for the last)."""
    size = int(_read_line(sock).strip(), 16)
    if size == 0:
        return b""
    data = _read_exactly(sock, size)
    _read_exactly(sock, 2)
    return data


def read_drain_lines(port: int, n: int) -> list[bytes]:
    """A client that reads exactly `n` NDJSON lines off a drain and nothing beyond (byte-exact chunked reads,
    small receive buffer), then waits a moment (its last ACK goes out) and closes."""
    sock = open_drain(port, 10)
    try:
        lines: list[bytes] = []
        pending = b""
        while len(lines) < n:
            pending += read_chunk(sock)
            while b"\n" in pending and len(lines) < n:
                line, pending = pending.split(b"\n", 1)
                lines.append(line)
        time.sleep(0.3)
        return lines
    finally:
        sock.close()


async def test_admin_dlq_drain_cut_off_after_10_lines_leaves_90(admin: Admin, rdb: redis.Redis) -> None:
    # Items bigger than the client's receive buffer, so the server is never more than one line ahead of it.
    await bury_many(admin.store, 100, body=json.dumps({"pad": "x" * 32_000}).encode())
    port = admin.http.server.port
    lines = await asyncio.to_thread(read_drain_lines, port, 10)
    assert len(lines) == 10 and all(json.loads(line)["body"] for line in lines)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and rdb.zcard(KEYS.dlq_items()) != 90:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # and it stays there: the server stopped
    assert rdb.zcard(KEYS.dlq_items()) == 90
    left = {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)}
    assert not left & {json.loads(line)["id"] for line in lines}
    # the item whose line was out when the client went is given back, not held for the drain's lease
    replay = await admin.post("/admin/dlq/replay", {"all": True})
    assert (await replay.json()) == {
        "replayed": 90,
        "skipped": {"pending": 0, "delivered": 0, "busy": 0, "gone": 0},
    }


def drain_slowly(port: int, pause: float) -> list[bytes]:
    """A whole drain read by a slow client (small receive buffer, a pause after each chunk): its NDJSON lines."""
    sock = open_drain(port, 20, close=True)
    try:
        data = b""
        for _ in range(100_000):
            chunk = read_chunk(sock)
            if not chunk:
                break
            data += chunk
            time.sleep(pause)
        return data.splitlines()
    finally:
        sock.close()


async def test_admin_two_drains_at_once_hand_out_each_item_once(admin: Admin, rdb: redis.Redis) -> None:
    """Two operators draining at once (two replicas, one store): every item goes to exactly one of them. Before,
    each drain wrote an item's line before removing it, so both wrote the items they met at the same time."""
    ids = await bury_many(admin.store, 40, body=json.dumps({"pad": "x" * 32_000}).encode())
    port = admin.http.server.port
    first, second = await asyncio.gather(
        asyncio.to_thread(drain_slowly, port, 0.002), asyncio.to_thread(drain_slowly, port, 0.002)
    )
    got_first = [json.loads(line)["id"] for line in first]
    got_second = [json.loads(line)["id"] for line in second]
    assert not set(got_first) & set(got_second)
    assert sorted(got_first + got_second) == sorted(ids)
    assert got_first and got_second  # both took part
    assert rdb.zcard(KEYS.dlq_items()) == 0 and rdb.hlen(KEYS.dlq_taken()) == 0


async def test_admin_replay_skips_an_item_a_drain_holds_and_takes_it_once_released(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    [item_id] = await bury_many(admin.store, 1)
    dl = DeadLetters(admin.store)
    item = await dl.get(item_id)
    assert item is not None
    assert (
        await dl.take(item, "a-drain", 60_000) == "taken"
    )  # a drain on another replica has written its line
    busy = await admin.post("/admin/dlq/replay", {"ids": [item_id]})
    assert (await busy.json()) == {
        "replayed": 0,
        "skipped": {"pending": 0, "delivered": 0, "busy": 1, "gone": 0},
    }
    for _ in range(3):
        await admin.worker.run_once()
    assert upstream.ids() == [] and rdb.zcard(KEYS.dlq_items()) == 1
    assert await dl.take(item, "a-drain", 0) == "taken"  # that drain failed and gave it back
    again = await admin.post("/admin/dlq/replay", {"ids": [item_id]})
    assert (await again.json())["replayed"] == 1
    await deliver(admin, upstream, 1)
    assert upstream.ids() == ["evt_00000"] and rdb.hlen(KEYS.dlq_taken()) == 0


async def test_admin_unknown_query_parameters_are_refused_and_change_nothing(
    admin: Admin, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A misspelled `?reasn=` on a delete dropped the reason from the audit log without a word, and
    `?dry_run=true` on a replay (whose dry_run goes in the body) would have run the real replay (docs audit)."""
    ids = await bury_many(admin.store, 2)
    event = (await (await admin.get(f"/admin/dlq/{ids[0]}")).json())["event_id"]
    for method, path in [
        ("DELETE", f"/admin/dlq/{ids[0]}?reasn=typo"),
        ("DELETE", f"/admin/events/stripe/{event}?reasn=typo"),
        ("POST", "/admin/dlq/replay?dry_run=true"),
        ("POST", "/admin/dlq/drain?route=stripe2"),
        ("POST", f"/admin/dlq/drain/{'a' * 32}/release?x=1"),
        ("GET", f"/admin/dlq/{ids[0]}?x=1"),
        ("GET", f"/admin/events/stripe/{event}?x=1"),
        ("GET", "/admin/stats?x=1"),
    ]:
        body = {"all": True} if "replay" in path else {"ids": ids} if "release" in path else None
        resp = await admin.http.request(method, path, json=body, headers=AUTH)
        answer = await resp.json()
        assert resp.status == 400 and "unknown query parameter" in answer["detail"], (path, answer)
    assert rdb.zcard(KEYS.dlq_items()) == 2 and upstream.ids() == []
    deleted = await admin.delete(f"/admin/dlq/{ids[0]}?reason=fine")
    assert deleted.status == 200


# -- held drain (two phases) --------------------------------------------------------------------------------------


async def held_drain(admin: Admin, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    resp = await admin.post("/admin/dlq/drain", body)
    assert resp.status == 200 and resp.content_type == "application/x-ndjson", await resp.text()
    drain_id = resp.headers["Sidecar-Drain"]
    return drain_id, [json.loads(line) for line in (await resp.text()).splitlines()]


async def test_admin_dlq_held_drain_keeps_items_until_its_client_removes_them(
    admin: Admin, upstream: Upstream, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await bury_many(admin.store, 30)
    with caplog.at_level(logging.INFO, logger="sidecar.admin"):
        drain_id, items = await held_drain(admin, {"hold": "10m", "reason": "archive"})
        assert re.fullmatch(r"[0-9a-f]{32}", drain_id)
        assert sorted(i["id"] for i in items) == sorted(ids) and all(i["body"] for i in items)
        # streamed, still in the DLQ, and held: a replay or another drain leaves them alone
        assert rdb.zcard(KEYS.dlq_items()) == 30
        busy = await admin.post("/admin/dlq/replay", {"all": True})
        assert (await busy.json())["skipped"]["busy"] == 30
        other = await admin.post("/admin/dlq/drain", {"hold": 60})
        assert other.status == 200 and await other.text() == ""
        # the client stored 20: they go; the other 10 it gives back
        stored, unstored = [i["id"] for i in items[:20]], [i["id"] for i in items[20:]]
        removed = await admin.post(
            f"/admin/dlq/drain/{drain_id}/remove", {"ids": stored, "reason": "archive"}
        )
        assert (await removed.json()) == {"removed": 20, "gone": [], "busy": [], "not_held": []}
        released = await admin.post(f"/admin/dlq/drain/{drain_id}/release", {"ids": unstored})
        assert (await released.json()) == {"released": 10}
    assert {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)} == set(unstored)
    again = await admin.post("/admin/dlq/replay", {"all": True})
    assert (await again.json())["replayed"] == 10
    await deliver(admin, upstream, 10)
    assert sorted(upstream.ids()) == sorted(i["event_id"] for i in items[20:])
    logged = [r.getMessage() for r in caplog.records if r.name == "sidecar.admin"]
    assert any("handed_out=30 of 30" in m and f"held by drain {drain_id}" in m for m in logged), logged
    assert any(f"dlq drain {drain_id}: removed=20 of 20" in m and "archive" in m for m in logged), logged
    assert any(f"dlq drain {drain_id}: released=10 of 10" in m for m in logged), logged


async def test_admin_dlq_held_drain_items_come_back_when_the_hold_ends(
    admin: Admin, rdb: redis.Redis
) -> None:
    """The client took the items and died (never removed them): at the hold's end they are the next drain's. The
    first drain's late removal then removes nothing the second one holds, and says so."""
    ids = await bury_many(admin.store, 5)
    first, items = await held_drain(admin, {"hold": 1})
    assert len(items) == 5
    early = await admin.post("/admin/dlq/drain", {"hold": 60})
    assert await early.text() == ""  # still held
    await asyncio.sleep(1.2)
    second, again = await held_drain(admin, {"hold": 60})
    assert sorted(i["id"] for i in again) == sorted(ids)
    late = await admin.post(f"/admin/dlq/drain/{first}/remove", {"ids": ids[:2]})
    assert (await late.json()) == {"removed": 0, "gone": [], "busy": ids[:2], "not_held": []}
    late_release = await admin.post(f"/admin/dlq/drain/{first}/release", {"ids": ids})
    assert (await late_release.json()) == {"released": 0}  # the second drain's hold is not the first's to end
    done = await admin.post(f"/admin/dlq/drain/{second}/remove", {"ids": ids})
    assert (await done.json())["removed"] == 5
    assert rdb.zcard(KEYS.dlq_items()) == 0 and rdb.hlen(KEYS.dlq_taken()) == 0


async def test_admin_dlq_held_drain_removal_after_the_hold_ended_unclaimed_still_removes(
    admin: Admin, rdb: redis.Redis
) -> None:
    """A client slower than its hold: nobody took the items since, so its removal is still good."""
    ids = await bury_many(admin.store, 3)
    drain_id, _ = await held_drain(admin, {"hold": "1s"})
    await asyncio.sleep(1.1)
    resp = await admin.post(f"/admin/dlq/drain/{drain_id}/remove", {"ids": ids})
    assert (await resp.json())["removed"] == 3 and rdb.zcard(KEYS.dlq_items()) == 0


async def test_admin_dlq_held_drain_removes_only_what_it_holds(admin: Admin, rdb: redis.Redis) -> None:
    held = await bury_many(admin.store, 3)
    drain_id, _ = await held_drain(admin, {"hold": 60, "route": "stripe"})
    [other] = await bury_many(admin.store, 1, route="stripe2", prefix="o")  # never in that drain
    deleted = await admin.delete(f"/admin/dlq/{held[0]}")  # an operator deleted one meanwhile
    assert deleted.status == 200
    resp = await admin.post(f"/admin/dlq/drain/{drain_id}/remove", {"ids": [*held, other, "0" * 24]})
    assert (await resp.json()) == {"removed": 2, "gone": [held[0], "0" * 24], "busy": [], "not_held": [other]}
    stranger = await admin.post(f"/admin/dlq/drain/{'f' * 32}/release", {"ids": [other]})
    assert (await stranger.json()) == {"released": 0}
    assert {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)} == {other}
    replay = await admin.post("/admin/dlq/replay", {"ids": [other]})  # a release that was not its own left it
    assert (await replay.json())["replayed"] == 1


async def test_admin_dlq_held_drain_a_released_item_is_not_removed_afterwards(
    admin: Admin, rdb: redis.Redis
) -> None:
    """Given back is given back: the drain that released an item cannot remove it later as if its hold had merely
    ended (review of the change: release, then remove, removed it)."""
    ids = await bury_many(admin.store, 2)
    drain_id, _ = await held_drain(admin, {"hold": 60})
    released = await admin.post(f"/admin/dlq/drain/{drain_id}/release", {"ids": ids[:1]})
    assert (await released.json()) == {"released": 1}
    resp = await admin.post(f"/admin/dlq/drain/{drain_id}/remove", {"ids": ids})
    assert (await resp.json()) == {"removed": 1, "gone": [], "busy": [], "not_held": ids[:1]}
    assert {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)} == set(ids[:1])


async def test_admin_dlq_held_drain_item_replaced_by_a_newer_version_is_gone(admin: Admin) -> None:
    """The event was dead-lettered again under the same id while a drain held the old version: that version is
    gone, and the new one stays."""
    [item_id] = await bury_many(admin.store, 1)
    drain_id, _ = await held_drain(admin, {"hold": 60})
    seen = json.loads(await admin.store.client.hget(KEYS.dlq_data(), item_id))["first_seen_ms"]
    # the same event (same first sight), dead again: a newer dead_at
    assert await bury_many(admin.store, 1, dead_ms=int(time.time() * 1000), seen_ms=seen) == [item_id]
    resp = await admin.post(f"/admin/dlq/drain/{drain_id}/remove", {"ids": [item_id]})
    assert (await resp.json()) == {"removed": 0, "gone": [item_id], "busy": [], "not_held": []}
    assert (await admin.get(f"/admin/dlq/{item_id}")).status == 200
    assert (await (await admin.get("/admin/dlq")).json())["total"] == 1


async def test_admin_dlq_held_drain_item_of_an_earlier_life_stays_for_the_drain_to_remove(
    admin: Admin, upstream: Upstream
) -> None:
    """A held drain hands out a dead letter; the operator forgets the event and the provider's resend is
    dead-lettered too. The drained item used to move to an id of its own (not held) and the drain's remove was told
    `gone`: the item its client had stored stayed in the DLQ, and the next drain handed it out again. The held
    item now stays under its id for the drain to remove; the new dead letter takes an id of its own."""
    first_id = await dead_via_ingress(admin, upstream, "evt_held_twice")
    drain_id, lines = await held_drain(admin, {"hold": 60})
    assert [x["id"] for x in lines] == [first_id]
    assert (await admin.delete("/admin/events/stripe/evt_held_twice")).status == 200
    await asyncio.sleep(0.005)  # another first-seen millisecond
    upstream.respond(400)
    body = stripe_body("evt_held_twice")
    resp = await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert (await resp.json())["dead_lettered"] is True
    # the event (its new life) names its own dead letter, not the earlier life's held item
    shown = await (await admin.get("/admin/events/stripe/evt_held_twice")).json()
    assert shown["dead_letter_id"] not in (None, first_id), shown
    resp = await admin.post(f"/admin/dlq/drain/{drain_id}/remove", {"ids": [first_id]})
    assert (await resp.json()) == {"removed": 1, "gone": [], "busy": [], "not_held": []}
    listed = (await (await admin.get("/admin/dlq?route=stripe")).json())["items"]
    assert len(listed) == 1 and listed[0]["id"] != first_id  # the resend's dead letter, under its own id
    assert listed[0]["first_seen_at"] != lines[0]["first_seen_at"]
    shown = await (await admin.get("/admin/events/stripe/evt_held_twice")).json()
    assert shown["dead_letter_id"] == listed[0]["id"]


async def test_admin_dlq_cap_never_evicts_what_a_held_drain_holds(
    admin: Admin, rdb: redis.Redis, redis_url: str
) -> None:
    """dlq.max_length 3, a held drain holding all 3: two new dead letters go over the cap rather than evict the
    held items (review of the change: they were evicted while the drain's client stored them, and the CLI then
    said they were still in the DLQ). Once the drain removes them, the cap evicts as before."""
    capped = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=3)
    try:
        held = await bury_many(capped, 3)
        drain_id, items = await held_drain(admin, {"hold": 60})
        assert len(items) == 3
        newer = await bury_many(capped, 2, prefix="newer", dead_ms=int(time.time() * 1000))
        assert rdb.zcard(KEYS.dlq_items()) == 5  # over the cap: nothing held was evicted
        resp = await admin.post(f"/admin/dlq/drain/{drain_id}/remove", {"ids": held})
        assert (await resp.json())["removed"] == 3
        more = await bury_many(capped, 2, prefix="more", dead_ms=int(time.time() * 1000) + 10_000)
        assert rdb.zcard(KEYS.dlq_items()) == 3  # the cap evicts again: the oldest not held
        assert {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)} == {newer[1], *more}
    finally:
        await capped.close()


async def test_admin_dlq_held_drain_client_gone_mid_stream_loses_nothing(
    admin: Admin, rdb: redis.Redis
) -> None:
    """A held drain's client that hangs up after a few lines removed nothing: every item is still in the DLQ."""
    ids = await bury_many(admin.store, 60, body=json.dumps({"pad": "x" * 32_000}).encode())
    port = admin.http.server.port

    def read_a_few() -> int:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(
                b"POST /admin/dlq/drain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 11\r\n\r\n".encode()
                + b'{"hold":60}'
            )
            got = b""
            while got.count(b"\n") < 20:
                got += sock.recv(65536)
            return got.count(b"\n")
        finally:
            sock.close()

    assert await asyncio.to_thread(read_a_few) >= 20
    await asyncio.sleep(0.5)
    assert {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)} == set(ids)


@pytest.mark.parametrize(
    "body",
    [{"hold": 0}, {"hold": "25h"}, {"hold": "soon"}, {"hold": True}, {"hold": -5}, {"hold": [1]}],
)
async def test_admin_dlq_drain_bad_hold_400_and_nothing_taken(
    admin: Admin, rdb: redis.Redis, body: Any
) -> None:
    await bury_many(admin.store, 2)
    resp = await admin.post("/admin/dlq/drain", body)
    assert resp.status == 400 and "hold" in (await resp.json())["detail"]
    assert rdb.zcard(KEYS.dlq_items()) == 2 and rdb.hlen(KEYS.dlq_taken()) == 0


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/admin/dlq/drain/nothex/remove", {"ids": ["ab"]}, 404),
        (f"/admin/dlq/drain/{'a' * 32}/remove", {}, 400),
        (f"/admin/dlq/drain/{'a' * 32}/remove", {"ids": []}, 400),
        (f"/admin/dlq/drain/{'a' * 32}/remove", {"ids": ["not-an-id"]}, 400),
        (f"/admin/dlq/drain/{'a' * 32}/remove", {"ids": ["ab"], "x": 1}, 400),
        (f"/admin/dlq/drain/{'a' * 32}/release", {"ids": ["ab"], "reason": "r"}, 400),
        (f"/admin/dlq/drain/{'a' * 32}/release", [1], 400),
    ],
)
async def test_admin_dlq_held_drain_calls_bad_input(admin: Admin, path: str, body: Any, status: int) -> None:
    resp = await admin.post(path, body)
    assert resp.status == status and (await resp.json())["error"]


# -- events -----------------------------------------------------------------------------------------------------


async def test_admin_events_show_state_and_history(admin: Admin, upstream: Upstream) -> None:
    upstream.respond(503)
    body = stripe_body("evt_ev")
    assert (await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    ev = await (await admin.get("/admin/events/stripe/evt_ev")).json()
    assert ev["state"] == "pending" and ev["in_flight"] is False and ev["attempts"] == 1
    assert ev["last_status"] == 503 and ev["next_attempt_at"] and ev["dead_letter_id"] is None
    assert [h["status"] for h in ev["history"]] == [503]
    await asyncio.sleep(0.15)
    await deliver(admin, upstream, 2)
    ev = await (await admin.get("/admin/events/stripe/evt_ev")).json()
    assert ev["state"] == "delivered" and [h["status"] for h in ev["history"]] == [503, 200]
    item_id = await dead_via_ingress(admin, upstream, "evt_dead")
    ev = await (await admin.get("/admin/events/stripe/evt_dead")).json()
    assert ev["state"] == "dead" and ev["dead_letter_id"] == item_id


async def test_admin_events_found_by_provider_id_on_digest_route(admin: Admin, upstream: Upstream) -> None:
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    resp = await admin.main.post("/webhooks/github", data=body, headers=github_headers(body, "delivery/1"))
    assert resp.status == 200
    for _ in range(50):  # the delivered mark is written in a batch just after the answer (store/marks.py)
        ev = await (await admin.get("/admin/events/github/delivery/1")).json()
        if ev["state"] == "delivered":
            break
        await asyncio.sleep(0.02)
    assert ev["state"] == "delivered" and ev["event_id"] == "delivery/1" and ev["dedupe_id"] != "delivery/1"
    forgot = await admin.delete("/admin/events/github/delivery/1")
    assert forgot.status == 200


async def test_admin_events_forget_lets_the_provider_send_again(
    admin: Admin, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    body = stripe_body("evt_again")
    assert (await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 200
    dup = await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert (await dup.json())["duplicate"] is True
    with caplog.at_level(logging.INFO, logger="sidecar.admin"):
        resp = await admin.delete("/admin/events/stripe/evt_again", params={"reason": "receiver lost it"})
    assert resp.status == 200 and (await resp.json())["forgotten"] is True
    assert any("receiver lost it" in r.getMessage() for r in caplog.records)
    assert (await admin.get("/admin/events/stripe/evt_again")).status == 404
    again = await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert again.status == 200 and "duplicate" not in await again.json()
    assert upstream.ids() == ["evt_again", "evt_again"]


async def test_admin_events_forget_whose_store_answer_was_lost_answers_forgotten(
    admin: Admin, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forget ran, its answer was lost, and redis-py sent it again: the second run found no event and the
    operator was told 404 for a forget that had worked. Its own resend is answered as its first run was."""
    body = stripe_body("evt_forget_lost")
    assert (await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 200
    with answers_lost(monkeypatch, "_forget"):
        resp = await admin.delete("/admin/events/stripe/evt_forget_lost")
        assert resp.status == 200 and (await resp.json())["forgotten"] is True
    # a forget of its own finds nothing now
    assert (await admin.delete("/admin/events/stripe/evt_forget_lost")).status == 404
    again = await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    assert again.status == 200 and "duplicate" not in await again.json()
    assert upstream.ids() == ["evt_forget_lost", "evt_forget_lost"]


async def test_admin_events_just_delivered_reads_delivered_and_forgets(
    admin: Admin, upstream: Upstream
) -> None:
    """The delivered mark follows the 200 by a few ms (batched, store/marks.py): a lookup or forget right after
    the answer found the event in flight, and the forget was refused 409 event_pending."""
    admin.store.marks.window = 30.0  # the mark stays queued until something flushes it (the next claim would)

    async def delivered(eid: str) -> None:
        body = stripe_body(eid)
        assert (
            await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        ).status == 200
        assert admin.store.marks.pending == 1

    await delivered("evt_just_get")
    ev = await (await admin.get("/admin/events/stripe/evt_just_get")).json()
    assert (ev["state"], ev["in_flight"]) == ("delivered", False)
    await delivered("evt_just_forget")
    forgot = await admin.delete("/admin/events/stripe/evt_just_forget")
    assert forgot.status == 200, await forgot.json()


async def test_admin_events_forgotten_dead_event_dead_again_keeps_both_dead_letters(
    admin: Admin, upstream: Upstream
) -> None:
    """Forgetting a dead event leaves its dead letter; when the provider's resend dies too, the new dead letter
    took the same id and overwrote the first (its body, headers and history gone, nothing logged). The first now
    moves to an id of its own, intact."""
    first_id = await dead_via_ingress(admin, upstream, "evt_twice_dead")
    first = await (await admin.get(f"/admin/dlq/{first_id}")).json()
    assert (await admin.delete("/admin/events/stripe/evt_twice_dead")).status == 200
    await asyncio.sleep(0.005)  # another first-seen millisecond
    # the event's id, its latest life
    assert await dead_via_ingress(admin, upstream, "evt_twice_dead") == first_id
    listed = (await (await admin.get("/admin/dlq?route=stripe")).json())["items"]
    assert len(listed) == 2 and first_id in [i["id"] for i in listed]
    [moved_id] = [i["id"] for i in listed if i["id"] != first_id]
    moved = await (await admin.get(f"/admin/dlq/{moved_id}")).json()
    assert {k: v for k, v in moved.items() if k != "id"} == {k: v for k, v in first.items() if k != "id"}
    latest = await (await admin.get(f"/admin/dlq/{first_id}")).json()
    assert latest["first_seen_at"] != first["first_seen_at"] and len(latest["history"]) == 1
    replay = await admin.post("/admin/dlq/replay", {"ids": [moved_id], "dry_run": True})
    assert (await replay.json()) == {"would_replay": 1, "busy": 0}


async def test_admin_events_found_by_an_id_that_stands_in_as_its_digest(
    admin: Admin, upstream: Upstream
) -> None:
    """An id unfit to be used as is (here non-ASCII) is keyed under its stand-in; the operator looks it up, and
    forgets it, by the provider's own id."""
    # a line break too: the router's pattern stopped at one (its bare 404, not the admin API's)
    for event_id in ("évt_ü", "evt\nline"):
        body = json.dumps({"id": event_id, "type": "invoice.paid"}).encode()
        assert (
            await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
        ).status == 200
        path = "/admin/events/stripe/" + quote(event_id, safe="")
        resp = await admin.get(path)
        assert resp.status == 200, await resp.text()
        ev = await resp.json()
        assert ev["state"] == "delivered" and ev["event_id"].startswith("id-sha256:")
        assert (await admin.delete(path)).status == 200


async def test_admin_events_found_by_an_id_of_any_length(admin: Admin, upstream: Upstream) -> None:
    """An id over 1,024 characters was "never seen" here although the ingress had taken it (keyed by its
    digest, as every id over 256 characters is)."""
    event_id = "L" * 5000
    body = json.dumps({"id": event_id, "type": "invoice.paid"}).encode()
    assert (await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 200
    path = "/admin/events/stripe/" + event_id
    resp = await admin.get(path)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["event_id"].startswith("id-sha256:")
    assert (await admin.delete(path)).status == 200


async def test_admin_bodies_refused_as_bad_requests_not_500(admin: Admin) -> None:
    """A body that is not what its Content-Encoding says was a 500 `internal` and two tracebacks; a replay of the
    route "" was 404 "no route ''" (the document says minLength 1): both are the client's mistakes, 400."""
    for path in ("/admin/dlq/replay", "/admin/dlq/drain"):
        resp = await admin.http.post(
            path,
            data=b'{"all": true, "dry_run": true}',
            headers={**AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert resp.status == 400, (path, await resp.text())
        assert (await resp.json())["error"] == "bad_request"
    # and the connection ends with the answer (a Connection: close header alone left it open 10 s)
    host, port = admin.http.server.host, admin.http.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = b'{"all": true, "dry_run": true}'
        writer.write(
            b"POST /admin/dlq/replay HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            + f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=5)  # to EOF: the server closed
        assert answer.startswith(b"HTTP/1.1 400") and b"Content-Encoding" in answer
    finally:
        writer.transport.abort()  # (left open, a failure hung the test's teardown for minutes)
    for body in ({"route": "", "dry_run": True}, {"route": ""}):
        resp = await admin.post("/admin/dlq/replay", body)
        assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    resp = await admin.post("/admin/dlq/drain", {"route": ""})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


async def test_admin_events_forget_pending_is_409_and_keeps_event(admin: Admin, upstream: Upstream) -> None:
    upstream.respond(503)
    body = stripe_body("evt_wait")
    assert (await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    resp = await admin.delete("/admin/events/stripe/evt_wait")
    assert resp.status == 409 and (await resp.json())["error"] == "event_pending"
    assert (await (await admin.get("/admin/events/stripe/evt_wait")).json())["state"] == "pending"


@pytest.mark.parametrize("path", ["stripe/evt_never", "nosuch/evt_1", "BAD/evt_1", "stripe/" + "x" * 2000])
async def test_admin_events_unknown_404(admin: Admin, path: str) -> None:
    for resp in (await admin.get(f"/admin/events/{path}"), await admin.delete(f"/admin/events/{path}")):
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"


# -- stats ------------------------------------------------------------------------------------------------------


async def test_admin_stats_per_configured_route(admin: Admin, upstream: Upstream) -> None:
    body = stripe_body("evt_s1")
    await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))
    await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body))  # duplicate
    await admin.main.post("/webhooks/stripe", data=body, headers=stripe_headers(body, secret="whsec_wrong"))
    upstream.respond(503)
    body2 = stripe_body("evt_s2")
    await admin.main.post("/webhooks/stripe", data=body2, headers=stripe_headers(body2))
    await dead_via_ingress(admin, upstream, "evt_s3", route="stripe2")
    await admin.main.server.app[RUNTIME].ingress.flush_rejections()
    stats = await (await admin.get("/admin/stats")).json()
    assert set(stats["routes"]) == {"stripe", "stripe2", "github"}
    assert stats["routes"]["stripe"] == {
        "pending": 1,
        "dead": 0,
        "delivered": 1,
        "duplicates": 1,
        "rejected": 1,
    }
    assert stats["routes"]["stripe2"] == {
        "pending": 0,
        "dead": 1,
        "delivered": 0,
        "duplicates": 0,
        "rejected": 0,
    }
    assert stats["routes"]["github"]["dead"] == 0 and stats["dlq_total"] == 1


# -- the OpenAPI document ---------------------------------------------------------------------------------------


def _registered(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        out.add((route.method.lower(), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    return out


def test_admin_openapi_lists_exactly_the_registered_routes() -> None:
    app = create_admin_app(web.Application())
    doc = document()
    documented = {
        (method, path)
        for path, ops in doc["paths"].items()
        for method in ops
        if method in {"get", "post", "put", "patch", "delete", "head", "options"}
    }
    assert documented == _registered(app)


def test_admin_openapi_is_a_valid_3_1_document() -> None:
    from openapi_spec_validator import validate

    doc = document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


async def test_admin_openapi_served_behind_auth(admin: Admin) -> None:
    assert (await admin.http.get("/admin/openapi.json")).status == 401
    resp = await admin.get("/admin/openapi.json")
    assert resp.status == 200 and (await resp.json()) == json.loads(json.dumps(document()))


async def test_admin_answers_match_the_openapi_document(admin: Admin) -> None:
    """Every answer an external check met (status and body) is one the document lists for that operation."""
    from jsonschema import Draft202012Validator

    [item_id] = await bury_many(admin.store, 1)
    doc = json.loads(json.dumps(document()))
    cases = [
        ("delete", "/admin/dlq/{id}", f"/admin/dlq/{item_id}?reason=" + "r" * 1001, None),
        ("post", "/admin/dlq/replay", "/admin/dlq/replay", {"route": 5}),
        ("post", "/admin/dlq/drain", "/admin/dlq/drain", {"route": None}),
        ("post", "/admin/dlq/replay", "/admin/dlq/replay", {"ids": ["0" * 24]}),
        ("post", "/admin/dlq/replay", "/admin/dlq/replay", {"pad": "x" * (1 << 20)}),
        ("delete", "/admin/events/{route}/{event_id}", "/admin/events/stripe/evt_00000", None),
        ("delete", "/admin/dlq/{id}", f"/admin/dlq/{item_id}", None),
    ]
    seen = []
    for method, template, url, body in cases:
        data = io.BytesIO(json.dumps(body).encode()) if body is not None else None
        headers = {**AUTH, "Content-Type": "application/json"}
        resp = await admin.http.request(method.upper(), url, data=data, headers=headers)
        listed = doc["paths"][template][method]["responses"]
        assert str(resp.status) in listed, (method, url[:60], resp.status)
        schema = listed[str(resp.status)]["content"]["application/json"]["schema"]
        schema = (
            {**schema, "components": doc["components"]}
            if "$ref" not in schema
            else {
                "$ref": schema["$ref"],
                "components": doc["components"],
            }
        )
        Draft202012Validator(schema).validate(await resp.json())
        seen.append(resp.status)
    assert seen == [400, 400, 400, 404, 413, 200, 200]
    wrong = await admin.http.request("PUT", "/admin/stats", headers=AUTH)
    assert wrong.status == 405 and "405" in doc["paths"]["/admin/stats"]["get"]["responses"]


async def test_admin_requests_the_document_refuses_are_the_ones_the_server_refuses(admin: Admin) -> None:
    """A client generated from the document must not send what the server answers 400 (a schemathesis run: both
    of "ids" and "all", a hold of "" or 0, a cursor, time or status of any text, ids that are no dead-letter ids),
    nor refuse what it takes."""
    from jsonschema import Draft202012Validator

    doc = json.loads(json.dumps(document()))

    def validator(name: str) -> Any:
        return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})

    def query(name: str) -> Any:
        [param] = [p for p in doc["paths"]["/admin/dlq"]["get"]["parameters"] if p["name"] == name]
        return Draft202012Validator(param["schema"], format_checker=Draft202012Validator.FORMAT_CHECKER)

    [item_id] = await bury_many(admin.store, 1)
    bodies = [
        ("ReplayRequest", "/admin/dlq/replay", {"all": True, "ids": [item_id], "dry_run": True}, 400),
        ("ReplayRequest", "/admin/dlq/replay", {"dry_run": True}, 400),
        ("ReplayRequest", "/admin/dlq/replay", {"all": True, "dry_run": True}, 200),
        ("DrainRequest", "/admin/dlq/drain", {"hold": "", "route": "nope"}, 400),
        ("DrainRequest", "/admin/dlq/drain", {"hold": 0, "route": "nope"}, 400),
        ("DrainRequest", "/admin/dlq/drain", {"hold": "1h30m", "route": "nope"}, 404),
        ("DrainRequest", "/admin/dlq/drain", {"hold": 90, "route": "nope"}, 404),
        ("DrainRequest", "/admin/dlq/drain", {"hold": None, "route": "nope"}, 404),
    ]
    for name, url, body, status in bodies:
        resp = await admin.post(url, body)
        assert resp.status == status, (body, resp.status)
        assert validator(name).is_valid(body) == (status != 400), body
    assert not validator("HeldIds").is_valid({"ids": ["x!"]}) and validator("HeldIds").is_valid(
        {"ids": [item_id]}
    )
    assert not validator("HeldRelease").is_valid({"all": True, "keep": ["x!"]})
    for name, value, ok in [
        ("cursor", "", True),  # empty: not given
        ("cursor", "1700000000000-" + item_id, True),
        ("since", "", True),
        ("since", "1700000000", True),
        ("since", "2024-05-01T12:00:00Z", True),
        # RFC 3339 takes a lowercase t and z; seconds and the offset are required, the T is not a space
        ("since", "2024-05-01t12:00:00.5z", True),
        ("since", "2024-05-01T12:00:00-07:00", True),
        ("since", "2024-05-01T12:00Z", False),
        ("since", "2024-05-01 12:00:00Z", False),
        ("since", "20240501T120000Z", False),
        ("since", "2024-05-01T12:00:00+0100", False),
        # before 1970 and the largest epoch the form takes select, they are not out of range
        ("since", "0001-01-01T00:00:00Z", True),
        ("since", "2016-12-31T23:59:61Z", False),
        ("until", "999999999999", True),
        ("until", "yesterday", False),
        ("status", "", True),
        ("status", "5XX", True),
        ("status", "503", True),
        ("status", "error", True),
        ("status", "600", False),
    ]:
        resp = await admin.get("/admin/dlq", params={name: value})
        assert (resp.status == 200) == ok, (name, value, resp.status)
        assert query(name).is_valid(value) == ok, (name, value)
    # RFC 3339's year 0000 and leap second match the document's pattern (a validator asserting "date-time" with
    # Python's datetime refuses them): the server takes them (a review)
    for value in ("0000-01-01T00:00:00Z", "2016-12-31T23:59:60Z"):
        assert (await admin.get("/admin/dlq", params={"since": value})).status == 200, value
        [param] = [p for p in doc["paths"]["/admin/dlq"]["get"]["parameters"] if p["name"] == "since"]
        assert Draft202012Validator(param["schema"]).is_valid(value), value


# -- property: no 5xx, errors are JSON --------------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_SEGMENT = st.one_of(
    st.sampled_from(
        ["dlq", "replay", "drain", "events", "stats", "stripe", "openapi.json", "..", "%2F", "0"]
    ),
    st.from_regex(r"[0-9a-f]{24}", fullmatch=True),
    _TEXT.map(lambda s: "".join(c for c in s if c not in "/?#") or "x"),
)
_PATHS = st.one_of(
    st.sampled_from(
        [
            "/admin/dlq",
            "/admin/dlq/replay",
            "/admin/dlq/drain",
            "/admin/stats",
            "/admin/openapi.json",
            "/healthz",
            "/readyz",
        ]
    ),
    st.lists(_SEGMENT, min_size=1, max_size=4).map(lambda segs: "/admin/" + "/".join(segs)),
    st.tuples(_SEGMENT, _SEGMENT).map(lambda t: f"/admin/events/{t[0]}/{t[1]}"),
)
_QUERY = st.dictionaries(
    st.sampled_from(["route", "limit", "cursor", "since", "until", "status", "reason", "x"]),
    st.one_of(
        _TEXT,
        st.integers(-(10**20), 10**20).map(str),
        st.sampled_from(["5xx", "error", "503", "stripe", "1700000000", "2024-01-01T00:00:00Z", "1-abc"]),
    ),
    max_size=4,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_BODY = st.one_of(
    st.none(),
    _JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "ids": st.lists(st.one_of(_TEXT, st.integers()), max_size=3) | _JSON,
            "route": st.sampled_from(["stripe", "nosuch", ""]) | _JSON,
            "all": st.booleans() | _JSON,
            "dry_run": st.just(True) | _JSON,
            "reason": _TEXT | _JSON,
        },
    ),
    st.binary(max_size=40),
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    path=_PATHS,
    query=_QUERY,
    body=_BODY,
    authed=st.booleans(),
)
async def test_admin_property_no_5xx_and_errors_are_json(
    admin: Admin, method: str, path: str, query: dict[str, str], body: Any, authed: bool
) -> None:
    if await admin.store.dlq_length() < 3:
        await bury_many(admin.store, 3, prefix=f"p{time.monotonic_ns()}")
    kw: dict[str, Any] = {"params": query, "headers": AUTH if authed else {}}
    if isinstance(body, bytes):
        kw["data"] = body
    elif body is not None:
        kw["json"] = body
    resp = await admin.http.request(method, path, **kw)
    assert resp.status < 500, (resp.status, await resp.text())
    if resp.status >= 400:
        payload = await resp.json()
        assert isinstance(payload["error"], str)
    else:
        await resp.read()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_admin_store_unreachable_is_503_json_not_a_traceback(
    aiohttp_client: Any, upstream: Upstream, scheme: str
) -> None:
    """redis+cluster://: redis-py's cluster client says "no node reachable" with an exception outside RedisError;
    it too is 503 store_unavailable."""
    dead = f"{scheme}://127.0.0.1:{free_port(below=55536)}"
    config = make_config(ROUTES, upstream_url=upstream.url, redis_url=dead)
    main = await aiohttp_client(create_app(config, redis_url=dead, run_worker=False))
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    for method, path in [("GET", "/admin/stats"), ("GET", "/admin/dlq"), ("POST", "/admin/dlq/drain")]:
        resp = await http.request(method, path, headers=AUTH)
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["error"] == "store_unavailable" and resp.headers["Retry-After"]


async def test_admin_stats_keep_a_removed_route_while_it_holds_dead_letters(
    admin: Admin, upstream: Upstream
) -> None:
    import dataclasses

    from sidecar.routes import RouteTable

    await dead_via_ingress(admin, upstream, "evt_gone", route="stripe2")
    dispatcher = admin.main.server.app[RUNTIME].dispatcher
    config = dispatcher.config
    kept = type(config.routes)(r for r in config.routes if r.name != "stripe2")
    dispatcher.table = RouteTable.build(dataclasses.replace(config, routes=kept))  # what a reload swaps in
    stats = await (await admin.get("/admin/stats")).json()
    assert set(stats["routes"]) == {"stripe", "github", "stripe2"}
    assert stats["routes"]["stripe2"]["dead"] == 1 and stats["routes"]["stripe2"]["configured"] is False
    assert "configured" not in stats["routes"]["stripe"]
    drained = await admin.post("/admin/dlq/drain", {"route": "stripe2"})
    assert drained.status == 200 and len((await drained.read()).splitlines()) == 1
    stats = await (await admin.get("/admin/stats")).json()
    assert set(stats["routes"]) == {"stripe", "github"}  # nothing of it left


async def test_admin_dlq_held_drain_release_all_gives_back_all_but_kept(
    admin: Admin, rdb: redis.Redis
) -> None:
    """`{"all": true, "keep": [...]}`: every item the drain holds but `keep`, for a client whose output failed with
    items streamed to it unread; other drains' holds are left alone; bad bodies are 400."""
    ids = await bury_many(admin.store, 12)
    drain_id, items = await held_drain(admin, {"hold": "10m"})
    other_ids = await bury_many(admin.store, 3, prefix="oth")
    other, _ = await held_drain(admin, {"hold": "10m"})  # holds only the 3 newer ones
    keep = [i["id"] for i in items[:2]]
    for body in ({"all": False}, {"all": True, "ids": keep}, {"keep": keep}, {"all": True, "keep": ["x!"]}):
        bad = await admin.post(f"/admin/dlq/drain/{drain_id}/release", body)
        assert bad.status == 400 and "error" in await bad.json(), body
    wrong = await admin.post(f"/admin/dlq/drain/{drain_id}/release", {"all": True, "keep": "abc"})
    assert (await wrong.json())["detail"].startswith('"keep" must be')  # it named "ids" (a fuzz)
    released = await admin.post(f"/admin/dlq/drain/{drain_id}/release", {"all": True, "keep": keep})
    assert (await released.json()) == {"released": 10}
    held = {k.decode() for k in rdb.hkeys(KEYS.dlq_taken())}
    assert held == set(keep) | set(other_ids)
    assert sorted(ids) == sorted(i["id"] for i in items) and other
    again = await admin.post(f"/admin/dlq/drain/{drain_id}/release", {"all": True})
    assert (await again.json()) == {"released": 2}


@pytest.mark.parametrize("framing", [b"Content-Length: 100", b"Transfer-Encoding: chunked"])
@pytest.mark.parametrize("reset", [False, True])
async def test_admin_body_cut_short_by_the_client_logs_no_error(
    sidecar_factory: Any, aiohttp_client: Any, caplog: pytest.LogCaptureFixture, framing: bytes, reset: bool
) -> None:
    """A client that goes away part way through its body is the client's business: it was an error-level
    "admin POST /admin/dlq/replay failed" with a ConnectionResetError traceback in the sidecar's log."""
    main = await sidecar_factory(ROUTES, retry=FAST)
    http = await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))
    await bury_many(main.server.app[RUNTIME].store, 1)
    host, port = http.server.host, http.server.port
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST /admin/dlq/replay HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n".encode()
        + framing
        + b"\r\nContent-Type: application/json\r\n\r\n"
        + (b"8\r\n" if b"chunked" in framing else b"")
        + b'{"all": '
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body
    if reset:
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    writer.close()
    await asyncio.sleep(0.3)  # the handler meets the end of the connection
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await DeadLetters(main.server.app[RUNTIME].store).count() == 1  # nothing replayed
    assert (await http.get("/admin/stats", headers=AUTH)).status == 200
