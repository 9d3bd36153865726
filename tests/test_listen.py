"""`sidecar run` and its listeners: a port another process holds stops the start, cleanly and at once, before
any webhook is taken (a single process does not share its inbound port; only `server.workers` siblings do)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Upstream
from tests.procs import SidecarProcess, free_port, run_to_exit, start_sidecar, write_config
from tests.test_crash import SECRET

pytestmark = pytest.mark.slow


def config(
    path: Path, upstream: Upstream, redis_url: str, port: int, admin_port: int | None = None, workers: int = 1
) -> Path:
    write_config(
        path,
        redis_url=redis_url,
        upstream_url=upstream.url,
        port=port,
        admin_port=admin_port or free_port(),
        secret=SECRET,
        workers=workers,
    )
    return path


def assert_cannot_listen(cfg: Path, key: str = "server.listen") -> str:
    """`sidecar run` on `cfg` exits 1 at once with one clear line naming the listener (`key` and its address), no
    traceback; its output."""
    code, out = run_to_exit(cfg)
    assert code == 1 and f"sidecar: cannot listen: {key} '127.0.0.1:" in out and "Traceback" not in out, out
    return out


async def test_a_second_sidecar_on_a_taken_inbound_port_exits_instead_of_sharing_it(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    _, port = start_sidecar(
        tmp_path / "first.yaml", processes, redis_url=redis_url, upstream_url=upstream.url, secret=SECRET
    )
    assert_cannot_listen(config(tmp_path / "second.yaml", upstream, redis_url, port))


async def test_a_taken_admin_port_stops_the_start_before_the_inbound_port_takes_a_webhook(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = free_port()
        cfg = config(tmp_path / "sidecar.yaml", upstream, redis_url, port, taken.getsockname()[1])
        # before: it served webhooks on `port` and hung, deaf to SIGTERM
        out = assert_cannot_listen(cfg, "admin.listen")
    assert "Unclosed" not in out, out  # what was set up is closed
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_bad_log_level_is_a_usage_error_and_a_bad_environment_level_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.cli import main
    from sidecar.logs import setup_logging

    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "bogus", "check-config", str(tmp_path / "none.yaml")])
    assert exit_.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    monkeypatch.setenv("SIDECAR_LOG_LEVEL", "loud")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging("warning", stream=sys.stderr)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "SIDECAR_LOG_LEVEL='loud' is not one of debug, info, warning, error; using warning" in (
        capsys.readouterr().err
    )


async def test_a_second_multi_worker_sidecar_on_a_taken_port_exits_instead_of_joining_it(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """`server.workers: N` binds with SO_REUSEPORT, which any other SO_REUSEPORT socket of the same user may join:
    a second multi-worker sidecar must find the port taken before it starts its workers."""
    port = free_port()
    first = SidecarProcess(config(tmp_path / "first.yaml", upstream, redis_url, port, workers=2))
    processes.append(first)
    first.start(port)
    assert_cannot_listen(config(tmp_path / "second.yaml", upstream, redis_url, port, workers=2))
    assert first.proc is not None and first.proc.poll() is None  # the first serves on


async def test_a_port_0_listener_logs_the_port_it_got(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """`server.listen: 127.0.0.1:0` is valid (the kernel picks a port); the log said "listening on 127.0.0.1:0",
    which named no port anyone could use."""
    cfg = config(tmp_path / "sidecar.yaml", upstream, redis_url, 0)
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.spawn()
    deadline = time.monotonic() + 20
    while "sidecar listening on" not in proc.log() and time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log()
        await asyncio.sleep(0.1)
    [port] = re.findall(r"sidecar listening on 127\.0\.0\.1:(\d+) \(admin 127\.0\.0\.1:\d+\)", proc.log())
    assert int(port) != 0
    with socket.create_connection(("127.0.0.1", int(port)), timeout=2):
        pass
