"""HubSpot signature v3 (providers.md §18): the §23 engine plus HubSpot's URL rewriting and timestamp rule.

Signed string: `{METHOD}{URL}{body}{X-HubSpot-Request-Timestamp}`, HMAC-SHA256, base64. The URL is the one HubSpot
called (the route's public URL) with a handful of percent-escapes decoded first, per HubSpot's docs (§18 lists
them; HubSpot's "Validate the v3 request signature" page has the same table), or the URL as sent: HubSpot's own
Python SDK decodes nothing and accepts that (an external check with hubspot-api-client 12.0.0), and both forms
stand for the same request, so a signature over either is accepted. Legacy v1/v2 signatures (a plain SHA-256 with
no timestamp) are not accepted: HubSpot sends v3 alongside them, and accepting them would allow replay forever.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sidecar.providers.engine import SpecVerifier
from sidecar.providers.spec import SigSpec
from sidecar.providers.table import hmac_keys

_DECODED = {"3a": ":", "2f": "/", "3f": "?", "40": "@", "21": "!", "24": "$", "27": "'", "28": "(", "29": ")"}
_DECODED |= {"2a": "*", "2c": ",", "3b": ";"}
_ESCAPE = re.compile("%(" + "|".join(_DECODED) + ")", re.IGNORECASE)


def signed_url(url: str) -> str:
    """Decode exactly the escapes HubSpot decodes before signing; every other escape stays as sent."""
    return _ESCAPE.sub(lambda m: _DECODED[m.group(1).lower()], url)


def fresh(ts_ms: int, now: float, tolerance: float) -> bool:
    """The SDK's rule: accepted while `now - floor(ts_ms / 1000) < tolerance`; a future timestamp passes."""
    return now - ts_ms // 1000 < tolerance


SPEC = SigSpec(
    sig_name="x-hubspot-signature-v3",
    encoding="base64",
    template="{method}{url}{body}{ts}",
    ts_source="header:x-hubspot-request-timestamp",
    ts_unit="ms",
    tolerance_s=300,
    tolerance_mode="past_only",
    check_ts_before_sig=True,
    # a batch, known by its elements' ids (a resend counts attemptNumber up, so its bytes differ)
    # per notification (appId, portalId, subscriptionId, eventId): HubSpot does not promise eventId alone is unique
    dedup_id=("json[]:?appId,?portalId,?subscriptionId,eventId", "body_sha256"),
    url_transform=signed_url,
    ts_window=fresh,
)


def build(secrets: Sequence[str], tolerance: float | None) -> SpecVerifier:
    return SpecVerifier(SPEC, hmac_keys(SPEC, secrets), SPEC.tolerance_s if tolerance is None else tolerance)
