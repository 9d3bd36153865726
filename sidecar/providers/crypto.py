"""Keys: a configured secret decoded once at config load, and the one comparison each scheme allows.

A key is asked `matches(signed, candidates)`: does any candidate signature verify `signed` under this key? Every
comparison is constant-time on bytes (`hmac.compare_digest`) or a library verify; a candidate that cannot be decoded
is a non-match, never an exception. Secrets appear in no message and no repr.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from sidecar.providers.base import ProviderConfigError

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One signature found in the request. `version` is its scheme label (`v1`, `h1`, `v1a`; "" for plain
    headers); `compare_prefix` is prepended to the expected value when the SDK compares the prefixed text."""

    version: str
    value: str
    compare_prefix: str = ""


def encode(raw: bytes, encoding: str) -> bytes:
    if encoding == "hex":
        return raw.hex().encode()
    if encoding == "base64":
        return base64.b64encode(raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def decode(text: str, encoding: str) -> bytes | None:
    """A candidate's raw bytes, or None when it does not decode. Base64 is decoded as leniently as the SDKs
    (Standard Webhooks, SendGrid) do: `b64decode` without `validate`."""
    try:
        data = text.encode("ascii")
        if encoding == "hex":
            return bytes.fromhex(text) if _HEX.fullmatch(text) else None
        if encoding == "base64":
            return base64.b64decode(data)
        return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None


def _ascii(text: str) -> bytes | None:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        return None


class HmacKey:
    """A symmetric secret. `material` is the HMAC key (also used to answer Zoom and X handshakes)."""

    __slots__ = ("compare_on", "digest", "encoding", "material", "versions")

    def __init__(
        self,
        material: bytes,
        digest: str = "sha256",
        encoding: str = "hex",
        compare_on: str = "encoded",
        versions: frozenset[str] | None = None,
    ) -> None:
        self.material = material
        self.digest = digest
        self.encoding = encoding
        self.compare_on = compare_on
        self.versions = versions  # None: any candidate the spec accepted

    def __repr__(self) -> str:
        return f"HmacKey({self.digest}, {self.encoding}, <secret>)"

    def sign(self, message: bytes) -> bytes:
        return hmac.digest(self.material, message, self.digest)

    def matches(self, signed: bytes, candidates: Sequence[Candidate]) -> bool:
        raw = self.sign(signed)
        expected = encode(raw, self.encoding) if self.compare_on == "encoded" else raw
        for cand in candidates:
            if self.versions is not None and cand.version not in self.versions:
                continue
            if self.compare_on == "decoded":
                got = decode(cand.value, self.encoding)
                if got is not None and hmac.compare_digest(expected, got):
                    return True
                continue
            got = _ascii(cand.value)
            if self.encoding == "base64url" and got is not None:
                got = got.rstrip(b"=")  # base64url travels padded or not; the digest is the same
            want = cand.compare_prefix.encode() + expected if cand.compare_prefix else expected
            if got is not None and hmac.compare_digest(want, got):
                return True
        return False


class Ed25519Key:
    __slots__ = ("encoding", "public", "versions")

    def __init__(
        self, public: Ed25519PublicKey, encoding: str, versions: frozenset[str] | None = None
    ) -> None:
        self.public = public
        self.encoding = encoding
        self.versions = versions

    def __repr__(self) -> str:
        return "Ed25519Key(<public key>)"

    def matches(self, signed: bytes, candidates: Sequence[Candidate]) -> bool:
        for cand in candidates:
            if self.versions is not None and cand.version not in self.versions:
                continue
            sig = decode(cand.value, self.encoding)
            if sig is None or len(sig) != 64:
                continue
            try:
                self.public.verify(sig, signed)
            except InvalidSignature:
                continue
            return True
        return False


class EcdsaKey:
    __slots__ = ("encoding", "public", "versions")

    def __init__(
        self,
        public: ec.EllipticCurvePublicKey,
        encoding: str = "base64",
        versions: frozenset[str] | None = None,
    ) -> None:
        self.public = public
        self.encoding = encoding
        self.versions = versions

    def __repr__(self) -> str:
        return "EcdsaKey(<public key>)"

    def matches(self, signed: bytes, candidates: Sequence[Candidate]) -> bool:
        for cand in candidates:
            if self.versions is not None and cand.version not in self.versions:
                continue
            sig = decode(cand.value, self.encoding)
            if not sig:
                continue
            try:
                self.public.verify(sig, signed, ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):  # ValueError: not a DER (r, s) sequence
                continue
            return True
        return False


Key = HmacKey | Ed25519Key | EcdsaKey


# ---- decoding configured secrets (config load time; errors name the secret's position, never its value) ---------


def b64_secret(text: str, prefix: str, where: str) -> bytes:
    """Strip an optional `prefix`, then base64-decode (padding added if missing), as the svix SDK does."""
    body = text[len(prefix) :] if prefix and text.startswith(prefix) else text
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ProviderConfigError(f"{where}: is not valid base64") from None
    if not raw:
        raise ProviderConfigError(f"{where}: decodes to an empty key")
    return raw


def hex_secret(text: str, where: str) -> bytes:
    if not text or not _HEX.fullmatch(text):
        raise ProviderConfigError(f"{where}: is not an even-length hex string")
    return bytes.fromhex(text)


def secret_bytes(text: str, decoding: str, prefix: str, where: str) -> bytes:
    if decoding == "utf8":
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise ProviderConfigError(f"{where}: is not valid UTF-8 text") from None
    if decoding == "hex":
        return hex_secret(text, where)
    return b64_secret(text, prefix, where)


def ed25519_public(raw: bytes, where: str) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise ProviderConfigError(f"{where}: an Ed25519 public key is 32 bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise ProviderConfigError(f"{where}: is not a usable Ed25519 public key") from None


def p256_public(text: str, where: str) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from base64 DER SubjectPublicKeyInfo (as SendGrid shows it) or PEM."""
    try:
        if text.lstrip().startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode("ascii"))
        else:
            key = load_der_public_key(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise ProviderConfigError(f"{where}: is not a base64 DER (or PEM) public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProviderConfigError(f"{where}: is not a P-256 (secp256r1) public key")
    return key
