"""The admin API as an OpenAPI 3.1 document, served at /admin/openapi.json (behind the bearer token, like the
rest of /admin/). tests/test_admin.py checks it against the routes `sidecar.admin` registers, both ways."""

from __future__ import annotations

from typing import Any

from sidecar import __version__
from sidecar.durations import PATTERN as DURATION

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_AUTH = {"401": _error("missing or wrong bearer token (`unauthorized`)")}
_STORE = {"503": _error("the store is unreachable (`store_unavailable`, with Retry-After) or starting")}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_EMPTY = {"type": "string", "maxLength": 0}


def _optional(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter whose empty value (`?cursor=`) is taken as not given."""
    return {
        **_query(name, f"{description}; empty: not given", {"anyOf": [schema, _EMPTY]}),
        "allowEmptyValue": True,
    }


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


DRAIN_HEADER = "Sidecar-Drain"  # names a held drain in its answer
DRAIN_ID = r"[0-9a-f]{32}"
# The forms the admin API takes (sidecar/admin.py compiles them; this document states them)
DEAD_ID = r"[0-9a-f]{1,64}"  # a dead-letter id
CURSOR = rf"([0-9]{{1,16}})-({DEAD_ID})"  # a page's next_cursor: dead_at-id
EPOCH = r"[0-9]{1,12}(\.[0-9]{1,9})?"  # since/until as epoch seconds
# since/until as an RFC 3339 date-time (what the document's format "date-time" takes: seconds and an offset required)
RFC3339 = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?" r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
MAX_IDS = 10000  # ids per call
MAX_REASON = 1000  # characters of an admin mutation's logged reason
# where the API expects dead-letter ids (a body's "ids" or "keep"): anything else is a 400
_DEAD_ID = {"type": "string", "pattern": f"^{DEAD_ID}$"}
_DEAD_IDS = {"type": "array", "items": _DEAD_ID, "minItems": 1, "maxItems": MAX_IDS}
MAX_HOLD = 24 * 3600.0  # a held drain's items stay held this long at most (seconds)

_REASON = _query("reason", "why (logged with the mutation)", {"type": "string", "maxLength": MAX_REASON})
_ID = _path("id", "dead-letter id")
_DRAIN = _path("drain", "a held drain's id: its answer's `Sidecar-Drain` header")
_EVENT = [_path("route", "route name"), _path("event_id", "the provider's event id (may contain `/`)")]

_TIME = {"type": ["string", "null"], "format": "date-time"}
_WHEN = {
    "anyOf": [
        {"type": "string", "pattern": f"^{EPOCH}$"},
        {"type": "string", "format": "date-time", "pattern": f"^{RFC3339}$"},
    ]
}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "detail": {"type": "string"},
            "ids": {"type": "array", "items": {"type": "string"}, "description": "a replay's unknown ids"},
            "partial": {
                "const": True,
                "description": "a replay the store cut short: `replayed` items left the DLQ before it failed",
            },
            "replayed": {"type": "integer", "description": "with `partial`: how many were replayed"},
            "skipped": {"type": "object", "description": "with `partial`: as in ReplayResult"},
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["deleted", "id"],
        "properties": {"deleted": {"const": True}, "id": {"type": "string"}},
    },
    "Forgotten": {
        "type": "object",
        "required": ["forgotten", "route", "event_id"],
        "properties": {
            "forgotten": {"const": True},
            "route": {"type": "string"},
            "event_id": {"type": "string"},
        },
    },
    "HistoryEntry": {
        "description": "one attempt (at, attempt, status or error, duration_ms) or a replay marker "
        "(replayed_at, reason)",
        "type": "object",
        "properties": {
            "at": _TIME,
            "attempt": _NULLABLE_INT,
            "status": _NULLABLE_INT,
            "error": _NULLABLE_STR,
            "duration_ms": {"type": ["number", "null"]},
            "replayed_at": _TIME,
            "reason": _NULLABLE_STR,
        },
    },
    "DeadLetter": {
        "type": "object",
        "required": [
            "id",
            "route",
            "event_id",
            "attempts",
            "last_status",
            "last_error",
            "first_seen_at",
            "dead_at",
        ],
        "properties": {
            "id": {"type": "string"},
            "route": {"type": "string"},
            "event_id": {"type": "string"},
            "attempts": _NULLABLE_INT,
            "last_status": _NULLABLE_INT,
            "last_error": _NULLABLE_STR,
            "first_seen_at": _TIME,
            "dead_at": _TIME,
            "reason": {"description": "rejected | exhausted | expired | route_removed", **_NULLABLE_STR},
        },
    },
    "DeadLetterFull": {
        "allOf": [
            _ref("DeadLetter"),
            {
                "type": "object",
                "required": ["headers", "history"],
                "properties": {
                    "method": _NULLABLE_STR,
                    "path": _NULLABLE_STR,
                    "headers": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                    },
                    "body": {"type": "string", "description": "the raw body, when it is UTF-8"},
                    "body_base64": {"type": "string", "description": "the raw body, when it is not UTF-8"},
                    "body_missing": {
                        "type": "boolean",
                        "description": "true when the store no longer has the body (evicted); `body` is then empty",
                    },
                    "history": {"type": "array", "items": _ref("HistoryEntry")},
                },
            },
        ]
    },
    "Page": {
        "type": "object",
        "required": ["items", "next_cursor", "total"],
        "properties": {
            "items": {"type": "array", "items": _ref("DeadLetter")},
            "next_cursor": _NULLABLE_STR,
            "total": {"type": "integer", "description": "items matching the filters, across all pages"},
        },
    },
    "ReplayRequest": {
        "type": "object",
        "description": 'exactly one of "ids", "route", "all"',
        "additionalProperties": False,
        "properties": {
            "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_IDS},
            "route": {"type": "string", "minLength": 1},
            "all": {"const": True},
            "dry_run": {"type": "boolean"},
            "reason": {"type": "string", "maxLength": MAX_REASON},
        },
        "oneOf": [{"required": ["ids"]}, {"required": ["route"]}, {"required": ["all"]}],
    },
    "ReplayResult": {
        "oneOf": [
            {
                "type": "object",
                "required": ["replayed"],
                "properties": {
                    "replayed": {"type": "integer"},
                    "skipped": {
                        "type": "object",
                        "description": "items left alone: their event is already pending (kept in the DLQ), "
                        "was delivered meanwhile (item removed as obsolete), another drain or replay held the "
                        "item (busy: it stays with that one), or it was removed or replayed and dead-lettered "
                        "again since it was read (gone)",
                        "properties": {
                            "pending": {"type": "integer"},
                            "delivered": {"type": "integer"},
                            "busy": {"type": "integer"},
                            "gone": {"type": "integer"},
                            "body_missing": {
                                "type": "integer",
                                "description": "kept in the DLQ: the store no longer has their body (evicted)",
                            },
                        },
                    },
                },
            },
            {
                "type": "object",
                "required": ["would_replay"],
                "properties": {
                    "would_replay": {"type": "integer"},
                    "busy": {
                        "type": "integer",
                        "description": "selected items another drain or replay holds now, not counted in "
                        "would_replay (the replay would skip them)",
                    },
                    "body_missing": {
                        "type": "integer",
                        "description": "only when not 0: selected items whose body the store no longer has "
                        "(evicted), not counted in would_replay (the replay would keep them)",
                    },
                },
            },
        ]
    },
    "DrainRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "route": {"type": "string"},
            "reason": {"type": "string", "maxLength": MAX_REASON},
            "hold": {
                "anyOf": [
                    {"type": "number", "minimum": 1, "maximum": 86400},
                    {"type": "null", "description": "not held (as if left out)"},
                    {"type": "string", "pattern": rf"^\s*{DURATION}\s*$"},
                ],
                "description": "a held drain (two phases): the items streamed stay in the DLQ, held for this "
                "long (seconds, or a duration like `10m`; 1 s to 24 h) until the client removes those it has "
                "stored (`/admin/dlq/drain/{drain}/remove`); what it never removes comes back when the hold ends",
            },
        },
    },
    "HeldIds": {
        "type": "object",
        "required": ["ids"],
        "additionalProperties": False,
        "properties": {
            "ids": _DEAD_IDS,
            "reason": {"type": "string", "maxLength": MAX_REASON, "description": "remove only: logged"},
        },
    },
    "HeldRelease": {
        "type": "object",
        "description": 'the ids to give back, or "all": every item the drain holds but those in "keep"',
        "additionalProperties": False,
        "properties": {
            "ids": _DEAD_IDS,
            "all": {"type": "boolean", "enum": [True]},
            "keep": {"type": "array", "items": _DEAD_ID, "maxItems": MAX_IDS},
        },
        "oneOf": [{"required": ["ids"]}, {"required": ["all"]}],
    },
    "HeldRemoved": {
        "type": "object",
        "required": ["removed", "gone", "busy", "not_held"],
        "properties": {
            "removed": {"type": "integer"},
            "gone": {
                "type": "array",
                "items": {"type": "string"},
                "description": "no longer in the DLQ as this drain took it (deleted, replayed since the hold "
                "ended, or replaced by a newer version of the item)",
            },
            "busy": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the hold ended and another drain or a replay holds the item now",
            },
            "not_held": {
                "type": "array",
                "items": {"type": "string"},
                "description": "in the DLQ, but this drain does not hold it (never did, gave it back, or the "
                "hold ended and another took and released it): left there",
            },
        },
    },
    "Event": {
        "type": "object",
        "required": ["route", "event_id", "state", "history"],
        "properties": {
            "route": {"type": "string"},
            "event_id": {"type": "string"},
            "dedupe_id": {
                "type": "string",
                "description": "the claim's id (a digest for header-id providers)",
            },
            "state": {"enum": ["pending", "delivered", "dead", "unknown"]},
            "in_flight": {"type": "boolean"},
            "attempts": {"type": "integer"},
            "first_seen_at": _TIME,
            "next_attempt_at": _TIME,
            "lease_until": _TIME,
            "last_status": _NULLABLE_INT,
            "last_error": _NULLABLE_STR,
            "dead_letter_id": _NULLABLE_STR,
            "history": {"type": "array", "items": _ref("HistoryEntry")},
        },
    },
    "RouteStats": {
        "type": "object",
        "required": ["pending", "dead", "delivered", "duplicates", "rejected"],
        "properties": {
            **{k: {"type": "integer"} for k in ("pending", "dead", "delivered", "duplicates", "rejected")},
            "configured": {
                "type": "boolean",
                "description": "false for a route a reload removed that still holds pending events or dead "
                "letters (absent for configured routes)",
            },
        },
    },
    "Stats": {
        "type": "object",
        "required": ["routes", "dlq_total"],
        "properties": {
            "routes": {"type": "object", "additionalProperties": _ref("RouteStats")},
            "dlq_total": {"type": "integer"},
        },
    },
}


# What any request can be answered, before its handler runs
_COMMON = {
    "400": _error("`bad_request`: a malformed request, or a request line or header over 8 KB"),
    "405": _error("`method_not_allowed`"),
    "413": _error("`body_too_large`: a body over 1 MiB"),
}

# What a handler that reads a body can answer
_SLOW_BODY = {"408": _error("`read_timeout`: the body did not arrive within server.read_timeout")}


def _op(summary: str, responses: dict[str, Any], *, auth: bool = True, **extra: Any) -> dict[str, Any]:
    answers = {**_COMMON, **responses, **(_AUTH if auth else {})}
    op: dict[str, Any] = {"summary": summary, **extra, "responses": dict(sorted(answers.items()))}
    if not auth:
        op["security"] = []
    return op


def _held_call(summary: str, ok: dict[str, Any], body: str = "HeldIds") -> dict[str, Any]:
    """A call on a held drain: the drain's id in the path, the ids it is about (`HeldIds`) in the body."""
    responses = {
        "200": ok,
        "400": _error("bad body"),
        "404": _error("not a drain id"),
        **_SLOW_BODY,
        **_STORE,
    }
    return {
        "parameters": [_DRAIN],
        "post": _op(
            summary, responses, requestBody={"required": True, "content": {JSON: {"schema": _ref(body)}}}
        ),
    }


PATHS: dict[str, Any] = {
    "/healthz": {"get": _op("liveness", {"200": _json({"type": "object"}, "alive")}, auth=False)},
    "/readyz": {
        "get": _op(
            "readiness: store reachable, worker heartbeat fresh",
            {"200": _json({"type": "object"}, "ready"), "503": _json({"type": "object"}, "not ready")},
            auth=False,
        )
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics",
            {
                "200": {
                    "description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            auth=False,
        )
    },
    "/admin/openapi.json": {"get": _op("this document", {"200": _json({"type": "object"}, "OpenAPI 3.1")})},
    "/admin/dlq": {
        "get": _op(
            "page through dead letters, ordered by dead_at then id",
            {
                "200": _json(_ref("Page"), "one page"),
                "400": _error("bad filter, limit or cursor"),
                "404": _error("unknown route"),
                **_STORE,
            },
            parameters=[
                _optional("route", "only this route's", {"type": "string"}),
                _optional(
                    "limit", "page size", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
                ),
                _optional(
                    "cursor",
                    "next_cursor of the previous page",
                    {"type": "string", "pattern": f"^{CURSOR}$"},
                ),
                _optional("since", "dead_at >= (RFC 3339 or epoch seconds)", _WHEN),
                _optional("until", "dead_at <= (RFC 3339 or epoch seconds)", _WHEN),
                _optional(
                    "status",
                    "last_status: a code (503), a class (5xx) or `error` (none)",
                    {"type": "string", "pattern": "^(?:[1-5][0-9]{2}|[1-5][xX]{2}|[eE][rR]{2}[oO][rR])$"},
                ),
            ],
        )
    },
    "/admin/dlq/{id}": {
        "parameters": [_ID],
        "get": _op(
            "one dead letter with headers, body and history",
            {"200": _json(_ref("DeadLetterFull"), "the item"), "404": _error("unknown id"), **_STORE},
        ),
        "delete": _op(
            "delete one dead letter",
            {
                "200": _json(_ref("Deleted"), "deleted"),
                "400": _error("reason over 1000 characters"),
                "404": _error("unknown id"),
                **_STORE,
            },
            parameters=[_REASON],
        ),
    },
    "/admin/dlq/replay": {
        "post": _op(
            "put dead letters back on the retry schedule (the worker delivers them; attempts start at 1)",
            {
                "200": _json(_ref("ReplayResult"), "replayed, or what would be"),
                "400": _error("bad body"),
                "404": _error("unknown ids (none replayed) or route"),
                **_SLOW_BODY,
                "503": _error(
                    "the store is unreachable (`store_unavailable`, with Retry-After) or starting; a replay it "
                    "cut short says so with `partial`, `replayed` and `skipped` (what was replayed has left the "
                    "DLQ: run it again)"
                ),
            },
            requestBody={"required": True, "content": {JSON: {"schema": _ref("ReplayRequest")}}},
        )
    },
    "/admin/dlq/drain": {
        "post": _op(
            "remove dead letters, streaming each (full item) as one NDJSON line before it is removed (with "
            '"hold": streamed and held, removed by the client\'s remove call)',
            {
                "200": {
                    "description": "one DeadLetterFull per line; a held drain's id in the `Sidecar-Drain` header",
                    "headers": {
                        DRAIN_HEADER: {
                            "description": 'a held drain\'s id (with "hold" only)',
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {"application/x-ndjson": {"schema": _ref("DeadLetterFull")}},
                },
                "400": _error("bad body"),
                "404": _error("unknown route"),
                **_SLOW_BODY,
                **_STORE,
            },
            requestBody={"required": False, "content": {JSON: {"schema": _ref("DrainRequest")}}},
        )
    },
    "/admin/dlq/drain/{drain}/remove": _held_call(
        "step 2 of a held drain: remove the items its client has stored, if the drain still holds them",
        _json(_ref("HeldRemoved"), "what was removed, and what became of the others"),
    ),
    "/admin/dlq/drain/{drain}/release": _held_call(
        "give back items of a held drain that its client could not store, before the hold ends (all of them but "
        '"keep" with "all": true, for a client whose output failed with items streamed to it unread)',
        _json(
            {"type": "object", "required": ["released"], "properties": {"released": {"type": "integer"}}},
            "how many this drain held and gave back",
        ),
        "HeldRelease",
    ),
    "/admin/events/{route}/{event_id}": {
        "parameters": _EVENT,
        "get": _op(
            "an event's state and history",
            {"200": _json(_ref("Event"), "the event"), "404": _error("unknown route or event"), **_STORE},
        ),
        "delete": _op(
            "forget a delivered or dead event's claim, so the provider's next send is processed again",
            {
                "200": _json(_ref("Forgotten"), "forgotten"),
                "400": _error("reason over 1000 characters"),
                "404": _error("unknown route or event"),
                "409": _error("`event_pending`: pending or in flight, refused"),
                **_STORE,
            },
            parameters=[_REASON],
        ),
    },
    "/admin/stats": {"get": _op("per-route counters", {"200": _json(_ref("Stats"), "counters"), **_STORE})},
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "webhook sidecar admin API", "version": __version__},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": PATHS,
    }
