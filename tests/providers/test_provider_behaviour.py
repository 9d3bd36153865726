"""Handshakes (§24), event ids and types, the UTF-8 rule, JSON parsed at most once, config-load errors."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.parse
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from provider_cases import (
    CASES,
    NOW,
    TWILIO_PARAMS,
    TWILIO_URL,
    URL,
    b64,
    inbound,
    mac,
    twilio_string,
    verify,
)

from sidecar.providers import request as request_module
from sidecar.providers.base import ProviderConfigError, TimestampError, VerificationError, usable_id
from sidecar.providers.registry import PROVIDERS, Guarded, build_verifier


def _slack_headers(body: bytes, secret: str = "slack-good", ts: int = NOW) -> dict[str, str]:
    return {
        "X-Slack-Signature": "v0=" + mac(secret, b"v0:%d:" % ts + body).hex(),
        "X-Slack-Request-Timestamp": str(ts),
    }


# ---- handshakes ---------------------------------------------------------------------------------------------------


def test_slack_url_verification_verified_then_answered() -> None:
    body = b'{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}'
    got = verify("slack", ["slack-good"], body, _slack_headers(body))
    assert got.handshake is not None
    assert (got.handshake.status, got.handshake.content_type) == (200, "application/json")
    assert json.loads(got.handshake.body) == {
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    }
    assert got.event_id is None
    with pytest.raises(VerificationError):
        verify("slack", ["slack-good"], body, _slack_headers(body, "slack-other"))


def test_slack_event_id_and_type() -> None:
    body = b'{"type":"event_callback","event_id":"Ev08MFMKH6","event":{"type":"app_mention"}}'
    got = verify("slack", ["slack-good"], body, _slack_headers(body))
    assert (got.event_id, got.id_signed, got.event_type, got.handshake) == (
        "Ev08MFMKH6",
        True,
        "app_mention",
        None,
    )


def test_slack_ssl_check_is_unsigned_handshake() -> None:
    verifier = build_verifier("slack", ["slack-good"], None, None)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = verifier.unsigned_handshake(inbound(b"ssl_check=1&token=abc", form))
    assert answer is not None
    assert (answer.status, answer.body, answer.relay) == (200, b"", True)
    assert verifier.unsigned_handshake(inbound(b"ssl_check=0&token=abc", form)) is None
    assert (
        verifier.unsigned_handshake(inbound(b'{"ssl_check":"1"}', {"Content-Type": "application/json"}))
        is None
    )
    assert verifier.unsigned_handshake(inbound(b"ssl_check=1", form, method="GET")) is None
    duplicate = [("Content-Type", form["Content-Type"])] * 2
    assert verifier.unsigned_handshake(inbound(b"ssl_check=1", duplicate)) is None
    # Slack's is `ssl_check=1&token=…`: a large form, or ssl_check given twice, is no ssl_check (verified instead)
    assert verifier.unsigned_handshake(inbound(b"ssl_check=1&token=" + b"a" * 4096, form)) is None
    assert verifier.unsigned_handshake(inbound(b"ssl_check=0&ssl_check=1", form)) is None
    # a field beyond ssl_check and token, even an empty one: answered, never relayed (nothing of it is signed)
    blank = verifier.unsigned_handshake(inbound(b"ssl_check=1&token=t&team_id=", form))
    assert blank is not None and blank.status == 200 and not blank.relay


def test_intercom_and_pagerduty_pings_are_handshakes() -> None:
    """providers.md §24: "Intercom, PagerDuty: test/ping notifications, just 2xx after verification"."""
    for provider, ping, event in [
        (
            "intercom",
            b'{"type": "notification_event", "topic": "ping", "id": null, "data": {"item": {"message": "hi"}}}',
            b'{"type": "notification_event", "topic": "conversation.user.created", "id": "notif_1"}',
        ),
        (
            "pagerduty",
            b'{"event": {"id": "01PING", "event_type": "pagey.ping", "data": {}}}',
            b'{"event": {"id": "01INC", "event_type": "incident.triggered", "data": {}}}',
        ),
    ]:
        case = CASES[provider]
        got = case.verify(*case.request(body=ping))
        assert got.handshake is not None and got.handshake.status == 200, provider
        assert case.verify(*case.request(body=event)).handshake is None, provider


def _discord(body: bytes) -> dict[str, str]:
    return CASES["discord"].sign("good", body, NOW)[1]


def test_discord_interactions_ping_answered_with_pong() -> None:
    body = b'{"type":1,"id":"123","application_id":"9","token":"tok","version":1}'
    got = CASES["discord"].verify(body, _discord(body))
    assert got.handshake is not None
    assert (got.handshake.status, got.handshake.body) == (200, b'{"type":1}')


def test_discord_webhook_events_ping_answered_204() -> None:
    body = b'{"version":1,"application_id":"1234560123453231555","type":0}'
    got = CASES["discord"].verify(body, _discord(body))
    assert got.handshake is not None
    assert (got.handshake.status, got.handshake.body) == (204, b"")


def test_discord_webhook_event_is_not_a_handshake() -> None:
    body = b'{"version":1,"application_id":"1","type":1,"event":{"type":"APPLICATION_AUTHORIZED","data":{}}}'
    got = CASES["discord"].verify(body, _discord(body))
    digest = hashlib.sha256(body).hexdigest()  # Webhook Events carry no id: the signed bytes are the identity
    assert (got.handshake, got.event_id, got.id_signed, got.event_type) == (
        None,
        digest,
        True,
        "APPLICATION_AUTHORIZED",
    )


def test_discord_interaction_id() -> None:
    body = b'{"type":2,"id":"1122334455","token":"t"}'
    got = CASES["discord"].verify(body, _discord(body))
    assert (got.handshake, got.event_id, got.id_signed) == (None, "1122334455", True)


def test_discord_ping_with_bad_signature_rejected() -> None:
    body = b'{"type":1}'
    headers = _discord(body)
    headers["X-Signature-Ed25519"] = "00" * 64
    with pytest.raises(VerificationError):
        CASES["discord"].verify(body, headers)


def test_zoom_url_validation_answered_with_the_verifying_secret() -> None:
    body = b'{"payload":{"plainToken":"qgg8vlvZRS6UYooatFL8Aw"},"event_ts":1654503849680,"event":"endpoint.url_validation"}'
    headers = {
        "x-zm-signature": "v0=" + mac("zoom_secret_token", b"v0:%d:" % NOW + body).hex(),
        "x-zm-request-timestamp": str(NOW),
    }
    got = verify("zoom", ["another-token", "zoom_secret_token"], body, headers)
    assert got.handshake is not None
    assert json.loads(got.handshake.body) == {
        "plainToken": "qgg8vlvZRS6UYooatFL8Aw",
        "encryptedToken": "bd48235863f4a6323ccc4963c594908b7c97f88b4a6a95278f4f093690b12726",
    }


def test_zoom_url_validation_without_a_plain_token_is_refused_not_taken_as_an_event() -> None:
    """A signed `endpoint.url_validation` with no string `payload.plainToken` cannot be answered: a 401, not an
    event claimed and forwarded under its body's digest."""
    case = CASES["zoom"]
    for payload in (b"{}", b'{"plainToken":7}', b"null"):
        body = b'{"payload":%s,"event_ts":1654503849680,"event":"endpoint.url_validation"}' % payload
        with pytest.raises(VerificationError) as info:
            case.verify(*case.request(body=body))
        assert info.value.reason == "malformed", payload


def test_zoom_event_composite_id() -> None:
    body = (
        b'{"event":"meeting.started","event_ts":1700000000123,'
        b'"payload":{"account_id":"acc","object":{"uuid":"u==","id":"85"}}}'
    )
    headers = {
        "x-zm-signature": "v0=" + mac("z", b"v0:%d:" % NOW + body).hex(),
        "x-zm-request-timestamp": str(NOW),
    }
    got = verify("zoom", ["z"], body, headers)
    assert (got.event_id, got.id_signed, got.event_type) == (
        "meeting.started:1700000000123:acc:u==",
        True,
        "meeting.started",
    )


@pytest.mark.parametrize("provider", ["x", "twitter"])
def test_x_crc_only_on_get_with_token(provider: str) -> None:
    verifier = build_verifier(provider, ["first", "second"], None, None)
    url = URL + "&crc_token=abc"
    answer = verifier.unsigned_handshake(inbound(b"", {}, url=url, method="GET"))
    assert answer is not None
    expected = "sha256=" + base64.b64encode(mac("first", b"abc")).decode()
    assert json.loads(answer.body) == {"response_token": expected}
    assert verifier.unsigned_handshake(inbound(b"", {}, url=url, method="POST")) is None
    assert verifier.unsigned_handshake(inbound(b"", {}, url=URL, method="GET")) is None


@pytest.mark.parametrize("provider", ["x", "twitter"])
def test_x_crc_is_no_signing_oracle(provider: str) -> None:
    """The CRC answer is HMAC(consumer secret, token), base64: a POST's signature over a body equal to the token.
    A token that could be an event body (JSON) is refused, not signed."""
    verifier = build_verifier(provider, ["first"], None, None)
    for forged in (
        '{"for_user_id":"1","tweet_delete_events":[]}',
        "  [1]",
        '"x"',
        "12",
        "-1.5e3",
        "null",
        "\ufeff{}",
        '/**/{"a":1}',
        "--- {a: 1}",
    ):
        url = URL + "&crc_token=" + urllib.parse.quote(forged, safe="")
        answer = verifier.unsigned_handshake(inbound(b"", {}, url=url, method="GET"))
        assert answer is not None and answer.status == 400, forged
        assert json.loads(answer.body)["error"] == "bad_crc_token", forged
    twice = URL + "&crc_token=a&crc_token=b"
    answer = verifier.unsigned_handshake(inbound(b"", {}, url=twice, method="GET"))
    assert answer is not None and answer.status == 400
    for length, status in ((512, 200), (513, 400)):  # MAX_CRC_TOKEN: X's tokens are short
        url = URL + "&crc_token=" + "a" * length
        answer = verifier.unsigned_handshake(inbound(b"", {}, url=url, method="GET"))
        assert answer is not None and answer.status == status, length
    # X's own tokens (a UUID, base64 whose + arrived as a space, a word) are still answered
    for token in ("9b4507b3-9040-4669-9ca3-6b94edb50553", "ab cd/ef==", "test-token!", "nullable"):
        url = URL + "&crc_token=" + urllib.parse.quote(token, safe="")
        answer = verifier.unsigned_handshake(inbound(b"", {}, url=url, method="GET"))
        assert answer is not None and answer.status == 200 and b"response_token" in answer.body, token


def test_github_ping_is_a_handshake_after_verification() -> None:
    """providers.md §24: "GitHub | X-GitHub-Event: ping | yes | just 2xx after verification"; it was taken as an
    event (stored, forwarded, retried)."""
    body = b'{"zen":"Design for failure.","hook_id":1}'
    headers = {
        "X-Hub-Signature-256": "sha256=" + mac("gh", body).hex(),
        "X-GitHub-Event": "ping",
        "X-GitHub-Delivery": "d-1",
    }
    got = verify("github", ["gh"], body, headers)
    assert got.handshake is not None and (got.handshake.status, got.event_id) == (200, None)
    with pytest.raises(VerificationError):
        verify("github", ["other"], body, headers)


def test_unsigned_handshake_is_none_for_other_providers() -> None:
    for name in sorted(PROVIDERS - {"hmac", "none", "x", "twitter", "slack"}):
        case = next((c for c in CASES.values() if c.provider == name), None)
        secrets = [case.good] if case else ["whsec_" + b64(bytes(24))]
        verifier = build_verifier(name, secrets, None, None)
        assert (
            verifier.unsigned_handshake(inbound(b"ssl_check=1", {}, url=URL + "&crc_token=1", method="GET"))
            is None
        )


# ---- event ids and types ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("stripe", b'{"id":"evt_9","type":"invoice.paid"}', ("evt_9", True, "invoice.paid")),
        ("workos", b'{"id":"event_01","event":"user.created"}', ("event_01", True, "user.created")),
        (
            "paddle",
            b'{"event_id":"evt_p","event_type":"transaction.paid"}',
            ("evt_p", True, "transaction.paid"),
        ),
        (
            "intercom",
            b'{"id":"notif_1","topic":"conversation.user.created"}',
            ("notif_1", True, "conversation.user.created"),
        ),
        ("square", b'{"event_id":"uuid-1","type":"payment.created"}', ("uuid-1", True, "payment.created")),
        ("typeform", b'{"event_id":"01H","event_type":"form_response"}', ("01H", True, "form_response")),
        (
            "calendly",
            b'{"event":"invitee.created","created_at":"2024-01-01T00:00:00Z","payload":{"uri":"https://api.calendly.com/i/1"}}',
            ("invitee.created:https://api.calendly.com/i/1:2024-01-01T00:00:00Z", True, "invitee.created"),
        ),
        # no id in the payload (X): the digest of the signed bytes; a batch (HubSpot, SendGrid): its elements' ids
        ("x", b'{"for_user_id":"1","tweet_create_events":[]}', ("sha256", True, None)),
        ("hubspot", b'[{"eventId":1,"subscriptionId":2,"portalId":3}]', (":3:2:1", True, None)),
        ("sendgrid", b'[{"sg_event_id":"a"}]\r\n', ("a", True, None)),
        ("sendgrid", b'[{"sg_event_id":"a"},{"email":"no id"}]\r\n', ("sha256", True, None)),
        ("hmac", b'{"id":"acme-1"}', ("acme-1", True, None)),
    ],
)
def test_provider_event_id_and_type(name: str, body: bytes, expected: tuple[Any, ...]) -> None:
    case = CASES[name]
    signed_body, headers = case.request(body=body)
    got = case.verify(signed_body, headers)
    if expected[0] == "sha256":
        expected = (hashlib.sha256(signed_body).hexdigest(), *expected[1:])
    assert (got.event_id, got.id_signed, got.event_type) == expected


def test_batch_is_known_by_its_elements_ids_whatever_else_a_resend_changes() -> None:
    case = CASES["hubspot"]
    first = b'[{"eventId":7,"attemptNumber":0},{"eventId":5,"attemptNumber":0}]'
    resend = b'[{"eventId":5,"attemptNumber":1},{"eventId":7,"attemptNumber":1}]'
    ids = {case.verify(*case.request(body=body)).event_id for body in (first, resend)}
    assert ids == {
        "batch:" + hashlib.sha256(b":::5\n:::7").hexdigest()
    }  # appId:portalId:subscriptionId absent


def test_hubspot_notifications_are_known_by_app_portal_subscription_and_event_id() -> None:
    """HubSpot does not promise `eventId` alone is unique: the same eventId from another portal, app or subscription
    is another notification, and a batch keeps each element's whole key."""
    case = CASES["hubspot"]

    def key(body: bytes) -> str | None:
        return case.verify(*case.request(body=body)).event_id

    one = b'[{"appId":54321,"portalId":111,"subscriptionId":9001,"eventId":1001,"attemptNumber":0}]'
    other_portal = b'[{"appId":54321,"portalId":222,"subscriptionId":9001,"eventId":1001,"attemptNumber":0}]'
    other_sub = b'[{"appId":54321,"portalId":111,"subscriptionId":9002,"eventId":1001,"attemptNumber":0}]'
    retry = b'[{"appId":54321,"portalId":111,"subscriptionId":9001,"eventId":1001,"attemptNumber":3}]'
    assert key(one) == "54321:111:9001:1001" == key(retry)
    assert len({key(one), key(other_portal), key(other_sub)}) == 3
    pair = b'[{"portalId":1,"eventId":5},{"portalId":2,"eventId":5}]'
    assert key(pair) == "batch:" + hashlib.sha256(b":1::5\n:2::5").hexdigest()
    # an absent field keeps its place: a portal's notification and a subscription's are not one key
    assert key(b'[{"portalId":1,"eventId":5}]') != key(b'[{"subscriptionId":1,"eventId":5}]')


@pytest.mark.parametrize("name", ["hubspot", "sendgrid"])
@pytest.mark.parametrize("bad", ['"\\ud800"', '"a\\nb"'])
def test_batch_element_key_that_is_no_printable_text_falls_back_to_the_body_digest(
    name: str, bad: str
) -> None:
    """A validly signed batch is never a 401 for what its ids hold: an unusable key (a lone surrogate cannot even
    be encoded for the batch digest) makes the batch known by its body's digest, the extractor after `json[]:`."""
    field = "eventId" if name == "hubspot" else "sg_event_id"
    case = CASES[name]
    for body in (
        b'[{"%s":%s},{"%s":"7"}]' % (field.encode(), bad.encode(), field.encode()),  # the digest of the keys
        b'[{"%s":%s}]' % (field.encode(), bad.encode()),  # the one key: the ingress would refuse it (400)
    ):
        signed_body, headers = case.request(body=body)
        got = case.verify(signed_body, headers)
        assert (got.event_id, got.id_signed) == (hashlib.sha256(signed_body).hexdigest(), True)


@pytest.mark.parametrize("name", ["hubspot", "sendgrid"])
@pytest.mark.parametrize("key", ["\u00e9v\u00e9nement", "x" * 300])
def test_batch_of_one_whose_key_is_no_id_as_is_is_known_by_its_digest(name: str, key: str) -> None:
    """A batch of one took its key as the event id however it read: a non-ASCII or over-long key was then refused
    by the ingress (400 on every resend) while a batch of two with the same key was accepted."""
    field = "eventId" if name == "hubspot" else "sg_event_id"
    case = CASES[name]
    signed_body, headers = case.request(body=json.dumps([{field: key}]).encode())
    got = case.verify(signed_body, headers)
    assert got.event_id.startswith("batch:") and usable_id(got.event_id) and got.id_signed


def test_guarded_logs_the_exception_it_turns_into_a_401(caplog: pytest.LogCaptureFixture) -> None:
    class Buggy:
        def verify(self, req: Any) -> Any:
            return {}["no such key"]

        def unsigned_handshake(self, req: Any) -> None:
            return None

    guarded = Guarded(Buggy())  # type: ignore[arg-type]
    with pytest.raises(VerificationError) as info:
        guarded.verify(inbound(b"{}", {}))
    assert info.value.reason == "internal"
    [record] = [r for r in caplog.records if r.name == "sidecar.providers"]
    assert record.levelname == "WARNING"
    assert "KeyError at test_provider_behaviour.py:" in record.getMessage()


def test_guarded_unsigned_handshake_never_raises() -> None:
    """An unsigned handshake is looked for before any verification, for every request: a bug in it is "not a
    handshake" (the request is then verified), never a 500."""

    class Buggy:
        def verify(self, req: Any) -> Any:
            raise VerificationError("mismatch", "no")

        def unsigned_handshake(self, req: Any) -> None:
            return {}["no such key"]

    assert Guarded(Buggy()).unsigned_handshake(inbound(b"{}", {})) is None  # type: ignore[arg-type]


def test_zoom_participant_events_of_one_meeting_in_one_millisecond_are_distinct() -> None:
    case = CASES["zoom"]

    def joined(who: str) -> bytes:
        return json.dumps(
            {
                "event": "meeting.participant_joined",
                "event_ts": 1732530000123,
                "payload": {
                    "account_id": "acc1",
                    "object": {"uuid": "mtg==", "id": 85, "participant": {"user_id": who, "user_name": who}},
                },
            }
        ).encode()

    alice, bob = (case.verify(*case.request(body=joined(w))).event_id for w in ("alice", "bob"))
    assert alice == "meeting.participant_joined:1732530000123:acc1:mtg==:alice" and bob != alice
    # events without a participant or registrant keep the key they had
    started = b'{"event":"meeting.started","event_ts":1,"payload":{"account_id":"a","object":{"uuid":"u"}}}'
    assert case.verify(*case.request(body=started)).event_id == "meeting.started:1:a:u"


def test_zoom_registrations_of_one_meeting_in_one_millisecond_are_distinct() -> None:
    """Registrant events name the meeting as their object: who registered is part of the key, or the second of two
    registrations in one millisecond was answered `duplicate` and never delivered."""
    case = CASES["zoom"]

    def registered(who: str) -> bytes:
        return json.dumps(
            {
                "event": "meeting.registration_created",
                "event_ts": 1732530000123,
                "payload": {
                    "account_id": "acc1",
                    "object": {
                        "uuid": "mtg==",
                        "id": 85,
                        "registrant": {"id": who, "email": who + "@x.test"},
                    },
                },
            }
        ).encode()

    alice, bob = (case.verify(*case.request(body=registered(w))).event_id for w in ("alice", "bob"))
    assert alice == "meeting.registration_created:1732530000123:acc1:mtg==::alice" and bob != alice


def test_pagerduty_header_id_then_signed_body_id() -> None:
    case = CASES["pagerduty"]
    body = b'{"event":{"id":"01DEN","event_type":"incident.triggered"}}'
    signed_body, headers = case.request(body=body)
    got = case.verify(signed_body, headers)
    assert (got.event_id, got.id_signed, got.event_type) == ("pd-1", False, "incident.triggered")
    del headers["X-Webhook-Id"]
    got = case.verify(signed_body, headers)
    assert (got.event_id, got.id_signed) == ("01DEN", True)


def test_linear_header_id_then_signed_composite() -> None:
    case = CASES["linear"]
    body = (
        b'{"action":"create","type":"Issue","organizationId":"org","createdAt":"2024-01-01T00:00:00.000Z",'
        b'"data":{"id":"i1"}}'
    )
    signed_body, headers = case.request(body=body)
    assert case.verify(signed_body, headers).event_id == "del-1"
    del headers["Linear-Delivery"]
    got = case.verify(signed_body, headers)
    assert (got.event_id, got.id_signed, got.event_type) == (
        "org:Issue:create:i1:2024-01-01T00:00:00.000Z",
        True,
        "Issue",
    )


def test_linear_unparsable_body_timestamp_rejected() -> None:
    case = CASES["linear"]
    body = b'{"type":"Issue","webhookTimestamp":"soon"}'
    with pytest.raises(VerificationError):
        case.verify(*case.request(body=body))
    # providers.md §23.2 step 6: digits only, a non-negative JSON integer: a negative one is malformed, not stale
    for bad in (b"-1", b"true", b"1.5"):
        with pytest.raises(VerificationError) as info:
            case.verify(*case.request(body=b'{"type":"Issue","webhookTimestamp":%s}' % bad))
        assert info.value.reason == "malformed", bad


def test_twilio_is_identified_by_its_signed_string_not_its_body_bytes() -> None:
    """Twilio signs the URL and the decoded, sorted parameters: the same request reordered or re-encoded still
    verifies, so its identity (the digest it dedupes on, with an unsigned token or without one) is the signed
    string's, the same for every spelling."""
    case = CASES["twilio"]
    body, headers = case.request()
    signed = hashlib.sha256(twilio_string(TWILIO_URL, TWILIO_PARAMS)).hexdigest()
    got = case.verify(body, headers)
    assert (got.event_id, got.id_signed, got.signed_digest) == ("idem-1", False, signed)
    del headers["I-Twilio-Idempotency-Token"]
    respelled = urlencode(list(reversed(TWILIO_PARAMS)), quote_via=quote).encode()
    assert respelled != body
    for spelling in (body, respelled):
        got = case.verify(spelling, headers)
        # deduped on the same digest as with a token (not on the bare id): see the ingress test
        assert (got.event_id, got.id_signed, got.signed_digest) == (signed, False, signed)


def test_standardwebhooks_type_from_body() -> None:
    case = CASES["svix"]
    got = case.verify(*case.request(body=b'{"type":"user.created","data":{}}'))
    assert (got.event_id, got.id_signed, got.event_type) == ("msg_1", True, "user.created")
    assert got.signed_headers == {"svix-id", "svix-timestamp"}


def test_none_provider_is_always_verified_without_id() -> None:
    verifier = build_verifier("none", [], None, None)
    got = verifier.verify(inbound(b"\xff\xfe", {"X-Anything": "é"}))
    assert (got.event_id, got.handshake) == (
        None,
        None,
    )  # `event_id: auto`: the ingress takes the body's digest
    assert verifier.unsigned_handshake(inbound(b"", {}, method="GET")) is None


def test_body_that_is_not_json_has_no_body_id() -> None:
    case = CASES["stripe"]
    got = case.verify(*case.request(body=b"not json at all"))
    assert (got.event_id, got.event_type) == (None, None)


# ---- the UTF-8 rule and the single JSON parse ---------------------------------------------------------------------

UTF8_STRICT = ["stripe", "slack", "standardwebhooks", "svix", "workos", "paddle"]


@pytest.mark.parametrize("name", UTF8_STRICT)
def test_provider_non_utf8_body_rejected_like_sdk(name: str) -> None:
    case = CASES[name]
    with pytest.raises(VerificationError) as info:
        case.verify(*case.request(body=b'{"id":"\xff\xfe"}'))
    assert info.value.reason == "malformed"


def test_twilio_json_non_utf8_body_rejected() -> None:
    body = b'{"a":"\xff"}'
    url = "https://example.com/t?bodySHA256=" + hashlib.sha256(body).hexdigest()
    headers = {"X-Twilio-Signature": b64(mac("12345", url.encode(), "sha1"))}
    with pytest.raises(VerificationError):
        verify("twilio", ["12345"], body, headers, url=url)


def test_github_non_utf8_body_verifies_on_bytes() -> None:
    case = CASES["github"]
    assert case.verify(*case.request(body=b"\xff\xfe\x00binary")).event_id == "d-1"


def test_provider_json_parsed_at_most_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real, real_fast = request_module.json.loads, request_module.orjson.loads

    def counting(data: Any, *args: Any, **kw: Any) -> Any:
        calls.append(data)
        return real(data, *args, **kw)

    def counting_fast(data: Any) -> Any:
        calls.append(data)
        return real_fast(data)

    monkeypatch.setattr(request_module.json, "loads", counting)
    fast = SimpleNamespace(loads=counting_fast, JSONDecodeError=request_module.orjson.JSONDecodeError)
    monkeypatch.setattr(request_module, "orjson", fast)
    body = b'{"type":"event_callback","event_id":"Ev1","event":{"type":"message"}}'
    verify("slack", ["slack-good"], body, _slack_headers(body))
    assert len(calls) == 1
    calls.clear()
    case = CASES["github"]
    case.verify(*case.request())
    assert calls == []  # header id and header type: no parse at all
    calls.clear()
    case = CASES["mailgun"]
    case.verify(*case.request())
    assert len(calls) == 1


def test_paddle_timestamp_given_twice_counts_with_its_last_value_as_the_sdk_reads_it() -> None:
    """paddle-python-sdk 1.16 reads `ts=A;ts=B` as B; Stripe's SDK reads `t=A,t=B` as A, and so do we there."""
    body = b'{"event_id":"evt_pdl_twice"}'

    def header(first: int, last: int, signed: int) -> dict[str, str]:
        return {"Paddle-Signature": f"ts={first};ts={last};h1={mac('pdl_k', b'%d:' % signed + body).hex()}"}

    assert verify("paddle", ["pdl_k"], body, header(NOW - 600, NOW, NOW), now=NOW) is not None
    with pytest.raises(VerificationError):  # the last one is stale
        verify("paddle", ["pdl_k"], body, header(NOW, NOW - 600, NOW), now=NOW)
    stripe_body = b'{"id":"evt_stripe_twice"}'
    sig = mac("whsec_k", b"%d." % NOW + stripe_body).hex()
    headers = {"Stripe-Signature": f"t={NOW},t={NOW - 600},v1={sig}"}
    assert verify("stripe", ["whsec_k"], stripe_body, headers, now=NOW) is not None


# ---- HubSpot URL and Twilio details -------------------------------------------------------------------------------


def test_hubspot_url_selectively_decoded_or_as_sent() -> None:
    url = "https://h.example.com/hook%3Fa%3Ab%2Fc?email=x%40y.com&name=a%20b&q=%2a%2C"
    signed_url = "https://h.example.com/hook?a:b/c?email=x@y.com&name=a%20b&q=*,"
    body = b'[{"eventId":1}]'
    ts = b"%d" % (NOW * 1000)
    headers = {
        "X-HubSpot-Signature-v3": b64(mac("hs", b"POST" + signed_url.encode() + body + ts)),
        "X-HubSpot-Request-Timestamp": ts.decode(),
    }
    assert verify("hubspot", ["hs"], body, headers, url=url) is not None
    # signed over the URL as sent: what HubSpot's Python SDK checks (it decodes nothing), accepted too
    headers["X-HubSpot-Signature-v3"] = b64(mac("hs", b"POST" + url.encode() + body + ts))
    assert verify("hubspot", ["hs"], body, headers, url=url) is not None
    # neither form of this URL: refused
    other = "https://h.example.com/hook?a:b/c?email=x@y.com&name=a%20b&q=*;"
    headers["X-HubSpot-Signature-v3"] = b64(mac("hs", b"POST" + other.encode() + body + ts))
    with pytest.raises(VerificationError, match="no signature matches"):
        verify("hubspot", ["hs"], body, headers, url=url)


def test_hubspot_timestamp_boundary_is_the_sdks() -> None:
    case = CASES["hubspot"]
    body, headers = case.request(ts=NOW - 300)  # now - floor(ts) == 300 → rejected by the SDK's "< 300"
    with pytest.raises(VerificationError):
        case.verify(body, headers)
    body, headers = case.request(ts=NOW - 299)
    assert case.verify(body, headers) is not None
    # 299.001 s old, but the SDK floors the milliseconds to whole seconds first: 300, rejected
    ms = b"%d" % ((NOW - 300) * 1000 + 999)
    headers = {
        "X-HubSpot-Signature-v3": b64(mac("hs-good", b"POST" + URL.encode() + body + ms)),
        "X-HubSpot-Request-Timestamp": ms.decode(),
    }
    with pytest.raises(TimestampError):
        case.verify(body, headers)


def test_twilio_repeated_params_sorted_and_deduplicated() -> None:
    pairs = [("b", "2"), ("a", "z"), ("a", "y"), ("a", "z"), ("c", "")]
    body = urlencode(pairs).encode()
    string = b"https://t.example.com/sms" + b"ayazb2c"
    headers = {
        "X-Twilio-Signature": b64(mac("tok", string, "sha1")),
        "Content-Type": "application/x-www-form-urlencoded",
    }
    assert verify("twilio", ["tok"], body, headers, url="https://t.example.com/sms") is not None


def test_twilio_unknown_signature_algorithm_is_refused_not_read_as_sha1() -> None:
    case = CASES["twilio"]
    body, headers = case.request()  # a valid HMAC-SHA1 signature
    headers["X-Twilio-Webhooks-Signature-Settings"] = "key=k1,algorithm=HMAC_SHA512"
    with pytest.raises(VerificationError) as info:
        case.verify(body, headers)
    assert info.value.reason == "malformed"
    headers["X-Twilio-Webhooks-Signature-Settings"] = "key=k1"  # no algorithm: legacy HMAC-SHA1
    assert case.verify(body, headers) is not None


def test_twilio_empty_signature_header_is_missing() -> None:
    case = CASES["twilio"]
    body, headers = case.request()
    headers["X-Twilio-Signature"] = ""
    with pytest.raises(VerificationError) as info:
        case.verify(body, headers)
    assert info.value.reason == "missing"


def _without_header(name: str) -> Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]]:
    return lambda body, headers: (body, {k: v for k, v in headers.items() if k.lower() != name.lower()})


def _without_mailgun_signature(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    payload = json.loads(body)
    del payload["signature"]["signature"]
    return json.dumps(payload).encode(), headers


@pytest.mark.parametrize(
    "provider, strip, detail",
    [
        ("stripe", _without_header("Stripe-Signature"), "no stripe-signature header"),
        ("twilio", _without_header("X-Twilio-Signature"), "no X-Twilio-Signature header"),
        ("mailgun", _without_mailgun_signature, "no signature.signature body field"),
    ],
    ids=["stripe", "twilio", "mailgun"],
)
def test_a_missing_signature_is_named_by_where_it_was_looked_for(
    provider: str, strip: Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]], detail: str
) -> None:
    """The 401's detail names the header or body field that is missing ("no stripe-signature signature" read
    oddly to a new user: a walkthrough)."""
    case = CASES[provider]
    body, headers = strip(*case.request())
    with pytest.raises(VerificationError) as info:
        case.verify(body, headers)
    assert (info.value.reason, info.value.detail) == ("missing", detail)


def test_twilio_form_media_type_is_case_insensitive() -> None:
    """RFC 9110 §8.3.1: a media type's name is case-insensitive; a form sent as `Application/X-WWW-Form-Urlencoded`
    is still a form (else: a POST body nothing signs, refused 401)."""
    case = CASES["twilio"]
    body, headers = case.request()
    headers["Content-Type"] = "Application/X-WWW-Form-Urlencoded; charset=UTF-8"
    assert case.verify(body, headers).event_id == "idem-1"


def test_twilio_fragment_in_public_url_tried_both_ways() -> None:
    headers = {"X-Twilio-Signature": b64(mac("tok", b"https://t.example.com/sms", "sha1"))}
    assert verify("twilio", ["tok"], b"", headers, url="https://t.example.com/sms#rc=2&rp=all") is not None


def test_twilio_bad_port_in_url_rejected_not_raised() -> None:
    headers = {"X-Twilio-Signature": "abc="}
    with pytest.raises(VerificationError):
        verify("twilio", ["tok"], b"", headers, url="https://t.example.com:99999999/sms")
    with pytest.raises(VerificationError):
        verify("twilio", ["tok"], b"", headers, url="http://[::1/sms")


def test_twilio_body_nothing_signs_is_rejected() -> None:
    """A JSON (or any non-form) POST without bodySHA256: the signature covers the URL alone, so a URL-only signature
    captured elsewhere carried any body (a security audit). An empty POST and a form still verify."""
    url = "https://t.example.com/j"
    headers = {
        "X-Twilio-Signature": b64(mac("tok", url.encode(), "sha1")),
        "Content-Type": "application/json",
    }
    with pytest.raises(VerificationError) as info:
        verify("twilio", ["tok"], b'{"forged":true}', headers, url=url)
    assert info.value.reason == "malformed" and "bodySHA256" in info.value.detail
    assert verify("twilio", ["tok"], b"", headers, url=url).event_id
    form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    form["X-Twilio-Signature"] = b64(mac("tok", (url + "Bodyhi").encode(), "sha1"))
    assert verify("twilio", ["tok"], b"Body=hi", form, url=url).event_id


def test_twilio_body_hash_mismatch_rejected() -> None:
    url = "https://t.example.com/j?bodySHA256=" + "0" * 64
    headers = {"X-Twilio-Signature": b64(mac("tok", url.encode(), "sha1"))}
    with pytest.raises(VerificationError) as info:
        verify("twilio", ["tok"], b"{}", headers, url=url)
    assert info.value.reason == "mismatch"


def test_mailgun_legacy_form_timestamp_window_is_checked_both_ways_and_the_routes() -> None:
    """A form post's timestamp passes the same window as a JSON one: both ways, the route's `tolerance` when set."""
    window = CASES["mailgun"].window or 0
    headers = {"Content-Type": "application/x-www-form-urlencoded"}

    def form(ts: int) -> bytes:
        sig = mac("mg-good", b"%d" % ts + b"a" * 50).hex()
        return urlencode(
            {"timestamp": str(ts), "token": "a" * 50, "signature": sig, "event": "opened"}
        ).encode()

    assert verify("mailgun", ["mg-good"], form(NOW - int(window)), headers) is not None
    assert verify("mailgun", ["mg-good"], form(NOW + int(window)), headers) is not None
    with pytest.raises(TimestampError):
        verify("mailgun", ["mg-good"], form(NOW + int(window) + 1), headers)
    with pytest.raises(TimestampError):
        verify("mailgun", ["mg-good"], form(NOW - 100), headers, tolerance=60)


# ---- the generic engine -------------------------------------------------------------------------------------------


def test_generic_kv_list_with_json_id_and_handshake() -> None:
    spec = {
        "sig_name": "x-sig",
        "sig_format": "kv_list",
        "item_sep": ";",
        "sig_keys": ["s1", "s2"],
        "ts_key": "ts",
        "ts_source": "sig:ts",
        "template": "{ts}|{body}",
        "tolerance_s": 60,
        "tolerance_mode": "past_only",
        "dedup_id": ["json:meta.id"],
        "handshake": "slack",
    }
    body = b'{"meta":{"id":42}}'
    header = f"ts={NOW};s9=zz;s2={mac('k', b'%d|' % NOW + body).hex()}"
    got = verify("hmac", ["k"], body, {"x-sig": header}, signature=spec)
    assert (got.event_id, got.id_signed) == ("42", True)
    with pytest.raises(VerificationError):
        verify("hmac", ["k"], body, {"x-sig": header}, signature=spec, now=NOW + 61)


def test_generic_base64url_signature_verifies_padded_or_not() -> None:
    """A base64url signature travels with its `=` padding or without it (RFC 4648 §5 lets either be sent); the
    digest is the same, so both verify, and a padded wrong one still does not."""
    case = CASES["hmac"]
    body, headers = case.request()
    unpadded = headers["x-acme-signature"]
    assert not unpadded.endswith("=")  # 64 bytes of SHA-512: 86 characters, and 2 of padding when padded
    assert case.verify(body, {**headers, "x-acme-signature": unpadded + "=="}) is not None
    assert case.verify(body, headers) is not None
    wrong, wrong_headers = case.request("other")
    with pytest.raises(VerificationError):
        case.verify(wrong, {**wrong_headers, "x-acme-signature": wrong_headers["x-acme-signature"] + "=="})


def test_generic_versioned_list_with_base64_key_and_id_header() -> None:
    key = bytes(range(32))
    spec = {
        "sig_name": "sig",
        "sig_format": "versioned_list",
        "accepted_versions": ["v2"],
        "encoding": "base64",
        "compare_on": "decoded",
        "key_decoding": "strip_prefix_then_base64",
        "key_prefix": "key_",
        "template": "{id}:{body}",
        "id_header": "msg-id",
        "dedup_id": ["header:msg-id"],
    }
    body = b"payload"
    sig = b64(mac(key, b"m1:" + body))
    got = verify(
        "hmac", ["key_" + b64(key)], body, {"sig": f"v1,{sig} v2,{sig}", "msg-id": "m1"}, signature=spec
    )
    assert (got.event_id, got.id_signed, got.signed_headers) == ("m1", True, {"msg-id"})


def test_generic_ed25519_hex() -> None:
    from provider_cases import ED_GOOD, ed_public_raw

    spec = {
        "sig_name": "x-ed",
        "scheme": "ed25519",
        "key_decoding": "hex",
        "template": "{method}{body}",
        "dedup_id": ["header:x-id"],
    }
    body = b"hello"
    headers = {"x-ed": ED_GOOD.sign(b"POST" + body).hex(), "x-id": "7"}
    got = verify("hmac", [ed_public_raw(ED_GOOD).hex()], body, headers, signature=spec)
    assert (got.event_id, got.id_signed) == ("7", False)


def test_generic_ecdsa_key_prefix_is_stripped() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from provider_cases import EC_GOOD, ec_public_b64

    spec = {
        "sig_name": "x-ec",
        "scheme": "ecdsa_p256_sha256",
        "encoding": "base64",
        "key_decoding": "strip_prefix_then_base64",
        "key_prefix": "pk_",
        "dedup_id": ["json:id"],
    }
    body = b'{"id":"e1"}'
    headers = {"x-ec": b64(EC_GOOD.sign(body, ec.ECDSA(hashes.SHA256())))}
    got = verify("hmac", ["pk_" + ec_public_b64(EC_GOOD)], body, headers, signature=spec)
    assert (got.event_id, got.id_signed) == ("e1", True)


def test_generic_form_body_location() -> None:
    spec = {"sig_location": "form_body", "sig_name": "sig", "template": "{url}", "dedup_id": ["header:x-id"]}
    body = b"a=1&sig=" + mac("k", URL.encode()).hex().encode()
    assert verify("hmac", ["k"], body, {}, signature=spec) is not None


# ---- configuration errors -----------------------------------------------------------------------------------------

SECRET = "do-not-leak-this-secret"


def bad_hmac(needle: str, **signature: Any) -> tuple[str, list[str], dict[str, Any], str]:
    """A generic `hmac` case refused for `signature` (added to a valid name and dedup id), its error naming
    `needle`."""
    return ("hmac", [SECRET], {"sig_name": "x", "dedup_id": ["json:id"], **signature}, needle)


@pytest.mark.parametrize(
    ("provider", "secrets", "signature", "needle"),
    [
        ("stripee", [SECRET], None, "unknown provider"),
        ("stripe", [], None, "secret"),
        ("stripe", ["  ", ""], None, "secret"),
        ("svix", ["whsec_" + SECRET + "!!"], None, "base64"),
        ("svix", ["whsec_" + b64(b"short")], None, "24 to 64"),
        ("svix", ["whsec_" + b64(bytes(65))], None, "24 to 64"),
        ("svix", ["whsk_" + b64(bytes(32))], None, "whpk_"),
        ("svix", ["whpk_" + b64(bytes(31))], None, "32 bytes"),
        ("discord", [SECRET], None, "hex"),
        ("discord", ["ab" * 31], None, "32 bytes"),
        ("sendgrid", [SECRET], None, "public key"),
        ("sendgrid", [b64(b"\x30\x03\x02\x01\x01")], None, "public key"),
        ("github", [SECRET], {"sig_name": "x"}, "only provider hmac"),
        ("hmac", [SECRET], None, "signature"),
        bad_hmac("signature.colour", colour="red"),
        bad_hmac("signature.digest", digest="md5"),
        ("hmac", [SECRET], {"sig_name": "", "dedup_id": ["json:id"]}, "signature.sig_name"),
        # (no dedup_id at all is the config's to refuse: a route with an event_id of its own needs none)
        ("hmac", [SECRET], {"sig_name": "x", "dedup_id": ["body:id"]}, "signature.dedup_id"),
        ("hmac", [SECRET], {"sig_name": "x", "dedup_id": "json:id"}, "signature.dedup_id"),
        ("hmac", [SECRET], {"sig_name": "x", "dedup_id": ["composite:a,,b"]}, "signature.dedup_id"),
        ("hmac", [SECRET], {"sig_name": "x", "dedup_id": ["json[]:a|.b"]}, "signature.dedup_id"),
        ("hmac", [SECRET], {"sig_name": "x", "dedup_id": ["composite:?a,?b"]}, "signature.dedup_id"),
        bad_hmac("signature.template", template="{bdy}"),
        bad_hmac("signature.template", template="{token}"),
        bad_hmac("signature.ts_source", template="{ts}{body}"),
        bad_hmac("signature.tolerance_s", template="{ts}{body}", ts_source="header:t"),
        bad_hmac("signature.ts_source", ts_source="query:t"),
        bad_hmac("signature.id_header", template="{id}"),
        bad_hmac("signature.handshake", handshake="teams"),
        bad_hmac("signature.tolerance_s", tolerance_s=-1),
        bad_hmac("signature.prefix", prefix="v1=", sig_format="kv_list"),
        bad_hmac("signature.include_prefix_in_compare", include_prefix_in_compare="yes"),
        bad_hmac("secrets[0]", key_decoding="hex"),
        bad_hmac("signature.key_decoding", scheme="ed25519"),
        bad_hmac("signature.handshake", scheme="ed25519", key_decoding="hex", handshake="zoom"),
        bad_hmac("signature.handshake", scheme="ed25519", key_decoding="hex", handshake="x_crc"),
        bad_hmac("signature.compare_on", scheme="ed25519", key_decoding="hex", compare_on="decoded"),
        bad_hmac("signature.key_decoding", scheme="ecdsa_p256_sha256", key_decoding="hex"),
        bad_hmac("signature.key_prefix", key_prefix="k_"),
        bad_hmac("signature.ts_key", ts_key="t"),
        bad_hmac("signature.id_header", id_header=""),
        # a template without a placeholder signs a constant: one signature seen would carry any body
        bad_hmac("signature.template", template="static"),
        bad_hmac("signature.sig_keys", sig_format="kv_list", sig_keys=[]),
        bad_hmac("signature.accepted_versions", sig_format="versioned_list", accepted_versions=[]),
        bad_hmac(
            "signature.ts_source",
            sig_format="kv_list",
            ts_key="t",
            ts_source="sig:ts",
            template="{ts}{body}",
            tolerance_s=60,
        ),
        bad_hmac(
            "signature.check_ts_before_sig", ts_source="json:ts", tolerance_s=60, check_ts_before_sig=True
        ),
    ],
)
def test_registry_config_errors_name_the_problem_never_the_secret(
    provider: str, secrets: list[str], signature: dict[str, Any] | None, needle: str
) -> None:
    with pytest.raises(ProviderConfigError) as info:
        build_verifier(provider, secrets, None, signature)
    message = str(info.value)
    assert needle in message
    assert SECRET not in message
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


@pytest.mark.parametrize("tolerance", [-1, float("nan"), float("inf"), True])
def test_registry_bad_tolerance_rejected(tolerance: Any) -> None:
    with pytest.raises(ProviderConfigError):
        build_verifier("stripe", ["whsec_x"], tolerance, None)


def test_registry_secrets_must_be_a_list() -> None:
    with pytest.raises(ProviderConfigError):
        build_verifier("stripe", "whsec_x", None, None)


def test_registry_secrets_are_stripped() -> None:
    case = CASES["github"]
    assert case.verify(*case.request(), secrets=[" gh-good\n", ""]) is not None


def test_registry_a_secret_is_used_as_its_utf8_bytes() -> None:
    """providers.md §0.4: "Everything else in this file: opaque string → the string as UTF-8"."""
    secret = "gh-s\u00e9cret-\u2603"
    body = b'{"zen":"x"}'
    headers = {
        "X-Hub-Signature-256": "sha256=" + mac(secret.encode("utf-8"), body).hex(),
        "X-GitHub-Delivery": "d-1",
        "X-GitHub-Event": "push",
    }
    assert verify("github", [secret], body, headers).event_id == "d-1"


def test_usable_id_is_printable_ascii_up_to_256_characters() -> None:
    assert usable_id("x" * 256) and not usable_id("x" * 257) and not usable_id("")


def test_json_body_that_only_the_stdlib_parses_still_has_its_id() -> None:
    """orjson refuses a lone surrogate escape (JavaScript's JSON.stringify writes one for a string cut in the middle
    of an emoji); the stdlib takes it: such a body is still JSON, with its id (else 400 no_event_id for a validly
    signed event)."""
    case = CASES["stripe"]
    body = b'{"id":"evt_cut","type":"invoice.paid","note":"caf\\u00e9 \\ud83d"}'
    assert case.verify(*case.request(body=body)).event_id == "evt_cut"


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        # orjson reads an integer past 64 bits as a float (1.2345678901234568e+29): it was no id, a 400 no_event_id
        ("stripe", b'{"id":123456789012345678901234567890,"type":"t"}', "123456789012345678901234567890"),
        ("stripe", b'{"id":18446744073709551616,"type":1.5}', "18446744073709551616"),
        ("hubspot", b'[{"portalId":1,"eventId":36893488147419103232}]', ":1::36893488147419103232"),
        (
            "calendly",
            b'{"event":"e","created_at":"c","payload":{"uri":99999999999999999999999}}',
            "e:99999999999999999999999:c",
        ),
        # a number with a fraction or an exponent is no id, whole or not, as before; so is an integer the stdlib
        # refuses to read (past 4,300 digits)
        ("stripe", b'{"id":12.0,"type":"t"}', None),
        ("stripe", b'{"id":1e30,"type":"t"}', None),
        ("stripe", b'{"id":1.5,"type":"t"}', None),
        ("stripe", b'{"id":%s,"type":"t"}' % (b"9" * 5000), None),
        # what the exact parse cannot read is no id either, never a 401 (mut6): NaN and infinities, a body nested
        # deeper than the stdlib recurses, an exponent Decimal refuses (it was 401 "unverifiable request")
        ("stripe", b'{"id":NaN,"type":"t"}', None),
        ("stripe", b'{"id":-Infinity,"type":"t"}', None),
        ("stripe", b'{"id":12.0,"type":"t","x":' + b"[" * 1000 + b"]" * 1000 + b"}", None),
        ("stripe", b'{"id":12.0,"type":"t","x":1e99999999999999999999}', None),
        ("stripe", b'{"id":-18446744073709551617}', "-18446744073709551617"),
    ],
)
def test_integer_id_past_64_bits_is_its_digits(name: str, body: bytes, expected: str | None) -> None:
    case = CASES[name]
    assert case.verify(*case.request(body=body)).event_id == expected


def test_registry_provider_names() -> None:
    expected = {
        "stripe", "github", "shopify", "slack", "standardwebhooks", "svix", "clerk", "resend", "twilio", "workos",
        "paddle", "linear", "zoom", "intercom", "square", "hubspot", "discord", "mailgun", "sendgrid", "pagerduty",
        "typeform", "calendly", "x", "hmac", "none",
    }  # fmt: skip
    assert expected <= PROVIDERS


def test_registry_repr_hides_secrets() -> None:
    for name in ("stripe", "twilio", "github", "mailgun"):
        verifier = build_verifier(name, [SECRET], None, None)
        assert SECRET not in repr(verifier)
        assert SECRET not in repr(getattr(verifier, "keys", ""))


def test_sendgrid_rejects_non_p256_key() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    der = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ProviderConfigError, match="P-256"):
        build_verifier("sendgrid", [b64(der)], None, None)


def test_a_form_with_more_fields_than_any_provider_sends_is_not_parsed() -> None:
    """Parsing and sorting 100,000 fields held the event loop ~0.25 s per unsigned 1 MB request, before any
    signature was checked (a security audit). Past MAX_FORM_FIELDS a form is no form: Twilio's verifier refuses
    it as malformed, a Slack ssl_check is not recognised."""
    many = b"&".join(b"f%d=1" % i for i in range(request_module.MAX_FORM_FIELDS + 1))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    req = request_module.Request(inbound(many, headers))
    assert req.form() == {}
    with pytest.raises(VerificationError) as err:
        req.form_pairs()
    assert err.value.reason == "malformed" and "more than 1000 fields" in err.value.detail
    allowed = b"&".join(b"f%d=1" % i for i in range(request_module.MAX_FORM_FIELDS))
    assert (
        len(request_module.Request(inbound(allowed, headers)).form_pairs()) == request_module.MAX_FORM_FIELDS
    )
    slack = build_verifier("slack", ["s"], None, None)
    assert slack.unsigned_handshake(inbound(b"ssl_check=1&" + many, headers)) is None
    assert slack.unsigned_handshake(inbound(b"ssl_check=1&token=t", headers)) is not None
    # a forged slash command dressed as an ssl_check is answered 200 (as Bolt does) and never relayed: not sent
    # on to the receiver even with `handshake: pass`
    dressed = slack.unsigned_handshake(inbound(b"ssl_check=1&command=%2Fdeploy&text=prod", headers))
    assert dressed is not None and dressed.status == 200 and not dressed.relay
