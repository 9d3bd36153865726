"""Provider handshakes (providers.md §24): recognise one and compute the answer the provider expects.

Signed handshakes (Slack url_verification, Discord PING, Zoom endpoint.url_validation) are recognised only after
the signature has passed, and get the key that verified them. Unsigned ones (Slack ssl_check, X CRC GET) are
recognised before any verification and must never raise: anything odd is simply "not a handshake".
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

from sidecar.providers.base import Handshake, VerificationError
from sidecar.providers.crypto import HmacKey, Key
from sidecar.providers.request import Request

SignedHandshake = Callable[[Request, Key], Handshake | None]
UnsignedHandshake = Callable[[Request, tuple[Key, ...]], Handshake | None]


def _json_answer(payload: dict[str, Any], status: int = 200) -> Handshake:
    return Handshake(status=status, body=json.dumps(payload, separators=(",", ":")).encode())


def slack_url_verification(req: Request, key: Key) -> Handshake | None:
    """Events API `url_verification`: answer `{"challenge": …}` as JSON, as Bolt does."""
    body = req.json()
    if isinstance(body, dict) and body.get("type") == "url_verification":
        challenge = body.get("challenge")
        if isinstance(challenge, str):
            return _json_answer({"challenge": challenge})
    return None


def _discord_type(req: Request) -> tuple[int | None, bool]:
    body = req.json()
    if not isinstance(body, dict):
        return None, False
    kind = body.get("type")
    return (kind if isinstance(kind, int) and not isinstance(kind, bool) else None), "event" in body


def discord_interactions(req: Request, key: Key) -> Handshake | None:
    """Interactions PING (type 1) → 200 `{"type":1}` (PONG)."""
    kind, has_event = _discord_type(req)
    return _json_answer({"type": 1}) if kind == 1 and not has_event else None


def discord_events(req: Request, key: Key) -> Handshake | None:
    """Webhook Events PING (type 0) → 204, empty body."""
    kind, _ = _discord_type(req)
    return Handshake(status=204, body=b"") if kind == 0 else None


def discord(req: Request, key: Key) -> Handshake | None:
    """One endpoint for both kinds. Type 1 means PING for interactions but "event" for Webhook Events; only the
    latter carries an `event` object, which is how the two are told apart."""
    return discord_events(req, key) or discord_interactions(req, key)


def zoom_url_validation(req: Request, key: Key) -> Handshake | None:
    """`endpoint.url_validation` → `{"plainToken": p, "encryptedToken": hex(HMAC-SHA256(secret, p))}`, computed
    with the secret that verified the request."""
    body = req.json()
    if not isinstance(body, dict) or body.get("event") != "endpoint.url_validation":
        return None
    payload = body.get("payload")
    token = payload.get("plainToken") if isinstance(payload, dict) else None
    if not isinstance(token, str) or not isinstance(key, HmacKey):
        raise VerificationError("malformed", "endpoint.url_validation without a string payload.plainToken")
    encrypted = HmacKey(key.material).sign(token.encode("utf-8", "surrogatepass")).hex()
    return _json_answer({"plainToken": token, "encryptedToken": encrypted})


SSL_CHECK_MAX = 4096


def slack_ssl_check(req: Request, keys: tuple[Key, ...]) -> Handshake | None:
    """A slash-command URL's `ssl_check=1` form POST: Bolt answers 200 with an empty body and verifies nothing."""
    inbound = req.inbound
    # Slack's is `ssl_check=1&token=…`: a large form is no ssl_check (and is not parsed before its signature)
    if (
        inbound.method.upper() != "POST"
        or len(inbound.body) > SSL_CHECK_MAX
        or b"ssl_check" not in inbound.body
        or not req.is_form()
    ):
        return None
    form = req.form()
    if form.get("ssl_check") != ["1"]:
        return None
    # Bolt looks at ssl_check alone: one with more fields (team_id, …) was refused 401 here. It is answered all
    # the same, but never relayed (`handshake: pass`): its other fields are unsigned.
    return Handshake(
        status=200, body=b"", content_type="text/plain", relay=set(form) <= {"ssl_check", "token"}
    )


# The CRC answer is HMAC-SHA256(consumer secret, token), base64: exactly a POST's x-twitter-webhooks-signature over
# a body equal to the token. Answered for any text, it signed any event body for anyone (a security audit: a GET
# with a JSON event as its crc_token, then that event POSTed with the answer, was forwarded as verified). X's
# tokens are short and made of few characters (a UUID, base64 or base64url, a `+` decoded to a space): only those
# are answered. None of `{`, `[`, `"`, `:`, `*` or `#`, so no JSON document, not even to a lenient parser (Ruby's
# JSON.parse takes `/**/{…}`, YAML `--- {…}`); and no bare JSON number, true, false or null.
MAX_CRC_TOKEN = 512
_CRC_TOKEN = re.compile(r"[A-Za-z0-9+/=_.~! -]+")


def _crc_token_problem(token: str) -> str | None:
    if not 0 < len(token) <= MAX_CRC_TOKEN:
        return f"crc_token must be 1 to {MAX_CRC_TOKEN} characters"
    if not _CRC_TOKEN.fullmatch(token) or _is_json(token):
        return "crc_token must be letters, digits, spaces and + / = _ . ~ ! -, and no JSON document"
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def x_crc(req: Request, keys: tuple[Key, ...]) -> Handshake | None:
    """X (Twitter) CRC: a GET with `crc_token` → `{"response_token": "sha256=" + base64(HMAC-SHA256(secret, t))}`.
    The first configured secret (the current consumer secret) answers. A token that could be an event body, or
    more than one, is refused (400 `bad_crc_token`), not signed."""
    if req.inbound.method.upper() != "GET" or not keys or not isinstance(keys[0], HmacKey):
        return None
    tokens = req.query().get("crc_token")
    if not tokens:
        return None
    problem = "crc_token given more than once" if len(tokens) != 1 else _crc_token_problem(tokens[0])
    if problem is not None:
        return _json_answer({"error": "bad_crc_token", "detail": problem}, status=400)
    mac = HmacKey(keys[0].material).sign(tokens[0].encode("ascii"))
    return _json_answer({"response_token": "sha256=" + base64.b64encode(mac).decode()})


# providers.md §24: test and ping notifications "just 2xx after verification", never claimed or queued (a GitHub
# hook's first delivery, Intercom's test button, PagerDuty's ping were stored, forwarded and, with the receiver
# failing, retried and dead-lettered like events; a resend was answered `duplicate`).
PING = Handshake(status=200, body=b'{"ping": true}')


def github_ping(req: Request, key: Key) -> Handshake | None:
    """`X-GitHub-Event: ping`, sent when a hook is created."""
    return PING if req.header("x-github-event") == "ping" else None


def intercom_ping(req: Request, key: Key) -> Handshake | None:
    """The Developer Hub's test button: a notification with `"topic": "ping"`."""
    body = req.json()
    return PING if isinstance(body, dict) and body.get("topic") == "ping" else None


def pagerduty_ping(req: Request, key: Key) -> Handshake | None:
    """The UI's test event: `event.event_type` `pagey.ping` (the name is UNCONFIRMED in providers.md §19)."""
    body = req.json()
    event = body.get("event") if isinstance(body, dict) else None
    return PING if isinstance(event, dict) and event.get("event_type") == "pagey.ping" else None


SIGNED: dict[str, SignedHandshake] = {
    "github_ping": github_ping,
    "intercom_ping": intercom_ping,
    "pagerduty_ping": pagerduty_ping,
    "slack": slack_url_verification,
    "discord_interactions": discord_interactions,
    "discord_events": discord_events,
    "discord": discord,
    "zoom": zoom_url_validation,
}
UNSIGNED: dict[str, UnsignedHandshake] = {
    "slack": slack_ssl_check,
    "x_crc": x_crc,
}
