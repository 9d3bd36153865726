"""Every Redis key name the sidecar uses, built here and nowhere else.

Layout (`P` is `redis.prefix`, `s` the shard number):

    P:{s}:ev:<route>:<dedupe id>   HASH   one event: claim + stored request + attempt history
    P:{s'}:alias:<route>:<event id> STRING  dedupe id, when it differs from the public id (s' = shard of the id)
    P:{s}:stats                    HASH   `<route>:pending|delivered|dead|duplicates` counters, kept by the
                                          same scripts that change an event's state (no extra round trip)
    P:{s}:sched                    ZSET   the shard's retry schedule; member `<route>:<dedupe id>`,
                                          score = due time (ms), or lease deadline while in flight
    P:{stats}:rejected             HASH   route -> requests refused for their signature (flushed in batches)
    P:{meta}:shards                STRING the shard count the store's keys were written with (`redis.shards`)
    P:{dlq}:items                  ZSET   every dead letter, score = dead_at (ms)
    P:{dlq}:data                   HASH   dead-letter id -> item JSON (route, event, history, …)
    P:{dlq}:body                   HASH   dead-letter id -> raw body bytes
    P:{dlq}:r:<route>              ZSET   the route's dead letters, score = dead_at (ms)
    P:{dlq}:evicted                HASH   route -> dead letters evicted by the cap (a counter)
    P:{dlq}:taken                  HASH   dead-letter id -> "<owner> <dead_at> <until ms>": held by a drain or replay
    P:{dlq}:gone:<id>:<dead_at>    STRING the token of the removal of that dead letter version, for a minute
    P:{dlq}:written:<id>:<run>:<dead_at> STRING the id one burial wrote its dead letter under, for max(dedupe.ttl,
                                          24 h): the same burial run again writes nothing (~120 bytes each)
    P:{s}:forgot:<route>:<dedupe id> STRING "<token> <state>" of a forget, for a minute

Why the braces: every multi-key script touches keys of one hash tag only, so the same scripts run on a single
Redis and on a Redis/Valkey Cluster. The shard of an event is a stable hash of (route, dedupe id), so its claim,
its payload and its schedule entry always share a slot. Route names are `[a-z0-9_-]+` (validated in config), so
the first `:` after the route in a schedule member separates it from the dedupe id, which may contain anything.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str
    shards: int

    def shard_of(self, route: str, dedupe_id: str) -> int:
        return zlib.crc32(f"{route}\x00{dedupe_id}".encode()) % self.shards

    def member(self, route: str, dedupe_id: str) -> str:
        return f"{route}:{dedupe_id}"

    def event(self, shard: int, member: str) -> str:
        return f"{self.prefix}:{{{shard}}}:ev:{member}"

    def locate(self, route: str, dedupe_id: str) -> tuple[str, str, str, str]:
        """(event key, schedule key, stats key, schedule member) of one event: one shard computation, for the hot
        path, which needs all four on every claim."""
        shard = self.shard_of(route, dedupe_id)
        member = f"{route}:{dedupe_id}"
        return self.event(shard, member), self.schedule(shard), self.stats(shard), member

    def schedule(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}:sched"

    def alias(self, route: str, event_id: str) -> str:
        """Public event id -> dedupe id, for routes that dedupe on a digest (admin lookups by the provider's id)."""
        return f"{self.prefix}:{{{self.shard_of(route, event_id)}}}:alias:{route}:{event_id}"

    def nonce(self, provider: str, value: str) -> str:
        """A signed single-use value (Mailgun's token) -> the digest of the body it first came with. Per provider,
        not per route: routes of one provider share its signing key, so a token spent on one is spent on all."""
        return f"{self.prefix}:{{{self.shard_of(provider, value)}}}:nonce:{provider}:{value}"

    def forgot(self, shard: int, member: str) -> str:
        """The marker of one forget (forget.lua), kept for a minute."""
        return f"{self.prefix}:{{{shard}}}:forgot:{member}"

    def stats(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}:stats"

    def layout(self) -> str:
        """The shard count this prefix's keys were written with: another one would not find them."""
        return f"{self.prefix}:{{meta}}:shards"

    def rejected(self) -> str:
        return f"{self.prefix}:{{stats}}:rejected"

    def dlq_items(self) -> str:
        return f"{self.prefix}:{{dlq}}:items"

    def dlq_data(self) -> str:
        return f"{self.prefix}:{{dlq}}:data"

    def dlq_body(self) -> str:
        return f"{self.prefix}:{{dlq}}:body"

    def dlq_route_prefix(self) -> str:
        return f"{self.prefix}:{{dlq}}:r:"

    def dlq_route(self, route: str) -> str:
        return f"{self.dlq_route_prefix()}{route}"

    def dlq_evicted(self) -> str:
        return f"{self.prefix}:{{dlq}}:evicted"

    def dlq_taken(self) -> str:
        return f"{self.prefix}:{{dlq}}:taken"

    def dlq_written(self, item_id: str, run: int, version: int) -> str:
        """The record that a burial wrote its dead letter (dlq_add.lua: the id written): the same burial run again
        (its answer lost, or finished by a later take) writes nothing twice. Named by the run of attempts too (a
        claim's first sight, or a replay's run): another life or run buried in the same millisecond is not it."""
        return f"{self.prefix}:{{dlq}}:written:{item_id}:{run}:{version}"

    def dlq_gone(self, item_id: str, version: int) -> str:
        """The marker of one dead letter version's removal (dlq_remove.lua), kept for a minute."""
        return f"{self.prefix}:{{dlq}}:gone:{item_id}:{version}"


def split_member(member: str) -> tuple[str, str]:
    """`<route>:<dedupe id>` -> (route, dedupe id)."""
    route, _, dedupe_id = member.partition(":")
    return route, dedupe_id
