"""Property tests: hostile input never escapes as anything but a 401, and random signatures never verify."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from provider_cases import CASES, GENERIC_SPEC, NOW, SW_GOOD, URL, Case

from sidecar.providers.base import Handshake, Inbound, VerificationError, Verified
from sidecar.providers.registry import PROVIDERS, build_verifier

FAST = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

_BY_PROVIDER: dict[str, Case] = {}
for _case in CASES.values():
    _BY_PROVIDER.setdefault(_case.provider, _case)
_ALIASES = {
    "svix": "standardwebhooks",
    "clerk": "standardwebhooks",
    "resend": "standardwebhooks",
    "twitter": "x",
}
SIGNED = sorted(PROVIDERS - {"none"})


def _case(provider: str) -> Case:
    return _BY_PROVIDER.get(provider) or CASES[_ALIASES[provider]]


def _secret(provider: str) -> str:
    return (
        SW_GOOD if provider in _ALIASES and _ALIASES[provider] == "standardwebhooks" else _case(provider).good
    )


def _header_names(provider: str) -> list[str]:
    case = _case(provider)
    names = {k.lower() for k in case.request()[1]}
    names |= {"content-type", "svix-id", "svix-timestamp", "svix-signature", "x-hub-signature"}
    return sorted(names)


hostile_text = st.one_of(
    st.text(max_size=80),
    st.text(
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), max_size=8
    ),  # aiohttp's surrogate escapes
    st.sampled_from(
        ["sha256=", "sha1=", "v0=", "v1=", "v1,", "v1a,", "t=", "ts=", "h1=", "application/json"]
    ).flatmap(lambda p: st.text(max_size=80).map(lambda t: p + t)),
    st.just(str(NOW)),
    st.just(str(NOW * 1000)),
    st.builds(lambda s: f"t={NOW},v1={s}", st.text(max_size=70)),
    st.builds(lambda s: f"t={NOW * 1000}, v1={s}", st.text(max_size=70)),
    st.builds(lambda s: f"ts={NOW};h1={s}", st.text(max_size=70)),
    st.just("application/x-www-form-urlencoded"),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
shaped = st.fixed_dictionaries(
    {
        "signature": st.fixed_dictionaries(
            {
                "timestamp": st.one_of(st.just(str(NOW)), json_values),
                "token": json_values,
                "signature": json_values,
            }
        ),
        "event-data": json_values,
        "type": json_values,
        "id": json_values,
        "webhookTimestamp": st.one_of(st.just(NOW * 1000), json_values),
        "payload": json_values,
        "event": json_values,
    }
)
hostile_body = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=5).map(
        lambda p: urlencode(p).encode()
    ),
    st.just(b"ssl_check=1&token=x"),
    st.just(b"[" * 5000),
)
hostile_url = st.one_of(
    st.just(URL),
    st.text(max_size=40),
    st.just("http://[::1/x"),
    st.just("https://h:99999/x"),
    st.text(max_size=20).map(lambda t: URL + "&crc_token=" + t),
    st.text(max_size=70).map(lambda t: URL + "&bodySHA256=" + t),
)
hostile_method = st.one_of(st.sampled_from(["POST", "GET", "PUT", "post"]), st.text(max_size=6))


@st.composite
def hostile_requests(draw: st.DrawFn, provider: str) -> Inbound:
    names = _header_names(provider)
    case = _case(provider)
    body, valid = case.request()
    headers: CIMultiDict[str] = CIMultiDict(valid if draw(st.booleans()) else {})
    for name in draw(st.lists(st.sampled_from(names), max_size=len(names) + 2)):
        if draw(st.booleans()):
            headers[name] = draw(hostile_text)  # replace
        else:
            headers.add(name, draw(hostile_text))  # repeat
    body = draw(st.one_of(hostile_body, st.just(case.tampered(body))))
    return Inbound(draw(hostile_method), body, headers, draw(hostile_url), float(NOW))


def _verifier(provider: str) -> Any:
    signature = GENERIC_SPEC if provider == "hmac" else None
    return build_verifier(provider, [_secret(provider)], None, signature)


@pytest.mark.parametrize("provider", SIGNED)
@FAST
@given(data=st.data())
def test_provider_hostile_input_is_only_ever_a_verification_error(provider: str, data: st.DataObject) -> None:
    verifier = _verifier(provider)
    req = data.draw(hostile_requests(provider))
    answer = verifier.unsigned_handshake(req)
    assert answer is None or isinstance(answer, Handshake)
    with pytest.raises(VerificationError) as info:
        verifier.verify(req)
    assert info.value.reason != "internal", info.value.detail


@pytest.mark.parametrize("name", sorted(CASES))
@FAST
@given(sig=st.text(max_size=120), keep_prefix=st.booleans())
def test_provider_random_signature_never_verifies(name: str, sig: str, keep_prefix: bool) -> None:
    """A well-formed request (fresh timestamp, right headers) whose signature is random text."""
    case = CASES[name]
    body, headers = case.request()
    if case.sig_header is None:  # Mailgun: the signature lives in the body
        body = body.replace(
            json.loads(body)["signature"]["signature"].encode(), json.dumps(sig)[1:-1].encode()
        )
    else:
        header = next(k for k in headers if k.lower() == case.sig_header)
        headers[header] = (case.prefix or "") + sig if keep_prefix else sig
    with pytest.raises(VerificationError) as info:
        case.verify(body, headers)
    assert info.value.reason != "internal", info.value.detail


@FAST
@given(req=hostile_requests("stripe"))
def test_none_provider_always_verified_without_id(req: Inbound) -> None:
    got = build_verifier("none", [], None, None).verify(req)
    assert isinstance(got, Verified)
    assert got.event_id is None
