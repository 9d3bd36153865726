"""The provider interface: pure functions of (method, body, headers, url, now, secrets).

A provider module does no I/O and needs no event loop. The ingress builds one `Verifier` per route at config
load (so bad keys fail at load, not per request) and calls it for every inbound request on that route.

    verifier = build_verifier("stripe", secrets=("whsec_…",), tolerance=300.0)
    verified = verifier.verify(Inbound(method="POST", body=raw, headers=headers, url=public_url, now=time.time()))

`verify` returns a `Verified` or raises a `VerificationError` (→ 401 invalid_signature) or a `TimestampError`
(→ 401 timestamp_out_of_tolerance). It must never raise anything else for any input a client can send: hostile
headers and bodies are a 401, not a 500.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from multidict import CIMultiDictProxy, MultiMapping


@dataclass(frozen=True, slots=True)
class Inbound:
    """One inbound request as the verifier sees it.

    `headers` is a case-insensitive multi-map (aiohttp's `request.headers`; tests use `CIMultiDict`), so a verifier
    can see repeated headers (`headers.getall(name, [])`) and reject them. `url` is the public URL the provider
    called (route `public_url`, or rebuilt from X-Forwarded-Proto/Host + path + query), used by the schemes that sign
    the URL. `now` is unix seconds.
    """

    method: str
    body: bytes
    headers: MultiMapping[str] | CIMultiDictProxy[str]
    url: str
    now: float


@dataclass(frozen=True, slots=True)
class Handshake:
    """A provider handshake (Slack url_verification, Zoom endpoint.url_validation, Discord PING, X CRC, …).

    `status`, `content_type` and `body` are the answer the sidecar gives when the route's handshake mode is
    `answer`. A handshake is never claimed, deduplicated, queued or retried.
    """

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    # False: answered by the sidecar in `pass` mode too (an unsigned request with more in it than the handshake
    # needs: nothing of it is for the upstream)
    relay: bool = True


# The longest event id taken as is (a key part, a header value, an admin URL segment).
MAX_EVENT_ID_LEN = 256


def usable_id(value: str) -> bool:
    """Is `value` fit to be an event id as is: printable ASCII, 1 to MAX_EVENT_ID_LEN characters."""
    return 0 < len(value) <= MAX_EVENT_ID_LEN and value.isascii() and value.isprintable()


def stored_id(value: str) -> str:
    """A provider's event id as the sidecar keys it: as is when `usable_id`, else (non-ASCII, a control character,
    too long) a stand-in digest, the same for every resend so they are still duplicates. Such an event was
    refused 400 no_event_id, and its provider's every resend with it: never delivered."""
    if usable_id(value):
        return value
    return "id-sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Verified:
    """What a successful verification yields.

    event_id:   the provider's stable event id for `event_id: auto`; for a payload kind that carries none by
                design (a Slack slash command, a Discord Webhook Event, a HubSpot batch, …) the digest of the signed
                bytes; None when a payload that should carry one does not (the ingress answers 400 no_event_id).
    id_signed:  True when event_id is covered by the signature (Stripe body `id`, svix-id, …). False for header ids
                (X-GitHub-Delivery, X-Shopify-Event-Id, Linear-Delivery, X-Webhook-Id, …): the ingress then dedupes on
                the digest of the signed bytes so that a replay under another id can neither block nor duplicate.
    event_type: the provider's event type for the route's `types` allow-list (Stripe `type`, GitHub
                `X-GitHub-Event`, Shopify topic, svix body `type`, …), or None.
    handshake:  set when this request is a provider handshake; the ingress answers it (or passes it through).
    signed_headers: lowercase names of headers covered by the signature (svix: webhook-id), so an event id taken
                from one of them by `event_id: {header: …}` also counts as signed.
    """

    event_id: str | None = None
    id_signed: bool = True
    event_type: str | None = None
    handshake: Handshake | None = None
    signed_headers: frozenset[str] = field(default_factory=frozenset)
    # A single-use value the signature covers where the body is not signed (Mailgun's token): the ingress refuses
    # it a second time with another body, so a captured signature cannot carry a forged payload.
    nonce: str | None = None
    # How long the nonce's timestamp passes the freshness check (the verifier's tolerance, seconds, either way);
    # None: no freshness check, so the nonce is bound for the whole dedupe window.
    nonce_window: float | None = None
    # The digest of what was signed, where that is not the body's bytes (Twilio signs the URL and the decoded,
    # sorted parameters: reordered or re-encoded, the same request has another body but the same signed string).
    # What an unsigned id dedupes on, in place of the body's digest. None: the body's digest is right.
    signed_digest: str | None = None
    # A signed id found beside an unsigned one (Linear's composite of body fields beside its Linear-Delivery header):
    # what the unsigned id dedupes on, before any digest. Linear re-signs each attempt with a new webhookTimestamp,
    # so the body's digest changes between a delivery and its retry while this stays.
    signed_id: str | None = None


class VerificationError(Exception):
    """The signature is missing, malformed or matches no configured secret. → 401 invalid_signature.

    `reason` is a short machine label for metrics (`missing`, `malformed`, `mismatch`, `duplicate_header`, …);
    `detail` is a human sentence for the 401 body. Neither ever contains a secret or the expected signature.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TimestampError(VerificationError):
    """The signed timestamp is outside the route's tolerance. → 401 timestamp_out_of_tolerance."""

    def __init__(self, detail: str) -> None:
        super().__init__("timestamp", detail)


class ProviderConfigError(ValueError):
    """A route's provider settings are unusable (unknown provider, undecodable key, missing public_url, …).

    Raised by `build_verifier` at config load; the message names the problem but never the secret. `problems`:
    each problem found (a `signature:` spec reports every bad field at once), each starting with its key.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Verifier(Protocol):
    # Read-only properties: a plain class attribute, an instance attribute or a property all provide them.

    @property
    def reports_types(self) -> bool:
        """Whether `Verified.event_type` can be set: a route's `types:` allow-list on a verifier that never reports
        a type would filter every event (200, never forwarded)."""
        ...

    @property
    def checks_time(self) -> bool:
        """Whether the signature carries a timestamp the route's `tolerance` bounds; set on a verifier without one,
        the key has no effect (no replay window at all), which an operator who wrote it would not expect."""
        ...

    def verify(self, req: Inbound) -> Verified:
        """Verify a POST (or other signed method). Raises VerificationError / TimestampError."""
        ...

    def unsigned_handshake(self, req: Inbound) -> Handshake | None:
        """Answer for the unsigned handshakes that bypass verification (Slack ssl_check, X CRC GET), else None.

        Called before `verify`, for every method.
        """
        ...


def build_verifier(
    provider: str,
    secrets: Sequence[str],
    tolerance: float | None = None,
    signature: Mapping[str, Any] | None = None,
) -> Verifier:
    """Build the verifier for one route. Implemented in `sidecar.providers.registry`; re-exported here."""
    from sidecar.providers.registry import build_verifier as _build

    return _build(provider, secrets, tolerance, signature)
