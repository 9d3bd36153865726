"""DeadLetters: the operator's side of the dead-letter list (list, read, replay, remove) and of event claims.

Built from a RedisStore and its client; every multi-key step is one Lua script on one hash slot, like the hot
path's. The ordering guarantees that make the admin API crash-safe live here:

- replay: `replay.lua` puts the event back on its shard's schedule first, and the dead letter is removed after
  (`dlq_remove.lua`, only if it is still the version that was read). A crash in between, or a lost answer,
  leaves the item in the DLQ; replaying it again schedules nothing (the event is pending, and remembers the dead
  letter it came from) and removes it.
- drain / delete: the caller removes an item only after it has handed the item on (`remove`).
- a held drain (two phases) takes each item for a longer lease and leaves it in the DLQ; its client removes
  the items it has stored (`remove_held`: only items that drain still holds) and gives back the others.
- drain and replay take each item first (`take`, dlq_take.lua): of two drains, or a drain and a replay, on two
  replicas, only one acts on an item; the other skips it. A taken item is held for a lease, so one whose drain or
  replay died comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from sidecar.errors import StoreError, StoreUnavailable
from sidecar.store.pipeline import FastScript, NotReplicated
from sidecar.store.records import history_dicts
from sidecar.store.redis_store import RedisStore, script_source

ReplayOutcome = Literal["replayed", "pending", "delivered", "busy", "gone", "body_missing"]
TakeOutcome = Literal["taken", "gone", "busy"]
HeldOutcome = Literal["removed", "gone", "busy", "not_held"]
ForgetOutcome = Literal["forgotten", "pending", "missing"]
_HELD: dict[int, HeldOutcome] = {1: "removed", 0: "gone", -1: "busy", -2: "not_held"}

# Reading many items: one HMGET per this many ids (bounded replies, no huge single command).
_CHUNK = 200
# A status-filtered listing decodes every item of its window, this many per script call: Redis is never busy
# with it for more than a few milliseconds at a time (dlq.max_length bounds the number of steps).
_SCAN_STEP = 250
_MAX_SCAN_STEPS = 100_000
# How long a replay holds an item between taking it and removing it (two script calls).
REPLAY_LEASE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ends: the (dead_at, id) of its last item. Items are ordered by dead_at, then id."""

    dead_ms: int
    id: str


@dataclass(frozen=True, slots=True)
class StatusFilter:
    """`last_status` filter: an exact code (`eq`), a class like 5xx (`class`, 5) or no status at all (`none`)."""

    kind: Literal["eq", "class", "none"]
    value: int = 0

    def arg(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.value}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as stored by `RedisStore.bury` (`data` is its JSON); `body` only when asked for, and None
    when it was asked for but the store no longer has it (evicted: an allkeys-* maxmemory-policy)."""

    id: str
    dead_ms: int
    data: dict[str, Any]
    body: bytes | None = None

    @property
    def route(self) -> str:
        return str(self.data.get("route", ""))

    @property
    def event_id(self) -> str:
        return str(self.data.get("event_id", ""))

    @property
    def dedupe_id(self) -> str:
        return str(self.data.get("dedupe_id") or self.event_id)

    @property
    def history(self) -> list[dict[str, Any]]:
        return history_dicts(self.data.get("history") or [])

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(str(k), str(v)) for k, v in (self.data.get("meta") or {}).get("h", [])]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[DeadLetter]
    next: Cursor | None
    total: int


def _bound(ms: int | None, unbounded: str) -> int | str:
    return unbounded if ms is None else ms


def _items(flat: list[Any]) -> list[DeadLetter]:
    """Script replies `id, dead_at, JSON, ...` -> items (an id whose data vanished is skipped)."""
    return [
        DeadLetter(flat[i].decode(), int(float(flat[i + 1])), json.loads(flat[i + 2]))
        for i in range(0, len(flat), 3)
        if flat[i + 2]
    ]


class DeadLetters:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.keys = store.keys
        register = store.client.register_script
        self._page = register(script_source("dlq_page"))
        self._scan_step = register(script_source("dlq_scan"))
        self._take = register(script_source("dlq_take"))
        # With `redis.wait_replicas`, a removal (a drain's, a DELETE, a replay's last step) and a forget are answered
        # only once the replicas hold them (WAIT on the write's own connection: the pipelined client's), like the
        # dead letters and replays they undo: a failover must not bring back an item an operator was told is gone
        # (the next drain would hand it out again) or an event an operator forgot.
        if store.waits_for_replicas:
            self._remove = partial(FastScript(store.fast, script_source("dlq_remove")), wait=store.wait)
            self._forget = partial(FastScript(store.fast, script_source("forget")), wait=store.wait)
        else:
            self._remove = register(script_source("dlq_remove"))
            self._forget = register(script_source("forget"))

    def _index(self, route: str | None) -> str:
        return self.keys.dlq_route(route) if route else self.keys.dlq_items()

    # -- reading --------------------------------------------------------------------------------------------------

    async def page(
        self,
        *,
        route: str | None = None,
        after: Cursor | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        status: StatusFilter | None = None,
        limit: int = 100,
    ) -> Page:
        """Up to `limit` items after `after`, in (dead_at, id) order; `total` counts the whole filtered window."""
        if status is not None:
            return await self._scan(route, after, since_ms, until_ms, status, limit)
        args = [
            after.dead_ms if after else "",
            after.id if after else "",
            _bound(since_ms, "-inf"),
            _bound(until_ms, "+inf"),
            limit,
        ]
        keys = [self._index(route), self.keys.dlq_data()]
        raw = await self.store.guard(lambda: self._page(keys=keys, args=args))
        items = _items(raw[2:])
        cursor = Cursor(items[-1].dead_ms, items[-1].id) if int(raw[1]) and items else None
        return Page(items, cursor, int(raw[0]))

    async def _scan(
        self,
        route: str | None,
        after: Cursor | None,
        since_ms: int | None,
        until_ms: int | None,
        status: StatusFilter,
        limit: int,
    ) -> Page:
        """A status-filtered page, in bounded steps (dlq_scan.lua) over the whole window: the total needs them all."""
        keys = [self._index(route), self.keys.dlq_data()]
        position: tuple[Any, Any] = ("", "")
        total = 0
        found: list[DeadLetter] = []
        for _ in range(_MAX_SCAN_STEPS):
            args = [
                *position,
                _bound(since_ms, "-inf"),
                _bound(until_ms, "+inf"),
                status.arg(),
                after.dead_ms if after else "",
                after.id if after else "",
                max(limit + 1 - len(found), 0),  # one past the page tells whether more follow
                _SCAN_STEP,
            ]
            raw = await self.store.guard(partial(self._scan_step, keys=keys, args=args))
            total += int(raw[0])
            found += _items(raw[3:])
            if not raw[2]:
                break
            position = (raw[1], raw[2])
        items = found[:limit]
        cursor = Cursor(items[-1].dead_ms, items[-1].id) if len(found) > limit else None
        return Page(items, cursor, total)

    async def get(self, item_id: str) -> DeadLetter | None:
        found = await self.get_many([item_id])
        return found[0] if found else None

    async def get_many(self, ids: list[str]) -> list[DeadLetter]:
        """The items (with bodies) that exist among `ids`, in the order asked."""
        k = self.keys

        def queue(pipe: Any, chunk: list[str]) -> None:
            pipe.hmget(k.dlq_data(), chunk)
            pipe.hmget(k.dlq_body(), chunk)
            pipe.zmscore(k.dlq_items(), chunk)

        return [
            DeadLetter(item_id, int(score), json.loads(d), b)
            for chunk, (data, bodies, scores) in await self._pipelined(ids, queue)
            for item_id, d, b, score in zip(chunk, data, bodies, scores, strict=True)
            if d is not None and score is not None
        ]

    async def _pipelined(
        self, ids: list[str], queue: Callable[[Any, list[str]], None]
    ) -> list[tuple[list[str], list[Any]]]:
        """(chunk, replies) for `ids` in chunks of _CHUNK, each chunk's commands (`queue(pipe, chunk)`) in one
        pipelined round trip."""
        out = []
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]

            async def read(chunk: list[str] = chunk) -> list[Any]:
                async with self.store.client.pipeline(transaction=False) as pipe:
                    queue(pipe, chunk)
                    return list(await pipe.execute())

            out.append((chunk, await self.store.guard(read)))
        return out

    async def held(self, ids: list[str]) -> int:
        """How many of `ids` another drain or replay holds now (dlq_take.lua's rule, read only): what a replay of
        them would skip as busy."""
        k, held = self.keys, 0

        def queue(pipe: Any, chunk: list[str]) -> None:
            pipe.hmget(k.dlq_taken(), chunk)
            pipe.zmscore(k.dlq_items(), chunk)

        for _, (taken, scores) in await self._pipelined(ids, queue):
            now = self.store.clock.now_ms()
            for hold, score in zip(taken, scores, strict=True):
                if hold is None or score is None:
                    continue
                _, version, ends = hold.decode().split(" ")
                if int(version) == int(score) and int(ends) > now:  # this version, its lease not yet over
                    held += 1
        return held

    async def held_by(self, owner: str) -> list[tuple[str, int]]:
        """(id, version) of every item the drain `owner` took (its hold ended or not), read in steps."""
        key, found, cursor = self.keys.dlq_taken(), [], 0
        for _ in range(_MAX_SCAN_STEPS):

            async def step(at: int = cursor) -> Any:
                return await self.store.client.hscan(key, at, count=_SCAN_STEP)

            cursor, chunk = await self.store.guard(step)
            for item_id, hold in chunk.items():
                who, version, _ = hold.decode().split(" ")
                if who == owner:
                    found.append((item_id.decode(), int(version)))
            if not int(cursor):
                break
        return found

    async def give_back_version(self, item_id: str, version: int, owner: str) -> bool:
        """`take(…, 0)` by id and version: True if `owner` held that version and gave it back."""
        return await self._take_version(item_id, version, owner, 0) == 1

    async def bodies_missing(self, ids: list[str]) -> list[str]:
        """Those of `ids` that exist without their body (evicted from the store): what a replay would keep and
        skip as `body_missing`."""
        k = self.keys

        def queue(pipe: Any, chunk: list[str]) -> None:
            for item_id in chunk:
                pipe.hexists(k.dlq_data(), item_id)
                pipe.hexists(k.dlq_body(), item_id)

        return [
            item_id
            for chunk, flags in await self._pipelined(ids, queue)
            for item_id, data, body in zip(chunk, flags[::2], flags[1::2], strict=True)
            if data and not body
        ]

    async def ids(self, route: str | None = None) -> list[str]:
        """Every dead letter's id (a route's, or all), oldest first: a snapshot to work through in batches."""
        raw = await self.store.guard(lambda: self.store.client.zrange(self._index(route), 0, -1))
        return [m.decode() for m in raw]

    async def count(self, route: str | None = None) -> int:
        return await self.store.dlq_length(route)

    async def counts(self, routes: Iterable[str]) -> dict[str, int]:
        names = list(routes)
        lengths = await asyncio.gather(*(self.count(r) for r in names))
        return dict(zip(names, lengths, strict=True))

    # -- changing -------------------------------------------------------------------------------------------------

    async def remove(self, item: DeadLetter) -> bool:
        """Remove `item` if it is still the version read (see dlq_remove.lua). False when gone or replaced."""
        return bool(await self._removal(item))

    async def remove_held(self, item: DeadLetter, owner: str) -> HeldOutcome:
        """Remove `item` if the drain `owner` took it (its lease ended or not) and nobody took it since."""
        return _HELD[await self._removal(item, owner)]

    async def _removal(self, item: DeadLetter, *owner: str) -> int:
        """dlq_remove.lua's answer for `item` (and a held drain's `owner`), under a token of this call's own: the
        script sent again after a lost answer is answered as its first run was."""
        k = self.keys
        keys = [
            k.dlq_items(),
            k.dlq_data(),
            k.dlq_body(),
            k.dlq_route(item.route),
            k.dlq_taken(),
            k.dlq_gone(item.id, item.dead_ms),
        ]
        args = [item.id, item.dead_ms, secrets.token_hex(8), *owner]
        return int(await self._waited(lambda: self._remove(keys=keys, args=args), wrote=(1,), what="removed"))

    async def _waited(self, run: Callable[[], Any], wrote: tuple[Any, ...], what: str) -> Any:
        """`run`'s reply. With `redis.wait_replicas`, when the replicas did not acknowledge in time: a reply that
        wrote nothing (a refusal, not found) stands as it is, the replicas have nothing to catch up on; a write
        (a reply in `wrote`) is a 503 that says it stands on the primary only (run again, it is not found there)."""
        try:
            return await self.store.guard(run)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if not isinstance(cause, NotReplicated) or cause.reply is None:
                raise
            if cause.reply not in wrote:
                return cause.reply
            raise StoreUnavailable(
                f"{exc}: {what} on the primary, not yet on the replicas (a failover now could undo it); once they"
                " catch up it is done, and run again it is not found"
            ) from cause

    async def take(self, item: DeadLetter, owner: str, lease_ms: int) -> TakeOutcome:
        """Hold `item` (the version read) for `owner` for `lease_ms` by the store's clock (dlq_take.lua; a lease of
        0 gives it back, if `owner` holds it): "taken", "gone" (removed or replaced since it was read, or, giving
        back, not held by `owner`) or "busy" (another drain or replay holds it)."""
        code = await self._take_version(item.id, item.dead_ms, owner, lease_ms)
        return "taken" if code == 1 else "busy" if code < 0 else "gone"

    async def _take_version(self, item_id: str, version: int, owner: str, lease_ms: int) -> int:
        """dlq_take.lua's answer for `item_id` at `version` (its dead_at): 1 taken or given back, 0 gone, -1 busy."""
        keys = [self.keys.dlq_items(), self.keys.dlq_taken()]
        args = [item_id, version, owner, lease_ms]
        return int(await self.store.guard(lambda: self._take(keys=keys, args=args)))

    async def replay(self, item: DeadLetter, now_ms: int, reason: str, owner: str) -> ReplayOutcome:
        """Take the item, schedule its event due now, then remove the item. See the module docstring.

        "busy": another drain or replay holds it; "gone": removed or replaced (replayed and buried again) since it
        was read. An event already pending or in flight keeps its dead letter (it may be one being buried right
        now, between dlq_add.lua and dead.lua) unless it was scheduled from this very item (a replay cut short,
        run again: "replayed"); one already delivered makes the item obsolete, so it is removed.
        """
        if item.body is None:
            # its stored body is gone (evicted): replaying would deliver an empty request in its place and
            # remove the dead letter, the only record of it left
            return "body_missing"
        took = await self.take(item, owner, REPLAY_LEASE_MS)
        if took != "taken":
            return took
        removed = False
        try:
            try:
                state = await self.schedule(item, now_ms, reason)
            except StoreError:
                # replay.lua may have run with its answer lost (the client's resend lost too, or not made):
                # the event says so; else the error stands
                found = await self._as_scheduled(item)
                if found is None:
                    raise
                state = found
            if state in ("replayed", "delivered"):
                removed = await self.remove(item)
        finally:
            # kept while its event is pending, or a store error: the next replay must not wait
            if not removed:
                await self.give_back(item, owner)
        return state

    async def _as_scheduled(self, item: DeadLetter) -> ReplayOutcome | None:
        """What replay.lua run again would answer for `item`, read once after a call of it that failed:
        "replayed" when the event is scheduled from this very item (`dlv`), "delivered" when it is delivered
        (from this replay, since: ack.lua keeps no `dlv`, or before it: the item is obsolete either way), else
        None (also when the read fails). Always None with `redis.wait_replicas`: the replicas may not hold the new
        schedule (the call failed before its WAIT, or in it), and the item is removed only once they do (the
        replay run again waits for them)."""
        if self.store.waits_for_replicas:
            return None
        ev = self.keys.locate(item.route, item.dedupe_id)[0]
        try:
            st, dlv = await self.store.guard(lambda: self.store.client.hmget(ev, ["st", "dlv"]))
        except StoreError:
            return None
        if st == b"d":
            return "delivered"
        return "replayed" if st in (b"f", b"p") and dlv == str(item.dead_ms).encode() else None

    async def give_back(self, item: DeadLetter, owner: str) -> None:
        """End `owner`'s hold on `item` now rather than at its lease's end; best effort (the lease ends anyway)."""
        with contextlib.suppress(StoreError):
            await self.take(item, owner, 0)

    async def schedule(self, item: DeadLetter, now_ms: int, reason: str) -> ReplayOutcome:
        """Step 1 of a replay alone (replay.lua): the event back on its shard's schedule, due now."""
        route = item.route
        event, schedule, stats, member = self.keys.locate(route, item.dedupe_id)
        marker = json.dumps({"replayed_at_ms": now_ms, "reason": reason}, separators=(",", ":"))
        history = ",".join(json.dumps(h, separators=(",", ":")) for h in item.history)
        status = item.data.get("last_status")
        args = [
            now_ms,
            member,
            json.dumps(item.data.get("meta") or {}, separators=(",", ":")),
            item.body or b"",
            item.event_id,
            int(item.data.get("first_seen_ms") or now_ms),
            history,
            marker,
            "" if status is None else status,
            item.data.get("last_error") or "",
            route,
            item.dead_ms,
        ]
        res = await self.store.reschedule([event, schedule, stats], args)
        if int(res[0]) == 1:
            return "replayed"
        return "delivered" if res[1] == b"d" else "pending"

    async def forget(self, route: str, dedupe_id: str) -> ForgetOutcome:
        """Drop a delivered or dead event's claim (forget.lua); refused ("pending") while it is pending."""
        shard = self.keys.shard_of(route, dedupe_id)
        member = self.keys.member(route, dedupe_id)
        keys = [self.keys.event(shard, member), self.keys.schedule(shard), self.keys.forgot(shard, member)]
        args = [member, secrets.token_hex(8)]
        reply = await self._waited(
            lambda: self._forget(keys=keys, args=args), wrote=(b"d", b"x"), what="forgotten"
        )
        st = reply.decode()
        if st in ("f", "p"):
            return "pending"
        return "missing" if st == "" else "forgotten"
