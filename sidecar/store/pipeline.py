"""An auto-pipelining Redis transport for the hot path: every command issued in one event-loop tick goes out in
one write, and replies are parsed by hiredis' C reader.

Why not a general client: measured on the sidecar's real claim script (docs/performance.md), one redis.asyncio
call costs ~85 µs of Python per request, valkey-glide ~65 µs, coredis ~150 µs; this transport ~9 µs. The store
uses it only for its Lua scripts and a few simple commands; everything else keeps redis-py's full client.

    conn     one connection (TCP, TLS or a unix socket); a FIFO of futures matches replies to commands (Redis answers in order)
    watchdog a request older than `timeout` means the server is stuck (paused, partitioned): the connection is
             aborted and every waiting request fails with TimeoutError, so callers fail closed in bounded time
    client   single node, or a Redis Cluster: keys are routed by hash slot, MOVED/ASK refresh the slot map, and
             so does a lost or refused connection (a primary died: its replica may be taking over its slots);
             TRYAGAIN (a slot mid-migration) is waited out for up to 0.5 s
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

import hiredis
from redis.crc import key_slot

from sidecar.durations import EXPIRY_GRACE
from sidecar.store.tls import ReloadingTLS, url_query

# A server that is a replica now, met on a connection made while it was the primary (a failover demoted it): a write
# refused (READONLY), or a write that ran as the primary's last and whose WAIT then met the replica (its write is
# discarded when it syncs with the new primary). Either way this connection is left for a new one.
DEMOTED = ("READONLY", "ERR WAIT cannot be used with replica")


class ReplyError(Exception):
    """The server answered with an error (a script error, a wrong type, …). Not a reachability problem."""


class NotReplicated(ConnectionError):
    """A write ran on the primary, but fewer replicas than asked acknowledged it in time (`WAIT`): a failover now
    could lose it, so it must not be acknowledged to anyone yet. `reply` is what the write itself answered."""

    def __init__(self, message: str, reply: Any = None) -> None:
        super().__init__(message)
        self.reply = reply


# (replicas, timeout ms): after a write, `WAIT` for that many replicas to acknowledge it. A client asks with one.
Wait = tuple[int, int]


class Connection(asyncio.Protocol):
    def __init__(self, timeout: float, on_lost: Callable[[], None] | None = None) -> None:
        self.timeout = timeout
        self._on_lost = on_lost
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self._unsent_wait: asyncio.Future[Any] | None = None  # a WAIT queued in this tick, not yet written
        self._wait_sent: asyncio.Future[Any] | None = None  # the WAIT written and not yet answered
        self._wait_next: asyncio.Future[Any] | None = None  # callers that came during it: the next WAIT's
        self.closed = False

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        while True:
            reply = self._reader.gets()
            if reply is False:
                if self.closed and not pending and self._transport is not None:
                    # retired (READONLY, or a WAIT met a replica), and every reply it owed is in
                    self._transport.abort()
                return
            if not pending:  # a reply nobody asked for: the stream is out of sync, start over
                self._fail(ConnectionError("unexpected reply from the store"))
                return
            fut, _ = pending.popleft()
            if not fut.done():
                if isinstance(reply, ReplyError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
            if isinstance(reply, ReplyError) and str(reply).startswith(DEMOTED):
                self._retire()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("store connection closed"))

    # ---- commands ------------------------------------------------------------------------------------------------
    def execute(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionError("store connection closed"))
            return fut
        self._out.append(hiredis.pack_command(tuple(args)))
        self._pending.append((fut, time.monotonic()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self.timeout, self._check)
        return fut

    async def replicated(self, reply: Any, wait: Wait) -> Any:
        """`reply`, once `wait[0]` replicas have acknowledged every write this connection made so far.

        `WAIT` covers all of a connection's earlier writes, and any `WAIT` written after a caller's reply arrived
        covers that caller: so callers share one (group commit). One is queued in a tick and shared by that tick's
        callers; while one is out, later callers share the next, written when it answers. So at most one `WAIT`
        holds the connection at a time, and a command behind it waits at most `wait[1]` (< the watchdog's
        timeout) for it."""
        fut = self._unsent_wait or self._wait_next
        if fut is None:
            if self._wait_sent is None:
                fut = self._unsent_wait = self._send_wait(wait)
            else:
                fut = self._wait_next = self._loop.create_future()
                self._wait_sent.add_done_callback(lambda _: self._send_next(wait))
        acked = await asyncio.shield(fut)  # shared: one caller cancelled must not cancel the others' WAIT
        if acked < wait[0]:
            raise NotReplicated(
                f"{acked} of {wait[0]} replicas acknowledged the write within {wait[1]} ms", reply
            )
        return reply

    def _send_wait(self, wait: Wait) -> asyncio.Future[Any]:
        fut = self._wait_sent = self.execute(("WAIT", wait[0], wait[1]))
        fut.add_done_callback(self._wait_answered)
        return fut

    def _wait_answered(self, fut: asyncio.Future[Any]) -> None:
        if self._wait_sent is fut:
            self._wait_sent = None

    def _send_next(self, wait: Wait) -> None:
        waiting, self._wait_next = self._wait_next, None
        if waiting is None or waiting.done():
            return
        sent = self._send_wait(wait)
        self._unsent_wait = waiting  # until it is written, callers of this tick are covered by it too

        def settle(done: asyncio.Future[Any]) -> None:
            if waiting.done():
                return
            if done.cancelled():
                waiting.cancel()
            elif done.exception() is not None:
                waiting.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                waiting.set_result(done.result())

        sent.add_done_callback(settle)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._unsent_wait = None
        out, self._out = self._out, []
        if self._transport is not None and not self.closed:
            self._transport.writelines(out)

    def _check(self, final: bool = False) -> None:
        self._watchdog = None
        if not self._pending:
            return
        waited = time.monotonic() - self._pending[0][1]
        if waited >= self.timeout and not final:
            # One more poll of the socket first (as a forward's deadline, durations.EXPIRY_GRACE): after a
            # pause of this process the watchdog and the replies that arrived meanwhile are due together, and
            # the loop runs timers before it reads: a claim the store had answered was failed (503) although
            # it was stored.
            self._watchdog = self._loop.call_later(EXPIRY_GRACE, self._check, True)
        elif waited >= self.timeout:
            self._fail(TimeoutError(f"store did not answer within {self.timeout}s"))
        else:
            self._watchdog = self._loop.call_later(self.timeout - waited, self._check)

    def _retire(self) -> None:
        """The server refused a write as a replica (READONLY, or a WAIT on a replica): a failover demoted it
        while this connection stayed open (a managed service's primary endpoint, a DNS name or a virtual IP,
        now leads to the new primary, but only for new connections). No new commands here: the next call opens
        a new connection, which reaches the new primary (and, on a cluster or with Sentinel, the slot map or
        the primary is looked up again). The replies still owed on this one are read first, then it is closed."""
        if self.closed:
            return
        self.closed = True
        # commands queued and not written yet (their flush comes after this): never sent, failed now rather than
        # left to the watchdog (a TimeoutError `timeout` later, for a command that never left this process)
        unsent, self._out = len(self._out), []
        for _ in range(unsent):
            fut, _ = self._pending.pop()
            if not fut.done():
                fut.set_exception(
                    ConnectionError("store connection retired (its node is a replica now): not sent")
                )
        if self._on_lost is not None:
            self._on_lost()

    def _fail(self, exc: BaseException, lost: bool = True) -> None:
        notify = lost and not self.closed and self._on_lost is not None
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.abort()
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError(str(exc)))
        if notify:
            self._on_lost()  # type: ignore[misc]

    def close(self) -> None:
        if not self.closed:
            self._fail(ConnectionError("store connection closed"), lost=False)


T = TypeVar("T")


class SharedAttempt(Generic[T]):
    """One run of `start()` at a time, shared by every caller that comes while it runs (a connect, a slot map
    reload, a primary lookup); a call after it ended starts a new one. A caller cancelled does not cancel it."""

    def __init__(self, start: Callable[[], Awaitable[T]]) -> None:
        self._start = start
        self.running: asyncio.Future[T] | None = None

    def begin(self) -> asyncio.Future[T]:
        if self.running is None:
            self.running = attempt = asyncio.ensure_future(self._start())
            attempt.add_done_callback(self._done)
        return self.running

    def _done(self, attempt: asyncio.Future[T]) -> None:
        if self.running is attempt:
            self.running = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here (no "never retrieved" noise); the callers awaiting it get it too

    async def __call__(self) -> T:
        return await asyncio.shield(self.begin())


class Node:
    """One server address: a lazily (re)connected Connection, with AUTH/SELECT from the URL."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        password: str | None,
        username: str | None,
        db: int,
        on_lost: Callable[[], None] | None = None,
        tls: ReloadingTLS | None = None,
        unix_path: str | None = None,
    ):
        self.host, self.port, self.timeout = host, port, timeout
        self._on_lost = on_lost
        self._tls = tls
        self._unix_path = unix_path
        self._auth = (username, password)
        self._db = db
        self._conn: Connection | None = None
        self._connecting = SharedAttempt(self._connect)

    async def connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        return await self._connecting()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()

        def protocol() -> Connection:
            return Connection(self.timeout, self._on_lost)

        if self._unix_path is not None:
            connecting = loop.create_unix_connection(protocol, self._unix_path)
        elif self._tls is not None:
            connecting = loop.create_connection(
                protocol, self.host, self.port, ssl=self._tls.current(), server_hostname=self.host
            )
        else:
            connecting = loop.create_connection(protocol, self.host, self.port)
        try:
            _, conn = await asyncio.wait_for(connecting, self.timeout)
        except (OSError, TimeoutError) as exc:
            if self._on_lost is not None:
                self._on_lost()
            if isinstance(exc, TimeoutError) and not str(exc):  # wait_for's own: no message at all
                where = self._unix_path or f"{self.host}:{self.port}"
                step = "connect and TLS handshake" if self._tls is not None else "connect"
                raise TimeoutError(f"{where}: no {step} within {self.timeout:g}s") from exc
            raise
        username, password = self._auth
        try:
            if password:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                await conn.execute(auth)
            else:
                # a store that wants a password refuses this connection's first script as a protocol error
                # ("unauthenticated multibulk length"), which names nothing: a PING gets its NOAUTH now
                try:
                    await conn.execute(("PING",))
                except ReplyError as exc:
                    if str(exc).startswith("NOAUTH"):
                        raise
                    # any other refusal (an ACL without +ping) is not this check's business
            if self._db:
                await conn.execute(("SELECT", self._db))
        except BaseException:  # refused, or cancelled: not left open behind the caller's back
            conn.close()
            raise
        self._conn = conn
        return conn

    async def execute(self, args: Sequence[Any], wait: Wait | None = None) -> Any:
        conn = await self.connection()
        reply = await conn.execute(args)
        return reply if wait is None else await conn.replicated(reply, wait)

    @property
    def live(self) -> Connection | None:
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        connecting = self._connecting.running
        if connecting is not None and not connecting.done():  # a connection that lands after this: closed too
            connecting.add_done_callback(_close_landed)


def _close_landed(attempt: asyncio.Future[Connection]) -> None:
    if not (attempt.cancelled() or attempt.exception()):
        attempt.result().close()


log = logging.getLogger("sidecar.store")

REFRESH_INTERVAL = 0.25  # seconds between slot map reloads triggered by lost cluster connections
MAX_REDIRECTS = 2  # MOVED replies followed (with a slot map reload each) before a call fails
TRYAGAIN_TRIES, TRYAGAIN_DELAY = 10, 0.05  # a call meeting a slot migration waits up to 0.5 s for its end


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # and the scheme of each node


def split_url(url: str) -> tuple[SplitResult, bool]:
    """(the URL split as one node's URL, whether it names a cluster): `rediss+cluster://` is read as `rediss://`
    (TLS to every node), `redis+cluster://` as `redis://`."""
    scheme, sep, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme)
    if sep and node_scheme is not None:
        return urlsplit(f"{node_scheme}://{rest}"), True
    return urlsplit(url), False


def cluster_seeds(netloc: str, default_port: int = 6379) -> list[tuple[str, int]]:
    """The (host, port) seeds of a redis+cluster://, rediss+cluster:// or redis+sentinel:// URL's netloc: user info
    dropped, `[::1]` unbracketed."""
    seeds = []
    for hostport in netloc.rpartition("@")[2].split(","):
        if hostport.startswith("["):  # [::1] or [::1]:port
            host, _, port = hostport[1:].partition("]")
            port = port.removeprefix(":")
        elif ":" in hostport:
            host, _, port = hostport.rpartition(":")
        else:
            host, port = hostport, ""
        seeds.append((host or "127.0.0.1", int(port or default_port)))
    return seeds


SENTINEL_PORT = 26379
SENTINEL_CHECK = 1.0  # seconds between asking the sentinels which server is the primary


@dataclass(frozen=True)
class SentinelSpec:
    """redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db][?sentinel_password=…]: the user info
    is the data servers', `sentinel_username` / `sentinel_password` the sentinels' own (if they have any)."""

    service: str
    sentinels: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None = field(repr=False)
    sentinel_username: str | None
    sentinel_password: str | None = field(repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelSpec:
        """Raises ValueError naming the problem."""
        parts = urlsplit("redis://" + url.partition("://")[2])
        query = url_query(parts.query)
        unknown = sorted(set(query) - {"sentinel_username", "sentinel_password", "db"})
        if unknown:
            raise ValueError(
                f"unsupported parameter(s): {', '.join(unknown)} (sentinels are reached over plain TCP here; "
                "supported: sentinel_username, sentinel_password, db)"
            )
        service, _, db = parts.path.strip("/").partition("/")
        db = query.get("db") or db
        if not service:
            raise ValueError("no service name: redis+sentinel://host:26379[,host:port…]/SERVICE[/db]")
        if not re.fullmatch(r"[0-9]*", db):
            raise ValueError("the database must be a number, like redis+sentinel://host:26379/mymaster/0")
        try:
            sentinels = cluster_seeds(parts.netloc, SENTINEL_PORT)
        except ValueError:
            sentinels = []
        hosts = parts.netloc.rpartition("@")[2].split(",")
        if not sentinels or not all(hosts) or not all(0 < port < 65536 for _, port in sentinels):
            raise ValueError(
                "expected redis+sentinel://host[:port][,host[:port]…]/service (port 26379 if none)"
            )
        return cls(
            service=unquote(service),
            sentinels=sentinels,
            db=int(db or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            sentinel_username=query.get("sentinel_username"),
            sentinel_password=query.get("sentinel_password"),
        )


class PipelinedClient:
    """`await client.execute(args, key=…)`; `key` routes the command on a cluster (ignored on a single node)."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        """`url` as redis-py reads it: redis://, rediss:// (TLS, with redis-py's `ssl_*` query parameters),
        unix:///path?db=N, or redis+cluster://host:port[,host:port…] (rediss+cluster:// for TLS to every node)."""
        self.timeout = timeout
        self.sentinel: SentinelSpec | None = None
        self._primary: tuple[str, int] | None = None  # the sentinels' last answer
        self._sentinel_nodes: dict[tuple[str, int], Node] = {}
        self._watch: asyncio.Task[None] | None = None
        self._opening = SharedAttempt(self._open_primary)  # a primary connection being opened and checked
        self._single_addr: tuple[str, int] | None = None  # the server of `_single`
        self._role_refused = False
        if url.startswith("redis+sentinel://"):
            self.sentinel = SentinelSpec.parse(url)
            self._sentinel_order = list(self.sentinel.sentinels)
            # a data server's URL: its address comes from the sentinels, its auth and db from the spec below
            url = "redis://"
        parts, self.cluster = split_url(url)
        query = url_query(parts.query)
        self._tls = ReloadingTLS(query, self.cluster) if parts.scheme == "rediss" else None
        self._unix_path = unquote(parts.path) if parts.scheme == "unix" else None
        self._password = unquote(parts.password) if parts.password else query.get("password")
        self._username = unquote(parts.username) if parts.username else query.get("username")
        # redis-py: `?db=` first, then the path (not for a socket, whose path is the socket's)
        path_db = parts.path.lstrip("/") if self._unix_path is None else ""
        self._db = int(query.get("db") or path_db or 0) if not self.cluster else 0
        self._seeds = (
            cluster_seeds(parts.netloc)
            if self.cluster
            else [(parts.hostname or "127.0.0.1", parts.port or 6379)]
        )
        if self.sentinel is not None:
            self._username, self._password = self.sentinel.username, self.sentinel.password
            self._db = self.sentinel.db
        self._nodes: dict[tuple[str, int], Node] = {}
        self._slots: list[tuple[str, int] | None] = [None] * 16384
        self._refresh = SharedAttempt(self._load_slots)  # the slot map reload under way, one at a time
        self._refreshed_at = -REFRESH_INTERVAL
        self._closed = False
        self._scripts: set[str] = set()  # sources loaded by load_script, for primaries that appear later
        self._sources: dict[str, str] = {}  # sha -> source of every FastScript (know_script)
        self._single: Connection | None = None  # single-node fast path: the live connection, no lookups

    def _node(self, addr: tuple[str, int]) -> Node:
        node = self._nodes.get(addr)
        if node is None:
            on_lost = self._slots_stale if self.cluster else self._primary_lost if self.sentinel else None
            node = Node(
                *addr,
                self.timeout,
                self._password,
                self._username,
                self._db,
                on_lost,
                self._tls,
                self._unix_path,
            )
            self._nodes[addr] = node
        return node

    async def execute(
        self, args: Sequence[Any], key: str | bytes | None = None, wait: Wait | None = None
    ) -> Any:
        """`wait`: after the reply, `WAIT` on the same connection for that many replicas (NotReplicated if fewer
        acknowledged in time). A connection lost in between fails the call: a new one's `WAIT` covers nothing."""
        if not self.cluster:
            conn = self._single
            if conn is None or conn.closed:
                conn = self._single = await self._single_connection()
            reply = await conn.execute(args)
            return reply if wait is None else await conn.replicated(reply, wait)
        slot = key_slot(key.encode() if isinstance(key, str) else key) if key is not None else 0
        moved = tryagain = 0
        while True:
            addr = self._slots[slot]
            if addr is None:
                await self.refresh_slots()
                addr = self._slots[slot] or self._seeds[0]
            try:
                return await self._on_node(addr, args, wait)
            except ReplyError as exc:
                text = str(exc)
                if text.startswith("MOVED") and moved < MAX_REDIRECTS:
                    # the reply names the slot's owner: go there now (a reloaded map could come from a node that
                    # has not heard of the move yet), and reload the rest of the map in the background
                    moved += 1
                    host, _, port = text.split()[2].rpartition(":")
                    self._slots[slot] = (host.strip("[]") or addr[0], int(port))
                    self._slots_stale()
                    continue
                # The slot is being migrated and the script's keys are split between the two nodes (a new event's
                # key is on neither): not run. Short migrations end within the wait; longer ones fail closed.
                if text.startswith("TRYAGAIN") and tryagain < TRYAGAIN_TRIES:
                    tryagain += 1
                    await asyncio.sleep(TRYAGAIN_DELAY)
                    continue
                if text.startswith("MOVED"):
                    raise ConnectionError("cluster slot map keeps moving") from exc
                raise

    async def _on_node(self, addr: tuple[str, int], args: Sequence[Any], wait: Wait | None) -> Any:
        """Run on `addr`, following one ASK redirect (a slot being migrated, its keys already at the target)."""
        try:
            return await self._node(addr).execute(args, wait)
        except ReplyError as exc:
            if not str(exc).startswith("ASK"):
                raise
            host, _, port = str(exc).split()[2].rpartition(":")
        conn = await self._node((host, int(port))).connection()
        asking, pending = conn.execute(("ASKING",)), conn.execute(args)
        await asking
        try:
            reply = await pending
        except ReplyError as exc:
            # the slot is moving to a node that has not got the scripts (a primary just added): load this one there
            # and ask again. (FastScript's own NOSCRIPT handling would load it on the slot's owner, the source.)
            source = self._sources.get(args[1]) if args and args[0] == "EVALSHA" else None
            if source is None or not str(exc).startswith("NOSCRIPT"):
                raise
            await conn.execute(("SCRIPT", "LOAD", source))
            asking, pending = conn.execute(("ASKING",)), conn.execute(args)
            await asking
            reply = await pending
        return reply if wait is None else await conn.replicated(reply, wait)

    def know_script(self, sha: str, source: str) -> None:
        """A script sent by EVALSHA: its source, for a node met through ASK that has not got it."""
        self._sources[sha] = source

    def node_of(self, key: str) -> tuple[str, int] | None:
        """The (host, port) the slot map sends `key` to; None on a single node or before the map is loaded."""
        if not self.cluster:
            return None
        return self._slots[key_slot(key.encode())]

    def execute_nowait(
        self, args: Sequence[Any], key: str | bytes | None = None
    ) -> asyncio.Future[Any] | None:
        """Put the command on its connection now, in call order, when that connection is up and (on a cluster) the
        slot's node known; None otherwise (use `execute`). A MOVED or ASK reply is the caller's to retry."""
        if not self.cluster:
            conn = self._single
        else:
            slot = key_slot(key.encode() if isinstance(key, str) else key) if key is not None else 0
            addr = self._slots[slot]
            node = self._nodes.get(addr) if addr is not None else None
            conn = node.live if node is not None else None
        if conn is None or conn.closed:
            return None
        return conn.execute(args)

    async def _single_connection(self) -> Connection:
        if self.sentinel is None:
            return await self._node(self._seeds[0]).connection()
        return await self._opening()

    async def _open_primary(self) -> Connection:
        """A connection to the server the sentinels name, checked to be a primary (their answer can lag a
        failover: a demoted primary takes no more writes) and given the scripts (a promoted replica has none)."""
        addr = self._primary or await self._ask_sentinels()
        node = self._node(addr)
        try:
            conn = await node.connection()
            try:
                role = await conn.execute(("ROLE",))
            except ReplyError as exc:  # an ACL user without +role: the sentinels' word alone
                if not self._role_refused:
                    log.warning("store: cannot check the primary's role (%s); give the user +role", exc)
                    self._role_refused = True
            else:
                if role[0] != b"master":
                    node.close()
                    raise ConnectionError(f"{addr[0]}:{addr[1]} is no primary now ({role[0]!r})")
            if self._scripts:
                await self._load_scripts({addr})
        except (ConnectionError, OSError, TimeoutError):
            if self._primary == addr:
                self._primary = None  # ask the sentinels again next time
            raise
        if self._primary not in (None, addr):  # the sentinels named another while this connected
            node.close()
            raise ConnectionError(f"{addr[0]}:{addr[1]} is no longer the sentinels' primary")
        self._primary, self._single_addr = addr, addr
        if self._watch is None and not self._closed:
            self._watch = asyncio.ensure_future(self._watch_primary())
        return conn

    async def _ask_sentinels(self) -> tuple[str, int]:
        """The primary's address from the first sentinel that knows it; that sentinel is asked first next time."""
        spec = self.sentinel
        assert spec is not None
        last: Exception | None = None
        for addr in list(self._sentinel_order):
            node = self._sentinel_nodes.get(addr)
            if node is None:
                node = self._sentinel_nodes[addr] = Node(
                    *addr, self.timeout, spec.sentinel_password, spec.sentinel_username, 0
                )
            try:
                reply = await node.execute(("SENTINEL", "GET-MASTER-ADDR-BY-NAME", spec.service))
            except (ConnectionError, OSError, TimeoutError, ReplyError) as exc:
                last = exc
                continue
            if reply:
                self._sentinel_order.remove(addr)
                self._sentinel_order.insert(0, addr)
                host, port = reply
                return (host.decode() if isinstance(host, bytes) else host), int(port)
            last = ConnectionError(f"sentinel {addr[0]}:{addr[1]} knows no {spec.service!r}")
        raise ConnectionError(f"no sentinel named the primary of {spec.service!r}: {last}")

    def _primary_lost(self) -> None:
        self._primary = None  # the next connection asks the sentinels first

    async def _watch_primary(self) -> None:
        """Ask the sentinels every SENTINEL_CHECK which server is the primary. After a failover the old primary may
        stay up, still taking writes, until the sentinels turn it into a replica (seconds, or never if it is cut
        off from them): the connection to it is closed at once, and calls go to the new primary. Writes that
        reached the old one in between are lost with it unless `redis.wait_replicas` held their answers back."""
        while not self._closed:
            await asyncio.sleep(SENTINEL_CHECK)
            try:
                addr = await self._ask_sentinels()
            except ConnectionError as exc:
                log.debug("sentinels not reached: %s", exc)
                continue
            self._primary = addr
            current, conn = self._single_addr, self._single
            if current is not None and current != addr and conn is not None and not conn.closed:
                log.warning("store: the sentinels name %s:%d the primary now (was %s:%d)", *addr, *current)
                self._node(current).close()

    def _slots_stale(self) -> None:
        """A cluster node's connection was lost or refused. If the node died, a replica takes its slots over (in
        `cluster-node-timeout`, or at once on a manual failover): reload the map in the background, at most every
        REFRESH_INTERVAL, so the commands after this one go where the slots now are. The command that met the
        failure is not re-sent: it may have run before the connection broke, and its caller fails closed."""
        now = time.monotonic()
        if self._closed or self._refresh.running is not None or now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        self._refresh.begin()  # in the background: a failed one is tried again on the next loss

    async def refresh_slots(self) -> None:
        await self._refresh()

    async def _load_slots(self) -> None:
        last: Exception | None = None
        # Nodes with a live connection first: a seed that died (or hangs) would cost a refused connect, or a whole
        # timeout, on every reload.
        live = [a for a, n in self._nodes.items() if n.live is not None and not n.live.closed]
        for addr in dict.fromkeys([*live, *self._seeds, *self._nodes]):
            try:
                ranges = await self._node(addr).execute(("CLUSTER", "SLOTS"))
            except (ConnectionError, OSError, TimeoutError, ReplyError) as exc:
                last = exc
                continue
            if not ranges:
                # a node that serves no slot: removed from the cluster (`redis-cli --cluster del-node` resets it and
                # leaves it running) or not joined yet; its empty map would send every call to a seed, CLUSTERDOWN
                last = ConnectionError(f"{addr[0]}:{addr[1]} serves no slots (not part of the cluster)")
                continue
            before = set(self._slots)
            for start, end, primary, *_ in ranges:
                host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                target = (host or addr[0], int(primary[1]))
                for slot in range(int(start), int(end) + 1):
                    self._slots[slot] = target
            if self._scripts and None not in before:  # not the first load: preload() covers that one
                await self._load_scripts(set(self._slots) - before)
            return
        raise ConnectionError(f"no cluster node answered CLUSTER SLOTS: {last}")

    async def _load_scripts(self, primaries: set[tuple[str, int] | None]) -> None:
        """A replica promoted to primary has not got the scripts: a server's script cache is not replicated. Load
        them before traffic reaches it, as `preload` did on the first primaries: an EVALSHA answered NOSCRIPT is
        sent again behind commands issued after it. Best effort: NOSCRIPT still loads on first use."""
        for addr in primaries:
            if addr is None:
                continue
            for source in self._scripts:
                try:
                    await self._node(addr).execute(("SCRIPT", "LOAD", source))
                except (ConnectionError, OSError, TimeoutError, ReplyError):
                    break

    async def load_script(self, source: str) -> None:
        """SCRIPT LOAD on the node, or on every primary of a cluster (scripts are cached per server); a cluster
        client also loads it on primaries that appear later, a sentinel-managed one on a new primary."""
        if not self.cluster:
            if self.sentinel is not None:
                self._scripts.add(source)
            await self.execute(("SCRIPT", "LOAD", source))
            return
        await self.refresh_slots()
        for addr in {a for a in self._slots if a is not None}:
            await self._node(addr).execute(("SCRIPT", "LOAD", source))
        self._scripts.add(source)

    def close(self) -> None:
        self._closed = True
        if self._refresh.running is not None:
            self._refresh.running.cancel()
        if self._watch is not None:
            self._watch.cancel()
        for node in (*self._nodes.values(), *self._sentinel_nodes.values()):
            node.close()


class FastScript:
    """A Lua script run by EVALSHA over the pipelined client, loaded on demand (NOSCRIPT → SCRIPT LOAD, retry)."""

    def __init__(self, client: PipelinedClient, source: str) -> None:
        import hashlib

        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        client.know_script(self.sha, source)

    async def __call__(self, keys: Sequence[str], args: Sequence[Any], wait: Wait | None = None) -> Any:
        route_key = keys[0] if keys else None
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self.client.execute(command, key=route_key, wait=wait)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.client.execute(("SCRIPT", "LOAD", self.source), key=route_key)
        return await self.client.execute(command, key=route_key, wait=wait)

    def start(self, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any] | None:
        """Send the call now, ordered before any command issued after it (see `execute_nowait`); `finish` it."""
        return self.client.execute_nowait(
            ("EVALSHA", self.sha, len(keys), *keys, *args), keys[0] if keys else None
        )

    async def finish(
        self, started: asyncio.Future[Any] | None, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        if started is not None:
            try:
                return await started
            except ReplyError as exc:
                if not str(exc).startswith(("NOSCRIPT", "MOVED", "ASK", "TRYAGAIN")):
                    raise
        return await self(keys, args)  # not sent yet, or sent where it could not run: the full path
