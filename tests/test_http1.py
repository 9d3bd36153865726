"""The forwarding client against real servers that behave, and servers that do not: keep-alive reuse, chunked and
close-delimited bodies, interim answers, timeouts, refused connections, mid-response disconnects, the keep-alive
race, oversized answers, non-ASCII header bytes, and a request not sent when its connection came too late."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from sidecar.http1 import Http1Client, Origin, UpstreamError
from tests.procs import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    return head, await reader.readexactly(length)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a raw TCP server on 127.0.0.1 with a scripted handler; returns its URL."""
    servers: list[asyncio.base_events.Server] = []
    writers: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: Handler) -> str:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                tasks.discard(task)

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook?x=1"

    yield start
    for task in list(tasks):  # handlers still sleeping (the hanging upstream): stop them
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    await asyncio.sleep(0)


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    c = Http1Client(max_connections=10)
    yield c
    c.close()


async def test_http1_posts_exact_bytes_and_reuses_one_connection(upstream, client: Http1Client) -> None:
    body = b'{"id":"evt_1","note":"\xc3\xa9"}'
    for _ in range(5):
        resp = await client.post(
            upstream.url + "/in?a=1", [("X-Custom", "v"), ("Content-Type", "application/json")], body, 2.0
        )
        assert resp.status == 200 and resp.body == b'{"ok": true}'
        assert ("X-Upstream", "yes") in resp.headers
    assert [r.body for r in upstream.received] == [body] * 5
    first = upstream.received[0]
    assert first.path_qs == "/in?a=1"
    assert first.headers["x-custom"] == "v" and first.headers["host"].startswith("127.0.0.1:")
    idle = sum(len(q) for q in client._idle.values())
    assert idle == 1  # five sequential requests, one kept-alive connection


async def test_http1_concurrent_requests_each_get_their_own_answer(client: Http1Client) -> None:
    async def echo(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        results = await asyncio.gather(
            *(client.post(f"http://127.0.0.1:{port}/e", [], f"body-{i}".encode(), 2.0) for i in range(50))
        )
        assert [r.body for r in results] == [f"body-{i}".encode() for i in range(50)]
    finally:
        await runner.cleanup()


async def test_http1_chunked_and_close_delimited_bodies(raw_server, client: Http1Client) -> None:
    async def chunked(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async def until_close(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nX-A: 1\r\n\r\npartial-then-")
        await writer.drain()
        writer.write(b"close")
        await writer.drain()
        writer.close()

    resp = await client.post(await raw_server(chunked), [], b"x", 2.0)
    assert (resp.status, resp.body) == (200, b"hello world")
    resp = await client.post(await raw_server(until_close), [], b"x", 2.0)
    assert (resp.status, resp.body) == (201, b"partial-then-close")


async def test_http1_trailers_are_not_taken_for_headers(raw_server, client: Http1Client) -> None:
    """A chunked answer's trailer fields were merged into its headers and relayed to the provider as such (an
    upstream audit): a trailer is not part of the head."""

    async def with_trailers(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nX-Head: 1\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nContent-Type: text/evil\r\n\r\n"
        )
        await writer.drain()

    url = await raw_server(with_trailers)
    resp = await client.post(url, [], b"x", 2.0)
    assert (resp.status, resp.body) == (200, b"hello")
    names = [k.lower() for k, _ in resp.headers]
    assert "x-head" in names and "x-checksum" not in names and "content-type" not in names


async def test_http1_skips_interim_answers(raw_server, client: Http1Client) -> None:
    async def early_hints(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()

    resp = await client.post(await raw_server(early_hints), [], b"x", 2.0)
    assert (resp.status, resp.body) == (202, b"ok")


async def test_http1_timeout_refused_and_mid_response_disconnect(raw_server, client: Http1Client) -> None:
    async def hang(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    def part_of(status: bytes, then_close: bool) -> Handler:
        """A head with Content-Length 100, 9 bytes of body, then a close or a stall."""

        async def answer(reader, writer):
            await read_request(reader)
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100\r\n\r\nonly-part")
            await writer.drain()
            if then_close:
                writer.close()
            else:
                await asyncio.sleep(5)

        return answer

    with pytest.raises(UpstreamError) as exc:
        await client.post(await raw_server(hang), [], b"x", 0.3)
    assert exc.value.kind == "timeout"
    with pytest.raises(UpstreamError) as exc:
        await client.post(f"http://127.0.0.1:{free_port()}/", [], b"x", 1.0)
    assert exc.value.kind == "connect_error"
    # a 2xx head is the receiver saying it took the event: cut short after it, still a delivery (bare status),
    # as an unparseable or oversized rest of a 2xx is; sending it again would deliver it twice
    resp = await client.post(await raw_server(part_of(b"200 OK", then_close=True)), [], b"x", 1.0)
    assert (resp.status, resp.body) == (200, b"")
    # so is a 2xx head whose body stops coming: its timeout is not a failure to send again
    resp = await client.post(await raw_server(part_of(b"200 OK", then_close=False)), [], b"x", 0.3)
    assert (resp.status, resp.body) == (200, b"")
    # anything else cut short is still a failure (sent again)
    with pytest.raises(UpstreamError) as exc:
        await client.post(await raw_server(part_of(b"503 Busy", then_close=True)), [], b"x", 1.0)
    assert exc.value.kind == "disconnected"


async def test_http1_retries_once_when_a_kept_alive_connection_was_closed(
    raw_server, client: Http1Client
) -> None:
    served: list[int] = []

    async def one_then_close(reader, writer):
        await read_request(reader)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # says keep-alive, then closes
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    url = await raw_server(one_then_close)
    assert (await client.post(url, [], b"a", 1.0)).body == b"ok"
    await asyncio.sleep(0.15)  # the server has closed the idle connection
    assert (await client.post(url, [], b"b", 1.0)).body == b"ok"  # transparently on a new connection
    assert len(served) == 2


async def test_http1_a_connection_idle_past_the_idle_timeout_is_not_reused(raw_server) -> None:
    """A NAT or load balancer between here and the receiver may drop an idle connection without a FIN: a request
    written into it waits its whole timeout for nothing. Past `idle_timeout` a pooled connection is closed, not
    reused; within it, it is reused."""
    connections: list[int] = []

    async def answers_once_per_connection(reader, writer):  # then silent, as a connection dropped in between
        connections.append(1)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(30)

    url = await raw_server(answers_once_per_connection)
    client = Http1Client(max_connections=10, idle_timeout=0.2)
    try:
        assert (await client.post(url, [], b"a", 5.0)).body == b"ok"
        await asyncio.sleep(0.3)  # past the idle timeout
        assert (await client.post(url, [], b"b", 5.0)).body == b"ok"  # on a new connection, at once
        assert len(connections) == 2
        with pytest.raises(UpstreamError) as raised:  # within it: the pooled (silent) connection is reused
            await client.post(url, [], b"c", 0.3)
        assert raised.value.kind == "timeout" and len(connections) == 2
    finally:
        client.close()


async def test_http1_idle_connections_of_an_origin_no_longer_asked_for_are_closed(raw_server) -> None:
    """Idle connections are trimmed when their origin is asked for again; those of an origin no request goes
    to any more (a reload moved its routes away) were kept for the life of the process, each holding a file
    descriptor, a NAT's dropped ones included (a review). A forward to any origin past `idle_timeout` closes
    them."""
    closed = asyncio.Event()

    async def old_receiver(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the client closes the connection
        closed.set()

    async def new_receiver(reader, writer):
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    old, new = await raw_server(old_receiver), await raw_server(new_receiver)
    client = Http1Client(max_connections=10, idle_timeout=0.2)
    try:
        assert (await client.post(old, [], b"a", 5.0)).body == b"ok"
        assert (await client.post(new, [], b"b", 5.0)).body == b"ok"
        await asyncio.sleep(0.1)
        assert (await client.post(new, [], b"c", 5.0)).body == b"ok"
        assert not closed.is_set()  # within the idle timeout: kept
        await asyncio.sleep(0.3)
        assert (await client.post(new, [], b"d", 5.0)).body == b"ok"
        await asyncio.wait_for(closed.wait(), 2.0)
    finally:
        client.close()


@pytest.mark.parametrize("status", [400, 503])
async def test_http1_an_oversized_refusal_keeps_its_status(
    raw_server, client: Http1Client, monkeypatch, status
) -> None:
    """A 4xx stays permanent and a 5xx retryable when their body is too large to relay (a 400 with a 20 MB body
    was retried as `response_too_large` until its attempts were spent)."""
    monkeypatch.setattr("sidecar.http1.MAX_RESPONSE_BYTES", 1000)

    async def huge(reader, writer):
        await read_request(reader)
        writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: 5000\r\n\r\n".encode() + b"z" * 5000)
        await writer.drain()

    resp = await client.post(await raw_server(huge), [], b"x", 1.0)
    assert (resp.status, resp.body) == (status, b"")


async def test_http1_stray_bytes_on_an_idle_connection_close_it(raw_server, client: Http1Client) -> None:
    """Bytes past an answer's end that arrive while the connection is idle (here the start of a second answer):
    the next request on it read its own answer as the rest of them and came back as status 0 (dead-lettered
    while the receiver had taken the event). The connection is closed instead."""
    connections = []

    async def stray(reader, writer):
        connections.append(writer)
        if len(connections) == 1:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            await writer.drain()
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")
            await writer.drain()

    url = await raw_server(stray)
    assert (await client.post(url, [], b"a", 2.0)).body == b"ok"
    await asyncio.sleep(0.2)
    resp = await client.post(url, [], b"b", 2.0)
    assert (resp.status, resp.body) == (200, b"mine")


async def test_http1_pools_connections_by_host_not_by_url(upstream, client: Http1Client) -> None:
    for i in range(20):
        resp = await client.post(f"{upstream.url}/in?n={i}", [], b"{}", 2.0)
        assert resp.status == 200
    assert sum(len(q) for q in client._idle.values()) == 1


async def test_http1_a_2xx_too_large_to_relay_is_its_status_and_headers(
    raw_server, client: Http1Client, monkeypatch
) -> None:
    """The receiver acted and said 200: that answer stands, without the body (the connection is not reused)."""
    monkeypatch.setattr("sidecar.http1.MAX_RESPONSE_BYTES", 1000)

    async def huge(reader, writer):
        await read_request(reader)
        head = b'HTTP/1.1 200 OK\r\nX-Took: yes\r\nContent-Type: text/plain\r\nETag: "e1"\r\n'
        writer.write(head + b"Content-Length: 5000\r\n\r\n" + b"z" * 5000)
        await writer.drain()

    resp = await client.post(await raw_server(huge), [], b"x", 1.0)
    assert (resp.status, resp.body) == (200, b"") and ("X-Took", "yes") in resp.headers
    # what described the body that is not relayed goes with it
    assert not {k.lower() for k, _ in resp.headers} & {"content-type", "etag"}


async def test_http1_header_bytes_pass_through_unchanged(raw_server, client: Http1Client) -> None:
    seen: list[bytes] = []

    async def capture(reader, writer):
        head, _ = await read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Back: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    value = b"caf\xc3\xa9 \xff".decode("utf-8", "surrogateescape")  # how aiohttp hands us odd header bytes
    resp = await client.post(await raw_server(capture), [("X-Odd", value)], b"", 1.0)
    assert b"X-Odd: caf\xc3\xa9 \xff\r\n" in seen[0]
    assert ("X-Back", "café") in resp.headers


@pytest.fixture
async def gated() -> AsyncIterator[tuple[str, list[tuple[bytes, int]], asyncio.Event]]:
    """A real aiohttp upstream recording (body, the client's port) of each request; it holds a request whose body is
    `hold` until the event is set (5 s at most), one whose body is `slow` for 0.5 s, and answers the others at once."""
    seen: list[tuple[bytes, int]] = []
    gate = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((body, request.transport.get_extra_info("peername")[1]))  # type: ignore[union-attr]
        if body == b"hold":
            await asyncio.wait_for(gate.wait(), 5.0)
        elif body == b"slow":
            await asyncio.sleep(0.5)
        return web.Response(body=b"ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/in", seen, gate
    finally:
        gate.set()
        await runner.cleanup()


async def wait_for_request(seen: list[tuple[bytes, int]], body: bytes) -> None:
    async with asyncio.timeout(2.0):
        while body not in [b for b, _ in seen]:
            await asyncio.sleep(0.01)


async def test_http1_a_request_with_no_slot_within_its_timeout_is_not_sent(gated) -> None:
    """With `max_connections: 1` and the slot held past the request's timeout, the request is not written at all
    (PoolTimeout, retryable), and the slot and the connection serve the next request."""
    url, seen, gate = gated
    client = Http1Client(max_connections=1)
    try:
        holder = asyncio.create_task(client.post(url, [], b"hold", 5.0))
        await wait_for_request(seen, b"hold")
        with pytest.raises(UpstreamError) as exc:
            await asyncio.wait_for(client.post(url, [], b"late", 0.5), 2.0)
        assert exc.value.kind == "pool_timeout"  # retryable, nothing sent
        gate.set()
        assert (await asyncio.wait_for(holder, 2.0)).body == b"ok"
        assert [b for b, _ in seen] == [b"hold"]  # never reached the upstream
        assert (await asyncio.wait_for(client.post(url, [], b"next", 1.0), 2.0)).body == b"ok"
        assert [b for b, _ in seen] == [b"hold", b"next"]
        assert seen[0][1] == seen[1][1]  # on the holder's kept-alive connection
    finally:
        client.close()


async def test_http1_a_request_that_waited_for_its_slot_has_its_whole_timeout_to_answer(gated) -> None:
    """The audits' duplicates: one deadline covered the wait for a slot and the exchange, so a request that waited
    was written with what was left (45 ms of 2 s; under steady load 0.2-1.1 s against a 1.9 s receiver), counted
    as a timeout and retried while the receiver accepted it. The exchange has its own timeout now."""
    url, seen, gate = gated
    client = Http1Client(max_connections=1)
    try:
        holder = asyncio.create_task(client.post(url, [], b"hold", 5.0))
        await wait_for_request(seen, b"hold")
        late = asyncio.create_task(client.post(url, [], b"slow", 1.0))  # the receiver takes 0.5 s for it
        await asyncio.wait({late}, timeout=0.8)
        gate.set()  # the slot comes free with 0.2 s of the late request's timeout left
        assert (await asyncio.wait_for(holder, 2.0)).body == b"ok"
        assert (await asyncio.wait_for(late, 3.0)).body == b"ok"  # not a timeout
        assert [b for b, _ in seen] == [b"hold", b"slow"]
    finally:
        client.close()


def test_http1_origin_parsing() -> None:
    assert Origin.parse("http://h:80/p?q=1") == Origin("http", "h", 80, "h", "/p?q=1")
    assert Origin.parse("https://h/").host_header == "h"
    assert Origin.parse("http://[::1]:8080").host_header == "[::1]:8080"
    with pytest.raises(ValueError):
        Origin.parse("ftp://h/")


async def test_http1_a_close_delimited_answer_with_a_non_chunked_coding_is_complete(
    raw_server, client
) -> None:
    """RFC 9112 §6.3: a response whose Transfer-Encoding does not end in chunked is read until the close. It was
    counted as `disconnected`: a 200 sent again at every attempt, then dead-lettered."""

    async def gz(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nbody")
        await writer.drain()
        writer.close()

    resp = await client.post(await raw_server(gz), [], b"x", 2.0)
    assert (resp.status, resp.body) == (200, b"body")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_http1_a_2xx_the_parser_refuses_is_still_a_delivery(raw_server, client, head) -> None:
    """The receiver said 2xx: it has the event. Was: protocol_error, sent again at every attempt, dead-lettered."""

    async def bad(reader, writer):
        await read_request(reader)
        writer.write(head)
        await writer.drain()

    resp = await client.post(await raw_server(bad), [], b"x", 2.0)
    assert (resp.status, resp.headers, resp.body) == (200, [], b"")


async def test_http1_a_response_head_is_bounded(raw_server, client, monkeypatch) -> None:
    monkeypatch.setattr("sidecar.http1.MAX_HEAD_BYTES", 10_000)

    async def endless(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 100 + b"\r\n" * 1)
        for _ in range(1000):
            writer.write(b"X-Pad: " + b"p" * 100 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    with pytest.raises(UpstreamError) as exc:
        await client.post(await raw_server(endless), [], b"x", 2.0)
    assert exc.value.kind == "response_too_large"


@contextlib.contextmanager
def receiver_in_another_process() -> Iterator[str]:
    """A receiver in another process (it runs on while this one is stopped) that answers 200 `ok` 0.3 s after its
    first request: its URL."""
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket,time\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('127.0.0.1',{port})); s.listen(); print('ready', flush=True)\n"
            "c,_=s.accept(); c.recv(65536); time.sleep(0.3)\n"
            "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok'); time.sleep(10)\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


@contextlib.contextmanager
def this_process_stopped() -> Iterator[None]:
    """This process SIGSTOPped (a paused container, a debugger) from 0.1 s into the block, for 2 s."""
    import os
    import subprocess

    pauser = subprocess.Popen(
        ["sh", "-c", f"sleep 0.1; kill -STOP {os.getpid()}; sleep 2; kill -CONT {os.getpid()}"]
    )
    try:
        yield
    finally:
        pauser.wait(10)


async def test_http1_an_answer_that_came_while_the_process_was_stopped_is_not_a_timeout() -> None:
    """SIGSTOP (a paused container, a debugger) for longer than the timeout, while the upstream (another process,
    still running) answers at once: on SIGCONT the deadline and the answer are due together, and the loop runs the
    timer before it reads (the poll interrupted by the resume returns nothing). Failed then, the answer waiting in
    the socket buffer was a timeout and the event was delivered again (a chaos soak: 10 of ~22k events twice)."""
    client = Http1Client(max_connections=4)
    try:
        with receiver_in_another_process() as url, this_process_stopped():
            resp = await client.post(url, [], b"{}", timeout=1.0)
    finally:
        client.close()
    assert (resp.status, resp.body) == (200, b"ok")


async def test_a_pass_through_answer_that_came_while_the_process_was_stopped_is_not_a_timeout() -> None:
    """The same for a GET passed through (aiohttp's client, whose own total timeout ran first: 502 timeout although
    the receiver had answered in 0.3 s; a pause audit)."""
    import aiohttp

    from sidecar.forwarder import Forwarder, RetryPolicy

    async with aiohttp.ClientSession() as session:
        with receiver_in_another_process() as url, this_process_stopped():
            out = await Forwarder(session, 1.0).send(url, "GET", [], b"", RetryPolicy())
    assert (out.kind, out.status, out.body) == ("delivered", 200, b"ok")


async def test_http1_a_slow_connect_does_not_shorten_the_exchange(raw_server, client, monkeypatch) -> None:
    """The connect (nothing sent yet) and the exchange have a timeout each. With one deadline for both, a connect
    that took long (a SYN retransmitted to a receiver whose accept queue was full, this process paused mid-connect)
    left the request written with little time: a receiver answering in 0.3 s was a timeout, its event delivered
    again (repro/connect_deadline.py in the pause audit)."""
    got = []

    async def answer(reader, writer):
        got.append(await read_request(reader))
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    url = await raw_server(answer)
    slow_connects(monkeypatch, 0.8)  # 0.8 of the 1 s timeout
    resp = await client.post(url, [], b"{}", timeout=1.0)
    assert (resp.status, resp.body, len(got)) == (200, b"ok", 1)


def slow_connects(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every new connection of this loop takes `seconds` more (a SYN retransmitted, a long round trip)."""
    loop = asyncio.get_running_loop()
    connect = loop.create_connection

    async def slow_connect(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", slow_connect)


def stale_on_request_2(got: list[bytes], delay: Callable[[bytes], float]) -> Handler:
    """A receiver whose first connection is gone when request 2 comes on it (the keep-alive race: the request is
    unanswered); every other request is answered 200 `delay(body)` seconds after it came. `got`: what it answered."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = not got
        while True:
            _, body = await read_request(reader)
            if first and body == b"2":
                writer.transport.abort()  # the idle connection is gone: request 2 unanswered
                return
            got.append(body)
            await asyncio.sleep(delay(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return answer


async def test_http1_a_slow_reconnect_after_a_stale_connection_does_not_shorten_the_exchange(
    raw_server, client, monkeypatch
) -> None:
    """The retry on a fresh connection after the keep-alive race connected within the exchange's deadline: a
    reconnect taking 0.8 of the 1 s left a receiver answering in 0.3 s a timeout, the event sent again (a review)."""
    got: list[bytes] = []
    url = await raw_server(stale_on_request_2(got, lambda _: 0.3))
    assert (await client.post(url, [], b"1", timeout=1.0)).status == 200
    slow_connects(monkeypatch, 0.8)
    resp = await client.post(url, [], b"2", timeout=1.0)
    assert (resp.status, got) == (200, [b"1", b"2"])


async def test_http1_a_connect_cut_short_by_the_wait_for_a_slot_is_not_sent_not_a_timeout(
    raw_server, monkeypatch
) -> None:
    """The wait for a slot and the connect share one timeout. A request that waited 0.8 s for the one slot and then
    needed a 0.3 s connect ran out connecting: counted a receiver timeout (an attempt spent, a breaker failure)
    though not a byte was sent (a review). It is a PoolTimeout: given back with its attempt number."""
    from sidecar.http1 import PoolTimeout

    got = []

    async def answer(reader, writer):
        _, body = await read_request(reader)
        got.append(body)
        if body == b"A":
            await asyncio.sleep(0.5)  # with its own 0.3 s connect, A holds the only slot 0.8 s
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    url = await raw_server(answer)
    client = Http1Client(max_connections=1)
    slow_connects(monkeypatch, 0.3)
    try:
        a = asyncio.create_task(client.post(url, [], b"A", timeout=1.0))
        await asyncio.sleep(0.01)
        with pytest.raises(PoolTimeout):
            await client.post(url, [], b"B", timeout=1.0)
        assert (await a).status == 200
    finally:
        client.close()
    assert got == [b"A"]


async def test_http1_a_slow_reconnect_after_a_slot_wait_is_not_sent_not_a_timeout(
    raw_server, monkeypatch
) -> None:
    """B waits 0.8 s for the one slot, reuses the keep-alive connection A left, which the receiver closed, then
    reconnects in 0.8 s: the reconnect had until the first exchange's deadline and the exchange what was left of
    the connect's, 0.4 s for a receiver answering in 0.5 s: B timed out after the receiver got it, sent again (a
    review). The reconnect shares the slot wait's timeout like the first connect: B not sent, a PoolTimeout."""
    from sidecar.http1 import PoolTimeout

    got: list[bytes] = []
    first_conn: list[object] = []

    async def answer(reader, writer):
        if not first_conn:
            first_conn.append(writer)
        first = writer is first_conn[0]
        while True:
            _, body = await read_request(reader)
            if first and body == b"B":
                writer.transport.abort()  # the idle connection is gone: B unanswered
                return
            got.append(body)
            await asyncio.sleep(0.8 if body == b"A" else 0.5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await raw_server(answer)
    client = Http1Client(max_connections=1)
    try:
        a = asyncio.create_task(client.post(url, [], b"A", timeout=1.0))
        await asyncio.sleep(0.05)
        slow_connects(monkeypatch, 0.8)  # every new connection from now on
        with pytest.raises(PoolTimeout):
            await client.post(url, [], b"B", timeout=1.0)
        assert (await a).status == 200
        await asyncio.sleep(0.6)  # the receiver would have finished B by now
    finally:
        client.close()
    assert got == [b"A"]


async def test_http1_a_second_answer_in_the_same_read_closes_the_connection(raw_server, client) -> None:
    """The start of a second answer in the same read as the one awaited (not in a later read, which
    `test_http1_stray_bytes_on_an_idle_connection_close_it` covers): the connection is out of step and goes; kept,
    the next request's answer was read as the rest of that stray body (a timeout, the event sent again)."""
    connections: list[asyncio.StreamWriter] = []

    async def stray(reader, writer):
        connections.append(writer)
        first = len(connections) == 1
        while True:
            await read_request(reader)
            if first:
                first = False
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"  # one write: one read for the client
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")
            await writer.drain()

    url = await raw_server(stray)
    assert (await client.post(url, [], b"a", 1.0)).body == b"ok"
    resp = await client.post(url, [], b"b", 1.0)
    assert (resp.status, resp.body, len(connections)) == (200, b"mine", 2)


async def test_http1_skips_a_100_continue(raw_server, client) -> None:
    """`100 Continue` is an interim answer like any other 1xx (a receiver may send it unasked): the final answer
    follows; taken for the answer, the event was relayed as a 100 and its real status lost."""

    async def continue_first(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    resp = await client.post(await raw_server(continue_first), [], b"x", 2.0)
    assert (resp.status, resp.body) == (201, b"ok")


async def test_http1_an_answer_that_says_connection_close_is_not_reused(raw_server, client) -> None:
    """RFC 9112 §9.6: after an answer with `Connection: close` no further request goes on that connection, even
    while the server has not closed it yet."""
    seen: list[tuple[int, bytes]] = []
    connections: list[asyncio.StreamWriter] = []

    async def closing(reader, writer):
        connections.append(writer)
        number = len(connections)
        while True:
            _, body = await read_request(reader)
            seen.append((number, body))
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()  # and the socket left open a while, as a server closing lazily does

    url = await raw_server(closing)
    for body in (b"1", b"2"):
        assert (await client.post(url, [], body, 1.0)).body == b"ok"
    assert seen == [(1, b"1"), (2, b"2")]


async def test_http1_the_size_limits_count_each_answer_alone(raw_server, client, monkeypatch) -> None:
    """The head and body limits bound one answer, not the sum of the answers a kept-alive connection gave: counted
    across them, the fourth small answer on a connection was `response_too_large` (or, a 2xx, relayed bare)."""
    monkeypatch.setattr("sidecar.http1.MAX_HEAD_BYTES", 1000)
    monkeypatch.setattr("sidecar.http1.MAX_RESPONSE_BYTES", 1000)
    connections: list[asyncio.StreamWriter] = []

    async def answer(reader, writer):
        connections.append(writer)
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Pad: " + b"p" * 300 + b"\r\n"
                b"Content-Length: 400\r\n\r\n" + b"b" * 400
            )
            await writer.drain()

    url = await raw_server(answer)
    for _ in range(6):
        resp = await client.post(url, [], b"x", 1.0)
        assert (resp.status, resp.body) == (200, b"b" * 400)
        assert ("Content-Type", "text/plain") in resp.headers
    assert len(connections) == 1  # all on one kept-alive connection


async def test_http1_a_body_exactly_at_the_limit_is_relayed_whole(raw_server, client, monkeypatch) -> None:
    monkeypatch.setattr("sidecar.http1.MAX_RESPONSE_BYTES", 1000)

    async def answer(reader, writer):
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000
        )
        await writer.drain()

    resp = await client.post(await raw_server(answer), [], b"x", 1.0)
    assert (resp.status, resp.body) == (200, b"z" * 1000) and ("Content-Type", "text/plain") in resp.headers


async def test_http1_a_kept_alive_connection_closed_after_part_of_an_answer_is_not_sent_again(
    raw_server, client
) -> None:
    """Only a reused connection that closed before a single byte of answer is the keep-alive race (sent again on a
    new connection): one that closed after part of an answer had the request, and the receiver may have acted on
    it, so it is a failure (`disconnected`), sent again only by the retry schedule."""
    seen: list[bytes] = []

    async def answer(reader, writer):
        while True:
            _, body = await read_request(reader)
            seen.append(body)
            if body == b"2":
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\npart")
                await writer.drain()
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await raw_server(answer)
    assert (await client.post(url, [], b"1", 1.0)).body == b"ok"
    with pytest.raises(UpstreamError) as exc:
        await client.post(url, [], b"2", 1.0)
    assert exc.value.kind == "disconnected"
    assert seen == [b"1", b"2"]  # not sent a second time


async def test_http1_a_new_connection_closed_without_an_answer_is_not_sent_again(raw_server, client) -> None:
    """A connection made for this request and closed before any answer is no keep-alive race: the receiver read
    the request (it may have acted on it). `disconnected`, not sent again at once."""
    seen: list[bytes] = []

    async def crash(reader, writer):
        _, body = await read_request(reader)
        seen.append(body)
        writer.transport.abort()

    with pytest.raises(UpstreamError) as exc:
        await client.post(await raw_server(crash), [], b"1", 1.0)
    assert exc.value.kind == "disconnected"
    await asyncio.sleep(0.1)
    assert seen == [b"1"]


async def test_http1_a_connect_that_times_out_without_a_slot_wait_is_a_timeout(
    raw_server, client, monkeypatch
) -> None:
    """A connect that takes longer than the timeout, with a slot free at once, is the receiver's timeout (an
    attempt spent, a breaker failure), not a PoolTimeout (a slot that came too late, given back with its attempt
    number: a receiver that never accepts a connection would be tried for ever and never trip its breaker)."""

    async def answer(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    url = await raw_server(answer)
    slow_connects(monkeypatch, 1.0)
    with pytest.raises(UpstreamError) as exc:
        await client.post(url, [], b"x", timeout=0.2)
    assert exc.value.kind == "timeout"


async def test_http1_the_send_again_after_a_stale_connection_has_one_timeout_from_its_write(
    raw_server, client
) -> None:
    """The request sent again on a fresh connection after the keep-alive race has `timeout` from that write, as any
    exchange, not what is left of the connect's deadline on top (a receiver 1.5 timeouts late was waited for)."""
    got: list[bytes] = []
    url = await raw_server(stale_on_request_2(got, lambda body: 0.75 if body == b"2" else 0))  # 1.5 timeouts
    assert (await client.post(url, [], b"1", timeout=0.5)).status == 200
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamError) as exc:
        await client.post(url, [], b"2", timeout=0.5)
    assert exc.value.kind == "timeout"
    assert asyncio.get_running_loop().time() - started < 0.7
    assert got == [b"1", b"2"]
