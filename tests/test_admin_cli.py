"""`sidecar dlq …` end to end: real `python -m sidecar run` and `python -m sidecar dlq` processes, a real Valkey and
a real upstream. Exit codes: 0 ok, 1 error answer, 2 usage, 3 unreachable, 4 unauthorized, 5 not found."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web

from sidecar.admin_client import _time_arg, admin_url_from_listen, format_item, print_json, table
from sidecar.keys import KeySpace
from sidecar.store import RedisStore
from tests.conftest import REPO, Upstream
from tests.procs import SidecarProcess, free_port, wait_until, write_config
from tests.test_admin import bury_many

KEYS = KeySpace("sidecar", 4)
TOKEN = "t"  # what tests.procs.write_config puts in admin.token


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment (plus `env`) in which `python -m sidecar` runs from any directory."""
    base = {k: v for k, v in os.environ.items() if k not in ("SIDECAR_ADMIN_TOKEN", "SIDECAR_CONFIG")}
    return {**base, "PYTHONPATH": str(REPO), **(env or {})}


async def dlq(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO, **popen: Any) -> Result:
    """`python -m sidecar dlq ARGS` with a clean environment (plus `env`), run in `cwd`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "dlq",
        *args,
        cwd=cwd,
        env=cli_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **popen,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Result(int(proc.returncode or 0), out.decode(), err.decode())


_IN_PROCESS = asyncio.Lock()


async def dlq_here(*args: str) -> Result:
    """`sidecar dlq ARGS` run in this process, in a thread, one call at a time (stdout and stderr are the
    process's): the code `dlq` runs without a Python start per call, for tests that run the CLI dozens of times.
    The environment is the test's own (no SIDECAR_CONFIG or SIDECAR_ADMIN_TOKEN: `cli_env` drops them too)."""
    from sidecar.cli import build_parser

    def run() -> Result:
        out, err = (
            io.TextIOWrapper(io.BytesIO(), encoding="utf-8"),
            io.TextIOWrapper(io.BytesIO(), encoding="utf-8"),
        )
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                parsed = build_parser().parse_args(["dlq", *args])
                code = int(parsed.func(parsed))
            except SystemExit as exc:
                code = int(exc.code or 0)
        out.flush(), err.flush()
        return Result(code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode())

    assert not {"SIDECAR_CONFIG", "SIDECAR_ADMIN_TOKEN"} & set(os.environ)
    async with _IN_PROCESS:
        return await asyncio.to_thread(run)


@dataclass
class Running:
    config: Path
    admin_url: str
    store: RedisStore
    proc: SidecarProcess
    port: int  # the inbound (webhook) listener

    @property
    def ingress_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def drain_log(self, nth: int = 1) -> tuple[int, int]:
        """(drained, of) from the sidecar's log line of its `nth` drain: what the server removed from the DLQ."""
        lines: list[str] = []

        def logged() -> bool:
            lines[:] = [line for line in self.proc.log().splitlines() if "dlq drain:" in line]
            return len(lines) >= nth

        assert await wait_until(logged, timeout=10), self.proc.log()[-2000:]
        m = re.search(r"drained=(\d+) of (\d+)", lines[nth - 1])
        assert m, lines[nth - 1]
        return int(m.group(1)), int(m.group(2))


@asynccontextmanager
async def admin_sidecar(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[SidecarProcess], token: str = "t"
) -> AsyncIterator[Running]:
    """A real `sidecar run` (stopped by the `processes` fixture) and a store client on its Valkey."""
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "sidecar.yaml"
    write_config(
        cfg,
        redis_url=redis_url,
        upstream_url=upstream.url,
        port=port,
        admin_port=admin_port,
        secret="whsec_x",
        token=token,
    )
    proc = SidecarProcess(cfg)
    processes.append(proc)
    proc.start(port)
    store = RedisStore.connect(redis_url, KEYS, dedupe_ttl=3600, dlq_max_length=10_000)
    try:
        yield Running(cfg, f"http://127.0.0.1:{admin_port}", store, proc, port)
    finally:
        await store.close()


@pytest.fixture
async def sidecar(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: redis.Redis, processes: list[SidecarProcess]
) -> AsyncIterator[Running]:
    async with admin_sidecar(tmp_path, upstream, redis_url, processes) as running:
        yield running


async def deliveries(upstream: Upstream, want: int, until: float = 15.0) -> Counter[str]:
    deadline = time.monotonic() + until
    while time.monotonic() < deadline and len(upstream.received) < want:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # anything extra would arrive now
    return Counter(upstream.ids())


async def test_admin_cli_list_and_show_table_json_and_not_found(sidecar: Running) -> None:
    ids = await bury_many(sidecar.store, 3)
    cfg = ["--config", str(sidecar.config)]  # URL and token both from the config's admin section
    listed = await dlq("list", *cfg)
    assert listed.code == 0, listed.err
    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["ID", "ROUTE", "EVENT"] and len(rows) == 3
    assert all(r.split()[0] in ids and "stripe" in r and "503" in r for r in rows)
    assert "3 shown of 3" in listed.err

    hinted = await dlq("list", "--route", "stripe", "--limit", "1", *cfg)
    # the next page's hint repeats the filters (alone, its cursor paged the whole DLQ)
    assert hinted.code == 0 and "next page: --route stripe --limit 1 --cursor " in hinted.err, hinted.err
    as_json = await dlq("list", "--json", "--limit", "2", *cfg)
    page = json.loads(as_json.out)
    assert as_json.code == 0 and len(page["items"]) == 2 and page["total"] == 3 and page["next_cursor"]
    nxt = await dlq("list", "--json", "--cursor", page["next_cursor"], *cfg)
    assert [i["id"] for i in page["items"] + json.loads(nxt.out)["items"]] == ids

    shown, shown_json, missing, bad_filter = await asyncio.gather(
        dlq("show", ids[0], *cfg),
        dlq("show", ids[0], "--json", *cfg),
        dlq("show", "0123456789abcdef01234567", *cfg),
        dlq("list", "--status", "999", *cfg),
    )
    assert shown.code == 0
    assert "evt_00000" in shown.out and "Stripe-Signature: t=1,v1=ab" in shown.out
    assert "attempt 1  503" in shown.out and '"id": "evt_00000"' in shown.out
    item = json.loads(shown_json.out)
    assert item["id"] == ids[0] and item["history"][0]["status"] == 503
    assert missing.code == 5 and missing.out == ""
    assert missing.err.count("\n") == 1 and "not found" in missing.err
    assert bad_filter.code == 1 and "bad_request" in bad_filter.err and "status" in bad_filter.err


def test_admin_cli_show_and_list_escape_what_would_act_on_the_terminal() -> None:
    """`dlq show` printed a body's bytes as they came: `\\x1b[2J\\x1b]0;pwned\\x07` in an event cleared the operator's
    screen and retitled the terminal (a conformance audit). Every field is escaped; a body keeps its line breaks."""
    evil = "\x1b[2J\x1b]0;pwned\x07"
    item = {
        "id": "0123456789abcdef01234567",
        "route": "none",
        "event_id": f"id{evil}",
        "attempts": 1,
        "last_status": 400,
        "last_error": evil,
        "headers": [["X-Id", f"v{evil}"]],
        "history": [{"at": "2026-11-26T00:00:00Z", "attempt": 1, "status": 400, "duration_ms": 1.0}],
        "body": '{\n\t"x": "' + evil + ' hi"\n}',
    }
    shown = format_item(item)
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in shown  # escaped, still readable
    assert '{\n\t"x": ' in shown  # the body's own line breaks and tabs kept
    listed = table(
        [[item["id"], item["route"], item["event_id"], item["last_error"]]], ["ID", "ROUTE", "EVENT", "E"]
    )
    assert "\x1b" not in listed and "\x07" not in listed and "\u202e" not in table([["\u202ert"]], ["X"])


async def test_admin_cli_refuses_what_would_act_on_something_else_than_asked() -> None:
    """Refused as usage errors (exit 2) before any call (nothing listens at the URL): `--out "$ARCHIVE"` with
    ARCHIVE unset drained every item to stdout (to /dev/null in a cron job: gone); a reason the API refuses; a
    `--limit` of a non-ASCII digit (its message named an internal function). `show replay` reached the POST-only
    /admin/dlq/replay and said "method not allowed": not a dead-letter id, so not found (exit 5). (an audit)"""
    target = ["--admin-url", "http://127.0.0.1:1", "--token", "t"]
    empty_out, long_reason, odd_limit, show_replay = await asyncio.gather(
        dlq("drain", "--out", "", *target),
        dlq("replay", "--all", "--reason", "r" * 1001, *target),
        dlq("list", "--limit", "\u00b2", *target),
        dlq("show", "replay", *target),
    )
    assert empty_out.code == 2 and "--out must name a file" in empty_out.err
    assert long_reason.code == 2 and "at most 1000 characters" in long_reason.err
    assert odd_limit.code == 2 and "must be an integer from 1 to 1000" in odd_limit.err
    assert show_replay.code == 5 and "no dead letter 'replay'" in show_replay.err


def test_admin_cli_json_is_ascii_so_nothing_in_it_acts_on_the_terminal() -> None:
    """`--json` wrote C1 controls (U+009B starts an escape sequence) and a header's lone surrogate (a non-UTF-8
    byte) raw: the first could act on a terminal, the second crashed the write under a strict UTF-8 locale."""
    out = io.StringIO()
    print_json({"headers": [["X-Evil", "\u009b2J"], ["X-Name", "Jos\udce9"]], "route": "caf\u00e9"}, out)
    text = out.getvalue()
    assert text.isascii()
    assert json.loads(text)["headers"][0][1] == "\u009b2J" and json.loads(text)["route"] == "caf\u00e9"


async def test_admin_cli_replay_dry_run_ids_and_route_deliver_each_once(
    sidecar: Running, upstream: Upstream, rdb: redis.Redis
) -> None:
    ids = await bury_many(sidecar.store, 40)
    auth = ["--admin-url", sidecar.admin_url, "--token", TOKEN]
    dry = await dlq("replay", "--route", "stripe", "--dry-run", *auth)
    assert (dry.code, dry.out) == (0, "would replay 40\n")
    assert rdb.zcard(KEYS.dlq_items()) == 40

    from sidecar.store.dead_letters import DeadLetters

    dl = DeadLetters(sidecar.store)
    [held] = await dl.get_many([ids[2]])
    assert await dl.take(held, "another-replica", 60_000) == "taken"  # a drain elsewhere is writing it
    two = await dlq("replay", ids[0], ids[1], ids[2], "--reason", "receiver fixed", *auth)
    assert two.code == 0 and two.out == (
        "replayed 2\nskipped 1: another drain or replay has them (run again to see what is left)\n"
    )
    assert await dl.take(held, "another-replica", 0) == "taken"  # that drain gave up
    rest = await dlq("replay", "--route", "stripe", "--json", *auth)
    assert rest.code == 0 and json.loads(rest.out)["replayed"] == 38
    got = await deliveries(upstream, 40)
    assert len(got) == 40 and set(got.values()) == {1}
    assert rdb.zcard(KEYS.dlq_items()) == 0
    assert all(r.headers["x-sidecar-attempt"] == "1" for r in upstream.received)

    unknown = await dlq("replay", ids[0], *auth)  # replayed already: no longer a dead letter
    assert unknown.code == 5 and ids[0] in unknown.err


async def test_admin_cli_drain_appends_ndjson_to_file_and_empties_dlq(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    out = tmp_path / "drained.ndjson"
    auth = ["--admin-url", sidecar.admin_url]
    env = {"SIDECAR_ADMIN_TOKEN": TOKEN}
    await bury_many(sidecar.store, 30)
    await bury_many(sidecar.store, 5, prefix="later")
    first = await dlq("drain", "--out", str(out), "--reason", "archive", *auth, env=env, preexec_fn=no_umask)
    assert first.code == 0 and "drained 35 item(s)" in first.err and first.out == ""
    assert rdb.zcard(KEYS.dlq_items()) == 0
    # the lines hold webhook bodies: a file the drain creates is 0600, whatever the umask
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    await bury_many(sidecar.store, 4, prefix="again")
    second = await dlq("drain", "--route", "stripe", "--out", str(out), *auth, env=env)
    assert second.code == 0 and "drained 4 item(s)" in second.err
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(items) == 39 and len({i["id"] for i in items}) == 39  # the first drain's lines are kept
    assert all(i["body"] and i["headers"] and i["history"] for i in items)
    to_stdout = await dlq("drain", *auth, env=env)
    assert to_stdout.code == 0 and to_stdout.out == "" and "drained 0" in to_stdout.err
    unknown_route = await dlq("drain", "--route", "nosuch", "--out", str(out), *auth, env=env)
    assert unknown_route.code == 5 and len(out.read_text().splitlines()) == 39
    fresh = tmp_path / "fresh.ndjson"  # a drain refused leaves no empty file behind (docs audit)
    refused = await dlq("drain", "--route", "nosuch", "--out", str(fresh), *auth, env=env)
    assert refused.code == 5 and not fresh.exists()
    # a file the operator made keeps its mode
    theirs = tmp_path / "theirs.ndjson"
    theirs.write_bytes(b"")
    theirs.chmod(0o644)
    await bury_many(sidecar.store, 2, prefix="theirs")
    into_theirs = await dlq("drain", "--out", str(theirs), *auth, env=env, preexec_fn=no_umask)
    assert into_theirs.code == 0 and len(theirs.read_text().splitlines()) == 2
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o644


def no_umask() -> None:
    os.umask(0)


async def test_admin_cli_exit_4_without_or_with_wrong_token(sidecar: Running, rdb: redis.Redis) -> None:
    await bury_many(sidecar.store, 2)
    url = ["--admin-url", sidecar.admin_url]
    results = await asyncio.gather(
        dlq("list", *url),
        dlq("list", *url, "--token", "wrong"),
        dlq("replay", "--all", *url, env={"SIDECAR_ADMIN_TOKEN": "wrong"}),
        dlq("drain", *url, "--token", "wrong", env={"SIDECAR_ADMIN_TOKEN": TOKEN}),  # the flag wins
    )
    for r in results:
        assert r.code == 4, r.err
        assert r.err.count("\n") == 1 and "unauthorized" in r.err and "SIDECAR_ADMIN_TOKEN" in r.err
    assert rdb.zcard(KEYS.dlq_items()) == 2
    ok = await dlq("list", *url, env={"SIDECAR_ADMIN_TOKEN": TOKEN})
    assert ok.code == 0


async def test_admin_cli_token_with_a_newline(sidecar: Running) -> None:
    """A token read from a file (`$(cat token)` keeps no newline, a Secret's env var does) is trimmed as the
    sidecar trims it; a control character inside is a usage error naming it, not a traceback."""
    url = ["--admin-url", sidecar.admin_url]
    trimmed, inside = await asyncio.gather(
        dlq("list", *url, env={"SIDECAR_ADMIN_TOKEN": TOKEN + "\n"}),
        dlq("list", *url, "--token", "a\nb"),
    )
    assert trimmed.code == 0, trimmed.err
    assert inside.code == 2 and inside.err.count("\n") == 1 and "control character" in inside.err, inside.err


async def test_admin_cli_sends_a_non_ascii_token_as_the_sidecar_reads_it(
    tmp_path: Path, upstream: Upstream, redis_url: str, processes: list[SidecarProcess]
) -> None:
    """curl sends a UTF-8 token and the sidecar takes it; the CLI sent it as Latin-1 (401 for `tökén`, a
    traceback for `€`, which Latin-1 cannot hold). Both from --token and from the config file."""
    async with admin_sidecar(tmp_path, upstream, redis_url, processes, token="tökén€") as running:
        url = ["--admin-url", running.admin_url]
        results = await asyncio.gather(
            dlq("list", *url, "--token", "tökén€"),
            dlq("list", "--config", str(running.config)),
            dlq("list", *url, "--token", "tökén"),
        )
    assert [r.code for r in results] == [0, 0, 4], [r.err for r in results]
    assert "Traceback" not in results[2].err


async def test_admin_cli_exit_3_when_unreachable(valkey: object) -> None:
    nothing = f"http://127.0.0.1:{free_port()}"
    not_http = f"http://127.0.0.1:{valkey.port}"  # type: ignore[attr-defined]  # a Redis server, not the admin API
    results = await asyncio.gather(
        dlq("list", "--admin-url", nothing, "--token", "x"),
        dlq("drain", "--admin-url", nothing, "--token", "x"),
        dlq("show", "abc", "--admin-url", not_http, "--token", "x", "--timeout", "2"),
    )
    for r in results:
        assert r.code == 3, r.err
        assert r.err.count("\n") == 1 and "cannot reach the admin API" in r.err


async def test_admin_cli_a_change_sent_but_never_answered_is_not_called_unreachable() -> None:
    """The sidecar killed while it runs a replay: the CLI said "cannot reach the admin API" (exit 3) after 467
    items had been replayed (an e2e audit). A request that changes something and was sent, then got no answer,
    may have been carried out: exit 1, saying so. A GET so cut is still "cannot reach" (nothing changed)."""

    async def take_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()

    server = await asyncio.start_server(take_then_hang_up, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        replay, listing = await asyncio.gather(
            dlq("replay", "--all", "--admin-url", url, "--token", "x"),
            dlq("list", "--admin-url", url, "--token", "x"),
        )
    finally:
        server.close()
        await server.wait_closed()
    assert replay.code == 1 and one_line(replay.err), replay.err
    assert "took the request but gave no answer" in replay.err and "safe to run again" in replay.err
    assert listing.code == 3 and "cannot reach the admin API" in listing.err, listing.err


BAD_ARGUMENTS = [
    ["replay"],
    ["replay", "abc", "--all"],
    ["list", "--limit", "0"],
    ["show"],
    ["show", "", "--admin-url", "http://127.0.0.1:9", "--token", "t"],  # was `not found: Not Found`, exit 5
    ["replay", "abc", " ", "--admin-url", "http://127.0.0.1:9", "--token", "t"],
    ["list", "--config", "/nonexistent/sidecar.yaml"],
    ["list", "--admin-url", "ftp://x", "--token", "t"],
    # a socket timeout of inf or 1e20 s overflowed, NaN was refused by the socket: tracebacks (a CLI fuzz)
    ["list", "--timeout", "nan", "--admin-url", "http://127.0.0.1:9", "--token", "t"],
    ["list", "--timeout", "inf", "--admin-url", "http://127.0.0.1:9", "--token", "t"],
    ["list", "--timeout", "1e20", "--admin-url", "http://127.0.0.1:9", "--token", "t"],
    # a host label over 63 characters does not encode as IDNA
    ["list", "--admin-url", "http://" + "a" * 64 + ":1", "--token", "t"],
]


async def test_admin_cli_admin_url_parts_it_would_drop_are_usage_errors() -> None:
    """Credentials, a query or a fragment in --admin-url were dropped without a word (the call went out without
    them: a 401 for `user:pass@`, the whole DLQ for `?route=stripe`)."""
    cases = {
        "http://ops:secret@127.0.0.1:9": "credentials in the URL are not sent (use --token)",
        "https://ops@127.0.0.1:9/": "credentials in the URL are not sent (use --token)",
        "http://127.0.0.1:9/?route=stripe": "it has a query or fragment",
        "http://127.0.0.1:9/admin#x": "it has a query or fragment",
        "http://127.0.0.1:9/?": "it has a query or fragment",
    }
    results = [await dlq_here("list", "--admin-url", url, "--token", "t") for url in cases]
    for (url, why), r in zip(cases.items(), results, strict=True):
        assert r.code == 2 and why in r.err and r.err.count("\n") == 1, (url, r.code, r.err)


async def test_admin_cli_unknown_option_is_named_against_the_subcommand() -> None:
    """`sidecar dlq list --bogus` said `sidecar: error: ... (see sidecar --help)`, whose help does not list the
    subcommand's options."""
    listed, replayed = await asyncio.gather(
        dlq("list", "--bogus", "--admin-url", "http://127.0.0.1:9", "--token", "t"),
        dlq("replay", "abc", "--zz", "--admin-url", "http://127.0.0.1:9", "--token", "t"),
    )
    assert listed.code == 2 and listed.err == (
        "sidecar dlq list: error: unrecognized arguments: --bogus (see sidecar dlq list --help)\n"
    )
    assert replayed.code == 2 and "sidecar dlq replay: error: unrecognized arguments: --zz" in replayed.err


@pytest.mark.parametrize(
    "argv, blamed",
    [
        (["--bogus", "dlq", "list"], "sidecar"),
        (["dlq", "--bogus", "list"], "sidecar dlq"),
        (["dlq", "list", "--bogus=1"], "sidecar dlq list"),
        (["--log-level", "info", "dlq", "list", "--zz"], "sidecar dlq list"),
        # the unknown word also given before, as a subcommand or an option's value (review18)
        (["dlq", "list", "dlq"], "sidecar dlq list"),
        (["dlq", "list", "list"], "sidecar dlq list"),
        (["--log-level", "info", "dlq", "list", "info"], "sidecar dlq list"),
        (["run", "run"], "sidecar run"),
        # an option's prefix takes its value as the whole name does (review19)
        (["--log", "info", "dlq", "list", "info"], "sidecar dlq list"),
    ],
)
def test_admin_cli_unknown_option_is_named_against_the_command_it_was_given_to(
    argv: list[str], blamed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown option given before the subcommand is the top level's (or `dlq`'s) to name: blaming the
    deepest command pointed at a help page that does not list where it was given (a review)."""
    from sidecar.cli import main

    with pytest.raises(SystemExit) as exited:
        main([*argv, "--admin-url", "http://127.0.0.1:9", "--token", "t"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"\n{blamed}: error: unrecognized arguments: " in "\n" + err, err
    assert err.endswith(f"(see {blamed} --help)\n"), err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`sidecar --version` prints the version (it was "the following arguments are required: command")."""
    from sidecar import __version__
    from sidecar.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sidecar {__version__}\n"


def test_cli_log_level_before_or_after_run() -> None:
    from sidecar.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "--log-level", "DEBUG"]).log_level == "debug"
    assert parser.parse_args(["--log-level", "warning", "run"]).log_level == "warning"
    assert parser.parse_args(["--log-level", "warning", "run", "--log-level", "error"]).log_level == "error"
    assert parser.parse_args(["run"]).log_level is None


async def test_admin_cli_exit_2_on_bad_arguments() -> None:
    results = [await dlq_here(*args) for args in BAD_ARGUMENTS]
    for args, r in zip(BAD_ARGUMENTS, results, strict=True):
        assert r.code == 2, (args, r.code, r.err)
        assert r.err.strip() and "Traceback" not in r.err


def test_admin_cli_admin_url_from_listen_wildcards_become_loopback() -> None:
    assert admin_url_from_listen("0.0.0.0:9090") == "http://127.0.0.1:9090"
    assert admin_url_from_listen(":9090") == "http://127.0.0.1:9090"
    assert admin_url_from_listen("[::]:9090") == "http://[::1]:9090"
    assert admin_url_from_listen("[fd00::1]:9090") == "http://[fd00::1]:9090"
    assert admin_url_from_listen("10.0.0.5:9091") == "http://10.0.0.5:9091"


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@dataclass
class Foreign:
    """Another HTTP service: every request gets `answer` (status, content type, body)."""

    url: str
    answer: tuple[int, str, bytes]


@pytest.fixture
async def foreign() -> AsyncIterator[Foreign]:
    service = Foreign("", (200, "application/json", b'{"status": "ok", "version": "1.2"}'))

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        status, kind, body = service.answer
        return web.Response(status=status, body=body, content_type=kind)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    service.url = f"http://127.0.0.1:{port}"
    try:
        yield service
    finally:
        await runner.cleanup()


async def test_admin_cli_exit_3_when_pointed_at_the_ingress_or_below_admin(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    ids = await bury_many(sidecar.store, 3)
    out = tmp_path / "drained.ndjson"
    for url in (sidecar.ingress_url, f"{sidecar.admin_url}/admin"):
        auth = ["--admin-url", url, "--token", TOKEN]
        results = await asyncio.gather(
            dlq("list", *auth),
            dlq("show", ids[0], *auth),
            dlq("replay", "--all", *auth),
            dlq("drain", "--out", str(out), *auth),
        )
        for r in results:
            assert r.code == 3, (url, r.code, r.err)
            assert one_line(r.err) and "is not the admin API" in r.err and r.out == ""
    assert rdb.zcard(KEYS.dlq_items()) == 3 and not out.exists()  # nothing drained, no empty file left
    # the admin API's own 404s still mean "not found"
    auth = ["--admin-url", sidecar.admin_url, "--token", TOKEN]
    missing, no_route = await asyncio.gather(
        dlq("show", "0123456789abcdef01234567", *auth), dlq("drain", "--route", "nosuch", *auth)
    )
    assert (missing.code, no_route.code) == (5, 5) and "no dead letter" in missing.err


async def test_admin_cli_exit_3_when_another_service_answers(foreign: Foreign, tmp_path: Path) -> None:
    out = tmp_path / "drained.ndjson"
    auth = ["--admin-url", foreign.url, "--token", TOKEN]
    commands = [
        ["list"],
        ["list", "--json"],
        ["show", "abc"],
        ["show", "abc", "--json"],
        ["replay", "--all"],
        ["replay", "--all", "--dry-run"],
        ["drain", "--out", str(out)],
    ]
    answers = [
        (200, "application/json", b'{"status": "ok", "version": "1.2"}'),
        (200, "application/json", b'{"items": [{"name": "x"}], "total": "many"}'),
        (200, "application/json", b"[1, 2, 3]"),
        (404, "application/json", b'{"error": "not_found"}'),  # its OpenAPI document is not found either
        (401, "application/json", b'{"message": "login first"}'),
        (200, "text/html", b"<html>welcome</html>"),
    ]
    for answer in answers:
        foreign.answer = answer
        results = [await dlq_here(*args, *auth) for args in commands]  # 42 calls: in process
        for args, r in zip(commands, results, strict=True):
            assert r.code == 3, (answer, args, r.code, r.err)
            assert one_line(r.err) and "is not the admin API" in r.err and r.out == "", (answer, args, r.err)
    assert not out.exists()
    # NDJSON of the wrong shape: nothing goes into --out; the line is kept aside, as a drained item would be
    foreign.answer = (200, "application/x-ndjson", b'{"event": "deploy"}\n')
    r = await dlq("drain", "--out", str(out), *auth, cwd=tmp_path)
    assert r.code == 3 and one_line(r.err) and "not a dead letter" in r.err, r.err
    assert "and 1 partial line(s) (not a whole dead letter) are saved in" in r.err, r.err
    assert not out.exists() and (tmp_path / "drained.ndjson.unwritten.ndjson").exists()


async def test_admin_cli_drain_exit_2_when_out_cannot_be_opened(
    sidecar: Running, rdb: redis.Redis, tmp_path: Path
) -> None:
    await bury_many(sidecar.store, 3)
    auth = ["--admin-url", sidecar.admin_url, "--token", TOKEN]
    no_dir, a_dir = await asyncio.gather(
        dlq("drain", "--out", "/nonexistent/dir/x.ndjson", *auth), dlq("drain", "--out", str(tmp_path), *auth)
    )
    assert no_dir.code == 2 and one_line(no_dir.err), no_dir.err
    assert "/nonexistent/dir/x.ndjson" in no_dir.err and "No such file or directory" in no_dir.err
    assert (
        a_dir.code == 2
        and one_line(a_dir.err)
        and str(tmp_path) in a_dir.err
        and "Is a directory" in a_dir.err
    )
    assert rdb.zcard(KEYS.dlq_items()) == 3 and "dlq drain:" not in sidecar.proc.log()


@pytest.mark.parametrize("command", [("replay", "--dry-run"), ("drain",), ("list",)])
async def test_admin_cli_an_empty_route_is_a_usage_error_not_every_route(command: tuple[str, ...]) -> None:
    """`--route "$ROUTE"` with ROUTE unset drained or replayed every route."""
    out = await dlq(*command, "--route", "", "--admin-url", "http://127.0.0.1:1", "--token", "t")
    assert out.code == 2 and "--route must name a route" in out.err


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999"])
async def test_admin_cli_a_malformed_admin_url_is_a_usage_error(url: str) -> None:
    out = await dlq("list", "--admin-url", url, "--token", "t")
    assert (
        out.code == 2 and "Traceback" not in out.err and out.err.startswith("sidecar dlq list: --admin-url")
    )


def test_cli_times_take_the_space_rfc_3339_allows_for_the_t() -> None:
    """`--since "$(date --rfc-3339=seconds)"` prints a space for the T (RFC 3339 5.6 allows it); the API takes the T
    only, and the operator got a 400 saying the time was no RFC 3339 time (an e2e audit)."""
    assert _time_arg("2026-11-25 15:45:15-05:00") == "2026-11-25T15:45:15-05:00"
    assert _time_arg("2026-11-25T15:45:15Z") == "2026-11-25T15:45:15Z"
    assert _time_arg("1764100000") == "1764100000" and _time_arg(None) is None
    assert _time_arg("yesterday at noon") == "yesterday at noon"
