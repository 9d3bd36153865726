"""`server.workers: N`: worker 0 serves /metrics for every worker.

Counters and histograms live in each process's memory. Every other worker answers its own (`Telemetry.state`) on a
Unix socket in a directory the supervisor made for this run (PEERS_ENV, mode 0700), and worker 0 fetches them for
each scrape and adds them to its own (`PeerCounts`). The sums must never go down, or Prometheus reads a reset and
counts every worker's whole total as new: a worker that misses a scrape is counted with its last answer, and the
last answer of a worker process the supervisor replaced stays in the sums (what it counted after that answer is
gone with it, as for any process that dies between two scrapes). Worker 0 itself may be replaced too: after each
scrape it writes what the sums hold (its own counts as rendered, or later, and what it keeps of the others) to a
file in the same directory, and its replacement starts from that file, its predecessor's counts retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.supervisor import PARENT_ENV, PEERS_ENV, supervisor_gone
from sidecar.telemetry import State, Telemetry, add_states

__all__ = ["PEERS_ENV", "PeerCounts", "fetch_states", "leave_peers_dir", "serve_state"]

log = logging.getLogger("sidecar.peers")

FETCH_TIMEOUT = 1.0  # per worker, all at once: a scrape waits at most this long for the others


def socket_path(peers_dir: str, index: int) -> Path:
    return Path(peers_dir) / f"worker-{index}.sock"


async def serve_state(telemetry: Telemetry, peers_dir: str, index: int) -> web.AppRunner | None:
    """Answer `GET /state` with this worker's counters on its socket in `peers_dir`. None when the socket cannot be
    made (the directory gone, a path too long): the worker serves all the same, its counts missing from /metrics."""

    async def state(_: web.Request) -> web.Response:
        return web.json_response(telemetry.state())

    app = web.Application()
    app.router.add_get("/state", state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    path = socket_path(peers_dir, index)
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this worker's previous process (the supervisor restarted it)
        await web.UnixSite(runner, str(path)).start()
    except OSError as exc:
        await runner.cleanup()
        log.warning(
            "worker %d: its counts will be missing from /metrics: cannot listen on %s: %s", index, path, exc
        )
        return None
    return runner


async def fetch_states(peers_dir: str, own: int = 0) -> dict[str, State]:
    """Every other worker's `state()` by socket name; a worker that does not answer in FETCH_TIMEOUT is left out."""
    paths = sorted(p for p in Path(peers_dir).glob("worker-*.sock") if p != socket_path(peers_dir, own))

    async def one(path: Path) -> State | None:
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

    states = await asyncio.gather(*(one(p) for p in paths))
    return {path.name: state for path, state in zip(paths, states, strict=True) if state is not None}


CARRY_NAME = "worker-0.carry.json"
OWN = "worker-0.sock"  # worker 0's own counts, once retired (no socket of that name is ever served)


class PeerCounts:
    """What worker 0 adds to its own counts: each other worker's last answer, plus the final answers of worker
    processes that were replaced (a new pid behind the same socket), worker 0's own predecessors included."""

    def __init__(self, peers_dir: str) -> None:
        self.peers_dir = peers_dir
        self._last: dict[str, State] = {}
        self._retired: dict[str, State] = {}
        self._carry = Path(peers_dir) / CARRY_NAME
        self._take_over()

    def _take_over(self) -> None:
        """Start from the file the worker 0 before this one left (the supervisor replaced it), if any."""
        try:
            saved = json.loads(self._carry.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(saved, dict):
            return
        last, retired, own = saved.get("last"), saved.get("retired"), saved.get("own")
        self._last = {k: v for k, v in last.items() if isinstance(v, dict)} if isinstance(last, dict) else {}
        if isinstance(retired, dict):
            self._retired = {k: v for k, v in retired.items() if isinstance(v, dict)}
        if isinstance(own, dict) and own.get("pid") != os.getpid():
            self._retired[OWN] = add_states(self._retired.get(OWN, {}), own)

    def remember(self, own: State) -> None:
        """After a scrape rendered: `own` (this process's counts, taken after the render, so no lower than what it
        showed) and what is kept of the others, for a replacement of this process to start from."""
        data = {"own": own, "last": self._last, "retired": self._retired}
        tmp = self._carry.with_name(CARRY_NAME + ".tmp")
        try:
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self._carry)
        except (OSError, TypeError, ValueError) as exc:
            log.debug("metrics: cannot keep the sums for a replacement of worker 0: %s", exc)

    async def states(self) -> list[State]:
        for name, state in (await fetch_states(self.peers_dir)).items():
            before = self._last.get(name)
            if before is not None and before.get("pid") != state.get("pid"):
                self._retired[name] = add_states(self._retired.get(name, {}), before)
            self._last[name] = state
        return [*self._last.values(), *self._retired.values()]


def leave_peers_dir(peers_dir: str, index: int | None) -> None:
    """A worker that stops takes its socket with it. The directory is the supervisor's to remove, unless the
    supervisor is gone (SIGKILLed: its workers stop on PR_SET_PDEATHSIG); then the last worker out removes it."""
    if index:
        with contextlib.suppress(OSError):
            socket_path(peers_dir, index).unlink()
    if supervisor_gone(os.environ.get(PARENT_ENV, "")):
        # no worker 0 will be started again to read them
        # every file but the other workers' sockets (each takes its own): the counters, the supervisor's lock and
        # the config copies, secrets and all (a list of names missed the one reloads applied: it stayed behind)
        # (the listing itself may fail: another worker removed the directory meanwhile; a FileNotFoundError out of
        # the glob was a worker's critical exit, a soak)
        with contextlib.suppress(OSError):
            for path in Path(peers_dir).glob("*"):
                if path.suffix != ".sock":
                    with contextlib.suppress(OSError):
                        path.unlink()
        with contextlib.suppress(OSError):  # not empty yet (another worker still runs), or gone already
            Path(peers_dir).rmdir()
