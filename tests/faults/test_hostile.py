"""Hostile input against a running `sidecar run`: generated requests (methods, targets, headers, bodies, forged and
replayed signatures) never get a 5xx and never reach the upstream without a valid signature; plus targeted cases for
size limits, slow clients, replays and config fuzzing.

Accounting for what may reach the upstream: a POST must carry a signature this test made with the route's secret,
fresh, over exactly the body that arrived (every request carries an `X-Hostile-Seq` so its receipt can be matched).
Non-POST requests on a route path are passed through untouched by contract (CONTRACT.md, "Inbound answers"); they
are counted apart. No route here is `provider: none` (explicitly unverified by config).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
import yaml
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sidecar.cli import build_parser
from tests.conftest import REPO, Received, Upstream
from tests.faults import logcheck
from tests.faults.harness import (
    Answer,
    build_request,
    raw_http,
    report,
    write_sidecar_config,
)
from tests.faults.logcheck import BODY_MARKER
from tests.procs import SidecarProcess, free_port, wait_until

SECRETS = {
    "stripe": "whsec_hostile_stripe_5d21",
    "github": "gh-hostile-secret-77aa",
    "slack": "slack-hostile-secret-31",
    "sw": "whsec_" + base64.b64encode(bytes(range(7, 39))).decode(),
    "twilio": "twilio-hostile-secret-9",
    "sync": "whsec_hostile_sync_e4a0",
}
PROVIDERS = {
    "stripe": "stripe",
    "github": "github",
    "slack": "slack",
    "sw": "standardwebhooks",
    "twilio": "twilio",
    "sync": "stripe",
}
ROUTES = "".join(
    f'  - {{name: {name}, path: /webhooks/{name}, provider: {PROVIDERS[name]}, secrets: ["{SECRETS[name]}"]'
    + (", dedupe: false" if name == "sync" else "")
    + "}\n"
    for name in SECRETS
)
MAX_BODY = 4096
TOLERANCE = 300
TALLY: Counter[str] = Counter()  # over the module: requests sent, 5xx, unverified forwards, pass-through, …

FAST = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# ---- signing, the way each provider does it ----------------------------------------------------------------------


def _hex(key: str | bytes, msg: bytes, digest: str = "sha256") -> str:
    return hmac.new(key.encode() if isinstance(key, str) else key, msg, digest).hexdigest()


def _b64(key: str | bytes, msg: bytes, digest: str = "sha256") -> str:
    mac = hmac.new(key.encode() if isinstance(key, str) else key, msg, digest).digest()
    return base64.b64encode(mac).decode()


def signature_headers(
    route: str, body: bytes, ts: int, url: str, secret: str | None = None
) -> list[tuple[str, str]]:
    """The headers that make `body` validly signed for `route` at time `ts` (`url`: what Twilio signs)."""
    key = secret or SECRETS[route]
    if route in ("stripe", "sync"):
        return [("Stripe-Signature", f"t={ts},v1={_hex(key, b'%d.' % ts + body)}")]
    if route == "github":
        return [("X-Hub-Signature-256", "sha256=" + _hex(key, body)), ("X-GitHub-Event", "push")]
    if route == "slack":
        return [
            ("X-Slack-Signature", "v0=" + _hex(key, b"v0:%d:" % ts + body)),
            ("X-Slack-Request-Timestamp", str(ts)),
        ]
    if route == "sw":
        raw = base64.b64decode(key.removeprefix("whsec_")) if key.startswith("whsec_") else key.encode()
        msg_id = "msg_" + hashlib.sha256(body).hexdigest()[:16]
        return [
            ("webhook-id", msg_id),
            ("webhook-timestamp", str(ts)),
            ("webhook-signature", "v1," + _b64(raw, f"{msg_id}.{ts}.".encode() + body)),
        ]
    assert route == "twilio"
    from urllib.parse import parse_qsl

    pairs = sorted(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))
    signed = url + "".join(k + v for k, v in pairs)
    return [("X-Twilio-Signature", _b64(key, signed.encode(), "sha1"))]


def event_body(route: str, event_id: str) -> bytes:
    if route == "twilio":
        return urlencode({"CallSid": event_id, "Note": BODY_MARKER}).encode()
    key = "event_id" if route == "slack" else "id"
    return json.dumps({key: event_id, "type": "event_callback", "note": BODY_MARKER}).encode()


def id_headers(route: str, event_id: str) -> list[tuple[str, str]]:
    if route == "github":
        return [("X-GitHub-Delivery", event_id)]
    if route == "twilio":
        return [
            ("I-Twilio-Idempotency-Token", event_id),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ]
    return [("Content-Type", "application/json")]


# ---- the sidecar under attack ------------------------------------------------------------------------------------


class Target:
    """The `sidecar run` under attack and what it may forward: `valid` maps each validly signed POST's
    X-Hostile-Seq to the body signed."""

    def __init__(self, port: int, upstream: Upstream, rdb: redis.Redis, proc: SidecarProcess) -> None:
        self.port, self.upstream, self.rdb, self.proc = port, upstream, rdb, proc
        self.seq = 0
        self.valid: dict[str, bytes] = {}
        self.checked = 0  # receipts already accounted for
        self.baseline: dict[bytes, Any] = {}
        self.clean: set[str] = set()

    def __repr__(self) -> str:
        return f"Target(port={self.port})"

    def next_seq(self) -> str:
        self.seq += 1
        return f"{self.proc.config.stem}-{self.seq}"

    def unverified(self) -> list[Received]:
        """Receipts since the last call that should not exist: a POST that was not validly signed by us."""
        new = self.upstream.received[self.checked :]
        self.checked += len(new)
        bad = []
        for r in new:
            if r.method != "POST":
                TALLY["passthrough_non_post"] += 1  # by contract, untouched, unverified
                continue
            # The first one is ours (a hostile request may add its own X-Hostile-Seq; order is kept on the way).
            seq = next((v for k, v in r.raw_headers if k.lower() == "x-hostile-seq"), "")
            if self.valid.get(seq) != r.body:
                bad.append(r)
            else:
                TALLY["forwarded_valid"] += 1
        return bad


@pytest.fixture
def target(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[Any]
) -> Target:
    port = free_port()
    config = write_sidecar_config(
        tmp_path / "hostile.yaml",
        port=port,
        admin_port=free_port(),
        redis_url=redis_url,
        upstream_url=upstream.url,
        routes=ROUTES,
        server=f"max_body_bytes: {MAX_BODY}, read_timeout: 2s",
        logging="{level: debug, requests: all}",
    )
    proc = SidecarProcess(config)
    processes.append(proc)
    proc.start(port)
    return Target(port, upstream, rdb, proc)


@pytest.fixture(scope="module", autouse=True)
def totals() -> Iterator[None]:
    yield
    if TALLY["requests"]:
        report(
            "hostile_total",
            generated=TALLY["generated"],
            inputs_tried=TALLY["requests"],
            status_5xx=TALLY["5xx"],
            unverified_forwards=TALLY["unverified"],
            validly_signed=TALLY["validly_signed"],
            validly_signed_2xx=TALLY["validly_signed_2xx"],
            forwarded_validly_signed=TALLY["forwarded_valid"],
            passthrough_non_post=TALLY["passthrough_non_post"],
            ssrf_requests=TALLY["ssrf_requests"],
            ssrf_forwarded_to_configured_upstream=TALLY["ssrf_forwarded"],
            ssrf_reached_decoy=0 if TALLY["ssrf_requests"] else None,
        )
    configs = TALLY["config_exit_0"] + TALLY["config_exit_1"]
    if configs:
        report(
            "config_fuzz",
            configs=configs,
            exit_0=TALLY["config_exit_0"],
            exit_1=TALLY["config_exit_1"],
            tracebacks=0,
        )


async def send_batch(t: Target, batch: list[tuple[bytes, str, bool]]) -> list[Answer]:
    """(request bytes, method, validly signed) -> answers; all sent at once, one connection each."""
    answers = await asyncio.gather(
        *(raw_http(t.port, data, head=method == "HEAD") for data, method, _ in batch)
    )
    TALLY["requests"] += len(batch)
    TALLY["5xx"] += sum(1 for a in answers if a.status is not None and a.status >= 500)
    return list(answers)


def assert_clean(t: Target, answers: list[Answer], batch: list[tuple[bytes, str, bool]]) -> None:
    fives = [
        (a.status, a.body[:120], data[:200])
        for a, (data, _, _) in zip(answers, batch, strict=True)
        if (a.status or 0) >= 500
    ]
    assert not fives, fives[:3]
    bad = t.unverified()
    TALLY["unverified"] += len(bad)
    assert not bad, [(r.method, r.path_qs, r.headers.get("x-hostile-seq"), r.body[:80]) for r in bad][:3]


# ---- property 1: anything at all ---------------------------------------------------------------------------------

ROUTE_NAMES = sorted(SECRETS)
TOKEN = st.text(
    alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    min_size=1,
    max_size=12,
)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "Host",
            "X-Forwarded-Host",
            "X-Forwarded-Proto",
            "X-Forwarded-For",
            "Content-Type",
            "Content-Encoding",
            "Expect",
            "Connection",
            "Upgrade",
            "TE",
            "Trailer",
            "Keep-Alive",
            "Transfer-Encoding",
            "Authorization",
            "Stripe-Signature",
            "X-Hub-Signature-256",
            "X-GitHub-Delivery",
            "X-Slack-Signature",
            "X-Slack-Request-Timestamp",
            "webhook-id",
            "webhook-signature",
            "webhook-timestamp",
            "svix-signature",
            "X-Twilio-Signature",
            "I-Twilio-Idempotency-Token",
            "X-Sidecar-Event-Id",
            "X-Sidecar-Attempt",
            "traceparent",
            "X-Hostile-Seq",
        ]
    ),
    TOKEN,
    st.binary(min_size=1, max_size=10),
)
# No CR/LF in values here: a header that splits the request makes the bytes after it a second request, and this
# property's bookkeeping is per request. Request splitting has its own targeted test.
HEADER_VALUES = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=60).map(
        lambda s: s.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")
    ),
    st.sampled_from(
        [
            b"chunked",
            b"gzip",
            b"100-continue",
            b"close",
            b"keep-alive, Stripe-Signature",
            b"evil.example",
            b"127.0.0.1:1",
            b"t=1,v1=00",
            b"v1,AAAA",
            b"sha256=00",
            b"v0=00",
            b"",
        ]
    ),
)
METHODS = st.one_of(
    st.sampled_from(["POST"] * 8 + ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]),
    st.sampled_from(["POST"] * 8 + ["post", "PO ST", "G\x00T", "PRI", "PROPFIND"]),
    TOKEN,
)
PATH_TEXT = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30)
SIGN_MODES = ["none", "valid", "valid", "valid", "stale", "future", "other_secret", "other_body", "garbled"]


@dataclass
class Spec:
    method: str
    route: str
    target_kind: str
    suffix: str
    sign: str
    body_kind: str
    raw_body: bytes
    extra: list[tuple[bytes, bytes]]


SPECS = st.builds(
    Spec,
    method=METHODS,
    route=st.sampled_from(ROUTE_NAMES),
    target_kind=st.sampled_from(["path", "path", "path", "query", "suffix", "absolute", "random", "star"]),
    suffix=PATH_TEXT,
    sign=st.sampled_from(SIGN_MODES),
    body_kind=st.sampled_from(["event", "event", "event", "binary", "empty", "oversized"]),
    raw_body=st.binary(max_size=300),
    extra=st.lists(
        st.tuples(HEADER_NAMES.map(lambda n: n if isinstance(n, bytes) else n.encode()), HEADER_VALUES),
        max_size=4,
    ),
)


# Which side of the window each scheme checks: Stripe (like its SDK) refuses only old timestamps; GitHub and
# Twilio sign no timestamp at all, so a "stale" or "future" signature of theirs is simply a valid one.
WINDOW = {"stripe": ("stale",), "sync": ("stale",), "slack": ("stale", "future"), "sw": ("stale", "future")}


def signs_validly(route: str, sign: str) -> bool:
    return sign == "valid" or (sign in ("stale", "future") and sign not in WINDOW.get(route, ()))


def materialize(t: Target, spec: Spec) -> tuple[bytes, str, bool]:
    seq = t.next_seq()
    path = f"/webhooks/{spec.route}"
    target = {
        "path": path,
        "query": f"{path}?q={spec.suffix}",
        "suffix": path + spec.suffix,
        "absolute": f"http://evil.example{path}",
        "random": "/" + spec.suffix,
        "star": "*",
    }[spec.target_kind]
    event_id = f"evt_{seq}"
    body = {
        "event": event_body(spec.route, event_id),
        "binary": spec.raw_body,
        "empty": b"",
        "oversized": b"x" * (MAX_BODY + 1 + len(spec.raw_body)),
    }[spec.body_kind]
    host = "hooks.example"
    now = int(time.time())
    url = f"http://{host}{target if target.startswith('/') else path}"
    headers: list[tuple[str | bytes, str | bytes]] = [("Host", host), ("X-Hostile-Seq", seq)]
    headers += id_headers(spec.route, event_id)
    if spec.sign != "none":
        ts = {"stale": now - TOLERANCE - 60, "future": now + TOLERANCE + 60}.get(spec.sign, now)
        signed_body = body + b"x" if spec.sign == "other_body" else body
        secret = "whsec_" + base64.b64encode(b"o" * 32).decode() if spec.sign == "other_secret" else None
        sig = signature_headers(spec.route, signed_body, ts, url, secret)
        if spec.sign == "garbled":
            sig = [(k, v[:-4] + "AAAA") if i == 0 else (k, v) for i, (k, v) in enumerate(sig)]
        headers += sig
    headers += spec.extra
    valid = spec.method == "POST" and signs_validly(spec.route, spec.sign)
    if valid:
        t.valid[seq] = body
        if not spec.extra and spec.target_kind == "path" and spec.body_kind == "event":
            t.clean.add(seq)  # nothing hostile about it but the company it keeps: it must be delivered
    return build_request(spec.method, target, headers, body), spec.method, valid


@settings(FAST, max_examples=600, phases=[Phase.generate])
@given(specs=st.lists(SPECS, min_size=10, max_size=10))
async def test_hostile_requests_never_5xx_never_forwarded_unsigned(target: Target, specs: list[Spec]) -> None:
    batch = [materialize(target, s) for s in specs]
    answers = await send_batch(target, batch)
    TALLY["generated"] += len(batch)
    for answer, (_, _, valid) in zip(answers, batch, strict=True):
        TALLY["validly_signed"] += valid
        TALLY["validly_signed_2xx"] += valid and answer.status is not None and answer.status < 300
    assert_clean(target, answers, batch)
    seqs = [re.search(rb"X-Hostile-Seq: ([^\r]+)", data).group(1).decode() for data, _, _ in batch]  # type: ignore[union-attr]
    refused = [
        (q, a.status) for q, a in zip(seqs, answers, strict=True) if q in target.clean and a.status != 200
    ]
    assert not refused, refused
    TALLY["clean_valid_delivered"] += sum(1 for q in seqs if q in target.clean)


# ---- property 2: forged and replayed signatures against real event ids ------------------------------------------

REAL_ROUTES = ["stripe", "github", "slack", "sw", "twilio"]
SIG_HEADER = {
    "stripe": "Stripe-Signature",
    "github": "X-Hub-Signature-256",
    "slack": "X-Slack-Signature",
    "sw": "webhook-signature",
    "twilio": "X-Twilio-Signature",
}
REJECTED_KEY = "sidecar:{stats}:rejected"  # the batched rejection counter: the one key a forgery may move


def keyspace(client: redis.Redis) -> dict[bytes, tuple[bytes, bytes | None]]:
    """Every key with its type and serialized value (TTLs left out: they run down by themselves)."""
    keys = sorted(k for k in client.scan_iter(count=1000) if k != REJECTED_KEY.encode())
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
        pipe.dump(k)
    out = pipe.execute()
    return {k: (out[2 * i], out[2 * i + 1]) for i, k in enumerate(keys)}


def real_request(route: str, event_id: str, ts: int | None = None) -> tuple[bytes, list[tuple[str, str]]]:
    body = event_body(route, event_id)
    ts = int(time.time()) if ts is None else ts
    url = f"http://hooks.example/webhooks/{route}"
    return body, [*id_headers(route, event_id), *signature_headers(route, body, ts, url)]


async def send_one(t: Target, route: str, body: bytes, headers: list[tuple[str, str]]) -> Answer:
    data = build_request("POST", f"/webhooks/{route}", [("Host", "hooks.example"), *headers], body)
    return (await send_batch(t, [(data, "POST", False)]))[0]


FORGERIES = [
    "tampered_body",  # the real signature, one byte of the body changed
    "other_secret",  # the real body, signed with a secret that is not configured
    "stale",  # the real body and secret, timestamp outside the window (schemes that sign one)
    "random_signature",  # the real body, the signature header replaced by generated text
    "signature_of_other_body",  # a valid signature of another body, on the real body
    "no_signature",
    "signature_case",  # the real signature with its hex/base64 letters' case flipped
]


@settings(FAST, max_examples=300, phases=[Phase.generate])
@given(
    forged=st.lists(
        st.tuples(st.sampled_from(REAL_ROUTES), st.sampled_from(FORGERIES), st.text(max_size=80)),
        min_size=10,
        max_size=10,
    )
)
async def test_hostile_forged_duplicates_never_touch_the_claim(
    target: Target, forged: list[tuple[str, str, str]]
) -> None:
    """A real event per route is delivered first; forgeries then claim the same ids. Each is 401, none is
    forwarded, and no key of the store changes (the batched rejection counter aside)."""
    if not target.valid:  # first example: deliver the real events
        for route in REAL_ROUTES:
            body, headers = real_request(route, f"evt_real_{route}")
            seq = target.next_seq()
            target.valid[seq] = body
            answer = await send_one(target, route, body, [("X-Hostile-Seq", seq), *headers])
            assert answer.status == 200, (route, answer)
        assert not target.unverified()
        # The delivered marks are written after the answers: wait for them (no schedule entry left), then snapshot.
        assert await wait_until(lambda: not list(target.rdb.scan_iter("sidecar:*:sched")), 10)
        target.baseline = keyspace(target.rdb)
    batch = []
    for route, how, text in forged:
        event_id = f"evt_real_{route}"
        body, headers = real_request(route, event_id)
        now = int(time.time())
        url = f"http://hooks.example/webhooks/{route}"
        sig = SIG_HEADER[route]
        if how == "tampered_body" or (how == "stale" and route not in WINDOW):
            body = body[:-1] + bytes([body[-1] ^ 1])  # the last byte: inside the marker, for every route
        elif how == "other_secret":
            other = "whsec_" + base64.b64encode(b"x" * 32).decode() if route == "sw" else "not-the-secret-0"
            headers = [*id_headers(route, event_id), *signature_headers(route, body, now, url, other)]
        elif how == "stale":
            headers = [
                *id_headers(route, event_id),
                *signature_headers(route, body, now - TOLERANCE - 30, url),
            ]
        elif how == "random_signature":
            headers = [(k, text if k == sig else v) for k, v in headers]
        elif how == "signature_of_other_body":
            headers = [*id_headers(route, event_id), *signature_headers(route, body + b" ", now, url)]
        elif how == "no_signature":
            headers = [(k, v) for k, v in headers if k != sig]
        elif how == "signature_case":
            headers = [(k, v.swapcase() if k == sig else v) for k, v in headers]
        seq = target.next_seq()
        data = build_request(
            "POST", f"/webhooks/{route}", [("Host", "hooks.example"), ("X-Hostile-Seq", seq), *headers], body
        )
        batch.append((data, "POST", False))
    answers = await send_batch(target, batch)
    TALLY["generated"] += len(batch)
    assert_clean(target, answers, batch)
    # 401, or 400 when generated text is not even a valid header value (the parser refuses it first)
    wrong = [
        (f[:2], a.status, a.body[:100])
        for f, a in zip(forged, answers, strict=True)
        if a.status != 401 and not (a.status == 400 and f[1] == "random_signature")
    ]
    assert not wrong, wrong[:3]
    TALLY["forged_401"] += len(answers)
    assert keyspace(target.rdb) == target.baseline


# ---- property 3: request data never chooses where the sidecar forwards (no SSRF) -------------------------------


@pytest.fixture
async def decoy() -> AsyncIterator[Upstream]:
    """A second server on loopback that nothing should ever reach: hostile requests name it as their host."""
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield up
    finally:
        await runner.cleanup()


@pytest.fixture
def pinned_target(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[Any]
) -> Target:
    """The stripe route with the default upstream, plus one whose `upstream:` is set (`pinned`)."""
    port = free_port()
    pinned = f'  - {{name: pinned, path: /webhooks/pinned, provider: stripe, secrets: ["{SECRETS["stripe"]}"], upstream: "{upstream.url}/pinned"}}\n'
    config = write_sidecar_config(
        tmp_path / "ssrf.yaml",
        port=port,
        admin_port=free_port(),
        redis_url=redis_url,
        upstream_url=upstream.url,
        routes=ROUTES + pinned,
        logging="{level: debug, requests: all}",
    )
    proc = SidecarProcess(config)
    processes.append(proc)
    proc.start(port)
    return Target(port, upstream, rdb, proc)


SSRF_HEADERS = ["Host", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "Forwarded", "X-Original-URL", "X-Rewrite-URL", "X-Forwarded-Server", "X-Host", "X-Forwarded-Prefix"]  # fmt: skip


@settings(FAST, max_examples=200, phases=[Phase.generate])
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
            st.sampled_from(["stripe", "pinned"]),
            st.sampled_from(
                ["origin", "absolute", "absolute_userinfo", "absolute_https", "absolute_other_scheme"]
            ),
            st.lists(
                st.tuples(st.sampled_from(SSRF_HEADERS), st.sampled_from(["decoy", "decoy_url", "junk"])),
                max_size=4,
            ),
            st.text(alphabet="abcxyz019=&", max_size=12),
        ),
        min_size=10,
        max_size=10,
    )
)
async def test_hostile_request_data_never_changes_the_forward_target(
    pinned_target: Target, decoy: Upstream, requests: list[tuple[str, str, str, list[tuple[str, str]], str]]
) -> None:
    t = pinned_target
    authority = decoy.url.removeprefix("http://")
    values = {"decoy": authority, "decoy_url": decoy.url + "/steal", "junk": "evil.example:1"}
    expected: dict[str, str] = {}
    batch = []
    for method, route, form, extra, query in requests:
        seq = t.next_seq()
        path_qs = f"/webhooks/{route}" + (f"?{query}" if query else "")
        request_target = {
            "origin": path_qs,
            "absolute": f"http://{authority}{path_qs}",
            "absolute_userinfo": f"http://user:pw@{authority}{path_qs}",
            "absolute_https": f"https://{authority}{path_qs}",
            "absolute_other_scheme": f"gopher://{authority}{path_qs}",
        }[form]
        body = event_body("stripe", f"evt_{seq}")
        headers = [("Host", authority), ("X-Hostile-Seq", seq), ("Content-Type", "application/json")]
        if method == "POST":
            headers += signature_headers("stripe", body, int(time.time()), "")
            t.valid[seq] = body
        headers += [(name, values[v]) for name, v in extra]
        query_part = f"?{query}" if query else ""
        expected[seq] = ("/pinned" + query_part) if route == "pinned" else path_qs
        batch.append((build_request(method, request_target, headers, body), method, method == "POST"))
    answers = await send_batch(t, batch)
    TALLY["generated"] += len(batch)
    TALLY["ssrf_requests"] += len(batch)
    new = t.upstream.received[t.checked :]
    assert_clean(t, answers, batch)
    assert not decoy.received, [(r.method, r.path_qs) for r in decoy.received][:3]
    for r in new:
        seq = next(v for k, v in r.raw_headers if k.lower() == "x-hostile-seq")
        assert r.path_qs == expected[seq], (seq, r.path_qs, expected[seq])
    TALLY["ssrf_forwarded"] += len(new)


# ---- targeted cases ----------------------------------------------------------------------------------------------


async def test_hostile_signed_event_with_non_utf8_header_is_stored_and_forwarded(target: Target) -> None:
    """Was a 500 (the claim could not pack the header): now stored as raw bytes, forwarded on attempt 1 and, after
    a 503, on the retry read back from the store."""
    target.upstream.respond(503)
    body, headers = real_request("stripe", "evt_latin1")
    answer = await send_one(target, "stripe", body, [*headers, ("X-Latin-1", "caf\udce9")])
    assert answer.status == 202, answer  # queued after the 503
    assert await wait_until(lambda: len(target.upstream.received) >= 2, 15)
    first, retry = target.upstream.received[:2]
    assert first.headers["x-latin-1"] == retry.headers["x-latin-1"] == "caf\udce9"  # the byte 0xE9, as sent
    assert retry.headers["x-sidecar-attempt"] == "2" and retry.body == body


async def test_hostile_oversized_body_is_refused_while_streaming(target: Target) -> None:
    # Declared too large: 413 before a byte of the body is sent.
    head = build_request("POST", "/webhooks/stripe", [("Host", "h")], b"", length=False, close=False)
    head = head[:-2] + b"Content-Length: %d\r\n\r\n" % (MAX_BODY * 1000)
    answer = await raw_http(target.port, head, timeout=5)
    assert answer.status == 413 and answer.json() == {"error": "body_too_large"}
    # A chunked body that never ends: 413 once it passes the limit, while the client is still sending.
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    writer.write(b"POST /webhooks/stripe HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent, status_line = 0, b""
    read = asyncio.ensure_future(reader.readline())
    try:
        for _ in range(MAX_BODY * 20 // 512):  # bounded: at most 20x the limit
            if read.done():
                status_line = read.result()
                break
            writer.write(b"200\r\n" + b"a" * 512 + b"\r\n")
            sent += 512
            await writer.drain()
            await asyncio.sleep(0.001)
        else:
            status_line = await asyncio.wait_for(read, 5)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), (status_line, sent)
    assert sent < MAX_BODY * 20  # answered while the body was still coming
    assert not target.upstream.received


MALFORMED = [
    ("129 headers", build_request("GET", "/webhooks/stripe", [(f"X-{i}", "a") for i in range(129)])),
    ("a 9000-byte header", build_request("POST", "/webhooks/stripe", [("X-Big", "a" * 9000)], b"{}")),
    ("a 9000-byte request line", build_request("GET", "/webhooks/stripe?" + "a" * 9000, [])),
    ("a 9000-byte header name", build_request("GET", "/webhooks/stripe", [("X" * 9000, "a")])),
    (
        "CL and TE",
        build_request("POST", "/webhooks/stripe", [("Transfer-Encoding", "chunked")], b"0\r\n\r\n"),
    ),
    ("two Content-Lengths", build_request("POST", "/webhooks/stripe", [("Content-Length", "1")], b"{}")),
    (
        "header injection",
        build_request("POST", "/webhooks/stripe", [("X-A", "b\r\nStripe-Signature: x")], b"{}"),
    ),
    ("a NUL in a header", build_request("POST", "/webhooks/stripe", [("X-A", "b\x00c")], b"{}")),
    (
        "unknown Expect, not UTF-8",
        build_request("POST", "/webhooks/stripe", [("Expect", b"\xa4\xd5")], b"{}"),
    ),
    ("CONNECT, unknown Expect", build_request("CONNECT", "/webhooks/stripe", [("Expect", b"\xa4")])),
    ("OPTIONS *, unknown Expect", build_request("OPTIONS", "*", [("Expect", b"\xff")])),
]


async def test_hostile_malformed_requests_get_a_clear_4xx(target: Target) -> None:
    """aiohttp's parser limits (8190-byte lines and fields, 128 headers) and framing rules answer 400, the Expect
    handler 417: never a 5xx, never a forward."""
    answers = await send_batch(target, [(data, "POST", False) for _, data in MALFORMED])
    for (what, _), answer in zip(MALFORMED, answers, strict=True):
        assert answer.status is not None and 400 <= answer.status < 500, (what, answer)
    assert not target.upstream.received


async def test_hostile_slow_clients_are_cut_off_by_read_timeout(target: Target) -> None:
    """server.read_timeout (2 s here) bounds a client dribbling its headers, its body, or sitting idle."""

    async def dribble(head: bytes, drip: bytes) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        started = time.monotonic()
        writer.write(head)
        read = asyncio.ensure_future(reader.read(4096))
        try:
            for _ in range(100):  # one byte every 100 ms for up to 10 s
                if read.done():
                    break
                if drip:
                    writer.write(drip)
                await asyncio.sleep(0.1)
            got = await asyncio.wait_for(read, 5)
        finally:
            writer.close()
        return time.monotonic() - started, got

    # the three clients at once (each on its own connection, each cut off by its own timer)
    headers, body, idle = await asyncio.gather(
        dribble(b"POST /webhooks/stripe HTTP/1.1\r\nHost: h\r\nX-Slow: ", b"a"),
        dribble(b"POST /webhooks/stripe HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n", b"a"),
        dribble(b"", b""),
    )
    took, got = headers
    assert got == b"" and 1.5 < took < 4.5, (took, got)  # closed, no request was ever complete
    took, got = body
    assert got.startswith(b"HTTP/1.1 408") and b'"read_timeout"' in got and 1.5 < took < 4.5, (took, got)
    took, got = idle
    assert got == b"" and 1.5 < took < 4.5, (took, got)
    assert not target.upstream.received
    report("hostile_slow_clients", read_timeout_s=2, header_dribble="closed", body_dribble=408, idle="closed")


async def test_hostile_replayed_signature_outside_tolerance_is_refused(target: Target) -> None:
    for route, skew in [("stripe", -400), ("slack", -400), ("slack", 400), ("sw", -400), ("sw", 400)]:
        body, headers = real_request(route, f"evt_replay_{route}_{skew}", ts=int(time.time()) + skew)
        answer = await send_one(target, route, body, headers)
        assert answer.status == 401 and answer.json()["error"] == "timestamp_out_of_tolerance", (
            route,
            answer,
        )
        # The same event signed now is accepted: the window refused the replay, not the id.
        body, headers = real_request(route, f"evt_replay_{route}_{skew}")
        assert (await send_one(target, route, body, headers)).status == 200
    assert len(target.upstream.received) == 5


async def test_hostile_captured_github_request_replayed_under_another_id_is_a_duplicate(
    target: Target,
) -> None:
    """GitHub's delivery id is not signed: a captured request replayed under another id hits its own digest (a
    duplicate, not a second delivery) and cannot occupy the other id, whose real event is still delivered."""
    body, headers = real_request("github", "gh-delivery-1")
    assert (await send_one(target, "github", body, headers)).status == 200
    replayed = [(k, "gh-delivery-2" if k == "X-GitHub-Delivery" else v) for k, v in headers]
    answer = await send_one(target, "github", body, replayed)
    assert answer.status == 200 and answer.json()["duplicate"] is True
    assert len(target.upstream.received) == 1
    real_body, real_headers = real_request("github", "gh-delivery-2")
    answer = await send_one(target, "github", real_body, real_headers)
    assert answer.status == 200 and "duplicate" not in answer.body.decode()
    assert [r.headers["x-sidecar-event-id"] for r in target.upstream.received] == [
        "gh-delivery-1",
        "gh-delivery-2",
    ]


# ---- config fuzzing: `sidecar check-config` never crashes ---------------------------------------------------------

KNOWN_KEYS = [
    "server", "admin", "redis", "upstream", "dedupe", "retry", "dlq", "logging", "routes", "listen", "workers",
    "max_body_bytes", "read_timeout", "shutdown_grace", "reload_interval", "token", "url", "prefix", "shards",
    "data_dir", "appendfsync", "timeout", "max_connections", "breaker", "threshold", "cooldown", "max_cooldown",
    "ttl", "max_attempts", "base_delay", "multiplier", "max_delay", "jitter", "retry_on", "max_age", "lease",
    "max_length", "level", "format", "requests", "name", "path", "provider", "secrets", "tolerance", "event_id",
    "dedupe", "types", "sign_upstream", "secret", "public_url", "handshake", "signature", "header", "json",
    "<<",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "500ms", "30s", "72h", "0", "-1s", "1e400", "${HOME}", "${NOPE}", "${NOPE:-x}", "${", "$$", "${A:-${B}}",
            "127.0.0.1:0", "[::1]:70000", "http://u:p@h/x", "rediss://", "redis+cluster://a:1,b:2", "embedded",
            "stripe", "hmac", "none", "github", "twilio", "whsec_AAAA", "whpk_xx", "5xx", "429", "always",
        ]
    ),
)  # fmt: skip
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=25,
)
VALID = {
    "server": {"listen": "127.0.0.1:0"},
    "redis": {"url": "redis://127.0.0.1:1"},
    "routes": [{"name": "stripe", "path": "/webhooks/stripe", "provider": "stripe", "secrets": ["whsec_x"]}],
}
RAW_SNIPPETS = st.sampled_from(
    [
        "a: &a [*a]\n", "x: !!python/object/apply:os.system [\"true\"]\n", "x: !!binary AAAA\n", "\t- a\n",
        "routes: *nope\n", "<<: [*a]\n", "? [a]\n: b\n", "%YAML 9.9\n---\n", "--- a\n--- b\n", "'unterminated\n",
        "server: {listen: \"127.0.0.1:0\", listen: x}\n", "\ufeffserver: {}\n", "\x00\n", "a: " + "[" * 300 + "\n",
    ]
)  # fmt: skip


def _perturbed(draw: st.DrawFn) -> str:
    """A valid config with one value somewhere replaced by a generated tree, dumped as YAML."""
    import copy

    config = copy.deepcopy(VALID)
    section = draw(
        st.sampled_from(["server", "admin", "redis", "upstream", "retry", "dlq", "logging", "route", "top"])
    )
    key, value = draw(st.sampled_from(KNOWN_KEYS)), draw(TREES)
    if section == "route":
        config["routes"][0][key] = value
    elif section == "top":
        config[key] = value
    else:
        config.setdefault(section, {})[key] = value
    return yaml.safe_dump(config, allow_unicode=True)


VALID_VALUES = {
    ("server", "read_timeout"): ["1s", "500ms", 3, "2m"],
    ("server", "workers"): [0, 1, 4],
    ("server", "max_body_bytes"): [1, 65536],
    ("upstream", "timeout"): ["1s", "30s"],
    ("retry", "max_attempts"): [1, 20],
    ("retry", "jitter"): [0, 0.5, 1],
    ("retry", "retry_on"): [["429"], ["5xx", "408"]],
    ("dlq", "max_length"): [1, 100000],
    ("logging", "level"): ["debug", "error"],
    ("logging", "requests"): ["all", "notable"],
    ("route", "tolerance"): ["5m", "30s"],
    ("route", "dedupe"): [True, False],
    ("route", "types"): [["invoice.*"], ["a", "b.*"]],
    ("route", "handshake"): ["answer", "pass"],
    ("route", "event_id"): ["auto", "body_sha256", {"header": "X-Id"}, {"json": "data.id"}],
    ("route", "upstream"): ["http://127.0.0.1:1/x", "https://example.com/hook?a=1"],
}


def _valid_variant(draw: st.DrawFn) -> str:
    """A valid config with a few valid values changed: the paths that end in `OK`."""
    import copy

    config = copy.deepcopy(VALID)
    for section, key in draw(st.lists(st.sampled_from(sorted(VALID_VALUES)), max_size=4, unique=True)):
        value = draw(st.sampled_from(VALID_VALUES[(section, key)]))
        target = config["routes"][0] if section == "route" else config.setdefault(section, {})
        target[key] = value
    return yaml.safe_dump(config, allow_unicode=True)


@st.composite
def fuzzed_yaml(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["valid", "perturbed", "perturbed", "tree", "raw", "mixed"]))
    if kind == "valid":
        return _valid_variant(draw)
    if kind == "perturbed":
        return _perturbed(draw)
    if kind == "tree":
        return yaml.safe_dump(draw(TREES), allow_unicode=True)
    if kind == "raw":
        return draw(st.text(max_size=200))
    return _perturbed(draw) + draw(RAW_SNIPPETS)


@settings(FAST, max_examples=600, phases=[Phase.generate])
@given(text=fuzzed_yaml())
def test_hostile_check_config_fuzz_exits_0_or_1_with_file_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "fuzz.conf"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    args = build_parser().parse_args(["check-config", str(path)])
    with logcheck.secrets_not_recorded():  # generated "secrets" are configured nowhere
        code = args.func(args)
    out, err = capsys.readouterr()
    assert code in (0, 1)
    if code == 0:
        assert out == f"{path}: OK\n" and not err
    else:
        lines = err.splitlines()
        line = re.compile(re.escape(str(path)) + r":\d+: [^\n]+: [^\n]+")
        assert lines and all(line.fullmatch(x) for x in lines), err[:500]
    assert "Traceback" not in out + err
    TALLY[f"config_exit_{code}"] += 1


PATHOLOGICAL = {
    "recursive alias": "routes: &a [*a]\n",
    "recursive mapping alias": "server: &s {listen: x, more: *s}\nroutes: []\n",
    "billion laughs": "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9) if p else ', '.join(['lol'] * 9)}]\n"
        for p, c in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
    ),
    "billion laughs by merge keys": "x0: &x0 {a: 1, b: 2}\n"
    + "".join(f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 8)}], c{i}: 1}}\n" for i in range(1, 8))
    + "routes: []\n",
    "deep nesting": "routes: " + "[" * 5000 + "]" * 5000 + "\n",
    "python tag": 'routes: !!python/object/apply:os.system ["true"]\n',
    "not UTF-8": "routes: \udcff\n",
}


async def test_hostile_check_config_survives_pathological_files(tmp_path: Path) -> None:
    """The real CLI on files that used to crash it (RecursionError) or take exponential time (aliases)."""

    async def check(name: str, text: str) -> tuple[str, int, str, float]:
        path = tmp_path / (name.replace(" ", "_") + ".conf")
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "check-config", str(path),
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return (
            str(path),
            proc.returncode or 0,
            (out + err).decode(errors="replace"),
            time.monotonic() - started,
        )

    results = await asyncio.gather(*(check(n, t) for n, t in PATHOLOGICAL.items()))
    for (name, _), (path, code, output, took) in zip(PATHOLOGICAL.items(), results, strict=True):
        assert code == 1, (name, output[-500:])
        assert "Traceback" not in output, (name, output[-500:])
        assert all(x.startswith(f"{path}:") for x in output.splitlines()), (name, output[:500])
        assert took < 15, (name, took)
