"""Independent signers for every provider, written from providers.md with `hmac`/`cryptography` directly.

Each `Case` knows how to sign a request the way its provider does, with a "good" secret (configured on the route)
and an "other" one (a valid secret of the same kind that is not configured), so the negative tests of §25 can be
written once for all providers.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import CIMultiDict

from sidecar.providers.base import Inbound, Verified
from sidecar.providers.registry import build_verifier

NOW = 1_700_000_000
BODY = b'{"id":"evt_1","type":"test"}'
URL = "https://hooks.example.com/webhooks/in?x=1"

Headers = dict[str, str] | list[tuple[str, str]]


def inbound(body: bytes, headers: Headers, url: str = URL, now: float = NOW, method: str = "POST") -> Inbound:
    items = headers.items() if isinstance(headers, dict) else headers
    return Inbound(method=method, body=body, headers=CIMultiDict(items), url=url, now=now)


def verify(
    provider: str,
    secrets: Iterable[str],
    body: bytes,
    headers: Headers,
    *,
    tolerance: float | None = None,
    signature: dict[str, Any] | None = None,
    url: str = URL,
    now: float = NOW,
    method: str = "POST",
) -> Verified:
    verifier = build_verifier(provider, list(secrets), tolerance, signature)
    return verifier.verify(inbound(body, headers, url, now, method))


def mac(key: bytes | str, msg: bytes, digest: str = "sha256") -> bytes:
    return hmac.new(key.encode() if isinstance(key, str) else key, msg, digest).digest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# ---- asymmetric key material ------------------------------------------------------------------------------------

ED_SEED = bytes(range(32))  # providers.md §5/§10 vectors
ED_GOOD = Ed25519PrivateKey.from_private_bytes(ED_SEED)
ED_OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def ed_public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


EC_GOOD = ec.derive_private_key(0x5EED, ec.SECP256R1())
EC_OTHER = ec.derive_private_key(0x0DD, ec.SECP256R1())


def ec_public_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b64(der)


# ---- one provider each --------------------------------------------------------------------------------------------

Signer = Callable[
    [str, bytes, int], tuple[bytes, dict[str, str]]
]  # (which secret, body, unix s) -> (body, headers)


@dataclass(frozen=True)
class Case:
    provider: str
    good: str  # the secret (or public key) configured on the route
    other: str  # a well-formed secret that did not sign
    sign: Signer
    sig_header: str | None  # None: the signature is in the body
    prefix: str | None = None  # literal prefix of the signature value (for "prefix removed")
    window: float | None = None  # the SDK's default tolerance
    both: bool = True  # the SDK also rejects timestamps in the future
    ts_header: str | None = None
    json_body: bool = True  # re-serialising the body must break the signature
    list_bad_good: Callable[[str], str] | None = None  # header value → "one bad entry + that good one"
    signature: dict[str, Any] | None = None
    case_sensitive: bool = True  # changing the signature's letter case must fail
    body: bytes = BODY
    url: str = URL
    tamper: Callable[[bytes], bytes] | None = (
        None  # change one signed byte (default: the last letter or digit)
    )

    def secret(self, which: str) -> str:
        return self.good if which == "good" else self.other

    def request(
        self, which: str = "good", ts: int = NOW, body: bytes | None = None
    ) -> tuple[bytes, dict[str, str]]:
        return self.sign(which, self.body if body is None else body, ts)

    def verify(
        self, body: bytes, headers: Headers, *, secrets: Iterable[str] | None = None, **kw: Any
    ) -> Verified:
        kw.setdefault("url", self.url)
        secrets = [self.good] if secrets is None else secrets
        return verify(self.provider, secrets, body, headers, signature=self.signature, **kw)

    def tampered(self, body: bytes) -> bytes:
        if self.tamper is not None:
            return self.tamper(body)
        i = max(i for i, c in enumerate(body) if chr(c).isalnum())
        return body[:i] + bytes([body[i] + 1 if body[i] not in b"9zZ" else body[i] - 1]) + body[i + 1 :]


def _hex(key: str, msg: bytes, digest: str = "sha256") -> str:
    return mac(key, msg, digest).hex()


def stripe_sign(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        return body, {"Stripe-Signature": f"t={ts},v1={_hex(secrets[which], b'%d.' % ts + body)}"}

    return sign


def _kv(which_secrets: dict[str, str], header: str, fmt: Callable[[str, bytes, int], str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        return body, {header: fmt(which_secrets[which], body, ts)}

    return sign


def _pair(good: str, other: str) -> dict[str, str]:
    return {"good": good, "other": other}


def _bad_first(sep: str, bad: str) -> Callable[[str], str]:
    return lambda value: bad + sep + value


S = _pair

STRIPE = Case(
    "stripe",
    "whsec_good",
    "whsec_other",
    stripe_sign(S("whsec_good", "whsec_other")),
    "stripe-signature",
    prefix="v1=",
    window=300,
    both=False,
    list_bad_good=lambda v: v.replace(",v1=", ",v1=" + "0" * 64 + ",v1="),
)


def _github(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        sig = "sha256=" + _hex(secrets[which], body)
        return body, {"X-Hub-Signature-256": sig, "X-GitHub-Delivery": "d-1", "X-GitHub-Event": "push"}

    return sign


GITHUB = Case(
    "github",
    "gh-good",
    "gh-other",
    _github(S("gh-good", "gh-other")),
    "x-hub-signature-256",
    prefix="sha256=",
)

SHOPIFY = Case(
    "shopify",
    "shpss_good",
    "shpss_other",
    _kv(S("shpss_good", "shpss_other"), "X-Shopify-Hmac-Sha256", lambda k, b, t: b64(mac(k, b))),
    "x-shopify-hmac-sha256",
)


def _slack(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        sig = "v0=" + _hex(secrets[which], b"v0:%d:" % ts + body)
        return body, {"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": str(ts)}

    return sign


SLACK = Case(
    "slack",
    "slack-good",
    "slack-other",
    _slack(S("slack-good", "slack-other")),
    "x-slack-signature",
    prefix="v0=",
    window=300,
    ts_header="x-slack-request-timestamp",
)

SW_GOOD = "whsec_" + b64(bytes(range(24)))
SW_OTHER = "whsec_" + b64(bytes(range(100, 132)))


def sw_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def _standard(secrets: dict[str, str], names: tuple[str, str, str]) -> Signer:
    id_name, ts_name, sig_name = names

    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        sig = b64(mac(sw_key(secrets[which]), b"msg_1.%d." % ts + body))
        return body, {id_name: "msg_1", ts_name: str(ts), sig_name: "v1," + sig}

    return sign


_SW_LIST = _bad_first(" ", "v1," + b64(bytes(32)))
STANDARD = Case(
    "standardwebhooks",
    SW_GOOD,
    SW_OTHER,
    _standard(S(SW_GOOD, SW_OTHER), ("webhook-id", "webhook-timestamp", "webhook-signature")),
    "webhook-signature",
    prefix="v1,",
    window=300,
    ts_header="webhook-timestamp",
    list_bad_good=_SW_LIST,
)
SVIX = Case(
    "svix",
    SW_GOOD,
    SW_OTHER,
    _standard(S(SW_GOOD, SW_OTHER), ("svix-id", "svix-timestamp", "svix-signature")),
    "svix-signature",
    prefix="v1,",
    window=300,
    ts_header="svix-timestamp",
    list_bad_good=_SW_LIST,
)

WHPK_GOOD = "whpk_" + b64(ed_public_raw(ED_GOOD))
WHPK_OTHER = "whpk_" + b64(ed_public_raw(ED_OTHER))


def _v1a(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
    key = ED_GOOD if which == "good" else ED_OTHER
    sig = b64(key.sign(b"msg_1.%d." % ts + body))
    return body, {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": "v1a," + sig}


V1A = Case(
    "standardwebhooks",
    WHPK_GOOD,
    WHPK_OTHER,
    _v1a,
    "webhook-signature",
    prefix="v1a,",
    window=300,
    ts_header="webhook-timestamp",
    list_bad_good=_bad_first(" ", "v1a," + b64(bytes(64))),
)

TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675309"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
]


def twilio_string(url: str, pairs: list[tuple[str, str]]) -> bytes:
    values: dict[str, set[str]] = {}
    for k, v in pairs:
        values.setdefault(k, set()).add(v)
    return (url + "".join(k + v for k in sorted(values) for v in sorted(values[k]))).encode()


def _twilio(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        from urllib.parse import parse_qsl

        pairs = parse_qsl(body.decode(), keep_blank_values=True)
        sig = b64(mac(secrets[which], twilio_string(TWILIO_URL, pairs), "sha1"))
        return body, {
            "X-Twilio-Signature": sig,
            "Content-Type": "application/x-www-form-urlencoded",
            "I-Twilio-Idempotency-Token": "idem-1",
        }

    return sign


TWILIO = Case(
    "twilio",
    "12345",
    "54321",
    _twilio(S("12345", "54321")),
    "x-twilio-signature",
    json_body=False,
    body=urlencode(TWILIO_PARAMS).encode(),
    url=TWILIO_URL,
)


def _workos(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        ms = ts * 1000
        return body, {"WorkOS-Signature": f"t={ms}, v1={_hex(secrets[which], b'%d.' % ms + body)}"}

    return sign


WORKOS = Case(
    "workos",
    "workos-good",
    "workos-other",
    _workos(S("workos-good", "workos-other")),
    "workos-signature",
    prefix="v1=",
    window=180,
)

PADDLE = Case(
    "paddle",
    "pdl_ntfset_good",
    "pdl_ntfset_other",
    _kv(
        S("pdl_ntfset_good", "pdl_ntfset_other"),
        "Paddle-Signature",
        lambda k, b, t: f"ts={t};h1={_hex(k, b'%d:' % t + b)}",
    ),
    "paddle-signature",
    prefix="h1=",
    window=5,
    list_bad_good=lambda v: v.replace(";h1=", ";h1=dummy;h1="),
)


def linear_body(ts: int) -> bytes:
    return b'{"action":"create","type":"Issue","webhookTimestamp":%d,"data":{"id":"i1"}}' % (ts * 1000)


def _linear(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        if body == BODY:
            body = linear_body(ts)
        return body, {"Linear-Signature": _hex(secrets[which], body), "Linear-Delivery": "del-1"}

    return sign


LINEAR = Case(
    "linear", "lin_good", "lin_other", _linear(S("lin_good", "lin_other")), "linear-signature", window=60
)


def _zoom(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        sig = "v0=" + _hex(secrets[which], b"v0:%d:" % ts + body)
        return body, {"x-zm-signature": sig, "x-zm-request-timestamp": str(ts)}

    return sign


ZOOM = Case(
    "zoom",
    "zoom-good",
    "zoom-other",
    _zoom(S("zoom-good", "zoom-other")),
    "x-zm-signature",
    prefix="v0=",
    window=300,
    ts_header="x-zm-request-timestamp",
)

INTERCOM = Case(
    "intercom",
    "ic-good",
    "ic-other",
    _kv(S("ic-good", "ic-other"), "X-Hub-Signature", lambda k, b, t: "sha1=" + _hex(k, b, "sha1")),
    "x-hub-signature",
    prefix="sha1=",
)

SQUARE = Case(
    "square",
    "sq-good",
    "sq-other",
    _kv(
        S("sq-good", "sq-other"),
        "x-square-hmacsha256-signature",
        lambda k, b, t: b64(mac(k, URL.encode() + b)),
    ),
    "x-square-hmacsha256-signature",
)


def _hubspot(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        ms = b"%d" % (ts * 1000)
        sig = b64(mac(secrets[which], b"POST" + URL.encode() + body + ms))
        return body, {"X-HubSpot-Signature-v3": sig, "X-HubSpot-Request-Timestamp": ms.decode()}

    return sign


HUBSPOT = Case(
    "hubspot",
    "hs-good",
    "hs-other",
    _hubspot(S("hs-good", "hs-other")),
    "x-hubspot-signature-v3",
    window=300,
    both=False,
    ts_header="x-hubspot-request-timestamp",
)


def _discord(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
    key = ED_GOOD if which == "good" else ED_OTHER
    return body, {"X-Signature-Ed25519": key.sign(b"%d" % ts + body).hex(), "X-Signature-Timestamp": str(ts)}


DISCORD = Case(
    "discord",
    ed_public_raw(ED_GOOD).hex(),
    ed_public_raw(ED_OTHER).hex(),
    _discord,
    "x-signature-ed25519",
    ts_header="x-signature-timestamp",
    case_sensitive=False,
)


def mailgun_body(key: str, ts: int, token: str = "a" * 50, event_id: str = "mg-evt-1") -> bytes:
    sig = _hex(key, b"%d" % ts + token.encode())
    doc = {
        "signature": {"timestamp": str(ts), "token": token, "signature": sig},
        "event-data": {"id": event_id, "event": "delivered"},
    }
    return json.dumps(doc).encode()


def _mailgun(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        return mailgun_body(secrets[which], ts), {"Content-Type": "application/json"}

    return sign


MAILGUN = Case(
    "mailgun",
    "mg-good",
    "mg-other",
    _mailgun(S("mg-good", "mg-other")),
    None,
    window=8 * 3600 + 30 * 60,  # Mailgun's retries for 8 h carry the first attempt's signature
    json_body=False,
    tamper=lambda body: body.replace(b"aaaa", b"aaab", 1),
)


def _sendgrid(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
    key = EC_GOOD if which == "good" else EC_OTHER
    sig = b64(key.sign(b"%d" % ts + body, ec.ECDSA(hashes.SHA256())))
    return body, {
        "X-Twilio-Email-Event-Webhook-Signature": sig,
        "X-Twilio-Email-Event-Webhook-Timestamp": str(ts),
    }


SENDGRID = Case(
    "sendgrid",
    ec_public_b64(EC_GOOD),
    ec_public_b64(EC_OTHER),
    _sendgrid,
    "x-twilio-email-event-webhook-signature",
    ts_header="x-twilio-email-event-webhook-timestamp",
    body=b'[{"email":"a@b.c","event":"delivered","sg_event_id":"sg1"}]\r\n',
)


def _pagerduty(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        return body, {"X-PagerDuty-Signature": "v1=" + _hex(secrets[which], body), "X-Webhook-Id": "pd-1"}

    return sign


PAGERDUTY = Case(
    "pagerduty",
    "pd-good",
    "pd-other",
    _pagerduty(S("pd-good", "pd-other")),
    "x-pagerduty-signature",
    prefix="v1=",
    list_bad_good=_bad_first(",", "v1=" + "0" * 64),
)

TYPEFORM = Case(
    "typeform",
    "tf-good",
    "tf-other",
    _kv(S("tf-good", "tf-other"), "Typeform-Signature", lambda k, b, t: "sha256=" + b64(mac(k, b))),
    "typeform-signature",
    prefix="sha256=",
)

CALENDLY = Case(
    "calendly",
    "cal-good",
    "cal-other",
    _kv(
        S("cal-good", "cal-other"),
        "Calendly-Webhook-Signature",
        lambda k, b, t: f"t={t},v1={_hex(k, b'%d.' % t + b)}",
    ),
    "calendly-webhook-signature",
    prefix="v1=",
    window=180,
    list_bad_good=lambda v: v.replace(",v1=", ",v1=" + "0" * 64 + ",v1="),
)

X = Case(
    "x",
    "x-good",
    "x-other",
    _kv(S("x-good", "x-other"), "x-twitter-webhooks-signature", lambda k, b, t: "sha256=" + b64(mac(k, b))),
    "x-twitter-webhooks-signature",
    prefix="sha256=",
)

GENERIC_SPEC = {
    "sig_name": "x-acme-signature",
    "prefix": "sha512=",
    "digest": "sha512",
    "encoding": "base64url",
    "template": "{method} {url}\n{ts}.{body}",
    "ts_source": "header:x-acme-timestamp",
    "tolerance_s": 120,
    "tolerance_mode": "both",
    "dedup_id": ["json:id"],
}


def _generic(secrets: dict[str, str]) -> Signer:
    def sign(which: str, body: bytes, ts: int) -> tuple[bytes, dict[str, str]]:
        msg = b"POST " + URL.encode() + b"\n%d." % ts + body
        sig = base64.urlsafe_b64encode(mac(secrets[which], msg, "sha512")).rstrip(b"=").decode()
        return body, {"x-acme-signature": "sha512=" + sig, "x-acme-timestamp": str(ts)}

    return sign


GENERIC = Case(
    "hmac",
    "acme-good",
    "acme-other",
    _generic(S("acme-good", "acme-other")),
    "x-acme-signature",
    prefix="sha512=",
    window=120,
    ts_header="x-acme-timestamp",
    signature=GENERIC_SPEC,
)

CASES: dict[str, Case] = {
    "stripe": STRIPE,
    "github": GITHUB,
    "shopify": SHOPIFY,
    "slack": SLACK,
    "standardwebhooks": STANDARD,
    "svix": SVIX,
    "standardwebhooks-v1a": V1A,
    "twilio": TWILIO,
    "workos": WORKOS,
    "paddle": PADDLE,
    "linear": LINEAR,
    "zoom": ZOOM,
    "intercom": INTERCOM,
    "square": SQUARE,
    "hubspot": HUBSPOT,
    "discord": DISCORD,
    "mailgun": MAILGUN,
    "sendgrid": SENDGRID,
    "pagerduty": PAGERDUTY,
    "typeform": TYPEFORM,
    "calendly": CALENDLY,
    "x": X,
    "hmac": GENERIC,
}
