"""SendGrid Event Webhook (providers.md §17): ECDSA P-256/SHA-256 over `{timestamp}{body}`, DER signature in base64.

The "secret" is the verification public key (base64 DER SubjectPublicKeyInfo, `MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD…`).
The body is a batch (a JSON array) whose trailing CRLF is signed. Per-element dedupe (`sg_event_id`) is the
upstream's: `event_id: auto` is the batch's, from its elements' ids (the digest of the signed bytes if one has
none); the SDK checks no freshness, so none unless the route sets `tolerance`.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.providers.crypto import EcdsaKey, p256_public
from sidecar.providers.engine import SpecVerifier
from sidecar.providers.spec import SigSpec

SPEC = SigSpec(
    sig_name="x-twilio-email-event-webhook-signature",
    scheme="ecdsa_p256_sha256",
    encoding="base64",
    key_decoding="strip_prefix_then_base64",
    template="{ts}{body}",
    ts_source="header:x-twilio-email-event-webhook-timestamp",
    tolerance_s=None,
    tolerance_mode="past_only",
    dedup_id=("json[]:sg_event_id", "body_sha256"),  # a batch, known by its elements' ids
)


def build(secrets: Sequence[str], tolerance: float | None) -> SpecVerifier:
    keys = tuple(EcdsaKey(p256_public(s, f"secrets[{i}]")) for i, s in enumerate(secrets))
    return SpecVerifier(SPEC, keys, tolerance)
