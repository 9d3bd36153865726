"""Mailgun (providers.md §16): the signature lives in the body and signs only `{timestamp}{token}`.

JSON webhooks carry `{"signature": {"timestamp", "token", "signature"[, "parent-signature"]}, "event-data": …}`;
legacy form posts carry `timestamp`, `token`, `signature` fields. `parent-signature` (subaccount events, signed
with the primary account's key) is accepted as a second candidate. Because the body is not signed, the event id
(`event-data.id`) is reported as unsigned, so the ingress dedupes on the body digest as well; and the token is
single-use (`Verified.nonce`): the ingress binds it to the body it first came with, for as long as the freshness
window lets its timestamp pass, so a captured signature cannot carry another payload.

The window (`TOLERANCE_S`, both ways) covers Mailgun's retries, 8 hours of them (documentation.mailgun.com,
"Webhooks": 5/10/15 min, 1/2/4 h), because a retry carries the signature block of the first attempt (reported by
Hookdeck's Mailgun reference and PostHog; Mailgun names no window of its own). With 300 s every retry was refused
401 as stale, and an event whose first attempt failed (a 503 while the store was down) was never accepted. A
replay inside the window is no risk: its token is bound to its body, so it is a duplicate or refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.providers.engine import SpecVerifier, Switch
from sidecar.providers.spec import SigSpec
from sidecar.providers.table import hmac_keys

TOLERANCE_S = 8 * 3600 + 30 * 60

JSON_SPEC = SigSpec(
    sig_location="json_body",
    sig_name="signature.signature",
    extra_sig_names=("signature.parent-signature",),
    template="{ts}{token}",
    token_source="json:signature.token",
    ts_source="json:signature.timestamp",
    tolerance_s=TOLERANCE_S,
    tolerance_mode="both",
    dedup_id=("json:event-data.id",),
    event_type=("json:event-data.event",),
)
FORM_SPEC = SigSpec(
    sig_location="form_body",
    sig_name="signature",
    template="{ts}{token}",
    token_source="form:token",
    ts_source="form:timestamp",
    tolerance_s=TOLERANCE_S,
    tolerance_mode="both",
    dedup_id=("body_sha256",),  # legacy form posts carry no event id
)


def build(secrets: Sequence[str], tolerance: float | None) -> Switch:
    window = JSON_SPEC.tolerance_s if tolerance is None else tolerance
    return Switch(
        lambda req: 1 if req.is_form() else 0,
        (
            SpecVerifier(JSON_SPEC, hmac_keys(JSON_SPEC, secrets), window),
            SpecVerifier(FORM_SPEC, hmac_keys(FORM_SPEC, secrets), window),
        ),
    )
