"""RedisStore: the only code that talks to Redis/Valkey.

Every state change of an event is one Lua script on one hash slot (see `sidecar.keys`), registered once and run by
EVALSHA. Redis client errors are translated here: unreachable or timed out -> `StoreUnavailable` (the ingress
answers 503 and the provider retries), anything else -> `StoreError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from functools import partial
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from sidecar.errors import StoreError, StoreFull, StoreUnavailable, causes
from sidecar.keys import KeySpace, split_member
from sidecar.logs import Tally
from sidecar.store.clock import StoreClock
from sidecar.store.marks import DeliveredMarks, Mark
from sidecar.store.pipeline import (
    FastScript,
    NotReplicated,
    PipelinedClient,
    ReplyError,
    SentinelSpec,
    Wait,
    cluster_seeds,
    split_url,
)
from sidecar.store.records import (
    STATE_NAMES,
    AttemptRecord,
    Burial,
    ClaimResult,
    EventRecord,
    Evicted,
    Taken,
    parse_history,
    parse_meta,
)
from sidecar.store.retries import Retries
from sidecar.store.tls import ReloadingTLS, cluster_tls, url_query

T = TypeVar("T")
log = logging.getLogger("sidecar.store")

_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, ConnectionError, TimeoutError, OSError)
# everything either client raises for a store call: translated by _translate (redis-py's cluster client raises
# RedisClusterException, which is no RedisError, when no node answers)
_STORE_ERRORS = (*_UNAVAILABLE, rexc.RedisError, rexc.RedisClusterException, ReplyError)
# redis-py's cluster client says "no node reachable" and "slots not covered" with RedisClusterException, which is
# not a RedisError; the same class also reports mistakes in the calls themselves (keys across slots), which stay
# store errors
_CLUSTER_UNREACHABLE = ("cannot be connected", "slots are not covered", "could not agree")


# passing states: a slot mid-migration (that outlasted the transport's wait), a cluster failover under way, a
# server (re)loading its data set, a replica whose primary is gone, a primary just demoted (Sentinel, or a cluster
# failover: a write's WAIT met the node once it had become a replica; redis-py drops the "ERR " of its text)
_PASSING = (
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "MASTERDOWN",
    "READONLY",
    "ERR WAIT cannot be used with replica",
    "WAIT cannot be used with replica",
)

# How long an alias write the store failed is tried again: admin lookups of the event need it, but a store down
# for longer is an outage, and one retrying task per event claimed just before it must not pile up for good.
ALIAS_RETRY_FOR = 60.0
ALIAS_REPORT_S = 30.0  # failed lookup indexes are logged once, then with a count at most this often
# this host's clock this far from the store's is said (signed timestamps use the host's)
CLOCK_SKEW_WARN_S = 30


def _given(run: int | None) -> list[int]:
    """An optional last script argument (the run fence of retry/defer/dead.lua): absent when not known."""
    return [] if run is None else [run]


_INCLUDE = re.compile(r"^--#include (\w+)\n", re.M)


def _lua(name: str) -> str:
    return resources.files("sidecar.store").joinpath("lua", f"{name}.lua").read_text()


def script_source(name: str) -> str:
    """The source of script `name` as sent to the store: its file, with each `--#include <piece>` line replaced by
    that piece's file (Lua pieces two scripts share; a script runs alone in the store, so it carries them)."""
    return _INCLUDE.sub(lambda m: _lua(m.group(1)), _lua(name))


def too_old(exc: BaseException) -> bool:
    """Is `exc` a server older than Redis 7.0 refusing a script's `#!lua` first line? Redis 6.2 answers
    `ERR Error compiling script (new function): user_script:1: unexpected symbol near '#'`."""
    text = str(exc)
    return "Error compiling script" in text and "near '#'" in text


def version_warning(where: str, info: dict[str, Any]) -> str | None:
    """A server older than Redis 7.0 refuses the scripts that carry flags (`#!lua flags=allow-oom`): the ones that
    take retries, settle them, dead-letter and drain. Valkey reports a `redis_version` of 7.2 or later."""
    version = str(info.get("redis_version", ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return None
    if major >= 7:
        return None
    return (
        f"{where}Redis {version}: the sidecar needs Redis 7.0 or later (or Valkey): this server refuses the scripts "
        "that retry, deliver from the schedule, dead-letter and drain"
    )


_SSL_REASON = re.compile(r"\[SSL: [A-Z0-9_]+\][^(]*")


def _tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, if that is what `exc` (or what it was raised from) is: redis-py keeps only the
    message of the ssl error it wraps."""
    for seen in causes(exc):
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or seen.reason or str(seen)
        if isinstance(seen, ssl.SSLError):
            return seen.reason or str(seen)
    found = _SSL_REASON.search(str(exc))
    return found.group(0).strip() if found else None


def _translate(exc: BaseException) -> StoreError:
    """A client error as the store's own: unreachable / timed out -> StoreUnavailable, the rest -> StoreError."""
    if isinstance(exc, NotReplicated):
        return StoreUnavailable(f"store replicas behind: {exc}")
    if isinstance(exc, _UNAVAILABLE):
        # a TLS refusal names its reason (expired, unknown CA, host name): the fix differs
        why = _tls_failure(exc)
        said = str(exc).strip()
        # what the client said too ("Connection closed by server." in a cluster's slot migration is not the
        # store down)
        detail = f" (TLS: {why})" if why else f" ({said[:200]})" if said else ""
        return StoreUnavailable(f"store unreachable: {type(exc).__name__}{detail}")
    if isinstance(exc, rexc.SlotNotCoveredError) or (
        isinstance(exc, rexc.RedisClusterException) and any(m in str(exc) for m in _CLUSTER_UNREACHABLE)
    ):
        return StoreUnavailable(f"store unreachable: {exc}")
    if isinstance(exc, rexc.ClusterError) and "TTL exhausted" in str(exc):
        # redis-py's cluster client gave up following redirects: a failover or a slot migration under way
        return StoreUnavailable(f"store busy: cluster redirects exhausted ({exc})")
    # redis-py's own classes for these drop the reply's prefix from their text
    if isinstance(exc, rexc.OutOfMemoryError) or (isinstance(exc, ReplyError) and str(exc).startswith("OOM")):
        return StoreFull(f"store full: {exc}")
    if isinstance(exc, rexc.TryAgainError | rexc.ClusterDownError | rexc.ReadOnlyError) or (
        isinstance(exc, ReplyError | rexc.ResponseError) and str(exc).startswith(_PASSING)
    ):
        return StoreUnavailable(f"store busy: {exc}")
    return StoreError(f"store error: {exc}")


def _torn_connection(exc: BaseException) -> bool:
    """An AttributeError / RuntimeError raised inside redis-py's connection code: a connection closed by the client
    itself under a running call ("'NoneType' object has no attribute 'writelines'", "the handler is closed")."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if name.endswith("redis/asyncio/connection.py"):
            return True
        tb = tb.tb_next
    return False


def _in_cluster_client(exc: BaseException) -> bool:
    """Raised by redis-py's cluster client itself (redis/asyncio/cluster.py is the innermost redis-py frame)."""
    tb, last = exc.__traceback__, ""
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/redis/" in name:
            last = name
        tb = tb.tb_next
    return last.endswith("redis/asyncio/cluster.py")


# how long a burial's record (KeySpace.dlq_written) is kept at least, whatever dedupe.ttl is
WRITTEN_MIN_MS = 24 * 3600 * 1000


def dead_letter_id(route: str, dedupe_id: str) -> str:
    """Deterministic, so burying the same event twice (a crash between the two bury steps) overwrites."""
    return hashlib.sha256(f"{route}\x00{dedupe_id}".encode()).hexdigest()[:24]


def life_dead_letter_id(item_id: str, first_seen_ms: int) -> str:
    """The id dlq_add.lua gives the dead letter of one life of an event (its first sight) when `item_id` is taken
    by another life's item: that other life's, kept (a drain or replay holds it), or this life's, moved aside."""
    return hashlib.sha1(f"{item_id}:{first_seen_ms}".encode()).hexdigest()[:24]


def _reloading(tls: ReloadingTLS) -> type[SSLConnection]:
    """redis-py's TLS connection, with the context `tls` holds when it connects: redis-py builds one per
    connection object and keeps it across reconnects, so rotated certificate files would never be read."""

    class ReloadingSSLConnection(SSLConnection):
        def _connection_arguments(self) -> Any:
            return {**Connection._connection_arguments(self), "ssl": tls.current()}

    return ReloadingSSLConnection


def _connect(url: str, timeout: float, max_connections: int) -> Any:
    retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        "decode_responses": False,
        # RESP2, as the pipelined transport speaks: redis-py 8 opens with `HELLO 3` unless told, which a server or
        # proxy without HELLO refuses (the hot path then claimed events while the retry worker, the admin API and
        # /readyz could not run), and the replies' shapes would depend on the installed redis-py (>=5.0: RESP2)
        "protocol": 2,
    }
    if url.startswith("redis+sentinel://"):
        spec = SentinelSpec.parse(url)
        sentinel_auth = {"username": spec.sentinel_username, "password": spec.sentinel_password}
        sentinels = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel.__init__ unannotated
            spec.sentinels,
            # redis-py's default retries (3, backoff up to 10 s) would make each sentinel that is down cost seconds
            # on every discovery: one quick retry, then the next sentinel
            sentinel_kwargs={
                **sentinel_auth,
                "protocol": 2,
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "retry": retry,
            },
        )
        return sentinels.master_for(
            spec.service,
            max_connections=max_connections,
            db=spec.db,
            username=spec.username,
            password=spec.password,
            **common,
        )
    parts, cluster = split_url(url)
    tls = url_query(parts.query) if parts.scheme == "rediss" else None  # rediss:// or rediss+cluster://
    if cluster:
        nodes = [ClusterNode(host, port) for host, port in cluster_seeds(parts.netloc)]
        # the user info holds for every node, as it does for the pipelined transport
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        if tls is not None:
            common.update(cluster_tls(tls))
        cluster_client = RedisCluster(
            startup_nodes=nodes,
            max_connections=max_connections,
            password=password,
            username=username,
            **common,
        )
        if tls is not None:  # the nodes it knows now, and those it finds later (same kwargs)
            reloading = _reloading(ReloadingTLS(tls, cluster=True))
            cluster_client.connection_kwargs["connection_class"] = reloading
            for node in cluster_client.startup_nodes:
                node.connection_class = reloading
        return cluster_client
    # On uvloop a pooled connection that the store (or a proxy, a failover) reset while it was idle raises
    # RuntimeError ("the handler is closed") on its next write, before anything is sent: retried on a new
    # connection, as redis-py does for ConnectionError, instead of failing that call (a /readyz 503, an admin 503).
    # A READONLY reply means a failover demoted the server while the pooled connection stayed open (a managed
    # primary endpoint now leads to the new primary, for new connections only): dropped and sent again on a new
    # connection (the write did not run), instead of every write failing until a restart.
    client = aioredis.from_url(
        url, max_connections=max_connections, retry_on_error=[RuntimeError, rexc.ReadOnlyError], **common
    )
    if tls is not None:
        client.connection_pool.connection_class = _reloading(ReloadingTLS(tls))
    return client


class RedisStore:
    """Events, schedules and dead letters. `fast` (the pipelined transport) runs the state-change scripts, the
    hot path; `client` (redis-py) serves everything else: inspection, admin, paging."""

    def __init__(
        self,
        client: Any,
        keys: KeySpace,
        dedupe_ttl: float,
        dlq_max_length: int,
        fast: PipelinedClient,
        wait: Wait | None = None,
    ) -> None:
        self._r = client
        self._fast = fast
        # (replicas, timeout ms) that every claim must reach before it is acknowledged; None: no waiting
        self._wait = wait
        # A script's keys must share a slot on a cluster: batched scripts are then split by shard.
        self._cluster = isinstance(client, RedisCluster)
        self._ready = not self._cluster
        self._init_lock = asyncio.Lock()
        self._background: set[asyncio.Future[object]] = set()
        self._retries = Retries()  # for the background writes: delivered marks, aliases
        # one line per outage, not per event, for lookup indexes the store fails (a node down for 24 s: 200 lines)
        self._alias_failed, self._alias_lost = Tally(ALIAS_REPORT_S), Tally(ALIAS_REPORT_S)
        # scheduled events whose stored request the store no longer has (evicted): said once, then with a count
        self._vanished = Tally(ALIAS_REPORT_S)
        self._skew_said = False  # this host's clock said to be far from the store's (`_say_skew`)
        # the scripts loaded once (`preload`); until then /readyz tries again (`usable`), as after a claim that
        # found the store older than Redis 7.0; `unusable`: why the store cannot run the sidecar, once known
        self._scripts_loaded = False
        self._loading = asyncio.Lock()
        self.unusable: str | None = None
        self.keys = keys
        self._ttl_ms = int(dedupe_ttl * 1000)
        # a burial's record (dlq_add.lua) outlives any lease: a burial cut short is finished after its lease
        self._written_ttl_ms = max(self._ttl_ms, WRITTEN_MIN_MS)
        self._dlq_max = dlq_max_length
        self.clock = StoreClock()  # the schedule's times: the store's clock (see clock.py)
        self.marks = DeliveredMarks(self.ack_many, self._retries, clock=self.clock.now_ms)

        self._claim = FastScript(fast, script_source("claim"))
        self._take = FastScript(fast, script_source("take"))
        self._ack = FastScript(fast, script_source("ack"))
        self._retry = FastScript(fast, script_source("retry"))
        self._burying = FastScript(fast, script_source("burying"))
        self._dead = FastScript(fast, script_source("dead"))
        self._dlq_add = FastScript(fast, script_source("dlq_add"))
        self._defer = FastScript(fast, script_source("defer"))
        self._nonce = FastScript(fast, script_source("nonce"))  # Mailgun routes only: loaded on first use
        self._replay = FastScript(fast, script_source("replay"))  # the admin API's replays
        self._alias = FastScript(fast, script_source("alias"))  # lookup index of digest-keyed claims
        self._probe = FastScript(fast, script_source("probe"))  # start-up: commands the user may not run

    @classmethod
    def connect(
        cls,
        url: str,
        keys: KeySpace,
        *,
        dedupe_ttl: float,
        dlq_max_length: int,
        timeout: float = 2.0,
        max_connections: int = 200,
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
    ) -> RedisStore:
        fast = PipelinedClient(url, timeout)
        wait = (wait_replicas, max(1, int(wait_timeout * 1000))) if wait_replicas > 0 else None
        return cls(_connect(url, timeout, max_connections), keys, dedupe_ttl, dlq_max_length, fast, wait)

    @property
    def waits_for_replicas(self) -> bool:
        """`redis.wait_replicas` set: writes that move an event between the DLQ and the schedule are answered only
        once the replicas hold them."""
        return self._wait is not None

    @property
    def client(self) -> Any:
        """The raw client, for tests and the admin's read-only inspection."""
        return self._r

    @property
    def fast(self) -> PipelinedClient:
        """The pipelined client, for scripts whose answer must wait for the replicas (see `wait`)."""
        return self._fast

    @property
    def wait(self) -> Wait | None:
        """`redis.wait_replicas` as (replicas, timeout ms), or None."""
        return self._wait

    async def close(self, within: float = 5.0) -> None:
        """`within`: how long writes still retrying in the background (an alias, a dead-lettering the store
        refused) get to land; the rest are given up, as at any crash (their events' leases bring them back)."""
        if self._background:
            self._retries.hurry()
            _, left = await asyncio.wait(set(self._background), timeout=within)
            for task in left:  # still retrying an alias the store refuses: given up, as at any crash
                task.cancel()
            if left:
                await asyncio.wait(left)
        self._fast.close()
        pool = getattr(self._r, "connection_pool", None)  # a cluster client has none
        sentinels = getattr(pool, "sentinel_manager", None)  # redis+sentinel://
        await self._r.aclose()
        if sentinels is not None:  # the master client's close leaves the sentinels' own connections open
            for client in sentinels.sentinels:
                await client.aclose()

    async def usable(self) -> str | None:
        """Why this store cannot run the sidecar, or None (also when it cannot tell now: down): the start-up's
        `preload`, made again (for /readyz) when the store was down at start. A Redis 6.2 that came up after the
        sidecar took claims, answered 2xx, and nothing was retried, marked or dead-lettered (a review): claim.lua
        now refuses itself on a server older than 7.0, and /readyz says why."""
        if not self._scripts_loaded:  # (again while found unusable: the store may have been upgraded since)
            async with self._loading:
                if not self._scripts_loaded:
                    said = self.unusable
                    problem = await self.preload(quiet=True)
                    if problem is not None and said is None:
                        log.critical(
                            "%s; until it is, every webhook is answered 503 store_unavailable", problem
                        )
                    elif problem is None and said is not None and self._scripts_loaded:
                        log.info("the store runs the sidecar's scripts again (Redis 7.0 or later, or Valkey)")
        return self.unusable

    async def preload(self, quiet: bool = False) -> str | None:
        """Load every hot-path script into the server before traffic, so a first use never answers NOSCRIPT (the
        re-sent command would fall behind commands issued after it on the same connection). Best effort: a store
        that is down now gets its scripts on first use, as after any restart.

        Returns why the sidecar cannot run on this store, or None: a server older than Redis 7.0 cannot compile a
        script's `#!lua flags=` line. Started anyway (it only warned), claims were taken and answered while the
        retry worker, the delivered marks and the dead-lettering all failed: on Redis 6.2 events answered 2xx were
        never delivered nor dead-lettered (an audit), and /readyz said ready. Found here even when INFO is
        refused."""
        scripts = (
            self._claim,
            self._take,
            self._ack,
            self._retry,
            self._burying,
            self._dead,
            self._dlq_add,
            self._defer,
            self._alias,
        )
        level = logging.DEBUG if quiet else logging.WARNING
        try:
            for script in scripts:
                await self._fast.load_script(script.source)
        except ReplyError as exc:
            if too_old(exc):
                self.unusable = (
                    f"the store cannot run the sidecar's scripts, it is older than Redis 7.0 ({str(exc)[:200]}): "
                    "the sidecar needs Redis 7.0 or later, or Valkey"
                )
                return self.unusable
            # another refusal: not too old, whatever else (the scripts load on first use); not tried again
            log.log(level, "could not preload the store's scripts (they load on first use): %s", exc)
        except _UNAVAILABLE as exc:
            log.log(
                level, "could not preload the store's scripts (they load on first use; tried again): %s", exc
            )
            return None
        self._scripts_loaded, self.unusable = True, None
        return None

    async def missing_permissions(self) -> str | None:
        """What this store's user may not run of what the sidecar needs (an ACL, a managed service's disabled or
        renamed commands), in words naming it, or None. Probed on every node that holds a shard, the dead letters
        or the layout key; a store that is down, full or refusing writes is no answer (None: best effort, as the
        other start-up checks). A script meeting a refused command half way keeps what it wrote before it."""
        slots = [f"{{{s}}}" for s in range(self.keys.shards)] + ["{dlq}", "{meta}"]
        denied: set[str] = set()
        for slot in slots:
            base = f"{self.keys.prefix}:{slot}:probe"
            try:
                found = await self._probe([f"{base}:h", f"{base}:z", f"{base}:s"], [])
            except ReplyError as exc:
                text = str(exc)
                if text.startswith("NOPERM") or "unknown command" in text.lower():
                    return f"the store refuses what the sidecar needs: {text[:300]}"
                return None
            except _STORE_ERRORS:
                return None
            denied.update(c.decode() if isinstance(c, bytes) else str(c) for c in found or [])
        if not denied:
            return None
        names = " ".join(sorted(denied))
        return (
            f"the store's user may not run (ACL, or disabled / renamed commands): {names}; the sidecar's scripts need "
            f"them (ACL: +{' +'.join(sorted(denied))}; the full list is in README, Durability)"
        )

    async def layout_conflict(self) -> int | None:
        """The shard count the store's keys were written with, when it is not this store's `redis.shards` (an
        event's keys are placed by its shard: with another count, queued retries are never found and resends of
        delivered events are claimed anew). Recorded by the first process that finds none. None when they agree,
        or when the store cannot say now (down, full): best effort, as the other start-up checks."""
        key = self.keys.layout()
        try:
            # read first: a store at its maxmemory (noeviction) refuses the SET, not the GET, and the check must
            # not be skipped then
            stored = await self._fast.execute(("GET", key), key=key)
            if stored is None:
                if await self._fast.execute(("SET", key, str(self.keys.shards), "NX"), key=key):
                    return None
                stored = await self._fast.execute(("GET", key), key=key)
        except (*_UNAVAILABLE, ReplyError) as exc:
            log.warning("could not check the store's shard count against redis.shards: %s", exc)
            return None
        try:
            count = int(stored)
        except (TypeError, ValueError):
            return None
        return count if count != self.keys.shards else None

    async def sync_clock(self) -> bool:
        """Read the store's clock into `clock` (on the node of shard 0, the same for every replica). Best effort:
        False, and the clock carries on as it was, when the store does not answer or answers too slowly."""

        async def read_time() -> tuple[int, int]:
            seconds, micros = await self._fast.execute(("TIME",), key=self.keys.schedule(0))
            return int(seconds), int(micros)

        try:
            taken = await self.clock.sync(read_time)
        except _STORE_ERRORS as exc:
            log.debug("store clock not read: %s", exc)
            return False
        if taken:
            self._say_skew(time.time() * 1000 - self.clock.now_ms())
        return taken

    def _say_skew(self, skew_ms: float) -> None:
        """This host's wall clock against the store's: the schedule does not mind (it runs on the store's), but
        providers' signed timestamps are checked against this host's clock, so one far off refuses every event as
        `timestamp_out_of_tolerance` (an audit: 10 minutes off, and no line said why). Said once when it goes past
        CLOCK_SKEW_WARN_S, and once when it is back."""
        off = abs(skew_ms) / 1000 > CLOCK_SKEW_WARN_S
        if off and not self._skew_said:
            log.warning(
                "this host's clock is %.0f s %s the store's: signed timestamps are checked against this host's "
                "clock, so providers' events may be refused as timestamp_out_of_tolerance; sync it (NTP)",
                abs(skew_ms) / 1000,
                "ahead of" if skew_ms > 0 else "behind",
            )
        elif not off and self._skew_said:
            log.info("this host's clock agrees with the store's again (within %d s)", CLOCK_SKEW_WARN_S)
        self._skew_said = off

    async def settings_warnings(self) -> list[str]:
        """What in the store servers' own settings can lose accepted events, for warnings at startup. Best effort:
        a store that is down, or a managed one that refuses INFO, yields nothing (and a debug line)."""
        try:
            servers = await self._server_infos()
        except Exception as exc:  # never in the way of starting: the store may come up later
            text = str(exc)
            if isinstance(exc, rexc.NoPermissionError) or "unknown command" in text.lower():
                # a managed store's user without INFO (`-@dangerous`, INFO renamed): said, not silently skipped
                return [
                    f"store: INFO is refused ({text[:200]}), so the store's settings are not checked: make sure "
                    "it runs Redis 7.0 or later (or Valkey) with maxmemory-policy noeviction and append-only "
                    "persistence (or replicas and redis.wait_replicas), or the store can lose events answered 2xx "
                    "and evictions go unreported; or allow the sidecar's user INFO"
                ]
            log.debug("store settings not checked: %s", exc)
            return []
        warnings = []
        for where, info in servers:
            if (too_old := version_warning(where, info)) is not None:
                warnings.append(too_old)
            policy = info.get("maxmemory_policy", "noeviction")
            if policy != "noeviction" and int(info.get("maxmemory", 0) or 0) > 0:
                warnings.append(
                    f"{where}maxmemory-policy is {policy}: under memory pressure Redis deletes keys, so stored events "
                    "and scheduled retries can vanish and evicted claims let duplicates through; set noeviction"
                )
            if str(info.get("aof_enabled", "1")) == "0" and self._wait is None:
                warnings.append(
                    f"{where}appendonly is off: a restart forgets every claim and scheduled retry written since "
                    "its last snapshot; run it append-only, or with replicas and redis.wait_replicas"
                )
            replicas = int(info.get("connected_slaves", 0) or 0)
            if self._wait is not None and replicas > self._wait[0]:
                warnings.append(
                    f"{where}{replicas} replicas, redis.wait_replicas is {self._wait[0]}: in a failover the old "
                    "primary's other replicas go on acknowledging its writes until they are repointed, so an "
                    f"event answered 2xx can miss the new primary; set wait_replicas: {replicas} (each event then "
                    "waits for every replica, and is answered 503 while one is down)"
                )
        return warnings

    async def evicted_keys(self) -> int | None:
        """Keys the store servers evicted since they started (INFO stats `evicted_keys`, summed over a cluster's
        primaries); None when the store does not say."""
        try:
            if not self._cluster:
                return int((await self._r.info("stats")).get("evicted_keys", 0))
            if not self._ready:
                await self._initialize()
            total = 0  # (a generator with `await` inside is an async generator: sum() cannot iterate it)
            for node in self._r.get_primaries():
                total += int((await self._r.info("stats", target_nodes=node)).get("evicted_keys", 0))
            return total
        except Exception as exc:  # best effort, as settings_warnings
            log.debug("store evictions not read: %s", exc)
            return None

    async def _server_infos(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, INFO server + memory + persistence) of each cluster primary, or INFO server + memory +
        persistence + replication of the one server (whose replica count decides the wait_replicas warning)."""
        if not self._cluster:
            sections = ("server", "memory", "persistence", "replication")
            return [
                ("store: ", {k: v for section in sections for k, v in (await self._r.info(section)).items()})
            ]
        if not self._ready:
            await self._initialize()
        out = []
        for node in sorted(self._r.get_primaries(), key=lambda n: n.name):
            # one target node: redis-py answers with that node's INFO itself, not a dict keyed by node
            info = {
                **await self._r.info("server", target_nodes=node),
                **await self._r.info("memory", target_nodes=node),
                **await self._r.info("persistence", target_nodes=node),
            }
            out.append((f"store node {node.name}: ", info))
        return out

    async def guard(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a client call with errors translated (StoreUnavailable / StoreError); for store-side modules."""
        return await self._call(fn)

    async def resolve(self, route: str, event_id: str) -> str:
        """The dedupe id behind a public event id (the id itself unless the route dedupes on a digest)."""
        alias = await self._call(lambda: self._r.get(self.keys.alias(route, event_id)))
        return alias.decode() if alias else event_id

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            if not self._ready:
                await self._initialize()
            return await fn()
        except _STORE_ERRORS as exc:
            raise _translate(exc) from exc
        except (AttributeError, RuntimeError) as exc:
            if isinstance(exc, AttributeError) and _in_cluster_client(exc):
                # redis-py's cluster client follows an ASK to a node it does not know (a primary just added, that
                # serves no slot yet, while a slot migrates to it) as None: a passing state, like TRYAGAIN
                raise StoreUnavailable(
                    "store busy: a slot is migrating to a cluster node the client does not know yet"
                ) from exc
            if not _torn_connection(exc):
                raise
            # redis-py's cluster client tears its connections down when it reinitializes (after a node failed)
            # while other calls still write on them: those fail with these, not with a RedisError
            raise StoreUnavailable(f"store unreachable: connection closed under the call ({exc})") from exc

    async def _initialize(self) -> None:
        """redis-py's async cluster client discovers the cluster on first use, and concurrent first uses race (a
        gather of 16 HGETALLs on a fresh client fails with "handler is closed"): discover once, under a lock."""
        async with self._init_lock:
            if not self._ready:
                try:
                    await self._r.initialize()
                except _UNAVAILABLE:
                    # redis-py reads the command table (COMMAND) from the first primary of the slot map, with no
                    # fallback: a client started while that node is down (before its failover, or for good)
                    # would fail every call. Put that node last, so the next try asks another primary.
                    manager = self._r.nodes_manager
                    primaries = manager.get_nodes_by_server_type("primary")
                    if primaries:
                        manager.move_node_to_end_of_cached_nodes(primaries[0].name)
                    raise
                self._ready = True

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._r.ping))
        except StoreError:
            return False

    # -- the hot path ---------------------------------------------------------------------------------------------

    async def claim(
        self, rec: EventRecord, now_ms: int, lease_ms: int, schedule_at_ms: int | None = None
    ) -> ClaimResult:
        """Claim and persist `rec`. Leased for an attempt now, or (`schedule_at_ms`) just scheduled."""
        ev, sched, stats, member = self.keys.locate(rec.route, rec.dedupe_id)
        score, mode = (now_ms + lease_ms, "f") if schedule_at_ms is None else (schedule_at_ms, "p")
        # aiohttp hands non-UTF-8 header bytes over as surrogates; store those bytes as they came, not a 500.
        meta = rec.meta().encode("utf-8", "surrogateescape")
        args = [now_ms, score, member, meta, rec.body, rec.event_id, mode, rec.route]
        self.marks.flush()  # queued delivered marks ride in this claim's write and run before it
        # With `redis.wait_replicas`, the claim is answered once that many replicas hold it: a claim acknowledged to
        # a provider must survive a failover. A duplicate's claim waits too (its counter write comes after the
        # original claim in the replication stream). When the replicas lag, the claim stands on the primary, leased
        # as usual, and the caller answers 503: the provider's resend is answered once the replicas have it, and
        # the lease hands the event to the retry worker either way.
        try:  # inline rather than through _call: this is the one call every request makes
            res = await self._claim(keys=[ev, sched, stats], args=args, wait=self._wait)
        except _STORE_ERRORS as exc:
            if str(exc).startswith("UNSUPPORTED"):
                # claim.lua refused itself: the store is older than Redis 7.0 now (replaced since the start-up's
                # check): /readyz looks again (`usable`) and says so
                self._scripts_loaded = False
            if isinstance(exc, NotReplicated) and exc.reply is not None and int(exc.reply[0]) == 1:
                self._index_alias(rec)  # the claim won and stands on the primary: its resends are duplicates
            raise _translate(exc) from exc
        if int(res[0]) == 1:
            self._index_alias(rec)
            return ClaimResult(True)
        stored = res[2].decode("utf-8", "surrogateescape") if len(res) > 2 and res[2] else None
        if stored is not None and stored != rec.dedupe_id:
            # index the stored event's own id again, since the first claim's answer may have been lost (a claim
            # that timed out here but landed in the store wrote no alias), whichever id this resend came under: a
            # Twilio resend with another idempotency token, or none, left the id every answer named unfound (a
            # soak). One key per event, whatever ids resends make up.
            self._index_alias(rec if stored == rec.event_id else replace(rec, event_id=stored))
        return ClaimResult(False, STATE_NAMES.get(res[1].decode(), "pending"), stored)

    async def bind_nonce(self, provider: str, value: str, body_digest: str, ttl_ms: int) -> bool:
        """Bind a signed single-use value to the body it came with (see nonce.lua); False when it came before
        with another body. With `redis.wait_replicas`, answered once the replicas hold the binding too, as a
        claim is: a failover must not forget a token still fresh."""
        key = self.keys.nonce(provider, value)
        res = await self._call(lambda: self._nonce(keys=[key], args=[body_digest, ttl_ms], wait=self._wait))
        return int(res) == 1

    def _index_alias(self, rec: EventRecord) -> None:
        """When the claim is on a digest, index the provider's id for operators. Only for a claim that won or a
        resend under the same id (a replay under fresh ids must not grow the store), and off the critical path
        (admin lookups only). A write the store fails is tried again for `ALIAS_RETRY_FOR`: after a stall,
        lookups must not answer 404."""
        if rec.dedupe_id == rec.event_id:
            return
        key, args = self.keys.alias(rec.route, rec.event_id), [rec.dedupe_id, self._ttl_ms * 2]

        async def write() -> None:
            try:
                await self._alias(keys=[key], args=args)
            except _STORE_ERRORS as exc:
                raise _translate(exc) from exc

        async def persist() -> None:
            try:
                await write()
                return
            except StoreError as exc:
                reason = exc
            self._alias_failed.say(
                log,
                logging.WARNING,
                "could not index %d event id(s) for lookups (trying again), e.g. %s/%s: %s",
                rec.route,
                rec.event_id,
                reason,
            )
            if await self._retries.until(write, time.monotonic() + min(ALIAS_RETRY_FOR, self._ttl_ms / 1000)):
                log.debug("indexed %s/%s for lookups after the store failure", rec.route, rec.event_id)
            else:
                self._alias_lost.say(
                    log,
                    logging.WARNING,
                    "gave up indexing %d event id(s) for lookups (admin lookups by these ids answer 404; the "
                    "events themselves are kept), e.g. %s/%s",
                    rec.route,
                    rec.event_id,
                )

        self.in_background(persist())

    def in_background(self, write: Coroutine[Any, Any, object]) -> None:
        """Run a store write that must land on its own, off the caller's path; `close` waits for it (bounded)."""
        task = asyncio.ensure_future(write)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def again_until(self, write: Callable[[], Awaitable[object]], deadline: float) -> bool:
        """`write` tried again after a store failure, with backoff, until it lands (True) or `deadline` passes
        (`time.monotonic()`); shutdown cuts the backoff short (see retries.py)."""
        return await self._retries.until(write, deadline)

    async def ack(self, route: str, dedupe_id: str, entry: AttemptRecord, now_ms: int) -> bool:
        """Mark one event delivered; False when it was already final or gone."""
        return (await self.ack_many([(route, dedupe_id, entry)], now_ms))[0]

    def ack_many(self, marks: Sequence[Mark], now_ms: int) -> Awaitable[list[bool]]:
        """Mark events delivered, in one script call (one per shard on a cluster); await for the results, in
        `marks`' order. The calls are on the store connection before this returns, so any command issued
        afterwards (a resend's claim) runs after them."""
        groups: dict[str, tuple[list[int], list[str], list[Any]]] = {}
        for i, (route, dedupe_id, entry) in enumerate(marks):
            ev, sched, stats, member = self.keys.locate(route, dedupe_id)
            index, keys, args = groups.setdefault(
                sched if self._cluster else "", ([], [], [now_ms, self._ttl_ms])
            )
            index.append(i)
            keys += (ev, sched, stats)
            args += (member, entry.to_json(), entry.status or "", route)
        started = [(index, keys, args, self._ack.start(keys, args)) for index, keys, args in groups.values()]

        async def finish() -> list[bool]:
            calls = [self._ack.finish(sent, keys, args) for _, keys, args, sent in started]
            try:
                replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
            except _STORE_ERRORS as exc:
                raise _translate(exc) from exc
            done = [False] * len(marks)
            for (index, _, _, _), reply in zip(started, replies, strict=True):
                for i, marked in zip(index, reply, strict=True):
                    done[i] = bool(marked)
            return done

        return finish()

    async def retry(
        self,
        route: str,
        dedupe_id: str,
        attempt: int,
        due_ms: int,
        entry: AttemptRecord,
        run: int | None = None,
    ) -> bool:
        """Reschedule an attempt that failed; False when the event is no longer this attempt's: another attempt
        number or (`run`, `EventRecord.fence`) another run of attempts."""
        ev, sched, _, member = self.keys.locate(route, dedupe_id)
        args = [due_ms, member, attempt, entry.to_json(), entry.status or "", entry.error or "", *_given(run)]
        return bool(await self._call(lambda: self._retry(keys=[ev, sched], args=args)))

    async def defer(
        self, route: str, dedupe_id: str, attempt: int, due_ms: int, run: int | None = None
    ) -> bool:
        """Give a taken event back unattempted (see defer.lua)."""
        ev, sched, _, member = self.keys.locate(route, dedupe_id)
        args = [due_ms, member, attempt, *_given(run)]
        return bool(await self._call(lambda: self._defer(keys=[ev, sched], args=args)))

    async def bury(
        self,
        rec: EventRecord,
        attempt: int,
        entry: AttemptRecord,
        history: list[dict[str, Any]],
        now_ms: int,
        reason: str,
    ) -> tuple[str, list[Evicted]]:
        """Dead-letter an event: write the dead letter first, then mark the event dead (see dead.lua). Nothing is
        written when the event is no longer this attempt's (a replica paused past its lease, whose event another
        attempt or run holds now): its dead letter would push a real one past the cap, and stay behind in the DLQ
        for a drain to hand out after the event was delivered. Not atomic with the writes (on a cluster the DLQ is
        on another node); dead.lua fences the mark itself."""
        item_id = dead_letter_id(rec.route, rec.dedupe_id)
        ev, sched, stats, member = self.keys.locate(rec.route, rec.dedupe_id)
        # the fence read, and the burial noted on the event if the fence holds (a burial cut short after the dead
        # letter is written is then finished by the next take, not sent again)
        note = Burial(reason, entry, now_ms).to_json()
        st, n, run, first = await self._call(
            lambda: self._burying(keys=[ev], args=[attempt, note, *_given(rec.fence)])
        )
        # (no event at all: evicted, or a test's dead letter without one; dead.lua marks nothing then)
        ours = n == str(attempt).encode() and rec.fence in (None, int(run or first or 0))
        # dead ('x') and ours: both steps landed and an answer was lost; written again as before (the same id)
        if st is not None and (st not in (b"f", b"p", b"x") or not ours):
            log.warning(
                "%s/%s: attempt %d is no longer the event's (another attempt or replay holds it): not dead-lettered",
                rec.route,
                rec.event_id,
                attempt,
            )
            return item_id, []
        full_history = [*history, entry.as_dict()]
        item = {
            "id": item_id,
            "route": rec.route,
            "event_id": rec.event_id,
            "dedupe_id": rec.dedupe_id,
            "attempts": entry.attempt,  # `attempt` but when a burial cut short is finished by a later take
            "last_status": entry.status,
            "last_error": entry.error,
            "reason": reason,
            "first_seen_ms": rec.first_seen_ms,
            "dead_ms": now_ms,
            "meta": rec.meta_dict(),
            "history": full_history,
        }
        k = self.keys
        dlq_keys = [
            k.dlq_items(),
            k.dlq_data(),
            k.dlq_body(),
            k.dlq_route(rec.route),
            k.dlq_evicted(),
            k.dlq_taken(),
            # this burial's record: run again (an answer lost, or finished by a later take), it writes nothing
            k.dlq_written(item_id, rec.run or rec.first_seen_ms, now_ms),
        ]
        dlq_args = [
            item_id,
            now_ms,
            json.dumps(item),
            rec.body,
            self._dlq_max,
            k.dlq_route_prefix(),
            rec.first_seen_ms,
            self._written_ttl_ms,
        ]
        # With `redis.wait_replicas`, the dead letter is on the replicas before the event is marked dead: on a
        # cluster the two live on different nodes, and a failover that kept the mark but lost the dead letter would
        # leave an event answered 2xx that nobody holds (a resend is a duplicate, and there is nothing to replay).
        raw = await self._call(lambda: self._dlq_add(keys=dlq_keys, args=dlq_args, wait=self._wait))
        item_id = raw[0].decode()  # another id when an earlier life's dead letter under this one is held
        evicted = [
            Evicted(raw[i].decode(), raw[i + 1].decode(), raw[i + 2].decode()) for i in range(1, len(raw), 3)
        ]
        dead_args = [
            now_ms,
            self._ttl_ms,
            member,
            attempt,
            entry.to_json(),
            entry.status or "",
            entry.error or "",
            rec.route,
            *_given(rec.fence),
        ]
        await self._call(lambda: self._dead(keys=[ev, sched, stats], args=dead_args))
        return item_id, evicted

    async def reschedule(self, keys: list[str], args: list[Any]) -> Any:
        """replay.lua (a dead event back on its schedule), answered once `redis.wait_replicas` replicas hold it:
        the caller removes the dead letter next, on another node on a cluster, and a failover must not keep that
        removal but lose the event's new schedule."""
        return await self._call(lambda: self._replay(keys=keys, args=args, wait=self._wait))

    # -- the retry worker -----------------------------------------------------------------------------------------

    def node_of(self, shard: int) -> object:
        """The store server that holds `shard`'s schedule, as far as the hot path's slot map knows (None: the one
        server of a single-node store, or a slot not mapped yet)."""
        if not self._cluster:
            return None
        return self._fast.node_of(self.keys.schedule(shard))

    async def due_members(self, shard: int, now_ms: int, limit: int) -> list[str]:
        sched = self.keys.schedule(shard)
        raw = await self._call(lambda: self._r.zrangebyscore(sched, "-inf", now_ms, start=0, num=limit))
        return [m.decode() for m in raw]

    async def take(
        self, shard: int, member: str, now_ms: int, lease_ms: int, due_by_ms: int | None = None
    ) -> Taken | None:
        """Take `member` if it is due by `due_by_ms` (default: now), leased until now + `lease_ms`."""
        ev, sched = self.keys.event(shard, member), self.keys.schedule(shard)
        due_by = now_ms if due_by_ms is None else due_by_ms
        # The lease starts at the take: a `now_ms` read before a slow call (take_due's listing can hang for as long
        # as redis-py retries) would write a deadline already past, and another worker would take the event too.
        now_ms = max(now_ms, self.clock.now_ms())
        # the lease too: take.lua floors it at the store's TIME
        args = [due_by, now_ms + lease_ms, member, lease_ms]
        keys = [ev, sched, self.keys.stats(shard)]
        res = await self._call(lambda: self._take(keys=keys, args=args))
        if not res:
            return None
        if len(res) == 1:
            # its event hash is gone: evicted (a maxmemory-policy that evicts) or deleted by hand
            self._vanished.say(
                log,
                logging.ERROR,
                "%d scheduled event(s) gone from the store, dropped from the schedule (LOST: evicted under a "
                "maxmemory-policy other than noeviction, or deleted), e.g. %s",
                member,
            )
            return None
        attempt, meta, body, first, eid, hist = res[:6]
        run = int(res[6]) if len(res) > 6 else 0
        burial = Burial.from_stored(res[7]) if len(res) > 7 and res[7] else None
        route, dedupe_id = split_member(member)
        rec = EventRecord.from_stored(route, dedupe_id, eid.decode(), meta, body, int(first), run)
        return Taken(rec, int(attempt), now_ms + lease_ms, parse_history(hist), burial)

    async def take_due(
        self, shard: int, now_ms: int, lease_ms: int, limit: int, due_by_ms: int | None = None
    ) -> list[Taken]:
        due_by = now_ms if due_by_ms is None else due_by_ms
        members = await self.due_members(shard, due_by, limit)
        if not members:
            return []
        results = await asyncio.gather(*(self.take(shard, m, now_ms, lease_ms, due_by) for m in members))
        return [t for t in results if t is not None]

    # -- inspection -----------------------------------------------------------------------------------------------

    async def get_event(self, route: str, dedupe_id: str) -> dict[str, Any] | None:
        ev, sched, _, member = self.keys.locate(route, dedupe_id)
        raw = await self._call(lambda: self._r.hgetall(ev))
        if not raw:
            return None
        f = {k.decode(): v for k, v in raw.items()}
        score = await self._call(lambda: self._r.zscore(sched, member))
        return {
            "route": route,
            "dedupe_id": dedupe_id,
            "event_id": f.get("eid", b"").decode(),
            "state": STATE_NAMES.get(f.get("st", b"").decode(), "unknown"),
            "raw_state": f.get("st", b"").decode(),
            "attempts": int(f.get("n", b"0")),
            "first_seen_ms": int(f.get("first", b"0")),
            "scheduled_ms": score,
            "last_status": f.get("ls", b"").decode() or None,
            "last_error": f.get("le", b"").decode() or None,
            "history": parse_history(f.get("hist")),
            "body": f.get("body"),
            "meta": parse_meta(f["meta"]) if "meta" in f else None,
        }

    async def route_stats(self) -> dict[str, dict[str, int]]:
        """Per route: pending, delivered, dead, duplicates (summed over shards) and rejected."""
        keys = [self.keys.stats(shard) for shard in range(self.keys.shards)]
        hashes = await asyncio.gather(*(self._call(partial(self._r.hgetall, k)) for k in keys))
        totals: dict[str, dict[str, int]] = {}
        for h in hashes:
            for field, value in h.items():
                route, _, counter = field.decode().partition(":")
                bucket = totals.setdefault(route, {})
                bucket[counter] = bucket.get(counter, 0) + int(value)
        rejected = await self._call(lambda: self._r.hgetall(self.keys.rejected()))
        for route, value in rejected.items():
            totals.setdefault(route.decode(), {})["rejected"] = int(value)
        return totals

    async def count_rejected(self, counts: dict[str, int]) -> None:
        """Add a batch of signature rejections per route (batched by the caller: no round trip per forgery)."""
        key = self.keys.rejected()

        async def flush() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                for route, n in counts.items():
                    pipe.hincrby(key, route, n)
                await pipe.execute()

        await self._call(flush)

    async def dlq_length(self, route: str | None = None) -> int:
        key = self.keys.dlq_route(route) if route else self.keys.dlq_items()
        return int(await self._call(lambda: self._r.zcard(key)))

    async def dlq_lengths(self, routes: Sequence[str]) -> dict[str, int]:
        """`dlq_length` of many routes in one pipelined round trip (every key is in the {dlq} slot): a /metrics
        refresh reads every route's, and one round trip per route ran past its budget with ~2,000 routes on a store
        1 ms away, so the gauges were never exported and `sidecar_store_up` said 0."""
        counts = await self._per_route(routes, lambda pipe, key: pipe.zcard(key))
        return {r: int(n) for r, n in counts.items()}

    async def dlq_oldest_many(self, routes: Sequence[str]) -> dict[str, float | None]:
        """When each route's oldest dead letter died (ms; None: it has none), in one pipelined round trip."""
        raws = await self._per_route(routes, lambda pipe, key: pipe.zrange(key, 0, 0, withscores=True))
        return {r: (float(raw[0][1]) if raw else None) for r, raw in raws.items()}

    async def _per_route(self, routes: Sequence[str], queue: Callable[[Any, str], Any]) -> dict[str, Any]:
        """{route: reply} of one command on each route's DLQ index (`queue(pipe, key)`), pipelined."""
        if not routes:
            return {}
        keys = [self.keys.dlq_route(r) for r in routes]

        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for key in keys:
                    queue(pipe, key)
                return list(await pipe.execute())

        return dict(zip(routes, await self._call(read), strict=True))

    async def dlq_evicted(self) -> dict[str, int]:
        raw = await self._call(lambda: self._r.hgetall(self.keys.dlq_evicted()))
        return {k.decode(): int(v) for k, v in raw.items()}
