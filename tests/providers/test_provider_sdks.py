"""Cross-checks against the providers' own Python SDKs (offline): what the SDK signs we accept, what we accept the
SDK accepts, and what one rejects the other rejects. These SDKs read the real clock, so these tests use it too."""

from __future__ import annotations

import base64
import hashlib
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
import slack_sdk.signature
import standardwebhooks.webhooks
import stripe
import svix.webhooks
from provider_cases import b64, mac, verify
from twilio.request_validator import RequestValidator

from sidecar.providers.base import VerificationError

BODY = '{"id":"evt_sdk","type":"charge.succeeded","note":"caf\u00e9 \u2603"}'


def _now() -> int:
    return int(time.time())


# ---- Stripe -------------------------------------------------------------------------------------------------------


def test_stripe_sdk_signed_header_verifies() -> None:
    secret = "whsec_sdk_secret"
    header = stripe.WebhookSignature.generate_signature_header(BODY, secret, timestamp=_now())
    got = verify("stripe", [secret], BODY.encode(), {"Stripe-Signature": header}, now=time.time())
    assert (got.event_id, got.event_type) == ("evt_sdk", "charge.succeeded")


def test_stripe_our_header_accepted_by_sdk() -> None:
    secret = "whsec_sdk_secret"
    ts = _now()
    header = f"t={ts},v1={mac(secret, f'{ts}.{BODY}'.encode()).hex()}"
    assert verify("stripe", [secret], BODY.encode(), {"Stripe-Signature": header}, now=time.time())
    assert stripe.WebhookSignature.verify_header(BODY, header, secret, tolerance=300)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: h.replace(",", ", "),
        lambda h: h.replace("v1=", "v0="),
        lambda h: h.upper(),
        lambda h: h.replace("t=", "t=0"),  # leading zero: the SDK re-renders int(t), which we do too
    ],
)
def test_stripe_sdk_and_we_agree_on_mangled_headers(mangle: Any) -> None:
    secret = "whsec_sdk_secret"
    header = mangle(stripe.WebhookSignature.generate_signature_header(BODY, secret, timestamp=_now()))
    try:
        stripe.WebhookSignature.verify_header(BODY, header, secret, tolerance=300)
        sdk_ok = True
    except stripe.SignatureVerificationError:
        sdk_ok = False
    try:
        verify("stripe", [secret], BODY.encode(), {"Stripe-Signature": header}, now=time.time())
        ours_ok = True
    except VerificationError:
        ours_ok = False
    assert ours_ok == sdk_ok


def test_stripe_sdk_rejects_what_we_reject_stale() -> None:
    secret = "whsec_sdk_secret"
    header = stripe.WebhookSignature.generate_signature_header(BODY, secret, timestamp=_now() - 301)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(BODY, header, secret, tolerance=300)
    with pytest.raises(VerificationError):
        verify("stripe", [secret], BODY.encode(), {"Stripe-Signature": header}, now=time.time())


# ---- Standard Webhooks and svix -----------------------------------------------------------------------------------

SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _sw_headers(prefix: str, sig: str, ts: int, msg_id: str = "msg_sdk") -> dict[str, str]:
    return {f"{prefix}-id": msg_id, f"{prefix}-timestamp": str(ts), f"{prefix}-signature": sig}


def test_standardwebhooks_sdk_signed_verifies() -> None:
    ts = _now()
    sig = standardwebhooks.webhooks.Webhook(SW_SECRET).sign("msg_sdk", datetime.fromtimestamp(ts, UTC), BODY)
    got = verify(
        "standardwebhooks", [SW_SECRET], BODY.encode(), _sw_headers("webhook", sig, ts), now=time.time()
    )
    assert (got.event_id, got.id_signed, got.event_type) == ("msg_sdk", True, "charge.succeeded")


def test_standardwebhooks_our_signature_accepted_by_sdk() -> None:
    ts = _now()
    key = base64.b64decode(SW_SECRET.removeprefix("whsec_"))
    sig = "v1," + b64(mac(key, f"msg_sdk.{ts}.{BODY}".encode()))
    headers = _sw_headers("webhook", sig, ts)
    assert verify("standardwebhooks", [SW_SECRET], BODY.encode(), headers, now=time.time())
    assert standardwebhooks.webhooks.Webhook(SW_SECRET).verify(BODY.encode(), headers)["id"] == "evt_sdk"


def test_svix_sdk_signed_verifies_with_svix_headers() -> None:
    ts = _now()
    sig = svix.webhooks.Webhook(SW_SECRET).sign("msg_svix", datetime.fromtimestamp(ts, UTC), BODY)
    headers = _sw_headers("svix", sig, ts, "msg_svix")
    got = verify("svix", [SW_SECRET], BODY.encode(), headers, now=time.time())
    assert got.event_id == "msg_svix"
    svix.webhooks.Webhook(SW_SECRET).verify(BODY.encode(), headers)


def test_svix_sdk_and_we_agree_when_both_header_sets_present() -> None:
    ts = _now()
    webhook = svix.webhooks.Webhook(SW_SECRET)
    good = webhook.sign("msg_a", datetime.fromtimestamp(ts, UTC), BODY)
    headers = {**_sw_headers("svix", good, ts, "msg_a"), **_sw_headers("webhook", "v1,AAAA", ts, "msg_b")}
    webhook.verify(BODY.encode(), headers)
    assert verify("svix", [SW_SECRET], BODY.encode(), headers, now=time.time()).event_id == "msg_a"
    swapped = {**_sw_headers("svix", "v1,AAAA", ts, "msg_b"), **_sw_headers("webhook", good, ts, "msg_a")}
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        webhook.verify(BODY.encode(), swapped)
    with pytest.raises(VerificationError):
        verify("svix", [SW_SECRET], BODY.encode(), swapped, now=time.time())


@pytest.mark.parametrize("offset", [-301, 301])
def test_standardwebhooks_sdk_and_we_reject_out_of_window(offset: int) -> None:
    ts = _now() + offset
    webhook = standardwebhooks.webhooks.Webhook(SW_SECRET)
    headers = _sw_headers("webhook", webhook.sign("m", datetime.fromtimestamp(ts, UTC), BODY), ts, "m")
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        webhook.verify(BODY.encode(), headers)
    with pytest.raises(VerificationError):
        verify("standardwebhooks", [SW_SECRET], BODY.encode(), headers, now=time.time())


def test_standardwebhooks_sdk_and_we_agree_on_a_timestamp_with_a_leading_zero() -> None:
    """The SDK signs `floor(float(webhook-timestamp))`: a header `0<ts>` is signed as `<ts>` (ts_render int)."""
    ts = _now()
    webhook = standardwebhooks.webhooks.Webhook(SW_SECRET)
    headers = _sw_headers("webhook", webhook.sign("m", datetime.fromtimestamp(ts, UTC), BODY), ts, "m")
    headers["webhook-timestamp"] = "0" + str(ts)
    webhook.verify(BODY.encode(), headers)
    assert verify("standardwebhooks", [SW_SECRET], BODY.encode(), headers, now=time.time()).event_id == "m"


def test_standardwebhooks_sdk_and_we_agree_on_a_non_canonical_base64_signature() -> None:
    """The SDK compares decoded bytes (providers.md §0.2: "Standard Webhooks decodes first, so it tolerates some
    non-canonical input"): the unused low bits of the last base64 character do not count, for us either."""
    ts = _now()
    webhook = standardwebhooks.webhooks.Webhook(SW_SECRET)
    encoded = webhook.sign("m", datetime.fromtimestamp(ts, UTC), BODY).removeprefix("v1,")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    assert len(encoded) == 44 and encoded.endswith("=")  # 32 bytes: the 43rd character carries 2 unused bits
    loose = encoded[:42] + alphabet[alphabet.index(encoded[42]) ^ 1] + encoded[43:]
    assert loose != encoded and base64.b64decode(loose) == base64.b64decode(encoded)
    headers = _sw_headers("webhook", "v1," + loose, ts, "m")
    webhook.verify(BODY.encode(), headers)
    assert verify("standardwebhooks", [SW_SECRET], BODY.encode(), headers, now=time.time()).event_id == "m"


# ---- Slack --------------------------------------------------------------------------------------------------------


def test_slack_sdk_signature_verifies_and_ours_is_valid_for_sdk() -> None:
    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    ts = str(_now())
    body = b'{"type":"event_callback","event_id":"Ev1","event":{"type":"message","text":"\xc3\xa9"}}'
    sdk = slack_sdk.signature.SignatureVerifier(secret)
    sig = sdk.generate_signature(timestamp=ts, body=body)
    assert sig is not None
    headers = {"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": ts}
    assert verify("slack", [secret], body, headers, now=time.time()).event_id == "Ev1"
    ours = "v0=" + mac(secret, b"v0:" + ts.encode() + b":" + body).hex()
    assert sdk.is_valid(body=body, timestamp=ts, signature=ours)
    assert not sdk.is_valid(body=body + b" ", timestamp=ts, signature=ours)
    with pytest.raises(VerificationError):
        verify("slack", [secret], body + b" ", {**headers, "X-Slack-Signature": ours}, now=time.time())


# ---- Twilio -------------------------------------------------------------------------------------------------------

TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = [
    ("CallSid", "CA1"),
    ("Body", "caf\u00e9 & more"),
    ("MediaUrl", "b"),
    ("MediaUrl", "a"),
    ("Empty", ""),
]


class _Multi(dict[str, list[str]]):
    def getall(self, name: str) -> list[str]:
        return self[name]


def _multi(pairs: list[tuple[str, str]]) -> _Multi:
    out = _Multi()
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out


@pytest.mark.parametrize("algorithm", [None, "HMAC_SHA256"])
@pytest.mark.parametrize("url", [TWILIO_URL, "https://mycompany.com:443/myapp.php?foo=1&bar=2"])
def test_twilio_sdk_form_signature_verifies(algorithm: str | None, url: str) -> None:
    validator = RequestValidator("12345")
    sig = validator.compute_signature(url, _multi(PARAMS), algorithm)
    headers = {"X-Twilio-Signature": sig, "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if algorithm:
        headers["X-Twilio-Webhooks-Signature-Settings"] = f"key=k1,algorithm={algorithm}"
    body = urlencode(PARAMS).encode()
    assert verify("twilio", ["wrong", "12345"], body, headers, url=url) is not None
    assert validator.validate(url, _multi(PARAMS), sig, algorithm)
    tampered = urlencode([*PARAMS[:-1], ("Empty", "x")]).encode()
    with pytest.raises(VerificationError):
        verify("twilio", ["12345"], tampered, headers, url=url)


def test_twilio_sdk_json_body_signature_verifies() -> None:
    body = '{"property": "value", "boolean": true, "text": "\u00e9"}'
    url = TWILIO_URL + "&bodySHA256=" + hashlib.sha256(body.encode()).hexdigest()
    validator = RequestValidator("12345")
    sig = validator.compute_signature(url, {})
    headers = {"X-Twilio-Signature": sig, "Content-Type": "application/json"}
    assert verify("twilio", ["12345"], body.encode(), headers, url=url) is not None
    assert validator.validate(url, body, sig)
    assert not validator.validate(url, body + " ", sig)
    with pytest.raises(VerificationError):
        verify("twilio", ["12345"], (body + " ").encode(), headers, url=url)
