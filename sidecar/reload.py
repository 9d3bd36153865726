"""Hot reload: on SIGHUP, and when the config file or any `secret_files` entry changes.

Change detection reads the files' contents (they are small) rather than trusting mtimes: Kubernetes updates a
mounted ConfigMap or Secret by swapping a `..data` symlink to a new directory, which leaves the path's own mtime
meaningless; comparing a digest of what the path resolves to catches every form of update.

A new config is loaded and fully built (verifiers included) before anything is swapped. A bad one is refused:
logged, counted (`sidecar_config_reloads_total{result="rejected"}`) and the old config keeps serving.

Routes, secrets and retry settings follow the swap, and so do the keys in APPLIED_LIVE (read from the dispatcher's
config on every use). The keys in RESTART_ONLY are read once at start (listeners, the store client, the upstream
session, the logging setup): a reload that changes one is reported as waiting for a restart. That comparison is
against the values the process started with, not the last file loaded: a file put back to the running values
needs no restart, and a pending change is named again at every reload until the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sidecar.config import Config, RouteConfig, load_text, load_with_text, redact_url
from sidecar.errors import ConfigError, causes
from sidecar.routes import RouteTable

log = logging.getLogger("sidecar.reload")

# Read once at start; a dotted prefix covers every key under it. Where each is read: server.listen and
# server.workers by the listeners and the supervisor, server.shutdown_grace by the SIGTERM handler (cli.py) and the
# shutdown steps (Runtime.grace_left); admin.* by the admin listener and its token check (the config started with);
# redis.*, dedupe.ttl and dlq.max_length by the store client made at start; upstream.timeout, max_connections and
# breaker by the forwarder, its connection pool and the circuit breakers made at start; logging.level/format by
# the logging setup.
RESTART_ONLY = (
    "server.listen",
    "server.workers",
    "server.shutdown_grace",
    "admin",
    "redis",
    "dedupe",
    "dlq",
    "upstream.timeout",
    "upstream.max_connections",
    "upstream.breaker",
    "logging.level",
    "logging.format",
)
# Read from the live config on each use (the front, the ingress, the dispatcher, this reloader), so a reload applies
# them at once. server.read_timeout: the front and the ingress use the new value for every request; only the idle
# timeout of a keep-alive connection already handed to aiohttp's server (not the front) stays as started.
APPLIED_LIVE = (
    "server.max_body_bytes",
    "server.max_inflight_bytes",
    "server.read_timeout",
    "server.reload_interval",
    "upstream.url",
    "retry",
    "logging.requests",
)


def _digest(paths: list[str], loaded: str | None = None, files: Mapping[str, str] | None = None) -> str:
    """A digest of what `paths` hold, the config file first (`watched_files`), read as text as the loader reads it
    (newlines made \\n); `loaded`, the text a running config was built from, stands for the file's content: an
    edit made after that text was read is then a change still to take."""
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        h.update(path.encode() + b"\x00")
        try:
            if not regular_or_missing(path):
                # a pipe (`--config <(…)`), a FIFO or a device: read again it would block, or give nothing (a
                # reload refused for an empty config); not watched
                h.update(b"<not a regular file>")
            elif i:
                # a secret file: the digest of what was loaded from it, if known (`files`), else of it now
                known = files.get(path) if files else None
                h.update((known or hashlib.sha256(Path(path).read_bytes()).hexdigest()).encode())
            else:
                text = loaded if loaded is not None else Path(path).read_text("utf-8", "surrogateescape")
                h.update(text.encode("utf-8", "surrogateescape"))
        except OSError as exc:
            if exc.errno in CANNOT_LOOK_NOW:
                raise  # this process is out of descriptors or memory: not a change of the file (see `_look`)
            h.update(f"<unreadable: {exc.errno}>".encode())
        h.update(b"\x00")
    return h.hexdigest()


# Errors that say something about this process, not about the file: a look that fails with one is not a change
CANNOT_LOOK_NOW = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def _out_of(exc: BaseException) -> str | None:
    """The words of the CANNOT_LOOK_NOW error behind `exc` (what it was raised from), if there is one."""
    for seen in causes(exc):
        if isinstance(seen, OSError) and seen.errno in CANNOT_LOOK_NOW:
            return seen.strerror or str(seen)
    return None


def regular_or_missing(path: str) -> bool:
    """False only for a path that exists and is not a regular file (a missing one is the loader's to report), or
    that names a process's own descriptor (`--config <(…)`: /dev/fd/63 is not there at all in a worker)."""
    if path.startswith(("/dev/fd/", "/proc/self/fd/", "/dev/stdin")):
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def watched_files(config_path: str, config: Config) -> list[str]:
    return [config_path, *sorted({f for r in config.routes for f in r.secret_files})]


@dataclasses.dataclass(frozen=True, slots=True)
class _Hidden:
    """A setting kept out of reprs (`admin.token`): compared like its value, named in logs but never shown."""

    value: Any = dataclasses.field(repr=False)


def settings(config: Any, keys: Iterable[str]) -> dict[str, Any]:
    """`{dotted key: value}` for `keys`, a section or a nested group expanded to its leaves (`redis.url`, …);
    fields kept out of reprs (secrets, the admin token) are `_Hidden`."""
    out: dict[str, Any] = {}

    def walk(key: str, value: Any, hidden: bool = False) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                if f.init:  # host/port are derived from listen
                    walk(f"{key}.{f.name}", getattr(value, f.name), hidden or not f.repr)
        else:
            out[key] = _Hidden(value) if hidden else value

    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        walk(key, value)
    return out


def route_changes(old: Config, new: Config) -> list[str]:
    """What a reload does to the routes: added, removed, and each changed setting of the others (secrets and
    signature settings named, never shown)."""
    before = {r.name: r for r in old.routes}
    after = {r.name: r for r in new.routes}
    out = []
    if added := [name for name in after if name not in before]:
        out.append("routes added: " + ", ".join(added))
    if removed := [name for name in before if name not in after]:
        out.append("routes removed: " + ", ".join(removed))
    fields = [f.name for f in dataclasses.fields(RouteConfig) if f.name != "name"]
    for name, route in after.items():
        if name in before and before[name] != route:
            follows_global = before[name].retry == old.retry and route.retry == new.retry
            keys = [f for f in fields if f != "retry" or not follows_global]  # said once, as `retry.*`
            was, now = settings(before[name], keys), settings(route, keys)
            for key in ("secrets", "secret_files", "signature"):  # named only, whatever their form
                was[key], now[key] = _Hidden(was.get(key)), _Hidden(now.get(key))
            if differ := changed(was, now):  # none: only the global retry changed under it, said once
                out.append(f"route {name}: " + describe(differ, was, now, "was "))
    return out


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in new if old.get(k) != new[k]]


_QUERY_VALUE = re.compile(r"([?&][^=&#]*=)[^&#]*")


def describe(keys: Iterable[str], old: Mapping[str, Any], new: Mapping[str, Any], was: str = "") -> str:
    """`server.workers (running 1, new 4), admin.token`: values shown, but not secrets, nor URLs' passwords or query
    values (an upstream URL may carry `?token=`)."""

    def shown(value: Any) -> str:
        if isinstance(value, str) and "://" in value:
            value = _QUERY_VALUE.sub(r"\1***", redact_url(value))
        return repr(value)

    return ", ".join(
        k if isinstance(new[k], _Hidden) else f"{k} ({was}{shown(old.get(k))}, new {shown(new[k])})"
        for k in keys
    )


class Reloader:
    def __init__(
        self,
        config_path: str,
        dispatcher: Any,
        telemetry: Any,
        interval: float = 1.0,
        loaded_text: str | None = None,
        applied_path: str | None = None,
    ) -> None:
        self.path = config_path
        # `server.workers: N`: where each applied config's text is kept (in the supervisor's peers dir), for a
        # restarted worker whose file does not load to take what its siblings run, not the start-up config
        self.applied_path = applied_path
        self.dispatcher = dispatcher
        self.tel = telemetry
        self.interval = interval
        # What this process runs with for the restart-only keys: the config it started with.
        self.running = settings(dispatcher.config, RESTART_ONLY)
        self._files = watched_files(config_path, dispatcher.config)
        # the text the running config was built from, not the file as it is now: an edit made while the process
        # was starting (after the file was read) must still be taken as a change
        self._seen = _digest(self._files, loaded_text, dispatcher.config.file_digests)
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._cannot_look = False  # the last look failed for lack of descriptors (or memory)

    async def reload(self, reason: str, text: str | None = None) -> bool:
        """Load, validate and swap in the config at `path` (or `text`: the config the sibling workers applied, for
        a restarted worker whose file is refused). True when the new config is serving."""
        async with self._lock:
            before = self._seen
            self._seen = self._look() or self._seen
            from_file = text is None
            if from_file and not regular_or_missing(self.path):
                # a pipe (`--config <(…)`) read again gives nothing, and a FIFO with no writer blocks its reader
                # thread for good (and the shutdown, which waits for it)
                self.tel.config_reloads["rejected"] += 1
                log.error(
                    "config reload (%s) refused, the previous config keeps serving: %s is not a regular file (a "
                    "pipe or FIFO is read once, at start); restart the sidecar to change its config",
                    reason,
                    self.path,
                )
                return False
            try:
                if text is None:
                    config, text = await asyncio.to_thread(load_with_text, self.path)
                else:
                    config = await asyncio.to_thread(load_text, text, self.path)
                table = RouteTable.build(config)
            except Exception as exc:
                if (short := _out_of(exc)) is None:
                    return self._refused(reason, exc)
                # this process out of descriptors (or memory) while reading the file or a secret: not a refusal of
                # the config; the next look takes the change again
                self._seen = before
                log.warning(
                    "config reload (%s) put off: cannot read now (%s); trying again later", reason, short
                )
                return False
            self._report(reason, self.dispatcher.config, config)
            self.dispatcher.swap(table)
            self.interval = config.server.reload_interval
            self._files = watched_files(self.path, config)
            if from_file:
                # an edit since the read is still to be taken
                with contextlib.suppress(OSError):  # out of descriptors: the next look reloads once more
                    self._seen = _digest(self._files, text, config.file_digests)
                assert text is not None  # read with the config above (mypy loses it across the try)
                self._keep_applied(text)
            else:  # the file stays refused until it changes again
                self._seen = self._look() or self._seen
            self.tel.config_reloads["applied"] += 1
            log.info("config reloaded (%s): %d route(s)", reason, len(config.routes))
            return True

    def _keep_applied(self, text: str) -> None:
        if self.applied_path is None:
            return
        part = f"{self.applied_path}.{os.getpid()}"
        try:
            Path(part).write_text(text, encoding="utf-8")
            os.replace(part, self.applied_path)  # whole or not at all, whichever worker writes last
        except OSError as exc:
            log.warning("cannot keep the applied config for restarted workers: %s", exc)

    def applied(self) -> str | None:
        """The text of the config a sibling worker applied last, if any."""
        if self.applied_path is None:
            return None
        try:
            return Path(self.applied_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def _report(self, reason: str, old: Config, new: Config) -> None:
        """Say which settings outside the routes changed, and whether each applies now or at the next restart."""
        restart_new = settings(new, RESTART_ONLY)
        waiting = changed(self.running, restart_new)
        if waiting:
            log.warning(
                "config reload (%s): restart needed for %s; the running values stay until then",
                reason,
                describe(waiting, self.running, restart_new, "running "),
            )
        if "redis.shards" in waiting:
            # the restart it asks for would be refused: the store's keys were written with the running count
            log.error(
                "config reload (%s): a sidecar started with redis.shards %s refuses to start on this store, whose "
                "events were written with %s shards; to change it, stop the traffic, let the retry schedule and "
                "the dead letters drain and dedupe.ttl pass, then delete the key named at the refusal",
                reason,
                new.redis.shards,
                self.running["redis.shards"],
            )
        restart_old = settings(old, RESTART_ONLY)
        back = [k for k in changed(restart_old, restart_new) if k not in waiting]
        if back:
            log.info(
                "config reload (%s): %s back to the running values; no restart needed for them",
                reason,
                ", ".join(back),
            )
        live_old, live_new = settings(old, APPLIED_LIVE), settings(new, APPLIED_LIVE)
        applied = changed(live_old, live_new)
        if applied:
            log.info(
                "config reload (%s): applied now: %s", reason, describe(applied, live_old, live_new, "was ")
            )
        for line in route_changes(old, new):
            log.info("config reload (%s): %s", reason, line)

    def _refused(self, reason: str, exc: Exception) -> bool:
        self.tel.config_reloads["rejected"] += 1
        # a ConfigError lists its problems a line each; a verifier that cannot be built, an unreadable file: in a line
        sep = "\n" if isinstance(exc, ConfigError) else " "
        log.error("config reload (%s) refused, the previous config keeps serving:%s%s", reason, sep, exc)
        return False

    def _look(self) -> str | None:
        """The watched files' digest now, or None when this process cannot read them at the moment (out of file
        descriptors: `ulimit -n` reached under a flood of connections): that is no change of the files, and was
        taken for one, a reload refused (an error, counted as rejected) and then a second one, applied, once the
        descriptors came back, with the file never touched."""
        try:
            digest = _digest(self._files)
        except OSError as exc:
            if not self._cannot_look:
                log.warning(
                    "config watch: cannot read %s now (%s); looking again later",
                    self.path,
                    exc.strerror or exc,
                )
            self._cannot_look = True
            return None
        if self._cannot_look:
            log.info("config watch: %s can be read again", self.path)
            self._cannot_look = False
        return digest

    async def check(self) -> bool:
        """Reload if any watched file's content changed since the last look."""
        current = await asyncio.to_thread(self._look)
        if current is not None and current != self._seen:
            return await self.reload("file change")
        return False

    async def run(self) -> None:
        last = time.monotonic()
        while not self._stopping.is_set():
            # Woken at least once a second, so a reload that shortens server.reload_interval (say from 1h) is
            # followed within a second rather than after the old interval.
            wait = min(1.0, max(0.0, last + self.interval - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            if not self._stopping.is_set() and time.monotonic() - last >= self.interval:
                last = time.monotonic()
                await self.check()

    def stop(self) -> None:
        self._stopping.set()
