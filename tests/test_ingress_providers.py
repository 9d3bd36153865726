"""Every provider end to end through the real sidecar: a request signed the way the provider signs it is forwarded
byte-identical; a tampered body, a wrong secret and a stale timestamp get 401 and nothing reaches the upstream;
the second of two configured secrets is accepted. Signers and secrets come from tests/providers/provider_cases.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

import pytest
import redis

from sidecar.providers.base import VerificationError
from tests.conftest import Upstream
from tests.providers.provider_cases import CASES, Case
from tests.test_ingress import stored_keys


def route_yaml(name: str, case: Case, secrets: list[str]) -> str:
    lines = [
        f"- name: {name}",
        f"  path: /in/{name}",
        f"  provider: {case.provider}",
        f"  secrets: {json.dumps(secrets)}",
        f"  public_url: {json.dumps(case.url)}",
    ]
    if case.signature is not None:
        lines.append(f"  signature: {json.dumps(case.signature)}")
    if not has_auto_id(case):
        lines.append("  event_id: body_sha256")
    return "\n".join(lines)


def has_auto_id(case: Case) -> bool:
    body, headers = case.request("good", ts=int(time.time()))
    try:
        verified = case.verify(body, headers, now=time.time())
    except VerificationError:
        return False
    return verified.event_id is not None and verified.handshake is None


@pytest.fixture
async def provider_client(sidecar_factory: Any) -> Any:
    routes = []
    for key, case in CASES.items():
        name = key.replace("-", "_")
        routes.append(route_yaml(name, case, [case.good]))
        routes.append(route_yaml(f"{name}_rot", case, [case.other, case.good]))
    return await sidecar_factory("\n".join(routes))


def names() -> list[str]:
    return list(CASES)


async def post(client: Any, name: str, body: bytes, headers: dict[str, str]) -> Any:
    return await client.post(
        f"/in/{name}", data=body, headers={"Content-Type": "application/json", **headers}
    )


@pytest.mark.parametrize("key", names())
async def test_ingress_provider_signed_request_forwarded_byte_identical(
    provider_client: Any, upstream: Upstream, key: str
) -> None:
    case, name = CASES[key], key.replace("-", "_")
    body, headers = case.request("good", ts=int(time.time()))
    resp = await post(provider_client, name, body, headers)
    assert resp.status == 200, await resp.text()
    [got] = upstream.received
    assert got.body == body
    for header, value in headers.items():
        assert got.headers[header.lower()] == value
    assert got.headers["x-sidecar-route"] == name


@pytest.mark.parametrize("key", names())
async def test_ingress_provider_forgeries_rejected_and_never_forwarded(
    provider_client: Any, upstream: Upstream, rdb: redis.Redis, key: str
) -> None:
    case, name = CASES[key], key.replace("-", "_")
    now = int(time.time())
    body, headers = case.request("good", ts=now)
    tampered = await post(provider_client, name, case.tampered(body), headers)
    assert tampered.status == 401
    body_o, headers_o = case.request("other", ts=now)
    wrong = await post(provider_client, name, body_o, headers_o)
    assert wrong.status == 401
    assert (await wrong.json())["error"] == "invalid_signature"
    if case.window:
        old_body, old_headers = case.request("good", ts=now - int(case.window) - 120)
        stale = await post(provider_client, name, old_body, old_headers)
        assert stale.status == 401
        assert (await stale.json())["error"] == "timestamp_out_of_tolerance"
    assert upstream.received == []
    assert stored_keys(rdb) == []


@pytest.mark.parametrize("key", names())
async def test_ingress_provider_second_secret_accepted(
    provider_client: Any, upstream: Upstream, key: str
) -> None:
    case, name = CASES[key], key.replace("-", "_")
    body, headers = case.request("good", ts=int(time.time()))
    resp = await post(provider_client, f"{name}_rot", body, headers)
    assert resp.status == 200, await resp.text()
    assert [r.body for r in upstream.received] == [body]


TWILIO_TOKEN = "twilio_auth_token_e2e"
TWILIO_ROUTES = """
- name: tw
  path: /in/tw
  provider: twilio
  secrets: ["twilio_auth_token_e2e"]
  public_url: "https://mycompany.com/in/tw"
  event_id: body_sha256
- name: twq
  path: /in/twq
  provider: twilio
  secrets: ["twilio_auth_token_e2e"]
  public_url: "https://mycompany.com/in/twq?tenant=acme"
  event_id: body_sha256
- name: twf
  path: /in/twf
  provider: twilio
  secrets: ["twilio_auth_token_e2e"]
  public_url: "https://mycompany.com/in/twf#rc=3&rp=all"
"""


@pytest.mark.parametrize(
    "query", ["?x=a%20b", "?x=a+b", "?x=%C3%A9", "?x=%7E", "?from=%2B15005550006&x=%26y"]
)
async def test_ingress_twilio_query_is_signed_as_it_arrived(
    sidecar_factory: Any, upstream: Upstream, query: str
) -> None:
    """Twilio signs the URL it called with the query exactly as sent (percent-encoding kept): the SDK's signature
    over public_url + that query verifies, and the query reaches the upstream unchanged."""
    from twilio.request_validator import RequestValidator
    from yarl import URL

    client = await sidecar_factory(TWILIO_ROUTES)
    params = {"CallSid": "CA" + "1" * 32, "From": "+15005550006"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(
        f"https://mycompany.com/in/tw{query}", params
    )
    target = URL(f"http://{client.server.host}:{client.server.port}/in/tw{query}", encoded=True)
    headers = {"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"}
    async with client.session.post(target, data=urlencode(params), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    [got] = upstream.received
    assert got.path_qs == f"/in/tw{query}"


async def test_ingress_twilio_body_sha256_on_a_public_url_with_its_own_query(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """A JSON Twilio request: Twilio appends `bodySHA256` to the query of the URL it was given, so the signed URL is
    the request's query, not the configured one alone."""
    from twilio.request_validator import RequestValidator
    from yarl import URL

    client = await sidecar_factory(TWILIO_ROUTES)
    body = '{"event":"call.completed","sid":"CA1"}'
    sdk = RequestValidator(TWILIO_TOKEN)
    query = f"?tenant=acme&bodySHA256={sdk.compute_hash(body)}"
    signature = sdk.compute_signature(f"https://mycompany.com/in/twq{query}", {})
    assert sdk.validate(f"https://mycompany.com/in/twq{query}", body, signature)
    target = URL(f"http://{client.server.host}:{client.server.port}/in/twq{query}", encoded=True)
    headers = {"X-Twilio-Signature": signature, "Content-Type": "application/json"}
    async with client.session.post(target, data=body.encode(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert [r.body for r in upstream.received] == [body.encode()]


@pytest.mark.parametrize(
    "signed_url", ["https://mycompany.com/in/twf#rc=3&rp=all", "https://mycompany.com/in/twf"]
)
async def test_ingress_twilio_public_url_with_connection_overrides(
    sidecar_factory: Any, upstream: Upstream, signed_url: str
) -> None:
    """A Twilio URL with `#rc=…&rp=…` connection overrides (providers.md 8: whether Twilio signs the fragment is
    unconfirmed; it never reaches the wire): the route's public_url keeps it, and a request signed either way
    verifies."""
    from twilio.request_validator import RequestValidator

    client = await sidecar_factory(TWILIO_ROUTES)
    params = {"CallSid": "CA" + "2" * 32, "From": "+15005550006"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(signed_url, params)
    headers = {"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"}
    async with client.post("/in/twf", data=urlencode(params), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    [got] = upstream.received
    assert got.body == urlencode(params).encode()
    forged = RequestValidator(TWILIO_TOKEN).compute_signature("https://elsewhere.example/in/twf", params)
    async with client.post(
        "/in/twf", data=urlencode(params), headers={**headers, "X-Twilio-Signature": forged}
    ) as resp:
        assert resp.status == 401, await resp.text()


NO_ID_BODIES = {
    # payload kinds that carry no event id of their own: the digest of the signed bytes is their identity; a batch
    # is known by its elements' ids
    "discord": b'{"version":1,"application_id":"1","type":1,"event":{"type":"APPLICATION_AUTHORIZED","data":{}}}',
    "slack": b"token=x&team_id=T1&command=%2Fweather&text=94070&trigger_id=13345224609.738474920.8088930838d",
    "x": b'{"for_user_id":"2244994945","tweet_create_events":[{"id_str":"1"}]}',
    "hubspot": b'[{"eventId":1,"subscriptionId":2,"portalId":3,"subscriptionType":"contact.creation"}]',
    "sendgrid": b'[{"email":"a@example.com","event":"delivered","sg_event_id":"sg1"}]\r\n',
}


@pytest.mark.parametrize("key", sorted(NO_ID_BODIES))
async def test_ingress_auto_id_of_a_payload_without_one_is_its_signed_digest(
    sidecar_factory: Any, upstream: Upstream, key: str
) -> None:
    """`event_id: auto` (the default) on a payload kind without an id of its own (a Discord Webhook Event, a Slack
    slash command, an X activity event, a HubSpot or SendGrid batch) is delivered once, not refused 400: the
    digest of the signed bytes identifies it, so the same delivery again is a duplicate."""
    case = CASES[key]
    lines = [
        "- name: r",
        "  path: /in/r",
        f"  provider: {case.provider}",
        f"  secrets: {json.dumps([case.good])}",
        f"  public_url: {json.dumps(case.url)}",
    ]
    client = await sidecar_factory("\n".join(lines))
    body, headers = case.request(ts=int(time.time()), body=NO_ID_BODIES[key])
    first = await post(client, "r", body, headers)
    assert first.status == 200, await first.text()
    expected = {"hubspot": ":3:2:1", "sendgrid": "sg1"}.get(key, hashlib.sha256(body).hexdigest())
    assert first.headers["X-Sidecar-Event-Id"] == expected
    again = await post(client, "r", body, headers)
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert [r.body for r in upstream.received] == [body]


async def test_ingress_mailgun_token_is_single_use_across_bodies(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """Mailgun signs only `timestamp + token`: a captured signature could carry any `event-data` for the whole
    freshness window. The token is bound to the body it first came with: the same delivery again is a duplicate,
    another body under that token is refused 401 (and never forwarded), a fresh token is a new event."""
    from tests.providers.provider_cases import mailgun_body

    client = await sidecar_factory(
        '- name: mg\n  path: /in/mg\n  provider: mailgun\n  secrets: ["mg-good"]\n'
        '- name: mg2\n  path: /in/mg2\n  provider: mailgun\n  secrets: ["mg-good"]\n'
    )
    now, token = int(time.time()), "t" * 50
    headers = {"Content-Type": "application/json"}
    real = mailgun_body("mg-good", now, token=token, event_id="evt-real")
    forged = mailgun_body("mg-good", now, token=token, event_id="evt-forged")
    assert (await post(client, "mg", real, headers)).status == 200
    again = await post(client, "mg", real, headers)
    assert again.status == 200 and (await again.json())["duplicate"] is True
    refused = await post(client, "mg", forged, headers)
    assert refused.status == 401, await refused.text()
    assert (await refused.json())["error"] == "invalid_signature"
    # routes of one provider share its signing key: a token spent on one is spent on all
    elsewhere = await post(client, "mg2", forged, headers)
    assert elsewhere.status == 401, await elsewhere.text()
    fresh = mailgun_body("mg-good", now, token="u" * 50, event_id="evt-forged")
    assert (await post(client, "mg", fresh, headers)).status == 200
    assert [r.body for r in upstream.received] == [real, fresh]
    (key,) = rdb.keys("*:nonce:mailgun:" + token)
    window = 8 * 3600 + 30 * 60
    assert (
        0 < rdb.pttl(key) <= (2 * window + 60) * 1000
    )  # as long as the timestamp could pass, plus clock skew


async def test_ingress_mailgun_retry_hours_later_with_the_first_signature_is_accepted_once(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """Mailgun retries for 8 hours, and a retry carries the first attempt's signature block: one that comes 4 h
    later must still be accepted (the first attempt may have failed before the sidecar stored it), and again
    after that it is a duplicate."""
    from tests.providers.provider_cases import mailgun_body

    client = await sidecar_factory(
        '- name: mg\n  path: /in/mg\n  provider: mailgun\n  secrets: ["mg-good"]\n'
    )
    headers = {"Content-Type": "application/json"}
    body = mailgun_body("mg-good", int(time.time()) - 4 * 3600, token="r" * 50, event_id="evt-late")
    first = await post(client, "mg", body, headers)
    assert first.status == 200, await first.text()
    again = await post(client, "mg", body, headers)
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert [r.body for r in upstream.received] == [body]
    stale = mailgun_body("mg-good", int(time.time()) - 9 * 3600, token="s" * 50, event_id="evt-stale")
    assert (await post(client, "mg", stale, headers)).status == 401


async def test_ingress_mailgun_legacy_form_post_without_event_id_is_delivered_once(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory(
        '- name: mg\n  path: /in/mg\n  provider: mailgun\n  secrets: ["mg-good"]\n'
    )
    ts, token = str(int(time.time())), "f" * 50
    signature = hmac.new(b"mg-good", (ts + token).encode(), hashlib.sha256).hexdigest()
    body = urlencode({"timestamp": ts, "token": token, "signature": signature, "event": "delivered"}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (await post(client, "mg", body, headers)).status == 200
    again = await post(client, "mg", body, headers)
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert [r.body for r in upstream.received] == [body]


async def test_ingress_twilio_request_respelled_under_a_new_token_is_a_duplicate(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """Twilio signs the decoded, sorted parameters, so a captured request reordered or re-encoded still verifies;
    with a new (unsigned) idempotency token it must still be the same event, not a second delivery."""
    from urllib.parse import quote

    from twilio.request_validator import RequestValidator

    client = await sidecar_factory(
        '- name: tw\n  path: /in/tw\n  provider: twilio\n  secrets: ["twilio_auth_token_e2e"]\n'
        '  public_url: "https://mycompany.com/in/tw"\n'
    )
    params = [("CallSid", "CA" + "2" * 32), ("From", "+15005550006"), ("Body", "hello world")]
    signature = RequestValidator(TWILIO_TOKEN).compute_signature("https://mycompany.com/in/tw", dict(params))
    form = {"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"}
    real = urlencode(params).encode()
    respelled = urlencode(list(reversed(params)), quote_via=quote).encode()
    first = await post(client, "tw", real, {**form, "I-Twilio-Idempotency-Token": "idem-a"})
    assert first.status == 200, await first.text()
    again = await post(client, "tw", respelled, {**form, "I-Twilio-Idempotency-Token": "idem-b"})
    assert again.status == 200 and (await again.json())["duplicate"] is True
    # the token taken away: the same event too (it was keyed by the bare digest then: a second delivery)
    bare = await post(client, "tw", real, form)
    assert bare.status == 200 and (await bare.json())["duplicate"] is True, await bare.text()
    assert [r.body for r in upstream.received] == [real]
    # and the other way round: first without a token, then with one
    params[2] = ("Body", "another")
    signature = RequestValidator(TWILIO_TOKEN).compute_signature("https://mycompany.com/in/tw", dict(params))
    form["X-Twilio-Signature"] = signature
    other = urlencode(params).encode()
    assert (await post(client, "tw", other, form)).status == 200
    tokened = await post(client, "tw", other, {**form, "I-Twilio-Idempotency-Token": "idem-c"})
    assert tokened.status == 200 and (await tokened.json())["duplicate"] is True, await tokened.text()
    assert [r.body for r in upstream.received] == [real, other]


async def test_ingress_provider_none_with_auto_id_is_known_by_its_body(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory("- name: open\n  path: /in/open\n  provider: none\n")
    body = b'{"anything": true}'
    first = await post(client, "open", body, {})
    assert first.status == 200, await first.text()
    assert first.headers["X-Sidecar-Event-Id"] == hashlib.sha256(body).hexdigest()
    again = await post(client, "open", body, {})
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert [r.body for r in upstream.received] == [body]


async def test_ingress_linear_retry_re_signed_with_a_new_timestamp_is_a_duplicate(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    """Linear stamps each attempt (`webhookTimestamp`, checked within 60 s), so a retry is a new body under the same
    Linear-Delivery: it must be a duplicate. A capture replayed under another (unsigned) Linear-Delivery must be one
    too, and a different event stays a new one."""
    client = await sidecar_factory(
        '- name: lin\n  path: /in/lin\n  provider: linear\n  secrets: ["lin_secret_e2e"]\n'
    )

    def linear(ts_ms: int, delivery: str, data_id: str = "iss-1") -> tuple[bytes, dict[str, str]]:
        body = json.dumps(
            {
                "action": "update",
                "type": "Issue",
                "createdAt": "2026-11-25T10:00:00.000Z",
                "organizationId": "org-1",
                "data": {"id": data_id},
                "webhookId": "wh-1",
                "webhookTimestamp": ts_ms,
            }
        ).encode()
        sig = hmac.new(b"lin_secret_e2e", body, hashlib.sha256).hexdigest()
        return body, {"Linear-Signature": sig, "Linear-Delivery": delivery}

    now_ms = int(time.time() * 1000)
    first_body, first_headers = linear(now_ms - 20_000, "del-1")
    first = await post(client, "lin", first_body, first_headers)
    assert first.status == 200, await first.text()
    assert first.headers["X-Sidecar-Event-Id"] == "del-1"
    retry = await post(client, "lin", *linear(now_ms, "del-1"))
    assert retry.status == 200 and (await retry.json())["duplicate"] is True
    replay = await post(client, "lin", first_body, {**first_headers, "Linear-Delivery": "forged-2"})
    assert replay.status == 200 and (await replay.json())["duplicate"] is True
    other_body, other_headers = linear(now_ms, "del-3", data_id="iss-2")
    other = await post(client, "lin", other_body, other_headers)
    assert other.status == 200 and (await other.json()).get("duplicate") is not True
    assert [r.body for r in upstream.received] == [first_body, other_body]


async def test_ingress_signed_id_unfit_for_a_key_falls_back_to_the_body_digest(
    sidecar_factory: Any, upstream: Upstream, rdb: redis.Redis
) -> None:
    """A signed id (PagerDuty's event.id, Linear's body fields) gets the public id's check: a lone surrogate, a
    control character or 3,000 characters is no key, so the delivery dedupes on its body's digest instead."""
    client = await sidecar_factory(
        '- name: pd\n  path: /in/pd\n  provider: pagerduty\n  secrets: ["pd_secret_e2e"]\n'
        '- name: lin\n  path: /in/lin\n  provider: linear\n  secrets: ["lin_secret_e2e"]\n'
    )
    now_ms = int(time.time() * 1000)
    for n, bad in enumerate(['"\\ud800"', '"a\\nb"', '"a\\u0000b"', json.dumps("x" * 3000)]):
        pd = b'{"event":{"id":%s,"event_type":"incident.triggered"}}' % bad.encode()
        lin = (
            b'{"action":"create","type":"Issue","organizationId":"o","createdAt":"c","webhookTimestamp":%d,'
            b'"data":{"id":%s}}' % (now_ms, bad.encode())
        )
        for name, body, sign in (
            ("pd", pd, lambda b: {"X-PagerDuty-Signature": "v1=" + _hex("pd_secret_e2e", b)}),
            ("lin", lin, lambda b: {"Linear-Signature": _hex("lin_secret_e2e", b)}),
        ):
            id_header = "X-Webhook-Id" if name == "pd" else "Linear-Delivery"
            first = await post(client, name, body, {**sign(body), id_header: f"d-{n}"})
            assert first.status == 200, (name, bad, await first.text())
            again = await post(client, name, body, {**sign(body), id_header: f"forged-{n}"})
            assert again.status == 200 and (await again.json())["duplicate"] is True, (name, bad)
    assert len(upstream.received) == 8
    for key in rdb.keys("*"):
        assert len(key) < 400 and key.decode("ascii").isprintable(), key


def _hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
