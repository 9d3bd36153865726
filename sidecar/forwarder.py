"""The only aiohttp client user: sends a stored event upstream byte-for-byte and classifies what came back.

Outcomes: `delivered` (2xx), `retryable` (connection error, timeout, no connection in time to send on
(`pool_timeout`: nothing was sent), a redirect (3xx), or a status in the route's `retry_on`: 408, 425, 429, 5xx by
default), `permanent` (any other status: the upstream rejected the event and asking again will not change its
mind). A redirect is no answer to the event (the receiver's URL moved, or a login proxy stands in front of it):
it is not followed, and it is retried, as the providers themselves do (Stripe, Svix and GitHub count a 3xx as a
failed delivery), so an operator who mends the URL finds the events still there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import yarl

from sidecar.durations import graced_timeout
from sidecar.http1 import MAX_RESPONSE_BYTES, Http1Client, UpstreamError
from sidecar.store.records import EventRecord

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones the client recomputes for the new hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Dropped from what is stored and forwarded: the new hop has its own host and length; Expect belongs to the
# provider's connection to us, which we already answered.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}


def end_to_end(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones, including any a Connection field names: every Connection line counts, as
    the lines of a list field make one list (RFC 9110 §5.3)."""
    headers = list(headers)
    extra = {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",")}
    return [(k, v) for k, v in headers if k.lower() not in NOT_FORWARDED and k.lower() not in extra]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Which upstream statuses are worth another attempt (`retry.retry_on`: "429", "5xx", …)."""

    codes: frozenset[int] = frozenset({408, 425, 429})
    classes: frozenset[int] = frozenset({5})

    @classmethod
    def parse(cls, retry_on: Iterable[str]) -> RetryPolicy:
        codes, classes = set(), set()
        for item in retry_on:
            item = item.strip().lower()
            if item.endswith("xx"):
                classes.add(int(item[0]))
            else:
                codes.add(int(item))
        return cls(frozenset(codes), frozenset(classes))

    def retryable(self, status: int) -> bool:
        return status in self.codes or status // 100 in self.classes


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["delivered", "retryable", "permanent"]
    status: int | None
    error: str | None
    duration: float
    retry_after: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # what went wrong, in words, beside the `error` code (a refused certificate, "Too many open files", the
    # parser's message): for the log line, which is where an operator looks
    detail: str | None = None


def standard_webhooks_headers(key: bytes, msg_id: str, body: bytes, now: int) -> list[tuple[str, str]]:
    """`webhook-id`, `webhook-timestamp`, `webhook-signature` (v1: HMAC-SHA256 over `id.ts.body`, base64)."""
    mac = hmac.new(key, f"{msg_id}.{now}.".encode() + body, hashlib.sha256).digest()
    return [
        ("webhook-id", msg_id),
        ("webhook-timestamp", str(now)),
        ("webhook-signature", "v1," + base64.b64encode(mac).decode()),
    ]


def _same_trace(traceparent: str | None, other: str | None) -> bool:
    """Do two W3C `traceparent` values name one trace (the same trace-id)?"""
    return traceparent is not None and other is not None and traceparent[3:35] == other[3:35]


def upstream_headers(
    rec: EventRecord,
    attempt: int,
    traceparent: str | None,
    sign_key: bytes | None = None,
    sign_as: str | None = None,
) -> list[tuple[str, str]]:
    """What the upstream receives besides the original end-to-end headers (CONTRACT: 'What the upstream receives').

    With `sign_key` (route `sign_upstream`), Standard Webhooks headers signed now, at this attempt, replace any the
    provider sent: a receiver verifies a retry hours later within its own timestamp tolerance. A request that came
    with Svix's `svix-*` names gets the same three values under those names too, in place of the provider's: the
    Svix SDK prefers them when both are present, and Clerk's reads only them. They are signed as `sign_as` (the
    webhook-id; default the event id), and `sign_as=""` signs nothing: a request the sidecar did not verify is not
    vouched for, and the client's own headers of those names are dropped all the same.
    """
    dropped = _REPLACED | _STANDARD_WEBHOOKS if sign_key is not None else _REPLACED
    headers: list[tuple[str, str]] = []
    prior_xff: list[str] = []
    # An ingress before us saw the provider's scheme and host: the receiver keeps seeing them (its own signature
    # check may rebuild the public URL from them); ours only where none came.
    proto_in: str | None = None
    host_in: str | None = None
    svix = False
    for k, v in rec.headers:  # one pass: keep the end-to-end headers, remember the proxies before us
        name = k.lower()
        if name == "x-forwarded-for":
            prior_xff.append(v)
        elif name == "x-forwarded-proto":
            proto_in = v if proto_in is None else proto_in
        elif name == "x-forwarded-host":
            host_in = v if host_in is None else host_in
        elif sign_key is not None and name in _SVIX:
            svix = True
        elif name == "tracestate" and not _same_trace(traceparent, rec.traceparent):
            # The provider's `tracestate` belongs to its trace: kept where this attempt continues it (the first, a
            # child of the inbound span), not on a retry, a trace of its own (W3C Trace Context 3.3)
            continue
        elif name not in dropped and not name.startswith("x-sidecar-"):
            headers.append((k, v))
    xff = ", ".join([*prior_xff, rec.client_ip]) if rec.client_ip else ", ".join(prior_xff)
    headers += [
        ("X-Sidecar-Event-Id", rec.event_id),
        ("X-Sidecar-Attempt", str(attempt)),
        ("X-Sidecar-Route", rec.route),
        ("X-Forwarded-Proto", proto_in or rec.proto),
    ]
    if host_in or rec.host:
        headers.append(("X-Forwarded-Host", host_in or rec.host))
    if xff:
        headers.append(("X-Forwarded-For", xff))
    if traceparent:
        headers.append(("traceparent", traceparent))
    if sign_key is not None and sign_as != "":
        signed = standard_webhooks_headers(sign_key, sign_as or rec.event_id, rec.body, int(time.time()))
        headers += signed
        if svix:
            headers += [("svix" + name.removeprefix("webhook"), value) for name, value in signed]
    return headers


_NO_TIMEOUT = aiohttp.ClientTimeout()  # graced_timeout bounds the whole exchange
_REPLACED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "traceparent"})
_STANDARD_WEBHOOKS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})
_SVIX = frozenset({"svix-id", "svix-timestamp", "svix-signature"})


class Forwarder:
    """POSTs (every event) go through the lean keep-alive client in `http1`; other methods (pass-through of
    GET/HEAD/…, whose semantics aiohttp handles fully) through the shared aiohttp session."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout: float, http1: Http1Client | None = None
    ) -> None:
        self._session = session
        self._http1 = http1
        self._total = timeout

    @property
    def timeout(self) -> float:
        """The longest a forward takes (`upstream.timeout` as the process started: a reload does not change it)."""
        return self._total

    async def send(
        self,
        url: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        policy: RetryPolicy,
    ) -> Outcome:
        start = time.perf_counter()
        if method == "POST" and self._http1 is not None:
            try:
                resp = await self._http1.post(url, headers, body, self._total)
            except UpstreamError as exc:
                return Outcome("retryable", None, exc.kind, time.perf_counter() - start, detail=str(exc))
            status, payload = resp.status, resp.body
            retry_after = next((v for k, v in resp.headers if k.lower() == "retry-after"), None)
            return _classify(status, payload, end_to_end(resp.headers), retry_after, policy, start)
        try:
            # not aiohttp's total timeout: after a pause of the process it expired before the answer already in the
            # socket's buffer was read (a GET passed through answered 502 timeout)
            async with (
                graced_timeout(self._total),
                self._session.request(
                    method,
                    # the path and query as they came (no re-encoding); no body: aiohttp adds no Content-Length to a
                    # GET (it still does to a PUT or DELETE)
                    yarl.URL(url, encoded=True),
                    data=body or None,
                    headers=_one_case_per_name(headers),
                    timeout=_NO_TIMEOUT,
                    allow_redirects=False,
                    skip_auto_headers=("Accept", "Content-Type", "Accept-Encoding", "User-Agent"),
                ) as answer,
            ):
                # bounded as the POST client bounds it: a pass-through GET of a huge file must not sit in memory
                chunks, size = [], 0
                async for chunk in answer.content.iter_any():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        return Outcome(
                            "retryable",
                            None,
                            "response_too_large",
                            time.perf_counter() - start,
                            detail=f"response body over {MAX_RESPONSE_BYTES} bytes",
                        )
                    chunks.append(chunk)
                payload = b"".join(chunks)
                status = answer.status
                retry_after = answer.headers.get("Retry-After")
                relay = end_to_end(answer.headers.items())
        except TimeoutError:
            return Outcome("retryable", None, "timeout", time.perf_counter() - start)
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome("retryable", None, _describe(exc), time.perf_counter() - start)
        return _classify(status, payload, relay, retry_after, policy, start)


def _one_case_per_name(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A repeated header under the spelling of its first line. aiohttp's client keeps the lines of a repeated name
    only when they are spelled alike: `X-Dup: 1` then `x-dup: 2` went out as `x-dup: 2` alone."""
    first: dict[str, str] = {}
    return [(first.setdefault(k.lower(), k), v) for k, v in headers]


def _classify(
    status: int,
    payload: bytes,
    relay: list[tuple[str, str]],
    retry_after: str | None,
    policy: RetryPolicy,
    start: float,
) -> Outcome:
    duration = time.perf_counter() - start
    if 200 <= status < 300:
        return Outcome("delivered", status, None, duration, retry_after, relay, payload)
    # a redirect (3xx) is retried: it is not the receiver's answer to the event (see the module docstring); until
    # then a 302 to a login page dead-lettered every event at once as "rejected"
    retry = status < 400 or policy.retryable(status)
    kind: Literal["retryable", "permanent"] = "retryable" if retry else "permanent"
    return Outcome(kind, status, None, duration, retry_after, relay, payload)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_error"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "disconnected"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return type(exc).__name__
