"""Provider name → `Verifier`, built once per route at config load (so a bad key fails the load, not a request).

    build_verifier("stripe", ["whsec_…"], tolerance=None)           # None: the provider SDK's default window
    build_verifier("hmac", ["s3cret"], 300, {"sig_name": "x-sig", "dedup_id": ["json:id"]})   # providers.md §23.1
    build_verifier("none", [], None)                                # explicitly unverified

Most providers are a `SigSpec` row run by the generic engine (`table`); the ones that are not get a module each
(`twilio`, `hubspot`, `mailgun`, `discord`, `sendgrid`, `standardwebhooks`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from sidecar.providers import discord, hubspot, mailgun, sendgrid, standardwebhooks, table, twilio
from sidecar.providers.base import (
    Handshake,
    Inbound,
    ProviderConfigError,
    VerificationError,
    Verified,
    Verifier,
)
from sidecar.providers.crypto import (
    EcdsaKey,
    Ed25519Key,
    HmacKey,
    Key,
    ed25519_public,
    p256_public,
    secret_bytes,
)
from sidecar.providers.engine import SpecVerifier
from sidecar.providers.spec import SigSpec, spec_from_mapping

log = logging.getLogger("sidecar.providers")

Builder = Callable[[Sequence[str], "float | None"], Verifier]


class Guarded:
    """The boundary every verifier sits behind: whatever a client sends, `verify` ends in a `Verified` or a
    `VerificationError` (→ 401), never another exception (→ 500), and `unsigned_handshake` never raises at all.
    An exception reaching this point is a bug; it is reported with reason `internal` so it shows in the metrics."""

    __slots__ = ("inner",)

    def __init__(self, inner: Verifier) -> None:
        self.inner = inner

    @property
    def reports_types(self) -> bool:
        return self.inner.reports_types

    @property
    def checks_time(self) -> bool:
        return self.inner.checks_time

    def __repr__(self) -> str:
        return f"Guarded({self.inner!r})"

    def verify(self, req: Inbound) -> Verified:
        try:
            return self.inner.verify(req)
        except VerificationError:
            raise
        except Exception as exc:
            # Not the exception's text nor its traceback: either may quote the request's bytes.
            log.warning("%r: %s at %s turned into a 401", self.inner, type(exc).__name__, _where(exc))
            raise VerificationError("internal", f"unverifiable request ({type(exc).__name__})") from None

    def unsigned_handshake(self, req: Inbound) -> Handshake | None:
        try:
            return self.inner.unsigned_handshake(req)
        except Exception:
            return None


def _where(exc: BaseException) -> str:
    """`file.py:line` of the innermost frame that raised `exc`."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


class Unverified:
    """Provider `none`: nothing is checked and no id is known; `event_id: auto` is the body's digest (taken by the
    ingress only then: a route with a header or JSON id does not hash every body for nothing)."""

    reports_types = False
    checks_time = False

    def __repr__(self) -> str:
        return "Unverified()"

    def verify(self, req: Inbound) -> Verified:
        return Verified(event_id=None, id_signed=False)

    def unsigned_handshake(self, req: Inbound) -> Handshake | None:
        return None


_BUILDERS: dict[str, Builder] = {
    **{name: partial(table.build, name) for name in table.SPECS},
    "github": table.build_github,
    "standardwebhooks": standardwebhooks.build,
    "svix": standardwebhooks.build,
    "clerk": standardwebhooks.build,
    "resend": standardwebhooks.build,
    "twilio": twilio.build,
    "hubspot": hubspot.build,
    "mailgun": mailgun.build,
    "discord": discord.build,
    "sendgrid": sendgrid.build,
    "twitter": partial(table.build, "x"),
}

PROVIDERS: frozenset[str] = frozenset({*_BUILDERS, "hmac", "none"})


def build_verifier(
    provider: str,
    secrets: Sequence[str],
    tolerance: float | None,
    signature: Mapping[str, Any] | None,
) -> Verifier:
    """The route's verifier. Raises `ProviderConfigError`, whose message never contains a secret."""
    if provider not in PROVIDERS:
        raise ProviderConfigError(
            f"unknown provider {provider!r}; expected one of {', '.join(sorted(PROVIDERS))}"
        )
    _check_tolerance(tolerance)
    if signature and provider != "hmac":
        raise ProviderConfigError(f"signature: only provider hmac takes a signature spec, not {provider}")
    if provider == "none":
        return Unverified()
    keys = _secrets(secrets, provider)
    if provider == "hmac":
        return Guarded(_generic(keys, tolerance, signature))
    return Guarded(_BUILDERS[provider](keys, tolerance))


def _check_tolerance(tolerance: float | None) -> None:
    if tolerance is None:
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise ProviderConfigError("tolerance: must be a number of seconds")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ProviderConfigError("tolerance: must be a finite, non-negative number of seconds (0 disables)")


def _secrets(secrets: Sequence[str], provider: str) -> tuple[str, ...]:
    if isinstance(secrets, str | bytes) or not all(isinstance(s, str) for s in secrets):
        raise ProviderConfigError("secrets: must be a list of strings")
    kept = tuple(s.strip() for s in secrets if s.strip())
    if not kept:
        raise ProviderConfigError(f"secrets: provider {provider} needs at least one non-empty secret")
    return kept


def _generic(
    secrets: tuple[str, ...], tolerance: float | None, signature: Mapping[str, Any] | None
) -> Verifier:
    if signature is None:
        raise ProviderConfigError("signature: provider hmac needs a signature spec (providers.md §23.1)")
    spec = spec_from_mapping(signature)
    window = spec.tolerance_s if tolerance is None else tolerance
    if spec.ts_source is not None and window is None:
        raise ProviderConfigError(
            "signature.tolerance_s: required when ts_source is set (seconds; 0 disables the check), or set the "
            "route's tolerance"
        )
    return SpecVerifier(spec, generic_keys(spec, secrets), window)


def generic_keys(spec: SigSpec, secrets: Sequence[str]) -> tuple[Key, ...]:
    """Decode each secret as the spec says (§23.2 step 3)."""
    keys: list[Key] = []
    for i, secret in enumerate(secrets):
        where = f"secrets[{i}]"
        if spec.scheme == "ecdsa_p256_sha256":
            text = secret.removeprefix(spec.key_prefix) if spec.key_prefix else secret
            keys.append(EcdsaKey(p256_public(text, where), spec.encoding))
            continue
        raw = secret_bytes(secret, spec.key_decoding, spec.key_prefix, where)
        if spec.scheme == "ed25519":
            keys.append(Ed25519Key(ed25519_public(raw, where), spec.encoding))
        else:
            keys.append(HmacKey(raw, spec.digest, spec.encoding, spec.compare_on))
    return tuple(keys)
