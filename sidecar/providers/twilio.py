"""Twilio (providers.md §8): HMAC over the URL plus the sorted, decoded form parameters; a custom hook.

    form POST:  base64(HMAC(token, url + "".join(name + value for sorted names, sorted(set(values)))))
    JSON POST:  Twilio appends `bodySHA256=<hex sha256(body)>` to the URL and signs the URL alone; the body hash is
                checked too.

Like twilio-python's `RequestValidator.validate`, the URL is tried with and without the default port (Twilio's own
signing is inconsistent), using the same `urlparse`/`geturl` round trip. `X-Twilio-Webhooks-Signature-Settings:
key=…,algorithm=HMAC_SHA256` selects HMAC-SHA256 (SharedKey signing); every configured secret (Auth Tokens and
SharedKey secrets alike) is tried. The URL is `Inbound.url`: the route's public URL, exactly as configured at Twilio.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from urllib.parse import ParseResult, urlparse

from sidecar.providers.base import Handshake, Inbound, VerificationError, Verified
from sidecar.providers.request import Request, ascii_bytes, utf8_bytes

_ALGORITHMS = {"HMAC_SHA1": "sha1", "HMAC_SHA256": "sha256"}


def algorithm(settings: str | None) -> str:
    """The hash named by the signature-settings header; absent or without `algorithm=` means legacy HMAC-SHA1."""
    for part in (settings or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            digest = _ALGORITHMS.get(value.strip().upper())
            if digest is None:
                raise VerificationError("malformed", "unsupported signature algorithm")
            return digest
    return "sha1"


def url_variants(url: str) -> list[str]:
    """The URL with the default port added and with any port removed, as the SDK builds them; plus the same
    without a `#fragment` when one was configured (whether Twilio signs the fragment is UNCONFIRMED)."""
    try:
        parsed = urlparse(url)
        variants = [_without_port(parsed), _with_port(parsed)]
    except ValueError:  # an unparsable port
        raise VerificationError("malformed", "the public URL is not a valid URL") from None
    if parsed.fragment:
        variants += url_variants(parsed._replace(fragment="").geturl())
    return variants


def _without_port(uri: ParseResult) -> str:
    if not uri.port:
        return uri.geturl()
    return uri._replace(netloc=uri.netloc.split(":")[0]).geturl()


def _with_port(uri: ParseResult) -> str:
    if uri.port:
        return uri.geturl()
    return uri._replace(netloc=f"{uri.netloc}:{443 if uri.scheme == 'https' else 80}").geturl()


def param_string(pairs: Sequence[tuple[str, str]]) -> str:
    """Names in code-point order; each name's distinct values sorted, concatenated without separators."""
    values: dict[str, set[str]] = {}
    for name, value in pairs:
        values.setdefault(name, set()).add(value)
    return "".join(name + value for name in sorted(values) for value in sorted(values[name]))


class TwilioVerifier:
    reports_types = False  # a form post or JSON with no event type of Twilio's own
    checks_time = False  # the signature covers the URL and the parameters, no time

    def __init__(self, secrets: Sequence[str]) -> None:
        self._keys = tuple(s.encode("utf-8") for s in secrets)

    def __repr__(self) -> str:
        return f"TwilioVerifier({len(self._keys)} key(s))"

    def unsigned_handshake(self, req: Inbound) -> Handshake | None:
        return None

    def verify(self, inbound: Inbound) -> Verified:
        req = Request(inbound)
        header = req.header("x-twilio-signature")
        if not header:
            raise VerificationError("missing", "no X-Twilio-Signature header")
        signature = ascii_bytes(header, "X-Twilio-Signature")
        digest = algorithm(req.header("x-twilio-webhooks-signature-settings"))
        suffix = self._signed_params(req)
        messages = [utf8_bytes(url + suffix, "the URL or a form value") for url in url_variants(inbound.url)]
        signed = next(
            (m for m in messages for key in self._keys if self._matches(key, m, digest, signature)), None
        )
        if signed is None:
            raise VerificationError("mismatch", "no signature matches a configured secret")
        # The signed string is the delivery's identity, not the body: a form body reordered or re-encoded still
        # verifies (Twilio signs the decoded, sorted parameters). A JSON body is pinned by bodySHA256 in the URL.
        signed_digest = hashlib.sha256(signed).hexdigest()
        # Deduped on that digest with or without the (unsigned) idempotency token: keyed by the bare digest without
        # one, the same captured request sent again with a token added or taken away was a second delivery (an
        # audit); the id shown is the token when there is one.
        token = req.header("i-twilio-idempotency-token")
        return Verified(event_id=token or signed_digest, id_signed=False, signed_digest=signed_digest)

    @staticmethod
    def _matches(key: bytes, message: bytes, digest: str, signature: bytes) -> bool:
        return hmac.compare_digest(base64.b64encode(hmac.new(key, message, digest).digest()), signature)

    @staticmethod
    def _signed_params(req: Request) -> str:
        """ "" for the JSON variant (after checking `bodySHA256`) and for non-form requests; else the form params."""
        hashes = req.query().get("bodySHA256")
        if hashes is not None:
            req.require_utf8()  # the SDK hashes body.encode("utf-8") of the decoded text
            expected = hashlib.sha256(req.body).hexdigest().encode()
            if not hmac.compare_digest(expected, ascii_bytes(hashes[0], "bodySHA256")):
                raise VerificationError("mismatch", "the body does not match bodySHA256")
            return ""
        if req.inbound.method.upper() == "POST" and req.is_form():
            return param_string(req.form_pairs())
        if req.inbound.method.upper() == "POST" and req.body:
            # the signature would cover the URL alone: a URL-only signature captured elsewhere (a GET webhook, an
            # empty form) would carry any body (a security audit). Twilio signs a form's fields, and pins a JSON
            # body with bodySHA256.
            raise VerificationError(
                "malformed", "a POST body that is not a form needs bodySHA256 in the URL: nothing signs it"
            )
        return ""


def build(secrets: Sequence[str], tolerance: float | None) -> TwilioVerifier:
    return TwilioVerifier(secrets)
