"""The plain data the store persists and hands back. No Redis here: these are what the rest of the code sees."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

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
    # which run of attempts this copy belongs to (replay.lua): a time in ms, the claim's first sight for the claim's
    # own run; 0: not known (the settling writes are then fenced by the attempt number alone, as before runs). Part
    # of the fence of retry.lua / dead.lua / defer.lua with the attempt number, which a replay starts again from 1.
    run: int = field(default=0, compare=False)

    @property
    def fence(self) -> int | None:
        """The run as the settling scripts compare it, or None when not known."""
        return self.run or None

    def meta(self) -> str:
        """The request's metadata as stored with the event: compact lines, cheap to write on every claim.

        `v1`, method, path+query, client ip, proto, host, traceparent, then one `name:value` line per header.
        HTTP forbids CR/LF in all of these and ':' in header names, so the lines split back unambiguously.
        """
        head = f"v1\n{self.method}\n{self.path_qs}\n{self.client_ip}\n{self.proto}\n{self.host}\n{self.traceparent or ''}"
        if not self.headers:
            return head
        return head + "\n" + "\n".join([f"{k}:{v}" for k, v in self.headers])

    def meta_dict(self) -> dict[str, Any]:
        """The same metadata as a JSON-able dict (dead letters, admin views)."""
        return {
            "m": self.method,
            "p": self.path_qs,
            "h": [list(h) for h in self.headers],
            "ip": self.client_ip,
            "pr": self.proto,
            "ho": self.host,
            "tp": self.traceparent,
        }

    @classmethod
    def from_stored(
        cls,
        route: str,
        dedupe_id: str,
        event_id: str,
        meta: str | bytes,
        body: bytes,
        first_seen_ms: int,
        run: int = 0,
    ) -> EventRecord:
        m = parse_meta(meta)
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
            traceparent=m.get("tp") or None,
            first_seen_ms=first_seen_ms,
            run=run,
        )


def parse_meta(meta: str | bytes) -> dict[str, Any]:
    """Stored metadata back to a dict: the compact v1 lines, or JSON (what a replay writes back)."""
    # surrogateescape: a header value that is not UTF-8 is stored as its raw bytes (see RedisStore.claim)
    text = meta.decode("utf-8", "surrogateescape") if isinstance(meta, bytes) else meta
    if text.startswith("{"):
        parsed: dict[str, Any] = json.loads(text)
        return parsed
    lines = text.split("\n")
    headers = [line.split(":", 1) for line in lines[7:]]
    return {
        "m": lines[1],
        "p": lines[2],
        "ip": lines[3],
        "pr": lines[4],
        "ho": lines[5],
        "tp": lines[6] or None,
        "h": [[k, v] for k, v in headers],
    }


HISTORY_FIELDS = ("at_ms", "attempt", "status", "error", "duration_ms")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One forward attempt in an event's history: when, which, what came back, how long it took."""

    at_ms: int
    attempt: int
    status: int | None
    error: str | None
    duration_ms: float

    def _values(self) -> list[Any]:  # in HISTORY_FIELDS order
        return [self.at_ms, self.attempt, self.status, self.error, round(self.duration_ms, 3)]

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(HISTORY_FIELDS, self._values(), strict=True))

    def to_json(self) -> str:
        """The stored form: a JSON array in `HISTORY_FIELDS` order, ~35 bytes for a delivery.

        Every delivered event keeps its history for the whole dedupe window, so the entry is kept short enough
        (with the event's other fields) for Redis's compact hash encoding (values up to 64 bytes by default)."""
        entry = self._values()
        try:  # every delivered event writes one: orjson ~0.5 µs, json.dumps with separators ~5 µs
            return orjson.dumps(entry).decode()
        except TypeError:  # a lone surrogate in an error text: the stdlib escapes it
            return json.dumps(entry, separators=(",", ":"))


def parse_history(raw: str | bytes | None) -> list[dict[str, Any]]:
    """The scripts append history entries comma-joined (cheap in Lua); this turns them back into a list of dicts.

    Attempts are stored as arrays (`AttemptRecord.to_json`); replay markers, and attempts stored before the
    arrays, as objects."""
    if not raw:
        return []
    text = raw.decode() if isinstance(raw, bytes) else raw
    return history_dicts(json.loads(f"[{text}]"))


def history_dicts(entries: list[Any]) -> list[dict[str, Any]]:
    """History entries as dicts, whichever form each was stored in (an array in `HISTORY_FIELDS` order or an
    object); a dead letter written by a replica of an earlier version may carry either."""
    return [dict(zip(HISTORY_FIELDS, e, strict=False)) if isinstance(e, list) else e for e in entries]


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: bool
    state: str = "pending"  # contract name of the existing event's state when not claimed
    # the existing event's own id when not claimed (None: not known): a resend under another unsigned id (a Twilio
    # token, a GitHub delivery id) is a duplicate of the event stored under the first one
    stored_id: str | None = None


@dataclass(frozen=True, slots=True)
class Burial:
    """Why an attempt dead-letters its event, noted on the event before its dead letter is written (burying.lua),
    so that a burial cut short is finished by whoever takes the event next, not sent again."""

    reason: str
    entry: AttemptRecord  # the attempt that decided it, as its history entry
    dead_ms: int  # its dead letter's version (dead_at): finished, the burial is the same one (dlq_add.lua)

    def to_json(self) -> str:
        note = {"reason": self.reason, "entry": self.entry.as_dict(), "dead_ms": self.dead_ms}
        return json.dumps(note, separators=(",", ":"))

    @classmethod
    def from_stored(cls, raw: bytes | str) -> Burial | None:
        """The note as stored; None when it cannot be read (then the event is attempted as before)."""
        try:
            note = json.loads(raw)
            e = note["entry"]
            entry = AttemptRecord(
                int(e["at_ms"]), int(e["attempt"]), e["status"], e["error"], float(e["duration_ms"])
            )
            return cls(str(note["reason"]), entry, int(note["dead_ms"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class Taken:
    """An event a worker has taken for a new attempt (it holds the lease and attempt number `attempt`)."""

    record: EventRecord
    attempt: int
    lease_end_ms: int  # the lease deadline the take wrote (store clock)
    history: list[dict[str, Any]] = field(default_factory=list)
    burial: Burial | None = None  # a burial begun and not finished: finish it, send nothing


@dataclass(frozen=True, slots=True)
class Evicted:
    """A dead letter that the DLQ cap pushed out."""

    id: str
    route: str
    event_id: str
