"""`SigSpec`: one signature scheme as data (providers.md §23.1), and its validation (§23.5).

The fields before the marker are exactly §23.1's, and they are the only keys a route's `signature:` mapping may use
(provider `hmac`). The fields after it are hooks the built-in provider table needs and a user never sets: header
aliases (svix-* over webhook-*), a second signature location (Mailgun `parent-signature`), the event-type
extractors, the `{token}` source, HubSpot's URL rewriting and timestamp rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from sidecar.providers.base import ProviderConfigError

HANDSHAKES = (
    "slack",
    "discord_interactions",
    "discord_events",
    "discord",
    "zoom",
    "x_crc",
    "github_ping",
    "intercom_ping",
    "pagerduty_ping",
)
PLACEHOLDERS = ("body", "ts", "id", "url", "method", "token")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class SigSpec:
    # ---- where the signature(s) live
    sig_location: Literal["header", "json_body", "form_body"] = "header"
    sig_name: str = ""
    sig_format: Literal["plain", "kv_list", "versioned_list"] = "plain"
    prefix: str = ""
    item_sep: str = ","
    kv_sep: str = "="
    sig_keys: tuple[str, ...] = ("v1",)
    ts_key: str | None = None
    entry_sep: str = " "
    accepted_versions: tuple[str, ...] = ("v1",)
    # ---- crypto
    scheme: Literal["hmac", "ed25519", "ecdsa_p256_sha256"] = "hmac"
    digest: Literal["sha1", "sha256", "sha512"] = "sha256"
    encoding: Literal["hex", "base64", "base64url"] = "hex"
    compare_on: Literal["encoded", "decoded"] = "encoded"
    include_prefix_in_compare: bool = False
    key_decoding: Literal["utf8", "strip_prefix_then_base64", "hex"] = "utf8"
    key_prefix: str = ""
    # ---- what is signed
    template: str = "{body}"
    # ---- freshness
    ts_source: str | None = None
    ts_unit: Literal["s", "ms"] = "s"
    ts_render: Literal["raw", "int"] = "raw"
    tolerance_s: int | None = None
    tolerance_mode: Literal["both", "past_only"] = "both"
    check_ts_before_sig: bool = False
    # ---- id & extras
    id_header: str | None = None
    dedup_id: tuple[str, ...] = ()
    handshake: str | None = None
    # ---- internal hooks (not settable from a route's `signature:` mapping) ----------------------------------------
    # (name, preferred name that wins when present): svix-id over webhook-id
    header_aliases: tuple[tuple[str, str], ...] = ()
    # further body fields that may hold a signature: Mailgun parent-signature
    extra_sig_names: tuple[str, ...] = ()
    # where {token} comes from: "json:<path>" | "form:<name>"
    token_source: str | None = None
    # event-type extractors, written like dedup_id
    event_type: tuple[str, ...] = ()
    # the SDK decodes the body as UTF-8 (and fails on anything else) / refuses an empty body
    require_utf8: bool = False
    require_body: bool = False
    # kv_list: a timestamp key given twice counts with its last value (paddle-python-sdk), not its first (Stripe's)
    ts_last: bool = False
    # HubSpot: the URL as signed; and (ts in ts_unit, now, tolerance) -> fresh? when the SDK's rule is its own
    url_transform: Callable[[str], str] | None = None
    ts_window: Callable[[int, float, float], bool] | None = None


_ALL_FIELDS = tuple(f.name for f in fields(SigSpec))
USER_FIELDS = _ALL_FIELDS[: _ALL_FIELDS.index("header_aliases")]  # the §23.1 names

_CHOICES: dict[str, tuple[str, ...]] = {
    "sig_location": ("header", "json_body", "form_body"),
    "sig_format": ("plain", "kv_list", "versioned_list"),
    "scheme": ("hmac", "ed25519", "ecdsa_p256_sha256"),
    "digest": ("sha1", "sha256", "sha512"),
    "encoding": ("hex", "base64", "base64url"),
    "compare_on": ("encoded", "decoded"),
    "key_decoding": ("utf8", "strip_prefix_then_base64", "hex"),
    "ts_unit": ("s", "ms"),
    "ts_render": ("raw", "int"),
    "tolerance_mode": ("both", "past_only"),
}
_STRINGS = ("sig_name", "prefix", "item_sep", "kv_sep", "entry_sep", "key_prefix", "template")
_OPTIONAL_STRINGS = ("ts_key", "ts_source", "id_header", "handshake")
_TUPLES = ("sig_keys", "accepted_versions", "dedup_id")
_BOOLS = ("include_prefix_in_compare", "check_ts_before_sig")


def template_fields(template: str) -> tuple[str, ...]:
    return tuple(_PLACEHOLDER.findall(template))


def _bad(name: str, message: str) -> ProviderConfigError:
    return ProviderConfigError(f"signature.{name}: {message}")


def _coerce(name: str, value: Any) -> Any:
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise _bad(name, f"must be one of {', '.join(_CHOICES[name])}")
        return value
    if name in _STRINGS:
        if not isinstance(value, str):
            raise _bad(name, "must be a string")
        return value
    if name in _OPTIONAL_STRINGS:
        if value is not None and (not isinstance(value, str) or not value):
            raise _bad(name, "must be a non-empty string or null")
        return value
    if name in _TUPLES:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise _bad(name, "must be a list of strings")
        if not all(isinstance(v, str) and v for v in value):
            raise _bad(name, "must be a list of non-empty strings")
        return tuple(value)
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise _bad(name, "must be true or false")
        return value
    # tolerance_s
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _bad(name, "must be a non-negative whole number of seconds (0 disables) or null")
    return value


def spec_from_mapping(signature: Mapping[str, Any]) -> SigSpec:
    """A route's `signature:` mapping → a validated `SigSpec`. `ProviderConfigError` names every field of the
    wrong kind (unknown, or not of its type) at once, else the first rule the fields break together. Without a
    `dedup_id` the route must take its id another way (its `event_id`: the config checks it)."""
    if not isinstance(signature, Mapping):
        raise ProviderConfigError("signature: must be a mapping of SigSpec fields (providers.md §23.1)")
    problems = [
        str(_bad(str(k), "unknown field (the fields are those of providers.md §23.1)"))
        for k in sorted(str(k) for k in signature if k not in USER_FIELDS)
    ]
    fields: dict[str, Any] = {}
    for name, value in signature.items():
        if name in USER_FIELDS:
            try:
                fields[name] = _coerce(name, value)
            except ProviderConfigError as exc:
                problems.append(str(exc))
    if problems:  # check-config lists them all, not one per run
        raise ProviderConfigError(*problems)
    spec = SigSpec(**fields)
    validate(spec)
    return spec


def validate(spec: SigSpec) -> None:
    """The consistency rules of §23.2/§23.5 that do not need the secrets."""
    if not spec.sig_name:
        raise _bad("sig_name", "required")
    if spec.prefix and spec.sig_format != "plain":
        raise _bad("prefix", "only for sig_format plain")
    if spec.sig_format == "kv_list":
        if not spec.item_sep or not spec.kv_sep:
            raise _bad("item_sep" if not spec.item_sep else "kv_sep", "must not be empty")
        if not spec.sig_keys:
            raise _bad("sig_keys", "must name at least one key")
    if spec.sig_format == "versioned_list":
        if not spec.entry_sep:
            raise _bad("entry_sep", "must not be empty")
        if not spec.accepted_versions:
            raise _bad("accepted_versions", "must name at least one version")
    if spec.ts_key is not None and spec.sig_format != "kv_list":
        raise _bad("ts_key", "only for sig_format kv_list")
    _validate_crypto(spec)
    _validate_template(spec)
    _validate_ts_source(spec)
    for extractor in spec.dedup_id:
        _validate_extractor("dedup_id", extractor)
    if spec.handshake is not None and spec.handshake not in HANDSHAKES:
        raise _bad("handshake", f"must be one of {', '.join(HANDSHAKES)} or null")
    if spec.handshake in ("zoom", "x_crc") and spec.scheme != "hmac":
        raise _bad("handshake", f"{spec.handshake} answers with an HMAC, so it needs scheme hmac")


def _validate_crypto(spec: SigSpec) -> None:
    if spec.key_prefix and spec.key_decoding != "strip_prefix_then_base64":
        raise _bad("key_prefix", "only for key_decoding strip_prefix_then_base64")
    if spec.scheme == "ed25519" and spec.key_decoding == "utf8":
        raise _bad("key_decoding", "an ed25519 public key is given as hex or base64, not utf8")
    if spec.scheme == "ecdsa_p256_sha256" and spec.key_decoding != "strip_prefix_then_base64":
        raise _bad("key_decoding", "an ECDSA public key is a base64 DER SubjectPublicKeyInfo")
    if spec.scheme != "hmac" and spec.compare_on != "encoded":
        raise _bad("compare_on", "only for scheme hmac")


def _validate_template(spec: SigSpec) -> None:
    names = template_fields(spec.template)
    if not names:
        raise _bad("template", "must contain at least one placeholder ({body} {ts} {id} {url} {method})")
    for name in names:
        if name not in PLACEHOLDERS:
            raise _bad("template", f"unknown placeholder {{{name}}}")
    if "ts" in names and spec.ts_source is None:
        raise _bad("ts_source", "required when the template uses {ts}")
    if "id" in names and spec.id_header is None:
        raise _bad("id_header", "required when the template uses {id}")
    if "token" in names and spec.token_source is None:
        raise _bad("template", "{token} has no source in a route's signature spec")


def _validate_ts_source(spec: SigSpec) -> None:
    source = spec.ts_source
    if source is None:
        return
    kind, _, name = source.partition(":")
    if kind not in ("header", "sig", "json", "form") or not name:
        raise _bad("ts_source", "must be header:NAME, sig:KEY, json:PATH or form:NAME")
    if kind == "sig" and (spec.sig_format != "kv_list" or name != spec.ts_key):
        raise _bad("ts_source", "sig:KEY needs sig_format kv_list and ts_key KEY")
    if kind == "json" and spec.check_ts_before_sig:
        raise _bad("check_ts_before_sig", "a timestamp in the body is checked only after the signature")


def _validate_extractor(name: str, extractor: str) -> None:
    kind, _, arg = extractor.partition(":")
    if extractor == "body_sha256":
        return
    if kind not in ("header", "json", "json[]", "composite") or not arg:
        raise _bad(
            name,
            f"{extractor!r} must be header:NAME, json:PATH, json[]:PATH,… composite:PATH,… or body_sha256",
        )
    if kind in ("json[]", "composite"):
        parts = [part.removeprefix("?") for part in arg.split(",")]
        if not all(alt and all(alt.split(".")) for part in parts for alt in part.split("|")):
            raise _bad(name, f"{extractor!r} has an empty path (parts are PATH|PATH…, ?PATH when optional)")
        if all(part.startswith("?") for part in arg.split(",")):
            raise _bad(name, f"{extractor!r}: at least one part must be required (no leading ?)")
