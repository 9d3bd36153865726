"""The hot path: route -> bounded body -> verify -> event id -> claim -> forward | schedule.

One store round trip before the forward (the claim, which also persists the event and leases it), at most one
after (delivered / rescheduled; a dead letter takes two). Nothing is answered 2xx before the claim succeeded, so
a 2xx always means the event is delivered, scheduled or dead-lettered.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import HttpVersion11, web, web_urldispatcher
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from sidecar.breaker import Grant
from sidecar.config import SIGNS_URL, RouteConfig
from sidecar.dispatch import Dispatcher
from sidecar.durations import EXPIRY_GRACE, graced_timeout
from sidecar.errors import StoreError, StoreFull, StoreUnavailable
from sidecar.forwarder import Outcome, end_to_end, upstream_headers
from sidecar.http1 import POOL_TIMEOUT
from sidecar.logs import Tally
from sidecar.providers.base import (
    Handshake,
    Inbound,
    TimestampError,
    VerificationError,
    Verified,
    stored_id,
    usable_id,
)
from sidecar.routes import Route, target_url
from sidecar.store import EventRecord
from sidecar.telemetry import AnySpan, Telemetry

log = logging.getLogger("sidecar.ingress")

# While the store is full, what is said of the events it refuses: once, then at most this often, with a count.
STORE_FULL_REPORT_S = 30.0
NO_ROUTE_REPORT_S = 60.0

EVENT_ID_HEADER = "X-Sidecar-Event-Id"
# Providers that sign the URL (or read it, like X's CRC): only they need the public URL rebuilt per request.
URL_SIGNING = SIGNS_URL | {"x", "twitter", "hmac"}
ROUTINE = frozenset(
    {"forwarded", "duplicate", "filtered", "handshake", "passthrough"}
)  # DEBUG unless requests: all


def client_fields(peer: Any) -> dict[str, str]:
    """The log fields naming who sent a request: `client`, the peer's address, and `forwarded_for`, the
    X-Forwarded-For a proxy in front (an ingress controller, a load balancer) added, when there is one."""
    out = {}
    remote = getattr(peer, "remote", None)
    if remote:
        out["client"] = str(remote)
    headers = getattr(peer, "headers", None)
    forwarded = headers.get("X-Forwarded-For") if headers is not None else None
    if forwarded:
        out["forwarded_for"] = forwarded[:200]
    return out


def json_error(status: int, error: str, event_id: str | None = None, **extra: Any) -> web.Response:
    headers = {EVENT_ID_HEADER: event_id} if event_id else None
    return web.json_response({"error": error, **extra}, status=status, headers=headers)


# What a refused request is told: aiohttp's own message quotes the request (its line, a header, bytes reprs)
PARSE_ERRORS = {
    "LineTooLong": "the request line or a header is too long",
    "BadHttpMethod": "not an HTTP request method",
    "BadStatusLine": "malformed request line",
    "InvalidURLError": "malformed request target",
    "InvalidHeader": "malformed header",
    "TransferEncodingError": "malformed chunked body",
    "ContentLengthError": "body shorter than its Content-Length",
    "ContentEncodingError": "body does not match its Content-Encoding",
    "DecompressSizeError": "body too large once decompressed",
}


# llhttp's error mid-body is a bare BadHttpMessage
BAD_BODY = "malformed body framing (a chunk size or chunk end)"


def parse_error_detail(exc: BaseException, default: str = "malformed HTTP request") -> str:
    return PARSE_ERRORS.get(type(exc).__name__, default)


def closing(response: web.Response) -> web.Response:
    """`response`, and the connection closed after it (what is left of the request is not read)."""
    response.force_close()
    return response


async def expect_continue(request: web.Request, limit: int | None = None) -> web.StreamResponse | None:
    """The `Expect` handler: `100-continue` as aiohttp does it; anything else a 417 that does not echo the value.
    (aiohttp's default handler echoes it into its 417 text, and a value that is not UTF-8 makes that a 500.)
    A body announced over `limit` gets no 100: the handler refuses it from the head (RFC 9110 §10.1.1)."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() == "100-continue":
        if limit is not None and request.content_length is not None and request.content_length > limit:
            return None
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer's size
        return None
    return json_error(417, "expectation_failed")


# Installed as aiohttp's default, not per route: the 404/405 "system" routes aiohttp makes for requests that match
# no route (a CONNECT, `OPTIONS *`, any path on the admin app) read the default when they are made.
web_urldispatcher._default_expect_handler = expect_continue  # type: ignore[assignment]


class BodyTooLarge(Exception):
    pass


class ReadTimeout(Exception):
    pass


class Overloaded(Exception):
    """The bodies this process holds reached `server.max_inflight_bytes`. → 503 overloaded."""


async def read_bounded(
    request: web.Request, limit: int, timeout: float | None = None, take: Callable[[int], bool] | None = None
) -> bytes:
    """Read the body, refusing it as soon as it passes `limit` (not after buffering all of it), and giving up
    after `timeout` seconds (`server.read_timeout`): a client dribbling its body cannot hold a handler forever.
    `take(n)` is asked for each piece read (a body of unknown length); False refuses it (Overloaded)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    # The whole body is usually here already (it came with the headers): no timer then.
    if timeout is None or request.content.is_eof():
        return await _read_body(request, limit, take)
    try:
        # after a pause of the process, the timer and the rest of a body that arrived in time are due together
        async with graced_timeout(timeout):
            return await _read_body(request, limit, take)
    except TimeoutError:
        raise ReadTimeout from None


async def _read_body(request: web.Request, limit: int, take: Callable[[int], bool] | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if take is not None and not take(len(chunk)):
            raise Overloaded
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def needs_public_url(route: RouteConfig) -> bool:
    """Whether this route's verification reads the URL the provider called (a URL-signing provider, or a
    configured `public_url`)."""
    return route.provider in URL_SIGNING or bool(route.public_url)


def public_url(request: web.Request, route: RouteConfig) -> str:
    """The URL the provider called, for the schemes that sign it (Twilio, Square, HubSpot). The query is the
    request's own, byte for byte as it arrived (percent-encoding kept: `a%20b` is signed as such, and Twilio's
    `bodySHA256` is appended to whatever query it was given); the route's `public_url` supplies the scheme, host
    and path, and its own query only for a request that arrives without one."""
    query = request.raw_path.partition("?")[2]
    if route.public_url:
        url, hash_, fragment = route.public_url.partition("#")  # Twilio's `#rc=…&rp=…` options stay last
        base, _, own = url.partition("?")
        query = query or own
        return (f"{base}?{query}" if query else base) + hash_ + fragment
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}{request.path_qs}"


def _json_path(body: bytes, path: str) -> Any:
    try:
        node: Any = json.loads(body)
    except (ValueError, RecursionError):  # nested past the recursion limit: no readable id either
        return None
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def resolve_event_id(route: RouteConfig, verified: Verified, inbound: Inbound) -> tuple[str, str] | None:
    """(public event id, dedupe id), or None when no usable id can be had.

    The dedupe id is the public id when the signature covers it. When it does not (a header id), it is a signed id
    the provider also sends (Linear's body fields), else the digest of the signed bytes: a captured request replayed
    under another id then hits its own signed id or digest (a duplicate, not a second delivery), and cannot occupy
    the other event's id. A signed id gets the public id's check: signed means the provider's secret made it, not
    that it is short and printable.
    """
    src = route.event_id
    signed = True
    raw: Any
    if src.kind == "auto":
        raw, signed = verified.event_id, verified.id_signed
        # provider none knows nothing of the payload: its bytes are its identity (hashed only when it is the id)
        if raw is None and route.provider == "none":
            raw = hashlib.sha256(inbound.body).hexdigest()
    elif src.kind == "header":
        name = src.value or ""
        raw = inbound.headers.get(name)
        signed = name.lower() in verified.signed_headers
    elif src.kind == "json":
        raw = _json_path(inbound.body, src.value or "")
    else:  # body_sha256
        raw = hashlib.sha256(inbound.body).hexdigest()
    if route.provider == "none":
        signed = True  # nothing is signed on an unverified route; the id is taken at its word
    if isinstance(raw, bool) or raw is None:
        return None
    event_id = str(raw) if isinstance(raw, int | str) else None
    if not event_id:
        return None
    event_id = stored_id(event_id)
    if signed:
        dedupe_id = event_id
    elif verified.signed_id is not None and usable_id(verified.signed_id):
        dedupe_id = verified.signed_id
    else:  # no signed id, or one unfit for a key (a lone surrogate, a newline, 3,000 chars): the signed bytes
        dedupe_id = "sha256:" + (verified.signed_digest or hashlib.sha256(inbound.body).hexdigest())
    return event_id, dedupe_id


def type_allowed(route: RouteConfig, event_type: str | None) -> bool:
    if route.types is None:
        return True
    return event_type is not None and any(fnmatch.fnmatchcase(event_type, p) for p in route.types)


def relay(outcome: Outcome, event_id: str | None) -> web.Response:
    headers = CIMultiDict(outcome.headers)
    headers.popall("Content-Length", None)
    if event_id:
        headers[EVENT_ID_HEADER] = event_id
    assert outcome.status is not None
    return web.Response(status=outcome.status, body=outcome.body, headers=headers)


def answer_handshake(hs: Handshake) -> web.Response:
    return web.Response(
        status=hs.status, body=hs.body or None, content_type=hs.content_type if hs.body else None
    )


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def queued(event_id: str, next_attempt_ms: int | None, in_flight: bool = False) -> web.Response:
    """202 for an event the sidecar holds. `in_flight`: answered before its first attempt ended (`answer_within`);
    `next_attempt_at` is then when the event is attempted again if that attempt never settles it."""
    body: dict[str, Any] = {
        "queued": True,
        "event_id": event_id,
        "next_attempt_at": _iso(next_attempt_ms) if next_attempt_ms is not None else None,
    }
    if in_flight:
        body["in_flight"] = True
    return web.json_response(body, status=202, headers={EVENT_ID_HEADER: event_id})


@dataclass(slots=True)
class Result:
    """What one inbound request came to; recorded once (counter, span, log line) when the handler returns."""

    outcome: str = "error"
    event_id: str | None = None
    attempt: int | None = None
    status: int | None = None
    error: str | None = None
    detail: str | None = None  # the error in words (a failed first attempt's: `Outcome.detail`)
    held: int = 0  # bytes of the in-flight body budget this request took (given back when it is answered)


class Ingress:
    """The inbound handler. Routes come from the dispatcher's current `RouteTable` (swapped by reloads)."""

    def __init__(self, dispatcher: Dispatcher, telemetry: Telemetry) -> None:
        self.dispatcher = dispatcher
        self.store = dispatcher.store
        self.forwarder = dispatcher.forwarder
        self.tel = telemetry
        self.rejections: defaultdict[str, int] = defaultdict(int)  # flushed to the store's stats in batches
        # first attempts still running after their 202 (answer_within)
        self.late: set[asyncio.Future[Any]] = set()
        self._full = Tally(STORE_FULL_REPORT_S)  # new events a full store refused
        self._failing = Tally(STORE_FULL_REPORT_S)  # requests refused for another store error
        self._overloaded = Tally(STORE_FULL_REPORT_S)  # requests refused over server.max_inflight_bytes
        # Bytes of the request bodies this process is reading or holding (server.max_inflight_bytes)
        self.inflight_bytes = 0
        self._no_route = Tally(NO_ROUTE_REPORT_S)  # requests to paths no route has

    async def handle(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        """Answer one inbound request. `body` is given when the caller has read it already (sidecar/front.py)."""
        route = self.dispatcher.table.by_path.get(request.path)
        if route is None:
            self.tel.requests[("", "no_route")] += 1
            self._report_no_route(request)
            return json_error(404, "no_route")
        started = time.perf_counter()
        span = self.tel.start_inbound(route.cfg.name, request.method, request.headers.get("traceparent"))
        result = Result()
        try:
            response = await self._handle(request, route, span, result, body)
            result.status = response.status
            return response
        finally:
            self.give(result.held)
            self.record(route.cfg.name, result, span, time.perf_counter() - started, request)

    def take(self, size: int) -> bool:
        """Take `size` bytes of the in-flight body budget, or False when that would pass it. A body with nothing
        else in flight always fits (the config keeps the budget at least `server.max_body_bytes`)."""
        held = self.inflight_bytes
        if held and held + size > self.dispatcher.config.server.max_inflight_bytes:
            return False
        self.inflight_bytes = held + size
        return True

    def give(self, size: int) -> None:
        """Give back `size` bytes taken with `take` (or held past an answer, `_hand_over`)."""
        self.inflight_bytes -= size

    def _take(self, result: Result, size: int) -> bool:
        if not self.take(size):
            return False
        result.held += size
        return True

    def overloaded(self, result: Result) -> web.Response:
        """503 for a body over the in-flight budget: nothing was claimed, the provider sends it again."""
        result.outcome = "overloaded"
        self._overloaded.say(
            log,
            logging.WARNING,
            "%d request(s) refused (503 overloaded) since the last report: the request bodies this process holds "
            "reached server.max_inflight_bytes (%d); providers send them again. Raise it (and the memory limit) "
            "or add replicas",
            self.dispatcher.config.server.max_inflight_bytes,
        )
        resp = json_error(503, "overloaded")
        resp.headers["Retry-After"] = "5"
        return closing(resp)

    def record(self, route: str, result: Result, span: AnySpan, seconds: float, peer: Any = None) -> None:
        """Count, end the span of, and log what one inbound request came to. `peer` (the request, or the front's
        connection) gives the log line the client's address, read only when the line is written."""
        self.tel.requests[(route, result.outcome)] += 1
        self.tel.end_inbound(span, result.outcome, result.event_id, result.error, result.status)
        log_all = self.dispatcher.table.config.logging.requests == "all"  # follows reloads
        # a routine outcome that failed (a pass-through the upstream answered 5xx, or did not answer) is notable
        failed = result.error is not None or (result.status or 0) >= 500
        level = logging.INFO if log_all or failed or result.outcome not in ROUTINE else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "request",
                extra={
                    "route": route,
                    "event_id": result.event_id,
                    "outcome": result.outcome,
                    "status": result.status,
                    "attempt": result.attempt,
                    "duration_ms": round(seconds * 1000, 3),
                    "trace_id": self.tel.trace_id(span),
                    "error": result.error,
                    **({"detail": result.detail} if result.detail else {}),
                    **client_fields(peer),
                },
            )

    def _store_failed(
        self, route: str, what: str, exc: StoreError, result: Result, event_id: str | None = None
    ) -> web.Response:
        """503 with Retry-After for a store call that failed (fail closed: the provider sends again); logged as an
        error unless the store is merely unreachable or busy (counted, and reported by /readyz). A full store is
        an error too, said once and then at most every STORE_FULL_REPORT_S with a count, not once per event."""
        result.outcome, result.error = "store_unavailable", str(exc)
        extra = {}
        if isinstance(exc, StoreFull):
            extra["detail"] = "store_full"
            self._full.say(
                log,
                logging.ERROR,
                "store full: %d new event(s) refused (503) since the last report; what it holds is still delivered, "
                "which frees memory; to take new events now, raise maxmemory or drain dead letters (runbook): %s",
                exc,
            )
        elif not isinstance(exc, StoreUnavailable):
            # once, then with a count: a store refusing every write (MISCONF, its disk full) is one cause
            self._failing.say(
                log,
                logging.ERROR,
                "%d request(s) refused (503) since the last report: the store failed a call; the last: route %s: %s: %s",
                route,
                what,
                exc,
            )
        resp = json_error(503, "store_unavailable", event_id, **extra)
        resp.headers["Retry-After"] = "5"
        return resp

    def _report_no_route(self, request: web.Request) -> None:
        """A path no route has: most often a provider given a mistyped URL (a trailing slash, an old path), which
        only the path tells. Every one with `logging.requests: all`; else the first, then at most one line every
        NO_ROUTE_REPORT_S with a count, so that a scanner cannot flood the log."""
        path = request.path[:200]
        if self.dispatcher.table.config.logging.requests == "all":
            log.info(
                "request",
                extra={
                    "route": "",
                    "outcome": "no_route",
                    "status": 404,
                    "method": request.method,
                    "path": path,
                    **client_fields(request),
                },
            )
            return
        self._no_route.say(
            log,
            logging.INFO,
            "%d request(s) to a path no route has (404 no_route) since the last report, the last: %s %r; "
            "check the URL the provider was given against the routes' paths",
            request.method,
            path,
            extra=client_fields(request),
        )

    async def _spend_nonce(
        self, cfg: RouteConfig, verified: Verified, body: bytes, result: Result
    ) -> web.StreamResponse | None:
        """A signed single-use value (Mailgun's token, which signs no body) bound to this body: None when it is new
        or came with this body before (a provider retry, left to the claim), else the answer refusing it. Bound for
        as long as its timestamp passes the verifier's freshness check either way (twice its tolerance), plus a
        minute of clock skew between replicas; with no freshness check, for the dedupe window."""
        nonce, window = verified.nonce or "", verified.nonce_window
        ttl_s = 2 * window + 60 if window else self.dispatcher.config.dedupe.ttl
        try:
            fresh = await self.store.bind_nonce(
                cfg.provider, nonce, hashlib.sha256(body).hexdigest(), int(ttl_s * 1000)
            )
        except StoreError as exc:
            return self._store_failed(cfg.name, "token check failed", exc, result)
        if fresh:
            return None
        return self._rejected(
            cfg.name, VerificationError("replayed", "the signed token came before with another body"), result
        )

    async def _handle(
        self, request: web.Request, route: Route, span: AnySpan, result: Result, body: bytes | None
    ) -> web.StreamResponse:
        cfg = route.cfg
        if body is None:
            codings = [
                c.strip().lower()
                for v in request.headers.getall("Transfer-Encoding", ())
                for c in v.split(",")
            ]
            if "" in codings:
                # `Transfer-Encoding: ` or `chunked, `: no coding at all is malformed framing, not an unknown coding
                result.outcome = "bad_request"
                return closing(json_error(400, "bad_request", detail="malformed Transfer-Encoding header"))
            if codings and codings != ["chunked"]:
                # aiohttp removes `chunked` and ignores any other coding (`gzip, chunked`): the body would be
                # stored and forwarded still encoded, with nothing left to say so (RFC 9112 §6.1: 501)
                result.outcome = "bad_request"
                return closing(json_error(501, "unsupported_transfer_coding"))
            try:
                server = self.dispatcher.config.server
                # counted as it is read, not by its Content-Length: heads with no body behind them hold nothing
                take = partial(self._take, result)
                body = await read_bounded(request, server.max_body_bytes, server.read_timeout, take)
            except Overloaded:
                return self.overloaded(result)
            except BodyTooLarge:
                result.outcome = "body_too_large"
                refused = json_error(413, "body_too_large")
                # its body may or may not follow: not a connection to reuse
                return closing(refused) if "Expect" in request.headers else refused
            except ConnectionResetError:
                # the client went away mid-body (aiohttp's path; the front's own just drops the connection):
                # nothing was claimed; counted, and not an error-level traceback any client could cause
                result.outcome = "client_closed"
                return closing(json_error(400, "client_closed"))
            except HttpProcessingError as exc:
                # the parser refused the body's framing part way (a malformed chunk): aiohttp's path
                result.outcome = "bad_request"
                return closing(json_error(400, "bad_request", detail=parse_error_detail(exc, BAD_BODY)))
            except ReadTimeout:
                result.outcome = "read_timeout"
                # as the front's 408 says: the rest of a dribbled body is not waited for
                return closing(json_error(408, "read_timeout"))
        url = public_url(request, cfg) if needs_public_url(cfg) else ""
        inbound = Inbound(request.method, body, request.headers, url, time.time())
        handshake = route.verifier.unsigned_handshake(inbound)
        verified_request = False
        if handshake is None and request.method != "POST":
            result.outcome = "passthrough"
            # never verified: not re-signed for the upstream (sign_upstream would vouch for anyone's request)
            return await self._pass_through(request, route, body, None, span, result, verified=False)
        if handshake is None:
            try:
                verified = route.verifier.verify(inbound)
            except VerificationError as exc:
                return self._rejected(cfg.name, exc, result)
            verified_request = True
            handshake = verified.handshake
        if handshake is not None:
            result.outcome = "handshake"
            # a handshake the sidecar refuses (X's crc_token that could be an event body) is answered here: passed
            # through, the receiver's own CRC answer would be the same signing oracle. An unsigned one passed
            # through (Slack ssl_check, X CRC) was never verified: not re-signed either.
            if cfg.handshake == "pass" and handshake.status < 400 and handshake.relay:
                return await self._pass_through(
                    request, route, body, None, span, result, verified=verified_request
                )
            return answer_handshake(handshake)
        if verified.nonce is not None:
            replayed = await self._spend_nonce(cfg, verified, body, result)
            if replayed is not None:
                return replayed
        ids = resolve_event_id(cfg, verified, inbound)
        if not type_allowed(cfg, verified.event_type):
            # CONTRACT: every answer carries X-Sidecar-Event-Id when an id is known
            result.outcome, result.event_id = "filtered", ids[0] if ids else None
            return web.json_response({"filtered": True}, headers={EVENT_ID_HEADER: ids[0]} if ids else None)
        if not cfg.dedupe:
            result.outcome, result.event_id = "passthrough", ids[0] if ids else None
            return await self._pass_through(
                request,
                route,
                body,
                result.event_id,
                span,
                result,
                verified=True,
                sign_as=ids[1] if ids else None,
            )
        if ids is None:
            src = cfg.event_id
            where = src.kind if src.kind in ("auto", "body_sha256") else f"{{{src.kind}: {src.value}}}"
            result.outcome, result.detail = "no_event_id", f"no usable event id from event_id: {where}"
            return json_error(400, "no_event_id", detail=result.detail)
        event_id, dedupe_id = ids
        result.event_id = event_id
        # first seen, the claim and its lease: on the schedule's clock (the store's), not the tolerance checks' one
        rec = self._record(
            request, cfg, event_id, dedupe_id, body, self.store.clock.now_ms(), self.tel.traceparent(span)
        )
        breaker = self.dispatcher.breaker(cfg)
        forward_now = breaker.allow()
        # With the upstream's circuit open the event is claimed straight onto the schedule: one round trip and
        # a 202, instead of every provider request waiting out the forward timeout.
        schedule_at = None if forward_now else rec.first_seen_ms + int(breaker.retry_at() * 1000)
        lease_ms = self.dispatcher.lease_ms(cfg)  # the claim's lease, and the 202's next_attempt_at
        try:
            claim = await self.store.claim(rec, rec.first_seen_ms, lease_ms, schedule_at)
        except StoreError as exc:
            breaker.release(forward_now)
            return self._store_failed(cfg.name, f"claim failed for {event_id}", exc, result, event_id)
        if (unsaid := self._failing.over()) is not None:
            log.warning(
                "store calls succeed again (%d more request(s) refused since the last report)", unsaid
            )
        if not claim.claimed:
            breaker.release(forward_now)
            result.outcome = "duplicate"
            # the id the event is stored (and found by the admin API) under: a resend under another unsigned id
            # named an event nobody could look up (an e2e audit)
            known = claim.stored_id or event_id
            body = b'{"duplicate": true, "event_id": %s, "state": "%s"}' % (
                orjson.dumps(known),
                claim.state.encode(),
            )
            return web.Response(body=body, content_type="application/json", headers={EVENT_ID_HEADER: known})
        if (unsaid := self._full.over()) is not None:
            log.warning("store takes new events again (%d more refused since the last report)", unsaid)
        if schedule_at is not None:
            result.outcome, result.error = "queued", "circuit_open"
            return queued(event_id, schedule_at)
        lease_end = rec.first_seen_ms + lease_ms
        return await self._first_attempt(
            rec, span, result, self.dispatcher.answer_within(cfg), lease_end, forward_now
        )

    def _rejected(self, route: str, exc: VerificationError, result: Result) -> web.Response:
        result.outcome, result.error, result.detail = "rejected_signature", exc.reason, exc.detail
        self.tel.signature_failures[(route, exc.reason)] += 1
        self.rejections[route] += 1
        if isinstance(exc, TimestampError):
            return json_error(401, "timestamp_out_of_tolerance", detail=exc.detail)
        return json_error(401, "invalid_signature", detail=exc.detail)

    def _hand_over(self, attempt: asyncio.Task[Any], rec: EventRecord) -> None:
        """A first attempt goes on without its request: kept (for shutdown to wait for) and its end logged."""
        self.late.add(attempt)
        # its body stays held past the answer (which gives the request's share back): counted until it ends
        size = len(rec.body)
        self.inflight_bytes += size
        attempt.add_done_callback(lambda task: self._late_done(task, rec.route, rec.event_id, size))

    def _late_done(self, attempt: asyncio.Task[Any], route: str, event_id: str, size: int = 0) -> None:
        self.late.discard(attempt)
        self.give(size)
        if attempt.cancelled():
            log.warning("route %s: first attempt of %s cut short, left to the lease", route, event_id)
            return
        exc = attempt.exception()
        if isinstance(exc, StoreError):
            log.warning(
                "route %s: first attempt of %s not settled, left to the lease: %s", route, event_id, exc
            )
        elif exc is not None:
            log.error(
                "route %s: first attempt of %s failed, left to the lease", route, event_id, exc_info=exc
            )
        else:
            disp = attempt.result()
            log.info(
                "route %s: first attempt of %s ended after its 202: %s (status %s)",
                route,
                event_id,
                disp.kind,
                disp.outcome.status,
            )

    async def drain(self, timeout: float) -> None:
        """For shutdown: wait (bounded) for first attempts still running after their 202, then cut the rest short
        (their events are leased: attempted again when the lease runs out), so none runs on against a closed
        session or store."""
        if self.late:
            await asyncio.wait(set(self.late), timeout=timeout)
        left = set(self.late)
        for attempt in left:
            attempt.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)

    async def flush_rejections(self) -> None:
        """Move the rejection counts into the store's per-route stats (one pipelined call per flush)."""
        if not self.rejections:
            return
        counts, self.rejections = dict(self.rejections), defaultdict(int)
        try:
            await self.store.count_rejected(counts)
        except StoreError:
            for route, n in counts.items():  # keep them for the next flush
                self.rejections[route] += n

    async def _first_attempt(
        self,
        rec: EventRecord,
        span: AnySpan,
        result: Result,
        within: float | None,
        lease_end: int,
        grant: Grant | None,
    ) -> web.StreamResponse:
        """`lease_end`: when the claim's lease runs out, so when the event is attempted again if this attempt
        never settles it (the `next_attempt_at` of a 202 given before the attempt ended). `grant`: the breaker's
        leave to forward it."""
        result.attempt = 1
        try:
            if within is None:
                disp = await self.dispatcher.attempt(rec, 1, parent=span, lease_end_ms=lease_end, grant=grant)
            else:
                attempt = asyncio.create_task(
                    self.dispatcher.attempt(rec, 1, parent=span, lease_end_ms=lease_end, grant=grant),
                    name="first-attempt",
                )
                try:
                    done, _ = await asyncio.wait((attempt,), timeout=within)
                    if not done and within > 0:  # (0: always answered at once)
                        # one more poll of the sockets (see durations.EXPIRY_GRACE): after a pause of the process this
                        # timer and the upstream's answer, already in the socket's buffer, are due together
                        done, _ = await asyncio.wait((attempt,), timeout=EXPIRY_GRACE)
                except asyncio.CancelledError:  # the handler is cut short (shutdown): the attempt is not
                    self._hand_over(attempt, rec)
                    raise
                if not done:
                    # The provider's deadline comes first: answer now, and let the attempt run on. It settles the
                    # event as usual (delivered mark, or the retry schedule); the claim's lease covers a crash.
                    self._hand_over(attempt, rec)
                    result.outcome = "queued"
                    return queued(rec.event_id, lease_end, in_flight=True)
                disp = attempt.result()
        except StoreError as exc:
            # The event is stored and leased since the claim: a replica picks it up when the lease runs out.
            log.warning("route %s: settling %s failed, left to the lease: %s", rec.route, rec.event_id, exc)
            result.outcome, result.error = "queued", "store_error"
            return queued(rec.event_id, lease_end)
        except Exception:
            # A bug met by one attempt: the event is stored and leased all the same, so the provider is told it is
            # queued (a 500 would make it resend an event the sidecar holds), and the lease brings it back.
            log.exception(
                "route %s: attempt 1 of %s failed unexpectedly, left to the lease", rec.route, rec.event_id
            )
            result.outcome, result.error = "queued", "internal"
            return queued(rec.event_id, lease_end)
        result.error = disp.outcome.error
        result.detail = disp.outcome.detail
        if disp.kind != "delivered" and result.error is None and disp.outcome.status is not None:
            # refused by an HTTP answer: the provider is told 202, so the log line and span say what came back
            result.error = f"http_{disp.outcome.status}"
            result.detail = f"the upstream answered {disp.outcome.status}"
        if disp.kind == "delivered":
            result.outcome = "forwarded"
            return relay(disp.outcome, rec.event_id)
        if disp.kind == "queued":
            result.outcome = "queued"
            return queued(rec.event_id, disp.next_attempt_ms)
        result.outcome = "dead_lettered"
        headers = {EVENT_ID_HEADER: rec.event_id}
        return web.json_response(
            {"dead_lettered": True, "event_id": rec.event_id}, status=202, headers=headers
        )

    def _record(
        self,
        request: web.Request,
        cfg: RouteConfig,
        event_id: str,
        dedupe_id: str,
        body: bytes,
        first_seen_ms: int,
        traceparent: str | None,
    ) -> EventRecord:
        headers = end_to_end(request.headers.items())
        return EventRecord(
            route=cfg.name,
            dedupe_id=dedupe_id,
            event_id=event_id,
            method=request.method,
            path_qs=request.raw_path,
            headers=tuple(headers),
            body=body,
            client_ip=request.remote or "",
            proto=request.scheme,
            host=request.host,
            traceparent=traceparent,
            first_seen_ms=first_seen_ms,
            run=first_seen_ms,  # the claim's run of attempts is named by its first sight (claim.lua's `first`)
        )

    async def _pass_through(
        self,
        request: web.Request,
        route: Route,
        body: bytes,
        event_id: str | None,
        span: AnySpan,
        result: Result,
        *,
        verified: bool,
        sign_as: str | None = None,
    ) -> web.StreamResponse:
        """Synchronous proxying, no claim and no retry: non-POST requests, handshakes in `pass` mode, dedupe: false.
        `verified`: the request passed the route's signature check; only then does `sign_upstream` sign it.
        `sign_as`: the dedupe id (dedupe: false): a signed id, or the digest of the signed bytes when the public id
        is a header the provider does not sign; the webhook-id signed for the upstream, so that a captured request
        resent under made-up header ids keeps one webhook-id for the receiver's own dedupe."""
        forward = self.tel.start_forward(route.cfg.name, event_id or "", 1, span, None)
        rec = self._record(
            request,
            route.cfg,
            event_id or "",
            "",
            body,
            self.store.clock.now_ms(),
            self.tel.traceparent(forward),
        )
        if not verified:
            sign_as = ""
        elif route.upstream_key is not None and not (sign_as or event_id):
            # the Standard Webhooks SDK refuses an empty webhook-id: a verified request without an event id (a
            # handshake passed through, dedupe: false with no id) is signed under its digest
            sign_as = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = upstream_headers(rec, 1, rec.traceparent, route.upstream_key, sign_as)
        if not event_id:
            # no event (a GET, a handshake): no event id, and no attempt number to mislead a receiver into taking
            # it for a delivery
            headers = [(k, v) for k, v in headers if k not in (EVENT_ID_HEADER, "X-Sidecar-Attempt")]
        url = target_url(self.dispatcher.config, route.cfg, rec.path_qs)
        outcome = await self.forwarder.send(url, request.method, headers, body, route.policy)
        self.tel.end(forward, outcome.error, outcome.status)
        if outcome.error != POOL_TIMEOUT:  # counted as the dispatcher counts its forwards: one that was sent
            self.tel.count_forward(route.cfg.name, outcome.kind, outcome.duration)
        if outcome.status is None:
            result.error, result.detail = outcome.error, outcome.detail
            return json_error(502, "upstream_unavailable", event_id, detail=outcome.error)
        return relay(outcome, event_id)
