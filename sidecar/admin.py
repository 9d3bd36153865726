"""The admin application on `admin.listen`: health, readiness, metrics and, under /admin/, the operator API.

    GET    /healthz /readyz /metrics                 no auth
    GET    /admin/openapi.json                       this API as an OpenAPI 3.1 document (sidecar.admin_spec)
    GET    /admin/dlq                                page through dead letters (cursor, filters)
    GET    /admin/dlq/{id}                           one dead letter with headers, body and history
    DELETE /admin/dlq/{id}
    POST   /admin/dlq/replay                         back onto the retry schedule (the worker delivers)
    POST   /admin/dlq/drain                          stream the items out as NDJSON, removing each once sent;
                                                     with "hold", leaving them held in the DLQ (two phases):
    POST   /admin/dlq/drain/{drain}/remove           ... then remove those the client has stored
    POST   /admin/dlq/drain/{drain}/release          ... and give back those it could not store
    GET    /admin/events/{route}/{event_id}          an event's state and history
    DELETE /admin/events/{route}/{event_id}          forget a delivered/dead event's claim
    GET    /admin/stats                              per-route counters

Everything under /admin/ needs `Authorization: Bearer <admin.token>`; with no token configured it is closed.
Every error is `{"error": code, "detail": text}` (never a traceback); every mutation is logged on `sidecar.admin`
with its reason, ids, route and counts, never a body or a secret. Add a route: register it in
`create_admin_app` and describe it in `sidecar.admin_spec` (tests/test_admin.py keeps the two in sync).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hmac
import json
import logging
import re
import socket
import struct
import termios
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sidecar.admin_spec import (
    CURSOR,
    DEAD_ID,
    DRAIN_HEADER,
    DRAIN_ID,
    EPOCH,
    MAX_HOLD,
    MAX_IDS,
    MAX_REASON,
    RFC3339,
    document,
)
from sidecar.app import CONFIG, RUN_WORKER, RUNTIME, Runtime
from sidecar.durations import parse_duration
from sidecar.errors import StoreError, StoreUnavailable
from sidecar.ingress import BAD_BODY, client_fields, parse_error_detail
from sidecar.logs import Tally
from sidecar.providers.base import stored_id
from sidecar.store.dead_letters import Cursor, DeadLetter, DeadLetters, ReplayOutcome, StatusFilter
from sidecar.store.records import STATE_NAMES
from sidecar.store.redis_store import dead_letter_id, life_dead_letter_id
from sidecar.telemetry import metrics_handler, removed_routes

log = logging.getLogger("sidecar.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
REPLAY_BATCH = 100
# Items of a batch replayed at a time: each runs a few store calls in turn on a connection of the store client's
# pool, which keeps every connection it opened (with all 100 at once, a replay left ~100 idle connections per replica).
REPLAY_CONCURRENCY = 16
DRAIN_BATCH = 50
# How long a drain waits for the client to take one line before it gives up (the item stays in the DLQ).
DRAIN_LINE_TIMEOUT = 30.0
# How long an event lookup or forget waits for this process's queued delivered marks (written within ms)
MARKS_WAIT = 1.0
# /readyz and /metrics answer within this, a hung store included (the store client alone may retry past 2 s)
READY_TIMEOUT = 1.5
# How long a drain holds an item it took: its line written and acknowledged (DRAIN_LINE_TIMEOUT at most each),
# then removed (one store call, redis.timeout at most).
DRAIN_LEASE_MS = int((2 * DRAIN_LINE_TIMEOUT + 30.0) * 1000)
SKIPPED = ("pending", "delivered", "busy", "gone")  # what a replay answers it skipped, by why
REFUSED_REPORT_S = 60.0  # admin calls refused 401: said once, then at most this often with a count

_ID = re.compile(DEAD_ID)
_DRAIN = re.compile(DRAIN_ID)
_ROUTE = re.compile(r"[a-z0-9_-]{1,100}")
_CURSOR = re.compile(CURSOR)
_EPOCH = re.compile(EPOCH)
_RFC3339 = re.compile(RFC3339)
_STATUS_CLASS = re.compile(r"([1-5])xx")


class ApiError(Exception):
    """An answer other than success; rendered as `{"error": code, "detail": detail, **extra}`."""

    def __init__(self, status: int, error: str, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or error)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra
        self.headers: dict[str, str] = {}
        self.close = False  # end the connection with the answer (what follows on it is in no known state)

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.error}
        if self.detail:
            body["detail"] = self.detail
        resp = web.json_response({**body, **self.extra}, status=self.status, headers=self.headers or None)
        if self.close:
            resp.force_close()  # (a Connection: close header set here, aiohttp does not act on)
        return resp


def bad_request(detail: str) -> ApiError:
    return ApiError(400, "bad_request", detail)


def not_found(detail: str, **extra: Any) -> ApiError:
    return ApiError(404, "not_found", detail, **extra)


# -- middlewares --------------------------------------------------------------------------------------------------

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        resp = ApiError(exc.status, code, exc.reason).response()
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except StoreError as exc:
        if not isinstance(exc, StoreUnavailable):
            log.warning("admin %s %s: %s", request.method, request.path, exc)
        return store_failure(exc).response()
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return ApiError(500, "internal", "unexpected error; see the sidecar log").response()


def store_failure(exc: StoreError, detail: str | None = None, **extra: Any) -> ApiError:
    """The 503 for a store call that failed: `store_unavailable` (with Retry-After) when the store cannot be
    reached, else `store_error`, whose cause is in the sidecar's log only."""
    if isinstance(exc, StoreUnavailable):
        failure = ApiError(503, "store_unavailable", detail or str(exc), **extra)
        failure.headers = {"Retry-After": "1"}
        return failure
    return ApiError(
        503, "store_error", detail or "the store refused the operation; see the sidecar log", **extra
    )


def replay_cut_short(exc: StoreError, selector: str, counts: Counter[str], selected: int) -> ApiError:
    """A replay the store failed part way through: what it did is said, not only the store's error (a bare 503
    read as "nothing replayed" while 199 of 1,200 had been, in an e2e audit)."""
    log.warning(
        "dlq replay cut short by the store: %s replayed=%d of %d: %s",
        selector,
        counts["replayed"],
        selected,
        exc,
    )
    return store_failure(
        exc,
        f"the replay stopped part way, {counts['replayed']} of {selected} replayed: {exc}; run it again once the "
        "store answers (what was replayed has left the DLQ, so nothing is replayed twice)",
        replayed=counts["replayed"],
        skipped={k: counts[k] for k in SKIPPED},
        partial=True,
    )


def auth_middleware(main: web.Application) -> Any:
    refused = Tally(REFUSED_REPORT_S)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/admin" or request.path.startswith("/admin/"):
            try:
                check_token(request, configured_token(main))
            except ApiError as exc:
                refused.say(  # the first, then a count at most every REFUSED_REPORT_S: no log flood
                    log,
                    logging.WARNING,
                    "admin: %d request(s) refused 401 since the last report, the last: %s %r: %s",
                    request.method,
                    request.path[:200],  # %r: a client's %0A must not start a forged line in a text log
                    exc.detail,
                    extra=client_fields(request),
                )
                raise
        return await handler(request)

    return auth


def configured_token(main: web.Application) -> str | None:
    runtime = main.get(RUNTIME)
    config = runtime.config if runtime is not None else main.get(CONFIG)
    return config.admin.token if config is not None else None


def check_token(request: web.Request, token: str | None) -> None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not token:
        raise ApiError(401, "unauthorized", "admin.token is not configured: the admin API is closed")
    # aiohttp decodes header bytes as UTF-8 with surrogate escapes (and os.environ, where the token may come from,
    # does too): encoding the same way gives back the bytes, where a plain encode() raised on one that is not UTF-8
    # (`Bearer \xff` was a 500 for anyone)
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    expected = token.encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


# -- request parsing ----------------------------------------------------------------------------------------------


def parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


def parse_time(name: str, value: str | None) -> int | None:
    """RFC 3339 (with an offset) or epoch seconds -> epoch ms."""
    if value is None:
        return None
    problem = (
        f"{name} must be an RFC 3339 time with seconds and an offset (2024-05-01T12:00:00Z) or epoch seconds"
    )
    if _EPOCH.fullmatch(value):
        seconds = float(value)
    elif _RFC3339.fullmatch(value):
        # the forms the OpenAPI document's "date-time" takes, no more (fromisoformat alone also took times without
        # seconds, a space for the T and ISO 8601's basic form, which a client built from the document never sends)
        text = value.upper()
        # RFC 3339 has a leap second (:60) and a year 0000; datetime has neither: the second after :59, and a year
        # before 1970 selects as 1970 does (below)
        leap = text[17:19] == "60"
        text = "0001" + text[4:] if text.startswith("0000") else text
        try:
            seconds = (
                datetime.fromisoformat(text[:17] + "59" + text[19:] if leap else text).timestamp() + leap
            )
        except (OverflowError, ValueError):
            # a day or hour that does not exist (2024-02-30, 25:00)
            raise bad_request(problem) from None
    else:
        raise bad_request(problem)
    # before 1970 selects what 1970 does: no dead letter is older
    return max(0, int(seconds * 1000))


def parse_status(value: str | None) -> StatusFilter | None:
    if value is None:
        return None
    text = value.lower()
    if text == "error":
        return StatusFilter("none")
    if m := _STATUS_CLASS.fullmatch(text):
        return StatusFilter("class", int(m.group(1)))
    if text.isascii() and text.isdigit() and 100 <= int(text) <= 599:
        return StatusFilter("eq", int(text))
    raise bad_request("status must be a code (503), a class (5xx) or `error` (no status: the request failed)")


def parse_cursor(value: str | None) -> Cursor | None:
    if value is None:
        return None
    m = _CURSOR.fullmatch(value)
    if not m:
        raise bad_request("cursor is not one this API returned")
    return Cursor(int(m.group(1)), m.group(2))


def format_cursor(cursor: Cursor | None) -> str | None:
    return f"{cursor.dead_ms}-{cursor.id}" if cursor else None


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: `{"dry_run": true, "dry_run": false}` read as the last one did a
    real replay of the whole DLQ."""
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return body


async def json_object(request: web.Request, timeout: float, *, empty_ok: bool = False) -> dict[str, Any]:
    """The body as a JSON object, read within `timeout` (`server.read_timeout`): a client dribbling its body
    cannot hold a handler, and its connection, for as long as it likes."""
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "read_timeout", "the body did not arrive within server.read_timeout") from None
    except ConnectionResetError:
        # the client went away part way through its body (it was an error and a traceback in the log): nothing was
        # done, and there is no one left to answer
        log.info(
            "admin %s %s: the client closed the connection before its body ended",
            request.method,
            request.path,
        )
        gone = bad_request("the connection ended before the body did")
        gone.close = True
        raise gone from None
    except HttpProcessingError as exc:  # its framing refused part way (a malformed chunk)
        raise bad_request(parse_error_detail(exc, BAD_BODY)) from None
    except RequestPayloadError:
        # a gzip Content-Encoding over bytes that are not (it was a 500 and a traceback): the rest of the body is
        # not read (aiohttp's lingering read would meet the same error, and log it as unhandled), and the
        # connection ends with the answer: its bytes are in no known state
        request.content.feed_eof()
        refused = bad_request("the body does not match its Content-Encoding")
        refused.close = True
        raise refused from None
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys)
    except _RepeatedKey as exc:
        raise bad_request(f"the body gives {str(exc)[:100]!r} more than once") from None
    except (ValueError, RecursionError):
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def only_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(
            f"unknown field(s): {', '.join(unknown)[:200]}; allowed: {', '.join(sorted(allowed))}"
        )


def parse_ids(value: Any, name: str = "ids") -> list[str]:
    """A body's `"ids"`: a non-empty list of strings, at most MAX_IDS, each once (in the order given)."""
    if not isinstance(value, list) or not value or not all(isinstance(i, str) for i in value):
        raise bad_request(f'"{name}" must be a non-empty list of dead-letter ids')
    if len(value) > MAX_IDS:
        raise bad_request(f'at most {MAX_IDS} "{name}" per request')
    return list(dict.fromkeys(value))


def dead_letter_ids(value: Any, name: str = "ids") -> list[str]:
    """`parse_ids`, each of them a dead-letter id."""
    ids = parse_ids(value, name)
    bad = [i for i in ids if not _ID.fullmatch(i)]
    if bad:
        raise bad_request(f"not dead-letter ids: {', '.join(repr(b[:100]) for b in bad[:5])}")
    return ids


def parse_hold(value: Any) -> int:
    """A held drain's hold in ms (0: not held): seconds, or a duration like `10m`; 1 s to 24 h."""
    if value is None:
        return 0
    problem = "hold must be a duration from 1s to 24h (seconds, or text like 10m)"
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise bad_request(problem) from None
    if not 1.0 <= seconds <= MAX_HOLD:
        raise bad_request(problem)
    return int(seconds * 1000)


def only_query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    """Refuse query parameters the endpoint does not take: a misspelled `?reasn=` on a delete would otherwise drop
    the reason from the audit log without a word. Returns the given ones, an empty value counting as not given (the
    contract writes the call `GET /admin/dlq?route=&limit=&cursor=`, and many clients send an absent optional
    parameter so: `limit=` was refused, `route=` was "no route ''")."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise bad_request(f"unknown query parameter(s): {', '.join(unknown)[:200]}")
    # `?route=a&route=b` read as `a` alone would act on something else than what was asked
    repeated = sorted(k for k in set(request.query) if len(request.query.getall(k)) > 1)
    if repeated:
        raise bad_request(f"query parameter(s) given more than once: {', '.join(repeated)[:200]}")
    return {k: v for k, v in request.query.items() if v != ""}


def parse_reason(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_REASON:
        raise bad_request(f"reason must be a string of at most {MAX_REASON} characters")
    return value


# -- rendering ----------------------------------------------------------------------------------------------------


def rfc3339(ms: int | float | None) -> str | None:
    if not ms:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_history(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for h in entries:
        if "replayed_at_ms" in h:
            out.append({"replayed_at": rfc3339(h["replayed_at_ms"]), "reason": h.get("reason") or None})
        else:
            out.append(
                {
                    "at": rfc3339(h.get("at_ms")),
                    "attempt": h.get("attempt"),
                    "status": h.get("status"),
                    "error": h.get("error"),
                    "duration_ms": h.get("duration_ms"),
                }
            )
    return out


def render_item(item: DeadLetter) -> dict[str, Any]:
    d = item.data
    return {
        "id": item.id,
        "route": item.route,
        "event_id": item.event_id,
        "attempts": d.get("attempts"),
        "last_status": d.get("last_status"),
        "last_error": d.get("last_error"),
        "first_seen_at": rfc3339(d.get("first_seen_ms")),
        "dead_at": rfc3339(item.dead_ms),
        "reason": d.get("reason"),
    }


def render_full(item: DeadLetter) -> dict[str, Any]:
    meta = item.data.get("meta") or {}
    out = render_item(item)
    out["method"] = meta.get("m")
    out["path"] = meta.get("p")
    out["headers"] = [[k, v] for k, v in item.headers]
    if item.body is None:
        out["body_missing"] = True  # evicted from the store: only the metadata and history are left
    try:
        out["body"] = (item.body or b"").decode("utf-8")
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(item.body or b"").decode("ascii")
    out["history"] = render_history(item.history)
    return out


def log_ids(ids: list[str]) -> str:
    shown = ",".join(ids[:20])
    return shown + (f",… ({len(ids)} in all)" if len(ids) > 20 else "")


# -- drain flow control -------------------------------------------------------------------------------------------

_TCP_LIVE = {1, 8}  # ESTABLISHED, CLOSE_WAIT: the peer has not reset the connection


def _unacked(sock: Any) -> int | None:
    """Bytes written to `sock` that the peer's TCP has not acknowledged yet (Linux SIOCOUTQ); None elsewhere."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError, ValueError):
        return None
    if state not in _TCP_LIVE:
        return -1  # reset: the kernel dropped what was queued, and a count of 0 would mean nothing
    return int(struct.unpack("i", buf)[0])


async def peer_took_everything(request: web.Request, timeout: float) -> bool:
    """Wait until everything written so far left our buffers and the peer acknowledged it; False if it went away.

    Why: an item may leave the DLQ only once its line reached the client. Handing the bytes to the kernel is not
    enough (a client that closes early would lose whatever sat in the buffers); the peer's TCP acknowledgement is
    the nearest evidence the server can get. What remains is the client's own receive buffer.
    """
    transport = request.transport
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while transport is not None and not transport.is_closing():
        if transport.get_write_buffer_size() == 0:
            unacked = _unacked(transport.get_extra_info("socket"))
            if unacked is None or unacked == 0:
                return True
            if unacked < 0:
                return False
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False


def cut_short(request: web.Request) -> None:
    """End a stream without its terminating chunk: the status line is long gone, and a clean end would let the
    client take a partial drain for a complete one."""
    if request.transport is not None:
        request.transport.abort()


# -- the API ------------------------------------------------------------------------------------------------------


class AdminApi:
    """Handlers for /admin/*. The runtime is read per request: it exists once the main app has started."""

    def __init__(self, main: web.Application) -> None:
        self.main = main
        self._dead_letters: DeadLetters | None = None

    def runtime(self) -> Runtime:
        runtime = self.main.get(RUNTIME)
        if runtime is None:
            raise ApiError(503, "starting", "the sidecar is still starting")
        return runtime

    def dead_letters(self) -> DeadLetters:
        store = self.runtime().store
        if self._dead_letters is None or self._dead_letters.store is not store:
            self._dead_letters = DeadLetters(store)
        return self._dead_letters

    def read_timeout(self) -> float:
        return self.runtime().dispatcher.config.server.read_timeout

    def configured_routes(self) -> list[str]:
        return self.runtime().dispatcher.route_names()  # routes change on reload (admin.* only at a restart)

    async def known_route(self, route: Any) -> str:
        """A configured route, or one that still has dead letters (its config was removed); else 404."""
        # ("" was 404 "no route ''"; the document says minLength 1)
        if not isinstance(route, str) or not route:
            raise bad_request('"route" must be a route name (a non-empty string)')
        if not _ROUTE.fullmatch(route):
            raise not_found(f"no route {str(route)[:100]!r}")
        if route not in self.configured_routes() and not await self.dead_letters().count(route):
            raise not_found(f"no route {route!r}")
        return route

    # -- dead letters ---------------------------------------------------------------------------------------------

    async def list_dlq(self, request: web.Request) -> web.Response:
        q = only_query(request, {"route", "limit", "cursor", "since", "until", "status"})
        limit = parse_limit(q.get("limit"))
        cursor = parse_cursor(q.get("cursor"))
        since, until = parse_time("since", q.get("since")), parse_time("until", q.get("until"))
        if since is not None and until is not None and since > until:
            raise bad_request("since is after until")
        status = parse_status(q.get("status"))
        route = await self.known_route(q["route"]) if "route" in q else None
        page = await self.dead_letters().page(
            route=route, after=cursor, since_ms=since, until_ms=until, status=status, limit=limit
        )
        return web.json_response(
            {
                "items": [render_item(i) for i in page.items],
                "next_cursor": format_cursor(page.next),
                "total": page.total,
            }
        )

    async def item_or_404(self, request: web.Request) -> DeadLetter:
        item_id = request.match_info["id"]
        item = await self.dead_letters().get(item_id) if _ID.fullmatch(item_id) else None
        if item is None:
            raise not_found(f"no dead letter {item_id[:100]!r}")
        return item

    async def show_dlq(self, request: web.Request) -> web.Response:
        only_query(request, set())
        return web.json_response(render_full(await self.item_or_404(request)))

    async def delete_dlq(self, request: web.Request) -> web.Response:
        reason = parse_reason(only_query(request, {"reason"}).get("reason"))
        item = await self.item_or_404(request)
        if not await self.dead_letters().remove(item):
            raise not_found(f"dead letter {item.id} was removed or replaced meanwhile")
        log.info(
            "dlq delete: id=%s route=%s event_id=%s reason=%r", item.id, item.route, item.event_id, reason
        )
        return web.json_response({"deleted": True, "id": item.id})

    async def replay(self, request: web.Request) -> web.Response:
        only_query(request, set())  # `?dry_run=true` must not run the real thing
        body = await json_object(request, self.read_timeout())
        only_fields(body, {"ids", "route", "all", "dry_run", "reason"})
        selectors = [k for k in ("ids", "route", "all") if k in body]
        if len(selectors) != 1:
            raise bad_request('give exactly one of "ids", "route" or "all"')
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise bad_request("dry_run must be true or false")
        reason = parse_reason(body.get("reason"))
        dl = self.dead_letters()
        selector, ids = await self.selection(body, selectors[0])
        if dry_run:
            # what the replay would keep because its body is gone from the store (evicted), and of the rest, what
            # it would skip as busy now (another drain or replay holds it), are not counted in: the replay looks
            # at the body first, so an item both held and without its body is counted once, as body_missing
            gone = await dl.bodies_missing(ids)
            missing, without = len(gone), set(gone)
            busy = await dl.held([i for i in ids if i not in without])
            would = max(0, len(ids) - busy - missing)
            log.info(
                "dlq replay dry run: %s would_replay=%d busy=%d body_missing=%d reason=%r",
                selector,
                would,
                busy,
                missing,
                reason,
            )
            answer = {"would_replay": would, "busy": busy}
            if missing:  # only then: the answer's shape stays what clients know
                answer["body_missing"] = missing
            return web.json_response(answer)
        counts: Counter[str] = Counter()
        now_ms, owner = self.runtime().store.clock.now_ms(), uuid.uuid4().hex
        slots = asyncio.Semaphore(REPLAY_CONCURRENCY)

        async def replay(item: DeadLetter) -> ReplayOutcome:
            async with slots:
                return await dl.replay(item, now_ms, reason, owner)

        try:
            for start in range(0, len(ids), REPLAY_BATCH):
                batch = ids[start : start + REPLAY_BATCH]
                items = await dl.get_many(batch)
                # removed since the selection (by a replay or drain elsewhere)
                counts["gone"] += len(batch) - len(items)
                # the whole batch ends before an answer: every one it did is counted, then its first failure raised
                outcomes = await asyncio.gather(*(replay(i) for i in items), return_exceptions=True)
                failures = [o for o in outcomes if isinstance(o, BaseException)]
                counts.update(o for o in outcomes if not isinstance(o, BaseException))
                if failures:
                    raise failures[0]
        except StoreError as exc:
            raise replay_cut_short(exc, selector, counts, len(ids)) from exc
        log.info(
            "dlq replay: %s replayed=%d skipped_pending=%d obsolete_removed=%d busy=%d gone=%d reason=%r",
            selector,
            counts["replayed"],
            counts["pending"],
            counts["delivered"],
            counts["busy"],
            counts["gone"],
            reason,
        )
        skipped = {k: counts[k] for k in SKIPPED}
        if counts["body_missing"]:  # only then: the answer's shape stays what clients know
            skipped["body_missing"] = counts["body_missing"]
            log.error(
                "dlq replay: %d dead letter(s) kept, not replayed: their body is gone from the store (evicted? "
                "check its maxmemory-policy)",
                counts["body_missing"],
            )
        return web.json_response({"replayed": counts["replayed"], "skipped": skipped})

    async def selection(self, body: dict[str, Any], selector: str) -> tuple[str, list[str]]:
        """(what to log, the ids) for a replay body's `ids` | `route` | `all`."""
        dl = self.dead_letters()
        if selector == "all":
            if body["all"] is not True:
                raise bad_request('"all" must be true')
            return "all", await dl.ids()
        if selector == "route":
            route = await self.known_route(body["route"])
            return f"route={route}", await dl.ids(route)
        ids = parse_ids(body["ids"])
        found = {i.id for i in await dl.get_many([i for i in ids if _ID.fullmatch(i)])}
        missing = [i for i in ids if i not in found]
        if missing:
            # A typo must not half-apply; but an id listed a moment ago may have left the DLQ since (another
            # operator's replay, drain or delete; a delivery): the answer says both, and that none was replayed.
            raise not_found(
                f"{len(missing)} dead-letter id(s) not in the DLQ (mistyped, or replayed, drained or deleted since "
                "they were listed); none replayed: run it again without them",
                ids=[m[:100] for m in missing[:100]],
            )
        return f"ids={log_ids(ids)}", ids

    async def drain(self, request: web.Request) -> web.StreamResponse:
        only_query(request, set())  # `?route=x` must not drain every route
        body = await json_object(request, self.read_timeout(), empty_ok=True)
        only_fields(body, {"route", "reason", "hold"})
        reason = parse_reason(body.get("reason"))
        hold_ms = parse_hold(body.get("hold"))
        route = await self.known_route(body["route"]) if "route" in body else None
        dl = self.dead_letters()
        ids = await dl.ids(route)  # a snapshot: items dead-lettered meanwhile wait for the next drain
        owner = uuid.uuid4().hex
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        if hold_ms:
            resp.headers[DRAIN_HEADER] = owner
        # prepared at the first line (or the end): a store that refuses the first take (NOREPLICAS, MISCONF, a
        # failover) is answered a JSON error, not a 200 whose stream breaks off with nothing said
        drained, skipped, outcome = 0, 0, "complete"
        held: DeadLetter | None = None  # taken, its line not yet written (or, streaming, not acknowledged)
        # the bodies read ahead: a quarter of the in-flight budget at most, so that a few drains at once stay
        # within it (four drains of 50 read-ahead 1 MiB bodies took the shipped pod past its memory limit)
        server = self.runtime().dispatcher.config.server
        batch = max(1, min(DRAIN_BATCH, server.max_inflight_bytes // (4 * server.max_body_bytes)))
        try:
            for start in range(0, len(ids), batch):
                for item in await dl.get_many(ids[start : start + batch]):
                    # only what this drain took: another drain or a replay on another replica has the rest
                    if await dl.take(item, owner, hold_ms or DRAIN_LEASE_MS) != "taken":
                        skipped += 1  # another drain or a replay has it, or it was removed meanwhile
                        continue
                    held = item
                    line = json.dumps(render_full(item), separators=(",", ":")) + "\n"
                    if not resp.prepared:
                        await resp.prepare(request)
                    try:  # a client that stops reading a large line holds the write: bounded like the ack
                        await asyncio.wait_for(resp.write(line.encode()), DRAIN_LINE_TIMEOUT)
                    except TimeoutError as exc:
                        raise ConnectionResetError("the client stopped reading") from exc
                    if hold_ms:
                        # stays in the DLQ, held: the client removes it once it has stored it
                        drained += 1
                    elif not await peer_took_everything(request, DRAIN_LINE_TIMEOUT):
                        raise ConnectionResetError("the client went away or stopped reading")
                    else:
                        drained += await dl.remove(item)
                    held = None
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError as exc:
            outcome = f"stopped: {exc}"
            cut_short(request)
        except StoreError as exc:
            outcome = f"store error: {exc}"
            if not resp.prepared:
                raise  # nothing streamed yet: the error answer (503 JSON), as every other admin call
            cut_short(request)
        except asyncio.CancelledError:  # the client went away while the handler waited
            outcome = "stopped: cancelled"
            raise
        finally:
            # its line may not have reached the client: give it back, not at the lease's end
            if held is not None:
                await dl.give_back(held, owner)
            log.info(
                "dlq drain: route=%s %s=%d of %d skipped=%d (%s) reason=%r%s",
                route or "*",
                "handed_out" if hold_ms else "drained",
                drained,
                len(ids),
                skipped,
                outcome,
                reason,
                f" held by drain {owner} for {hold_ms // 1000}s" if hold_ms else "",
            )
        return resp

    async def held_items(
        self, request: web.Request, fields: set[str]
    ) -> tuple[str, dict[str, Any], list[str]]:
        """(drain id, body, ids) of a call on a held drain: the ids it names must be dead-letter ids."""
        owner, body = await self.held_call(request, fields)
        return owner, body, dead_letter_ids(body.get("ids"))

    async def held_call(self, request: web.Request, fields: set[str]) -> tuple[str, dict[str, Any]]:
        only_query(request, set())
        owner = request.match_info["drain"]
        if not _DRAIN.fullmatch(owner):
            raise not_found(
                f"no drain {owner[:100]!r} (a drain id is the {DRAIN_HEADER} header of a held drain)"
            )
        body = await json_object(request, self.read_timeout())
        only_fields(body, fields)
        return owner, body

    async def remove_held(self, request: web.Request) -> web.Response:
        """Step 2 of a held drain: remove the items its client has stored. Only items this drain still holds are
        removed (its hold may have ended, as long as nobody took the item since); the answer says what became of
        the others, so the client can tell the operator which may come out again."""
        owner, body, ids = await self.held_items(request, {"ids", "reason"})
        reason = parse_reason(body.get("reason"))
        dl = self.dead_letters()
        found = {item.id: item for item in await dl.get_many(ids)}
        result: dict[str, list[str]] = {
            "gone": [i for i in ids if i not in found],
            "busy": [],
            "not_held": [],
        }
        removed = 0
        for item in found.values():
            outcome = await dl.remove_held(item, owner)
            if outcome == "removed":
                removed += 1
            else:
                result[outcome].append(item.id)
        log.info(
            "dlq drain %s: removed=%d of %d gone=%d busy=%d not_held=%d reason=%r",
            owner,
            removed,
            len(ids),
            len(result["gone"]),
            len(result["busy"]),
            len(result["not_held"]),
            reason,
        )
        return web.json_response({"removed": removed, **result})

    async def release_held(self, request: web.Request) -> web.Response:
        """Give back items of a held drain that its client could not store: the next drain or replay takes them at
        once rather than when the hold ends. Items the drain does not hold are left as they are.

        `{"all": true, "keep": [ids]}`: every item the drain holds but those in `keep` (the ones its client stored
        and could not have removed): a drain whose output failed also holds the items streamed to it that it
        never read (in the sidecar's and the network's buffers), which only the sidecar can name."""
        owner, body = await self.held_call(request, {"ids", "all", "keep"})
        dl = self.dead_letters()
        if "all" in body:
            if body["all"] is not True or "ids" in body:
                raise bad_request('"all" must be true, and comes without "ids"')
            keep = set(dead_letter_ids(body["keep"], "keep")) if body.get("keep") else set()
            held = [(i, v) for i, v in await dl.held_by(owner) if i not in keep]
            released = sum([await dl.give_back_version(i, v, owner) for i, v in held])
            log.info("dlq drain %s: released=%d (all it held, %d kept)", owner, released, len(keep))
            return web.json_response({"released": released})
        if "keep" in body:
            raise bad_request('"keep" goes with "all": true')
        ids = dead_letter_ids(body.get("ids"))
        outcomes = [await dl.take(item, owner, 0) for item in await dl.get_many(ids)]
        released = outcomes.count("taken")
        log.info("dlq drain %s: released=%d of %d", owner, released, len(ids))
        return web.json_response({"released": released})

    # -- events and stats -----------------------------------------------------------------------------------------

    async def event_location(self, request: web.Request) -> tuple[str, str, str]:
        route, event_id = request.match_info["route"], request.match_info["event_id"]
        # (any length: an id over 256 characters is keyed by its digest, as the ingress keyed it; one over 1,024
        # was "never seen" here although the ingress had taken it)
        if not _ROUTE.fullmatch(route):
            raise not_found(f"no event {event_id[:100]!r} on route {route[:100]!r}")
        # this process's delivered marks still queued (they follow a 200 by a few ms) land first: an event just
        # delivered reads as delivered, and its forget is not refused as in flight
        store = self.runtime().store
        await store.marks.settled(MARKS_WAIT)
        return route, event_id, await store.resolve(route, stored_id(event_id))  # keyed as the ingress did

    async def show_event(self, request: web.Request) -> web.Response:
        only_query(request, set())
        route, event_id, dedupe_id = await self.event_location(request)
        ev = await self.runtime().store.get_event(route, dedupe_id)
        if ev is None:
            if route not in self.configured_routes():
                raise not_found(f"no event {event_id[:100]!r}: no route {route!r} is configured")
            raise not_found(
                f"no event {event_id[:100]!r} on route {route!r} (never seen, or past the dedupe ttl)"
            )
        raw = ev["raw_state"]
        scheduled = ev["scheduled_ms"]
        dead_id = await self.dead_letter_of(route, dedupe_id, ev["first_seen_ms"]) if raw == "x" else None
        return web.json_response(
            {
                "route": route,
                "event_id": ev["event_id"] or event_id,
                "dedupe_id": dedupe_id,
                "state": STATE_NAMES.get(raw, "unknown"),
                "in_flight": raw == "f",
                "attempts": ev["attempts"],
                "first_seen_at": rfc3339(ev["first_seen_ms"]),
                "next_attempt_at": rfc3339(scheduled) if raw == "p" and scheduled else None,
                "lease_until": rfc3339(scheduled) if raw == "f" and scheduled else None,
                "last_status": int(ev["last_status"]) if (ev["last_status"] or "").isdigit() else None,
                "last_error": ev["last_error"],
                "dead_letter_id": dead_id,
                "history": render_history(ev["history"]),
            }
        )

    async def dead_letter_of(self, route: str, dedupe_id: str, first_seen_ms: int) -> str | None:
        """The id of this life's dead letter of the event, if it is in the DLQ: under the event's own id, or under
        the id of this life (dlq_add.lua: another life of the event, forgotten and sent again, has the first)."""
        dl, base = self.dead_letters(), dead_letter_id(route, dedupe_id)
        for item_id in (base, life_dead_letter_id(base, first_seen_ms)):
            item = await dl.get(item_id)
            if item is not None and item.data.get("first_seen_ms") in (None, first_seen_ms):
                return item_id
        return None

    async def forget_event(self, request: web.Request) -> web.Response:
        reason = parse_reason(only_query(request, {"reason"}).get("reason"))
        route, event_id, dedupe_id = await self.event_location(request)
        outcome = await self.dead_letters().forget(route, dedupe_id)
        if outcome == "missing":
            raise not_found(f"no event {event_id[:100]!r} on route {route!r}")
        if outcome == "pending":
            raise ApiError(
                409,
                "event_pending",
                "the event is pending or in flight: its stored request is the only copy; wait until it is "
                "delivered or dead-lettered",
            )
        log.info("event forget: route=%s event_id=%s reason=%r", route, event_id, reason)
        return web.json_response({"forgotten": True, "route": route, "event_id": event_id})

    async def stats(self, request: web.Request) -> web.Response:
        """Every configured route, and every route a reload removed that still holds events (pending or dead
        letters: they are still to be delivered, replayed or drained), the latter with `"configured": false`."""
        only_query(request, set())
        configured = self.configured_routes()
        counters = await self.runtime().store.route_stats()
        removed = removed_routes(configured, counters)
        dead = await self.dead_letters().counts([*configured, *removed])
        out = {}
        for name in [*configured, *removed]:
            c = counters.get(name, {})
            if name in removed and c.get("pending", 0) <= 0 and not dead[name]:
                continue  # its dead-letter counter is history: nothing of it is left
            out[name] = {
                "pending": c.get("pending", 0),
                "dead": dead[name],
                "delivered": c.get("delivered", 0),
                "duplicates": c.get("duplicates", 0),
                "rejected": c.get("rejected", 0),
            }
            if name in removed:
                out[name]["configured"] = False
        return web.json_response({"routes": out, "dlq_total": await self.dead_letters().count()})

    async def openapi(self, request: web.Request) -> web.Response:
        only_query(request, set())
        return web.json_response(document())


def create_admin_app(main: web.Application) -> web.Application:
    admin = web.Application(middlewares=[errors_middleware, auth_middleware(main)])
    api = AdminApi(main)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        runtime = main.get(RUNTIME)
        if runtime is None:
            return web.json_response({"ready": False, "reason": "starting"}, status=503)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        try:  # answered within a probe's timeout (k8s: 2 s), however the store hangs
            reachable = await asyncio.wait_for(runtime.store.ping(), READY_TIMEOUT)
        except TimeoutError:
            reachable = False
        if not reachable:
            return web.json_response({"ready": False, "reason": "store_unavailable"}, status=503)
        try:  # within what the ping left of READY_TIMEOUT
            unusable = await asyncio.wait_for(runtime.store.usable(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            # a slow store: the last verdict stands (it said ready on a store known unusable)
            unusable = runtime.store.unusable
        if unusable is not None:  # older than Redis 7.0: no retry, mark or dead letter would ever land
            return web.json_response(
                {"ready": False, "reason": "store_unsupported", "detail": unusable}, status=503
            )
        stale = time.monotonic() - runtime.worker.last_beat
        if main[RUN_WORKER] and stale > 60:
            return web.json_response({"ready": False, "reason": "worker_stalled"}, status=503)
        return web.json_response({"ready": True})

    get: dict[str, Any] = {"allow_head": False}  # a dict[str, bool] would also be checked against `name: str`
    admin.router.add_get("/healthz", healthz, **get)
    admin.router.add_get("/readyz", readyz, **get)
    admin.router.add_get("/metrics", metrics_handler(main, READY_TIMEOUT), **get)
    admin.router.add_get("/admin/openapi.json", api.openapi, **get)
    admin.router.add_get("/admin/dlq", api.list_dlq, **get)
    admin.router.add_post("/admin/dlq/replay", api.replay)
    admin.router.add_post("/admin/dlq/drain", api.drain)
    admin.router.add_post("/admin/dlq/drain/{drain}/remove", api.remove_held)
    admin.router.add_post("/admin/dlq/drain/{drain}/release", api.release_held)
    # `replay` and `drain` are not ids: a GET or DELETE of either is 405 (POST only), not "no dead letter 'drain'"
    item = "/admin/dlq/{id:(?!(?:replay|drain)$)[^/]+}"
    admin.router.add_get(item, api.show_dlq, **get)
    admin.router.add_delete(item, api.delete_dlq)
    # any character, line breaks too (`.` stops at one: an id from a JSON body with a "\n" in it was the router's
    # bare 404)
    admin.router.add_get("/admin/events/{route}/{event_id:[\\s\\S]+}", api.show_event, **get)
    admin.router.add_delete("/admin/events/{route}/{event_id:[\\s\\S]+}", api.forget_event)
    admin.router.add_get("/admin/stats", api.stats, **get)
    return admin
