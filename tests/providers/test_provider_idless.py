"""Genuine payloads that carry no id where the provider's usual one lives, and route settings that cannot work for
a provider (an external provider audit)."""

from __future__ import annotations

import json

import pytest
from provider_cases import NOW, mac, verify

from sidecar.config import load_text
from sidecar.errors import ConfigError


def test_intercom_notification_with_null_id_has_an_event_id() -> None:
    # (the ping, which carries "id": null too, is a handshake: test_provider_behaviour)
    body = json.dumps(
        {
            "type": "notification_event",
            "id": None,
            "topic": "contact.created",
            "data": {"item": {"type": "x"}},
        }
    )
    raw = body.encode()
    got = verify("intercom", ["s"], raw, {"X-Hub-Signature": "sha1=" + mac("s", raw, "sha1").hex()})
    assert got.event_id is not None and got.handshake is None


def test_zoom_app_deauthorized_has_an_event_id() -> None:
    raw = json.dumps(
        {
            "event": "app_deauthorized",
            "event_ts": 1,
            "payload": {"account_id": "a", "user_id": "u", "client_id": "c"},
        }
    ).encode()
    headers = {
        "x-zm-signature": "v0=" + mac("z", b"v0:%d:" % NOW + raw).hex(),
        "x-zm-request-timestamp": str(NOW),
    }
    assert verify("zoom", ["z"], raw, headers).event_id is not None


@pytest.mark.parametrize(
    "payload",
    [
        {
            "action": "revoked",
            "type": "OAuthApp",
            "organizationId": "o",
            "oauthClientId": "c",
            "createdAt": "t",
        },
        {
            "action": "breached",
            "type": "IssueSLA",
            "organizationId": "o",
            "issueData": {"id": "i"},
            "createdAt": "t",
        },
    ],
)
def test_linear_retry_of_an_event_without_data_id_dedupes_on_a_signed_id(payload: dict) -> None:
    ids = set()
    for stamp in (NOW * 1000, NOW * 1000 + 1500):  # a retry is re-stamped
        raw = json.dumps({**payload, "webhookTimestamp": stamp}).encode()
        got = verify("linear", ["l"], raw, {"Linear-Signature": mac("l", raw).hex(), "Linear-Delivery": "d"})
        ids.add(got.signed_id)
    assert len(ids) == 1 and None not in ids


@pytest.mark.parametrize("provider", ["sendgrid", "hubspot", "twilio", "x", "none"])
def test_types_on_a_provider_without_event_types_is_refused(provider: str) -> None:
    key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
    text = (
        "routes:\n"
        f"  - {{name: r, path: /r, provider: {provider}, secrets: ['{key}'], public_url: 'https://x.example/r',"
        " types: ['a']}\n"
    )
    with pytest.raises(ConfigError, match=r"routes\[0\]\.types: provider"):
        load_text(text)


HMAC_URL = (
    "routes:\n  - name: g\n    path: /g\n    provider: hmac\n    secrets: [k]\n"
    "    signature: {sig_name: x-sig, template: '{url}.{body}', dedup_id: ['header:x-id']}\n"
)


def test_types_on_a_generic_hmac_route_is_refused() -> None:
    """The generic spec has no event type: `types:` would filter every event (200, never forwarded)."""
    with pytest.raises(ConfigError, match=r"routes\[0\]\.types: provider hmac reports no event type"):
        load_text(HMAC_URL + "    types: ['a']\n")


def test_a_generic_hmac_route_signing_the_url_without_public_url_is_a_warning() -> None:
    [warning] = load_text(HMAC_URL).warnings()
    assert "routes.g: hmac signs the URL it calls and no public_url is set" in warning
    assert load_text(HMAC_URL + "    public_url: https://hooks.example.com/g\n").warnings() == []
    body_only = HMAC_URL.replace("'{url}.{body}'", "'{method}.{body}'")
    assert load_text(body_only).warnings() == []
