"""`sidecar dlq drain --hold 0` (a drain that is not held, as against a sidecar from before held drains) when its
output fails: a full device, a file over its size limit, a pipe whose reader went away, Ctrl-C. The server removes
an item once the CLI's TCP acknowledged its line, so every line the CLI read must end up written or saved in the
rescue file it names, never dropped; what the server did not count stays in the DLQ. Real `sidecar run` and
`sidecar dlq` processes on a real Valkey. The held drain, the default, is in tests/test_admin_cli_held.py."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis

from sidecar.admin import _unacked
from sidecar.supervisor import process_state
from tests import test_admin_cli
from tests.procs import wait_until
from tests.test_admin import bury_many
from tests.test_admin_cli import KEYS, TOKEN, Running, cli_env, dlq, one_line

RESCUE_NAME = (
    "sidecar-drain.unwritten.ndjson"  # in the current directory when --out has none to put it beside
)
PAD = json.dumps({"pad": "x" * 4000}).encode()  # items of ~6 KB: a few fill a pipe or a socket buffer


sidecar = test_admin_cli.sidecar  # the same running sidecar with an admin API (a fixture)


def line_ids(data: bytes) -> list[str]:
    """The ids of the complete lines in `data` (a line cut short by the failure is not one)."""
    return [json.loads(line)["id"] for line in data.split(b"\n")[:-1]]


def rescued_ids(path: Path) -> list[str]:
    return line_ids(path.read_bytes()) if path.exists() else []


def remaining(rdb: redis.Redis) -> set[str]:
    return {m.decode() for m in rdb.zrange(KEYS.dlq_items(), 0, -1)}


def assert_accounted(ids: list[str], got: list[str], left: set[str], drained: int) -> None:
    """Nothing lost: every item is written, rescued or still in the DLQ; what the server counted as drained is
    exactly what the CLI kept, but for the one it may have read without the server counting it (then it is in the
    DLQ as well: a duplicate, never a loss)."""
    assert len(set(got)) == len(got), "an item written or rescued twice"
    assert set(got) | left == set(ids), f"lost: {sorted(set(ids) - set(got) - left)}"
    both = set(got) & left
    assert len(both) <= 1 and len(got) - len(both) == drained, (len(got), both, drained)


async def test_admin_cli_drain_to_full_device_saves_the_lines_it_read(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    ids = await bury_many(sidecar.store, 30)
    auth = ["--admin-url", sidecar.admin_url, "--token", TOKEN]
    r = await dlq("drain", "--hold", "0", "--out", "/dev/full", *auth, cwd=tmp_path)
    rescue = tmp_path / RESCUE_NAME  # /dev/full has no directory to put it beside: the current one
    rescued = rescued_ids(rescue)
    drained, of = await sidecar.drain_log()
    # whether the server counted the first line before the CLI hung up is a race (on a loaded machine it may
    # not have): either way that line is rescued, and then it is in the DLQ as well (assert_accounted)
    assert of == 30
    assert_accounted(ids, rescued, remaining(rdb), drained)
    assert r.code == 1 and one_line(r.err) and r.out == "", r.err
    assert "No space left on device" in r.err and str(rescue) in r.err
    assert f"0 item(s) written to /dev/full; {len(rescued)} read but not written" in r.err


async def test_admin_cli_drain_to_file_over_its_size_limit_keeps_it_whole_and_saves_the_rest(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    out = tmp_path / "dead.ndjson"
    auth = ["--admin-url", sidecar.admin_url, "--token", TOKEN]
    await bury_many(sidecar.store, 5, prefix="old", body=PAD)
    first = await dlq("drain", "--hold", "0", "--out", str(out), *auth)
    assert first.code == 0, first.err
    before = out.read_bytes()
    line = len(before) // 5
    ids = await bury_many(sidecar.store, 150, prefix="new", body=PAD)
    # the 61st line is cut short by EFBIG (Python ignores SIGXFSZ); the rescue file, under the same limit, holds
    # more than what can sit in the CLI's buffers
    limit = len(before) + 60 * line + line // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = await dlq("drain", "--hold", "0", "--out", str(out), *auth, cwd=tmp_path, preexec_fn=small_files)
    data = out.read_bytes()
    written = line_ids(data[len(before) :])
    rescue = Path(f"{out}.unwritten.ndjson")
    rescued = rescued_ids(rescue)
    drained, _ = await sidecar.drain_log(2)
    assert_accounted(ids, written + rescued, remaining(rdb), drained)
    assert r.code == 1 and one_line(r.err), r.err
    assert data.startswith(before) and data.endswith(b"\n")  # the half line was cut off again
    assert len(written) == 60 and rescued, (len(written), len(rescued))
    assert "File too large" in r.err and str(rescue) in r.err
    assert f"60 item(s) written to {out}; {len(rescued)} read but not written" in r.err


def unread(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD), without taking them."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


async def read_some(fd: int, until: bytes | None, timeout: float = 10.0) -> bytes:
    """From a non-blocking fd: until `until` is in what was read, or (None) until nothing is left to read."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            if until is None:
                return bytes(got)
            await asyncio.sleep(0.01)
            continue
        if not chunk:
            return bytes(got)
        got += chunk
        if until is not None and until in got:
            return bytes(got)
    raise AssertionError(f"read {len(got)} bytes in {timeout} s without {until!r}")


@dataclass
class DrainPipe:
    """`sidecar dlq drain` writing to a pipe: the dead letters' ids, the CLI, and the pipe's read end
    (non-blocking; -1 once closed)."""

    ids: list[str]
    proc: asyncio.subprocess.Process
    r: int

    async def reader_goes_away(self) -> tuple[bytes, str]:
        """Like `| head -1`, but exact: after a first line the CLI is stopped while the reader takes everything in
        the pipe and goes away, so every line the CLI wrote was read, and its next write fails. (What was read,
        the CLI's stderr.)"""
        got = await read_some(self.r, b"\n")
        self.proc.send_signal(signal.SIGSTOP)
        assert await wait_until(lambda: process_state(self.proc.pid) == "T", timeout=5, interval=0.002)
        got += await read_some(self.r, None)
        self.close()
        self.proc.send_signal(signal.SIGCONT)
        _, err = await asyncio.wait_for(self.proc.communicate(), timeout=30)
        return got, err.decode()

    async def full(self) -> None:
        """Nobody reads the pipe: once it is full (it stops growing), the CLI waits to write its next line."""
        sizes = [-1]

        def full() -> bool:
            sizes.append(unread(self.r))
            return sizes[-1] >= 32768 and sizes[-1] == sizes[-2]

        assert await wait_until(full, timeout=10, interval=0.1), sizes[-5:]

    def close(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            self.r = -1


@asynccontextmanager
async def drain_to_pipe(
    sidecar: Running, cwd: Path, *, n: int = 61, body: bytes = PAD, hold: str = "0"
) -> AsyncIterator[DrainPipe]:
    """`n` dead letters, far more than a pipe holds (the CLI cannot finish without a reader), and `sidecar dlq
    drain --hold HOLD` writing them to a pipe; the pipe is closed and the CLI stopped after."""
    ids = await bury_many(sidecar.store, n, body=body)
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                "-m",
                "sidecar",
                "dlq",
                "drain",
                "--hold",
                hold,
                "--admin-url",
                sidecar.admin_url,
            ],
            *["--token", TOKEN],
            cwd=cwd,
            env=cli_env(),
            stdout=w,
            stderr=asyncio.subprocess.PIPE,
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    os.set_blocking(r, False)
    pipe = DrainPipe(ids, proc, r)
    try:
        yield pipe
    finally:
        pipe.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_admin_cli_drain_to_pipe_closed_by_its_reader_saves_the_lines_it_read(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    async with drain_to_pipe(sidecar, tmp_path) as pipe:
        got, err = await pipe.reader_goes_away()
    read, rescued = line_ids(got), rescued_ids(tmp_path / RESCUE_NAME)
    drained, _ = await sidecar.drain_log()
    assert_accounted(pipe.ids, read + rescued, remaining(rdb), drained)
    assert pipe.proc.returncode == 1 and one_line(err) and "Broken pipe" in err, err
    assert read and rescued and f"{len(read)} item(s) written to stdout; {len(rescued)} read but" in err, err


async def test_admin_cli_drain_interrupted_saves_the_lines_it_read(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    async with drain_to_pipe(sidecar, tmp_path) as pipe:
        await pipe.full()
        pipe.proc.send_signal(signal.SIGINT)
        _, err_bytes = await asyncio.wait_for(pipe.proc.communicate(), timeout=30)
        got = await read_some(pipe.r, None)
    drained, _ = await sidecar.drain_log()
    assert_accounted(pipe.ids, line_ids(got) + rescued_ids(tmp_path / RESCUE_NAME), remaining(rdb), drained)
    err = err_bytes.decode()
    assert pipe.proc.returncode == 130 and one_line(err) and "interrupted" in err, err


TAIL = 16 * 1024  # the end of a line: it fits in the CLI's receive buffer while the CLI is stopped


def dead_letter_line(i: int) -> bytes:
    item = {
        "id": f"{i:024x}",
        "route": "stripe",
        "event_id": f"evt_{i:05d}",
        "attempts": 1,
        "dead_at": "2026-01-01T00:00:00.000Z",
        "headers": [],
        "history": [],
        "body": "x" * 1_000_000,
    }
    return json.dumps(item, separators=(",", ":")).encode() + b"\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"  # one chunk per line, as the admin API (aiohttp) writes it


def acked(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Wait until the peer's TCP acknowledged everything sent on `sock`: when the admin API counts a line as handed
    over (sidecar.admin.peer_took_everything). False if the connection was reset or the wait timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        unacked = _unacked(sock)
        if unacked is None or unacked < 0:
            return False
        if unacked == 0:
            return True
        time.sleep(0.001)
    return False


def receive_queue(port: int) -> int | None:
    """Bytes waiting in the receive queue of the TCP socket bound to 127.0.0.1:`port` (Linux /proc/net/tcp)."""
    local = f"{struct.unpack('=I', socket.inet_aton('127.0.0.1'))[0]:08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if fields[1] == local:
                return int(fields[4].split(":")[1], 16)
    return None


def poll(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.002)
    return False


def whole_lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def test_admin_cli_drain_interrupted_mid_line_saves_that_line_whole(tmp_path: Path) -> None:
    """Ctrl-C while the CLI waits in the middle of a ~1 MB line, whose end reaches the CLI's TCP (and is
    acknowledged, so the server counts the item as handed over) before the CLI acts on it: the whole line must be
    saved, not the part the CLI had not read yet. A stand-in for the admin API, because only a stand-in can hold a
    line back halfway: it streams lines as the admin API does (chunked, one chunk each) and counts an item as it
    does (once the CLI's TCP acknowledged all of its line). The race is made exact: the CLI is stopped while it
    waits mid-line, the end of the line arrives, then SIGINT and SIGCONT."""
    deadline = time.monotonic() + 25  # for every wait together

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    lines = [dead_letter_line(i) for i in range(3)]
    out = tmp_path / "dead.ndjson"
    rescue = Path(f"{out}.unwritten.ndjson")
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(left())
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    cli = ["dlq", "drain", "--admin-url", url, "--token", TOKEN, "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", *cli],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    conn: socket.socket | None = None
    third, sent = chunk(lines[2]), 0
    drained = 0
    try:
        conn, (_, cli_port) = srv.accept()
        conn.settimeout(left())
        request = b""
        while b"\r\n\r\n" not in request:
            got = conn.recv(65536)
            assert got, request
            request += got
        assert request.startswith(b"POST /admin/dlq/drain "), request
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        conn.sendall(chunk(lines[0]))
        assert acked(conn, left())
        drained += 1
        second = chunk(lines[1])
        conn.sendall(second[:-TAIL])
        # the CLI took everything sent: it waits for more, in the middle of the second line
        assert poll(lambda: receive_queue(cli_port) == 0, left())
        proc.send_signal(signal.SIGSTOP)
        assert poll(lambda: process_state(proc.pid) == "T", left())
        conn.sendall(second[-TAIL:])
        # the CLI's TCP took the end of the line while the CLI was stopped: the server counts it
        assert acked(conn, left())
        drained += 1
        # as the admin API does, go on with the next line, as far as the CLI's TCP takes it
        conn.setblocking(False)
        with suppress(BlockingIOError):
            while sent < len(third):
                sent += conn.send(third[sent:])
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        _, err_bytes = proc.communicate(timeout=left())
        # the CLI stopped the server: the next line never reached it whole, so the server does not count it
        assert sent < len(third) or _unacked(conn) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if conn is not None:
            conn.close()
        srv.close()
    err = err_bytes.decode()
    assert proc.returncode == 130 and one_line(err) and "interrupted" in err, err
    written = whole_lines(out.read_bytes())
    saved = rescue.read_bytes() if rescue.exists() else b""
    assert all(line in lines for line in whole_lines(saved)), (
        f"the rescue file holds a part of a line: {saved[:80]!r}"
    )
    assert drained == 2
    assert written + whole_lines(saved) == lines[:drained]  # what the server counted: each once, whole
    assert f"1 item(s) written to {out}; 1 read but not written are saved in {rescue}" in err, err
