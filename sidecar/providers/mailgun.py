"""Mailgun (providers.md §16): the signature lives in the body and signs only `{timestamp}{token}`.

JSON webhooks carry `{"signature": {"timestamp", "token", "signature"[, "parent-signature"]}, "event-data": …}`;
legacy form posts carry `timestamp`, `token`, `signature` fields. `parent-signature` (subaccount events, signed
with the primary account's key) is accepted as a second candidate. Because the body is not signed, the event id
(`event-data.id`) is reported as unsigned, so the ingress dedupes on the body digest as well; and the token is
single-use (`Verified.nonce`): the ingress binds it to the body it first came with, for as long as the freshness
window (300 s both ways: Mailgun names none) lets its timestamp pass, so a captured signature cannot carry
another payload.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.providers.engine import SpecVerifier, Switch
from sidecar.providers.spec import SigSpec
from sidecar.providers.table import hmac_keys

JSON_SPEC = SigSpec(
    sig_location="json_body",
    sig_name="signature.signature",
    extra_sig_names=("signature.parent-signature",),
    template="{ts}{token}",
    token_source="json:signature.token",
    ts_source="json:signature.timestamp",
    tolerance_s=300,
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
    tolerance_s=300,
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
