"""`sidecar dlq drain` as a held drain (the default): the sidecar leaves each item it streams in the DLQ, held for
the drain, and the CLI removes an item only once its line is surely in the output. Whatever stops the CLI — its
output failing, a pipe's reader going away, Ctrl-C, SIGKILL — every item it did not surely write is still in the
DLQ: those it read are given back at once, the others when the hold ends. No rescue file. Real `sidecar run` and
`sidecar dlq` processes on a real Valkey; a stand-in server for a sidecar from before held drains."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import redis
from aiohttp import web

from tests import test_admin_cli
from tests.procs import wait_until
from tests.test_admin import bury_many
from tests.test_admin_cli import TOKEN, Running, dlq, one_line
from tests.test_admin_cli_faults import drain_to_pipe, line_ids, read_some, remaining

sidecar = test_admin_cli.sidecar  # the same running sidecar with an admin API (a fixture)
HOLD = "2s"


def auth(running: Running) -> list[str]:
    return ["--admin-url", running.admin_url, "--token", TOKEN]


def logged(running: Running, what: str) -> list[str]:
    return [line for line in running.proc.log().splitlines() if what in line]


async def after_the_hold(running: Running, tmp_path: Path, want: set[str]) -> None:
    """Once the hold has ended, a new drain gets exactly `want`: nothing held for ever, nothing lost."""
    await asyncio.sleep(2.2)
    out = tmp_path / "after.ndjson"
    r = await dlq("drain", "--out", str(out), *auth(running))
    assert r.code == 0, r.err
    assert sorted(line_ids(out.read_bytes())) == sorted(want)


async def test_held_drain_of_450_removes_in_batches_and_empties_the_dlq(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    ids = await bury_many(sidecar.store, 450)
    out = tmp_path / "dead.ndjson"
    r = await dlq("drain", "--out", str(out), "--reason", "archive", *auth(sidecar))
    assert r.code == 0 and "drained 450 item(s)" in r.err and one_line(r.err), r.err
    assert sorted(line_ids(out.read_bytes())) == sorted(ids) and not remaining(rdb)
    assert rdb.hlen(test_admin_cli.KEYS.dlq_taken()) == 0
    removals = logged(sidecar, ": removed=")
    assert [line.split("removed=")[1].split()[0] for line in removals] == ["200", "200", "50"], removals
    assert all("archive" in line for line in removals)


async def test_held_drain_to_full_device_leaves_every_item_in_the_dlq(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    ids = await bury_many(sidecar.store, 30)
    r = await dlq("drain", "--hold", HOLD, "--out", "/dev/full", *auth(sidecar), cwd=tmp_path)
    assert r.code == 1 and one_line(r.err) and "No space left on device" in r.err, r.err
    assert (
        "0 item(s) written to /dev/full and removed from the DLQ; every other item is still in the DLQ"
        in r.err
    )
    assert remaining(rdb) == set(ids) and not list(tmp_path.glob("*unwritten*"))  # no rescue file
    # what it read, given back
    assert await wait_until(lambda: bool(logged(sidecar, ": released=")), timeout=5)
    await after_the_hold(sidecar, tmp_path, set(ids))


async def test_held_drain_whose_output_fails_gives_back_what_it_never_read(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    """An audit: the sidecar streams (and takes) items as fast as the connection takes them, so a drain whose output
    failed after a few lines had ~200 more taken, in the sidecar's and the network's buffers, that it never read
    and so could not give back: held for the whole --hold (10 min), skipped by the re-run, which said nothing.
    The CLI now has the sidecar give back everything the drain holds but what it wrote."""
    async with drain_to_pipe(sidecar, tmp_path, n=300, body=b"{" + b" " * 20_000 + b"}", hold="10m") as pipe:
        await pipe.full()  # the CLI waits to write, the sidecar streams on into the buffers
        await asyncio.sleep(0.5)
        got, err = await pipe.reader_goes_away()
    read = line_ids(got)
    assert pipe.proc.returncode == 1 and one_line(err) and "Broken pipe" in err, err
    assert remaining(rdb) == set(pipe.ids) - set(read)
    assert rdb.hlen(test_admin_cli.KEYS.dlq_taken()) == 0  # nothing left held for the 10 minutes
    assert logged(sidecar, "(all it held, 0 kept)")
    out = tmp_path / "again.ndjson"
    again = await dlq("drain", "--out", str(out), *auth(sidecar))
    assert again.code == 0, again.err
    assert sorted(line_ids(out.read_bytes())) == sorted(set(pipe.ids) - set(read))


async def test_held_drain_to_pipe_closed_by_its_reader_removes_only_what_it_wrote(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    async with drain_to_pipe(sidecar, tmp_path, hold=HOLD) as pipe:
        got, err = await pipe.reader_goes_away()
    read = line_ids(got)
    assert pipe.proc.returncode == 1 and one_line(err) and "Broken pipe" in err, err
    assert read and f"{len(read)} item(s) written to stdout and removed from the DLQ" in err, err
    assert remaining(rdb) == set(pipe.ids) - set(read)  # written ones removed, the rest still there
    await after_the_hold(sidecar, tmp_path, set(pipe.ids) - set(read))


async def test_held_drain_interrupted_removes_what_it_wrote_and_keeps_the_rest(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    async with drain_to_pipe(sidecar, tmp_path, hold=HOLD) as pipe:
        await pipe.full()
        pipe.proc.send_signal(signal.SIGINT)
        _, err_bytes = await asyncio.wait_for(pipe.proc.communicate(), timeout=30)
        got = await read_some(pipe.r, None)
    err = err_bytes.decode()
    assert pipe.proc.returncode == 130 and one_line(err) and "interrupted" in err, err
    written = set(line_ids(got))
    assert written and remaining(rdb) == set(pipe.ids) - written
    await after_the_hold(sidecar, tmp_path, set(pipe.ids) - written)


async def test_held_drain_interrupted_mid_line_finishes_the_line_for_a_reader(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    """An audit: Ctrl-C while a line bigger than a pipe's atomic write waited in it left half that line at the end
    of stdout (`| gzip >> archive` then glued it to the next drain's first line). The rest of the line now goes out
    when the reader takes it within a second, and the line counts as written (removed, not given back); a reader
    that takes nothing is told the last line is cut short."""
    body = b"{" + b" " * 20_000 + b"}"  # lines far over PIPE_BUF: part of one is out when the pipe is full
    async with drain_to_pipe(sidecar, tmp_path, n=40, body=body, hold=HOLD) as pipe:
        await pipe.full()
        pipe.proc.send_signal(signal.SIGINT)
        got = bytearray()
        waiting = asyncio.ensure_future(pipe.proc.wait())
        for _ in range(2000):  # at most ~20 s
            got += await read_some(pipe.r, None)
            if waiting.done():
                break
            await asyncio.sleep(0.01)
        got += await read_some(pipe.r, None)
        err = (await asyncio.wait_for(pipe.proc.stderr.read(), 10)).decode()  # type: ignore[union-attr]
    assert (
        pipe.proc.returncode == 130 and one_line(err) and "interrupted" in err and "cut short" not in err
    ), err
    lines = bytes(got).split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line)["id"] for line in lines[:-1])  # whole lines only
    written = set(line_ids(bytes(got)))
    assert f"{len(written)} item(s) written to stdout and removed" in err
    assert written and remaining(rdb) == set(pipe.ids) - written  # what is out whole was removed

    async with drain_to_pipe(sidecar, tmp_path, n=40, body=body, hold=HOLD) as pipe:
        await pipe.full()
        pipe.proc.send_signal(signal.SIGINT)  # and nobody reads
        _, err_bytes = await asyncio.wait_for(pipe.proc.communicate(), timeout=30)
        got = await read_some(pipe.r, None)
    err = err_bytes.decode()
    assert pipe.proc.returncode == 130 and one_line(err), err
    assert "interrupted (the last line in stdout is cut short: discard it)" in err
    assert not got.endswith(b"\n")
    out_whole = set(line_ids(got[: got.rindex(b"\n") + 1]))
    # the whole lines out were removed; the cut one, and the rest, are still in the DLQ
    assert out_whole and not out_whole & remaining(rdb) and set(pipe.ids) - out_whole <= remaining(rdb)


async def test_held_drain_killed_loses_nothing(sidecar: Running, rdb: redis.Redis, tmp_path: Path) -> None:
    """SIGKILL mid-drain, past its first removal (200 lines): the items removed are ones it wrote; every other one
    is still in the DLQ and, once the hold ends, the next drain's. A drain that is not held loses here what sat in
    its receive buffer."""
    body = json.dumps({"pad": "x" * 1500}).encode()
    async with drain_to_pipe(sidecar, tmp_path, n=400, body=body, hold=HOLD) as pipe:
        got = b""
        for _ in range(2000):  # read until 250 lines came through: the first batch of 200 was removed by then
            got += await read_some(pipe.r, b"\n")
            if got.count(b"\n") >= 250:
                break
        # then no more reading: the CLI waits in a write, the line in its hand and more in its receive buffer, all
        # acknowledged by its TCP
        await pipe.full()
        pipe.proc.kill()
        await pipe.proc.wait()
        got += await read_some(pipe.r, None)
    removed = set(pipe.ids) - remaining(rdb)
    assert len(removed) >= 200 and removed <= set(line_ids(got)), (len(removed), got.count(b"\n"))
    await after_the_hold(sidecar, tmp_path, set(pipe.ids) - removed)


async def test_held_drain_against_a_sidecar_from_before_held_drains_drains_as_before(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A sidecar that does not know "hold" refuses it (400, unknown field): the CLI asks again without it and
    copies the stream as a drain that is not held."""
    bodies: list[dict[str, Any]] = []
    item = {"id": "ab" * 12, "route": "stripe", "event_id": "evt_1", "attempts": 1, "dead_at": None}

    async def drain(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        if "hold" in body:
            detail = "unknown field(s): hold; allowed: reason, route"
            return web.json_response({"error": "bad_request", "detail": detail}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(2):
            await resp.write(json.dumps({**item, "event_id": f"evt_{i}"}).encode() + b"\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/admin/dlq/drain", drain)
    server = await aiohttp_server(app, host="127.0.0.1")
    out = tmp_path / "dead.ndjson"
    r = await dlq(
        "drain", "--out", str(out), "--admin-url", f"http://127.0.0.1:{server.port}", "--token", "t"
    )
    assert r.code == 0 and "drained 2 item(s)" in r.err, r.err
    assert [b.get("hold") for b in bodies] == ["10m", None]
    assert len(out.read_bytes().splitlines()) == 2


async def test_held_drain_bad_hold_is_a_usage_error(tmp_path: Path) -> None:
    for bad in ("soon", "25h", "-1s", "0.5s"):
        r = await dlq("drain", "--hold", bad, "--admin-url", "http://127.0.0.1:9", "--token", "t")
        assert r.code == 2 and "--hold" in r.err, (bad, r.err)


async def lossy_admin(aiohttp_server: Any, running: Running, lose: int, refuse: bool) -> str:
    """A stand-in network path to the sidecar's admin API (its URL returned) on which a held drain's removals go
    wrong: the first `lose` removals reach the sidecar and are carried out, their answers lost (a 503 comes
    back instead); with `refuse`, no removal reaches it. Every other call passes through as it is."""
    import aiohttp

    from sidecar.admin_spec import DRAIN_HEADER

    lost = 0

    async def proxy(request: web.Request) -> web.Response:
        nonlocal lost
        removal = request.path.endswith("/remove")
        unavailable = {"error": "store_unavailable", "detail": "connection reset by peer"}
        if removal and refuse:
            return web.json_response(unavailable, status=503)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, running.admin_url + request.path_qs, data=body, headers=headers
            ) as resp,
        ):
            payload = await resp.read()
            keep = ("content-type", DRAIN_HEADER.lower())
            passed = {k: v for k, v in resp.headers.items() if k.lower() in keep}
        if removal and lost < lose:
            lost += 1
            return web.json_response(unavailable, status=503)
        return web.Response(status=resp.status, body=payload, headers=passed)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


async def test_held_drain_counts_a_removal_whose_answer_was_lost_once_it_is_confirmed(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path, aiohttp_server: Any
) -> None:
    """The answer to a batch's removal is lost (the sidecar removed it): the CLI sends the batch again with the
    next one, and the sidecar answers those items `gone`. They were removed by this drain, not "handled
    elsewhere": the count says every item drained, and no warning sends the operator looking for duplicates."""
    ids = await bury_many(sidecar.store, 250)
    url = await lossy_admin(aiohttp_server, sidecar, lose=1, refuse=False)
    out = tmp_path / "dead.ndjson"
    r = await dlq("drain", "--out", str(out), "--admin-url", url, "--token", TOKEN)
    assert r.code == 0 and "drained 250 item(s)" in r.err, r.err
    assert "handled elsewhere" not in r.err, r.err
    assert sorted(line_ids(out.read_bytes())) == sorted(ids) and not remaining(rdb)


async def test_held_drain_whose_removals_are_never_confirmed_fails(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path, aiohttp_server: Any
) -> None:
    """Every item was written out, but the sidecar never confirmed one removal: the items are still in the DLQ
    (held until the hold ends, then drained again), so the drain is no success (exit 1, saying why), not "drained
    0 item(s)" with exit 0."""
    ids = await bury_many(sidecar.store, 5)
    url = await lossy_admin(aiohttp_server, sidecar, lose=0, refuse=True)
    out = tmp_path / "dead.ndjson"
    r = await dlq("drain", "--out", str(out), "--hold", HOLD, "--admin-url", url, "--token", TOKEN)
    assert r.code == 1 and "did not confirm the removal of written items" in r.err, r.err
    assert "5 more written there were not confirmed removed: up to 5 may still be in the DLQ" in r.err, r.err
    assert sorted(line_ids(out.read_bytes())) == sorted(ids)
    assert remaining(rdb) == set(ids)
