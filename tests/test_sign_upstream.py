"""sign_upstream: the receiver verifies every attempt with the Standard Webhooks SDK, retries included."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sidecar.app import RUNTIME
from tests.conftest import Received, Upstream
from tests.test_ingress import (
    GITHUB_SECRET,
    STRIPE_SECRET,
    github_headers,
    slack_headers,
    stripe_body,
    stripe_headers,
)

UPSTREAM_SECRET = "whsec_" + base64.b64encode(b"upstream-signing-key-32-bytes!!!").decode()


def signed_route(
    name: str, provider: str, secret: str, *extra: str, upstream_secret: str = UPSTREAM_SECRET
) -> str:
    """One route's YAML at /webhooks/<name> with `sign_upstream`; `extra`: more `key: value` lines."""
    lines = [f"- name: {name}", f"  path: /webhooks/{name}", f"  provider: {provider}"]
    lines += [f'  secrets: ["{secret}"]'] if secret else []
    lines += [f"  {line}" for line in extra]
    return "\n".join([*lines, f'  sign_upstream: {{secret: "{upstream_secret}"}}'])


def verified_with_the_sdk(
    upstream: Upstream, secret: str, then: Callable[[Received], web.Response | None] | None = None
) -> list[str]:
    """The upstream verifies every request with the Standard Webhooks SDK given `secret`, answering 400 when that
    fails; the verdicts, in order. `then` answers a verified request (None: the upstream's own answer)."""
    receiver = Webhook(secret)
    verdicts: list[str] = []

    def verify(rec: Received) -> web.Response | None:
        try:
            receiver.verify(rec.body, rec.headers)
        except WebhookVerificationError as exc:
            verdicts.append(f"rejected: {exc}")
            return web.Response(status=400)
        verdicts.append("ok")
        return then(rec) if then is not None else None

    upstream.behaviour = verify
    return verdicts


async def test_sign_upstream_headers_verify_with_the_standard_webhooks_sdk_on_every_attempt(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    stamps: list[int] = []

    def fail_the_first(rec: Received) -> web.Response | None:
        stamps.append(int(rec.headers["webhook-timestamp"]))
        return web.Response(status=503) if len(stamps) == 1 else None

    verdicts = verified_with_the_sdk(upstream, UPSTREAM_SECRET, fail_the_first)
    client = await sidecar_factory(
        signed_route("stripe", "stripe", STRIPE_SECRET),
        retry="{base_delay: 1100ms, multiplier: 1, jitter: 0}",
    )
    body = stripe_body("evt_signed")
    assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    time.sleep(1.2)
    assert await client.server.app[RUNTIME].worker.run_once() == 1
    assert verdicts == ["ok", "ok"]
    first, second = upstream.received
    assert (
        first.headers["webhook-id"] == second.headers["webhook-id"] == "evt_signed"
    )  # stable across retries
    assert stamps[1] > stamps[0]  # re-signed at each attempt, so a late retry is still fresh
    assert abs(stamps[1] - time.time()) < 5
    assert second.headers["stripe-signature"] == first.headers["stripe-signature"]  # provider's own kept


async def test_sign_upstream_replaces_provider_sent_standard_webhooks_headers(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory(signed_route("plain", "none", "", "event_id: {header: X-Event-Id}"))
    forged = {
        "X-Event-Id": "e1",
        "webhook-id": "spoof",
        "webhook-timestamp": "1",
        "webhook-signature": "v1,AAAA",
    }
    assert (await client.post("/webhooks/plain", data=b'{"a":1}', headers=forged)).status == 200
    [got] = upstream.received
    assert [k for k, _ in got.raw_headers].count("webhook-signature") == 1
    Webhook(UPSTREAM_SECRET).verify(got.body, got.headers)  # raises if the spoofed values had survived


async def test_sign_upstream_on_a_svix_route_verifies_with_the_svix_sdk(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A Svix (or Clerk) request forwarded with `sign_upstream`: the receiver's Svix SDK, given the upstream secret,
    verifies it. The SDK prefers the `svix-*` names when present (Clerk's reads only them), so those carry the
    sidecar's signature too, not the provider's."""
    import svix.webhooks

    provider_secret = "whsec_" + base64.b64encode(b"provider-svix-secret-32-bytes!!!").decode()
    client = await sidecar_factory(signed_route("svix", "standardwebhooks", provider_secret))
    body = '{"type":"user.created","data":{"id":"u1"}}'
    now = datetime.now(tz=UTC)
    signature = svix.webhooks.Webhook(provider_secret).sign("msg_svix1", now, body)
    headers = {
        "svix-id": "msg_svix1",
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": signature,
    }
    assert (await client.post("/webhooks/svix", data=body.encode(), headers=headers)).status == 200
    [got] = upstream.received
    received = {k: v for k, v in got.headers.items()}
    svix.webhooks.Webhook(UPSTREAM_SECRET).verify(got.body, received)  # raises if the provider's survived
    Webhook(UPSTREAM_SECRET).verify(got.body, got.headers)  # and the Standard Webhooks SDK, on webhook-*
    names = [k.lower() for k, _ in got.raw_headers]
    assert names.count("svix-signature") == 1 and got.headers["svix-id"] == "msg_svix1"


async def test_sign_upstream_secret_without_whsec_prefix_verifies_with_the_sdk_given_the_same_string(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """The SDK base64-decodes a secret with or without `whsec_`: the sidecar must derive the same key bytes from the
    same configured string (it used the UTF-8 bytes of an unprefixed one: every signature failed at the receiver)."""
    secret = base64.b64encode(b"upstream-signing-key-32-bytes!!!").decode()
    verdicts = verified_with_the_sdk(upstream, secret)
    client = await sidecar_factory(signed_route("stripe", "stripe", STRIPE_SECRET, upstream_secret=secret))
    body = stripe_body("evt_signed_plain_b64")
    assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 200
    assert verdicts == ["ok"]


async def test_sign_upstream_never_signs_what_was_not_verified(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A non-POST pass-through and an unsigned handshake passed through are nobody's verified event: no webhook-*
    header of the sidecar's (which would vouch for them) nor of the client's reaches the receiver."""
    client = await sidecar_factory(
        signed_route("stripe", "stripe", STRIPE_SECRET)
        + "\n"
        + signed_route("slack", "slack", "slack-signing-secret", "handshake: pass")
    )
    forged = b'{"id": "evt_forged", "type": "invoice.paid"}'
    resp = await client.put("/webhooks/stripe", data=forged, headers={"webhook-id": "evt_forged"})
    assert resp.status == 200
    resp = await client.post(
        "/webhooks/slack",
        data=b"ssl_check=1&token=t",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 200
    assert len(upstream.received) == 2
    for rec in upstream.received:
        assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & {k.lower() for k in rec.headers}


async def test_sign_upstream_signs_a_verified_handshake_passed_through_so_the_sdk_verifies_it(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A signed Slack url_verification passed through (`handshake: pass`) has no event id: it was signed with an
    empty webhook-id, which the receiver's SDK refuses ("Missing required headers"), and Slack's URL verification
    failed (a review). It is signed under its body's digest."""
    verdicts = verified_with_the_sdk(upstream, UPSTREAM_SECRET)
    client = await sidecar_factory(signed_route("slack", "slack", "slack-signing-secret", "handshake: pass"))
    body = b'{"type":"url_verification","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}'
    resp = await client.post("/webhooks/slack", data=body, headers=slack_headers(body))
    assert resp.status == 200
    assert verdicts == ["ok"]
    [got] = upstream.received
    assert got.headers["webhook-id"].startswith("sha256:")


async def test_x_crc_token_refused_is_answered_not_passed_through(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """With `handshake: pass` the receiver answers the CRC itself: a crc_token that could be an event body went to
    it, and its answer was the same signing oracle (a review). The sidecar answers that one 400 itself."""
    client = await sidecar_factory(
        """
- name: x
  path: /webhooks/x
  provider: x
  secrets: ["consumer-secret"]
  handshake: pass
"""
    )
    resp = await client.get("/webhooks/x", params={"crc_token": '{"for_user_id":"1"}'})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_crc_token"
    assert upstream.received == []
    resp = await client.get("/webhooks/x", params={"crc_token": "9b4507b3-9040-4669-9ca3-6b94edb50553"})
    assert resp.status == 200 and len(upstream.received) == 1


async def test_dedupe_false_signs_an_unsigned_header_id_under_the_signed_bytes(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """X-GitHub-Delivery is not signed: one captured delivery resent under made-up ids keeps one webhook-id (the
    digest of the signed bytes), so a receiver deduping on webhook-id is not made to process it once per id."""
    verdicts = verified_with_the_sdk(upstream, UPSTREAM_SECRET)
    client = await sidecar_factory(signed_route("github", "github", GITHUB_SECRET, "dedupe: false"))
    body = b'{"action": "created"}'
    for delivery in ("made-up-1", "made-up-2"):
        resp = await client.post("/webhooks/github", data=body, headers=github_headers(body, delivery))
        assert resp.status == 200
    assert verdicts == ["ok", "ok"]
    first, second = upstream.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.headers["webhook-id"].startswith("sha256:")
    ids = [dict((k.lower(), v) for k, v in r.raw_headers)["x-sidecar-event-id"] for r in upstream.received]
    assert ids == ["made-up-1", "made-up-2"]
