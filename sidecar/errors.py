"""The sidecar's exceptions. Foreign exceptions are translated at the boundary into the most specific one here.

    SidecarError
    ├── ConfigError          the config file is unusable; `.errors` holds every `FILE:LINE: key.path: message`
    ├── StoreError           a store operation failed
    │   └── StoreUnavailable Redis/Valkey cannot be reached or timed out (→ 503 store_unavailable, fail closed)
    │       └── StoreFull    the store is at its maxmemory and refuses what would grow it (→ 503 too)
    └── EmbeddedStoreError   the bundled Valkey could not be started

Signature failures are not here: they belong to the providers (`sidecar.providers.base.VerificationError`).
"""

from __future__ import annotations

from collections.abc import Iterator


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """Raised by `config.load` when the file has errors; every error is listed, not only the first."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class StoreError(SidecarError):
    """Raised by `store` when a Redis command or script fails for a reason other than reachability."""


class StoreUnavailable(StoreError):
    """Raised by `store` when Redis cannot be reached or does not answer in time."""


class StoreFull(StoreUnavailable):
    """Raised by `store` when Redis refuses a write for want of memory (`maxmemory` reached, `noeviction`): new
    events wait (503) while what the store holds is still delivered, which frees it."""


class EmbeddedStoreError(SidecarError):
    """Raised when `redis.url: embedded` cannot start the bundled Valkey server."""


def causes(exc: BaseException, depth: int = 5) -> Iterator[BaseException]:
    """`exc`, then what it was raised from (or while handling), up to `depth` in all: a client library keeps only
    the message of the error it wraps."""
    seen: BaseException | None = exc
    for _ in range(depth):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__
