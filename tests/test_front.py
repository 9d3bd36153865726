"""The inbound front (sidecar/front.py) on the wire: raw sockets against a real sidecar, Valkey and upstream.

What it serves itself (plain signed POSTs) and what it hands to aiohttp must both be answered correctly, on the
same keep-alive connection, in order; a slow or idle client is cut off by server.read_timeout; shutdown lets a
request in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httptools
import pytest
import redis
from aiohttp import web

from sidecar import front as front_module
from sidecar.forwarder import end_to_end
from sidecar.front import Front, serialize
from tests.conftest import Upstream
from tests.procs import dribbling, wait_until
from tests.test_ingress import KEYS, ROUTES, stripe_body, stripe_headers

Response = tuple[int, dict[str, str], bytes]


def front_of(client: Any) -> Front:
    front = client.server.runner.server
    assert isinstance(front, Front)
    return front


def post(path: str, body: bytes, headers: dict[str, str], extra: str = "", version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: sidecar.test", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    head = "\r\n".join(lines) + "\r\n" + extra + "\r\n"
    return head.encode() + body


def signed(event_id: str, path: str = "/webhooks/stripe", extra: str = "") -> bytes:
    body = stripe_body(event_id)
    return post(path, body, stripe_headers(body), extra)


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return int(status_line.split()[1]), headers, body


async def connect(client: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", client.port)


async def exchange(client: Any, raw: bytes) -> Response:
    """One request on a new connection, and its answer."""
    reader, writer = await connect(client)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection (EOF) within `seconds`, with no further bytes."""
    try:
        rest = await asyncio.wait_for(reader.read(), seconds)
    except TimeoutError:
        return False
    except ConnectionResetError:  # closed, while the client was still sending
        return True
    return rest == b""


@pytest.fixture
async def client(sidecar_factory: Any) -> Any:
    return await sidecar_factory(ROUTES, server="read_timeout: 1s")


async def test_front_serves_signed_posts_on_one_keep_alive_connection(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    front = front_of(client)
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_f1"))
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, b'{"ok": true}')
        assert headers["x-upstream"] == "yes" and headers["x-sidecar-event-id"] == "evt_f1"
        assert headers["content-type"].startswith("application/json") and "date" in headers
        writer.write(signed("evt_f1"))  # the same event again: a duplicate, on the same connection
        status, headers, body = await read_response(reader)
        assert status == 200 and b'"duplicate": true' in body and b'"state": "delivered"' in body
    finally:
        writer.close()
    assert (front.fast_requests, front.handed_over) == (2, 0)
    assert upstream.ids() == ["evt_f1"]
    assert upstream.received[0].body == stripe_body("evt_f1")
    assert rdb.hget(KEYS.event(KEYS.shard_of("stripe", "evt_f1"), "stripe:evt_f1"), "st") == b"d"


async def test_front_pipelined_requests_are_answered_in_order(client: Any, upstream: Upstream) -> None:
    upstream.delay = 0.05
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_p1") + signed("evt_p2") + signed("evt_p1"))  # one write, three requests
        answers = [await read_response(reader) for _ in range(3)]
    finally:
        writer.close()
    assert [a[1]["x-sidecar-event-id"] for a in answers] == ["evt_p1", "evt_p2", "evt_p1"]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert b"duplicate" not in answers[0][2] and b"duplicate" not in answers[1][2]
    assert b'"duplicate": true' in answers[2][2]
    assert upstream.ids() == ["evt_p1", "evt_p2"]
    assert front_of(client).fast_requests == 3


async def test_front_request_split_across_many_writes(client: Any, upstream: Upstream) -> None:
    raw = signed("evt_split")
    cut = raw.index(b"\r\n\r\n")
    pieces = [raw[:7], raw[7:40], raw[40 : cut + 2], raw[cut + 2 : cut + 10], raw[cut + 10 : -5], raw[-5:]]
    reader, writer = await connect(client)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        status, _, _ = await read_response(reader)
    finally:
        writer.close()
    assert status == 200
    assert upstream.ids() == ["evt_split"]
    assert upstream.received[0].body == stripe_body("evt_split")
    assert (front_of(client).fast_requests, front_of(client).handed_over) == (1, 0)


async def test_front_hands_the_connection_to_aiohttp_mid_connection(client: Any, upstream: Upstream) -> None:
    """A fast POST, then a GET (a pass-through aiohttp serves), then a POST again: all answered, in order."""
    front = front_of(client)
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_h1"))
        assert (await read_response(reader))[0] == 200
        writer.write(
            b"GET /webhooks/stripe?check=1 HTTP/1.1\r\nHost: sidecar.test\r\n\r\n" + signed("evt_h2")
        )
        get_status, _, get_body = await read_response(reader)
        post_status, post_headers, _ = await read_response(reader)
    finally:
        writer.close()
    assert (get_status, get_body) == (200, b'{"ok": true}')  # the GET passed through to the upstream
    assert post_status == 200 and post_headers["x-sidecar-event-id"] == "evt_h2"
    assert [r.method for r in upstream.received] == ["POST", "GET", "POST"]
    assert upstream.ids()[2] == "evt_h2"
    assert (front.fast_requests, front.handed_over) == (1, 1)


CHUNKED_BODY = stripe_body("evt_chunked")


def signed_chunked(body: bytes) -> bytes:
    """A signed Stripe POST of `body` as one chunk (aiohttp's path: the front hands chunked bodies over)."""
    return (
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in stripe_headers(body).items())
        + b"\r\n%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )


HANDED_OVER = [
    (
        "chunked body",
        lambda: signed_chunked(CHUNKED_BODY),
        200,
    ),
    (
        "HTTP/1.0",
        lambda: post("/webhooks/stripe", CHUNKED_BODY, stripe_headers(CHUNKED_BODY), version="1.0"),
        200,
    ),
    ("percent-encoded path", lambda: signed("evt_pct", path="/webhooks/%73tripe"), 200),
    (
        "dot segment",
        lambda: signed("evt_dot", path="/webhooks/x/../stripe"),
        404,
    ),  # aiohttp does not resolve it
    ("body over max_body_bytes", lambda: post("/webhooks/stripe", b"x" * 70000, {}), 413),
    ("no route", lambda: signed("evt_none", path="/nowhere"), 404),
    ("malformed head", lambda: b"POST /webhooks/stripe HTTP/1.1\r\nHost: s\r\nBad Header\r\n\r\n", 400),
    ("absolute-form target", lambda: signed("evt_abs", path="http://elsewhere.test/webhooks/stripe"), None),
    # what aiohttp's parser refuses though llhttp takes it: served here, they were forwarded and claimed
    ("repeated Host", lambda: signed("evt_2host", extra="Host: other.test\r\n"), 400),
    ("repeated Content-Type", lambda: signed("evt_2ct", extra="Content-Type: text/plain\r\n"), 400),
    (
        "over 128 headers",
        lambda: signed("evt_many", extra="".join(f"X-Pad-{i}: y\r\n" for i in range(129))),
        400,
    ),
    ("Sec-WebSocket-Key1", lambda: signed("evt_key1", extra="Sec-WebSocket-Key1: x\r\n"), 400),
    # aiohttp's own answer (its int() refuses the value too); the front's int() raised in data_received, which
    # dropped the connection without one
    (
        "Content-Length of 4400 digits",
        lambda: signed("evt_cl").replace(b"Content-Length: ", b"Content-Length: " + b"0" * 4400),
        500,
    ),
]


# (each request made when its test runs: signed at collection, a request was stale by the time a long run got to it)
@pytest.mark.parametrize(("name", "make", "status"), HANDED_OVER, ids=[case[0] for case in HANDED_OVER])
async def test_front_hands_what_it_does_not_serve_to_aiohttp(
    client: Any, upstream: Upstream, name: str, make: Callable[[], bytes], status: int | None
) -> None:
    got, _, body = await exchange(client, make())
    front = front_of(client)
    assert (front.fast_requests, front.handed_over) == (0, 1), name
    if status is not None:
        assert got == status, (name, body)
    else:  # absolute-form: aiohttp routes it by path; whatever it answers, nothing went anywhere but the upstream
        assert got < 500, (name, body)
    if name == "chunked body":
        assert upstream.received[0].body == CHUNKED_BODY
    if status == 400:  # aiohttp's parser refused it: answered as every refusal is, in JSON
        assert json.loads(body)["error"] == "bad_request", (name, body)


@pytest.mark.parametrize(("count", "served"), [(128, (1, 0)), (129, (0, 1))])
async def test_front_serves_up_to_aiohttps_header_count_and_no_more(
    client: Any, upstream: Upstream, count: int, served: tuple[int, int]
) -> None:
    """aiohttp takes 128 header lines and refuses the 129th with 400: the front serves exactly what aiohttp takes
    (one more served here would be claimed and forwarded where aiohttp refuses it)."""
    event_id = f"evt_headers_{count}"
    raw = signed(event_id, extra="".join(f"X-Pad-{i}: y\r\n" for i in range(count - 4)))
    assert raw.split(b"\r\n\r\n")[0].count(b"\r\n") == count  # header lines after the request line
    got, _, body = await exchange(client, raw)
    front = front_of(client)
    assert (front.fast_requests, front.handed_over) == served, body
    if count > 128:
        assert got == 400 and json.loads(body)["error"] == "bad_request", body
        assert upstream.received == []
    else:  # claimed (the test upstream, an aiohttp too, refuses the forward for the headers the sidecar adds)
        assert got != 400, body


@pytest.mark.parametrize(("extra", "status", "served"), [(0, 200, (1, 0)), (1, 413, (0, 1))])
async def test_front_serves_a_body_of_max_body_bytes_and_no_more(
    client: Any, upstream: Upstream, extra: int, status: int, served: tuple[int, int]
) -> None:
    """`server.max_body_bytes` (65536 here) is the largest body taken: served by the front; one byte more is
    aiohttp's 413, never claimed nor forwarded."""
    from tests.test_ingress import _padded

    event_id = f"evt_size_{extra}"
    body = _padded(event_id, 0)
    body = _padded(event_id, 65536 + extra - len(body))
    assert len(body) == 65536 + extra
    got, _, answer = await exchange(client, post("/webhooks/stripe", body, stripe_headers(body)))
    front = front_of(client)
    assert (got, (front.fast_requests, front.handed_over)) == (status, served), answer
    assert upstream.ids() == ([event_id] if status == 200 else [])


async def test_front_unparsable_requests_log_one_info_line_not_an_error_traceback(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG", logger="aiohttp.server"):
        status, headers, body = await exchange(client, signed("evt_bad_log", extra="Bad Header SEKRIT\r\n"))
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": "bad_request", "detail": "malformed HTTP request"}  # not its bytes
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [(r.levelname, r.exc_info) for r in records] == [("INFO", None)], records
    assert "bad request from" in records[0].getMessage()
    assert "SEKRIT" not in records[0].getMessage()  # the kind of error, not the request's own bytes


async def test_front_expect_continue_goes_to_aiohttp(client: Any, upstream: Upstream) -> None:
    body = stripe_body("evt_expect")
    raw = post("/webhooks/stripe", body, stripe_headers(body), "Expect: 100-continue\r\n")
    reader, writer = await connect(client)
    try:
        writer.write(raw[: -len(body)])  # the head alone: the body waits for the 100
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(body)
        status, headers, _ = await read_response(reader)
    finally:
        writer.close()
    assert status == 200 and headers["x-sidecar-event-id"] == "evt_expect"
    assert "evt_expect" in upstream.ids()


async def test_front_expect_continue_over_the_size_limit_is_refused_from_the_head(
    client: Any, upstream: Upstream
) -> None:
    """A body announced over `max_body_bytes` gets its 413 at once, with no `100 Continue` inviting the upload
    first, and the connection is closed (the client may send the body anyway)."""
    raw = post("/webhooks/stripe", b"x" * 70000, {}, "Expect: 100-continue\r\n")
    reader, writer = await connect(client)
    try:
        writer.write(raw[:-70000])  # the head alone
        status, headers, body = await read_response(reader)
        # after reading what still comes, as aiohttp does
        assert await closed_within(reader, front_module.LINGER_S + 2)
    finally:
        writer.close()
    assert (status, json.loads(body)) == (413, {"error": "body_too_large"})
    assert headers["connection"] == "close"
    assert upstream.received == []


async def test_front_connection_close_is_honoured(client: Any) -> None:
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_close", extra="Connection: close\r\n"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_within(reader, 5)
    finally:
        writer.close()


async def test_front_connection_close_is_honoured_without_a_body(client: Any, upstream: Upstream) -> None:
    """llhttp resets its keep-alive flag once a message is complete, and a request with no body is complete with
    its head: its `Connection: close` was read as keep-alive, so the connection stayed open until read_timeout."""
    reader, writer = await connect(client)
    try:
        writer.write(post("/webhooks/plain", b"", {"X-Event-Id": "evt_empty_close"}, "Connection: close\r\n"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_within(reader, 0.5)  # at once, not after read_timeout (1 s here)
    finally:
        writer.close()
    assert upstream.ids() == ["evt_empty_close"]


@pytest.mark.parametrize(
    "lines", ["Connection: close\r\nConnection: X-Hop\r\n", "Connection: X-Hop, close\r\n"]
)
async def test_front_connection_close_in_any_connection_line_is_honoured(
    client: Any, upstream: Upstream, lines: str
) -> None:
    """The lines of a list field are one list (RFC 9110 §5.3): `close` in the first of two `Connection` lines, or
    not first in its line, closes the connection as aiohttp does; the later line does not undo it."""
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_close_lines", extra=lines + "X-Hop: 1\r\n"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_within(reader, 0.5)  # at once, not after read_timeout (1 s here)
    finally:
        writer.close()
    assert upstream.ids() == ["evt_close_lines"] and front_of(client).fast_requests == 1


async def test_front_body_dribble_gets_408_after_read_timeout(client: Any, upstream: Upstream) -> None:
    raw = signed("evt_dribble")
    reader, writer = await connect(client)
    started = time.monotonic()
    try:
        writer.write(raw[:-100])
        for i in range(40):  # a byte every 0.1 s does not extend the deadline
            if reader.at_eof() or len(reader._buffer):  # type: ignore[attr-defined]
                break
            try:
                writer.write(raw[-100 + i : -99 + i])
                await writer.drain()
            except ConnectionResetError:  # the 408 and the close came while this byte was on its way
                break
            await asyncio.sleep(0.1)
        status, _, body = await read_response(reader)
        elapsed = time.monotonic() - started
        assert await closed_within(reader, 5)
    finally:
        writer.close()
    assert (status, body) == (408, b'{"error": "read_timeout"}')
    assert 0.9 <= elapsed <= 3.5, elapsed  # read_timeout 1 s, checked once a second
    assert upstream.received == []
    assert (
        front_of(client).ingress.tel.requests[("stripe", "read_timeout")] == 1
    )  # counted as aiohttp's path does


async def test_front_chunked_dribble_is_closed_soon_after_its_408(client: Any, upstream: Upstream) -> None:
    """aiohttp's path (a chunked body): after the 408 it reads and discards the rest of the body for
    lingering_time, which was aiohttp's 10 s; a slow client held its connection that long past the answer."""
    body = stripe_body("evt_chunk_dribble")
    head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in stripe_headers(body).items()) + b"\r\n"
    reader, writer = await connect(client)
    started = time.monotonic()
    writer.write(head)
    async with dribbling(writer, b"1\r\na\r\n"):
        status, headers, answer = await read_response(reader)
        answered = time.monotonic() - started
        assert headers["connection"] == "close"  # as the front's 408 says
        assert await closed_within(reader, 4), "still open 4 s after the 408"
        closed = time.monotonic() - started
    assert (status, json.loads(answer)) == (408, {"error": "read_timeout"})
    assert answered < 3 and closed - answered < 3.5, (answered, closed)  # LINGER_S is 2 s
    assert upstream.received == []


@pytest.mark.parametrize("what", ["idle", "half a head"])
async def test_front_idle_or_dribbling_connection_is_closed(client: Any, what: str) -> None:
    reader, writer = await connect(client)
    started = time.monotonic()
    try:
        if what == "half a head":
            writer.write(signed("evt_half")[:30])
        assert await closed_within(reader, 5)
    finally:
        writer.close()
    assert 0.9 <= time.monotonic() - started <= 3.5


async def test_front_client_gone_mid_forward_still_settles_the_event(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    upstream.delay = 0.3
    _reader, writer = await connect(client)
    writer.write(signed("evt_gone"))
    await asyncio.wait_for(upstream.arrived.wait(), 10)
    writer.transport.abort()  # the provider gave up on the answer
    key = KEYS.event(KEYS.shard_of("stripe", "evt_gone"), "stripe:evt_gone")
    for _ in range(100):
        if rdb.hget(key, "st") == b"d":
            break
        await asyncio.sleep(0.05)
    assert rdb.hget(key, "st") == b"d"
    assert upstream.ids() == ["evt_gone"]


async def test_front_shutdown_lets_the_request_in_flight_finish(client: Any, upstream: Upstream) -> None:
    upstream.delay = 0.3
    busy_reader, busy_writer = await connect(client)
    idle_reader, idle_writer = await connect(client)
    try:
        busy_writer.write(signed("evt_shutdown"))
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        front = front_of(client)
        front.pre_shutdown()  # what the runner's cleanup does first
        assert await closed_within(idle_reader, 2)  # an idle connection is closed at once
        drained = asyncio.create_task(front.shutdown(5))
        status, headers, body = await read_response(busy_reader)
        assert status == 200 and body == b'{"ok": true}'
        assert headers["connection"] == "close"  # shutting down: no keep-alive
        await asyncio.wait_for(drained, 5)
        assert await closed_within(busy_reader, 2)
    finally:
        busy_writer.close()
        idle_writer.close()


async def test_front_whitespace_after_a_header_value_is_not_part_of_it(
    client: Any, upstream: Upstream
) -> None:
    """llhttp keeps it, aiohttp's parser strips it: a signature followed by a space verified only through aiohttp."""
    body = stripe_body("evt_ows")
    headers = stripe_headers(body)
    raw = post("/webhooks/stripe", body, {**headers, "Stripe-Signature": headers["Stripe-Signature"] + " \t"})
    raw = raw.replace(b"Host: sidecar.test\r\n", b"Host: sidecar.test  \r\n")
    status, _, answer = await exchange(client, raw)
    assert (status, answer) == (200, b'{"ok": true}')
    assert upstream.received[0].headers["stripe-signature"] == headers["Stripe-Signature"]
    assert upstream.received[0].headers["x-forwarded-host"] == "sidecar.test"
    assert (front_of(client).fast_requests, front_of(client).handed_over) == (1, 0)


async def test_front_relays_the_upstream_answer_as_aiohttp_does(client: Any, upstream: Upstream) -> None:
    """A 204 has no Content-Length or Content-Type; an empty body no default Content-Type; the upstream's Date and
    Server go through. Answers on one keep-alive connection, so a framing mistake shows in the next one."""
    date = "Mon, 01 Jan 2001 00:00:00 GMT"
    upstream.respond(204)
    upstream.respond(200)
    upstream.respond(200, headers={"Server": "upstream/1", "Date": date}, body=b"done")
    reader, writer = await connect(client)
    try:
        answers = []
        for event_id in ("evt_r1", "evt_r2", "evt_r3"):
            writer.write(signed(event_id))
            answers.append(await read_response(reader))
    finally:
        writer.close()
    (s1, h1, b1), (s2, h2, b2), (s3, h3, b3) = answers
    assert (s1, b1) == (204, b"") and "content-length" not in h1 and "content-type" not in h1
    assert (s2, b2) == (200, b"") and h2["content-length"] == "0" and "content-type" not in h2
    assert (s3, b3) == (200, b"done") and h3["server"] == "upstream/1" and h3["date"] == date
    assert front_of(client).fast_requests == 3


def test_front_serialize_drops_what_utf8_cannot_carry() -> None:
    """Undecodable upstream bytes reach a header as surrogates: aiohttp's writer drops them; so does the front
    (a name it once encoded as Latin-1 raised, and the connection was never answered)."""
    resp = web.Response(body=b"x", headers={"X-Raw": "caf\udce9", "X-\udcff": "v"})
    wire = serialize(resp, close=False)
    assert b"\r\nX-Raw: caf\r\n" in wire and b"\r\nX-: v\r\n" in wire


def test_front_serialize_drops_a_header_that_would_split_the_answer() -> None:
    """A CR or LF in a header's name or value would end the line and start another header (or the body) on the
    wire: aiohttp's writer refuses it; the front leaves that header out and sends the rest."""
    resp = web.Response(body=b"x", headers={"X-A": "a\r\nX-Injected: 1", "X-B\nX-Evil": "v", "X-Ok": "1"})
    wire = serialize(resp, close=False)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert body == b"x" and b"X-Ok: 1\r\n" in wire
    assert b"Injected" not in wire and b"Evil" not in wire and b"\n" not in head.replace(b"\r\n", b"")


async def test_front_body_in_pieces_parses_the_head_once(
    client: Any, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each piece of a body re-parsed the whole head (up to 8 KiB through llhttp and a multidict): a client
    dribbling a large body one byte per segment cost a parse per byte."""
    made = []
    real = httptools.HttpRequestParser

    def counting(protocol: Any) -> Any:
        made.append(protocol)
        return real(protocol)

    monkeypatch.setattr(front_module.httptools, "HttpRequestParser", counting)
    raw = signed("evt_pieces")
    body_at = raw.index(b"\r\n\r\n") + 4
    reader, writer = await connect(client)
    try:
        writer.write(raw[:body_at])
        for i in range(body_at, len(raw), 9):  # ten pieces of the body, each its own segment
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(raw[i : i + 9])
        status, _, _ = await read_response(reader)
    finally:
        writer.close()
    assert status == 200 and upstream.ids() == ["evt_pieces"]
    assert len(made) <= 2, len(made)  # the head alone, then the head with all of its body


async def test_front_answers_500_and_closes_when_the_answer_cannot_be_written(
    client: Any, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception after the ingress returned escaped `_serve` and left the connection open, never answered and
    never swept (its deadline was 0 while busy)."""
    real = front_module.serialize

    def failing(resp: web.StreamResponse, close: bool) -> bytes:
        if resp.status == 200:
            raise ValueError("cannot serialize")
        return real(resp, close)

    monkeypatch.setattr(front_module, "serialize", failing)
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_unwritable"))
        status, headers, body = await read_response(reader)
        assert await closed_within(reader, 5)
    finally:
        writer.close()
    assert (status, body) == (500, b'{"error": "internal_error"}') and headers["connection"] == "close"
    assert upstream.ids() == ["evt_unwritable"]


async def test_front_shutdown_cancels_a_request_whose_client_is_gone(client: Any, upstream: Upstream) -> None:
    """A connection its client closed leaves `conns`; its request still runs. Past the grace it must be cancelled
    and finished like the others, not left running while the runner closes the store and the session."""
    upstream.delay = 1.5
    _reader, writer = await connect(client)
    writer.write(signed("evt_orphan"))
    await asyncio.wait_for(upstream.arrived.wait(), 10)
    writer.transport.abort()
    front = front_of(client)
    for _ in range(100):  # the abort reaches the server
        if not front.conns:
            break
        await asyncio.sleep(0.01)
    front.pre_shutdown()
    await asyncio.wait_for(front.shutdown(0.2), 5)
    serving = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "FastProtocol._serve"]  # type: ignore[union-attr]
    assert serving == []


async def test_front_shutdown_lets_a_request_still_arriving_finish(client: Any, upstream: Upstream) -> None:
    """A request whose body is still on its way at shutdown is served (and its connection closed), as aiohttp
    serves a request it has started reading."""
    raw = signed("evt_arriving")
    upstream.delay = 0.3
    reader, writer = await connect(client)
    busy_reader, busy_writer = await connect(client)
    try:
        busy_writer.write(signed("evt_busy"))  # keeps the drain waiting while the other body arrives
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        writer.write(raw[:-10])
        await writer.drain()
        await asyncio.sleep(0.05)
        front = front_of(client)
        front.pre_shutdown()
        drained = asyncio.create_task(front.shutdown(5))
        writer.write(raw[-10:])
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["x-sidecar-event-id"] == "evt_arriving"
        assert headers["connection"] == "close"
        assert (await read_response(busy_reader))[0] == 200
        await asyncio.wait_for(drained, 5)
    finally:
        writer.close()
        busy_writer.close()
    assert sorted(upstream.ids()) == ["evt_arriving", "evt_busy"]


async def test_front_every_connection_line_names_hop_by_hop_headers(client: Any, upstream: Upstream) -> None:
    """A header named in a second `Connection` line is hop-by-hop too (RFC 9110 §5.3: the lines of a list field
    are one list): not forwarded nor stored for retries, whether the front or aiohttp (a chunked body) serves it."""
    hop = "Connection: keep-alive\r\nConnection: X-Hop\r\nX-Hop: this hop only\r\n"
    body = stripe_body("evt_hop_chunked")
    chunked = post("/webhooks/stripe", b"", stripe_headers(body), hop + "Transfer-Encoding: chunked\r\n")
    chunked = (
        chunked.replace(b"Content-Length: 0\r\n", b"")
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    for raw in (signed("evt_hop_fast", extra=hop), chunked):
        status, _, answer = await exchange(client, raw)
        assert status == 200, answer
    assert upstream.ids() == ["evt_hop_fast", "evt_hop_chunked"]
    assert [r.body for r in upstream.received] == [stripe_body("evt_hop_fast"), body]
    for got in upstream.received:
        assert "x-hop" not in got.headers and "connection" not in got.headers, got.headers
    assert (front_of(client).fast_requests, front_of(client).handed_over) == (1, 1)


def test_end_to_end_reads_every_connection_line() -> None:
    """The upstream's answer too: what any of its Connection lines names is not relayed to the provider."""
    relayed = [
        ("Connection", "keep-alive"),
        ("X-Kept", "1"),
        ("connection", "X-Up, Keep-Alive"),
        ("X-Up", "2"),
    ]
    assert end_to_end(relayed) == [("X-Kept", "1")]


@pytest.mark.parametrize("end", [b"\n\n", b"\n\r\n"])
async def test_front_head_ended_by_a_bare_lf_is_answered_at_once(
    client: Any, upstream: Upstream, end: bytes
) -> None:
    """A head whose lines end in a bare LF is refused with 400 at once, as aiohttp refuses it, not held until the
    read timeout and closed without a word (the front waited for a CRLF CRLF that never came)."""
    raw = b"POST /webhooks/plain HTTP/1.1\nHost: x\nX-Event-Id: evt_lf\nContent-Length: 3" + end + b"abc"
    start = time.monotonic()
    status, _, body = await exchange(client, raw)
    assert status == 400 and json.loads(body)["error"] == "bad_request", body
    assert time.monotonic() - start < 0.9  # the fixture's read_timeout is 1 s
    assert upstream.received == []


# -- aiohttp's path: edges an HTTP audit met ---------------------------------------------------------------------


async def test_a_pass_through_keeps_every_line_of_a_repeated_header(client: Any, upstream: Upstream) -> None:
    """`X-Dup: 1` then `x-dup: 2` on a GET went out as `x-dup: 2` alone: aiohttp's client keeps the lines of a
    repeated name only when they are spelled alike."""
    raw = b"GET /webhooks/plain HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\nConnection: close\r\n\r\n"
    status, _, _ = await exchange(client, raw)
    assert status == 200
    [got] = upstream.received
    assert [v for k, v in got.raw_headers if k.lower() == "x-dup"] == ["1", "2"]


async def test_a_transfer_coding_other_than_chunked_is_refused_not_stored(
    client: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """aiohttp removes `chunked` and ignores a coding before it: the still-gzipped bytes were claimed and forwarded
    as the event, with nothing left to say so. RFC 9112 §6.1: 501."""
    gz = gzip.compress(b'{"id": "evt_te"}')
    raw = (
        b"POST /webhooks/plain HTTP/1.1\r\nHost: h\r\nX-Event-Id: evt_te\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(gz), gz)
    )
    status, _, body = await exchange(client, raw)
    assert status == 501 and json.loads(body)["error"] == "unsupported_transfer_coding"
    assert upstream.received == [] and rdb.keys("*evt_te*") == []


@pytest.mark.parametrize("method", [b"POST", b"PUT"])
@pytest.mark.parametrize("coding", [b"", b"chunked, ", b" , chunked"])
async def test_an_empty_transfer_coding_is_a_400_not_a_501(
    client: Any, upstream: Upstream, rdb: redis.Redis, method: bytes, coding: bytes
) -> None:
    """`Transfer-Encoding: ` (found by the hostile-request fuzzer, with a Content-Length beside it) names no coding:
    malformed framing, the client's error (400), not a coding the sidecar does not implement (501, a 5xx)."""
    raw = (
        method + b" /webhooks/plain HTTP/1.1\r\nHost: h\r\nX-Event-Id: evt_te_empty\r\n"
        b"Transfer-Encoding: " + coding + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, _, body = await exchange(client, raw)
    assert status == 400, body
    assert json.loads(body)["error"] == "bad_request"
    assert upstream.received == [] and rdb.keys("*evt_te_empty*") == []


async def test_a_client_gone_mid_body_on_aiohttps_path_is_counted_not_an_error(
    client: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked body cut by the client: aiohttp's path logged an error-level traceback (any client can cause
    it) and counted outcome "error". The test server runs as `sidecar run` does, without handler cancellation."""
    _reader, writer = await connect(client)
    writer.write(b"POST /webhooks/plain HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")
    await writer.drain()
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.INFO):
        writer.close()
        for _ in range(50):
            lines = [r for r in caplog.records if r.name == "sidecar.ingress" and r.getMessage() == "request"]
            if lines:
                break
            await asyncio.sleep(0.02)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    [line] = lines
    assert line.__dict__["outcome"] == "client_closed"
    assert upstream.received == []


@pytest.mark.parametrize(
    "raw",
    [b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"],
)
async def test_the_routers_own_404_is_json(client: Any, raw: bytes) -> None:
    status, _, body = await exchange(client, raw)
    assert status == 404 and json.loads(body) == {"error": "no_route"}


async def test_a_malformed_chunk_mid_body_is_a_400_at_once_not_a_408(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's path (a chunked body): llhttp's error for a bad chunk size arriving after the handler began went
    into a 400 queued for after the handler, which waited for the rest of the body until read_timeout (408)."""
    client = await sidecar_factory(ROUTES, server="read_timeout: 5s")
    reader, writer = await connect(client)
    writer.write(
        b"POST /webhooks/plain HTTP/1.1\r\nHost: h\r\nX-Event-Id: evt_bad_chunk\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler is reading the body
    writer.write(b"zz\r\nbad\r\n0\r\n\r\n")
    try:
        status, headers, body = await read_response(reader)
        assert await closed_within(reader, 4)
    finally:
        writer.close()
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body) == {
        "error": "bad_request",
        "detail": "malformed body framing (a chunk size or chunk end)",
    }
    assert upstream.received == [] and rdb.keys("*evt_bad_chunk*") == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_front_bytes_after_a_refused_request_are_not_held_in_reference_cycles(client: Any) -> None:
    """aiohttp queues one parse error per read of a client still sending after a refused request, each holding its
    traceback, whose frames hold that read's bytes and the protocol that holds the error: a cycle freed only by the
    gc's rare full collections (an audit: RSS +0.85 GB over 800 requests sending 10 MB after a head without
    Content-Length). The first error's traceback is dropped and nothing more is parsed."""
    import contextlib
    import gc
    import types

    gc.collect()
    gc.disable()
    try:
        reader, writer = await connect(client)
        # no length: an empty body
        writer.write(b"POST /webhooks/stripe HTTP/1.1\r\nHost: sidecar.test\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(32):
                # the sidecar reset it: uvloop raises RuntimeError on a write after that
                if writer.is_closing():
                    break
                writer.write(b"z" * 65536)
                await writer.drain()
                await asyncio.sleep(0.005)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.sleep(0.2)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = sum(
            len(value)
            for frame in gc.garbage
            if isinstance(frame, types.FrameType) and frame.f_code.co_name == "data_received"
            for value in frame.f_locals.values()
            if isinstance(value, bytes | bytearray)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert held == 0


async def test_front_pipelining_client_cannot_grow_the_buffer(client: Any) -> None:
    """A client pipelining requests far ahead of the answers: each answer used to resume reading whatever the buffer
    held, so every ~100-byte request served let one more socket read in (the buffer, and RSS, grew by GBs)."""
    front = front_of(client)
    forged = b"POST /webhooks/stripe HTTP/1.1\r\nHost: a\r\nStripe-Signature: t=1,v1=00\r\nContent-Length: 2\r\n\r\n{}"
    reader, writer = await connect(client)
    limit = front_module.MAX_HEAD + front.ingress.dispatcher.config.server.max_body_bytes
    biggest = 0
    try:
        for _ in range(40):
            writer.write(forged * 2000)
            await asyncio.wait_for(reader.read(1 << 20), 5)  # reads answers, slower than it sends
            biggest = max([biggest, *(len(conn.buf) for conn in front.conns)])
    finally:
        writer.close()
    assert biggest <= limit + (1 << 18)  # one read past the limit at most


async def test_front_client_not_reading_its_answers_is_not_served_further(
    client: Any, upstream: Upstream
) -> None:
    """The transport's write buffer over its high-water mark (the client does not read its answers) pauses the
    front: no further request is served, and none read, until it drains (as aiohttp's handler awaits drain).
    Before, every answer went on into the buffer: a client sending without reading grew the process's memory."""
    front = front_of(client)
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_wp1"))
        assert (await read_response(reader))[0] == 200
        (conn,) = front.conns
        conn.pause_writing()  # what the transport calls past its high-water mark
        writer.write(signed("evt_wp2"))
        await asyncio.sleep(0.3)
        assert upstream.ids() == ["evt_wp1"] and not conn.busy
        conn.resume_writing()
        assert (await read_response(reader))[0] == 200
    finally:
        writer.close()
    assert upstream.ids() == ["evt_wp1", "evt_wp2"]


async def test_front_hand_over_keeps_the_requests_it_buffered_apart(client: Any, upstream: Upstream) -> None:
    """Requests that arrived one by one while a fast one was served reach aiohttp one read each: its parser drops
    every request of a read in which a later one is malformed."""
    upstream.delay = 0.3
    reader, writer = await connect(client)
    get = b"GET /webhooks/stripe?x=1 HTTP/1.1\r\nHost: sidecar.test\r\n\r\n"
    bad = b"POST /webhooks/stripe HTTP/1.1\r\nHost: sidecar.test\r\nX-Bad : 1\r\n\r\n"
    try:
        writer.write(signed("evt_ho1"))
        await asyncio.sleep(0.05)
        for raw in (get, signed("evt_ho2"), bad):
            writer.write(raw)
            await asyncio.sleep(0.03)
        answers = [await read_response(reader) for _ in range(4)]
    finally:
        writer.close()
    assert [a[0] for a in answers] == [200, 200, 200, 400]
    assert upstream.ids() == ["evt_ho1", "", "evt_ho2"]  # the GET passed through


def test_front_requests_cuts_after_each_framed_request() -> None:
    get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    up = b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\nz"
    chunked = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nq\r\n0\r\n\r\n"
    bad = b"GET / HTTP/1.1\r\nX : y\r\n\r\n"
    assert front_module._requests(get + post + up + bad) == [get, post, up, bad]
    assert front_module._requests(post + chunked + get) == [post, chunked + get]
    assert front_module._requests(post[:-1]) == [post[:-1]]
    assert front_module._requests(b"\r\n" + get + get) == [b"\r\n" + get, get]


def test_front_requests_cuts_at_most_32_pieces() -> None:
    """Past aiohttp's queue of 32 requests the rest goes as one read, which aiohttp parses as it goes: fed one read
    each, 1 MiB of tiny pipelined requests was parsed whole at once (the event loop held 0.25 s per MiB)."""
    get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    pieces = front_module._requests(get * 100)
    assert len(pieces) == 33 and pieces[:32] == [get] * 32 and pieces[32] == get * 68


# A client in another process: it stops this (the server's) process with SIGSTOP after its first exchange (case
# keep_alive) or after sending a head (cases body, chunked), sends the rest 0.2 s later, resumes the server 2 s
# later (past read_timeout, 1 s) and prints what it was answered.
_STALLING_CLIENT = """
import os, signal, socket, sys, time
port, server, case, first, second = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *map(bytes.fromhex, sys.argv[4:6])
s = socket.create_connection(("127.0.0.1", port)); s.settimeout(10)
def answer():
    data = b""
    try:
        while b"\\r\\n\\r\\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return data or b"<closed>"
            data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        n = next(int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\\r\\n")) if k.lower() == b"content-length")
        while len(body) < n:
            body += s.recv(65536)
        return head.split(b"\\r\\n")[0] + b" " + body
    except OSError as exc:
        return repr(exc).encode()
s.sendall(first)
if case == "keep_alive":
    answer()
else:
    time.sleep(0.1)  # the head is read, the body not all
os.kill(server, signal.SIGSTOP)
try:
    time.sleep(0.2); s.sendall(second); time.sleep(2.0)
finally:
    os.kill(server, signal.SIGCONT)
print(answer().decode("latin-1"))
"""


@pytest.mark.parametrize("case", ["keep_alive", "body", "chunked"])
async def test_front_a_request_that_came_in_time_during_a_stall_is_served(
    client: Any, upstream: Upstream, case: str
) -> None:
    """A stall of the whole process (SIGSTOP, a frozen cgroup or VM, a long GC) past read_timeout (1 s), while a
    request arrives in time: the next one on a keep-alive connection 0.2 s after the last answer, or the rest of a
    body 0.2 s after its head. At the resume the sweep and the bytes were due together, and the loop ran the sweep
    first: the connection was reset (keep-alive) or answered 408 (body). The sweep gives the sockets one more poll."""
    import os
    import sys

    if case == "keep_alive":
        first, second = signed("evt_stall_1"), signed("evt_stall_2")
    else:
        raw = signed("evt_stall_2") if case == "body" else signed_chunked(stripe_body("evt_stall_2"))
        first, second = raw[:-10], raw[-10:]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _STALLING_CLIENT,
        str(client.port),
        str(os.getpid()),
        case,
        first.hex(),
        second.hex(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert out.startswith(b"HTTP/1.1 200"), out
    assert "evt_stall_2" in upstream.ids()


@dataclass
class Taken:
    client: Any
    first: bytes  # the held event's body, counted against the budget
    gate: asyncio.Event  # set: the upstream answers the held event
    raw: bytes  # the second event's request, which does not fit
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def budget_taken(sidecar_factory: Any, upstream: Upstream, read_timeout: str) -> AsyncIterator[Taken]:
    """A sidecar whose in-flight budget (100,000 bytes) holds a 60 KB event its upstream keeps (evt_big1), a raw
    connection to it, and a second 60 KB event (evt_big2), which does not fit, as request bytes. On leaving: the
    connection closed, the upstream let go, and the held event answered 200."""
    from tests.test_ingress import _padded, held_by_upstream

    client = await sidecar_factory(ROUTES, server=f"max_inflight_bytes: 100000, read_timeout: {read_timeout}")
    first, held, gate = await held_by_upstream(client, upstream, "evt_big1")
    second = _padded("evt_big2", 60_000)
    reader, writer = await connect(client)
    try:
        yield Taken(
            client, first, gate, post("/webhooks/stripe", second, stripe_headers(second)), reader, writer
        )
    finally:
        writer.close()
        gate.set()
    assert (await asyncio.wait_for(held, 10)).status == 200


async def test_front_a_body_over_the_inflight_budget_is_refused_without_being_held(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A body over `server.max_inflight_bytes` was handed to aiohttp, whose lingering read buffered it for the 503:
    800 concurrent 1 MB uploads against a 64 MiB budget took 6x the budget (an audit). The front answers 503
    itself, drops the rest of the body as it comes (holding none of it), and closes once it is all in."""
    from sidecar.app import RUNTIME

    async with budget_taken(sidecar_factory, upstream, "5s") as t:
        ingress = t.client.server.app[RUNTIME].ingress
        front = front_of(t.client)
        t.writer.write(t.raw[:-20_000])  # over the budget; the rest of the body still to come
        status, headers, body = await read_response(t.reader)
        assert (status, json.loads(body), headers["connection"]) == (503, {"error": "overloaded"}, "close")
        assert front.handed_over == 0  # answered by the front, not handed to aiohttp's lingering read
        assert len(front.conns) == 2  # the held request's and this one, holding none of its body
        assert all(not conn.buf and conn.pending is None for conn in front.conns)
        assert ingress.inflight_bytes == len(t.first)  # none of the refused body counted
        t.writer.write(t.raw[-20_000:])  # the rest, read and dropped: then the connection is closed
        assert await asyncio.wait_for(t.reader.read(), 10) == b""
    assert front.handed_over == 0
    assert ingress.tel.requests[("stripe", "overloaded")] == 1
    assert upstream.ids() == ["evt_big1"]


async def test_front_a_refused_body_that_ends_on_a_read_boundary_serves_nothing_behind_it(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """The rest of a body refused 503 arriving in reads that end exactly where the body ends: the connection lingers
    LINGER_S for what the client pipelined, then closes; a request pipelined behind the refused one is dropped
    unread (the client was answered 503 and EOF), not claimed and forwarded, nor the connection held to its
    read_timeout."""
    async with budget_taken(sidecar_factory, upstream, "10s") as t:
        front = front_of(t.client)
        t.writer.write(t.raw[:-20_000])
        status, _, body = await read_response(t.reader)
        assert (status, json.loads(body)) == (503, {"error": "overloaded"})
        [refused] = [conn for conn in front.conns if conn.dropping]
        t.gate.set()
        t.writer.write(t.raw[-20_000:])  # the rest of the refused body, on its own
        await t.writer.drain()
        await asyncio.sleep(0.3)
        started = time.monotonic()
        t.writer.write(signed("evt_behind_refused"))  # pipelined behind it, in a later read
        await t.writer.drain()
        assert await wait_until(lambda: refused not in front.conns, 8), "the refused connection still open"
        assert time.monotonic() - started < front_module.LINGER_S + 2
    await asyncio.sleep(0.2)
    assert upstream.ids() == ["evt_big1"]


async def test_front_a_refused_body_all_in_lingers_briefly_not_until_its_read_timeout(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A body refused 503 overloaded that had all arrived: only a client pipelining behind it still sends, so the
    connection lingers LINGER_S at most, not the request's whole read_timeout (10 s here)."""
    async with budget_taken(sidecar_factory, upstream, "10s") as t:
        front = front_of(t.client)
        t.writer.write(t.raw)  # all of it in one write
        status, _, body = await read_response(t.reader)
        started = time.monotonic()
        assert (status, json.loads(body)) == (503, {"error": "overloaded"})
        [refused] = [conn for conn in front.conns if conn.dropping]
        t.gate.set()
        assert await wait_until(lambda: refused not in front.conns, 8), "the refused connection still open"
        assert time.monotonic() - started < front_module.LINGER_S + 2


async def test_front_a_body_growing_past_the_inflight_budget_is_refused_as_it_arrives(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A body whose first bytes fit the in-flight budget and whose later ones do not: refused 503 overloaded when
    the piece that crosses the budget arrives, not buffered uncounted until its end (or its 408)."""
    from sidecar.app import RUNTIME

    async with budget_taken(sidecar_factory, upstream, "5s") as t:
        ingress = t.client.server.app[RUNTIME].ingress
        body_at = t.raw.index(b"\r\n\r\n") + 4
        t.writer.write(t.raw[: body_at + 1000])  # within the budget: 60 KB held + 1 KB
        await t.writer.drain()
        await asyncio.sleep(0.2)
        assert ingress.inflight_bytes == len(t.first) + 1000
        started = time.monotonic()
        t.writer.write(t.raw[body_at + 1000 : body_at + 41_000])  # past it; 19 KB of the body still to come
        status, _, body = await asyncio.wait_for(read_response(t.reader), 10)
        assert (status, json.loads(body)) == (503, {"error": "overloaded"})
        assert time.monotonic() - started < 1.0
        assert ingress.inflight_bytes == len(t.first)
    assert upstream.ids() == ["evt_big1"]


async def test_front_a_request_pipelined_after_connection_close_is_not_served(
    client: Any, upstream: Upstream
) -> None:
    """RFC 9112 §9.6: nothing after a request with `Connection: close` is served. A request pipelined behind it
    was claimed and forwarded, its answer written to a connection already closing (never read)."""
    reader, writer = await connect(client)
    try:
        writer.write(signed("evt_close_first", extra="Connection: close\r\n") + signed("evt_after_close"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_within(reader, 2)
    finally:
        writer.close()
    await asyncio.sleep(0.3)
    assert upstream.ids() == ["evt_close_first"]
