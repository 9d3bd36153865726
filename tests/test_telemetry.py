"""Observability: /metrics after known traffic, spans and traceparent propagation, JSON logs without secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import create_admin_app
from sidecar.app import RUNTIME, create_app
from sidecar.config import load
from sidecar.telemetry import METRIC_NAMES, Telemetry, setup_logging
from tests.conftest import Upstream, watched_config
from tests.procs import wait_until
from tests.test_ingress import STRIPE_SECRET, stripe_body, stripe_headers

ROUTES = f"""
- name: stripe
  path: /webhooks/stripe
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
- name: typed
  path: /webhooks/typed
  provider: stripe
  secrets: ["{STRIPE_SECRET}"]
  types: ["invoice.*"]
- name: open
  path: /webhooks/open
  provider: none
"""


async def send(client: Any, path: str, event_id: str, type_: str = "invoice.paid", **kw: Any) -> Any:
    body = stripe_body(event_id, type_=type_)
    headers = {**stripe_headers(body, **kw)}
    return await client.post(path, data=body, headers=headers)


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics on the admin app of `client`'s sidecar, as {(sample name, sorted labels): value}."""
    admin = create_admin_app(client.server.app)
    async with TestClient(TestServer(admin)) as admin_client:
        resp = await admin_client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope")))
            samples[(s.name, labels)] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_telemetry_metrics_count_every_outcome_by_route(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory(ROUTES, extra="dlq: {max_length: 1}")
    assert (await send(client, "/webhooks/stripe", "evt_1")).status == 200  # forwarded
    assert (await send(client, "/webhooks/stripe", "evt_2")).status == 200  # forwarded
    assert (await send(client, "/webhooks/stripe", "evt_1")).status == 200  # duplicate
    upstream.respond(503)
    assert (await send(client, "/webhooks/stripe", "evt_3")).status == 202  # queued
    upstream.respond(400, 400)
    assert (await send(client, "/webhooks/stripe", "evt_4")).status == 202  # dead_lettered
    assert (await send(client, "/webhooks/stripe", "evt_5")).status == 202  # dead_lettered, evicts evt_4
    assert (await send(client, "/webhooks/stripe", "evt_6", secret="whsec_wrong")).status == 401
    assert (await send(client, "/webhooks/stripe", "evt_7", t=int(time.time()) - 3600)).status == 401
    assert (
        await send(client, "/webhooks/typed", "evt_8", type_="customer.created")
    ).status == 200  # filtered

    m = await scrape(client)
    total = "sidecar_requests_total"
    assert value(m, total, route="stripe", outcome="forwarded") == 2
    assert value(m, total, route="stripe", outcome="duplicate") == 1
    assert value(m, total, route="stripe", outcome="queued") == 1
    assert value(m, total, route="stripe", outcome="dead_lettered") == 2
    assert value(m, total, route="stripe", outcome="rejected_signature") == 2
    assert value(m, total, route="typed", outcome="filtered") == 1
    assert value(m, "sidecar_signature_failures_total", route="stripe", reason="mismatch") == 1
    assert value(m, "sidecar_signature_failures_total", route="stripe", reason="timestamp") == 1
    assert value(m, "sidecar_forward_attempts_total", route="stripe", result="delivered") == 2
    assert value(m, "sidecar_forward_attempts_total", route="stripe", result="retryable") == 1
    assert value(m, "sidecar_forward_attempts_total", route="stripe", result="permanent") == 2
    assert value(m, "sidecar_forward_duration_seconds_count", route="stripe") == 5
    assert value(m, "sidecar_delivery_lag_seconds_count", route="stripe") == 2
    assert value(m, "sidecar_dlq_evicted_total", route="stripe") == 1
    # a route with no eviction yet has its series at 0 (an increase() alert has data from the start)
    assert ("sidecar_dlq_evicted_total", (("route", "typed"),)) in m
    # and so has a verifying route with no signature failure yet, for its forgeries (a route that verifies nothing
    # has none: it cannot fail)
    assert ("sidecar_signature_failures_total", (("reason", "mismatch"), ("route", "typed"))) in m
    assert not [
        labels
        for name, labels in m
        if name == "sidecar_signature_failures_total" and ("route", "open") in labels
    ]
    assert value(m, "sidecar_dlq_length", route="stripe") == 1
    assert value(m, "sidecar_retry_scheduled", route="stripe") == 1  # evt_3 waits for its retry
    assert value(m, "sidecar_dlq_oldest_age_seconds", route="stripe") >= 0
    exported = {name for name, _ in m}
    for name in METRIC_NAMES:
        assert any(e == name or e.startswith(name + "_") for e in exported), name


ADMIN_TOKEN = "telemetry-test-admin-token"
STORE_GAUGES = ("sidecar_dlq_length", "sidecar_retry_scheduled", "sidecar_dlq_oldest_age_seconds")


def reload_config(upstream: Upstream, redis_url: str, route_names: list[str]) -> str:
    """A config file's text: `stripe` plus unsigned routes by name, reloaded on file change (every 100 ms)."""
    unsigned = "".join(
        f"  - {{name: {n}, path: /webhooks/{n}, provider: none, event_id: body_sha256}}\n"
        for n in route_names
    )
    stripe = f'  - {{name: stripe, path: /webhooks/stripe, provider: stripe, secrets: ["{STRIPE_SECRET}"]}}\n'
    return watched_config(upstream.url, redis_url, ADMIN_TOKEN, stripe + unsigned)


def gauge_routes(samples: dict, name: str) -> set[str]:
    return {dict(labels)["route"] for (n, labels) in samples if n == name}


async def test_telemetry_store_gauges_follow_reloaded_routes_and_keep_removed_ones_with_dead_letters(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: Any
) -> None:
    cfg_path = tmp_path / "sidecar.yaml"
    cfg_path.write_text(reload_config(upstream, redis_url, ["gen"]))
    app = create_app(load(cfg_path), redis_url=redis_url, run_worker=False, config_path=str(cfg_path))
    async with TestClient(TestServer(app)) as client, TestClient(TestServer(create_admin_app(app))) as admin:
        runtime = app[RUNTIME]
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        # A route added by hot reload, with a dead letter on it: /metrics says so, as /admin/stats does.
        cfg_path.write_text(reload_config(upstream, redis_url, ["gen", "late"]))
        assert await wait_until(lambda: runtime.telemetry.config_reloads["applied"] >= 1, timeout=10)
        upstream.respond(400)
        resp = await client.post("/webhooks/late", data=b"late one")
        assert resp.status == 202 and (await resp.json())["dead_lettered"] is True
        stats = await (await admin.get("/admin/stats", headers=auth)).json()
        assert stats["routes"]["late"]["dead"] == 1
        m = await scrape(client)
        for name in STORE_GAUGES:
            assert gauge_routes(m, name) == {"stripe", "gen", "late"}, name
        assert value(m, "sidecar_dlq_length", route="late") == 1
        assert value(m, "sidecar_dlq_length", route="gen") == 0  # configured, empty: still exported
        assert value(m, "sidecar_dlq_oldest_age_seconds", route="late") >= 0

        # The route removed by a reload: its dead letter is still held, so its gauges stay (the alert on
        # sidecar_dlq_length must still fire); `gen`, removed with nothing held, stops being exported.
        cfg_path.write_text(reload_config(upstream, redis_url, []))
        assert await wait_until(lambda: runtime.telemetry.config_reloads["applied"] >= 2, timeout=10)
        m = await scrape(client)
        assert gauge_routes(m, "sidecar_dlq_length") == {"stripe", "late"}
        assert value(m, "sidecar_dlq_length", route="late") == 1
        assert gauge_routes(m, "sidecar_dlq_oldest_age_seconds") == {"stripe", "late"}
        # and a process started after the removal (it never had `late` configured) exports it too
        fresh = create_app(load(cfg_path), redis_url=redis_url, run_worker=False)
        async with TestClient(TestServer(fresh)) as other:
            assert value(await scrape(other), "sidecar_dlq_length", route="late") == 1

        # Once an operator drains it, the removed route's series end.
        drained = await admin.post("/admin/dlq/drain", json={"route": "late"}, headers=auth)
        assert drained.status == 200 and len((await drained.read()).splitlines()) == 1
        m = await scrape(client)
        for name in STORE_GAUGES:
            assert gauge_routes(m, name) == {"stripe"}, name


@pytest.fixture
def spans() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tel = Telemetry(span_processors=[SimpleSpanProcessor(exporter)])
    try:
        yield tel, exporter
    finally:
        tel.shutdown()


async def test_telemetry_spans_continue_incoming_trace_and_reach_upstream(
    sidecar_factory: Any, upstream: Upstream, spans: tuple[Telemetry, InMemorySpanExporter]
) -> None:
    tel, exporter = spans
    client = await sidecar_factory(
        ROUTES, telemetry=tel, retry="{base_delay: 50ms, multiplier: 1, jitter: 0}"
    )
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = stripe_body("evt_trace")
    headers = {**stripe_headers(body), "traceparent": f"00-{incoming_trace}-00f067aa0ba902b7-01"}
    upstream.respond(503)
    assert (await client.post("/webhooks/stripe", data=body, headers=headers)).status == 202
    time.sleep(0.06)
    assert await client.server.app[RUNTIME].worker.run_once() == 1

    finished = exporter.get_finished_spans()
    receive = [s for s in finished if s.name == "webhook.receive"]
    forwards = sorted((s for s in finished if s.name == "webhook.forward"), key=lambda s: s.start_time)
    assert len(receive) == 1 and len(forwards) == 2
    assert receive[0].kind == SpanKind.SERVER
    assert f"{receive[0].context.trace_id:032x}" == incoming_trace  # continued, not restarted
    first, retry = forwards
    assert first.kind == SpanKind.CLIENT and first.parent.span_id == receive[0].context.span_id
    # the upstream's 503 failed the first forward; the retry succeeded; the 202 answer was no server error
    assert (first.status.status_code, first.status.description) == (StatusCode.ERROR, "HTTP 503")
    assert retry.status.status_code is StatusCode.UNSET and receive[0].status.status_code is StatusCode.UNSET
    assert receive[0].attributes["sidecar.outcome"] == "queued"
    assert receive[0].attributes["sidecar.event_id"] == "evt_trace"
    # What the upstream got: a traceparent naming the forward span of the same trace.
    sent = [r.headers["traceparent"] for r in upstream.received]
    assert sent[0] == f"00-{incoming_trace}-{first.context.span_id:016x}-01"
    # The retry is its own trace, linked back to the request that brought the event in.
    assert retry.context.trace_id != receive[0].context.trace_id
    assert [link.context.span_id for link in retry.links] == [receive[0].context.span_id]
    assert sent[1].startswith(f"00-{retry.context.trace_id:032x}-{retry.context.span_id:016x}-")
    assert int(sent[1][-2:], 16) & 1  # sampled


async def test_telemetry_a_trace_not_sampled_still_settles_a_refused_event(
    sidecar_factory: Any, upstream: Upstream, spans: tuple[Telemetry, InMemorySpanExporter]
) -> None:
    """An incoming traceparent with its sampled flag off gives unsampled spans, which have no kind: marking a 4xx
    forward as an error raised, answered 500 and left the event leased (to be forwarded again)."""
    tel, exporter = spans
    client = await sidecar_factory(ROUTES, telemetry=tel)
    upstream.respond(404)
    body = stripe_body("evt_unsampled")
    headers = {
        **stripe_headers(body),
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    }
    resp = await client.post("/webhooks/stripe", data=body, headers=headers)
    assert resp.status == 202 and (await resp.json())["dead_lettered"] is True
    assert exporter.get_finished_spans() == ()  # not sampled: nothing exported
    assert upstream.ids() == ["evt_unsampled"]


async def test_telemetry_traceparent_propagates_without_a_span_exporter(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    client = await sidecar_factory(ROUTES)
    body = stripe_body("evt_tp")
    trace = "0af7651916cd43dd8448eb211c80319c"
    headers = {**stripe_headers(body), "traceparent": f"00-{trace}-b7ad6b7169203331-01"}
    assert (await client.post("/webhooks/stripe", data=body, headers=headers)).status == 200
    sent = upstream.received[0].headers["traceparent"]
    assert sent.startswith(f"00-{trace}-") and not sent.endswith("b7ad6b7169203331-01")
    # the caller's sampling decision goes on with its trace: a receiver that records sampled traces records this one
    assert sent.endswith("-01"), sent


@pytest.mark.parametrize(("ratio", "recorded"), [("0", 0), ("1", 1), ("0.0", 0), ("1.5", 1), ("often", 1)])
def test_telemetry_trace_sample_ratio_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, ratio: str, recorded: int
) -> None:
    """SIDECAR_TRACE_SAMPLE_RATIO: 0 records no trace the sidecar starts (tracing kept for the traces callers
    sample); a value outside [0, 1] or not a number is said and every trace recorded."""
    monkeypatch.setenv("SIDECAR_TRACE_SAMPLE_RATIO", ratio)
    exporter = InMemorySpanExporter()
    tel = Telemetry(span_processors=[SimpleSpanProcessor(exporter)])
    try:
        for _ in range(20):
            Telemetry.end_inbound(tel.start_inbound("stripe", "POST", None), "forwarded", "evt_1", None, 200)
        assert len(exporter.get_finished_spans()) == 20 * recorded
    finally:
        tel.shutdown()


@pytest.mark.parametrize(
    "bad",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71-9203331-01",  # 55 chars, a '-' inside the parent id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id (W3C: invalid)
        "00-0af7651916cd43dd8448eb211c80319c-zzzzzzzzzzzzzzzz-01",
    ],
)
async def test_telemetry_an_invalid_traceparent_starts_a_new_trace_without_a_span_exporter(
    sidecar_factory: Any, upstream: Upstream, bad: str
) -> None:
    """A malformed traceparent (any client can send one) is ignored, as the OpenTelemetry propagator does: the
    request is served (it was a 500 internal_error, never counted) and the upstream gets a trace of its own."""
    client = await sidecar_factory(ROUTES)
    body = stripe_body("evt_bad_tp")
    resp = await client.post(
        "/webhooks/stripe", data=body, headers={**stripe_headers(body), "traceparent": bad}
    )
    assert resp.status == 200, await resp.text()
    assert "0af7651916cd43dd8448eb211c80319c" not in upstream.received[0].headers["traceparent"]


async def test_telemetry_json_logs_carry_outcomes_and_never_secrets_or_bodies(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream)
    try:
        client = await sidecar_factory(
            ROUTES, extra="logging: {requests: all}", retry="{base_delay: 10ms, multiplier: 1, jitter: 0}"
        )
        marker = "BODY-MARKER-7f3c"
        for i, (status, secret) in enumerate(
            [(200, STRIPE_SECRET), (503, STRIPE_SECRET), (200, "whsec_nope")]
        ):
            upstream.respond(status)
            body = json.dumps({"id": f"evt_log{i}", "type": "invoice.paid", "note": marker}).encode()
            await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body, secret=secret))
        time.sleep(0.02)
        await client.server.app[RUNTIME].worker.run_once()
    finally:
        setup_logging("warning", "text")
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    text = stream.getvalue()
    assert STRIPE_SECRET not in text and "whsec_nope" not in text
    assert marker not in text
    outcomes = [(e.get("event_id"), e.get("outcome")) for e in lines if e["msg"] in ("request", "attempt")]
    assert ("evt_log0", "forwarded") in outcomes
    assert ("evt_log1", "queued") in outcomes
    assert ("evt_log1", "delivered") in outcomes  # the worker's attempt 2
    assert (None, "rejected_signature") in outcomes
    [refused] = [e for e in lines if e["msg"] == "request" and e.get("outcome") == "rejected_signature"]
    assert refused["error"] == "mismatch" and refused["detail"]  # the reason in words, as the 401 says it
    request_lines = [e for e in lines if e["msg"] == "request" and e.get("event_id") == "evt_log0"]
    assert request_lines[0]["route"] == "stripe" and request_lines[0]["status"] == 200
    assert len(request_lines[0]["trace_id"]) == 32 and request_lines[0]["attempt"] == 1
    assert all(isinstance(e["duration_ms"], float) for e in lines if e["msg"] == "request")
    logging.getLogger().handlers[0].flush()


async def test_telemetry_default_logs_only_notable_requests_at_info(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream)
    try:
        client = await sidecar_factory(ROUTES)
        assert (await send(client, "/webhooks/stripe", "evt_quiet")).status == 200
        upstream.respond(503)
        assert (await send(client, "/webhooks/stripe", "evt_loud")).status == 202
    finally:
        setup_logging("warning", "text")
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    events = [e.get("event_id") for e in lines]
    assert "evt_loud" in events and "evt_quiet" not in events
    # the provider was told 202; the line says what the upstream answered (it said nothing, a metrics audit)
    [loud] = [e for e in lines if e.get("event_id") == "evt_loud" and e["msg"] == "request"]
    assert (loud["status"], loud["error"], loud["detail"]) == (202, "http_503", "the upstream answered 503")


async def test_telemetry_pass_through_forwards_are_counted_and_failures_logged(
    sidecar_factory: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A `dedupe: false` route (like non-POSTs and passed handshakes) forwards synchronously: its forwards are
    counted and timed like any other, and one the upstream failed is logged by default. Before (an observability
    audit), an upstream answering such a route 500 and 502 left no forward series and no log line."""
    routes = f"""
    - name: sync
      path: /webhooks/sync
      provider: stripe
      secrets: ["{STRIPE_SECRET}"]
      dedupe: false
    """
    client = await sidecar_factory(routes)
    upstream.respond(200, 500, 400)
    with caplog.at_level(logging.DEBUG, logger="sidecar.ingress"):
        statuses = [(await send(client, "/webhooks/sync", f"evt_p{i}")).status for i in range(3)]
    assert statuses == [200, 500, 400]
    samples = await scrape(client)
    for result in ("delivered", "retryable", "permanent"):
        assert value(samples, "sidecar_forward_attempts_total", route="sync", result=result) == 1, result
    assert value(samples, "sidecar_forward_duration_seconds_count", route="sync") == 3
    assert value(samples, "sidecar_requests_total", route="sync", outcome="passthrough") == 3
    levels = {r.__dict__.get("event_id"): r.levelno for r in caplog.records if r.getMessage() == "request"}
    assert levels == {"evt_p0": logging.DEBUG, "evt_p1": logging.INFO, "evt_p2": logging.DEBUG}, levels


@pytest.mark.parametrize("requests", ["notable", "all"])
async def test_telemetry_requests_to_paths_no_route_has_are_logged_with_the_path(
    sidecar_factory: Any, caplog: pytest.LogCaptureFixture, requests: str
) -> None:
    """A provider given a mistyped URL (a trailing slash) gets 404 no_route: the log says which path, every time
    with `logging.requests: all`, else the first and then a count at most once a minute. Before, nothing at all."""
    client = await sidecar_factory(ROUTES, extra=f"logging: {{requests: {requests}}}")
    with caplog.at_level(logging.INFO, logger="sidecar.ingress"):
        for path in ("/webhooks/stripe/", "/webhooks/strip"):
            resp = await send(client, path, "evt_nr")
            assert resp.status == 404 and (await resp.json())["error"] == "no_route"
    lines = [r for r in caplog.records if r.name == "sidecar.ingress"]
    if requests == "all":
        assert [(r.__dict__["outcome"], r.__dict__["path"]) for r in lines] == [
            ("no_route", "/webhooks/stripe/"),
            ("no_route", "/webhooks/strip"),
        ]
    else:
        [line] = lines
        assert "/webhooks/stripe/" in line.getMessage() and "1 request(s)" in line.getMessage()
    assert value(await scrape(client), "sidecar_requests_total", route="", outcome="no_route") == 2
    assert all(r.__dict__["client"] == "127.0.0.1" for r in lines)


async def test_telemetry_refusals_are_logged_with_the_client_and_forwarded_for(
    sidecar_factory: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged request is logged with who sent it: the peer's address, and the X-Forwarded-For a proxy in front
    added. Before, the line had no address at all."""
    client = await sidecar_factory(ROUTES)
    body = json.dumps({"id": "evt_forged", "type": "invoice.paid"}).encode()
    with caplog.at_level(logging.INFO, logger="sidecar.ingress"):
        headers = {**stripe_headers(body, secret="whsec_nope"), "X-Forwarded-For": "203.0.113.7, 10.0.0.2"}
        assert (await client.post("/webhooks/stripe", data=body, headers=headers)).status == 401
        headers = stripe_headers(body, secret="whsec_nope")
        assert (await client.post("/webhooks/stripe", data=body, headers=headers)).status == 401
    [first, second] = [r.__dict__ for r in caplog.records if r.getMessage() == "request"]
    assert first["outcome"] == "rejected_signature" and first["client"] == "127.0.0.1"
    assert first["forwarded_for"] == "203.0.113.7, 10.0.0.2"
    assert second["client"] == "127.0.0.1" and "forwarded_for" not in second
    assert upstream.received == []


def test_telemetry_worker_processes_put_their_index_on_every_line() -> None:
    for worker, expect in ((1, 1), (0, 0), (None, None)):  # worker 0 is a worker too
        stream = io.StringIO()
        setup_logging("info", "json", stream=stream, worker=worker)
        try:
            logging.getLogger("sidecar.test").info("hello %s", "there")
        finally:
            setup_logging("warning", "text")
        [entry] = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert entry["msg"] == "hello there" and entry.get("worker") == expect


def test_json_log_lines_carry_the_traceback() -> None:
    import sys

    from sidecar.logs import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("sidecar", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "failed" and "Traceback" in entry["exc"] and "ValueError: boom" in entry["exc"]


def test_log_format_from_the_environment_wins_over_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_LOG_FORMAT", "JSON")
    stream = io.StringIO()
    setup_logging("info", "text", stream=stream)
    try:
        logging.getLogger("sidecar.test").info("hello")
    finally:
        monkeypatch.delenv("SIDECAR_LOG_FORMAT")
        setup_logging("warning", "text")
    assert json.loads(stream.getvalue())["msg"] == "hello"


def test_printable_escapes_control_characters_but_those_it_keeps() -> None:
    """`sidecar dlq show` prints a body with its newlines and tabs, never a terminal escape sequence."""
    from sidecar.logs import printable

    assert printable("a\nb\tc\x1b[2J") == "a\\nb\\tc\\x1b[2J"
    assert printable("a\nb\tc\x1b[2J", keep="\n\t") == "a\nb\tc\\x1b[2J"


def test_tally_says_the_first_at_once_then_counts_then_says_once_it_is_over() -> None:
    from sidecar.logs import Tally

    tally = Tally(every=3600)
    assert tally.over() is None  # nothing happened: nothing to say
    assert tally.count() == 1 and tally.began is not None  # the first occurrence is said at once
    assert [tally.count(), tally.count()] == [None, None] and tally.total == 3
    assert tally.over() == 2 and tally.began is None  # the two not said yet, once
    assert tally.over() is None
    assert tally.count() == 1  # it starts again: said at once again


@pytest.fixture
async def otlp_collector(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, list[bytes]]]:
    """An OTLP/HTTP collector on loopback that keeps every export's raw body by path, with the standard variable
    pointing the exporters at it (set before the `Telemetry` is made)."""
    from aiohttp import web

    received: dict[str, list[bytes]] = {"/v1/metrics": [], "/v1/traces": []}

    async def collect(request: web.Request) -> web.Response:
        received[request.path].append(await request.read())
        return web.Response(status=200)

    collector = web.Application()
    collector.router.add_post("/v1/metrics", collect)
    collector.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(collector)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        yield received
    finally:
        await runner.cleanup()


def otlp_metrics(received: dict[str, list[bytes]]) -> list[Any]:
    """Every metric of every OTLP metrics export received, in order."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    exports = [ExportMetricsServiceRequest.FromString(raw) for raw in received["/v1/metrics"]]
    return [
        m for msg in exports for rm in msg.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    ]


async def test_telemetry_exports_over_otlp_when_the_standard_variables_are_set(
    otlp_collector: dict[str, list[bytes]], sidecar_factory: Any, upstream: Upstream
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    tel = Telemetry()
    try:
        client = await sidecar_factory(ROUTES, telemetry=tel)
        assert (await send(client, "/webhooks/stripe", "evt_otlp")).status == 200
        # the exporters run in their own threads: flush them without blocking the loop the collector runs on
        await asyncio.to_thread(tel.force_flush)
    finally:
        await asyncio.to_thread(tel.shutdown)
    names = {m.name for m in otlp_metrics(otlp_collector)}
    assert {"sidecar_requests_total", "sidecar_forward_duration_seconds"} <= names
    # the zero series go out from the start, with nobody scraping /metrics (they waited for a scrape: an audit)
    evicted = [
        p
        for m in otlp_metrics(otlp_collector)
        if m.name == "sidecar_dlq_evicted_total"
        for p in m.sum.data_points
        if any(a.value.string_value == "typed" for a in p.attributes)
    ]
    assert evicted and evicted[-1].as_int == 0
    spans = set()
    for raw in otlp_collector["/v1/traces"]:
        msg = ExportTraceServiceRequest.FromString(raw)
        spans |= {s.name for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert {"webhook.receive", "webhook.forward"} <= spans


async def test_telemetry_otlp_keeps_every_series_past_the_sdk_default_limit(
    otlp_collector: dict[str, list[bytes]],
) -> None:
    """Past 2,000 series in one metric the SDK's default folded the rest into one `otel.metric.overflow` point."""
    tel = Telemetry()
    try:
        for i in range(600):
            for outcome in ("forwarded", "duplicate", "queued", "signature_invalid"):
                tel.requests[(f"r{i}", outcome)] += 1
            tel.forward_duration.record(0.01, tel.route_labels(f"r{i}"))
        await asyncio.to_thread(tel.force_flush)
    finally:
        await asyncio.to_thread(tel.shutdown)
    metrics = otlp_metrics(otlp_collector)
    points = [p for m in metrics if m.name == "sidecar_requests_total" for p in m.sum.data_points]
    keys = {tuple(sorted((a.key, a.value.string_value) for a in p.attributes)) for p in points}
    assert len(keys) == 2400
    assert not any(a.key == "otel.metric.overflow" for p in points for a in p.attributes)
    durations = [
        p for m in metrics if m.name == "sidecar_forward_duration_seconds" for p in m.histogram.data_points
    ]
    assert len({tuple((a.key, a.value.string_value) for a in p.attributes) for p in durations}) == 600


async def test_telemetry_store_gauges_go_out_over_otlp_without_a_scrape(
    otlp_collector: dict[str, list[bytes]], monkeypatch: pytest.MonkeyPatch, sidecar_factory: Any
) -> None:
    """The store gauges (DLQ length, oldest age, retry schedule) over OTLP follow the store with nobody scraping
    /metrics. Before (an observability audit) only a scrape refreshed them: none went out until the first scrape,
    and after it they stayed at its values."""
    from tests.test_admin import bury_many

    def dlq_lengths() -> list[float]:
        return [
            p.as_double or p.as_int
            for m in otlp_metrics(otlp_collector)
            if m.name == "sidecar_dlq_length"
            for p in m.gauge.data_points
            if any(a.value.string_value == "stripe" for a in p.attributes)
        ]

    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    tel = Telemetry()
    try:
        client = await sidecar_factory(ROUTES, telemetry=tel)
        store = client.server.app[RUNTIME].store
        await bury_many(store, 3)
        assert await wait_until(lambda: 3 in dlq_lengths(), timeout=10), dlq_lengths()
        await bury_many(store, 2, prefix="more")
        assert await wait_until(lambda: 5 in dlq_lengths(), timeout=10), dlq_lengths()
    finally:
        await asyncio.to_thread(tel.shutdown)


def test_telemetry_target_info_labels_stay_valid_for_any_resource_attribute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_RESOURCE_ATTRIBUTES keys that are not label names (a leading digit, two keys alike once sanitized)
    made `target_info` unparseable, and Prometheus drops the whole scrape (a review of the renderer)."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "1abc=x,a.b=2,a_b=1")
    tel = Telemetry()
    try:
        [info] = [f for f in text_string_to_metric_families(tel.render().decode()) if f.name == "target_info"]
    finally:
        tel.shutdown()
    labels = info.samples[0].labels
    assert (
        labels["_abc"] == "x" and labels["a_b"] in ("1", "2") and labels["service_name"] == "webhook-sidecar"
    )


def test_telemetry_route_histogram_buckets_are_cumulative_and_inclusive() -> None:
    tel = Telemetry()
    try:
        for v in (0.001, 0.0011, 0.3, 99.0):
            tel.forward_duration.record(v, {"route": "r"})
        samples = {
            (s.name, s.labels.get("le")): s.value
            for family in text_string_to_metric_families(tel.render().decode())
            if family.name == "sidecar_forward_duration_seconds"
            for s in family.samples
        }
    finally:
        tel.shutdown()
    assert samples[("sidecar_forward_duration_seconds_bucket", "0.001")] == 1  # le is "<=": 0.001 counts here
    assert samples[("sidecar_forward_duration_seconds_bucket", "0.0025")] == 2
    assert samples[("sidecar_forward_duration_seconds_bucket", "0.5")] == 3
    assert samples[("sidecar_forward_duration_seconds_bucket", "60.0")] == 3
    assert samples[("sidecar_forward_duration_seconds_bucket", "+Inf")] == 4
    assert samples[("sidecar_forward_duration_seconds_count", None)] == 4
    assert samples[("sidecar_forward_duration_seconds_sum", None)] == pytest.approx(99.3021)


def test_telemetry_render_keeps_every_series_at_scale_and_escapes_labels() -> None:
    """/metrics used to be the OpenTelemetry Prometheus exporter's text: past 2,000 series in one metric (500
    routes with 4 outcomes each) the SDK folded the rest into one `otel_metric_overflow` series, so most routes'
    counts vanished, and 2,000 routes took it ~1 s of the event loop. Now every series is written, as before with
    `otel_scope_*` labels and `target_info`."""
    tel = Telemetry()
    try:
        routes = [f"r{i}" for i in range(600)]
        outcomes = ("forwarded", "duplicate", "queued", "signature_invalid")
        for i, route in enumerate(routes):
            for j, outcome in enumerate(outcomes):
                tel.requests[(route, outcome)] += i + j
            tel.forward_duration.record(0.002 * (i % 7), tel.route_labels(route))
            tel.snapshot[route] = {"pending": float(i), "dead": 1.0, "oldest_age": 2.5}
        odd = 'a"b\\c\nd é'
        tel.requests[(odd, "forwarded")] += 3
        tel.store_up = 1
        families = {f.name: f for f in text_string_to_metric_families(tel.render().decode())}
    finally:
        tel.shutdown()
    requests = {
        (s.labels["route"], s.labels["outcome"]): s.value for s in families["sidecar_requests"].samples
    }
    assert len(requests) == 600 * 4 + 1
    assert all(requests[(r, o)] == i + j for i, r in enumerate(routes) for j, o in enumerate(outcomes))
    assert requests[(odd, "forwarded")] == 3
    assert not any("otel_metric_overflow" in s.labels for f in families.values() for s in f.samples)
    assert all(s.labels["otel_scope_name"] == "sidecar" for s in families["sidecar_requests"].samples)
    assert families["target_info"].samples[0].labels["service_name"] == "webhook-sidecar"
    pending = {s.labels["route"]: s.value for s in families["sidecar_retry_scheduled"].samples}
    assert pending == {r: float(i) for i, r in enumerate(routes)}
    assert [s.value for s in families["sidecar_store_up"].samples] == [1.0]
    histogram = families["sidecar_forward_duration_seconds"].samples
    for route in routes:
        rows = [s for s in histogram if s.labels.get("route") == route]
        buckets = [s.value for s in rows if s.name.endswith("_bucket")]
        count = next(s.value for s in rows if s.name.endswith("_count"))
        assert buckets == sorted(buckets) and buckets[-1] == count == 1


async def test_telemetry_inbound_span_status_follows_the_answer_and_names_the_outcome(
    sidecar_factory: Any,
    upstream: Upstream,
    spans: tuple[Telemetry, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An audit: a 202 after a connection error was an ERROR inbound span, one after an upstream 503 was not,
    and no span said what the request came to. Now: ERROR for a 5xx answer only (OpenTelemetry's HTTP server
    rule), `sidecar.outcome` as the requests counter labels it, the failure as `sidecar.error`."""
    tel, exporter = spans
    upstream.url = "http://127.0.0.1:1"  # nothing listens on port 1
    client = await sidecar_factory(ROUTES, telemetry=tel)
    body = stripe_body("evt_down")
    with caplog.at_level(logging.INFO, logger="sidecar.ingress"):
        assert (await client.post("/webhooks/stripe", data=body, headers=stripe_headers(body))).status == 202
    # the log line says why in words, not only the code (an audit: a refused certificate, EMFILE and parser
    # errors were all just connect_error / protocol_error)
    [line] = [r for r in caplog.records if getattr(r, "event_id", None) == "evt_down"]
    assert line.error == "connect_error"  # type: ignore[attr-defined]
    assert line.detail.startswith("cannot connect to the upstream: ")  # type: ignore[attr-defined]
    forged = stripe_body("evt_forged")
    bad = {**stripe_headers(forged), "Stripe-Signature": "t=1,v1=00"}
    assert (await client.post("/webhooks/stripe", data=forged, headers=bad)).status == 401
    receive = [s for s in exporter.get_finished_spans() if s.name == "webhook.receive"]
    assert [s.attributes["sidecar.outcome"] for s in receive] == ["queued", "rejected_signature"]
    assert [s.status.status_code for s in receive] == [StatusCode.UNSET, StatusCode.UNSET]
    assert [s.attributes["sidecar.error"] for s in receive] == ["connect_error", "mismatch"]
    assert [s.attributes["http.response.status_code"] for s in receive] == [202, 401]


def test_text_log_fields_a_client_sets_cannot_forge_a_field_or_a_line() -> None:
    """A path with %0D or U+2028, an X-Forwarded-For with spaces and `=`: written as they were in text logs, they
    added a forged line or fields to the audit trail (a security audit). Such values are quoted (repr)."""
    import logging

    from sidecar.logs import TextFormatter

    record = logging.LogRecord("sidecar.ingress", logging.INFO, __file__, 1, "request", None, None)
    record.__dict__.update(
        path="/x\rERROR sidecar.admin: dlq drain\u2028next",
        forwarded_for="10.0.0.1 outcome=forwarded status=200",
        route="stripe",
        status=401,
    )
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1 and "\r" not in line and "\u2028" not in line, line
    assert " route=stripe status=401 " in line, line
    record.__dict__.update(path="/in?outcome=forwarded", forwarded_for=None)
    assert "path='/in?outcome=forwarded'" in TextFormatter().format(record)  # a value with `=` is quoted too
    assert line.endswith(" forwarded_for='10.0.0.1 outcome=forwarded status=200'"), line
    assert "path='/x\\rERROR sidecar.admin: dlq drain\\u2028next'" in line, line
    # an event id from a signed body, in a message's arguments: no second line either; a traceback keeps its lines
    record = logging.LogRecord(
        "sidecar.dispatch",
        logging.WARNING,
        __file__,
        1,
        "dead-lettered %s/%s",
        ("stripe", "e\nERROR x"),
        None,
    )
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1 and line.endswith("dead-lettered stripe/e\\nERROR x"), line
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("sidecar", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "Traceback" in TextFormatter().format(record).splitlines()[1]
    # the message's own text keeps its lines (a refused reload lists its errors one a line: a review), and an
    # exception as an argument too; the record's arguments are left as they were for other handlers
    record = logging.LogRecord(
        "sidecar.reload",
        logging.ERROR,
        __file__,
        1,
        "refused:\n%s",
        (ValueError("a.yaml:1: x\na.yaml:2: y"),),
        None,
    )
    assert TextFormatter().format(record).splitlines()[1:] == ["a.yaml:1: x", "a.yaml:2: y"]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%(id)s", ({"id": "a\nb"},), None)
    assert TextFormatter().format(record).endswith("x: a\\nb") and record.args == {"id": "a\nb"}
