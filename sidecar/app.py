"""create_app(config) -> the inbound web.Application; long-lived resources live in cleanup_ctx generators.

    store     RedisStore (one client/pool per process)
    session   the shared aiohttp ClientSession (keep-alive to the upstream)
    worker    the RetryWorker task

The admin application (`sidecar.admin.create_admin_app`) shares the same runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from sidecar.config import Config
from sidecar.dispatch import Dispatcher
from sidecar.errors import SidecarError
from sidecar.forwarder import Forwarder
from sidecar.http1 import Http1Client
from sidecar.ingress import Ingress, expect_continue, json_error
from sidecar.keys import KeySpace
from sidecar.reload import Reloader
from sidecar.store import RedisStore
from sidecar.telemetry import Telemetry, keep_gauges_fresh, otlp_export_interval
from sidecar.worker import RetryWorker

if TYPE_CHECKING:
    from sidecar.peers import PeerCounts


@dataclass(slots=True)
class Runtime:
    """Everything a running sidecar process holds; set up by `runtime_ctx`, read by handlers."""

    config: Config
    store: RedisStore
    session: aiohttp.ClientSession
    dispatcher: Dispatcher
    ingress: Ingress
    worker: RetryWorker
    telemetry: Telemetry
    reloader: Reloader | None = None
    # loop time by which shutdown should be done; None: not shutting down
    shutdown_deadline: float | None = None
    admin_closing: asyncio.Future[Any] | None = None  # the admin listener's own drain, run beside the front's
    # `server.workers: N`, worker 0: the other workers' counts, which its /metrics adds up (sidecar/peers.py)
    peer_counts: PeerCounts | None = None

    def begin_shutdown(self, grace: float) -> None:
        """On SIGTERM, before the front drains: every shutdown step after it shares what is left of `grace` (the
        pod's termination grace period must cover it once, not once per step), and the retry worker takes no new
        event while requests drain."""
        self.shutdown_deadline = asyncio.get_running_loop().time() + grace
        self.worker.stop()

    def grace_left(self) -> float:
        if self.shutdown_deadline is None:
            return self.config.server.shutdown_grace
        return max(0.0, self.shutdown_deadline - asyncio.get_running_loop().time())


RUNTIME = web.AppKey("runtime", Runtime)
CONFIG = web.AppKey("config", Config)
REDIS_URL = web.AppKey("redis_url", str)
RUN_WORKER = web.AppKey("run_worker", bool)
TELEMETRY = web.AppKey("telemetry", Telemetry)
CONFIG_PATH = web.AppKey("config_path", str)
WARN_SETTINGS = web.AppKey("warn_settings", bool)
RELOAD_AT_START = web.AppKey("reload_at_start", bool)
CONFIG_TEXT = web.AppKey("config_text", str)
APPLIED_CONFIG = web.AppKey("applied_config", str)
SETTINGS_EVERY_S = 300  # the store's settings and evictions looked at again (SettingsWatch)
MARKS_GRACE = 1.0  # seconds the delivered marks get at shutdown even when the grace is spent
BACKGROUND_GRACE = 5.0  # at most this long for writes still retrying in the background (store.close)


def make_store(config: Config, url: str) -> RedisStore:
    return RedisStore.connect(
        url,
        KeySpace(config.redis.prefix, config.redis.shards),
        dedupe_ttl=config.dedupe.ttl,
        dlq_max_length=config.dlq.max_length,
        timeout=config.redis.timeout,
        wait_replicas=config.redis.wait_replicas,
        wait_timeout=config.redis.wait_timeout,
    )


class SettingsWatch:
    """The store's settings, said at start and looked at again every SETTINGS_EVERY_S by the one process that says
    them: a maxmemory-policy set at runtime (CONFIG SET) was never said, and keys the store evicted under one
    (events answered 2xx, gone) were said nowhere (a memory audit: 350 of 400 lost without a line)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.said: set[str] = set()
        self.evicted: int | None = None
        self.next_at = 0.0

    async def check(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + SETTINGS_EVERY_S
        log = logging.getLogger("sidecar.store")
        for warning in await self.store.settings_warnings():
            if warning not in self.said:  # each once: a store down meanwhile does not make them new again
                self.said.add(warning)
                log.warning("%s", warning)
        evicted = await self.store.evicted_keys()
        # a count lower than the last one restarted from 0 (a store restart, a failover, CONFIG RESETSTAT)
        new = 0
        if evicted is not None and self.evicted is not None:
            new = evicted - self.evicted if evicted >= self.evicted else evicted
        if new > 0:
            log.error(
                "the store evicted %d key(s) in the last %d s: events answered 2xx, scheduled retries, dead letters or "
                "dedupe marks may be gone (lost, or delivered twice); set maxmemory-policy noeviction and give it "
                "memory",
                new,
                SETTINGS_EVERY_S,
            )
        if evicted is not None:
            self.evicted = evicted


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = make_store(config, app[REDIS_URL])
    session: aiohttp.ClientSession | None = None
    http1: Http1Client | None = None
    started: list[asyncio.Task[Any]] = []
    try:
        unusable = await store.preload()
        missing = unusable or await store.missing_permissions()
        if missing is not None:
            raise SidecarError(missing)
        written = await store.layout_conflict()
        if written is not None:
            key = store.keys.layout()
            raise SidecarError(
                f"redis.shards is {config.redis.shards} but the store's events were written with "
                f"{written} shards: queued retries would never be found and resends of delivered events "
                f"would be delivered again. Keep redis.shards: {written}; to change it, stop the traffic, "
                "let the retry schedule and the dead letters drain and dedupe.ttl pass, then delete the key "
                f"{key} in the store"
            )
        # the schedule's clock (store/clock.py); the worker reads it again every minute
        await store.sync_clock()
        settings = None
        if app[WARN_SETTINGS]:
            settings = SettingsWatch(store)
            await settings.check()
        connector = aiohttp.TCPConnector(limit=config.upstream.max_connections, limit_per_host=0)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        telemetry = app[TELEMETRY]
        http1 = Http1Client(config.upstream.max_connections)
        forwarder = Forwarder(session, config.upstream.timeout, http1)
        dispatcher = Dispatcher(config, store, forwarder, telemetry)
        ingress = Ingress(dispatcher, telemetry)
        worker = RetryWorker(store, dispatcher, concurrency=config.upstream.max_connections)
        worker.periodic.append(ingress.flush_rejections)

        async def resync() -> None:
            if store.clock.due_for_sync():
                await store.sync_clock()

        worker.periodic.append(resync)
        if settings is not None:
            worker.periodic.append(settings.check)
        runtime = Runtime(config, store, session, dispatcher, ingress, worker, telemetry)
        app[RUNTIME] = runtime
        task = asyncio.create_task(worker.run(), name="retry-worker") if app[RUN_WORKER] else None
        if task is not None:
            started.append(task)
        # The store gauges over OTLP: refreshed here, by the one process that serves /metrics (its scrapes
        # refresh them too); the other workers export only their own counters.
        gauges = None
        # from the start, not from the first scrape: an OTLP-only setup may never be scraped
        telemetry.zero_series(dispatcher.config.routes)
        if telemetry.otlp_metrics and app[WARN_SETTINGS]:
            gauges = asyncio.create_task(
                keep_gauges_fresh(telemetry, store, lambda: dispatcher.config.routes, otlp_export_interval()),
                name="otlp-gauges",
            )
            started.append(gauges)
        watch = None
        if app.get(CONFIG_PATH):
            runtime.reloader = Reloader(
                app[CONFIG_PATH],
                dispatcher,
                telemetry,
                interval=config.server.reload_interval,
                loaded_text=app.get(CONFIG_TEXT),
                applied_path=app.get(APPLIED_CONFIG),
            )
            if app.get(RELOAD_AT_START):
                # a worker (re)started from its supervisor's start-up config: take what of the current
                # file applies live (routes, secrets, retry, ...); restart-only settings stay those the
                # other workers run with, and a file that does not load is refused as any reload is,
                # instead of stopping the worker. Then the config its siblings applied last is the one to
                # run, not the start-up one (a rotated-out secret).
                reloader = runtime.reloader
                if not await reloader.reload("worker start"):
                    applied = reloader.applied()
                    if applied is not None and applied != app.get(CONFIG_TEXT):
                        await reloader.reload("worker start, the config the other workers run", applied)
            watch = asyncio.create_task(runtime.reloader.run(), name="config-watch")
            started.append(watch)
    except BaseException:
        # a start cut short (refused, a store gone between two calls, a bug): what it opened is closed
        # here, not left to the event loop's close (which waited ~2 min on an unclosed session's
        # transports in a test)
        for job in started:  # the retry worker's attempts cut short: leased, attempted again later
            job.cancel()
        await asyncio.gather(*started, return_exceptions=True)
        # Nothing is queued today (the retry worker writes its marks itself, the ingress has not served yet);
        # kept so that a mark queued here later is written: one lost delivers its event again after the lease
        await store.marks.drain(timeout=MARKS_GRACE)
        await _close_clients(http1, session, store, within=MARKS_GRACE)
        raise
    try:
        yield
    finally:
        if gauges is not None:
            gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gauges
        if runtime.reloader is not None and watch is not None:
            runtime.reloader.stop()
            await watch
        worker.stop()
        try:
            if task is not None:
                # attempts still running when the grace is spent are cut short: leased, attempted again later
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, timeout=runtime.grace_left())
            await ingress.drain(timeout=runtime.grace_left())
        finally:
            # marks take milliseconds unless the store is down; one not written means one more delivery later
            await store.marks.drain(timeout=max(runtime.grace_left(), MARKS_GRACE))
            await ingress.flush_rejections()
            if runtime.admin_closing is not None:  # admin calls still running use the store and the session
                await asyncio.wait({runtime.admin_closing}, timeout=max(runtime.grace_left(), MARKS_GRACE))
            # within what is left of server.shutdown_grace (it waited 5 s past it for a dead-lettering the store kept
            # refusing: an audit); at least the marks' own second
            within = min(BACKGROUND_GRACE, max(runtime.grace_left(), MARKS_GRACE))
            await _close_clients(http1, session, store, within=within)


async def _close_clients(
    http1: Http1Client | None, session: aiohttp.ClientSession | None, store: RedisStore, within: float
) -> None:
    """The last step of a stop, whole or a start cut short: the upstream connections, then the store (its
    writes still retrying in the background get `within` seconds)."""
    if http1 is not None:
        http1.close()
    if session is not None:
        await session.close()
    await store.close(within=within)


async def _ingress(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].ingress.handle(request)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    runtime = request.app.get(RUNTIME)
    limit = runtime.ingress.dispatcher.config.server.max_body_bytes if runtime is not None else None
    return await expect_continue(request, limit)


@web.middleware
async def _json_refusals(request: web.Request, handler: Any) -> web.StreamResponse:
    """What aiohttp's router answers itself (`OPTIONS *`, a CONNECT: no path for the catch-all route to match) as
    every other refusal: JSON with an `error`, not aiohttp's text/plain "404: Not Found"."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, "no_route" if exc.status == 404 else "bad_request")


def create_app(
    config: Config,
    *,
    redis_url: str | None = None,
    run_worker: bool = True,
    telemetry: Telemetry | None = None,
    config_path: str | None = None,
    warn_settings: bool = True,
    reload_at_start: bool = False,
    config_text: str | None = None,
    applied_config: str | None = None,
) -> web.Application:
    """The inbound application. `redis_url` overrides `redis.url` (the CLI passes the embedded server's URL);
    with `config_path` the config is reloaded when that file or a secret file changes."""
    app = web.Application(client_max_size=config.server.max_body_bytes + 1, middlewares=[_json_refusals])
    app[CONFIG] = config
    app[TELEMETRY] = telemetry or Telemetry()
    if config_path:
        app[CONFIG_PATH] = config_path
    app[REDIS_URL] = redis_url or config.redis.url
    app[RUN_WORKER] = run_worker
    app[WARN_SETTINGS] = warn_settings  # the store's settings, checked by one process of several
    app[RELOAD_AT_START] = reload_at_start
    if config_text is not None:  # what `config` was loaded from: the reloader's starting point
        app[CONFIG_TEXT] = config_text
    if applied_config is not None:
        app[APPLIED_CONFIG] = applied_config
    app.cleanup_ctx.append(runtime_ctx)
    app.router.add_route("*", "/{tail:.*}", _ingress, expect_handler=_expect)
    return app
