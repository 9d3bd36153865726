"""`sidecar run` and its listeners: a port another process holds stops the start, cleanly and at once, before
any webhook is taken (a single process does not share its inbound port; only `server.workers` siblings do)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Upstream
from tests.procs import SidecarProcess, free_port, start_sidecar, write_config
from tests.test_crash import SECRET

pytestmark = pytest.mark.slow


def run_to_exit(cfg: Path, timeout: float = 30) -> tuple[int, str]:
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


async def test_a_second_sidecar_on_a_taken_inbound_port_exits_instead_of_sharing_it(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    _, port = start_sidecar(
        tmp_path / "first.yaml", processes, redis_url=redis_url, upstream_url=upstream.url, secret=SECRET
    )
    second = tmp_path / "second.yaml"
    write_config(
        second,
        redis_url=redis_url,
        upstream_url=upstream.url,
        port=port,
        admin_port=free_port(),
        secret=SECRET,
    )
    code, out = run_to_exit(second)
    assert code == 1 and "sidecar: cannot listen" in out and "Traceback" not in out, out


async def test_a_taken_admin_port_stops_the_start_before_the_inbound_port_takes_a_webhook(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = free_port()
        cfg = tmp_path / "sidecar.yaml"
        write_config(
            cfg,
            redis_url=redis_url,
            upstream_url=upstream.url,
            port=port,
            admin_port=taken.getsockname()[1],
            secret=SECRET,
        )
        code, out = run_to_exit(cfg)  # before: it served webhooks on `port` and hung, deaf to SIGTERM
    assert code == 1 and "sidecar: cannot listen" in out and "Traceback" not in out, out
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
    port, admin = free_port(), free_port()
    for name in ("first", "second"):
        write_config(
            tmp_path / f"{name}.yaml",
            redis_url=redis_url,
            upstream_url=upstream.url,
            port=port,
            admin_port=admin if name == "first" else free_port(),
            secret=SECRET,
        )
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(cfg.read_text().replace("shutdown_grace: 1s}", "shutdown_grace: 1s, workers: 2}"))
    first = SidecarProcess(tmp_path / "first.yaml")
    processes.append(first)
    first.start(port)
    code, out = run_to_exit(tmp_path / "second.yaml")
    assert code == 1 and "sidecar: cannot listen" in out and "Traceback" not in out, out
    assert first.proc is not None and first.proc.poll() is None  # the first serves on
