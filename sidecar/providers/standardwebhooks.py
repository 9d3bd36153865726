"""Standard Webhooks, and Svix, Clerk and Resend which send it as svix-* headers (providers.md §5 to §7).

Signed string `{id}.{timestamp}.{body}`; `webhook-signature` is a space-separated list of `v1,<base64>` entries.
Each `svix-*` header wins over its `webhook-*` twin when both are present, as in the svix SDK. Secrets:
`whsec_<base64>` (HMAC-SHA256, `v1` entries) or `whpk_<base64 of the raw 32-byte Ed25519 public key>` (`v1a`
entries; the key encoding is UNCONFIRMED in §5). Both kinds may be configured on one route.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.providers.base import ProviderConfigError
from sidecar.providers.crypto import Ed25519Key, HmacKey, Key, b64_secret, ed25519_public
from sidecar.providers.engine import SpecVerifier
from sidecar.providers.spec import SigSpec

SPEC = SigSpec(
    sig_name="webhook-signature",
    sig_format="versioned_list",
    accepted_versions=("v1", "v1a"),
    encoding="base64",
    compare_on="decoded",
    key_decoding="strip_prefix_then_base64",
    key_prefix="whsec_",
    template="{id}.{ts}.{body}",
    ts_source="header:webhook-timestamp",
    ts_render="int",
    tolerance_s=300,
    tolerance_mode="both",
    check_ts_before_sig=True,
    id_header="webhook-id",
    dedup_id=("header:webhook-id",),
    event_type=("json:type",),
    header_aliases=(
        ("webhook-signature", "svix-signature"),
        ("webhook-timestamp", "svix-timestamp"),
        ("webhook-id", "svix-id"),
    ),
    require_utf8=True,
)
_V1 = frozenset({"v1"})
_V1A = frozenset({"v1a"})


def key(secret: str, where: str) -> Key:
    if secret.startswith("whsk_"):
        raise ProviderConfigError(f"{where}: is a whsk_ private key; configure the whpk_ public key")
    if secret.startswith("whpk_"):
        return Ed25519Key(ed25519_public(b64_secret(secret, "whpk_", where), where), "base64", _V1A)
    raw = b64_secret(secret, "whsec_", where)
    if not 24 <= len(raw) <= 64:
        raise ProviderConfigError(f"{where}: a whsec_ key must decode to 24 to 64 bytes, got {len(raw)}")
    return HmacKey(raw, "sha256", "base64", "decoded", _V1)


def build(secrets: Sequence[str], tolerance: float | None) -> SpecVerifier:
    keys = tuple(key(s, f"secrets[{i}]") for i, s in enumerate(secrets))
    return SpecVerifier(SPEC, keys, SPEC.tolerance_s if tolerance is None else tolerance)
