"""providers.md §25's negative list, run against every provider through its independent signer."""

from __future__ import annotations

import json
import re

import pytest
from provider_cases import CASES, NOW, Case

from sidecar.providers.base import TimestampError, VerificationError

ALL = sorted(CASES)
WITH_PREFIX = [n for n in ALL if CASES[n].prefix]
WITH_WINDOW = [n for n in ALL if CASES[n].window]
BOTH_WAYS = [n for n in WITH_WINDOW if CASES[n].both]
PAST_ONLY = [n for n in WITH_WINDOW if not CASES[n].both]
LISTS = [n for n in ALL if CASES[n].list_bad_good]
JSON_BODIES = [n for n in ALL if CASES[n].json_body]
HEADER_SIGS = [n for n in ALL if CASES[n].sig_header]
CASE_SENSITIVE = [n for n in HEADER_SIGS if CASES[n].case_sensitive]


def _rejects(case: Case, body: bytes, headers: dict[str, str] | list[tuple[str, str]], **kw: object) -> str:
    with pytest.raises(VerificationError) as info:
        case.verify(body, headers, **kw)
    return info.value.reason


def _with_ts(case: Case, offset: float) -> tuple[bytes, dict[str, str]]:
    return case.request(ts=int(NOW + offset))


@pytest.mark.parametrize("name", ALL)
def test_provider_valid_request_verifies(name: str) -> None:
    case = CASES[name]
    assert case.verify(*case.request()) is not None


@pytest.mark.parametrize("name", ALL)
def test_provider_second_secret_accepted(name: str) -> None:
    case = CASES[name]
    assert case.verify(*case.request("good"), secrets=[case.other, case.good]) is not None


@pytest.mark.parametrize("name", ALL)
def test_provider_wrong_secret_rejected(name: str) -> None:
    case = CASES[name]
    assert _rejects(case, *case.request("other")) == "mismatch"


@pytest.mark.parametrize("name", ALL)
def test_provider_one_body_byte_changed_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    assert _rejects(case, case.tampered(body), headers) == "mismatch"


@pytest.mark.parametrize("name", JSON_BODIES)
def test_provider_reserialised_body_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    pretty = json.dumps(json.loads(body), indent=1).encode()
    assert pretty != body
    assert _rejects(case, pretty, headers) == "mismatch"


@pytest.mark.parametrize("name", WITH_PREFIX)
def test_provider_prefix_removed_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.sig_header)
    headers[header] = headers[header].replace(case.prefix or "", "")
    _rejects(case, body, headers)


@pytest.mark.parametrize("name", WITH_PREFIX)
def test_provider_prefix_case_changed_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.sig_header)
    prefix = case.prefix or ""
    headers[header] = headers[header].replace(prefix, prefix.upper())
    _rejects(case, body, headers)


@pytest.mark.parametrize("name", CASE_SENSITIVE)
def test_provider_signature_case_changed_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.sig_header)
    value = headers[header]
    cut = value.rfind(case.prefix) + len(case.prefix) if case.prefix and case.prefix in value else 0
    flipped = value[:cut] + value[cut:].swapcase()
    assert flipped != value
    headers[header] = flipped
    _rejects(case, body, headers)


def test_provider_discord_hex_case_is_not_significant() -> None:
    """Discord's SDK decodes the hex signature (`bytes.fromhex`), so upper-case hex verifies there too."""
    case = CASES["discord"]
    body, headers = case.request()
    headers["X-Signature-Ed25519"] = headers["X-Signature-Ed25519"].upper()
    assert case.verify(body, headers) is not None


@pytest.mark.parametrize("name", WITH_WINDOW)
def test_provider_timestamp_just_outside_past_rejected(name: str) -> None:
    case = CASES[name]
    with pytest.raises(TimestampError):
        case.verify(*_with_ts(case, -(case.window or 0) - 1))


@pytest.mark.parametrize("name", WITH_WINDOW)
def test_provider_timestamp_refusal_says_which_side_and_how_far(name: str) -> None:
    """An audit: a sidecar whose clock was 10 minutes off refused every event with "outside the 300 s tolerance",
    saying neither which side was off nor by how much (the clue that it is this host's clock, not a replay)."""
    case = CASES[name]
    with pytest.raises(TimestampError) as old:
        case.verify(*_with_ts(case, -(case.window or 0) - 600))
    expected = (case.window or 0) + 600

    def apart(message: str, side: str) -> int:
        found = re.search(rf"is (\d+) s {side} this host's clock, outside the", message)
        assert found, message
        return int(found.group(1))

    assert abs(apart(str(old.value), "older than") - expected) <= 2  # the test's own second may tick over
    if name in BOTH_WAYS:
        with pytest.raises(TimestampError) as ahead:
            case.verify(*_with_ts(case, (case.window or 0) + 600))
        assert abs(apart(str(ahead.value), "ahead of") - expected) <= 2


@pytest.mark.parametrize("name", WITH_WINDOW)
def test_provider_timestamp_just_inside_past_accepted(name: str) -> None:
    case = CASES[name]
    assert case.verify(*_with_ts(case, -(case.window or 0) + 1)) is not None


@pytest.mark.parametrize("name", [n for n in WITH_WINDOW if n != "hubspot"])  # HubSpot: its own rule, below
def test_provider_timestamp_exactly_at_the_window_accepted(name: str) -> None:
    """The window's edge is inside it (providers.md §23.2 step 6: `abs(now - ts) <= tolerance_s`, past only
    `ts >= now - tolerance_s`; Stripe's SDK fails only `t < now - tolerance`, Slack's only `abs(now - ts) > 300`):
    a request exactly `tolerance` seconds off is accepted, not refused 401."""
    case = CASES[name]
    assert case.verify(*_with_ts(case, -(case.window or 0))) is not None
    if name in BOTH_WAYS:
        assert case.verify(*_with_ts(case, case.window or 0)) is not None


@pytest.mark.parametrize("name", BOTH_WAYS)
def test_provider_timestamp_just_outside_future_rejected(name: str) -> None:
    case = CASES[name]
    with pytest.raises(TimestampError):
        case.verify(*_with_ts(case, (case.window or 0) + 1))


@pytest.mark.parametrize("name", BOTH_WAYS)
def test_provider_timestamp_just_inside_future_accepted(name: str) -> None:
    case = CASES[name]
    assert case.verify(*_with_ts(case, (case.window or 0) - 1)) is not None


@pytest.mark.parametrize("name", PAST_ONLY)
def test_provider_timestamp_far_future_accepted_like_sdk(name: str) -> None:
    case = CASES[name]
    assert case.verify(*_with_ts(case, 10 * 86400)) is not None


@pytest.mark.parametrize("name", WITH_WINDOW)
def test_provider_route_tolerance_replaces_sdk_default(name: str) -> None:
    case = CASES[name]
    body, headers = _with_ts(case, -4)
    assert case.verify(body, headers, tolerance=5) is not None
    with pytest.raises(TimestampError):
        case.verify(body, headers, tolerance=3)


@pytest.mark.parametrize("name", WITH_WINDOW)
def test_provider_tolerance_zero_disables_the_check(name: str) -> None:
    case = CASES[name]
    assert case.verify(*_with_ts(case, -10 * 86400), tolerance=0) is not None


@pytest.mark.parametrize("name", ["discord", "sendgrid"])
def test_provider_no_sdk_window_unless_configured(name: str) -> None:
    case = CASES[name]
    body, headers = _with_ts(case, -10 * 86400)
    assert case.verify(body, headers) is not None
    with pytest.raises(TimestampError):
        case.verify(body, headers, tolerance=300)
    assert case.verify(*_with_ts(case, 86400), tolerance=300) is not None  # past only


# The SDKs that check the timestamp before the signature (slack_sdk, standardwebhooks/svix, workos, paddle, HubSpot's
# utils.signature) say "stale" of a stale request whatever its signature; Stripe's checks the signature first.
TS_FIRST = ["slack", "standardwebhooks", "svix", "standardwebhooks-v1a", "workos", "paddle", "hubspot"]


@pytest.mark.parametrize("name", TS_FIRST)
def test_provider_stale_request_with_a_bad_signature_is_refused_as_stale_like_the_sdk(name: str) -> None:
    case = CASES[name]
    assert _rejects(case, *case.request("other", ts=int(NOW - (case.window or 0) - 60))) == "timestamp"
    assert _rejects(case, *case.request("other")) == "mismatch"


def test_provider_stripe_stale_request_with_a_bad_signature_is_a_mismatch_like_the_sdk() -> None:
    case = CASES["stripe"]
    assert _rejects(case, *case.request("other", ts=NOW - 360)) == "mismatch"
    assert _rejects(case, *case.request("good", ts=NOW - 360)) == "timestamp"


@pytest.mark.parametrize("name", [n for n in ALL if CASES[n].ts_header])
def test_provider_timestamp_not_digits_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.ts_header)
    for bad in (" " + headers[header], headers[header] + ".5", "+" + headers[header], "1" * 40, "", "١٢٣"):
        headers[header] = bad
        _rejects(case, body, headers)


@pytest.mark.parametrize("name", HEADER_SIGS)
def test_provider_duplicate_signature_header_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    items = list(headers.items())
    items += [(k, v) for k, v in headers.items() if k.lower() == case.sig_header]
    assert _rejects(case, body, items) == "duplicate_header"


@pytest.mark.parametrize("name", [n for n in ALL if CASES[n].ts_header])
def test_provider_duplicate_timestamp_header_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    items = list(headers.items())
    items += [(k, v) for k, v in headers.items() if k.lower() == case.ts_header]
    assert _rejects(case, body, items) == "duplicate_header"


@pytest.mark.parametrize(
    "garbage", ["é" * 40, "\udcff\udcfe", "sha256=\x00\x01\u2028", "v1,\udc80 v1=é", "😀"]
)
@pytest.mark.parametrize("name", HEADER_SIGS)
def test_provider_non_ascii_garbage_header_rejected(name: str, garbage: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.sig_header)
    headers[header] = (case.prefix or "") + garbage
    _rejects(case, body, headers)
    headers[header] = garbage
    _rejects(case, body, headers)


@pytest.mark.parametrize("name", [n for n in ALL if CASES[n].ts_header])
def test_provider_non_ascii_garbage_timestamp_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.ts_header)
    headers[header] = "\udcff17000000é"
    _rejects(case, body, headers)


@pytest.mark.parametrize("name", HEADER_SIGS)
def test_provider_missing_signature_rejected(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    del headers[next(k for k in headers if k.lower() == case.sig_header)]
    assert _rejects(case, body, headers) == "missing"


@pytest.mark.parametrize("name", LISTS)
def test_provider_list_one_bad_one_good_entry_passes(name: str) -> None:
    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.sig_header)
    combine = case.list_bad_good
    assert combine is not None
    headers[header] = combine(headers[header])
    assert case.verify(body, headers) is not None


@pytest.mark.parametrize("name", LISTS)
def test_provider_list_only_bad_entries_rejected(name: str) -> None:
    case = CASES[name]
    bad_body, bad_headers = case.request("other")
    header = next(k for k in bad_headers if k.lower() == case.sig_header)
    combine = case.list_bad_good
    assert combine is not None
    _rejects(case, bad_body, {**bad_headers, header: combine(bad_headers[header])})


@pytest.mark.parametrize("name", LISTS)
def test_provider_list_of_more_than_32_signatures_rejected(name: str) -> None:
    """Providers send one to three signatures; a header of thousands is an attempt to make the sidecar compute
    forever (one comparison per candidate and key). Up to MAX_CANDIDATES (32) are tried, more are refused as
    malformed before any is, a good one among them or not."""
    from sidecar.providers.engine import MAX_CANDIDATES

    case = CASES[name]
    body, headers = case.request()
    header = next(k for k in headers if k.lower() == case.sig_header)
    combine = case.list_bad_good
    assert combine is not None and MAX_CANDIDATES == 32
    good = headers[header]
    one_bad = combine(good)  # the good value with one bad entry put in: where, and what
    at = next(i for i, (a, b) in enumerate(zip(good, one_bad, strict=False)) if a != b)
    entry = one_bad[at : at + len(one_bad) - len(good)]
    assert one_bad == good[:at] + entry + good[at:]

    def with_bad(n: int) -> str:
        return good[:at] + entry * n + good[at:]

    # 31 bad ones and the good one: tried; one more bad one: refused
    assert case.verify(body, {**headers, header: with_bad(MAX_CANDIDATES - 1)}) is not None
    assert _rejects(case, body, {**headers, header: with_bad(MAX_CANDIDATES)}) == "malformed"
