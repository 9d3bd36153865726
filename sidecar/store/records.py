"""The plain data the store persists and hands back. No Redis here: these are what the rest of the code sees."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Internal event states (one byte in Redis) and the names the contract shows.
STATE_NAMES = {"f": "pending", "p": "pending", "d": "delivered", "x": "dead"}


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One accepted inbound request, as stored at claim time and replayed by every later attempt."""

    route: str
    dedupe_id: str
    event_id: str
    method: str
    path_qs: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client_ip: str = ""
    proto: str = "http"
    host: str = ""
    traceparent: str | None = None
    first_seen_ms: int = 0

    def meta_json(self) -> str:
        return json.dumps(
            {
                "m": self.method,
                "p": self.path_qs,
                "h": self.headers,
                "ip": self.client_ip,
                "pr": self.proto,
                "ho": self.host,
                "tp": self.traceparent,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_stored(
        cls, route: str, dedupe_id: str, event_id: str, meta: str | bytes, body: bytes, first_seen_ms: int
    ) -> EventRecord:
        m = json.loads(meta)
        return cls(
            route=route,
            dedupe_id=dedupe_id,
            event_id=event_id,
            method=m["m"],
            path_qs=m["p"],
            headers=tuple((k, v) for k, v in m["h"]),
            body=body,
            client_ip=m.get("ip", ""),
            proto=m.get("pr", "http"),
            host=m.get("ho", ""),
            traceparent=m.get("tp"),
            first_seen_ms=first_seen_ms,
        )


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One forward attempt in an event's history: when, which, what came back, how long it took."""

    at_ms: int
    attempt: int
    status: int | None
    error: str | None
    duration_ms: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "at_ms": self.at_ms,
                "attempt": self.attempt,
                "status": self.status,
                "error": self.error,
                "duration_ms": round(self.duration_ms, 3),
            },
            separators=(",", ":"),
        )


def parse_history(raw: str | bytes | None) -> list[dict[str, Any]]:
    """The scripts append history entries comma-joined (cheap in Lua); this turns them back into a list."""
    if not raw:
        return []
    text = raw.decode() if isinstance(raw, bytes) else raw
    result: list[dict[str, Any]] = json.loads(f"[{text}]")
    return result


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: bool
    state: str = "pending"  # contract name of the existing event's state when not claimed


@dataclass(frozen=True, slots=True)
class Taken:
    """An event a worker has taken for a new attempt (it holds the lease and attempt number `attempt`)."""

    record: EventRecord
    attempt: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Evicted:
    """A dead letter that the DLQ cap pushed out."""

    id: str
    route: str
    event_id: str
