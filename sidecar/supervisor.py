"""`server.workers: N` — N serving processes on one port (SO_REUSEPORT), each with its own event loop, client
session and retry worker; one embedded store for all, started by this parent.

The parent only supervises: it starts the children (`sidecar run --worker-index i`, the store's URL in
$SIDECAR_STORE_URL), passes SIGTERM/SIGINT/SIGHUP on to them, restarts a child that dies unexpectedly (at most
`MAX_RESTARTS` a minute, so a child that cannot start does not spin), and on shutdown waits for every child to
drain. Worker 0 also serves the admin listener; the others serve webhooks only. A parent that dies without that
(SIGKILL, a crash) takes its children with it: each gets SIGTERM from the kernel and drains (`follow_parent`),
instead of serving on with no supervisor beside a new sidecar's workers on the same port.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("sidecar.supervisor")

MAX_RESTARTS = 5
START_CONFIG_NAME = "start-config.yaml"  # in the peers dir: the config every worker starts from
APPLIED_CONFIG_NAME = "applied-config.yaml"  # in the peers dir: the config a worker's reload applied last
PARENT_ENV = "SIDECAR_SUPERVISOR_PID"  # set for each child: the supervisor it must not outlive
PEERS_ENV = "SIDECAR_PEERS_DIR"  # the directory of the workers' counter sockets (sidecar/peers.py)
# the peers dir's name in the temporary dir: the prefix, then the supervisor's pid (to tell a dir left behind)
PEERS_PREFIX = "sidecar-workers-"
# in the peers dir: held locked (flock) by its supervisor for as long as it runs; a lock works across PID namespaces
# (containers sharing /tmp), a pid does not
LOCK_NAME = "supervisor.lock"
# The store URL for each child: in its environment, not on its command line (a redis.url may carry a password, and
# every local user can read a process's command line with `ps`; its environment is the owner's only)
STORE_URL_ENV = "SIDECAR_STORE_URL"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def claim_ports(*listens: tuple[str, int]) -> None:
    """Fail (OSError) if another process listens on one of these ports. The workers bind with SO_REUSEPORT, which
    the kernel lets any other SO_REUSEPORT socket of the same user join: without this look, a second sidecar's
    workers would share the port with the first's in silence (each with its own store: duplicate deliveries).
    A socket bound without SO_REUSEPORT cannot share it, so one bound and closed here says the port is free."""
    for host, port in listens:
        for family, kind, proto, _, addr in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
                probe.bind(addr)


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/`pid`/stat after the command name (state, parent pid, …); None when it cannot be read
    (gone, not ours to look at, no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 1 else None


def process_state(pid: int | str) -> str | None:
    """The state letter of process `pid` (`R`, `S`, `Z` for exited and not yet reaped, …); None when unknown."""
    fields = _stat(pid)
    return fields[0] if fields else None


def process_parent(pid: int | str) -> int | None:
    """The parent pid of process `pid`; None when unknown."""
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def supervisor_gone(parent: str) -> bool:
    """Is the supervisor (pid `parent`) gone? Not only when this process was handed to another parent: a supervisor
    SIGKILLed with a thread still running (the embedded store's watcher) is a zombie while its threads exit, and
    its children, handed to one of those threads meanwhile, still see its pid as their parent's."""
    if str(os.getppid()) != parent:
        return True
    state = process_state(parent)
    if state is None:
        return not sys.platform.startswith("linux")  # no /proc entry on Linux: gone; elsewhere: cannot tell
    return state in ("Z", "X")


def follow_parent() -> None:
    """In a worker: ask the kernel for SIGTERM when the supervisor dies (Linux), and stop at once if it already
    has. Does nothing in a process not started by a supervisor."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the supervisor: %s", os.strerror(ctypes.get_errno()))
    if supervisor_gone(parent):  # it died before the request above was in place
        log.error("the supervisor (pid %s) is gone: stopping", parent)
        raise SystemExit(1)


def _answers(path: Path) -> bool:
    """Does a process listen on the Unix socket at `path`?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: running
        return True
    return True


def _locked(path: Path) -> bool:
    """Does a running supervisor (in any PID namespace) hold the lock at `path`? No lock file in a dir made in the
    last minute: a supervisor about to make it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        try:
            return time.time() - path.parent.stat().st_mtime < 60
        except OSError:
            return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_peers_dirs(tmp: str | None = None) -> list[Path]:
    """Remove the peers dirs that sidecars killed outright with all their workers left behind (SIGKILL of the whole
    group, the OOM killer): each holds a copy of the config, secrets and all. Only this user's, only those whose
    supervisor (the pid in the name) is not running and on whose counter sockets no worker answers (another
    container sharing this temporary dir has its own pids). The paths removed."""
    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(PEERS_PREFIX + "*"):
        pid = path.name[len(PEERS_PREFIX) :].split("-", 1)[0]
        try:
            info = path.lstat()
        except OSError:
            continue
        if (
            # a name without a pid: an older sidecar's, whose supervisor there is no telling of
            not (pid.isascii() and pid.isdigit() and int(pid) < 2**31)
            or not stat.S_ISDIR(info.st_mode)
            or info.st_uid != os.geteuid()
            or _running(int(pid))
            or _locked(path / LOCK_NAME)
            or any(_answers(sock) for sock in path.glob("worker-*.sock"))
        ):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: those its CPU affinity allows (`taskset`, a pinned Kubernetes CPU set), and
    no more than its cgroup's CPU quota rounded up (a container's CPU limit); not the host's core count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 limit to read
        pass
    return max(1, cores)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else usable_cores()


class Supervisor:
    def __init__(
        self,
        config_path: str,
        redis_url: str,
        workers: int,
        grace: float,
        log_level: str | None,
        config_text: str,
    ) -> None:
        self.config_path = config_path
        self.redis_url = redis_url
        self.workers = workers
        self.grace = grace
        self.log_level = log_level
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._restarts: deque[float] = deque()
        self._stopping = False
        self._signal: int | None = None
        # where the workers answer their counters for worker 0's /metrics (sidecar/peers.py); 0700, this run's own
        self.peers_dir = tempfile.mkdtemp(prefix=f"{PEERS_PREFIX}{os.getpid()}-")
        # held for this process's life (closed on exec: the workers do not hold it); locked before it has its
        # name, so a sweep never finds it unlocked (until then: a young dir without one, which the sweep spares)
        unnamed = os.path.join(self.peers_dir, LOCK_NAME + ".new")
        self._lock = os.open(unnamed, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.rename(unnamed, os.path.join(self.peers_dir, LOCK_NAME))
        # The config this sidecar started with: every worker, a restarted one too, starts from it (restart-only
        # settings the same in all, a broken file no reason to stop) and then reloads the current file.
        self.start_config = os.path.join(self.peers_dir, START_CONFIG_NAME)
        fd = os.open(self.start_config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(config_text)

    def _command(self, index: int) -> list[str]:
        cmd = [sys.executable, "-m", "sidecar"]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        return [
            *cmd,
            "run",
            "--config",
            self.config_path,
            "--worker-index",
            str(index),
            "--start-config",
            self.start_config,
        ]

    def _spawn(self, index: int) -> None:
        env = {
            **os.environ,
            PARENT_ENV: str(os.getpid()),
            PEERS_ENV: self.peers_dir,
            STORE_URL_ENV: self.redis_url,
        }
        # The child starts with SIGHUP blocked (a mask outlives exec), so one passed on while it is still starting
        # cannot kill it before its reload handler is set: sidecar/__main__.py ignores it, then unblocks it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.children[index] = subprocess.Popen(self._command(index), env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("worker %d started (pid %d)", index, self.children[index].pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            for child in self.children.values():
                child.send_signal(signal.SIGHUP)
            return
        self._stopping = True
        self._signal = signum

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for index in range(self.workers):
            self._spawn(index)
        try:
            while not self._stopping:
                time.sleep(0.2)
                for index, child in list(self.children.items()):
                    code = child.poll()
                    if code is None or self._stopping:
                        continue
                    if not self._may_restart():
                        log.error("worker %d exited with %s; too many restarts, stopping", index, code)
                        self._stopping = True
                        break
                    log.error("worker %d exited with %s; restarting it", index, code)
                    self._spawn(index)
        finally:
            self._shutdown()
        return 0 if self._signal is not None else 1

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > 60:
            self._restarts.popleft()
        self._restarts.append(now)
        return len(self._restarts) <= MAX_RESTARTS

    def _shutdown(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 5
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)
        shutil.rmtree(self.peers_dir, ignore_errors=True)
