"""Metrics, traces and outcome logs. Every metric and span name is defined here.

Metrics are counted in plain dicts and rendered as Prometheus text at the admin `/metrics` by `Telemetry.render`
(the same text the OpenTelemetry Prometheus exporter gave, `otel_scope_*` labels and `target_info` included, at a
tenth of its cost: 2,000 routes took the exporter ~1 s), and exported over OTLP, as OpenTelemetry observable
instruments reading the same dicts, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics one) is set. Why counters
are dicts: a synchronous OTel `Counter.add` costs ~7 µs of Python per call, and the hot path counts several things
per request; a dict increment costs ~0.1 µs, and the SDK reads the totals only when it collects. Gauges
(scheduled, DLQ length, oldest dead letter) come from a store snapshot taken per scrape from per-shard counters and
the DLQ indexes — never a scan of event keys.

Traces: a server span per inbound request continues an incoming W3C `traceparent` (or starts a trace); each forward
attempt is a client span whose context goes upstream in `traceparent`; retries start a new trace linked to the
ingress span. With no span exporter configured the sampler is off: context still propagates, nothing is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider, TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.utils import floatToGoString

# Log formatting lives in sidecar.logs (light enough for the CLI); re-exported here, where callers look for it.
from sidecar.config import ROUTE_NAME, RouteConfig
from sidecar.logs import OUTCOME_FIELDS, JsonFormatter, TextFormatter, setup_logging  # noqa: F401

# ---- names (CONTRACT.md "Metrics") ------------------------------------------------------------------------------
REQUESTS = "sidecar_requests_total"
FORWARD_ATTEMPTS = "sidecar_forward_attempts_total"
FORWARD_DURATION = "sidecar_forward_duration_seconds"
RETRY_SCHEDULED = "sidecar_retry_scheduled"
DLQ_LENGTH = "sidecar_dlq_length"
DLQ_EVICTED = "sidecar_dlq_evicted_total"
SIGNATURE_FAILURES = "sidecar_signature_failures_total"
DELIVERY_LAG = "sidecar_delivery_lag_seconds"
DLQ_OLDEST_AGE = "sidecar_dlq_oldest_age_seconds"
CONFIG_RELOADS = "sidecar_config_reloads_total"  # added by the hot-reload work (issue 7)
STORE_UP = "sidecar_store_up"  # 1 while the store answers the gauges' reads, 0 once it failed or hung
METRIC_NAMES = (
    REQUESTS,
    FORWARD_ATTEMPTS,
    FORWARD_DURATION,
    RETRY_SCHEDULED,
    DLQ_LENGTH,
    DLQ_EVICTED,
    SIGNATURE_FAILURES,
    DELIVERY_LAG,
    DLQ_OLDEST_AGE,
    CONFIG_RELOADS,
    STORE_UP,
)
# each metric's description: its HELP line, and the OTLP instrument's
_HELP = {
    REQUESTS: "Inbound requests",
    FORWARD_ATTEMPTS: "Forward attempts to the upstream",
    SIGNATURE_FAILURES: "Requests refused for their signature",
    DLQ_EVICTED: "Dead letters pushed out by dlq.max_length",
    CONFIG_RELOADS: "Config reloads, applied or rejected",
    RETRY_SCHEDULED: "Events pending delivery (scheduled or in flight)",
    DLQ_LENGTH: "Dead letters held",
    DLQ_OLDEST_AGE: "Age of the oldest dead letter",
    STORE_UP: "1 when the store answered the last scrape's (or OTLP export's) reads in time, else 0",
}

SPAN_INBOUND = "webhook.receive"
SPAN_FORWARD = "webhook.forward"

# Seconds, from a fast loopback forward to a slow receiver near its timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, 259200.0)

_PROPAGATOR = TraceContextTextMapPropagator()


def _otlp_enabled(signal: str) -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


class Telemetry:
    """One per sidecar process (tests make one per app). Cheap to call from the hot path."""

    def __init__(
        self, span_processors: Iterable[SpanProcessor] = (), service: str = "webhook-sidecar"
    ) -> None:
        span_processors = list(span_processors)
        resource = Resource.create({"service.name": service})
        # what the OTel Prometheus exporter wrote first (the resource's attributes), kept for the same text
        self._target_info = "".join(
            (
                "# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info{",
                ",".join(
                    f'{k}="{_escape(v)}"'
                    for k, v in sorted(
                        # sanitized as the exporter did (a leading digit becomes '_'), then one label per name
                        {_label_name(k): str(v) for k, v in resource.attributes.items()}.items()
                    )
                ),
                "} 1.0\n",
            )
        )
        readers: list[MetricReader] = []
        otlp_metrics = self.otlp_metrics = _otlp_enabled("METRICS")
        if otlp_metrics:
            readers.append(_otlp_metric_reader())
        views = [
            View(
                instrument_name=FORWARD_DURATION,
                aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
            ),
            View(instrument_name=DELIVERY_LAG, aggregation=ExplicitBucketHistogramAggregation(LAG_BUCKETS)),
        ]
        # Exemplars (trace ids attached to histogram samples) cost ~2 µs a record; worth it only when traces leave.
        tracing = bool(span_processors) or _otlp_enabled("TRACES")
        exemplars = TraceBasedExemplarFilter() if tracing else AlwaysOffExemplarFilter()
        # shutdown_on_exit=False: the SDK's atexit hooks each waited out their exporter's timeout and retries (an
        # OTLP endpoint that never answers kept a SIGTERMed sidecar alive 36 s past its drain); `shutdown_within`
        # bounds the last export instead
        self.meter_provider = MeterProvider(
            metric_readers=readers,
            views=views,
            resource=resource,
            exemplar_filter=exemplars,
            shutdown_on_exit=False,
        )
        meter = self.meter_provider.get_meter("sidecar")

        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.forward_attempts: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.signature_failures: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.dlq_evicted: defaultdict[str, int] = defaultdict(int)
        self.config_reloads: defaultdict[str, int] = defaultdict(int, {"applied": 0, "rejected": 0})
        self.snapshot: dict[str, dict[str, float]] = {}
        # the store's own eviction counts (P:{dlq}:evicted, written by the same script that evicts): what a worker
        # counted and died with before a scrape is still in them
        self.evicted_in_store: dict[str, int] = {}
        self.store_up: int | None = None  # until the first look at the store
        self._route_labels: dict[str, dict[str, str]] = {}
        # With `server.workers: N`, worker 0 serves /metrics for all: the other workers' `state()`s, fetched for
        # each scrape (sidecar/peers.py), are added to this process's own counts in `render` only (with OTLP each
        # process exports its own).
        self.peers: list[State] = []
        self.pid = os.getpid()

        meter.create_observable_counter(
            REQUESTS,
            [self._counter("requests", self.requests, ("route", "outcome"))],
            description=_HELP[REQUESTS],
        )
        meter.create_observable_counter(
            FORWARD_ATTEMPTS,
            [self._counter("forward_attempts", self.forward_attempts, ("route", "result"))],
            description=_HELP[FORWARD_ATTEMPTS],
        )
        meter.create_observable_counter(
            SIGNATURE_FAILURES,
            [self._counter("signature_failures", self.signature_failures, ("route", "reason"))],
            description=_HELP[SIGNATURE_FAILURES],
        )
        meter.create_observable_counter(DLQ_EVICTED, [self._evicted], description=_HELP[DLQ_EVICTED])
        meter.create_observable_counter(
            CONFIG_RELOADS,
            # per process: every worker reloads the same file, so worker 0's count is the sidecar's
            [lambda _: [Observation(n, {"result": r}) for r, n in list(self.config_reloads.items())]],
            description=_HELP[CONFIG_RELOADS],
        )
        meter.create_observable_gauge(
            RETRY_SCHEDULED,
            [self._gauge("pending")],
            description=_HELP[RETRY_SCHEDULED],
        )
        meter.create_observable_gauge(DLQ_LENGTH, [self._gauge("dead")], description=_HELP[DLQ_LENGTH])
        meter.create_observable_gauge(
            DLQ_OLDEST_AGE, [self._gauge("oldest_age")], unit="s", description=_HELP[DLQ_OLDEST_AGE]
        )
        # What an alert on a store outage needs: once /readyz fails, the orchestrator sends no more webhooks, so
        # the 503s of `sidecar_requests_total{outcome="store_unavailable"}` stop while the outage goes on.
        meter.create_observable_gauge(
            STORE_UP,
            [lambda _: [] if self.store_up is None else [Observation(self.store_up)]],
            description=_HELP[STORE_UP],
        )
        # Histograms are aggregated here (a bisect, well under a µs) rather than by the SDK's synchronous
        # Histogram.record (~6 µs a call, two calls per event), and rendered from these rows; with OTLP configured,
        # an OTLP-only meter provider also receives every value.
        self._otlp_histograms: MeterProvider | None = None
        otel_meter = None
        if otlp_metrics:
            self._otlp_histograms = MeterProvider(
                metric_readers=[_otlp_metric_reader()],
                views=views,
                resource=resource,
                exemplar_filter=exemplars,
                shutdown_on_exit=False,
            )
            otel_meter = self._otlp_histograms.get_meter("sidecar")
        self.forward_duration = RouteHistogram(
            FORWARD_DURATION, "Duration of one forward attempt", LATENCY_BUCKETS, otel_meter
        )
        self.delivery_lag = RouteHistogram(
            DELIVERY_LAG, "First seen to delivered, across retries", LAG_BUCKETS, otel_meter
        )

        processors = list(span_processors)
        if _otlp_enabled("TRACES"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        ratio = _sample_ratio(os.environ.get("SIDECAR_TRACE_SAMPLE_RATIO", "1.0"))
        sampler = ParentBased(TraceIdRatioBased(ratio)) if processors else ALWAYS_OFF
        self.tracer_provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
        for processor in processors:
            self.tracer_provider.add_span_processor(processor)
        self.tracer = self.tracer_provider.get_tracer("sidecar")
        # With nothing to export, spans are not built at all: context still propagates (LightSpan), for ~1 µs.
        self.recording = bool(processors)

    # ---- metrics ---------------------------------------------------------------------------------------------------

    def route_labels(self, route: str) -> dict[str, str]:
        """The `{"route": …}` attribute dict, made once per route (instruments read it on every record)."""
        labels = self._route_labels.get(route)
        if labels is None:
            labels = self._route_labels[route] = {"route": route}
        return labels

    def count_forward(self, route: str, kind: str, seconds: float) -> dict[str, str]:
        """One forward that was sent (any answer, or none): counted by result and timed; the route's labels."""
        self.forward_attempts[(route, kind)] += 1
        labels = self.route_labels(route)
        self.forward_duration.record(seconds, labels)
        return labels

    def _counter(self, name: str, counts: Mapping[tuple[str, str], int], labels: tuple[str, str]) -> Any:
        def observe(_: CallbackOptions) -> list[Observation]:
            return [Observation(n, {labels[0]: a, labels[1]: b}) for (a, b), n in list(counts.items())]

        return observe

    def _evicted(self, _: CallbackOptions) -> list[Observation]:
        return [Observation(n, {"route": route}) for route, n in self._evicted_counts(dict(self.dlq_evicted))]

    def _evicted_counts(self, counted: dict[Any, float]) -> Iterable[tuple[Any, float]]:
        """What was counted by the workers, or the store's own count where that is higher (a worker that died
        before a scrape took its counts with it; the store keeps what the evicting script wrote)."""
        for route, n in self.evicted_in_store.items():
            counted[route] = max(counted.get(route, 0), n)
        return counted.items()

    _COUNTERS = ("requests", "forward_attempts", "signature_failures", "dlq_evicted")

    def state(self) -> State:
        """This process's counters and histograms, for worker 0 to add up (JSON-ready)."""
        counters = {
            name: [[*(k if isinstance(k, tuple) else (k,)), n] for k, n in list(getattr(self, name).items())]
            for name in self._COUNTERS
        }
        # rows copied: /metrics reads this on a thread while the event loop goes on recording
        histograms = {
            h.name: {route: list(row) for route, row in dict(h.series).items()}
            for h in (self.forward_duration, self.delivery_lag)
        }
        return {"pid": self.pid, "counters": counters, "histograms": histograms}

    def _gauge(self, field: str) -> Any:
        def observe(_: CallbackOptions) -> list[Observation]:
            return [Observation(v[field], {"route": r}) for r, v in self.snapshot.items() if field in v]

        return observe

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (the other workers' counts added, if any).

        Safe on a thread beside the event loop (which is how /metrics calls it): every dict the hot path writes is
        copied in one C call (`dict(d)`, `list(d.items())`) before it is iterated."""
        total = add_states(self.state(), *self.peers) if self.peers else None
        if total is None:
            counts = {name: dict(getattr(self, name)) for name in self._COUNTERS}
            rows = {h.name: dict(h.series) for h in (self.forward_duration, self.delivery_lag)}
        else:
            counts = {
                name: {tuple(labels) if len(labels) > 1 else labels[0]: n for *labels, n in found}
                for name, found in total["counters"].items()
            }
            rows = total["histograms"]
        out = [self._target_info]
        for name, label_names, series in (
            (REQUESTS, ("route", "outcome"), counts.get("requests", {}).items()),
            (FORWARD_ATTEMPTS, ("route", "result"), counts.get("forward_attempts", {}).items()),
            (SIGNATURE_FAILURES, ("route", "reason"), counts.get("signature_failures", {}).items()),
            (DLQ_EVICTED, ("route",), self._evicted_counts(counts.get("dlq_evicted", {}))),
            (CONFIG_RELOADS, ("result",), list(self.config_reloads.items())),
        ):
            _family(out, name, "counter", series, label_names)
        snapshot = self.snapshot
        for name, field in (
            (RETRY_SCHEDULED, "pending"),
            (DLQ_LENGTH, "dead"),
            (DLQ_OLDEST_AGE, "oldest_age"),
        ):
            gauges = [(route, v[field]) for route, v in snapshot.items() if field in v]
            _family(out, name, "gauge", gauges, ("route",))
        if self.store_up is not None:
            _family(out, STORE_UP, "gauge", [((), self.store_up)], ())
        for h in (self.forward_duration, self.delivery_lag):
            _histogram(out, h, rows.get(h.name, {}))
        return "".join(out).encode()

    async def refresh(self, store: Any, routes: Iterable[str]) -> None:
        """Take the gauges' store snapshot (per-shard counters + DLQ indexes; no scan of event keys).

        `routes`: the routes configured now (the live config, which a reload changes), each exported, zeros
        included. A route that is no longer configured (removed by a reload, or before this process started) is
        exported too while the store still holds dead letters or pending events for it: its dead letters are still
        there (listed, replayable, drainable; its pending events are dead-lettered as `route_removed`), and the
        shipped alert on `sidecar_dlq_length` must keep firing until an operator deals with them. Once it holds
        none, its series end (Prometheus marks them stale), so routes removed long ago do not linger. Such routes
        are found in the per-shard counters, which keep every route that ever had an event.
        """
        stats: dict[str, dict[str, int]]  # route_stats()'s
        stats, self.evicted_in_store = await asyncio.gather(store.route_stats(), store.dlq_evicted())
        configured = set(routes)
        now_ms = store.clock.now_ms()  # dead_at is on the schedule's clock
        snapshot: dict[str, dict[str, float]] = {}
        names = [*sorted(configured), *removed_routes(configured, stats)]
        # one pipelined round trip for every route's DLQ length, one more for the oldest of those that have any
        lengths = await store.dlq_lengths(names)
        oldests = await store.dlq_oldest_many([r for r in names if lengths[r] > 0])
        for route in names:
            pending = float(stats.get(route, {}).get("pending", 0))
            dead = float(lengths[route])
            if route not in configured and dead <= 0 and pending <= 0:
                continue
            oldest = oldests.get(route)
            snapshot[route] = {
                "pending": pending,
                "dead": dead,
                "oldest_age": max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0,
            }
        self.snapshot = snapshot

    async def refresh_within(self, store: Any, routes: Iterable[str], budget: float) -> None:
        """`refresh`, given up after `budget` seconds or on a store error: the last snapshot stays (refresh swaps
        it in whole), and `sidecar_store_up` (like /readyz) says the store did not answer."""
        from sidecar.errors import StoreError

        try:
            await asyncio.wait_for(self.refresh(store, routes), budget)
        except (StoreError, TimeoutError):
            self.store_up = 0
        else:
            self.store_up = 1

    def zero_series(self, routes: Iterable[RouteConfig]) -> None:
        """Export at 0 from the start, store or no store, so that a dashboard shows 0 rather than no data and an
        alert on increase() has a series before the first count: each route's DLQ evictions and, on a route that
        verifies, its signature mismatches."""
        for route in routes:
            self.dlq_evicted.setdefault(route.name, 0)
            if route.provider != "none":
                self.signature_failures.setdefault((route.name, "mismatch"), 0)

    async def refresh_routes(self, store: Any, routes: Sequence[RouteConfig], budget: float) -> None:
        """What a /metrics scrape (or an OTLP export) is given first: the zero series of the routes configured now
        (a reload adds some), and the store gauges' snapshot within `budget` seconds."""
        self.zero_series(routes)
        await self.refresh_within(store, [r.name for r in routes], budget)

    # ---- traces ----------------------------------------------------------------------------------------------------

    def start_inbound(self, route: str, method: str, traceparent: str | None) -> AnySpan:
        if not self.recording:
            return LightSpan.continue_from(traceparent)
        ctx = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        return self.tracer.start_span(
            SPAN_INBOUND,
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={"sidecar.route": route, "http.request.method": method},
        )

    def start_forward(
        self, route: str, event_id: str, attempt: int, parent: AnySpan | None, origin: str | None
    ) -> AnySpan:
        """A forward attempt: a child of the inbound span, or (a retry) a new trace linked to where it began."""
        if not self.recording:
            return parent.child() if isinstance(parent, LightSpan) else LightSpan.continue_from(None)
        attributes: dict[str, str | int] = {
            "sidecar.route": route,
            "sidecar.event_id": event_id,
            "sidecar.attempt": attempt,
        }
        if parent is not None:
            return self.tracer.start_span(
                SPAN_FORWARD,
                context=trace.set_span_in_context(parent),  # type: ignore[arg-type]
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
        links = []
        if origin:
            origin_ctx = trace.get_current_span(
                _PROPAGATOR.extract({"traceparent": origin})
            ).get_span_context()
            if origin_ctx.is_valid:
                links.append(Link(origin_ctx))
        return self.tracer.start_span(
            SPAN_FORWARD, context=None, kind=SpanKind.CLIENT, attributes=attributes, links=links
        )

    @staticmethod
    def traceparent(span: AnySpan) -> str | None:
        if isinstance(span, LightSpan):
            return span.traceparent
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    @staticmethod
    def trace_id(span: AnySpan | None) -> str | None:
        if span is None:
            return None
        if isinstance(span, LightSpan):
            return span.trace_id
        ctx = span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None

    @staticmethod
    def end(span: AnySpan, error: str | None = None, status: int | None = None) -> None:
        if isinstance(span, LightSpan):
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        elif status is not None and (
            status >= 500 or (status >= 400 and getattr(span, "kind", None) is SpanKind.CLIENT)
        ):
            # (a span not sampled has no kind: setting its status does nothing anyway)
            # OpenTelemetry's HTTP conventions: a forward (client) failed on any 4xx/5xx answer, an inbound
            # request (server) on a 5xx only
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        span.end()

    @classmethod
    def end_inbound(
        cls, span: AnySpan, outcome: str, event_id: str | None, error: str | None, status: int | None
    ) -> None:
        """End an inbound span with what the request came to: `sidecar.outcome` (the label of
        `sidecar_requests_total`), the event id, and what went wrong as `sidecar.error`. Its status is ERROR for an
        answer of 5xx (or none) only, as OpenTelemetry's HTTP server conventions have it: a 202 after a failed
        forward is the sidecar doing its job (the forward's own span carries that failure), a 401 the client's."""
        if isinstance(span, LightSpan):
            return
        span.set_attribute("sidecar.outcome", outcome)
        if event_id is not None:
            span.set_attribute("sidecar.event_id", event_id)
        if error:
            span.set_attribute("sidecar.error", error)
        if status is None:  # the handler raised: aiohttp answers 500
            cls.end(span, error or "unhandled error", None)
        else:
            cls.end(span, error if status >= 500 else None, status)

    def force_flush(self) -> None:
        """Push everything pending to the exporters now (blocking: call it off the event loop)."""
        self.meter_provider.force_flush()
        if self._otlp_histograms is not None:
            self._otlp_histograms.force_flush()
        self.tracer_provider.force_flush()

    def shutdown_within(self, seconds: float) -> bool:
        """`shutdown()` (the exporters' last export), given up after `seconds`: True if it finished. The exporting
        threads are daemons, so what is left does not hold the process at exit."""
        closing = threading.Thread(target=self.shutdown, name="telemetry-shutdown", daemon=True)
        closing.start()
        closing.join(seconds)
        return not closing.is_alive()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._otlp_histograms is not None:
            self._otlp_histograms.shutdown()


def _sample_ratio(raw: str) -> float:
    """SIDECAR_TRACE_SAMPLE_RATIO: a number in [0, 1]; anything else is said and 1.0 used (a typo in the
    environment must not stop the sidecar with a traceback)."""
    try:
        ratio = float(raw)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:
        logging.getLogger("sidecar").warning(
            "SIDECAR_TRACE_SAMPLE_RATIO=%r is not a number from 0 to 1; using 1.0", raw
        )
        return 1.0
    return ratio


# Series per metric an OTLP export carries. The SDK's default (2,000 since opentelemetry-sdk 1.45.2) folded every
# further series into one `otel.metric.overflow` point: `sidecar_requests_total` with 500 routes and 4 outcomes.
OTLP_SERIES_LIMIT = 1_000_000


def _otlp_metric_reader() -> MetricReader:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import Histogram, ObservableCounter, ObservableGauge
    from opentelemetry.sdk.metrics.export import CardinalityLimits, PeriodicExportingMetricReader

    limits: CardinalityLimits = dict.fromkeys(
        (ObservableCounter, ObservableGauge, Histogram), OTLP_SERIES_LIMIT
    )
    return PeriodicExportingMetricReader(OTLPMetricExporter(), cardinality_limits=limits)


# A `Telemetry.state()`: {"pid", "counters": {name: [[*labels, n], …]}, "histograms": {name: {route: row}}}
State = dict[str, Any]


def add_states(*states: State) -> State:
    """The sum of `Telemetry.state()`s: counters by labels, histogram rows by route (a row of another length, from
    a worker of another build, is left out)."""
    counters: dict[str, dict[tuple[Any, ...], float]] = {}
    histograms: dict[str, dict[str, list[float]]] = {}
    for state in states:
        for name, rows in state.get("counters", {}).items():
            total = counters.setdefault(name, {})
            for *labels, n in rows:
                total[tuple(labels)] = total.get(tuple(labels), 0) + n
        for name, series in state.get("histograms", {}).items():
            mine = histograms.setdefault(name, {})
            for route, row in series.items():
                have = mine.get(route)
                if have is None:
                    mine[route] = list(row)
                elif len(have) == len(row):
                    mine[route] = [a + b for a, b in zip(have, row, strict=True)]
    return {
        "counters": {name: [[*labels, n] for labels, n in total.items()] for name, total in counters.items()},
        "histograms": histograms,
    }


class RouteHistogram:
    """A histogram by route with fixed buckets, aggregated in-process; `record(value, {"route": r})` as in OTel."""

    def __init__(
        self, name: str, description: str, bounds: tuple[float, ...], otel_meter: Any = None
    ) -> None:
        self.name, self.description, self.bounds = name, description, bounds
        self.series: dict[str, list[float]] = {}  # route -> [count per bucket (+Inf last)..., sum]
        self._otel = (
            otel_meter.create_histogram(name, unit="s", description=description) if otel_meter else None
        )

    def record(self, value: float, labels: dict[str, str]) -> None:
        route = labels["route"]
        row = self.series.get(route)
        if row is None:
            row = self.series[route] = [0.0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value
        if self._otel is not None:
            self._otel.record(value, labels)


# on every series the OTel exporter wrote, kept so that no series changes its identity across an upgrade
_SCOPE = 'otel_scope_name="sidecar",otel_scope_schema_url="",otel_scope_version=""'


def _escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_name(name: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return f"_{name[1:]}" if name[:1].isdigit() else name


def _value(n: float) -> str:
    return repr(float(n)) if 0 <= n < 1e6 else floatToGoString(n)  # type: ignore[no-untyped-call]  # prometheus_client: unannotated


def _family(
    out: list[str], name: str, kind: str, series: Iterable[tuple[Any, float]], label_names: tuple[str, ...]
) -> None:
    """One counter or gauge family: HELP, TYPE and a line per series (labels sorted by name, as the OTel exporter
    wrote them); nothing at all without a series."""
    order = sorted(range(len(label_names)), key=lambda i: label_names[i])
    lines = []
    for labels, n in series:
        values = labels if isinstance(labels, tuple) else (labels,)
        if len(values) != len(label_names):
            continue  # a count from a worker of another build
        pairs = "".join(f',{label_names[i]}="{_escape(str(values[i]))}"' for i in order)
        lines.append(f"{name}{{{_SCOPE}{pairs}}} {_value(n)}\n")
    if lines:
        out.append(f"# HELP {name} {_HELP[name]}\n# TYPE {name} {kind}\n")
        out.extend(lines)


def _histogram(out: list[str], h: RouteHistogram, series: Mapping[str, list[float]]) -> None:
    """Prometheus' histogram format: cumulative `le` buckets, `_count`, `_sum`, a set per route."""
    out.append(f"# HELP {h.name} {h.description}\n# TYPE {h.name} histogram\n")
    les = [
        f'{h.name}_bucket{{le="{floatToGoString(b)}",route="'  # type: ignore[no-untyped-call]  # prometheus_client: unannotated
        for b in (*h.bounds, math.inf)
    ]
    for route, live in series.items():
        row = list(live)  # one consistent copy: the event loop may be recording into it
        if len(row) != len(les) + 1:
            continue
        label = _escape(route)
        running = 0.0
        for le, n in zip(les, row, strict=False):
            running += n
            out.append(f'{le}{label}"}} {_value(running)}\n')
        out.append(f'{h.name}_count{{route="{label}"}} {_value(running)}\n')
        out.append(f'{h.name}_sum{{route="{label}"}} {floatToGoString(row[-1])}\n')  # type: ignore[no-untyped-call]  # prometheus_client: unannotated


class LightSpan:
    """W3C trace context without a span: continue an incoming trace (or start one) and mint span ids."""

    __slots__ = ("flags", "span_id", "trace_id")

    def __init__(self, trace_id: str, span_id: str, flags: str) -> None:
        self.trace_id, self.span_id, self.flags = trace_id, span_id, flags

    @classmethod
    def continue_from(cls, traceparent: str | None) -> LightSpan:
        if (
            traceparent
            and len(traceparent) == 55
            and traceparent[2] == traceparent[35] == traceparent[52] == "-"
        ):
            # sliced, not split: a '-' inside a field made split() return five parts (ValueError: a 500)
            version, trace_id = traceparent[:2], traceparent[3:35]
            parent_id, flags = traceparent[36:52], traceparent[53:]
            if (
                version != "ff"
                and _HEX.fullmatch(version + trace_id + parent_id + flags)
                and trace_id != "0" * 32
                and parent_id != "0" * 16  # W3C: an all-zero or non-hex parent-id makes the header invalid
            ):
                return cls(trace_id, f"{random.getrandbits(64) or 1:016x}", flags)
        return cls(f"{random.getrandbits(128) or 1:032x}", f"{random.getrandbits(64) or 1:016x}", "00")

    def child(self) -> LightSpan:
        return LightSpan(self.trace_id, f"{random.getrandbits(64) or 1:016x}", self.flags)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


AnySpan = Span | LightSpan
_HEX = re.compile(r"[0-9a-f]+")


def removed_routes(configured: Collection[str], stats: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Routes in the store's counters (`route_stats`) that are no longer configured and may still hold events:
    pending ones, or dead letters (the `dead` counter only grows, so the caller counts the DLQ itself). A stray
    counter field that is no route name is no route."""
    return [
        route
        for route, c in stats.items()
        if route not in configured
        and ROUTE_NAME.fullmatch(route)
        and (c.get("pending", 0) > 0 or c.get("dead", 0) > 0)
    ]


def otlp_export_interval() -> float:
    """Seconds between OTLP metric exports (`OTEL_METRIC_EXPORT_INTERVAL`, ms; the SDK's default 60 s)."""
    try:
        ms = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
    except ValueError:
        ms = 60000.0
    return ms / 1000 if math.isfinite(ms) and ms > 0 else 60.0


async def keep_gauges_fresh(
    telemetry: Telemetry, store: Any, routes: Callable[[], Sequence[RouteConfig]], every: float
) -> None:
    """With OTLP metrics, refresh the store gauges' snapshot every `every` seconds (bounded by 1 s and 60 s), as a
    /metrics scrape does: the OTLP reader exports whatever the snapshot holds, so without this the store gauges
    went out only after a scrape, and then stale."""
    every = min(max(every, 1.0), 60.0)
    while True:
        await telemetry.refresh_routes(store, routes(), every)
        await asyncio.sleep(every)


def metrics_handler(main: Any, budget: float) -> Any:
    """GET /metrics for the admin app: refresh the store gauges (within `budget` seconds), then render."""
    from aiohttp import web

    from sidecar.app import RUNTIME

    # one scrape at a time: a second one waits for the first's render instead of running a second beside it
    lock = asyncio.Lock()

    async def metrics(_: web.Request) -> web.Response:
        runtime = main.get(RUNTIME)
        if runtime is None:
            return web.Response(status=503, text="starting\n")
        telemetry, peer_counts = runtime.telemetry, runtime.peer_counts

        def render() -> bytes:
            body: bytes = telemetry.render()
            if peer_counts is not None:  # what a replacement of this worker starts from
                peer_counts.remember(telemetry.state())
            return body

        async with lock:
            # a store that fails or hangs: the counters with the last gauge snapshot
            await telemetry.refresh_routes(runtime.store, runtime.dispatcher.config.routes, budget)
            if peer_counts is not None:  # the other workers' counts, added to this one's
                telemetry.peers = await peer_counts.states()
            # on a thread, so the event loop serving webhooks goes on (the GIL lets it in every 5 ms): with 2,000
            # routes the text is ~90,000 lines and takes ~70 ms to build
            body = await asyncio.to_thread(render)
        # the Prometheus text format's own media type, version included (what scrapers negotiate on)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    return metrics
