"""One inbound request as the verifiers read it: strict header access and a body parsed at most once.

Every accessor either returns a value or raises `VerificationError`; nothing a client sends can make them raise
anything else. Header values are `str` (aiohttp decodes them with surrogate escapes), so every conversion to bytes
goes through `ascii_bytes` / `utf8_bytes`, which turn an encoding failure into a 401.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import orjson

from sidecar.providers.base import Inbound, VerificationError

# A ms timestamp has 13 digits; longer is garbage (and int() refuses very long strings with a ValueError).
_DIGITS = re.compile(r"[0-9]{1,18}")
_INVALID = object()  # the body is not JSON (or not a form)
# No provider's form has more fields (Twilio's have ~50); parsing and sorting 100,000 of them held the event loop
# ~0.25 s per unsigned 1 MB request, before any signature was checked.
MAX_FORM_FIELDS = 1000


def ascii_bytes(value: str, what: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise VerificationError("malformed", f"{what} is not ASCII") from None


def utf8_bytes(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise VerificationError("malformed", f"{what} is not valid text") from None


def digits(value: Any, what: str) -> int:
    """A timestamp: a decimal string `^[0-9]+$` or a non-negative JSON integer (never a bool or a float)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    raise VerificationError("malformed", f"{what} is not a decimal timestamp")


def json_path(node: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


class Request:
    """An `Inbound` plus lazily parsed views of it, each computed at most once."""

    __slots__ = ("_exact", "_form", "_json", "inbound")

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound
        self._json: Any = None
        self._exact: Any = None
        self._form: dict[str, list[str]] | None = None

    @property
    def body(self) -> bytes:
        return self.inbound.body

    def header(self, name: str) -> str | None:
        """The single value of header `name`, None when absent; a repeated header is rejected (§0.3)."""
        values = self.inbound.headers.getall(name, ())
        if len(values) > 1:
            raise VerificationError("duplicate_header", f"header {name} appears more than once")
        return values[0] if values else None

    def first_header(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        """(name, value) of the first of `names` that is present; how svix-* wins over webhook-*."""
        for name in names:
            value = self.header(name)
            if value is not None:
                return name, value
        return None

    def require_utf8(self) -> None:
        """The SDKs that decode the body to `str` first (Stripe, Slack, svix, WorkOS, Paddle, Twilio) fail here."""
        body = self.inbound.body
        if body.isascii():
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise VerificationError("malformed", "body is not valid UTF-8") from None

    def json(self) -> Any:
        """The parsed JSON body, or None when the body is not JSON. Parsed once per request."""
        if self._json is None:
            try:
                self._json = orjson.loads(self.inbound.body)  # ~5x the stdlib's speed on a webhook body
            except orjson.JSONDecodeError:
                # what orjson refuses but the stdlib takes: lone surrogate escapes, NaN…
                try:
                    self._json = json.loads(self.inbound.body)
                except (ValueError, RecursionError):
                    self._json = _INVALID
        return None if self._json is _INVALID else self._json

    def exact_json(self) -> Any:
        """The body parsed again by the stdlib, with exact integers and no floats (a fraction is a `Decimal`).
        Read only when an id in `json()` is a float: orjson reads an integer past 64 bits as one."""
        if self._exact is None:
            try:
                self._exact = json.loads(self.inbound.body, parse_float=Decimal)
            # (an ArithmeticError: Decimal refuses an exponent such as 1e99999999999999999999)
            except (ValueError, RecursionError, ArithmeticError):
                self._exact = _INVALID
        return None if self._exact is _INVALID else self._exact

    def form(self) -> dict[str, list[str]]:
        """The decoded `application/x-www-form-urlencoded` body (blank values kept), {} when it is not one."""
        if self._form is None:
            try:
                text = self.inbound.body.decode("utf-8")
                self._form = parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
            except (UnicodeDecodeError, ValueError):
                self._form = {}
        return self._form

    def form_pairs(self) -> list[tuple[str, str]]:
        """The form body as ordered (name, value) pairs; a non-UTF-8 form is a 401."""
        try:
            text = self.inbound.body.decode("utf-8")
        except UnicodeDecodeError:
            raise VerificationError("malformed", "form body is not valid UTF-8") from None
        try:
            return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
        except ValueError:
            raise VerificationError(
                "malformed", f"form body has more than {MAX_FORM_FIELDS} fields"
            ) from None

    def is_form(self) -> bool:
        return media_type(self.header("content-type")) == "application/x-www-form-urlencoded"

    def query(self) -> dict[str, list[str]]:
        """The public URL's query, parsed as twilio-python does (`parse_qs`, blank values dropped)."""
        try:
            return parse_qs(urlsplit(self.inbound.url).query)
        except ValueError:
            return {}
