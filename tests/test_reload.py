"""Hot reload: secret rotation through a Kubernetes-style symlink swap under load, bad configs refused, SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import RUNTIME, create_app
from sidecar.config import Config, load, load_with_text
from sidecar.errors import ConfigError
from sidecar.reload import APPLIED_LIVE, RESTART_ONLY, regular_or_missing, settings
from tests.conftest import Upstream, watched_config
from tests.procs import SidecarProcess, free_port, wait_until


@contextlib.asynccontextmanager
async def reloading(
    config: Config, path: Path, text: str, redis_url: str
) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A sidecar (no retry worker) started from `config`, read as `text` from `path`: (its test client, its
    runtime, its reloader, which watches `path`)."""
    app = create_app(config, redis_url=redis_url, run_worker=False, config_path=str(path), config_text=text)
    async with TestClient(TestServer(app)) as client:
        reloader = app[RUNTIME].reloader
        assert reloader is not None
        yield client, app[RUNTIME], reloader


OLD, NEW = "whsec_old_rotation_secret", "whsec_new_rotation_secret"


class SecretMount:
    """A directory laid out like a mounted Kubernetes Secret: `<name> -> ..data/<name>`, `..data -> ..<stamp>`.
    kubelet updates it by writing a new stamped directory and renaming a new `..data` symlink over the old one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.n = 0

    def write(self, files: dict[str, str]) -> None:
        self.n += 1
        stamp = self.root / f"..2026_11_24_{self.n:04d}"
        stamp.mkdir()
        for name, content in files.items():
            (stamp / name).write_text(content + "\n")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, self.root / "..data")  # atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)


def config_text(upstream: str, redis_url: str, secret_files: list[str], extra_route: str = "") -> str:
    stripe = f"""  - name: stripe
    path: /webhooks/stripe
    provider: stripe
    secret_files: {json.dumps(secret_files)}
"""
    return watched_config(upstream, redis_url, "t", stripe + extra_route)


def signed(body: bytes, secret: str) -> dict[str, str]:
    t = int(time.time())
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


async def test_reload_secret_rotation_under_load_drops_nothing(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: Any
) -> None:
    mount = SecretMount(tmp_path / "secrets")
    mount.write({"current": OLD, "previous": ""})
    files = [str(mount.root / "current"), str(mount.root / "previous")]
    cfg_path = tmp_path / "sidecar.yaml"
    cfg_path.write_text(config_text(upstream.url, redis_url, files))
    app = create_app(load(cfg_path), redis_url=redis_url, run_worker=False, config_path=str(cfg_path))
    statuses: dict[str, list[int]] = {OLD: [], NEW: []}
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        stop = asyncio.Event()
        counter = iter(range(1_000_000))

        async def load_with(secret: str) -> None:
            while not stop.is_set():
                body = json.dumps({"id": f"evt_r{next(counter)}", "type": "invoice.paid"}).encode()
                resp = await client.post("/webhooks/stripe", data=body, headers=signed(body, secret))
                statuses[secret].append(resp.status)
                await asyncio.sleep(0.002)

        # Phase 1: only the old secret; senders sign with it.
        old_sender = asyncio.create_task(load_with(OLD))
        await asyncio.sleep(0.3)
        # Phase 2 (overlap): the new secret is added beside the old; a second sender signs with the new one.
        mount.write({"current": NEW, "previous": OLD})
        assert await wait_until(lambda: runtime.telemetry.config_reloads["applied"] >= 1)
        new_sender = asyncio.create_task(load_with(NEW))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(old_sender, new_sender)
        assert statuses[OLD] and statuses[NEW]
        assert set(statuses[OLD]) == {200} and set(statuses[NEW]) == {200}  # zero valid requests failed
        # Phase 3: the old secret is removed; requests signed with it are refused.
        mount.write({"current": NEW, "previous": ""})
        assert await wait_until(lambda: runtime.telemetry.config_reloads["applied"] >= 2)
        body = json.dumps({"id": "evt_after", "type": "invoice.paid"}).encode()
        assert (await client.post("/webhooks/stripe", data=body, headers=signed(body, OLD))).status == 401
        assert (await client.post("/webhooks/stripe", data=body, headers=signed(body, NEW))).status == 200
    total = len(statuses[OLD]) + len(statuses[NEW])
    print(f"\n[figures] rotation under load: {total} signed requests, 0 failed during overlap")


async def test_reload_bad_config_is_refused_and_old_keeps_serving(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: Any
) -> None:
    secret = tmp_path / "s"
    secret.write_text(OLD)
    cfg_path = tmp_path / "sidecar.yaml"
    cfg_path.write_text(config_text(upstream.url, redis_url, [str(secret)]))
    app = create_app(load(cfg_path), redis_url=redis_url, run_worker=False, config_path=str(cfg_path))
    async with TestClient(TestServer(app)) as client:
        runtime = app[RUNTIME]
        cfg_path.write_text(cfg_path.read_text().replace("provider: stripe", "provider: no-such-provider"))
        assert await wait_until(lambda: runtime.telemetry.config_reloads["rejected"] >= 1)
        body = json.dumps({"id": "evt_keep", "type": "invoice.paid"}).encode()
        assert (await client.post("/webhooks/stripe", data=body, headers=signed(body, OLD))).status == 200
        # A good config with a new route is then picked up.
        cfg_path.write_text(
            config_text(
                upstream.url,
                redis_url,
                [str(secret)],
                "  - {name: plain, path: /webhooks/plain, provider: none, event_id: body_sha256}\n",
            )
        )
        assert await wait_until(lambda: runtime.telemetry.config_reloads["applied"] >= 1)
        assert (await client.post("/webhooks/plain", data=b"hello")).status == 200
        assert runtime.telemetry.config_reloads["rejected"] == 1


@pytest.mark.slow
async def test_reload_sighup_applies_new_routes_in_a_running_process(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: Any, processes: list[Any]
) -> None:
    secret = tmp_path / "s"
    secret.write_text(OLD)
    port = free_port()
    cfg_path = tmp_path / "sidecar.yaml"
    text = config_text(upstream.url, redis_url, [str(secret)]).replace("127.0.0.1:0", f"127.0.0.1:{port}", 1)
    text = text.replace('admin: {listen: "127.0.0.1:0"', f'admin: {{listen: "127.0.0.1:{free_port()}"')
    text = text.replace("reload_interval: 100ms", "reload_interval: 1h")  # only SIGHUP can reload here
    cfg_path.write_text(text)
    proc = SidecarProcess(cfg_path)
    processes.append(proc)
    proc.start(port)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/webhooks/plain", data=b"x") as resp:
            assert resp.status == 404
        cfg_path.write_text(
            text + "  - {name: plain, path: /webhooks/plain, provider: none, event_id: body_sha256}\n"
        )
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        status = 404
        while time.monotonic() < deadline and status == 404:
            async with http.post(f"http://127.0.0.1:{port}/webhooks/plain", data=b"x") as resp:
                status = resp.status
            await asyncio.sleep(0.1)
        assert status == 200
    assert "config reloaded (SIGHUP)" in proc.log()


def settings_config(
    upstream: str, redis_url: str, server: str, token: str = "reload-test-token", listen: str = "127.0.0.1:0"
) -> str:
    return f"""
server: {{listen: "{listen}", {server}}}
admin: {{listen: "127.0.0.1:0", token: "{token}"}}
redis: {{url: "{redis_url}", shards: 4}}
upstream: {{url: "{upstream}", timeout: 2s}}
routes:
  - {{name: plain, path: /webhooks/plain, provider: none, event_id: body_sha256}}
"""


def reload_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(warnings, infos) the reloader logged since the last `caplog.clear()`."""
    records = [r for r in caplog.records if r.name == "sidecar.reload"]
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    return warnings, [r.getMessage() for r in records if r.levelno == logging.INFO]


async def test_reload_reports_per_key_what_applies_now_and_what_waits_for_a_restart(
    tmp_path: Path, upstream: Upstream, redis_url: str, rdb: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cfg_path = tmp_path / "sidecar.yaml"
    started = "reload_interval: 1h, max_body_bytes: 65536"  # 1h: only the reloads below, no file watch race
    cfg_path.write_text(settings_config(upstream.url, redis_url, started))
    app = create_app(load(cfg_path), redis_url=redis_url, run_worker=False, config_path=str(cfg_path))
    async with TestClient(TestServer(app)) as client:
        reloader = app[RUNTIME].reloader
        assert reloader is not None
        assert (await client.post("/webhooks/plain", data=b"a" * 1000)).status == 200

        # server.max_body_bytes applies at once: said so, and no restart asked for
        caplog.clear()
        smaller = "reload_interval: 1h, max_body_bytes: 512"
        cfg_path.write_text(settings_config(upstream.url, redis_url, smaller))
        assert await reloader.reload("SIGHUP")
        warnings, infos = reload_lines(caplog)
        assert warnings == []
        assert any("applied now: server.max_body_bytes (was 65536, new 512)" in m for m in infos), infos
        assert (await client.post("/webhooks/plain", data=b"b" * 1000)).status == 413

        # restart-only keys: named with the running and the new value (a secret by name only)
        caplog.clear()
        elsewhere = "redis://:reload-test-password@127.0.0.1:1"
        cfg_path.write_text(
            settings_config(
                upstream.url,
                elsewhere,
                smaller + ", workers: 2",
                token="another-admin-token",
                listen=f"127.0.0.1:{free_port()}",  # port 0 is for one worker only
            )
        )
        assert await reloader.reload("SIGHUP")
        warnings, _ = reload_lines(caplog)
        assert len(warnings) == 1, warnings
        assert "restart needed for" in warnings[0]
        assert "server.workers (running 1, new 2)" in warnings[0] and "admin.token" in warnings[0]
        assert "redis.url (running 'redis://127.0.0.1:" in warnings[0]
        assert "new 'redis://:***@127.0.0.1:1')" in warnings[0]
        assert "server.max_body_bytes" not in warnings[0]
        assert "another-admin-token" not in warnings[0] and "reload-test-password" not in warnings[0]

        # put back to what is running: nothing waits for a restart any more
        caplog.clear()
        cfg_path.write_text(settings_config(upstream.url, redis_url, smaller))
        assert await reloader.reload("SIGHUP")
        warnings, infos = reload_lines(caplog)
        assert warnings == []
        assert any("server.workers, admin.token, redis.url back to the running values" in m for m in infos), (
            infos
        )

        # redis.shards: the restart asked for would be refused on this store, and the reload says so (a review)
        caplog.clear()
        cfg_path.write_text(
            settings_config(upstream.url, redis_url, smaller).replace("shards: 4", "shards: 8")
        )
        assert await reloader.reload("SIGHUP")
        warnings, _ = reload_lines(caplog)
        assert len(warnings) == 2 and "redis.shards (running 4, new 8)" in warnings[0], warnings
        assert "started with redis.shards 8 refuses to start on this store" in warnings[1], warnings
        assert "written with 4 shards" in warnings[1]
        cfg_path.write_text(settings_config(upstream.url, redis_url, smaller))
        assert await reloader.reload("SIGHUP")

        # server.reload_interval applies at once too: from 1h to 100ms, file changes are picked up again
        cfg_path.write_text(settings_config(upstream.url, redis_url, "reload_interval: 100ms"))
        assert await reloader.reload("SIGHUP")
        applied = app[RUNTIME].telemetry.config_reloads["applied"]
        cfg_path.write_text(
            settings_config(upstream.url, redis_url, "reload_interval: 100ms, max_body_bytes: 2048")
        )
        assert await wait_until(
            lambda: app[RUNTIME].telemetry.config_reloads["applied"] > applied, timeout=10
        )
        assert (await client.post("/webhooks/plain", data=b"c" * 1000)).status == 200


def test_reload_every_setting_outside_routes_and_retry_is_classified() -> None:
    """A key added to a section later must be placed: applied live, or reported as waiting for a restart."""
    sections = ("server", "admin", "redis", "upstream", "dedupe", "retry", "dlq", "logging")
    everything = set(settings(Config(), sections))
    restart, live = set(settings(Config(), RESTART_ONLY)), set(settings(Config(), APPLIED_LIVE))
    assert restart & live == set()
    assert everything == restart | live
    assert {f.name for f in dataclasses.fields(Config)} - set(sections) == {
        "routes",
        "source",
        "file_digests",  # what the load read from the secret files: the watcher's, not a setting
    }  # route_changes


def test_reload_log_names_what_changed_in_the_routes_and_retry() -> None:
    """An external check rotated secrets, removed a route, changed `types` and the retry settings under load: each
    reload logged only "N route(s)". Now each change is named; secrets by name only."""
    from sidecar.config import load_text
    from sidecar.reload import describe, route_changes

    def config(secret: str, types: str, routes: str, retry: str) -> Config:
        text = f"""
upstream: {{url: "http://127.0.0.1:3000"}}
retry: {{{retry}}}
routes:
  - {{name: s, path: /s, provider: stripe, secrets: ["{secret}"], types: [{types}]}}
  - {{name: o, path: /o, provider: none, retry: {{max_attempts: 9}}}}
{routes}"""
        return load_text(text, source="<t>", env={})

    old = config(
        "whsec_old_value", '"invoice.*"', "  - {name: gone, path: /g, provider: none}", "base_delay: 1s"
    )
    new = config(
        "whsec_new_value",
        '"invoice.*", "charge.*"',
        "  - {name: fresh, path: /f, provider: none}",
        "base_delay: 2s",
    )
    lines = route_changes(old, new)
    assert lines[:2] == ["routes added: fresh", "routes removed: gone"]
    [s_line] = [line for line in lines if line.startswith("route s:")]
    assert "secrets" in s_line and "types (was ('invoice.*',), new ('invoice.*', 'charge.*'))" in s_line
    assert "whsec_" not in " ".join(lines)
    assert "retry" not in s_line  # it follows the global retry: said once, below
    [o_line] = [line for line in lines if line.startswith("route o:")]
    assert "retry.base_delay (was 1.0, new 2.0)" in o_line  # its own overrides merged with a changed global
    # a change of the global retry alone: said once (retry.*), no empty line per route that follows it
    retried = config(
        "whsec_old_value", '"invoice.*"', "  - {name: gone, path: /g, provider: none}", "base_delay: 3s"
    )
    assert route_changes(old, retried) == [
        "route o: retry.base_delay (was 1.0, new 3.0)"
    ]  # o has overrides of its own: its merged retry is its own line
    live_old, live_new = settings(old, APPLIED_LIVE), settings(new, APPLIED_LIVE)
    assert describe(["retry.base_delay"], live_old, live_new, "was ") == "retry.base_delay (was 1.0, new 2.0)"


async def test_reload_lowering_upstream_timeout_does_not_shorten_leases_under_running_forwards(
    sidecar_factory: Any,
) -> None:
    """`upstream.timeout` waits for a restart (the forwarder keeps the one it started with), so the lease, which
    must outlast a forward, keeps following the forwarder's: a reload that lowered it used to shorten leases under
    forwards still bound by the old timeout, and another replica could take and deliver an event twice."""
    from sidecar.routes import RouteTable
    from tests.test_ingress import ROUTES

    client = await sidecar_factory(ROUTES)
    dispatcher = client.server.app[RUNTIME].dispatcher
    route = dispatcher.config.routes[0]
    before = dispatcher.lease_ms(route)
    assert before == int((2 * dispatcher.forwarder.timeout + 20) * 1000)
    lowered = dataclasses.replace(
        dispatcher.config, upstream=dataclasses.replace(dispatcher.config.upstream, timeout=1.0)
    )
    dispatcher.table = RouteTable.build(lowered)  # what a reload swaps in
    assert dispatcher.config.upstream.timeout == 1.0
    assert dispatcher.lease_ms(dispatcher.config.routes[0]) == before


def test_reload_log_shows_urls_without_passwords_or_query_values() -> None:
    from sidecar.reload import describe

    shown = describe(
        ["upstream.url"],
        {"upstream.url": "http://recv.internal/hook?token=old-secret"},
        {"upstream.url": "https://user:pw-secret@recv.internal/hook?api_key=new-secret&v=2"},
        "running ",
    )
    assert "secret" not in shown, shown
    assert shown == (
        "upstream.url (running 'http://recv.internal/hook?token=***', "
        "new 'https://user:***@recv.internal/hook?api_key=***&v=***')"
    )


async def test_an_edit_made_after_the_config_was_read_at_start_is_taken_by_the_watcher(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    """The file is edited after the process read it and before its reloader looked (a restarted worker, or any
    sidecar, still starting): the watcher must take the edit, not record the new file as what is running."""
    cfg_path = tmp_path / "sidecar.yaml"
    started = "reload_interval: 1h, max_body_bytes: 65536"
    text = settings_config(upstream.url, redis_url, started)
    cfg_path.write_text(text)
    config = load(cfg_path)
    cfg_path.write_text(settings_config(upstream.url, redis_url, "reload_interval: 1h, max_body_bytes: 512"))
    async with reloading(config, cfg_path, text, redis_url) as (client, _, reloader):
        assert await reloader.check()  # the edit is a change against what was loaded
        assert (await client.post("/webhooks/plain", data=b"b" * 1000)).status == 413
        assert not await reloader.check()  # and taken once


async def test_a_secret_file_rotated_after_it_was_read_at_start_is_taken_by_the_watcher(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    """The watcher started from the config text that was loaded, but from the secret files as they were a moment
    later: a secret rotated while the process started was recorded as running, and deliveries signed with the new
    one got 401 until some file changed again (a review of the fix for the config file's case)."""
    from tests.test_ingress import stripe_body, stripe_headers

    secret = tmp_path / "stripe.secret"
    secret.write_text("whsec_old\n")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        settings_config(upstream.url, redis_url, "reload_interval: 1h").split("routes:")[0]
        + f'routes:\n  - {{name: stripe, path: /webhooks/stripe, provider: stripe, secret_files: ["{secret}"]}}\n'
    )
    config, text = load_with_text(cfg)  # what `sidecar run` does first
    secret.write_text("whsec_new\n")  # rotated while the process is still starting
    async with reloading(config, cfg, text, redis_url) as (client, _, reloader):
        assert await reloader.check()  # a change against what was loaded
        body = stripe_body("evt_rotated")
        resp = await client.post(
            "/webhooks/stripe", data=body, headers=stripe_headers(body, secret="whsec_new")
        )
        assert resp.status == 200
        assert not await reloader.check()


async def test_a_config_read_from_a_pipe_is_not_watched(
    tmp_path: Path, upstream: Upstream, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`sidecar run --config <(…)`: the watcher read the pipe again, found it empty, and refused a "change" (an
    empty config) a second after start; a FIFO with no writer would block it. A file that is not a regular file is
    read once, at start, and not watched."""
    fifo = tmp_path / "sidecar.fifo"
    os.mkfifo(fifo)
    text = settings_config(upstream.url, redis_url, "reload_interval: 1h")

    def feed() -> None:
        with open(fifo, "w") as f:
            f.write(text)

    writer = asyncio.get_running_loop().run_in_executor(None, feed)
    config, loaded = load_with_text(fifo)
    await asyncio.wait_for(writer, 5)
    assert loaded == text
    async with reloading(config, fifo, loaded, redis_url) as (_, _, reloader):
        # no change, and no read of the pipe (no writer now)
        assert not await asyncio.wait_for(reloader.check(), 5)
        # SIGHUP: refused, saying why, instead of a reader blocked for good (and the shutdown waiting for it)
        with caplog.at_level(logging.ERROR, logger="sidecar.reload"):
            assert not await asyncio.wait_for(reloader.reload("SIGHUP"), 5)
        assert any("is not a regular file" in r.getMessage() for r in caplog.records)


def test_a_config_named_by_a_process_descriptor_is_not_a_regular_file(tmp_path: Path) -> None:
    """`--config <(…)` is /dev/fd/63 in the supervisor and names nothing in a worker, which took it for a missing
    file: each worker logged a refused reload at start (a review). A descriptor path is never re-read."""
    assert not regular_or_missing("/dev/fd/63") and not regular_or_missing("/proc/self/fd/0")
    assert not regular_or_missing("/dev/stdin")
    regular = tmp_path / "sidecar.yaml"
    regular.write_text("x")
    assert regular_or_missing(str(regular)) and regular_or_missing(str(tmp_path / "missing.yaml"))


async def test_a_config_file_unreadable_for_lack_of_descriptors_is_not_a_change(
    tmp_path: Path, upstream: Upstream, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """`ulimit -n` reached (a flood of connections): the watcher's read of the untouched config file fails with
    EMFILE. That is no change of the file: no reload refused (an error line, `rejected` counted), and no reload
    applied once the descriptors are back (os-resources audit: both, every time the process ran out)."""
    import errno as errno_

    cfg_path = tmp_path / "sidecar.yaml"
    text = settings_config(upstream.url, redis_url, "reload_interval: 1h")
    cfg_path.write_text(text)
    async with reloading(load(cfg_path), cfg_path, text, redis_url) as (_, runtime, reloader):
        assert not await reloader.check()

        def out_of_descriptors(self: Path, *args: Any, **kwargs: Any) -> Any:
            raise OSError(errno_.EMFILE, os.strerror(errno_.EMFILE), str(self))

        with monkeypatch.context() as m:
            m.setattr(Path, "read_text", out_of_descriptors)
            m.setattr(Path, "read_bytes", out_of_descriptors)
            with caplog.at_level(logging.WARNING, logger="sidecar.reload"):
                assert not await reloader.check()
            assert "cannot read" in caplog.text and "Too many open files" in caplog.text
        assert (
            not await reloader.check()
        )  # the descriptors are back, the file is as it was: nothing to reload
        assert runtime.telemetry.config_reloads["rejected"] == 0
        assert runtime.telemetry.config_reloads["applied"] == 0
        # an edit is still taken
        cfg_path.write_text(
            settings_config(upstream.url, redis_url, "reload_interval: 1h, max_body_bytes: 512")
        )
        assert await reloader.check()
        # an edit seen, then its load out of descriptors (the file or a secret): put off, not refused, and taken at
        # the next look (it was counted refused and, its digest already seen, not taken until the next edit)
        import sidecar.reload

        def load_out_of_descriptors(path: Any) -> Any:
            try:
                raise OSError(errno_.EMFILE, os.strerror(errno_.EMFILE), str(path))
            except OSError as exc:
                raise ConfigError(
                    [f"{path}:1: <file>: cannot read the config file ({exc.strerror})"]
                ) from exc

        cfg_path.write_text(
            settings_config(upstream.url, redis_url, "reload_interval: 1h, max_body_bytes: 1024")
        )
        with monkeypatch.context() as m:
            m.setattr(sidecar.reload, "load_with_text", load_out_of_descriptors)
            assert not await reloader.check()
        assert runtime.telemetry.config_reloads["rejected"] == 0
        assert await reloader.check()
        assert runtime.dispatcher.config.server.max_body_bytes == 1024


async def test_a_worker_that_takes_its_siblings_config_over_a_broken_file_does_not_refuse_it_again(
    tmp_path: Path, upstream: Upstream, redis_url: str
) -> None:
    """A restarted worker whose config file is broken takes the config its siblings applied (`reload(text=…)`),
    which may watch secret files the start-up config did not: the file stays refused until it changes again, not
    refused once more (an error line, `rejected` counted) at the next look because the watched set grew."""
    cfg_path, secret = tmp_path / "sidecar.yaml", tmp_path / "route.secret"
    secret.write_text("whsec_rotated-secret\n")
    started = settings_config(upstream.url, redis_url, "reload_interval: 1h")
    cfg_path.write_text(started)
    async with reloading(load(cfg_path), cfg_path, started, redis_url) as (_, runtime, reloader):
        applied = started + (
            f"  - {{name: filed, path: /webhooks/filed, provider: stripe, secret_files: ['{secret}']}}\n"
        )
        cfg_path.write_text("routes: [\n")  # broken since the siblings applied `applied`
        assert await reloader.reload("worker start, the config the other workers run", text=applied)
        assert [r.name for r in runtime.dispatcher.config.routes] == ["plain", "filed"]
        assert not await reloader.check()
        assert runtime.telemetry.config_reloads == {"applied": 1, "rejected": 0}
        secret.write_text("whsec_rotated-again\n")  # a change of a file it now watches is still taken
        assert not await reloader.check()  # refused: the config file is still broken
        assert runtime.telemetry.config_reloads == {"applied": 1, "rejected": 1}
