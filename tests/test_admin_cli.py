"""`sidecar dlq …` end to end: real `python -m sidecar run` and `python -m sidecar dlq` processes, a real Valkey and
a real upstream. Exit codes: 0 ok, 1 error answer, 2 usage, 3 unreachable, 4 unauthorized, 5 not found."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from sidecar.admin_client import admin_url_from_listen
from sidecar.keys import KeySpace
from sidecar.store import RedisStore
from tests.conftest import REPO, Upstream
from tests.procs import SidecarProcess, free_port, write_config
from tests.test_admin import bury_many

KEYS = KeySpace("sidecar", 4)
TOKEN = "t"  # what tests.procs.write_config puts in admin.token


@dataclass
class Result:
    code: int
    out: str
    err: str


async def dlq(*args: str, env: dict[str, str] | None = None) -> Result:
    """`python -m sidecar dlq ARGS` with a clean environment (plus `env`)."""
    base = {k: v for k, v in os.environ.items() if k not in ("SIDECAR_ADMIN_TOKEN", "SIDECAR_CONFIG")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "dlq",
        *args,
        cwd=REPO,
        env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Result(int(proc.returncode or 0), out.decode(), err.decode())


@dataclass
class Running:
    config: Path
    admin_url: str
    store: RedisStore


@pytest.fixture
async def sidecar(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[SidecarProcess]
):
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "sidecar.yaml"
    write_config(
        cfg,
        redis_url=redis_url,
        upstream_url=upstream.url,
        port=port,
        admin_port=admin_port,
        secret="whsec_x",
    )
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    store = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=10_000)
    try:
        yield Running(cfg, f"http://127.0.0.1:{admin_port}", store)
    finally:
        await store.close()


async def deliveries(upstream: Upstream, want: int, until: float = 15.0) -> Counter[str]:
    deadline = time.monotonic() + until
    while time.monotonic() < deadline and len(upstream.received) < want:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # anything extra would arrive now
    return Counter(upstream.ids())


async def test_admin_cli_list_and_show_table_json_and_not_found(sidecar: Running) -> None:
    ids = await bury_many(sidecar.store, 3)
    cfg = ["--config", str(sidecar.config)]  # URL and token both from the config's admin section
    listed = await dlq("list", *cfg)
    assert listed.code == 0, listed.err
    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["ID", "ROUTE", "EVENT"] and len(rows) == 3
    assert all(r.split()[0] in ids and "stripe" in r and "503" in r for r in rows)
    assert "3 shown of 3" in listed.err

    as_json = await dlq("list", "--json", "--limit", "2", *cfg)
    page = json.loads(as_json.out)
    assert as_json.code == 0 and len(page["items"]) == 2 and page["total"] == 3 and page["next_cursor"]
    nxt = await dlq("list", "--json", "--cursor", page["next_cursor"], *cfg)
    assert [i["id"] for i in page["items"] + json.loads(nxt.out)["items"]] == ids

    shown, shown_json, missing, bad_filter = await asyncio.gather(
        dlq("show", ids[0], *cfg),
        dlq("show", ids[0], "--json", *cfg),
        dlq("show", "0123456789abcdef01234567", *cfg),
        dlq("list", "--status", "999", *cfg),
    )
    assert shown.code == 0
    assert "evt_00000" in shown.out and "Stripe-Signature: t=1,v1=ab" in shown.out
    assert "attempt 1  503" in shown.out and '"id": "evt_00000"' in shown.out
    item = json.loads(shown_json.out)
    assert item["id"] == ids[0] and item["history"][0]["status"] == 503
    assert missing.code == 5 and missing.out == ""
    assert missing.err.count("\n") == 1 and "not found" in missing.err
    assert bad_filter.code == 1 and "bad_request" in bad_filter.err and "status" in bad_filter.err


async def test_admin_cli_replay_dry_run_ids_and_route_deliver_each_once(
    sidecar: Running, upstream: Upstream, rdb: redis.Redis
) -> None:
    ids = await bury_many(sidecar.store, 40)
    auth = ["--admin-url", sidecar.admin_url, "--token", TOKEN]
    dry = await dlq("replay", "--route", "stripe", "--dry-run", *auth)
    assert (dry.code, dry.out) == (0, "would replay 40\n")
    assert rdb.zcard(KEYS.dlq_items()) == 40

    two = await dlq("replay", ids[0], ids[1], "--reason", "receiver fixed", *auth)
    assert (two.code, two.out) == (0, "replayed 2\n")
    rest = await dlq("replay", "--route", "stripe", "--json", *auth)
    assert rest.code == 0 and json.loads(rest.out)["replayed"] == 38
    got = await deliveries(upstream, 40)
    assert len(got) == 40 and set(got.values()) == {1}
    assert rdb.zcard(KEYS.dlq_items()) == 0
    assert all(r.headers["x-sidecar-attempt"] == "1" for r in upstream.received)

    unknown = await dlq("replay", ids[0], *auth)  # replayed already: no longer a dead letter
    assert unknown.code == 5 and ids[0] in unknown.err


async def test_admin_cli_drain_appends_ndjson_to_file_and_empties_dlq(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    out = tmp_path / "drained.ndjson"
    auth = ["--admin-url", sidecar.admin_url]
    env = {"SIDECAR_ADMIN_TOKEN": TOKEN}
    await bury_many(sidecar.store, 30)
    await bury_many(sidecar.store, 5, prefix="later")
    first = await dlq("drain", "--out", str(out), "--reason", "archive", *auth, env=env)
    assert first.code == 0 and "drained 35 item(s)" in first.err and first.out == ""
    assert rdb.zcard(KEYS.dlq_items()) == 0
    await bury_many(sidecar.store, 4, prefix="again")
    second = await dlq("drain", "--route", "stripe", "--out", str(out), *auth, env=env)
    assert second.code == 0 and "drained 4 item(s)" in second.err
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(items) == 39 and len({i["id"] for i in items}) == 39  # the first drain's lines are kept
    assert all(i["body"] and i["headers"] and i["history"] for i in items)
    to_stdout = await dlq("drain", *auth, env=env)
    assert to_stdout.code == 0 and to_stdout.out == "" and "drained 0" in to_stdout.err
    unknown_route = await dlq("drain", "--route", "nosuch", "--out", str(out), *auth, env=env)
    assert unknown_route.code == 5 and len(out.read_text().splitlines()) == 39


async def test_admin_cli_exit_4_without_or_with_wrong_token(sidecar: Running, rdb: redis.Redis) -> None:
    await bury_many(sidecar.store, 2)
    url = ["--admin-url", sidecar.admin_url]
    results = await asyncio.gather(
        dlq("list", *url),
        dlq("list", *url, "--token", "wrong"),
        dlq("replay", "--all", *url, env={"SIDECAR_ADMIN_TOKEN": "wrong"}),
        dlq("drain", *url, "--token", "wrong", env={"SIDECAR_ADMIN_TOKEN": TOKEN}),  # the flag wins
    )
    for r in results:
        assert r.code == 4, r.err
        assert r.err.count("\n") == 1 and "unauthorized" in r.err and "SIDECAR_ADMIN_TOKEN" in r.err
    assert rdb.zcard(KEYS.dlq_items()) == 2
    ok = await dlq("list", *url, env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    assert ok.code == 0


async def test_admin_cli_exit_3_when_unreachable(valkey: object) -> None:
    nothing = f"http://127.0.0.1:{free_port()}"
    not_http = f"http://127.0.0.1:{valkey.port}"  # type: ignore[attr-defined]  # a Redis server, not the admin API
    results = await asyncio.gather(
        dlq("list", "--admin-url", nothing, "--token", "x"),
        dlq("drain", "--admin-url", nothing, "--token", "x"),
        dlq("show", "abc", "--admin-url", not_http, "--token", "x", "--timeout", "2"),
    )
    for r in results:
        assert r.code == 3, r.err
        assert r.err.count("\n") == 1 and "cannot reach the admin API" in r.err


BAD_ARGUMENTS = [
    ["replay"],
    ["replay", "abc", "--all"],
    ["list", "--limit", "0"],
    ["show"],
    ["list", "--config", "/nonexistent/sidecar.yaml"],
    ["list", "--admin-url", "ftp://x", "--token", "t"],
]


async def test_admin_cli_exit_2_on_bad_arguments() -> None:
    results = await asyncio.gather(*(dlq(*args) for args in BAD_ARGUMENTS))
    for args, r in zip(BAD_ARGUMENTS, results, strict=True):
        assert r.code == 2, (args, r.code, r.err)
        assert r.err.strip() and "Traceback" not in r.err


def test_admin_cli_admin_url_from_listen_wildcards_become_loopback() -> None:
    assert admin_url_from_listen("0.0.0.0:9090") == "http://127.0.0.1:9090"
    assert admin_url_from_listen(":9090") == "http://127.0.0.1:9090"
    assert admin_url_from_listen("[::]:9090") == "http://[::1]:9090"
    assert admin_url_from_listen("[fd00::1]:9090") == "http://[fd00::1]:9090"
    assert admin_url_from_listen("10.0.0.5:9091") == "http://10.0.0.5:9091"
