"""The store: the only package that imports redis. `RedisStore` and the records it persists."""

from sidecar.store.records import AttemptRecord, Burial, ClaimResult, EventRecord, Evicted, Taken
from sidecar.store.redis_store import RedisStore, dead_letter_id

__all__ = [
    "AttemptRecord",
    "Burial",
    "ClaimResult",
    "EventRecord",
    "Evicted",
    "RedisStore",
    "Taken",
    "dead_letter_id",
]
