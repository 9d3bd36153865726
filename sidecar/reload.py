"""Hot reload: on SIGHUP, and when the config file or any `secret_files` entry changes.

Change detection reads the files' contents (they are small) rather than trusting mtimes: Kubernetes updates a
mounted ConfigMap or Secret by swapping a `..data` symlink to a new directory, which leaves the path's own mtime
meaningless; comparing a digest of what the path resolves to catches every form of update.

A new config is loaded and fully built (verifiers included) before anything is swapped. A bad one is refused:
logged, counted (`sidecar_config_reloads_total{result="rejected"}`) and the old config keeps serving. Settings
that only take effect at start (listen addresses, the store, the worker count) are reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sidecar.config import Config, load
from sidecar.errors import ConfigError
from sidecar.routes import RouteTable

log = logging.getLogger("sidecar.reload")

RESTART_ONLY = ("server", "admin", "redis", "dlq", "dedupe")


def _digest(paths: Iterable[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.encode() + b"\x00")
        try:
            h.update(Path(path).read_bytes())
        except OSError as exc:
            h.update(f"<unreadable: {exc.errno}>".encode())
        h.update(b"\x00")
    return h.hexdigest()


def watched_files(config_path: str, config: Config) -> list[str]:
    return [config_path, *sorted({f for r in config.routes for f in r.secret_files})]


class Reloader:
    def __init__(self, config_path: str, dispatcher: Any, telemetry: Any, interval: float = 1.0) -> None:
        self.path = config_path
        self.dispatcher = dispatcher
        self.tel = telemetry
        self.interval = interval
        self._files = watched_files(config_path, dispatcher.config)
        self._seen = _digest(self._files)
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap in the config at `path`. True when the new config is serving."""
        async with self._lock:
            self._seen = _digest(self._files)
            try:
                config = await asyncio.to_thread(load, self.path)
                table = RouteTable.build(config)
            except ConfigError as exc:
                self.tel.config_reloads["rejected"] += 1
                log.error("config reload (%s) refused, the previous config keeps serving:\n%s", reason, exc)
                return False
            except Exception as exc:  # a verifier that cannot be built, an unreadable file: same rule
                self.tel.config_reloads["rejected"] += 1
                log.error("config reload (%s) refused, the previous config keeps serving: %s", reason, exc)
                return False
            old = self.dispatcher.config
            for section in RESTART_ONLY:
                if getattr(old, section) != getattr(config, section):
                    log.warning(
                        "config reload (%s): '%s' changed; it takes effect at the next restart",
                        reason,
                        section,
                    )
            self.dispatcher.table = table
            self._files = watched_files(self.path, config)
            self._seen = _digest(self._files)
            self.tel.config_reloads["applied"] += 1
            log.info("config reloaded (%s): %d route(s)", reason, len(config.routes))
            return True

    async def check(self) -> bool:
        """Reload if any watched file's content changed since the last look."""
        current = await asyncio.to_thread(_digest, self._files)
        if current != self._seen:
            return await self.reload("file change")
        return False

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            if not self._stopping.is_set():
                await self.check()

    def stop(self) -> None:
        self._stopping.set()
