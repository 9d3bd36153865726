"""The admin surface and the logs: the token is required and compared in constant time, the admin API is loopback
unless configured (and refused off loopback without a token), and no log line carries a secret or a body."""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from sidecar import admin as admin_module
from sidecar.admin import create_admin_app
from sidecar.app import create_app
from sidecar.config import AdminConfig, load_text
from sidecar.config import is_loopback as _is_loopback
from tests.conftest import REPO, JsonErrorTestServer, Upstream, make_config
from tests.faults import logcheck
from tests.faults.harness import (
    ADMIN_TOKEN,
    STRIPE_SECRET,
    build_request,
    event_body,
    raw_http,
    stripe_headers,
    stripe_route,
    write_sidecar_config,
)
from tests.faults.logcheck import BODY_MARKER
from tests.procs import SidecarProcess, free_port, wait_until

pytestmark = pytest.mark.slow


async def admin_client(aiohttp_client: Any, upstream: Upstream, redis_url: str, token: str | None) -> Any:
    extra = f'admin: {{listen: "127.0.0.1:0", token: "{token}"}}' if token else ""
    text = f"""
server: {{listen: "127.0.0.1:0"}}
{extra}
redis: {{url: "{redis_url}", shards: 4}}
upstream: {{url: "{upstream.url}"}}
routes:
{stripe_route()}"""
    config = load_text(text, env={})
    main = await aiohttp_client(create_app(config, redis_url=redis_url, run_worker=False))
    return await aiohttp_client(JsonErrorTestServer(create_admin_app(main.server.app)))


async def test_security_admin_token_required_and_compared_in_constant_time(
    aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    http = await admin_client(aiohttp_client, upstream, redis_url, ADMIN_TOKEN)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin_module.hmac, "compare_digest", spy)
    for headers in [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": f"Bearer {ADMIN_TOKEN.upper()}"},
        {"X-Admin-Token": ADMIN_TOKEN},
    ]:
        for method, path in [("GET", "/admin/stats"), ("GET", "/admin/dlq"), ("POST", "/admin/dlq/drain")]:
            resp = await http.request(method, path, headers=headers)
            assert resp.status == 401, (headers, path)
            assert (await resp.json())["error"] == "unauthorized"
    resp = await http.get("/admin/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status == 200
    # Every comparison of a presented token went through hmac.compare_digest, against the configured token.
    assert compared and all(b == ADMIN_TOKEN.encode() for _, b in compared)
    assert (ADMIN_TOKEN.encode(), ADMIN_TOKEN.encode()) in compared
    # Health, readiness and metrics stay open (no secrets there).
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http.get(path)).status == 200


async def test_security_admin_without_a_token_is_closed(
    aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: redis.Redis
) -> None:
    http = await admin_client(aiohttp_client, upstream, redis_url, None)
    for value in ["", "Bearer ", "Bearer None", "Bearer null"]:
        resp = await http.get("/admin/dlq", headers={"Authorization": value})
        assert resp.status == 401
        assert "not configured" in (await resp.json())["detail"]


def test_security_admin_is_loopback_unless_configured() -> None:
    assert AdminConfig().listen == "127.0.0.1:9090"
    for host in ["127.0.0.1", "127.0.0.2", "::1", "localhost"]:
        assert _is_loopback(host), host
    for host in [
        "0.0.0.0",
        "::",
        "",
        "10.0.0.1",
        "192.168.1.1",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
    ]:
        assert not _is_loopback(host), host


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]", ""])
def test_security_non_loopback_admin_without_token_is_refused(tmp_path: Path, listen: str) -> None:
    """`sidecar run` exits 1 before listening on anything (nothing is bound: the test stays loopback-only)."""
    port, admin_port = free_port(), free_port()
    config = tmp_path / "open-admin.yaml"
    config.write_text(
        f"""
server: {{listen: "127.0.0.1:{port}"}}
admin: {{listen: "{listen}:{admin_port}"}}
redis: {{url: "redis://127.0.0.1:{free_port()}"}}
routes:
{stripe_route()}"""
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "SIDECAR_LOG_FORMAT": "text"},
    )
    assert done.returncode == 1, done.stderr
    assert "admin.token: required when admin.listen" in done.stderr
    assert "Traceback" not in done.stderr


def test_security_secrets_stay_out_of_reprs_and_config_errors() -> None:
    text = f"""
admin: {{listen: "127.0.0.1:0", token: "{ADMIN_TOKEN}"}}
redis: {{url: "redis://user:redis-password-1f@127.0.0.1:1"}}
routes:
  - {{name: stripe, path: /webhooks/stripe, provider: stripe, secrets: ["{STRIPE_SECRET}"],
      sign_upstream: {{secret: "whsec_dXBzdHJlYW0tc2lnbmluZy1zZWNyZXQtNzc="}}, tolerance: "{STRIPE_SECRET}"}}
"""
    with pytest.raises(Exception) as info:  # tolerance is not a duration: the error must not quote the value
        load_text(text, env={})
    assert STRIPE_SECRET not in str(info.value)
    config = load_text(text.replace(f'tolerance: "{STRIPE_SECRET}"', "tolerance: 5m"), env={})
    shown = repr(config)
    for secret in [
        ADMIN_TOKEN,
        STRIPE_SECRET,
        "redis-password-1f",
        "whsec_dXBzdHJlYW0tc2lnbmluZy1zZWNyZXQtNzc=",
    ]:
        assert secret not in shown


async def test_security_process_logs_carry_no_secret_and_no_body(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[Any]
) -> None:
    """A `sidecar run` at debug with every request logged, driven through every path that logs (forward,
    duplicate, forged and bad signatures, upstream failures, dead letters, admin replay/drain/delete/forget),
    with secrets planted where a careless log line would pick them up: in a signature header, an Authorization
    header on a webhook, the body. The session-wide check (tests/faults/logcheck.py) scans this log too."""
    port, admin_port = free_port(), free_port()
    config = write_sidecar_config(
        tmp_path / "logs.yaml",
        port=port,
        admin_port=admin_port,
        redis_url=redis_url,
        upstream_url=upstream.url,
        retry="{base_delay: 50ms, multiplier: 1, jitter: 0, max_attempts: 2, lease: 2s}",
        logging="{level: debug, requests: all}",
    )
    proc = SidecarProcess(config)
    processes.append(proc)
    proc.start(port)
    url, admin = f"http://127.0.0.1:{port}/webhooks/stripe", f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def answer(rec: Any) -> web.Response | None:
        event_id = rec.headers.get("x-sidecar-event-id")
        return web.Response(status={"evt_log_retry": 503, "evt_log_rejected": 422}.get(event_id, 200))

    upstream.behaviour = answer
    async with aiohttp.ClientSession() as http:

        async def post(event_id: str, **headers: str) -> int:
            body = event_body(event_id, secret_in_body=STRIPE_SECRET)
            async with http.post(url, data=body, headers={**stripe_headers(body), **headers}) as resp:
                await resp.read()
                return resp.status

        assert await post("evt_log_ok", Authorization=f"Bearer {ADMIN_TOKEN}") == 200
        assert await post("evt_log_ok") == 200  # duplicate
        assert await post("evt_log_retry") == 202  # 503, retried, 503 again: dead (max_attempts 2)
        assert await post("evt_log_rejected") == 202  # 422: dead at once
        body = event_body("evt_log_forged")
        forged = {"Stripe-Signature": f"t={int(time.time())},v1={STRIPE_SECRET}", "X-Token": ADMIN_TOKEN}
        async with http.post(url, data=body, headers=forged) as resp:
            assert resp.status == 401
        async with http.post(url, data=body, headers={"Stripe-Signature": STRIPE_SECRET}) as resp:
            assert resp.status == 401

        async def dlq() -> list[dict[str, Any]]:
            async with http.get(f"{admin}/admin/dlq", headers=auth) as resp:
                return list((await resp.json())["items"])

        items: list[dict[str, Any]] = []

        async def two_dead() -> bool:
            items[:] = await dlq()
            return len(items) == 2

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not await two_dead():
            await asyncio.sleep(0.1)
        assert len(items) == 2
        async with http.get(f"{admin}/admin/dlq/{items[0]['id']}", headers=auth) as resp:
            assert BODY_MARKER in (await resp.json())["body"]  # the operator sees it; the log must not
        reason = {"reason": "log check"}
        async with http.post(
            f"{admin}/admin/dlq/replay", json={"ids": [items[0]["id"]], **reason}, headers=auth
        ) as r:
            assert r.status == 200
        async with http.delete(f"{admin}/admin/dlq/{items[1]['id']}?reason=log%20check", headers=auth) as r:
            assert r.status == 200
        async with http.delete(f"{admin}/admin/events/stripe/evt_log_ok?reason=x", headers=auth) as r:
            assert r.status == 200
        assert await wait_until(lambda: len(upstream.received) >= 5, 10)
        async with http.post(f"{admin}/admin/dlq/drain", json={}, headers=auth) as r:
            await r.read()
        async with http.get(f"{admin}/admin/dlq", headers={"Authorization": f"Bearer {STRIPE_SECRET}"}) as r:
            assert r.status == 401
    proc.stop()
    log = proc.log()
    assert '"outcome":"forwarded"' in log and '"outcome":"rejected_signature"' in log  # it did log requests
    assert "dead-lettered" in log and "log check" in log  # and admin mutations with their reason
    leaks = logcheck.find_leaks([("sidecar log", log)], [STRIPE_SECRET, ADMIN_TOKEN], set())
    assert not leaks, leaks


def test_security_log_check_finds_planted_leaks() -> None:
    """The session-wide check itself: a secret, the marker and the start of a seen body are all found, with the
    secret hidden in what is reported; and records made in this process are captured."""
    probes = {'{"id": "evt_p1", "type": '[: logcheck.PROBE]}
    texts = [
        ("a", "request route=stripe outcome=forwarded"),
        ("b", "oops sig=whsec_planted_secret_123 here"),
        ("c", f"note={BODY_MARKER}"),
        ("d", 'body={"id": "evt_p1", "type": "x"}'),
    ]
    leaks = logcheck.find_leaks(texts, ["whsec_planted_secret_123", "short"], probes)
    assert [leak.split(":")[0] for leak in leaks] == ["b", "c", "d"]
    assert "whsec_planted_secret_123" not in " ".join(leaks) and "[hidden]" in leaks[0]
    import logging

    marker = f"logcheck-capture-probe-{time.monotonic_ns()}"
    logging.getLogger("sidecar.test").warning("%s", marker)
    assert any(marker in text for text in logcheck.captured())


def test_security_every_loaded_config_registers_its_secrets(upstream: Upstream) -> None:
    make_config(
        '- {name: s, path: /s, provider: stripe, secrets: ["whsec_registered_by_load_0"]}',
        upstream_url=upstream.url,
        redis_url="redis://127.0.0.1:1",
    )
    assert "whsec_registered_by_load_0" in logcheck.STATE.secrets
    assert "test-admin-token" in logcheck.STATE.secrets  # make_config's admin.token


async def test_security_oversized_admin_request_is_413_json(
    aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: redis.Redis
) -> None:
    http = await admin_client(aiohttp_client, upstream, redis_url, ADMIN_TOKEN)
    resp = await http.post(
        "/admin/dlq/replay",
        data=io.BytesIO(json.dumps({"ids": ["a" * 24] * 100_000}).encode()),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert resp.status in (400, 413)
    assert "error" in await resp.json()


async def test_security_admin_unknown_expect_is_417_not_500(
    aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: redis.Redis
) -> None:
    """aiohttp's default Expect handler answered a non-UTF-8 value with a 500, before auth; ours answers 417."""
    http = await admin_client(aiohttp_client, upstream, redis_url, ADMIN_TOKEN)
    for path in ("/admin/stats", "/healthz", "/nowhere"):
        data = build_request("GET", path, [("Host", "h"), ("Expect", b"\xff\xfe")])
        answer = await raw_http(http.server.port, data)
        assert answer.status == 417 and answer.json() == {"error": "expectation_failed"}, (path, answer)
    data = build_request("POST", "/admin/dlq/drain", [("Host", "h"), ("Expect", "100-continue")], b"{}")
    assert (await raw_http(http.server.port, data)).status == 401  # 100 Continue, then the real answer
