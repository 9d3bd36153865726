"""The providers that are plain instances of the §23 engine: one `SigSpec` row each (providers.md §23.3).

`tolerance_s` is the SDK's default window and `tolerance_mode` its direction; a route's `tolerance` replaces the
window but never the direction. `event_type` is what a route's `types:` allow-list matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from sidecar.providers.crypto import HmacKey, Key
from sidecar.providers.engine import SpecVerifier, Switch
from sidecar.providers.request import Request
from sidecar.providers.spec import SigSpec

STRIPE = SigSpec(  # §1
    sig_name="stripe-signature",
    sig_format="kv_list",
    sig_keys=("v1",),  # v0 and unknown schemes are ignored (no downgrade)
    ts_key="t",
    template="{ts}.{body}",
    ts_source="sig:t",
    ts_render="int",
    tolerance_s=300,
    tolerance_mode="past_only",
    dedup_id=("json:id",),
    event_type=("json:type",),
    require_utf8=True,
)

GITHUB = SigSpec(  # §2; octokit compares the whole "sha256=<hex>"
    sig_name="x-hub-signature-256",
    prefix="sha256=",
    include_prefix_in_compare=True,
    dedup_id=("header:x-github-delivery",),
    event_type=("header:x-github-event",),
    handshake="github_ping",
)
GITHUB_SHA1 = replace(GITHUB, sig_name="x-hub-signature", prefix="sha1=", digest="sha1")

SHOPIFY = SigSpec(  # §3; "Events" deliveries use shopify-* names, detected by shopify-hmac-sha256
    sig_name="x-shopify-hmac-sha256",
    encoding="base64",
    header_aliases=(("x-shopify-hmac-sha256", "shopify-hmac-sha256"),),
    dedup_id=(
        "header:shopify-event-id",
        "header:x-shopify-event-id",
        "header:x-shopify-webhook-id",
        "header:shopify-webhook-id",
    ),
    event_type=("header:shopify-topic", "header:x-shopify-topic"),
    require_body=True,
)

SLACK = SigSpec(  # §4; slack_sdk compares "v0=<hex>" and checks the timestamp first
    sig_name="x-slack-signature",
    prefix="v0=",
    include_prefix_in_compare=True,
    template="v0:{ts}:{body}",
    ts_source="header:x-slack-request-timestamp",
    tolerance_s=300,
    tolerance_mode="both",
    check_ts_before_sig=True,
    dedup_id=("json:event_id", "body_sha256"),  # slash commands and interactivity carry no id
    event_type=("json:event.type", "json:type"),
    handshake="slack",
    require_utf8=True,
)

WORKOS = SigSpec(  # §9; "t=<ms>, v1=<hex>"
    sig_name="workos-signature",
    sig_format="kv_list",
    item_sep=", ",
    ts_key="t",
    template="{ts}.{body}",
    ts_source="sig:t",
    ts_unit="ms",
    tolerance_s=180,
    tolerance_mode="both",
    check_ts_before_sig=True,
    dedup_id=("json:id",),
    event_type=("json:event",),
    require_utf8=True,
)

PADDLE = SigSpec(  # §11; "ts=<s>;h1=<hex>[;h1=…]", key is the whole pdl_… string
    sig_name="paddle-signature",
    sig_format="kv_list",
    item_sep=";",
    sig_keys=("h1",),
    ts_key="ts",
    template="{ts}:{body}",
    ts_source="sig:ts",
    ts_render="int",
    tolerance_s=5,
    # both ways: paddle-python-sdk 1.16 also refuses a timestamp more than 5 s ahead ("too far in the future");
    # providers.md §11 read an older SDK that checked the past only
    tolerance_mode="both",
    check_ts_before_sig=True,
    ts_last=True,  # paddle-python-sdk 1.16 reads `ts=A;ts=B` as B (an external check)
    dedup_id=("json:event_id",),
    event_type=("json:event_type",),
    require_utf8=True,
)

LINEAR = SigSpec(  # §12; the timestamp is inside the signed body and checked after the signature
    sig_name="linear-signature",
    ts_source="json:webhookTimestamp",
    ts_unit="ms",
    tolerance_s=60,
    tolerance_mode="both",
    # the entity's id: `data.id` for data-change events; IssueSLA carries `issueData`, agent sessions `agentSession`,
    # app-user notifications `notification`, OAuthApp revocations only `oauthClientId` (their retries re-stamp
    # webhookTimestamp too, so a digest of the body is no identity for them)
    dedup_id=(
        "header:linear-delivery",
        "composite:organizationId,type,action,"
        "data.id|issueData.id|agentSession.id|notification.id|oauthClientId,createdAt",
    ),
    event_type=("json:type",),
)

ZOOM = SigSpec(  # §13; Zoom publishes no window: ours is 300 s both ways. No event id: a composite.
    sig_name="x-zm-signature",
    prefix="v0=",
    template="v0:{ts}:{body}",
    ts_source="header:x-zm-request-timestamp",
    tolerance_s=300,
    tolerance_mode="both",
    # participant and registrant events name the meeting as their object: who joined, left or registered is part of
    # the key (two participants admitted in the same millisecond are two events); absent parts add nothing
    dedup_id=(
        "composite:event,event_ts,payload.account_id,payload.object.uuid|payload.object.id,"
        "?payload.object.participant.participant_uuid|payload.object.participant.user_id"
        "|payload.object.participant.id,"
        "?payload.object.registrant.id",
        "body_sha256",  # events without payload.object (app_deauthorized, chatbot notifications): the body
    ),
    event_type=("json:event",),
    handshake="zoom",
)

INTERCOM = SigSpec(  # §14
    sig_name="x-hub-signature",
    prefix="sha1=",
    digest="sha1",
    dedup_id=("json:id", "body_sha256"),
    event_type=("json:topic",),
    handshake="intercom_ping",  # the Developer Hub's ping (§24: just 2xx)
)

SQUARE = SigSpec(  # §15; the URL is the route's public URL, byte for byte
    sig_name="x-square-hmacsha256-signature",
    encoding="base64",
    template="{url}{body}",
    dedup_id=("json:event_id",),
    event_type=("json:type",),
    require_body=True,
)

TYPEFORM = SigSpec(  # §20
    sig_name="typeform-signature",
    prefix="sha256=",
    encoding="base64",
    dedup_id=("json:event_id",),
    event_type=("json:event_type",),
)

CALENDLY = SigSpec(  # §21; no event id: (event, payload.uri, created_at)
    sig_name="calendly-webhook-signature",
    sig_format="kv_list",
    ts_key="t",
    template="{ts}.{body}",
    ts_source="sig:t",
    tolerance_s=180,
    tolerance_mode="both",
    dedup_id=("composite:event,payload.uri,created_at",),
    event_type=("json:event",),
)

PAGERDUTY = SigSpec(  # §19; "v1=<hex>,v1=<hex>", one per active secret; the docs compare "v1=<hex>"
    sig_name="x-pagerduty-signature",
    sig_format="kv_list",
    include_prefix_in_compare=True,
    dedup_id=("header:x-webhook-id", "json:event.id"),
    event_type=("json:event.event_type",),
    handshake="pagerduty_ping",
)

X = SigSpec(  # §22; POSTs carry no event id. The CRC GET is answered unsigned.
    sig_name="x-twitter-webhooks-signature",
    prefix="sha256=",
    encoding="base64",
    dedup_id=("body_sha256",),
    handshake="x_crc",
)

SPECS: dict[str, SigSpec] = {
    "stripe": STRIPE,
    "shopify": SHOPIFY,
    "slack": SLACK,
    "workos": WORKOS,
    "paddle": PADDLE,
    "linear": LINEAR,
    "zoom": ZOOM,
    "intercom": INTERCOM,
    "square": SQUARE,
    "typeform": TYPEFORM,
    "calendly": CALENDLY,
    "pagerduty": PAGERDUTY,
    "x": X,
}


def hmac_keys(spec: SigSpec, secrets: Sequence[str]) -> tuple[Key, ...]:
    """Secrets used as UTF-8 text, the common case (§0.4)."""
    return tuple(HmacKey(s.encode("utf-8"), spec.digest, spec.encoding, spec.compare_on) for s in secrets)


def build(name: str, secrets: Sequence[str], tolerance: float | None) -> SpecVerifier:
    spec = SPECS[name]
    return SpecVerifier(spec, hmac_keys(spec, secrets), spec.tolerance_s if tolerance is None else tolerance)


def build_github(secrets: Sequence[str], tolerance: float | None) -> Switch:
    """X-Hub-Signature-256; the legacy sha1 header only when the sha256 one is absent (old GHES)."""

    def pick(req: Request) -> int:
        return (
            0 if req.header("x-hub-signature-256") is not None or req.header("x-hub-signature") is None else 1
        )

    return Switch(
        pick,
        (
            SpecVerifier(GITHUB, hmac_keys(GITHUB, secrets), None),
            SpecVerifier(GITHUB_SHA1, hmac_keys(GITHUB_SHA1, secrets), None),
        ),
    )
