"""server.workers: N serving processes share the port, one store; the supervisor restarts a dead one and drains
them all on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.store.embedded import _servers_in
from sidecar.supervisor import process_state
from tests.conftest import REPO, Upstream, process_children
from tests.procs import SidecarProcess, free_port, write_config
from tests.test_crash import SECRET
from tests.test_reliability import post_all

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    return sorted(process_children().get(pid, []))


async def scrape(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
    ):
        text = await resp.text()
    return {
        (
            sample.name,
            tuple(sorted((k, v) for k, v in sample.labels.items() if not k.startswith("otel_scope"))),
        ): (sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def start_two_workers(
    tmp_path: Path, upstream: Upstream, processes: list[Any], expected_children: int, **config: Any
) -> tuple[SidecarProcess, int]:
    """`sidecar run` with `server.workers: 2` on a free port, once its children (workers, and an embedded store)
    are up or 20 s have passed: the process and its port."""
    port, cfg = free_port(), tmp_path / "sidecar.yaml"
    write_config(cfg, upstream_url=upstream.url, port=port, secret=SECRET, workers=2, **config)
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    assert proc.proc is not None
    deadline = time.monotonic() + 20
    while len(children(proc.proc.pid)) < expected_children and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return proc, port


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def test_workers_two_processes_share_the_port_and_supervise(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: Any, processes: list[Any]
) -> None:
    admin_port = free_port()
    parent, port = await start_two_workers(
        tmp_path, upstream, processes, 2, redis_url=redis_url, admin_port=admin_port
    )
    assert parent.proc is not None
    kids = children(parent.proc.pid)
    assert len(kids) == 2
    before = {pid: cpu_ticks(pid) for pid in kids}
    # the store's URL (it may carry a password) is in each worker's environment (owner-only), not on its command
    # line (any local user's `ps` shows that)
    for pid in kids:
        assert redis_url.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert f"SIDECAR_STORE_URL={redis_url}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(
            b"\0"
        )

    ids = [f"evt_w{i}" for i in range(600)]
    statuses = await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", ids, concurrency=64)
    assert set(statuses) == {200}
    assert sorted(upstream.ids()) == sorted(ids)  # every event once, whichever process took it
    assert all(cpu_ticks(pid) > before[pid] for pid in kids)  # both processes served
    # worker 0's /metrics counts every worker's requests (it counted its own alone, about half)
    metrics = await scrape(admin_port)
    assert metrics[("sidecar_requests_total", (("outcome", "forwarded"), ("route", "stripe")))] == 600
    assert metrics[("sidecar_forward_duration_seconds_count", (("route", "stripe"),))] == 600
    # the test store runs without AOF: one process of the two says so, not each
    assert parent.log().count("appendonly is off") == 1, parent.log()

    # A worker that dies is replaced.
    os.kill(kids[1], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = children(parent.proc.pid)
        if len(now) == 2 and kids[1] not in now:
            break
        await asyncio.sleep(0.1)
    assert len(children(parent.proc.pid)) == 2 and kids[1] not in children(parent.proc.pid)
    body_ids = ["evt_after_restart"]
    assert await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", body_ids) == [200]

    # One that stops cleanly is replaced as well: its socket goes, the counters' directory stays for the new one
    # (the last worker out used to remove it, and the replacement could then not start: 5 failures stopped all).
    one = await replace_worker(parent.proc.pid, 1, signal.SIGTERM, admin_port)
    assert len(children(parent.proc.pid)) == 2 and one not in children(parent.proc.pid)
    more = [f"evt_w2_{i}" for i in range(60)]
    assert set(await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", more, concurrency=16)) == {200}
    # The replaced processes' counts as last scraped stay in the sums (what one counted after the last scrape before
    # it went is gone with it, as for any process: here at most the one event sent between the two replacements).
    metrics = await scrape(admin_port)
    forwarded = metrics[("sidecar_requests_total", (("outcome", "forwarded"), ("route", "stripe")))]
    assert forwarded >= 600 + 60

    # Worker 0, which serves /metrics, is replaced too: the sums go on from where they were (they fell to about
    # what the other worker alone had counted, and Prometheus took that for a reset).
    await replace_worker(parent.proc.pid, 0, signal.SIGKILL, admin_port)
    after = await scrape(admin_port)
    assert after[("sidecar_requests_total", (("outcome", "forwarded"), ("route", "stripe")))] >= forwarded

    parent.proc.send_signal(signal.SIGTERM)
    assert parent.proc.wait(timeout=20) == 0
    assert children(parent.proc.pid) == []
    assert "worker 1 exited" in parent.log()


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def worker_pid(parent: int, index: int) -> int | None:
    found = [pid for pid in children(parent) if f"--worker-index\x00{index}\x00" in cmdline(pid) + "\x00"]
    return found[0] if found else None


async def replace_worker(parent: int, index: int, sig: int, admin_port: int) -> int:
    """Send `sig` to worker `index` and wait (bounded) until a new process has its place and /metrics answers
    again; the old pid."""
    old = worker_pid(parent, index)
    assert old is not None
    os.kill(old, sig)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = worker_pid(parent, index)
        if now is not None and now != old:
            with contextlib.suppress(OSError, aiohttp.ClientError, ValueError):
                if await scrape(admin_port):
                    return old
        await asyncio.sleep(0.2)
    raise AssertionError(f"worker {index} was not replaced")


def peers_dir_of(worker: int) -> Path:
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    (found,) = [Path(v.split(b"=", 1)[1].decode()) for v in environ if v.startswith(b"SIDECAR_PEERS_DIR=")]
    return found


async def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "workers serve on without their supervisor"


async def test_workers_stop_with_a_supervisor_killed_outright_and_the_next_start_owns_the_store(
    tmp_path: Path, upstream: Upstream, processes: list[Any]
) -> None:
    """A supervisor SIGKILLed (so it drains nothing) must not leave its workers serving on the port with no parent,
    nor its embedded store running on the data dir: the kernel sends each worker SIGTERM, and the next start stops
    the store left behind before starting one of its own on the same append-only file."""
    data = tmp_path / "data"
    # the store and two workers
    first, port = await start_two_workers(
        tmp_path, upstream, processes, 3, redis_url="embedded", admin_port=free_port(), data_dir=data
    )
    assert first.proc is not None
    cfg = first.config
    left: list[int] = []
    try:
        left = children(first.proc.pid)
        (store,) = _servers_in(data)
        workers = [pid for pid in left if pid != store]
        assert len(workers) == 2
        assert await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", ["evt_before"]) == [200]
        peers_dir = peers_dir_of(workers[0])
        assert peers_dir.is_dir()

        first.kill()
        await wait_gone(workers)
        assert not peers_dir.exists()  # the last worker out removed the counters' directory
        assert alive(store)  # a store outlives a SIGKILLed parent: nothing in Valkey can ask otherwise

        second = SidecarProcess(cfg)
        processes.append(second)
        second.start(port)
        assert not alive(store) and len(_servers_in(data)) == 1
        assert f"embedded valkey pid {store} is still running" in second.log()
        assert await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", ["evt_before", "evt_after"]) == [
            200,
            200,
        ]
        assert sorted(upstream.ids()) == [
            "evt_after",
            "evt_before",
        ]  # the first one a duplicate: its claim kept
        second.stop()
        assert second.proc is not None and second.proc.returncode == 0
        assert _servers_in(data) == []
    finally:
        for pid in [*left, *_servers_in(data)]:  # what a failing run may have left
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def wait_for_log(proc: SidecarProcess, text: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while proc.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not {count} times in the log: {proc.log()}"
        await asyncio.sleep(0.1)


async def post_on_fresh_connections(port: int, event_id: str, times: int) -> list[int]:
    """POST one event `times` times, each on a connection of its own (SO_REUSEPORT spreads connections, not
    requests, over the workers)."""
    from tests.test_crash import signed
    from tests.test_reliability import body_for

    statuses = []
    body = body_for(event_id)
    for _ in range(times):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(f"http://127.0.0.1:{port}/webhooks/stripe", data=body, headers=signed(body)) as resp,
        ):
            await resp.read()
            statuses.append(resp.status)
    return statuses


async def test_workers_a_replaced_worker_runs_the_config_the_others_run(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """A worker the supervisor restarts loaded the config file as it was then: a restart-only key edited since
    (`redis.prefix`) put it on other keys than its sibling, and the receiver got one event twice; a file broken
    since made it exit at once, five times, and the supervisor stopped the whole sidecar (an ops audit). A worker
    now starts from the config the supervisor started with, then takes the file as a reload would."""
    admin_port = free_port()
    parent, port = await start_two_workers(
        tmp_path, upstream, processes, 2, redis_url=redis_url, admin_port=admin_port
    )
    assert parent.proc is not None
    # both serving before one is replaced (the port answers as soon as one does; under load, worker 1 was killed
    # still starting, and its first "listening" line never came)
    await wait_for_log(parent, "sidecar listening on", 2)
    assert await post_on_fresh_connections(port, "evt_same", 1) == [200]
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(cfg.read_text().replace("shards: 4", "shards: 4, prefix: moved"))
    await replace_worker(parent.proc.pid, 1, signal.SIGKILL, admin_port)
    await wait_for_log(parent, "sidecar listening on", 3)  # the replacement serves
    assert set(await post_on_fresh_connections(port, "evt_same", 12)) == {200}
    assert upstream.ids() == ["evt_same"]  # once: every worker runs on the prefix the sidecar started with
    assert "restart needed for redis.prefix" in parent.log(), parent.log()

    # a route added by a reload both workers applied, then a broken edit: the worker restarted after it runs what
    # its sibling runs (an audit: it ran the start-up config, a rotated-out secret valid again on its connections)
    late = "  - {name: late, path: /webhooks/late, provider: none, event_id: {header: X-Id}}\n"
    cfg.write_text(cfg.read_text() + late)
    reloaded = parent.log().count("config reloaded")
    parent.proc.send_signal(signal.SIGHUP)
    await wait_for_log(parent, "config reloaded", reloaded + 2)
    cfg.write_text("routes: [\n")  # broken: refused as a reload, not a reason to stop
    await replace_worker(parent.proc.pid, 1, signal.SIGKILL, admin_port)
    replacement = worker_pid(parent.proc.pid, 1)
    await wait_for_log(parent, "sidecar listening on", 4)
    await asyncio.sleep(1)
    assert parent.proc.poll() is None and worker_pid(parent.proc.pid, 1) == replacement
    assert set(await post_on_fresh_connections(port, "evt_after", 6)) == {200}
    assert upstream.ids() == ["evt_same", "evt_after"]
    late_statuses = []
    for n in range(8):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(
                f"http://127.0.0.1:{port}/webhooks/late", data=b"{}", headers={"X-Id": f"l{n}"}
            ) as resp,
        ):
            late_statuses.append(resp.status)
    assert set(late_statuses) == {200}, late_statuses  # no worker without the route (404)
    assert (
        "too many restarts" not in parent.log()
        and "refused, the previous config keeps serving" in parent.log()
        and "config reloaded (worker start, the config the other workers run)" in parent.log()
    )


async def test_workers_sighup_while_workers_start_kills_none(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """The supervisor passes every SIGHUP on to its workers; one still starting (its reload handler not yet set)
    died of it, and three quick reloads stopped the sidecar (an ops audit)."""
    admin_port = free_port()
    port, cfg = free_port(), tmp_path / "sidecar.yaml"
    write_config(cfg, upstream_url=upstream.url, port=port, secret=SECRET, workers=2, redis_url=redis_url,
                 admin_port=admin_port)  # fmt: skip
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.spawn()
    assert proc.proc is not None
    deadline = time.monotonic() + 20
    sent = 0
    while len(children(proc.proc.pid)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for _ in range(10):  # while the workers import and set up
        proc.proc.send_signal(signal.SIGHUP)
        sent += 1
        await asyncio.sleep(0.1)
    proc.wait_listening(port)
    assert proc.proc.poll() is None and sent == 10
    assert "exited with -1" not in proc.log() and "too many restarts" not in proc.log(), proc.log()
    assert await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", ["evt_hup"]) == [200]


def test_workers_0_counts_the_cores_the_process_may_use(tmp_path: Path) -> None:
    """`server.workers: 0` is one worker per core the process may use: its CPU affinity (a pinned CPU set) and its
    cgroup's CPU quota (a container's CPU limit), not the host's core count (an audit: `taskset -c 0` started 2)."""
    from sidecar.supervisor import usable_cores

    allowed = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    for text, want in [
        ("max 100000\n", allowed),
        ("50000 100000\n", 1),
        ("150000 100000\n", min(allowed, 2)),
        (f"{100000 * (allowed + 3)} 100000\n", allowed),
        ("garbage\n", allowed),
    ]:
        cpu_max.write_text(text)
        assert usable_cores(cpu_max) == want, text
    assert usable_cores(tmp_path / "absent") == allowed
    pinned = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from sidecar.supervisor import resolve_workers; print(resolve_workers(0), resolve_workers(3))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert pinned.stdout.split() == ["1", "3"]


async def test_workers_serve_a_config_read_from_a_fifo(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """`--config` a FIFO with `workers: 2`: each worker opened the FIFO again to compare it with the config its
    supervisor read, and blocked there for good with no writer (a review): the sidecar never served. A FIFO or
    pipe is read once, by the supervisor."""
    port, cfg = free_port(), tmp_path / "sidecar.yaml"
    write_config(cfg, upstream_url=upstream.url, port=port, secret=SECRET, workers=2, redis_url=redis_url,
                 admin_port=free_port())  # fmt: skip
    fifo = tmp_path / "sidecar.fifo"
    os.mkfifo(fifo)
    proc = SidecarProcess(fifo)
    processes.append(proc)
    proc.spawn()
    writer = asyncio.get_running_loop().run_in_executor(None, fifo.write_text, cfg.read_text())
    await asyncio.wait_for(writer, 10)
    proc.wait_listening(port)
    statuses = await asyncio.wait_for(
        post_all(f"http://127.0.0.1:{port}/webhooks/stripe", ["evt_fifo_1", "evt_fifo_2", "evt_fifo_3"]), 30
    )
    assert statuses == [200, 200, 200], proc.log()
    assert "refused" not in proc.log(), proc.log()


async def serving_two(
    tmp_path: Path, upstream: Upstream, processes: list[Any], redis_url: str
) -> tuple[SidecarProcess, list[int], Path]:
    """`sidecar run` with two workers, both serving: the process, its workers and their peers dir."""
    proc, _ = await start_two_workers(
        tmp_path, upstream, processes, 2, redis_url=redis_url, admin_port=free_port()
    )
    assert proc.proc is not None
    await wait_for_log(proc, "sidecar listening on", 2)
    workers = children(proc.proc.pid)
    return proc, workers, peers_dir_of(workers[0])


@pytest.fixture
def own_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary dir (TMPDIR) for the sidecars a test starts, so their peers dirs are in it. Any sidecar that
    starts on the machine (another test run's) sweeps the shared one for dirs left by sidecars killed outright, and
    took the one a test left to see its own next start sweep it. Short: the workers' Unix sockets are in it."""
    path = Path(tempfile.mkdtemp(prefix="peers-test-"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_workers_killed_outright_leave_no_copy_of_the_config(
    own_tmpdir: Path, tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """The peers dir holds copies of the config, secrets and all. A supervisor SIGKILLed after a reload left the
    copy the reload applied, so the dir too (its last worker out removed the other files only: a chaos soak); one
    SIGKILLed with its workers left everything. The last worker out now removes every copy, and the next start
    removes a dir whose supervisor and workers are all gone."""
    from sidecar.supervisor import APPLIED_CONFIG_NAME, START_CONFIG_NAME

    first, workers, peers = await serving_two(tmp_path, upstream, processes, redis_url)
    assert peers.parent == own_tmpdir, peers
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        cfg.read_text() + "  - {name: late, path: /webhooks/late, provider: none, event_id: {header: X-Id}}\n"
    )
    first.proc.send_signal(signal.SIGHUP)
    await wait_for_log(first, "config reloaded", 2)
    assert (peers / APPLIED_CONFIG_NAME).is_file() and (peers / START_CONFIG_NAME).is_file()
    first.kill()
    await wait_gone(workers)
    assert not peers.exists(), sorted(p.name for p in peers.iterdir())

    # the supervisor and its workers all SIGKILLed: none of them removes anything
    second, workers, left = await serving_two(tmp_path, upstream, processes, redis_url)
    assert left.name.startswith(f"sidecar-workers-{second.proc.pid}-")
    os.kill(second.proc.pid, signal.SIGSTOP)  # restarts no worker meanwhile
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    second.kill()
    await wait_gone(workers)
    assert (left / START_CONFIG_NAME).is_file()

    third, _, live = await serving_two(tmp_path, upstream, processes, redis_url)
    assert not left.exists()
    assert f"removed {left}: a sidecar killed with its workers left it" in third.log()
    assert live.is_dir()  # its own, made after the sweep
    third.stop()
    assert not live.exists()


def test_workers_stale_peers_dirs_only_are_removed(tmp_path: Path) -> None:
    """The sweep at start removes a peers dir only when nothing can still be using it."""
    import socket

    from sidecar.supervisor import remove_stale_peers_dirs

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=10)
    dead = done.pid  # a pid no process has (until the kernel hands it out again, pids wrap slowly)

    def made(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "start-config.yaml").write_text("secret")
        (path / "supervisor.lock").write_text("")  # nobody holds it
        return path

    stale = made(f"sidecar-workers-{dead}-a")
    running = made(f"sidecar-workers-{os.getpid()}-b")  # its supervisor runs
    answering = made(f"sidecar-workers-{dead}-c")  # another container's (its own pids): a worker answers
    older = made("sidecar-workers-d")  # an older sidecar's name: no pid to tell by
    (tmp_path / f"sidecar-workers-{dead}-e").write_text("a file")
    linked = tmp_path / f"sidecar-workers-{dead}-f"
    linked.symlink_to(running)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(answering / "worker-1.sock"))
        listener.listen(1)
        # a socket no one listens on any more (its worker SIGKILLed) does not keep a dir
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as closed:
            closed.bind(str(stale / "worker-1.sock"))
        assert remove_stale_peers_dirs(str(tmp_path)) == [stale]
    assert not stale.exists()
    assert all(p.is_dir() for p in (running, answering, older, linked))
    assert (tmp_path / f"sidecar-workers-{dead}-e").is_file()
    # a live supervisor in another PID namespace (its pid not ours, its workers not listening yet): its lock
    import fcntl

    other = made(f"sidecar-workers-{dead}-g")
    with open(other / "supervisor.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert other not in remove_stale_peers_dirs(str(tmp_path))
    assert other.is_dir()
    # names no pid has (the sweep raised: sidecar run stopped with a traceback)
    odd = [made(f"sidecar-workers-{name}-h") for name in ("99999999999999999999", "\u00b2")]
    assert remove_stale_peers_dirs(str(tmp_path)) == [other]  # its lock no longer held
    assert all(p.is_dir() for p in odd)


def test_workers_a_sweep_before_the_supervisor_locks_spares_its_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor (in another PID namespace: its pid not running here) between making its lock file and locking
    it: another sidecar's sweep found an unlocked lock and removed the dir, the supervisor could not start (a
    review). The lock has its name only once it is held; until then the dir is young and has none."""
    import fcntl

    from sidecar import supervisor

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=10)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(os, "getpid", lambda: done.pid)
    swept: list[list[Path]] = []
    flock = fcntl.flock

    def sweep_first(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX and not swept:  # another sidecar's sweep runs just before the lock
            swept.append(supervisor.remove_stale_peers_dirs(str(tmp_path)))
        flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", sweep_first)
    started = supervisor.Supervisor("/x.yaml", "redis://127.0.0.1:1", 2, 1.0, None, "secret: x\n")
    monkeypatch.undo()
    try:
        assert swept == [[]]
        assert sorted(p.name for p in Path(started.peers_dir).iterdir()) == [
            "start-config.yaml",
            "supervisor.lock",
        ]
        assert supervisor.remove_stale_peers_dirs(str(tmp_path)) == []
    finally:
        os.close(started._lock)
        shutil.rmtree(started.peers_dir, ignore_errors=True)


def test_workers_restarts_are_limited_to_five_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_RESTARTS a minute: the sixth restart within a minute is refused (a worker that cannot start does not
    spin), and once the oldest restart is a minute old a worker that dies is replaced again."""
    from sidecar import supervisor

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sup = supervisor.Supervisor("/x.yaml", "redis://127.0.0.1:1", 2, 1.0, None, "routes: []\n")
    try:
        assert [sup._may_restart() for _ in range(5)] == [True] * 5
        assert sup._may_restart() is False
        sup._restarts = deque(t - 61 for t in sup._restarts)  # a minute has passed since all of them
        assert sup._may_restart() is True
    finally:
        os.close(sup._lock)
        shutil.rmtree(sup.peers_dir, ignore_errors=True)


def test_workers_a_supervisor_that_is_a_zombie_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor SIGKILLed with a thread still running is a zombie while its threads exit, and its workers still
    see its pid as their parent's: they must stop all the same (`follow_parent`, `leave_peers_dir`)."""
    from sidecar import supervisor

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while process_state(zombie.pid) != "Z":  # exited, not reaped
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monkeypatch.setattr(os, "getppid", lambda: zombie.pid)
        assert supervisor.supervisor_gone(str(zombie.pid))
        monkeypatch.setattr(os, "getppid", lambda: os.getpid())  # a parent that runs
        assert not supervisor.supervisor_gone(str(os.getpid()))
    finally:
        zombie.wait(timeout=10)


async def test_workers_sighup_reloads_every_worker_at_once(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """SIGHUP to the supervisor reloads every worker now, not at their next look at the file (here an hour away)."""
    port, cfg = free_port(), tmp_path / "sidecar.yaml"
    write_config(cfg, upstream_url=upstream.url, port=port, secret=SECRET, workers=2, redis_url=redis_url,
                 admin_port=free_port())  # fmt: skip
    cfg.write_text(cfg.read_text().replace("workers: 2}", "workers: 2, reload_interval: 1h}"))
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    assert proc.proc is not None
    await wait_for_log(proc, "sidecar listening on", 2)
    cfg.write_text(
        cfg.read_text() + "  - {name: late, path: /webhooks/late, provider: none, event_id: body_sha256}\n"
    )
    proc.proc.send_signal(signal.SIGHUP)
    await wait_for_log(proc, "config reloaded (SIGHUP)", 2)
    statuses = []
    for n in range(8):  # each on a connection of its own: SO_REUSEPORT spreads connections over the workers
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(f"http://127.0.0.1:{port}/webhooks/late", data=f"late {n}".encode()) as resp,
        ):
            statuses.append(resp.status)
    assert set(statuses) == {200}, statuses  # no worker without the route (404)


async def test_workers_a_worker_dying_over_and_over_stops_the_sidecar_with_exit_1(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[Any]
) -> None:
    """Five restarts a minute are made; the sixth death stops the sidecar, with a non-zero exit status (an
    orchestrator restarts it and counts the failure)."""
    parent, _ = await start_two_workers(
        tmp_path, upstream, processes, 2, redis_url=redis_url, admin_port=free_port()
    )
    assert parent.proc is not None
    for kill in range(6):
        old = None
        deadline = time.monotonic() + 20
        while old is None:
            old = worker_pid(parent.proc.pid, 1)
            assert time.monotonic() < deadline, parent.log()
            await asyncio.sleep(0.05)
        os.kill(old, signal.SIGKILL)
        if kill < 5:
            while worker_pid(parent.proc.pid, 1) in (None, old):  # replaced
                assert parent.proc.poll() is None and time.monotonic() < deadline, parent.log()
                await asyncio.sleep(0.05)
    assert parent.proc.wait(timeout=30) == 1
    log = parent.log()
    assert log.count("exited with -9; restarting it") == 5, log
    assert "worker 1 exited with -9; too many restarts, stopping" in log, log
