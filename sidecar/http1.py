"""A small keep-alive HTTP/1.1 client for forwarding events: POST a body, read the whole answer.

Why not aiohttp's client here: measured on this machine, one aiohttp POST costs ~85-100 µs of Python per request,
as much as the rest of the sidecar's hot path together; this client (llhttp's C parser via httptools, a pooled
connection, one write per request) costs ~20 µs. It does only what forwarding needs — no redirects, cookies,
decompression or proxies — and `forwarder.py` keeps aiohttp for everything else (non-POST pass-through).

    pool      idle keep-alive connections per origin; at most `max_connections` requests in flight in total
    timeout   a request waits at most `timeout` for a slot and a connection (else PoolTimeout, or a connect
              timeout: nothing was written, so another attempt cannot duplicate it); once written it has `timeout`
              again for the whole response, however long it waited: a wait for a slot says the receiver is busy,
              not that it failed
    stale     a reused connection that the server had already closed (the keep-alive race) is retried once on a
              fresh connection, but only if not a single byte of response arrived
    idle      a connection idle for IDLE_TIMEOUT_S is not reused but closed: a NAT, conntrack table or load
              balancer between here and the receiver may have dropped it without a word (no FIN), and a request
              written into it would wait its whole `timeout` for an answer that cannot come
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from sidecar.durations import EXPIRY_GRACE

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT_S = 30.0  # under the usual idle cut-offs of what sits between (350 s NAT gateways, 4 min LBs)
MAX_HEAD_BYTES = 1024 * 1024  # status line + header section (+ trailers): not buffered without a bound either
# What describes a body: not relayed with a 2xx whose body was too large to relay (it goes without one)
_REPRESENTATION = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-language",
        "content-location",
        "content-range",
        "content-md5",
        "content-digest",
        "repr-digest",
        "digest",
        "etag",
        "last-modified",
    }
)


class UpstreamError(Exception):
    """The forward failed without a usable answer; `kind` is the label forwarded to outcomes and metrics."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


POOL_TIMEOUT = "pool_timeout"  # the kind of a forward that was not sent


class PoolTimeout(UpstreamError):
    """No slot under `max_connections` came free within the timeout: not a byte of the request was written, so it
    is safe to try again.

    The wait for a slot and the exchange have a timeout each. With one deadline for both, a request that waited
    for its slot was written with what was left and counted as a timeout while the receiver went on to accept it:
    the event arrived twice (external audits: 45 ms left of 2 s behind a 1.5 s receiver; under steady load, 22 of
    80 twice and a healthy receiver's circuit opened)."""

    def __init__(self, detail: str) -> None:
        super().__init__(POOL_TIMEOUT, detail)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: str
    target_prefix: str  # path (and query) of the URL
    # where a connection goes, the idle pool's key: a path or query never changes it
    pool: tuple[str, str, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", (self.scheme, self.host, self.port))

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, host, port, host_header, target)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._fut: asyncio.Future[Response] | None = None
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._head_size = 0
        self._status = 0
        self.received_any = False
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0  # loop time it went back to the pool

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._fut is None:
            # Bytes with no request outstanding (past a Content-Length, a 204's body...): the connection is out of
            # step with its requests, and the next request on it would read them as its own answer.
            self._fail(UpstreamError("protocol_error", "bytes from the upstream with no request outstanding"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol_error", "the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            status = self._status or self._parser.get_status_code()
            if 200 <= status < 300:
                self._status = status
                self._took_it()
            self._fail(UpstreamError("protocol_error", f"unparseable response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._fut is not None and not self._fut.done():
            if self._status and self._ends_at_close():
                self._complete()  # a body delimited by the connection's end (no length, not chunked)
            elif 200 <= self._status < 300:
                # closed before the end of its answer
                self._took_it()
            else:
                self._fut.set_exception(UpstreamError("disconnected", "the upstream closed the connection"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._fut is None:  # a second answer after the one awaited, in the same read: out of step
            self._fail(UpstreamError("protocol_error", "bytes from the upstream with no request outstanding"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            self._fail(UpstreamError("response_too_large", f"response head over {MAX_HEAD_BYTES} bytes"))
            return
        if self._status:
            # a chunked body's trailer field (the status is known once the head is complete): not part of the
            # head, so not relayed as a header of the answer
            return
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            if 200 <= self._status < 300 and self._fut is not None:
                # Delivered: the receiver took the event and said so. Its answer is too large to relay, so the
                # provider gets its status and headers without the body (the rest is not read: the connection
                # goes). Failing it would deliver the event again and again.
                self._body = []
                self._headers = [(k, v) for k, v in self._headers if k.lower() not in _REPRESENTATION]
                self._complete()
                self._fail(UpstreamError("response_too_large", "closed after a 2xx head"))
            elif self._fut is not None:
                # A refusal or failure whose body is too large to relay is still that status (a 400 stays
                # permanent, a 503 retryable): classified by its status, relayed without its body.
                self._body = []
                self._complete()
                self._fail(
                    UpstreamError("response_too_large", f"response body over {MAX_RESPONSE_BYTES} bytes")
                )
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer (103 Early Hints…): the real one follows
            self._headers, self._body, self._size, self._status = [], [], 0, 0
            return
        self.reusable = self._parser.should_keep_alive() and not self.closed
        self._complete()

    # requests
    def _ends_at_close(self) -> bool:
        """A body delimited by the connection's end: no Content-Length, and no Transfer-Encoding whose last coding
        is chunked (RFC 9112 §6.3: a response with another final coding is read until the close)."""
        if any(k.lower() == "content-length" for k, _ in self._headers):
            return False
        codings = [
            c.strip().lower()
            for k, v in self._headers
            if k.lower() == "transfer-encoding"
            for c in v.split(",")
        ]
        return not codings or codings[-1] != "chunked"

    def _complete(self) -> None:
        fut, self._fut = self._fut, None
        if fut is not None and not fut.done():
            fut.set_result(Response(self._status, self._headers, b"".join(self._body)))
        # an idle pooled connection keeps nothing of the answer it gave (up to 16 MiB of body)
        self._headers, self._body = [], []

    def _took_it(self) -> None:
        """The receiver took the event and said so (a 2xx head); only the rest of its answer is unusable (cut off,
        unparseable, too slow): a delivery, relayed as the bare status, not a failure to send it again (the
        receiver would have it twice)."""
        if self._fut is not None:
            self._headers, self._body = [], []
            self._complete()

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(exc)
        self.close()

    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self._transport is not None
        self._headers, self._body, self._size, self._status = [], [], 0, 0
        self._head_size = 0
        self.received_any = False
        self.reusable = False
        self._fut = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return self._fut

    def timed_out(self) -> None:
        if 200 <= self._status < 300:
            # the head came in time, the rest of the body did not
            self._took_it()
        self._fail(UpstreamError("timeout", "the upstream did not answer in time"))

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


def _trim(idle: collections.deque[_Connection], stale_before: float) -> None:
    """Close an origin's idle connections that went back to the pool before `stale_before` (the oldest are on
    the left), and closed ones there."""
    while idle and (idle[0].idle_since < stale_before or idle[0].closed):
        idle.popleft().close()


class Http1Client:
    def __init__(
        self, max_connections: int = 100, idle_per_origin: int = 100, idle_timeout: float = IDLE_TIMEOUT_S
    ) -> None:
        self._limit = asyncio.Semaphore(max_connections)
        self._idle_timeout = idle_timeout
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}  # by `Origin.pool`
        self._idle_max = idle_per_origin
        # next look at every origin's idle connections, those no request asks for included
        self._sweep_at = 0.0
        self._origins: dict[str, Origin] = {}
        self._ssl: ssl.SSLContext | None = None

    def origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            if len(self._origins) > 10_000:
                self._origins.clear()
            origin = self._origins[url] = Origin.parse(url)
        return origin

    async def post(self, url: str, headers: list[tuple[str, str]], body: bytes, timeout: float) -> Response:
        """POST `body` with `headers` (end-to-end only: Host and Content-Length are set here)."""
        origin = self.origin(url)
        head = [f"POST {origin.target_prefix} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        data = "".join(head).encode("utf-8", "surrogateescape") + body
        loop = asyncio.get_running_loop()
        # Nothing is sent while a slot is waited for and a connection made: both within `timeout`. The
        # exchange then has its own `timeout`, from the write on. With the connect counted in the exchange's
        # time, a request written after a slow connect (a SYN retransmitted to a receiver whose accept queue
        # was full, a pause of this process mid-connect) had too little left: counted a timeout while the
        # receiver accepted it, and delivered again.
        connect_by = loop.time() + timeout
        waited = await self._take_slot(timeout)
        try:
            conn, reused = await self._connect(origin, connect_by, waited)
            deadline = loop.time() + timeout  # the exchange's own
            try:
                return await self._exchange(conn, origin, data, deadline)
            except UpstreamError as exc:
                if not (reused and exc.kind == "disconnected" and not conn.received_any):
                    raise
            # The server had closed this idle connection before reading our request: once more, on a new one,
            # connected within what the slot wait left of the connect's `timeout` (as the first connect), so that
            # the exchange keeps its own; all within twice the timeout, as the lease needs
            conn, _ = await self._connect(origin, connect_by, waited, fresh=True)
            return await self._exchange(conn, origin, data, min(loop.time() + timeout, connect_by + timeout))
        finally:
            self._limit.release()

    async def _connect(
        self, origin: Origin, connect_by: float, waited: float, fresh: bool = False
    ) -> tuple[_Connection, bool]:
        """`_acquire` by `connect_by`; a connect cut short after a wait for a slot (`waited` seconds) is a
        PoolTimeout: not sent, as a slot that came too late, not a receiver timeout."""
        try:
            return await self._acquire(origin, connect_by, fresh=fresh)
        except UpstreamError as exc:
            if exc.kind == "timeout" and waited > 0.001:
                raise PoolTimeout("no connection to the upstream in time after the wait for a slot") from None
            raise

    async def _take_slot(self, timeout: float) -> float:
        """Take a slot under `max_connections` within `timeout`: the seconds waited for it."""
        if not self._limit.locked():  # one free (and nobody queued before us): taken at once, no timer needed
            await self._limit.acquire()
            return 0.0
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(timeout):
                await self._limit.acquire()
        except TimeoutError:
            raise PoolTimeout("no connection slot (upstream.max_connections) came free in time") from None
        return asyncio.get_running_loop().time() - started

    async def _exchange(self, conn: _Connection, origin: Origin, data: bytes, deadline: float) -> Response:
        loop = asyncio.get_running_loop()
        # the deadline's, then (from `due`) the grace's: whichever is pending when the send ends is cancelled
        timer: asyncio.TimerHandle

        def due() -> None:
            nonlocal timer
            timer = loop.call_later(EXPIRY_GRACE, conn.timed_out)  # after one more look at the socket

        timer = loop.call_at(deadline, due)
        try:
            response = await conn.send(data)
        finally:
            timer.cancel()
        if conn.reusable:
            self._keep(origin, conn)
        else:
            conn.close()
        return response

    def _keep(self, origin: Origin, conn: _Connection) -> None:
        """Back to the origin's idle connections, or closed when it has enough of them."""
        idle = self._idle.setdefault(origin.pool, collections.deque())
        now = asyncio.get_running_loop().time()
        if len(idle) < self._idle_max:
            conn.idle_since = now
            idle.append(conn)
        else:
            conn.close()
        if now >= self._sweep_at:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close the connections idle too long of every origin, once per `idle_timeout`: those of an origin
        no request asks for any more (a reload moved its routes away) are not trimmed by `_acquire`, and each
        would hold its file descriptor for the life of the process (a review)."""
        self._sweep_at = now + self._idle_timeout
        for pool, idle in list(self._idle.items()):
            _trim(idle, now - self._idle_timeout)
            if not idle:
                del self._idle[pool]

    async def _acquire(
        self, origin: Origin, deadline: float, fresh: bool = False
    ) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin.pool)
        loop = asyncio.get_running_loop()
        if idle and not fresh:
            # those idle too long are closed when their origin is next asked for (and by `_sweep`)
            _trim(idle, loop.time() - self._idle_timeout)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn, True
        context = None
        if origin.scheme == "https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context else None,
                ),
                max(0.001, deadline - loop.time()),
            )
        except TimeoutError:
            raise UpstreamError("timeout", "connecting to the upstream timed out") from None
        except OSError as exc:
            raise UpstreamError(
                "connect_error", f"cannot connect to the upstream: {exc.strerror or exc}"
            ) from None
        return conn, False

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
