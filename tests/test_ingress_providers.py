"""Every provider end to end through the real sidecar: a request signed the way the provider signs it is forwarded
byte-identical; a tampered body, a wrong secret and a stale timestamp get 401 and nothing reaches the upstream;
the second of two configured secrets is accepted. Signers and secrets come from tests/providers/provider_cases.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from sidecar.providers.base import VerificationError
from tests.conftest import Upstream
from tests.providers.provider_cases import CASES, Case


def route_yaml(name: str, case: Case, secrets: list[str]) -> str:
    lines = [
        f"- name: {name}",
        f"  path: /in/{name}",
        f"  provider: {case.provider}",
        f"  secrets: {json.dumps(secrets)}",
        f"  public_url: {json.dumps(case.url)}",
    ]
    if case.signature is not None:
        lines.append(f"  signature: {json.dumps(case.signature)}")
    if not has_auto_id(case):
        lines.append("  event_id: body_sha256")
    return "\n".join(lines)


def has_auto_id(case: Case) -> bool:
    body, headers = case.request("good", ts=int(time.time()))
    try:
        verified = case.verify(body, headers, now=time.time())
    except VerificationError:
        return False
    return verified.event_id is not None and verified.handshake is None


@pytest.fixture
async def provider_client(sidecar_factory: Any) -> Any:
    routes = []
    for key, case in CASES.items():
        name = key.replace("-", "_")
        routes.append(route_yaml(name, case, [case.good]))
        routes.append(route_yaml(f"{name}_rot", case, [case.other, case.good]))
    return await sidecar_factory("\n".join(routes))


def names() -> list[str]:
    return list(CASES)


async def post(client: Any, name: str, body: bytes, headers: dict[str, str]) -> Any:
    return await client.post(
        f"/in/{name}", data=body, headers={"Content-Type": "application/json", **headers}
    )


@pytest.mark.parametrize("key", names())
async def test_ingress_provider_signed_request_forwarded_byte_identical(
    provider_client: Any, upstream: Upstream, key: str
) -> None:
    case, name = CASES[key], key.replace("-", "_")
    body, headers = case.request("good", ts=int(time.time()))
    resp = await post(provider_client, name, body, headers)
    assert resp.status == 200, await resp.text()
    [got] = upstream.received
    assert got.body == body
    for header, value in headers.items():
        assert got.headers[header.lower()] == value
    assert got.headers["x-sidecar-route"] == name


@pytest.mark.parametrize("key", names())
async def test_ingress_provider_forgeries_rejected_and_never_forwarded(
    provider_client: Any, upstream: Upstream, rdb: redis.Redis, key: str
) -> None:
    case, name = CASES[key], key.replace("-", "_")
    now = int(time.time())
    body, headers = case.request("good", ts=now)
    tampered = await post(provider_client, name, case.tampered(body), headers)
    assert tampered.status == 401
    body_o, headers_o = case.request("other", ts=now)
    wrong = await post(provider_client, name, body_o, headers_o)
    assert wrong.status == 401
    assert (await wrong.json())["error"] == "invalid_signature"
    if case.window:
        old_body, old_headers = case.request("good", ts=now - int(case.window) - 120)
        stale = await post(provider_client, name, old_body, old_headers)
        assert stale.status == 401
        assert (await stale.json())["error"] == "timestamp_out_of_tolerance"
    assert upstream.received == []
    assert rdb.keys("*") == []


@pytest.mark.parametrize("key", names())
async def test_ingress_provider_second_secret_accepted(
    provider_client: Any, upstream: Upstream, key: str
) -> None:
    case, name = CASES[key], key.replace("-", "_")
    body, headers = case.request("good", ts=int(time.time()))
    resp = await post(provider_client, f"{name}_rot", body, headers)
    assert resp.status == 200, await resp.text()
    assert [r.body for r in upstream.received] == [body]
