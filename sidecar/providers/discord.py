"""Discord interactions and Webhook Events (providers.md §10): Ed25519 over `{X-Signature-Timestamp}{body}`.

The "secrets" are the application's public keys (64 hex chars); several may be configured. Discord's SDK checks
no freshness, so none is checked unless the route sets `tolerance` (then: past only, as §10 suggests). Discord
sends deliberately bad signatures to test the endpoint: every failure is a `VerificationError` → 401.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.providers.crypto import Ed25519Key, ed25519_public, hex_secret
from sidecar.providers.engine import SpecVerifier
from sidecar.providers.spec import SigSpec

SPEC = SigSpec(
    sig_name="x-signature-ed25519",
    scheme="ed25519",
    encoding="hex",
    key_decoding="hex",
    template="{ts}{body}",
    ts_source="header:x-signature-timestamp",
    tolerance_s=None,
    tolerance_mode="past_only",
    dedup_id=("json:id", "body_sha256"),  # interactions have an id; Webhook Events none
    event_type=("json:event.type",),
    handshake="discord",  # interactions PING type 1 → {"type":1}; Webhook Events PING type 0 → 204
)


def build(secrets: Sequence[str], tolerance: float | None) -> SpecVerifier:
    keys = tuple(
        Ed25519Key(ed25519_public(hex_secret(s, f"secrets[{i}]"), f"secrets[{i}]"), "hex")
        for i, s in enumerate(secrets)
    )
    return SpecVerifier(SPEC, keys, tolerance)
