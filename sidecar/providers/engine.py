"""The generic signature engine (providers.md §23.2): one `SigSpec` + decoded keys → a `Verifier`.

Per request: find the candidate signatures → read the timestamp → build the signed bytes from the template → ask
each key whether any candidate verifies → check freshness → recognise a handshake → extract the event id and type.
Everything the spec allows is resolved once here at construction (template split, header aliases, extractors), so
the per-request work is header lookups, one HMAC per key and, only when something needs it, one JSON parse (and a
second, exact one when an id reads as a whole float: an integer past 64 bits, see `_exactly`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from sidecar.providers import handshakes
from sidecar.providers.base import Handshake, Inbound, TimestampError, VerificationError, Verified, usable_id
from sidecar.providers.crypto import Candidate, Key
from sidecar.providers.request import Request, ascii_bytes, digits, json_path, utf8_bytes
from sidecar.providers.spec import SigSpec, template_fields

MAX_CANDIDATES = 32  # providers send one to three; more is an attempt to make us verify forever
_PIECE = re.compile(r"\{(\w+)\}")

Extractor = Callable[[Request], "tuple[str, bool] | None"]  # → (value, covered by the signature) | None


class SpecVerifier:
    """A `Verifier` driven by one `SigSpec`. `tolerance` None/0 disables the freshness check."""

    def __init__(self, spec: SigSpec, keys: tuple[Key, ...], tolerance: float | None) -> None:
        self.spec = spec
        self.keys = keys
        self.tolerance = tolerance or None
        self._aliases = {name: (preferred, name) for name, preferred in spec.header_aliases}
        self._template = _split_template(spec.template)
        placeholders = template_fields(spec.template)
        self._ts_signed = "ts" in placeholders
        self._body_signed = "body" in placeholders
        self._ts_kind, _, ts_name = (spec.ts_source or "").partition(":")
        self._ts_name = ts_name
        self._ts_path = tuple(ts_name.split("."))
        self._ts_first = spec.check_ts_before_sig or self._ts_signed
        self._signable_headers = self._signable()
        self._id_extractors = tuple(self._extractor(e) for e in spec.dedup_id)
        self._type_extractors = tuple(self._extractor(e) for e in spec.event_type)
        self._handshake = handshakes.SIGNED.get(spec.handshake or "")
        self._unsigned = handshakes.UNSIGNED.get(spec.handshake or "")

    def __repr__(self) -> str:
        return f"SpecVerifier({self.spec.sig_name!r}, {len(self.keys)} key(s))"

    @property
    def reports_types(self) -> bool:
        return bool(self._type_extractors)

    @property
    def checks_time(self) -> bool:
        return self.spec.ts_source is not None

    # ---- the Verifier protocol

    def unsigned_handshake(self, req: Inbound) -> Handshake | None:
        if self._unsigned is None:
            return None
        try:
            return self._unsigned(Request(req), self.keys)
        except VerificationError:  # e.g. a repeated Content-Type: not a handshake, verify() will say why
            return None

    def verify(self, req: Inbound) -> Verified:
        return self.verify_request(Request(req))

    def verify_request(self, req: Request) -> Verified:
        spec = self.spec
        if spec.require_utf8:
            req.require_utf8()
        if spec.require_body and not req.body:
            raise VerificationError("malformed", "empty body")
        candidates, sig_ts = self._candidates(req)
        seen: set[str] = set()  # headers whose value went into the signed string
        ts_text: str | None = None
        if self._ts_first:
            ts_text = self._timestamp(req, sig_ts, seen, required=True)
            assert ts_text is not None  # required=True raises instead of returning None
            if spec.check_ts_before_sig:
                self._check_fresh(ts_text, req.inbound.now)
        try:
            key = self._match(self._signed_bytes(req, ts_text, seen), candidates)
        except VerificationError:
            # a URL rewritten before signing (HubSpot's docs) may also have been signed as sent (its SDK's reading)
            if (
                spec.url_transform is None
                or not req.inbound.url
                or spec.url_transform(req.inbound.url) == req.inbound.url
            ):
                raise
            key = self._match(self._signed_bytes(req, ts_text, seen, as_sent=True), candidates)
        if spec.ts_source is not None and not spec.check_ts_before_sig:
            if ts_text is None and self.tolerance is not None:
                # only a timestamp inside the body (Linear) may be absent: its SDK then skips the check
                ts_text = self._timestamp(req, sig_ts, seen, required=self._ts_kind != "json")
            if ts_text is not None:
                self._check_fresh(ts_text, req.inbound.now)
        if self._handshake is not None:
            handshake = self._handshake(req, key)
            if handshake is not None:
                return Verified(event_id=None, id_signed=False, handshake=handshake)
        (event_id, id_signed), signed_id = _ids(self._id_extractors, req)
        found_type = _first(self._type_extractors, req)
        return Verified(
            event_id=event_id,
            id_signed=id_signed,
            signed_id=None if id_signed else signed_id,
            event_type=found_type[0] if found_type else None,
            signed_headers=frozenset(seen),
            nonce=self._token(req) if self.spec.token_source and not self._body_signed else None,
            nonce_window=self.tolerance,
        )

    # ---- steps

    def _header_names(self, name: str) -> tuple[str, ...]:
        return self._aliases.get(name, (name,))

    def _sig_texts(self, req: Request) -> list[str]:
        spec = self.spec
        if spec.sig_location == "header":
            found = req.first_header(self._header_names(spec.sig_name))
            return [found[1]] if found else []
        texts = []
        for name in (spec.sig_name, *spec.extra_sig_names):
            value = self._body_field(req, spec.sig_location == "json_body", name)
            if value is not None:
                texts.append(value)
        return texts

    def _body_field(self, req: Request, in_json: bool, name: str) -> str | None:
        if in_json:
            value = json_path(req.json(), tuple(name.split(".")))
            if value is None:
                return None
            if not isinstance(value, str):
                raise VerificationError("malformed", f"body field {name} is not a string")
            return value
        values = req.form().get(name)
        if not values:
            return None
        if len(values) > 1:
            raise VerificationError("duplicate_header", f"form field {name} appears more than once")
        return values[0]

    def _candidates(self, req: Request) -> tuple[list[Candidate], str | None]:
        spec = self.spec
        texts = self._sig_texts(req)
        if not texts:
            where = "header" if spec.sig_location == "header" else "body field"
            raise VerificationError("missing", f"no {spec.sig_name} {where}")
        candidates: list[Candidate] = []
        ts: str | None = None
        for text in texts:
            if spec.sig_format == "plain":
                candidates.append(self._plain(text))
            elif spec.sig_format == "kv_list":
                ts = _parse_kv(spec, text, candidates, ts)
            else:
                _parse_versioned(spec, text, candidates)
        if not candidates:
            raise VerificationError("malformed", f"{spec.sig_name} holds no signature of an accepted version")
        if len(candidates) > MAX_CANDIDATES:
            raise VerificationError("malformed", f"{spec.sig_name} holds too many signatures")
        return candidates, ts

    def _plain(self, text: str) -> Candidate:
        prefix = self.spec.prefix
        if prefix and not text.startswith(prefix):
            raise VerificationError("malformed", f"signature does not start with {prefix!r}")
        if self.spec.include_prefix_in_compare:
            return Candidate("", text, prefix)
        return Candidate("", text[len(prefix) :])

    def _timestamp(self, req: Request, sig_ts: str | None, seen: set[str], *, required: bool) -> str | None:
        """The timestamp as text (validated digits), or None when absent and not `required`."""
        kind, name = self._ts_kind, self._ts_name
        value: Any
        if kind == "header":
            found = req.first_header(self._header_names(name))
            value = found[1] if found else None
            if found and self._ts_signed:
                seen.add(found[0])
        elif kind == "sig":
            value = sig_ts
        elif kind == "json":
            value = json_path(req.json(), self._ts_path)
        else:
            value = self._body_field(req, False, name)
        if value is None:
            if required:
                raise VerificationError("missing", f"no timestamp ({self.spec.ts_source})")
            return None
        number = digits(value, "the timestamp")
        return str(number) if self.spec.ts_render == "int" or not isinstance(value, str) else value

    def _check_fresh(self, ts_text: str, now: float) -> None:
        tolerance = self.tolerance
        if tolerance is None:
            return
        value = int(ts_text)
        spec = self.spec
        seconds = value / 1000 if spec.ts_unit == "ms" else value
        if spec.ts_window is not None:
            fresh = spec.ts_window(value, now, tolerance)
        elif spec.tolerance_mode == "both":
            fresh = abs(now - seconds) <= tolerance
        else:
            fresh = seconds >= now - tolerance
        if not fresh:
            # which side and how far: a replay (old), or a clock that is off (every request the same way)
            apart = now - seconds
            side = "older than" if apart > 0 else "ahead of"
            raise TimestampError(
                f"the signed timestamp is {abs(apart):.0f} s {side} this host's clock, outside the "
                f"{tolerance:g} s tolerance"
            )

    def _signed_bytes(
        self, req: Request, ts_text: str | None, seen: set[str], as_sent: bool = False
    ) -> bytes:
        """`as_sent`: the URL without the spec's `url_transform`."""
        if self._template is _BODY_ONLY:
            return req.body
        parts: list[bytes] = []
        for piece in self._template:
            if isinstance(piece, bytes):
                parts.append(piece)
            else:
                parts.append(self._placeholder(req, piece, ts_text, seen, as_sent))
        return b"".join(parts)

    def _placeholder(
        self, req: Request, name: str, ts_text: str | None, seen: set[str], as_sent: bool = False
    ) -> bytes:
        inbound = req.inbound
        if name == "body":
            return inbound.body
        if name == "ts":
            return (ts_text or "").encode()
        if name == "method":
            return ascii_bytes(inbound.method.upper(), "the method")
        if name == "url":
            if not inbound.url:
                raise VerificationError("malformed", "no public URL to verify against")
            transform = None if as_sent else self.spec.url_transform
            url = transform(inbound.url) if transform else inbound.url
            return utf8_bytes(url, "the URL")
        if name == "id":
            found = req.first_header(self._header_names(self.spec.id_header or ""))
            if not found or not found[1]:
                raise VerificationError("missing", f"no {self.spec.id_header} header")
            seen.add(found[0])
            return utf8_bytes(found[1], f"header {found[0]}")
        return utf8_bytes(self._token(req), "the token")  # token

    def _token(self, req: Request) -> str:
        kind, _, field = (self.spec.token_source or "").partition(":")
        token = self._body_field(req, kind == "json", field)
        if token is None:
            raise VerificationError("missing", f"no {field} in the body")
        return token

    def _match(self, signed: bytes, candidates: list[Candidate]) -> Key:
        for key in self.keys:
            if key.matches(signed, candidates):
                return key
        raise VerificationError("mismatch", "no signature matches a configured secret")

    def _signable(self) -> frozenset[str]:
        """Headers whose value enters the signed string: the `{id}` header and a `{ts}` header (with aliases)."""
        names: set[str] = set()
        if self.spec.id_header and "id" in template_fields(self.spec.template):
            names.update(self._header_names(self.spec.id_header))
        if self._ts_signed and self._ts_kind == "header":
            names.update(self._header_names(self._ts_name))
        return frozenset(names)

    def _extractor(self, spec: str) -> Extractor:
        kind, _, arg = spec.partition(":")
        body_signed = self._body_signed
        if kind == "header":
            names = self._header_names(arg)

            def from_header(req: Request) -> tuple[str, bool] | None:
                found = req.first_header(names)
                if found is None or not found[1]:
                    return None
                return found[1], found[0] in self._signable_headers

            return from_header
        if kind == "body_sha256":  # no id in the payload: the signed bytes are the delivery's identity
            return lambda req: (hashlib.sha256(req.body).hexdigest(), body_signed)
        if kind == "json":
            path = tuple(arg.split("."))

            def read(body: Any) -> tuple[str, bool] | None:
                return _scalar(json_path(body, path), body_signed)

        elif kind == "composite":
            parts = _parts(arg)

            def read(body: Any) -> tuple[str, bool] | None:
                return _signed(_composite(body, parts), body_signed)

        else:  # json[]: a batch
            parts = _parts(arg)

            def read(body: Any) -> tuple[str, bool] | None:
                return _batch(body, parts, body_signed)

        return lambda req: _exactly(req, read)


_BODY_ONLY: tuple[bytes | str, ...] = ("body",)


def _split_template(template: str) -> tuple[bytes | str, ...]:
    if template == "{body}":
        return _BODY_ONLY
    pieces: list[bytes | str] = []
    pos = 0
    for match in _PIECE.finditer(template):
        if match.start() > pos:
            pieces.append(template[pos : match.start()].encode())
        pieces.append(match.group(1))
        pos = match.end()
    if pos < len(template):
        pieces.append(template[pos:].encode())
    return tuple(pieces)


def _parse_kv(spec: SigSpec, text: str, out: list[Candidate], ts: str | None) -> str | None:
    """`k=v<sep>k=v…`: collect the `sig_keys` values, keep the first `ts_key` value (the last with `ts_last`);
    ignore other keys (v0)."""
    for item in text.split(spec.item_sep):
        key, sep, value = item.partition(spec.kv_sep)
        if not sep:
            continue
        if key in spec.sig_keys:
            prefix = key + spec.kv_sep if spec.include_prefix_in_compare else ""
            out.append(Candidate(key, item if prefix else value, prefix))
        elif key == spec.ts_key and (ts is None or spec.ts_last):
            ts = value
    return ts


def _parse_versioned(spec: SigSpec, text: str, out: list[Candidate]) -> None:
    """`v1,<sig> v1a,<sig>`: keep accepted versions; skip empty and malformed pieces instead of failing."""
    for piece in text.split(spec.entry_sep):
        version, sep, sig = piece.partition(",")
        if sep and version in spec.accepted_versions:
            out.append(Candidate(version, sig))


class _Inexact(Exception):
    """An id field that orjson read as a whole float: maybe an integer past 64 bits (which it reads as one)."""


def _exactly(req: Request, read: Callable[[Any], tuple[str, bool] | None]) -> tuple[str, bool] | None:
    """`read` the parsed body; when it meets a whole float where an id goes, read the stdlib's exact parse instead,
    which has no floats (so a Stripe-like id of 2**64 is "18446744073709551616", not no id)."""
    try:
        return read(req.json())
    except _Inexact:
        return read(req.exact_json())


def _scalar(value: Any, signed: bool) -> tuple[str, bool] | None:
    if isinstance(value, str) and value:
        return value, signed
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), signed
    if isinstance(value, float) and value.is_integer():
        raise _Inexact
    return None


# A composite key: parts in order, each (optional?, alternatives), an alternative a JSON path
Parts = tuple[tuple[bool, tuple[tuple[str, ...], ...]], ...]


def _parts(arg: str) -> Parts:
    """`a.b|c,?d,e`: parts separated by `,`, alternatives by `|`; a part marked `?` may be absent."""
    return tuple(
        (part.startswith("?"), tuple(tuple(alt.split(".")) for alt in part.removeprefix("?").split("|")))
        for part in arg.split(",")
    )


def _composite(body: Any, parts: Parts) -> str | None:
    """A key built from body fields (Zoom, Calendly, a HubSpot notification): each part takes the first alternative
    present. An optional part that is absent is an empty position (`:` kept, so `1::5` and `:1:5` differ), except
    at the end, where absent optional parts add nothing: adding one keeps the keys of payloads without it."""
    found: list[str] = []
    for optional, alternatives in parts:
        for path in alternatives:
            value = _scalar(json_path(body, path), True)
            if value is not None:
                found.append(value[0])
                break
        else:
            if not optional:
                return None
            found.append("")
    while found and not found[-1]:
        found.pop()
    return ":".join(found) if found else None


def _signed(key: str | None, signed: bool) -> tuple[str, bool] | None:
    return None if key is None else (key, signed)


def _batch(body: Any, parts: Parts, signed: bool) -> tuple[str, bool] | None:
    """A batch (a JSON array) identified by its elements' keys, whatever else a resend changes in it (HubSpot
    counts `attemptNumber` up): the one key of a batch of one when it is fit to be an id as is, else a digest of the
    sorted distinct keys.
    None when the body is no array or an element has no usable key (none, or one that is not printable text: a JSON
    `"\\ud800"` cannot even be encoded for the digest). Per-element dedupe is the upstream's business."""
    if not isinstance(body, list) or not body:
        return None
    keys: set[str] = set()
    for item in body:
        key = _composite(item, parts)
        if key is None or not key.isprintable():
            return None
        keys.add(key)
    if len(keys) == 1 and usable_id(only := next(iter(keys))):
        return only, signed
    return "batch:" + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest(), signed


def _first(extractors: tuple[Extractor, ...], req: Request) -> tuple[str, bool] | None:
    for extract in extractors:
        found = extract(req)
        if found is not None:
            return found
    return None


def _ids(extractors: tuple[Extractor, ...], req: Request) -> tuple[tuple[str | None, bool], str | None]:
    """In one pass: the first id found (and whether it is signed), and the first signed one, which an unsigned
    first id dedupes on (Linear's body fields beside its Linear-Delivery header)."""
    first: tuple[str | None, bool] = (None, False)
    for extract in extractors:
        found = extract(req)
        if found is None:
            continue
        if first[0] is None:
            first = found
        if found[1]:
            return first, found[0]
    return first, None


class Switch:
    """Several verifiers on one route, chosen per request by `pick` (GitHub sha256 vs legacy sha1, Mailgun JSON vs
    form). Unsigned handshakes are asked of the first."""

    def __init__(self, pick: Callable[[Request], int], verifiers: tuple[SpecVerifier, ...]) -> None:
        self.pick = pick
        self.verifiers = verifiers
        self.reports_types = any(v.reports_types for v in verifiers)
        self.checks_time = any(v.checks_time for v in verifiers)

    def unsigned_handshake(self, req: Inbound) -> Handshake | None:
        return self.verifiers[0].unsigned_handshake(req)

    def verify(self, req: Inbound) -> Verified:
        request = Request(req)
        return self.verifiers[self.pick(request)].verify_request(request)
