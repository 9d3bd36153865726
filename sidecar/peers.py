"""`server.workers: N`: worker 0 serves /metrics for every worker.

Counters and histograms live in each process's memory. Every other worker answers its own (`Telemetry.state`) on a
Unix socket in a directory the supervisor made for this run (PEERS_ENV, mode 0700), and worker 0 fetches them for
each scrape and adds them to its own. A worker that is restarting has no answer for a moment: that scrape lacks its
counts, and Prometheus treats the dip as a counter reset, as it does for any restarted process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.supervisor import PEERS_ENV
from sidecar.telemetry import Telemetry

__all__ = ["PEERS_ENV", "fetch_states", "leave_peers_dir", "serve_state"]

log = logging.getLogger("sidecar.peers")

FETCH_TIMEOUT = 1.0  # per worker, all at once: a scrape waits at most this long for the others


def socket_path(peers_dir: str, index: int) -> Path:
    return Path(peers_dir) / f"worker-{index}.sock"


async def serve_state(telemetry: Telemetry, peers_dir: str, index: int) -> web.AppRunner:
    """Answer `GET /state` with this worker's counters on its socket in `peers_dir`."""

    async def state(_: web.Request) -> web.Response:
        return web.json_response(telemetry.state())

    app = web.Application()
    app.router.add_get("/state", state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    path = socket_path(peers_dir, index)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by this worker's previous process (the supervisor restarted it)
    await web.UnixSite(runner, str(path)).start()
    return runner


async def fetch_states(peers_dir: str, own: int = 0) -> list[dict[str, Any]]:
    """Every other worker's `state()`; a worker that does not answer in FETCH_TIMEOUT is left out."""
    paths = sorted(p for p in Path(peers_dir).glob("worker-*.sock") if p != socket_path(peers_dir, own))

    async def one(path: Path) -> dict[str, Any] | None:
        try:
            connector = aiohttp.UnixConnector(path=str(path))
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get("http://worker/state") as resp,
            ):
                found = await resp.json()
                return found if isinstance(found, dict) else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.debug("metrics: no counts from %s: %s", path.name, exc)
            return None

    return [state for state in await asyncio.gather(*(one(p) for p in paths)) if state is not None]


def leave_peers_dir(peers_dir: str, index: int | None) -> None:
    """A worker that stops takes its socket with it, and the last one out the directory: a supervisor SIGKILLed
    (its workers then stop on PR_SET_PDEATHSIG) cannot remove it itself."""
    if index:
        with contextlib.suppress(OSError):
            socket_path(peers_dir, index).unlink()
    with contextlib.suppress(OSError):  # not empty yet (another worker still runs), or gone already
        Path(peers_dir).rmdir()
