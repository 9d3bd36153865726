"""The inbound front: a lean HTTP/1.1 protocol for the webhook POSTs, aiohttp's server for everything else.

aiohttp's server is the largest single share of the sidecar's CPU (docs/performance.md): a request object, a
stream reader, a response object and its writer per request. A webhook delivery needs none of that. This front
takes a connection first and serves, itself, the requests that are plainly a signed POST to a configured route:

    HTTP/1.1, POST, an origin-form path with no `%` or dot segment that names a route, a `Host`, a
    `Content-Length` within `server.max_body_bytes`, no `Transfer-Encoding`, `Expect` or `Upgrade`, and a route
    whose provider does not sign the public URL.

Their heads are parsed by llhttp (`httptools`, the parser aiohttp's own C parser is built on); the body is the
next `Content-Length` bytes. They go through the same `Ingress.handle` as any other request, with the body
already read. The first request on a connection that is anything else (a GET handshake, a chunked body, a head
llhttp refuses, an oversized head or body, HTTP/1.0, …) hands the connection to aiohttp from that request's first
byte on: aiohttp answers it and every later request on that connection, exactly as before this front existed.

Requests on one connection are answered in order, one at a time (HTTP/1.1 pipelining is honoured by buffering).
`server.read_timeout` bounds the wait for a head and for a body (408 `read_timeout`) and the idle time of a
keep-alive connection, checked by one sweep per second rather than a timer per request. Shutdown closes idle
connections, lets busy ones finish within `server.shutdown_grace`, then closes the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import httptools
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.durations import EXPIRY_GRACE
from sidecar.ingress import Result, json_error, needs_public_url, parse_error_detail

if TYPE_CHECKING:
    from sidecar.ingress import Ingress

log = logging.getLogger("sidecar.front")

MAX_HEAD = 8190  # aiohttp's max_line_size: a head this small passes every limit aiohttp's parser has
MAX_HEADERS = 128  # aiohttp's max_headers: more is its 400
SWEEP_S = 1.0
# After an answer given before the body was read to its end (408 read_timeout, 413, an admin 408), aiohttp keeps
# reading and discarding the rest for `lingering_time` (default 10 s), so that a client still sending gets the
# answer instead of a reset. A slow client dribbling its body held the connection that long past the answer.
LINGER_S = 2.0
# Sec-WebSocket-Key1 (the old WebSocket handshake) is a 400 in aiohttp's parser.
_REFUSED = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"sec-websocket-key1"})
# What aiohttp's parser answers 400 when repeated (its SINGLETON_HEADERS; Content-Length llhttp refuses itself).
_SINGLETONS = frozenset(
    {
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"user-agent",
    }
)
_NOT_COPIED = frozenset({"content-length", "transfer-encoding", "connection"})

# (second, "Date" header line), recomputed once a second
_date: list[Any] = [0, b""]


def _date_line() -> bytes:
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    line: bytes = _date[1]
    return line


class FastRequest:
    """The parts of an aiohttp request that the ingress reads, for a request this front parsed itself."""

    __slots__ = ("headers", "host", "path", "raw_path", "remote")
    method = "POST"
    scheme = "http"

    def __init__(
        self, path: str, raw_path: str, headers: CIMultiDictProxy[str], host: str, remote: str
    ) -> None:
        self.path, self.raw_path, self.headers, self.host, self.remote = path, raw_path, headers, host, remote

    # Read only for the providers that sign the URL, which this front hands to aiohttp; a reload can still make a
    # route one of them between the front's check and the ingress's.
    @property
    def path_qs(self) -> str:
        return self.raw_path

    @property
    def query_string(self) -> str:
        return self.raw_path.partition("?")[2]


class _Head:
    """httptools callbacks for one request head."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


class _Parsed:
    """A request head this front serves: its request, route and where its body ends in the buffer."""

    __slots__ = ("close", "end", "head_len", "request", "route")

    def __init__(self, request: FastRequest, route: str, head_len: int, end: int, close: bool) -> None:
        self.request, self.route, self.head_len, self.end, self.close = request, route, head_len, end, close


def _parse(head_bytes: bytes, ingress: Ingress, remote: str) -> _Parsed | None:
    """The head (`\r\n\r\n` included) as a request this front serves, or None when aiohttp is to answer it."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(head_bytes)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # malformed, a CONNECT, an Upgrade
        return None
    if parser.get_http_version() != "1.1" or parser.get_method() != b"POST":
        return None
    url = head.url
    if url[:1] != b"/" or b"%" in url or b"/." in url or b"#" in url:
        return None
    path_end = url.find(b"?")
    path = (url if path_end < 0 else url[:path_end]).decode("latin-1")
    route = ingress.dispatcher.table.by_path.get(path)
    if route is None or needs_public_url(route.cfg) or len(head.headers) > MAX_HEADERS:
        return None
    length: int | None = None
    host = None
    # HTTP/1.1 keeps the connection unless a Connection header says close. Read here: llhttp's own flag is reset
    # once the message is complete, which a request without a body is with its head.
    close = False
    headers: CIMultiDict[str] = CIMultiDict()
    for raw_name, raw_value in head.headers:
        lname = raw_name.lower()
        name = raw_name.decode("utf-8", "surrogateescape")
        if lname in _REFUSED or (lname in _SINGLETONS and name in headers):
            return None
        # llhttp keeps the whitespace after a value, aiohttp strips it
        raw_value = raw_value.rstrip(b" \t")
        value = raw_value.decode("utf-8", "surrogateescape")
        if lname == b"content-length":
            # more digits than any length we serve has: aiohttp answers it (and int() refuses 4300 digits)
            if not raw_value.isdigit() or length is not None or len(raw_value) > 18:
                return None
            length = int(raw_value)
        elif lname == b"host":
            host = value
        elif lname == b"connection":
            close = close or b"close" in (token.strip().lower() for token in raw_value.split(b","))
        headers.add(name, value)
    length = length or 0
    if host is None or length > ingress.dispatcher.config.server.max_body_bytes:
        return None
    request = FastRequest(path, url.decode("latin-1"), CIMultiDictProxy(headers), host, remote)
    head_len = len(head_bytes)
    return _Parsed(request, route.cfg.name, head_len, head_len + length, close)


# At most this many requests of a hand-over's buffer reach aiohttp one read each (aiohttp's handler queues 32
# requests, then pauses and keeps the rest unparsed): a buffer of 1 MiB of tiny pipelined requests fed one read
# each was parsed whole at once, past that queue (the event loop held 0.25 s per MiB, ~20 MB per MiB queued).
MAX_PIECES = 32


def _requests(data: bytes, limit: int = MAX_PIECES) -> list[bytes]:
    """`data` cut after each complete request whose end its head gives (a head llhttp takes, with a Content-Length
    or no body, no Transfer-Encoding, no websocket Upgrade), `limit` of them at most; what follows the last of them
    as one piece."""
    pieces: list[bytes] = []
    pos = 0
    while pos < len(data) and len(pieces) < limit:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(data[pos : end + 4])
        except httptools.HttpParserUpgrade:
            pass  # framed as any request unless aiohttp takes the upgrade (a websocket one, a CONNECT)
        except httptools.HttpParserError:
            break
        if parser.get_method() == b"CONNECT":
            break
        length = 0
        framed = True
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"transfer-encoding" or (
                lname == b"upgrade" and value.strip().lower() == b"websocket"
            ):
                framed = False
            elif lname == b"content-length":
                value = value.strip(b" \t")
                framed = framed and value.isdigit() and len(value) <= 18
                length = int(value) if framed else 0
        stop = end + 4 + length
        if not framed or stop > len(data):
            break
        pieces.append(data[pos:stop])
        pos = stop
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


def serialize(resp: web.StreamResponse, close: bool) -> bytes:
    """The response as bytes on the wire: what aiohttp would send, minus its `Server` header."""
    body = resp.body if isinstance(resp, web.Response) else None
    if not isinstance(body, bytes | bytearray):
        body = b""
    lines: list[bytes | bytearray] = [
        b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason.encode("latin-1", "replace"))
    ]
    content_type = date = False
    for name, value in resp.headers.items():
        lower = name.lower()
        if lower in _NOT_COPIED or "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            continue
        content_type = content_type or lower == "content-type"
        date = date or lower == "date"  # an upstream's Date (and Server) are relayed, as aiohttp does
        # aiohttp's writer drops what UTF-8 cannot carry (the surrogates undecodable upstream bytes became)
        lines.append(b"%s: %s\r\n" % (name.encode("utf-8", "ignore"), value.encode("utf-8", "ignore")))
    if resp.status in (204, 304) or 100 <= resp.status < 200:
        body = b""  # no body and no Content-Length (RFC 9110 §8.6), as aiohttp sends them
    else:
        if body and not content_type:  # aiohttp's default, only for a non-empty body
            lines.append(b"Content-Type: application/octet-stream\r\n")
        lines.append(b"Content-Length: %d\r\n" % len(body))
    if not date:
        lines.append(_date_line())
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


class Front:
    """The protocol factory the listening socket uses; wraps aiohttp's `web.Server` and takes its place in the
    runner, so sites, the test server and the runner's shutdown all go through it."""

    def __init__(self, inner: web.Server, ingress: Ingress) -> None:
        self.inner = inner
        self.ingress = ingress
        self.conns: set[FastProtocol] = set()
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()  # requests being served, their clients gone or not
        self.fast_requests = 0  # served here rather than by aiohttp (tests read it)
        self.handed_over = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> FastProtocol:  # the protocol factory a site listens with
        return FastProtocol(self)

    # what the runner's cleanup calls on web.Server
    def pre_shutdown(self) -> None:
        self.closing = True
        for conn in list(self.conns):
            if not conn.busy and not conn.buf:  # a request partly in may still finish within the grace
                conn.close()
        self.inner.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        self.closing = True
        await asyncio.gather(self._drain(timeout), self.inner.shutdown(timeout))

    async def _drain(self, timeout: float | None) -> None:
        # Requests in flight (a connection its client closed is out of `conns`, its request may not be done), and
        # those that start meanwhile (their bodies were arriving), get the grace.
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.tasks and (deadline is None or loop.time() < deadline):
            await asyncio.wait(set(self.tasks), timeout=None if deadline is None else deadline - loop.time())
        for conn in list(self.conns):
            conn.close()
        if self.tasks:
            log.warning(
                "shutdown: %d request(s) still in flight after %ss, cancelled", len(self.tasks), timeout
            )
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            # they finish (settle their bookkeeping) before the runner closes the store and the session
            await asyncio.wait(tasks, timeout=timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def added(self, conn: FastProtocol) -> None:
        self.conns.add(conn)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        due = [conn for conn in self.conns if conn.deadline and now >= conn.deadline]
        loop = asyncio.get_running_loop()
        if due:
            # Not at once: after a pause of the process (SIGSTOP, a frozen cgroup or VM) the sweep and the
            # bytes that arrived meanwhile are due together, and the loop runs due timers before it reads. One
            # more poll of the sockets first (as a forward's deadline, durations.EXPIRY_GRACE): a request that
            # came in time (a keep-alive connection's next one, the rest of a body) resets or clears its
            # connection's deadline.
            loop.call_later(EXPIRY_GRACE, self._expire, due)
        self._sweeper = loop.call_later(SWEEP_S, self._sweep) if self.conns else None

    def _expire(self, due: list[FastProtocol]) -> None:
        now = time.monotonic()
        for conn in due:
            if conn in self.conns and conn.deadline and now >= conn.deadline:
                conn.timed_out()


class FastProtocol(asyncio.Protocol):
    __slots__ = (
        "buf",
        "deadline",
        "dropping",
        "front",
        "held",
        "pending",
        "remote",
        "task",
        "transport",
        "write_paused",
    )

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None  # the request being served
        self.deadline = 0.0  # monotonic; 0 while a request is being handled
        self.pending: _Parsed | None = None  # the buffered request's head, parsed, while its body arrives
        # the pending body's share of the ingress's in-flight budget (server.max_inflight_bytes)
        self.held = 0
        self.remote = ""
        # the transport's write buffer is over its high-water mark: a client not reading its answers gets no
        # further request served (nor read) until it does
        self.write_paused = False
        # bytes of a refused body still to come, read and dropped before the connection closes (see `_overloaded`)
        self.dropping = 0

    @property
    def busy(self) -> bool:
        return self.task is not None

    def _timeout(self) -> float:
        return self.front.ingress.dispatcher.config.server.read_timeout

    def _buffer_limit(self) -> int:
        return MAX_HEAD + self.front.ingress.dispatcher.config.server.max_body_bytes

    def _resume(self) -> None:
        """Read again, unless the buffer already holds more than one request may need (a client pipelining far
        ahead of the answers: each answer must not let one more read in, or the buffer grows without bound)."""
        if self.transport is not None and not self.write_paused and len(self.buf) <= self._buffer_limit():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.busy:
            self._resume()
            self._next()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple | list) and peer else ""
        self.deadline = time.monotonic() + self._timeout()
        self.front.added(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.front.conns.discard(self)
        self._give_back()
        # a request being handled runs to its end: the event is claimed, it must be settled

    def data_received(self, data: bytes) -> None:
        if self.dropping:
            # refused: everything the client still sends (the rest of the body, requests it pipelined behind it)
            # is read and dropped until its EOF or the deadline (the sweep): closed with bytes still coming, the
            # connection is reset and a client still writing loses the answer it has not read yet
            if self.dropping > 0:
                self.dropping -= len(data)
                if self.dropping <= 0:  # the refused body is all in: a short linger for what was pipelined
                    self.dropping = -1
                    self.deadline = min(self.deadline, time.monotonic() + LINGER_S)
            return
        if not self.buf and not self.busy:  # a request's first bytes: its head and body have read_timeout
            self.deadline = time.monotonic() + self._timeout()
        self.buf += data
        if self.write_paused:
            return  # resume_writing() goes on
        if not self.busy:
            if self.pending is None or len(self.buf) >= self.pending.end:  # not for every piece of a body
                self._next()
            elif not self._hold_arrived():
                self._overloaded()
        elif len(self.buf) > self._buffer_limit():
            # a client pipelining far ahead of the answers: stop reading until the buffer is worked down
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too, as aiohttp does; a request being handled still settles its event

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def timed_out(self) -> None:
        """The sweep found `server.read_timeout` passed while waiting for a head, a body or the next request."""
        if self.transport is None:
            return
        # a head in, its body not: the same answer, count, span and log line as aiohttp's path
        if self.pending is not None:
            ingress, route = self.front.ingress, self.pending.route
            span = ingress.tel.start_inbound(route, "POST", None)
            ingress.record(route, Result(outcome="read_timeout", status=408), span, self._timeout(), self)
            self._refuse(serialize(json_error(408, "read_timeout"), close=True), time.monotonic() + LINGER_S)
            return
        self.transport.close()  # nothing to answer, or the linger after an answer is over

    # ---- one request at a time ----------------------------------------------------------------------------

    def _next(self) -> None:
        """Start on the next request in the buffer, if all of it is here."""
        buf = self.buf
        if self.transport is None or not buf:
            return
        parsed = self.pending
        if parsed is None:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0 and len(buf) <= MAX_HEAD and b"\n\n" not in buf and b"\n\r\n" not in buf:
                return  # the head is on its way (a head ended by a bare LF is aiohttp's to refuse, not a wait)
            if 0 <= head_end <= MAX_HEAD - 4:
                parsed = _parse(bytes(buf[: head_end + 4]), self.front.ingress, self.remote)
            if parsed is None:
                self._hand_over()
                return
            self.pending = parsed
        if not self._hold_arrived():
            self._overloaded()
            return
        if len(buf) < parsed.end:
            return  # the body is on its way; the sweep answers 408 if it is not all here by the deadline
        with memoryview(buf) as view:  # one copy of the body, not a bytearray slice's and then bytes()'s
            body = view[parsed.head_len : parsed.end].tobytes()
        del buf[: parsed.end]
        self.pending = None
        held, self.held = self.held, 0
        self.deadline = 0.0
        self.front.fast_requests += 1
        close = parsed.close or self.front.closing
        self.task = asyncio.get_running_loop().create_task(self._serve(parsed.request, body, close, held))
        self.front.tasks.add(self.task)
        self.task.add_done_callback(self.front.tasks.discard)

    def _hold_arrived(self) -> bool:
        """Count the pending body's bytes that have arrived (not the announced length: heads alone, with no body
        behind them, would hold the budget) against the ingress's in-flight budget; False when over it."""
        parsed = self.pending
        assert parsed is not None
        have = max(0, min(len(self.buf), parsed.end) - parsed.head_len)
        if have > self.held:
            if not self.front.ingress.take(have - self.held):
                return False
            self.held = have
        return True

    def _overloaded(self) -> None:
        """The pending body is over the in-flight budget: 503 overloaded now, the rest of the body dropped as it
        comes, until its `server.read_timeout`. Handed to aiohttp as before, each refused connection held what its
        lingering read buffered: 800 concurrent 1 MB bodies over a 64 MiB budget took 6x the budget (an audit)."""
        parsed = self.pending
        assert parsed is not None
        ingress = self.front.ingress
        span = ingress.tel.start_inbound(parsed.route, "POST", None)
        result = Result(status=503)
        answer = ingress.overloaded(result)
        ingress.record(parsed.route, result, span, 0.0, self)
        self._refuse(serialize(answer, close=True), self.deadline or time.monotonic() + LINGER_S)

    def _refuse(self, answer: bytes, until: float) -> None:
        """Write `answer` to the pending request, then read and drop the rest of its body and what the client
        pipelined behind it, until the client closes, or `until` (monotonic), or LINGER_S after the body is in, and
        close: closed with the client's bytes unread, the connection is reset, and a client still sending may lose
        the answer to the reset (as aiohttp's lingering read, holding nothing)."""
        parsed, transport = self.pending, self.transport
        assert parsed is not None and transport is not None
        transport.write(answer)
        remaining = parsed.end - len(self.buf)
        self.pending = None
        self.buf = bytearray()
        self._give_back()  # none of the body is held while it is dropped
        if transport.can_write_eof():
            transport.write_eof()  # the answer is all the client gets: its read ends there
        # the body all in (-1): only a pipelining client still sends, for a short linger at most
        self.dropping = remaining if remaining > 0 else -1
        self.deadline = until if remaining > 0 else min(until, time.monotonic() + LINGER_S)

    def _give_back(self) -> None:
        """The pending body's budget, for a connection that ends or leaves before its body is all in."""
        self.front.ingress.give(self.held)
        self.held = 0

    async def _serve(self, request: FastRequest, body: bytes, close: bool, held: int) -> None:
        try:
            try:
                response = await self.front.ingress.handle(request, body)  # type: ignore[arg-type]
                close = close or self.front.closing
                data = serialize(response, close)
            except Exception:  # answered and closed all the same: a connection left waiting is never swept
                log.exception("error handling %s", request.path)
                close = True
                data = serialize(json_error(500, "internal_error"), close)
            transport = self.transport
            if transport is not None:
                transport.write(data)
                if close:
                    transport.close()
        finally:
            self.task = None
            self.front.ingress.give(held)
        if self.transport is not None and not close:
            self.deadline = time.monotonic() + self._timeout()  # idle, or the next request's, already in
            if not self.write_paused:  # else resume_writing() goes on
                self._resume()
                self._next()

    def _hand_over(self) -> None:
        """Give the connection, from the current request's first byte on, to aiohttp's own protocol."""
        transport = self.transport
        assert transport is not None
        self.front.conns.discard(self)
        self.front.handed_over += 1
        self._give_back()
        self.transport = None
        transport.resume_reading()
        handler = self.front.inner()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buf = bytes(self.buf), bytearray()
        # One read per request it can delimit: aiohttp's parser drops every request of a read in which a later one
        # is malformed (or follows a `Connection: close` one, or an Upgrade), and this buffer may hold several
        # that arrived in separate reads while the front was busy.
        for piece in _requests(data):
            if handler.transport is None:
                break
            handler.data_received(piece)


class JsonErrorHandler(RequestHandler):
    """aiohttp's protocol, answering a request it cannot parse (a malformed head, a repeated `Host`, both
    `Content-Length` and `Transfer-Encoding`, …) as the sidecar answers every refusal: JSON with an `error`, and
    one info line rather than an error-level traceback, since any client can send such bytes."""

    # the parser refused this connection's bytes: its 400 is queued, the connection closes after it
    _refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # Nothing after a parse error is parsed again (aiohttp queued one more error, and its traceback, per read
            # of a client still sending): the 400 goes out and the connection is closed.
            return
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued and isinstance(self._messages[-1][0], _ErrInfo):
            exc = self._messages[-1][0].exc
            # Its traceback's frames hold `data` and this protocol, which holds the error: a cycle that only the
            # gc's rare full collections free, each holding a read of whatever the client sent (10 MB of junk after
            # a request without Content-Length: the sidecar's RSS grew by ~0.85 GB over 800 such requests).
            exc.__traceback__ = None
            self._refused = True
            self._fail_open_body(exc)

    def _fail_open_body(self, exc: BaseException) -> None:
        """llhttp refused bytes inside a body (a malformed chunk size, say): aiohttp queues its 400 for after the
        handler, whose read of that body then waited for the rest until `server.read_timeout` (a 408, seconds
        later). The read fails now, with the parser's error, for the handler to answer 400; the body is over
        (nothing more to linger for) and so is the connection (no second answer for the queued 400)."""
        bodies = [payload for msg, payload in list(self._messages)[:-1] if not isinstance(msg, _ErrInfo)]
        if bodies:
            payload = bodies[-1]
        elif self._current_request is not None:
            payload = self._current_request.content
        else:
            return
        if not payload.is_eof():
            payload.set_exception(exc)
            payload.feed_eof()
            self._close = True

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        # The kind of error only: aiohttp's message quotes the request line (a query may hold a token). Garbage
        # before any request (TLS or a scanner on a plain port) stays at debug, as aiohttp has it.
        noise = self._request_count == 1 and isinstance(exc, BadHttpMethod)
        self.logger.log(
            logging.DEBUG if noise else logging.INFO,
            "bad request from %s: %s",
            request.remote,
            type(exc).__name__ if exc is not None else status,
        )
        if request.writer.output_size > 0:  # some of an answer is out: the connection is broken
            raise ConnectionError("an answer was partly sent, cannot send the error")
        detail = parse_error_detail(exc) if exc is not None else message
        resp = web.json_response({"error": "bad_request", "detail": detail or "bad request"}, status=status)
        resp.force_close()
        return resp


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An `AppRunner` whose connections answer unparsable requests with JSON (`JsonErrorHandler`) and linger
    LINGER_S at most after an answer that left the body unread."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("lingering_time", LINGER_S)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = JsonErrorServer  # same state, the handler it makes is ours
        return server


class FrontRunner(JsonErrorRunner):
    """An `AppRunner` for the inbound app (`create_app`) whose sites listen through the `Front`."""

    async def _make_server(self) -> web.Server:
        from sidecar.app import RUNTIME

        inner = await super()._make_server()
        return Front(inner, self.app[RUNTIME].ingress)  # type: ignore[return-value]
