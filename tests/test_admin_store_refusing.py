"""The admin API on a store that refuses writes (NOREPLICAS: `min-replicas-to-write` with no replica; MISCONF is
the same path): errors are JSON with `error`, a drain included, and nothing leaves the DLQ."""

from __future__ import annotations

from typing import Any

import redis

from tests.test_admin import Admin, admin, bury_many  # noqa: F401  (`admin` is a fixture)


async def test_admin_drain_on_a_store_refusing_writes_is_a_json_error_not_a_broken_stream(
    admin: Admin,  # noqa: F811
    rdb: redis.Redis,
) -> None:
    """Before, the drain answered 200, then its stream broke off before the first line (the first take was
    refused): curl saw an empty 200, `sidecar dlq drain` said only `drain broke off (IncompleteRead)`."""
    await bury_many(admin.store, 2)
    rdb.config_set("min-replicas-to-write", 1)
    try:
        body: dict[str, Any]
        for body in ({"hold": "10m"}, {}):
            resp = await admin.post("/admin/dlq/drain", body)
            assert resp.status == 503, (body, resp.status, await resp.text())
            assert (await resp.json())["error"] == "store_error"
    finally:
        rdb.config_set("min-replicas-to-write", 0)
    assert (await (await admin.get("/admin/dlq")).json())["total"] == 2
