"""The known-answer vectors of providers.md, verbatim: official ones where the provider publishes them (GitHub,
Slack, Standard Webhooks, Twilio, WorkOS, Paddle, Square, SendGrid, HubSpot v3), self-computed ones otherwise."""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlencode

import pytest
from provider_cases import b64, inbound, mac, verify

from sidecar.providers.base import VerificationError
from sidecar.providers.registry import build_verifier

JSON_BODY = b'{"id":"evt_1","type":"test"}'


# ---- official vectors ---------------------------------------------------------------------------------------------


def test_github_official_vector() -> None:
    headers = {
        "X-Hub-Signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-GitHub-Event": "push",
    }
    got = verify("github", ["It's a Secret to Everybody"], b"Hello, World!", headers)
    assert (got.event_id, got.id_signed, got.event_type) == (
        "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        False,
        "push",
    )


def test_github_legacy_sha1_vector_when_sha256_absent() -> None:
    headers = {"X-Hub-Signature": "sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59"}
    assert verify("github", ["It's a Secret to Everybody"], b"Hello, World!", headers).event_id is None


def test_github_sha256_header_wins_over_legacy() -> None:
    headers = {
        "X-Hub-Signature-256": "sha256=" + "0" * 64,
        "X-Hub-Signature": "sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59",
    }
    with pytest.raises(VerificationError):
        verify("github", ["It's a Secret to Everybody"], b"Hello, World!", headers)


SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_HEADERS = {
    "X-Slack-Request-Timestamp": "1531420618",
    "X-Slack-Signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
    "Content-Type": "application/x-www-form-urlencoded",
}


def test_slack_official_vector() -> None:
    got = verify(
        "slack", ["8f742231b10e8888abcd99yyyzzz85a5"], SLACK_BODY, SLACK_HEADERS, now=1531420618 + 10
    )
    assert got.event_id == hashlib.sha256(SLACK_BODY).hexdigest()  # a slash command has no event_id
    assert got.signed_headers == {"x-slack-request-timestamp"}


def test_slack_official_vector_is_stale_today() -> None:
    with pytest.raises(VerificationError):
        verify("slack", ["8f742231b10e8888abcd99yyyzzz85a5"], SLACK_BODY, SLACK_HEADERS, now=1_700_000_000)


SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_BODY = b'{"test": 2432232314}'
SW_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
SW_NOW = 1614265330


def _sw_headers(prefix: str = "webhook", signature: str = SW_SIG) -> dict[str, str]:
    return {
        f"{prefix}-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        f"{prefix}-timestamp": "1614265330",
        f"{prefix}-signature": signature,
    }


@pytest.mark.parametrize("provider", ["standardwebhooks", "svix", "clerk", "resend"])
@pytest.mark.parametrize("names", ["webhook", "svix"])
def test_standardwebhooks_official_vector(provider: str, names: str) -> None:
    got = verify(provider, [SW_SECRET], SW_BODY, _sw_headers(names), now=SW_NOW)
    assert (got.event_id, got.id_signed) == ("msg_p5jXN8AQM9LWM0D4loKWxJek", True)
    assert got.signed_headers == {f"{names}-id", f"{names}-timestamp"}


def test_standardwebhooks_official_multi_signature_vector() -> None:
    bad = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    header = f"{bad} v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {SW_SIG} {bad}"
    assert verify("svix", [SW_SECRET], SW_BODY, _sw_headers(signature=header), now=SW_NOW).event_id


def test_standardwebhooks_svix_headers_win_over_webhook_headers() -> None:
    headers = {**_sw_headers("svix"), **{k: "garbage" for k in _sw_headers("webhook")}}
    got = verify("svix", [SW_SECRET], SW_BODY, headers, now=SW_NOW)
    assert got.signed_headers == {"svix-id", "svix-timestamp"}
    headers = {**_sw_headers("webhook"), "svix-signature": "v1,AAAA"}
    with pytest.raises(VerificationError):
        verify("svix", [SW_SECRET], SW_BODY, headers, now=SW_NOW)


def test_standardwebhooks_malformed_entries_are_skipped() -> None:
    header = f"  nocomma v1,!!! {SW_SIG}"
    assert verify("svix", [SW_SECRET], SW_BODY, _sw_headers(signature=header), now=SW_NOW).event_id


V1A_SIG = "v1a,yoUrgEkc12aGqm0n4Sydmdz55xJfTz4AsAgieHFjmkR7LJtqVCZOQYzvvHjI5kAey+r4iaBGxTFRrl2iBQxtDQ=="
WHPK = "whpk_A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="


def test_standardwebhooks_v1a_self_computed_vector() -> None:
    got = verify("standardwebhooks", [WHPK], SW_BODY, _sw_headers(signature=V1A_SIG), now=SW_NOW)
    assert got.event_id == "msg_p5jXN8AQM9LWM0D4loKWxJek"


def test_standardwebhooks_v1_and_v1a_keys_on_one_route() -> None:
    for sig in (SW_SIG, V1A_SIG):
        assert verify("svix", [WHPK, SW_SECRET], SW_BODY, _sw_headers(signature=sig), now=SW_NOW).event_id
    # a v1a entry is never checked against an HMAC key, nor a v1 entry against a public key
    with pytest.raises(VerificationError):
        verify("svix", [SW_SECRET], SW_BODY, _sw_headers(signature=V1A_SIG), now=SW_NOW)
    with pytest.raises(VerificationError):
        verify("svix", [WHPK], SW_BODY, _sw_headers(signature=SW_SIG), now=SW_NOW)


TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_FORM = urlencode(
    {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
).encode()
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    ("url", "signature"),
    [
        (TWILIO_URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("https://mycompany.com:443/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (TWILIO_URL, "kvajT1Ptam85bY51eRf/AJRuM3w="),  # signed with :443, configured without
        ("https://mycompany.com:443/myapp.php?foo=1&bar=2", "kvajT1Ptam85bY51eRf/AJRuM3w="),
        ("http://mycompany.com/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),
        ("http://mycompany.com:80/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),
    ],
)
def test_twilio_official_form_vectors_with_and_without_port(url: str, signature: str) -> None:
    headers = {**FORM, "X-Twilio-Signature": signature, "I-Twilio-Idempotency-Token": "idem-9"}
    got = verify("twilio", ["12345"], TWILIO_FORM, headers, url=url)
    assert (got.event_id, got.id_signed) == ("idem-9", False)


def test_twilio_official_json_body_vector() -> None:
    body = b'{"property": "value", "boolean": true}'
    url = TWILIO_URL + "&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    headers = {"Content-Type": "application/json", "X-Twilio-Signature": "a9nBmqA0ju/hNViExpshrM61xv4="}
    # identified by the signed string: the URL, whose bodySHA256 pins the body
    assert (
        verify("twilio", ["12345"], body, headers, url=url).event_id
        == hashlib.sha256(url.encode()).hexdigest()
    )
    with pytest.raises(VerificationError):  # the URL still verifies, the body hash does not
        verify("twilio", ["12345"], body + b" ", headers, url=url)


def test_twilio_shared_key_sha256_self_computed_vector() -> None:
    headers = {
        **FORM,
        "X-Twilio-Signature": "033hgUJA9M/hXIZsYjwkerEP/DBm35nEri5FhCYjA5s=",
        "X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256",
    }
    assert verify("twilio", ["12345"], TWILIO_FORM, headers, url=TWILIO_URL) is not None
    headers["X-Twilio-Webhooks-Signature-Settings"] = "key=k,algorithm=HMAC_SHA1"
    with pytest.raises(VerificationError):
        verify("twilio", ["12345"], TWILIO_FORM, headers, url=TWILIO_URL)
    headers["X-Twilio-Webhooks-Signature-Settings"] = "key=k,algorithm=HMAC_MD5"
    with pytest.raises(VerificationError):
        verify("twilio", ["12345"], TWILIO_FORM, headers, url=TWILIO_URL)


WORKOS_BODY = (
    b'{"id":"wh_01FG9JXJ9C9S052FX59JVG4EG1","data":{"id":"conn_01EHWNC0FCBHZ3BJ7EGKYXK0E6","name":"Foo Corp\'s '
    b'Connection","state":"active","object":"connection","domains":[{"id":"conn_domain_01EHWNFTAFCF3CQAE5A9Q0P1YB",'
    b'"domain":"foo-corp.com","object":"connection_domain"}],"connection_type":"OktaSAML","organization_id":'
    b'"org_01EHWNCE74X7JSDV0X3SZ3KJNY"},"event":"connection.activated"}'
)


def test_workos_official_vector() -> None:
    headers = {
        "WorkOS-Signature": "t=1632409405772, v1=67612f0e74f008b436a13b00266f90ef5c13f9cbcf6262206f5f4a539ff61702"
    }
    got = verify("workos", ["1lyKDzhJjuCkIscIWqkSe4YsQ"], WORKOS_BODY, headers, now=1632409405)
    assert (got.event_id, got.id_signed, got.event_type) == (
        "wh_01FG9JXJ9C9S052FX59JVG4EG1",
        True,
        "connection.activated",
    )


def test_paddle_official_vector_multiple_h1_and_secrets() -> None:
    header = "ts=1696195954;h1=dummy;h1=d96299976a6eb066f484d7fde011ac56fc32b38fc9940bc419d6e537fdc6ef02"
    secrets = [
        "pdl_ntf_01hbpjmytsa32fhr36nqgc3kgb_TjIG2BXbm83HPXqNfziwe506sBEdqL/4",
        "pdl_ntf_01hbpjmytsa32fhr36nqgc3kgb_vB/yIOnTOCWIvpBadM5jzBZPHc7OmdSo",
        "pdl_ntf_01hbpjmytsa32fhr36nqgc3kgb_WvRO0eL4Bj9rgYYIBZY6wZhG4EHy9jzh",
    ]
    # the SDK test disables the drift check; tolerance 0 does the same here
    assert verify("paddle", secrets, b"hello-world", {"Paddle-Signature": header}, tolerance=0) is not None
    with pytest.raises(VerificationError):
        verify("paddle", secrets[:2], b"hello-world", {"Paddle-Signature": header}, tolerance=0)


@pytest.mark.parametrize(
    ("key", "url", "body", "signature"),
    [
        (
            "Ibxx_5AKakO-3qeNVR61Dw",
            "https://webhook.site/679a4f3a-dcfa-49ee-bac5-9d0edad886b9",
            b'{"merchant_id":"MLEFBHHSJGVHD","type":"webhooks.test_notification","event_id":"ac3ac95b-f97d-458c-a6e6-'
            b'18981597e05f","created_at":"2022-07-13T20:30:59.037339943Z","data":{"type":"webhooks","id":"bc368e64-01a'
            b'a-407e-b46e-3231809b1129"}}',
            "GF4YkrJgGBDZ9NIYbNXBnMzqb2HoL4RW/S6vkZ9/2N4=",
        ),
        (
            "signature-key",
            "https://webhook.site/webhooks",
            b'{"data":{"type":"webhooks","id":">id<"}}',
            "Cxt7+aTi4rKgcA0bC4g9EHdVtLSDWdqccmL5MvihU4U=",
        ),
    ],
)
def test_square_official_vectors(key: str, url: str, body: bytes, signature: str) -> None:
    headers = {"x-square-hmacsha256-signature": signature}
    got = verify("square", [key], body, headers, url=url)
    if b"event_id" in body:
        assert (got.event_id, got.event_type) == (
            "ac3ac95b-f97d-458c-a6e6-18981597e05f",
            "webhooks.test_notification",
        )
    with pytest.raises(VerificationError):  # one character of the URL changed
        verify("square", [key], body, headers, url=url + "/")
    with pytest.raises(VerificationError):  # re-indented JSON
        verify("square", [key], json.dumps(json.loads(body), indent=2).encode(), headers, url=url)


SENDGRID_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6"
    "wEA3F+g=="
)
SENDGRID_BODY = (
    b'[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address","sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpY'
    b'bF9OSFN0T0doUTRrb2ZTbV9BLTA","sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F'
    b'5FC76C-9.0","smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]\r\n'
)
SENDGRID_HEADERS = {
    "X-Twilio-Email-Event-Webhook-Signature": (
        "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="
    ),
    "X-Twilio-Email-Event-Webhook-Timestamp": "1600112502",
}


def test_sendgrid_official_vector() -> None:
    got = verify("sendgrid", [SENDGRID_KEY], SENDGRID_BODY, SENDGRID_HEADERS)
    assert (
        got.event_id == "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA"
    )  # a batch of one: its element's id
    assert got.signed_headers == {"x-twilio-email-event-webhook-timestamp"}


def test_sendgrid_official_vector_without_trailing_crlf_fails() -> None:
    with pytest.raises(VerificationError):
        verify("sendgrid", [SENDGRID_KEY], SENDGRID_BODY.rstrip(b"\r\n"), SENDGRID_HEADERS)


HUBSPOT_HEADERS = {
    "X-HubSpot-Signature-v3": "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw=",
    "X-HubSpot-Request-Timestamp": "15000000",
}


def test_hubspot_v3_official_vector() -> None:
    body = b"{'example_field':'example_value'}"
    url = "https://www.example.com/webhook_uri"
    got = verify(
        "hubspot", ["yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"], body, HUBSPOT_HEADERS, url=url, now=15_100
    )
    assert got.event_id == hashlib.sha256(body).hexdigest()  # a batch: the delivery is the unit
    assert got.signed_headers == {"x-hubspot-request-timestamp"}
    with pytest.raises(VerificationError):  # the method is signed
        verify(
            "hubspot",
            ["yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"],
            body,
            HUBSPOT_HEADERS,
            url=url,
            now=15_100,
            method="PUT",
        )


def test_hubspot_v3_official_vector_is_stale_today() -> None:
    with pytest.raises(VerificationError):
        verify(
            "hubspot",
            ["yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"],
            b"{'example_field':'example_value'}",
            HUBSPOT_HEADERS,
            url="https://www.example.com/webhook_uri",
            now=1_700_000_000,
        )


# ---- self-computed vectors ------------------------------------------------------------------------------------------


def test_stripe_self_computed_vector() -> None:
    header = "t=1700000000,v1=d95c6b7477fbd7e9f90b1b0ef5f9c7ac25abca5382460e0d988c2b2a5b71b990"
    got = verify(
        "stripe",
        ["whsec_test_secret"],
        b'{"id":"evt_test_webhook","object":"event"}',
        {"Stripe-Signature": header},
    )
    assert (got.event_id, got.id_signed) == ("evt_test_webhook", True)


def test_stripe_ignores_v0_and_unknown_schemes() -> None:
    header = (
        "t=1700000000,v0=6ffbb59b,v1=d95c6b7477fbd7e9f90b1b0ef5f9c7ac25abca5382460e0d988c2b2a5b71b990,v9=x"
    )
    assert (
        verify(
            "stripe",
            ["whsec_test_secret"],
            b'{"id":"evt_test_webhook","object":"event"}',
            {"Stripe-Signature": header},
        ).event_id
        == "evt_test_webhook"
    )
    with pytest.raises(VerificationError):  # only v0 present: "no signatures found with expected scheme v1"
        verify("stripe", ["whsec_test_secret"], b"{}", {"Stripe-Signature": "t=1700000000,v0=ab"})


def test_stripe_sdk_does_not_trim_spaces() -> None:
    header = "t=1700000000, v1=d95c6b7477fbd7e9f90b1b0ef5f9c7ac25abca5382460e0d988c2b2a5b71b990"
    with pytest.raises(VerificationError):
        verify(
            "stripe",
            ["whsec_test_secret"],
            b'{"id":"evt_test_webhook","object":"event"}',
            {"Stripe-Signature": header},
        )


def test_shopify_self_computed_vector() -> None:
    headers = {
        "X-Shopify-Hmac-Sha256": "WjJw7TR24iYnSetbuQMlpAhrpYYNWqQQrcAz0Y0xL1k=",
        "X-Shopify-Topic": "orders/create",
        "X-Shopify-Webhook-Id": "wh-1",
    }
    got = verify("shopify", ["shpss_test_secret"], JSON_BODY, headers)
    assert (got.event_id, got.id_signed, got.event_type) == ("wh-1", False, "orders/create")
    got = verify("shopify", ["shpss_test_secret"], JSON_BODY, {**headers, "X-Shopify-Event-Id": "ev-1"})
    assert got.event_id == "ev-1"


def test_shopify_events_mode_headers() -> None:
    headers = {
        "shopify-hmac-sha256": "WjJw7TR24iYnSetbuQMlpAhrpYYNWqQQrcAz0Y0xL1k=",
        "X-Shopify-Hmac-Sha256": "garbage",
        "shopify-topic": "orders/create",
        "shopify-event-id": "ev-2",
    }
    got = verify("shopify", ["shpss_test_secret"], JSON_BODY, headers)
    assert (got.event_id, got.event_type) == ("ev-2", "orders/create")


def test_shopify_empty_body_rejected() -> None:
    headers = {
        "X-Shopify-Hmac-Sha256": b64(mac("shpss_test_secret", b""))
    }  # validly signed, but the SDK refuses
    with pytest.raises(VerificationError):
        verify("shopify", ["shpss_test_secret"], b"", headers)


def test_square_empty_body_rejected() -> None:
    """providers.md §15: "An empty body returns `False`" in Square's SDK, however the URL is signed."""
    url = "https://webhook.site/webhooks"
    headers = {"x-square-hmacsha256-signature": b64(mac("signature-key", url.encode()))}  # validly signed
    with pytest.raises(VerificationError):
        verify("square", ["signature-key"], b"", headers, url=url)


def test_linear_self_computed_vector() -> None:
    headers = {
        "Linear-Signature": "15f4ed469d70578addaae2e26d132988baf157d66e7731053e8dac6750469e7a",
        "Linear-Delivery": "234d1a4e-b617-4388-90fe-adc3633d6b72",
    }
    got = verify(
        "linear", ["lin_wh_test_secret"], JSON_BODY, headers
    )  # no webhookTimestamp: no freshness check
    assert (got.event_id, got.id_signed, got.event_type) == (
        "234d1a4e-b617-4388-90fe-adc3633d6b72",
        False,
        "test",
    )


def test_zoom_self_computed_vector() -> None:
    headers = {
        "x-zm-signature": "v0=b7fa013911a74dd46cf59c606682750833260fe8140b716e7b074813af1c1fe3",
        "x-zm-request-timestamp": "1700000000",
    }
    got = verify("zoom", ["zoom_secret_token"], JSON_BODY, headers)
    assert got.signed_headers == {"x-zm-request-timestamp"}


def test_intercom_self_computed_vector() -> None:
    headers = {"X-Hub-Signature": "sha1=fd139a017dbc7fcd165e833a6a475f7c58a4f297"}
    got = verify("intercom", ["intercom_client_secret"], JSON_BODY, headers)
    assert (got.event_id, got.id_signed) == ("evt_1", True)


def test_mailgun_self_computed_vector() -> None:
    body = json.dumps(
        {
            "signature": {
                "timestamp": "1700000000",
                "token": "a" * 50,
                "signature": "9180d3ba47d0a132576084995a3a91c2e79f3b6f75b7c88dba228a2fd52b26ff",
            },
            "event-data": {"id": "CPgfbmQMTCKtHW6uIWtuVe", "event": "delivered"},
        }
    ).encode()
    got = verify("mailgun", ["mailgun_signing_key"], body, {"Content-Type": "application/json"})
    # the body is not signed (only timestamp + token), so the id is not either
    assert (got.event_id, got.id_signed, got.event_type) == ("CPgfbmQMTCKtHW6uIWtuVe", False, "delivered")


def test_mailgun_legacy_form_self_computed_vector() -> None:
    body = urlencode(
        {
            "timestamp": "1700000000",
            "token": "a" * 50,
            "signature": "9180d3ba47d0a132576084995a3a91c2e79f3b6f75b7c88dba228a2fd52b26ff",
            "event": "delivered",
        }
    ).encode()
    got = verify("mailgun", ["mailgun_signing_key"], body, FORM)
    # no event id in a form post: its digest (unsigned: the signature covers only timestamp and token)
    assert (got.event_id, got.id_signed, got.nonce) == (hashlib.sha256(body).hexdigest(), False, "a" * 50)
    with pytest.raises(VerificationError) as info:
        verify("mailgun", ["mailgun_signing_key"], body + b"&signature=00", FORM)
    assert info.value.reason == "duplicate_header"


def test_mailgun_parent_signature_accepted() -> None:
    doc = {
        "signature": {
            "timestamp": "1700000000",
            "token": "a" * 50,
            "signature": "0" * 64,
            "parent-signature": "9180d3ba47d0a132576084995a3a91c2e79f3b6f75b7c88dba228a2fd52b26ff",
        },
        "event-data": {"id": "x"},
    }
    assert verify("mailgun", ["mailgun_signing_key"], json.dumps(doc).encode(), {}).event_id == "x"


def test_pagerduty_self_computed_vector() -> None:
    headers = {
        "X-PagerDuty-Signature": "v1=e5a6a1f5395c86adebdade7fa56ecf188ae35323d9dabbc5bb897c0ccb66088b",
        "X-Webhook-Id": "wh-pd-1",
    }
    got = verify("pagerduty", ["pd_secret"], JSON_BODY, headers)
    assert (got.event_id, got.id_signed) == ("wh-pd-1", False)


def test_typeform_self_computed_vector() -> None:
    headers = {"Typeform-Signature": "sha256=k8WspepE6bJe7UjlLcmPd5rlphlQx+oRalHNtGiciVY="}
    assert verify("typeform", ["typeform_secret"], JSON_BODY, headers) is not None


def test_calendly_self_computed_vector() -> None:
    headers = {
        "Calendly-Webhook-Signature": "t=1700000000,v1=a392be6c62713e5df9fd2e443c8c756a1210b4cca5eefe148e4c5527252ada5f"
    }
    assert verify("calendly", ["calendly_signing_key"], JSON_BODY, headers, now=1_700_000_100) is not None


DISCORD_KEY = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
DISCORD_HEADERS = {
    "X-Signature-Timestamp": "1700000000",
    "X-Signature-Ed25519": (
        "c1098e97d711377f30225d53d94b89d43537f92e5b3afaddc590781b1f9f9d4b2eeab335d370be3b9a090bc61a85b86448bc140dcd195f15"
        "69c2bff181257607"
    ),
}


def test_discord_self_computed_vector_is_a_ping() -> None:
    got = verify("discord", [DISCORD_KEY], b'{"type":1}', DISCORD_HEADERS)
    assert got.handshake is not None
    assert (got.handshake.status, got.handshake.body) == (200, b'{"type":1}')
    assert got.handshake.content_type == "application/json"


def test_x_crc_vector() -> None:
    verifier = build_verifier("x", ["z3ZX4v7mAAUGykl3EcmkqbartmuW8VFOOzCloLx9Q45P0hLrFu"], None, None)
    url = "https://hooks.example.com/x?crc_token=9b4507b3-9040-4669-9ca3-6b94edb50553"
    answer = verifier.unsigned_handshake(inbound(b"", {}, url=url, method="GET"))
    assert answer is not None
    assert answer.status == 200
    assert json.loads(answer.body) == {
        "response_token": "sha256=Cytd4Sq+NvEcV3MMrXxWJGJx5A+y/lXzzU2Maartkx8="
    }
