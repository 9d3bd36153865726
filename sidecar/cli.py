"""`sidecar run | check-config` (console script `sidecar`, also `python -m sidecar`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sidecar import __version__
from sidecar.admin_client import add_dlq_parser
from sidecar.config import Config, check_config, load, load_text, load_with_text
from sidecar.errors import ConfigError, SidecarError
from sidecar.logs import LEVELS, setup_logging

if TYPE_CHECKING:
    from sidecar.config import Config

# The server (aiohttp, the store, OpenTelemetry) is imported where it is used, so `sidecar dlq …` and
# `sidecar check-config` start in a fraction of the time.

log = logging.getLogger("sidecar")

DEFAULT_CONFIG = "config/sidecar.yaml"


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG


async def serve(
    config: Config,
    redis_url: str,
    stop: asyncio.Event | None = None,
    config_path: str | None = None,
    admin: bool = True,
    reuse_port: bool = False,
    worker_index: int | None = None,
    reload_at_start: bool = False,
    config_text: str | None = None,
) -> None:
    """Serve the inbound and admin listeners until SIGTERM/SIGINT (or `stop`), then drain gracefully.

    `reuse_port`: share the inbound port with sibling processes (the workers of `server.workers: N`). A single
    process binds it alone, so a second sidecar started on the same port fails instead of quietly sharing it.
    The admin listener is bound before the inbound one, and a listener that cannot be bound stops the start
    with everything set up so far cleaned up: no webhook is taken by a process that is not going to run."""
    from sidecar.admin import create_admin_app
    from sidecar.app import RUNTIME, create_app
    from sidecar.front import FrontRunner, JsonErrorRunner
    from sidecar.peers import PEERS_ENV, PeerCounts, leave_peers_dir, serve_state
    from sidecar.supervisor import APPLIED_CONFIG_NAME

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    peers_dir = os.environ.get(PEERS_ENV) if worker_index is not None else None
    # worker 0 of `server.workers: N` (the one with the admin listener) speaks for all about the store's settings
    app = create_app(
        config,
        redis_url=redis_url,
        config_path=config_path,
        warn_settings=admin,
        reload_at_start=reload_at_start,
        config_text=config_text,
        applied_config=os.path.join(peers_dir, APPLIED_CONFIG_NAME) if peers_dir else None,
    )
    runner = FrontRunner(
        app,
        auto_decompress=False,  # forward exactly the bytes the provider signed
        shutdown_timeout=config.server.shutdown_grace,
        # server.read_timeout also bounds the wait for a request's headers (a client dribbling them, or sitting
        # idle on a keep-alive connection); the body's part is enforced in the ingress (408 read_timeout).
        keepalive_timeout=config.server.read_timeout,
        access_log=None,
        handle_signals=False,
    )
    await runner.setup()
    reloader = app[RUNTIME].reloader
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reloader.reload("SIGHUP")))
    admin_runner = JsonErrorRunner(
        create_admin_app(app),
        shutdown_timeout=config.server.shutdown_grace,  # aiohttp's default is 60 s
        keepalive_timeout=config.server.read_timeout,
        access_log=None,
        handle_signals=False,
    )
    await admin_runner.setup()
    peer_runner = None
    try:
        if peers_dir is not None:  # one of `server.workers: N`: worker 0's /metrics speaks for all
            if worker_index:
                peer_runner = await serve_state(app[RUNTIME].telemetry, peers_dir, worker_index)
            else:
                app[RUNTIME].peer_counts = PeerCounts(peers_dir)
        admin_at = ["served by worker 0"]  # of `server.workers: N`
        if admin:
            admin_at = await _listen(
                admin_runner, config.admin.host, config.admin.port, "admin.listen", config.admin.listen
            )
        inbound_at = await _listen(
            runner,
            config.server.host,
            config.server.port,
            "server.listen",
            config.server.listen,
            reuse_port=reuse_port or None,
        )
    except (OSError, SidecarError):
        await asyncio.gather(*_cleanups(admin_runner, runner, peer_runner), return_exceptions=True)
        raise
    log.info(
        "sidecar listening on %s (admin %s), %d route(s)",
        ", ".join(inbound_at),
        ", ".join(admin_at),
        # the routes served now: a restarted worker may have taken its siblings' config since it started
        len(app[RUNTIME].dispatcher.config.routes),
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests for up to %ss", config.server.shutdown_grace)
        runtime = app[RUNTIME]
        runtime.begin_shutdown(config.server.shutdown_grace)
        # Both listeners drain at once, so an admin call still running does not hold the front's drain back (the
        # pod's grace is one); the store and the session are closed once both are done.
        runtime.admin_closing = asyncio.ensure_future(admin_runner.cleanup())
        closing = [runtime.admin_closing, *_cleanups(runner, peer_runner)]
        for failed in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(failed, BaseException):
                log.error("shutdown: %s", failed, exc_info=failed)
        if peers_dir is not None:
            leave_peers_dir(peers_dir, worker_index)
        # the last spans and metrics, within what is left of the grace (at least a second): an OTLP endpoint that
        # is down or never answers must not hold the process past it
        if not runtime.telemetry.shutdown_within(max(1.0, runtime.grace_left())):
            log.warning(
                "shutdown: the telemetry exporters did not finish their last export in time; left unsent"
            )


def _cleanups(*runners: Any) -> list[Awaitable[None]]:
    """The cleanup of each runner that was made (the workers' counters listener exists in workers 1… only)."""
    return [r.cleanup() for r in runners if r is not None]


def _read_or_none(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class CannotListen(SidecarError):
    """A listener could not be bound (the port is taken, the host does not resolve, …)."""


def cannot_listen(key: str, listen: str, exc: OSError) -> CannotListen:
    return CannotListen(f"cannot listen: {key} {listen!r}: {exc.strerror or exc}")


async def _listen(runner: Any, host: str, port: int, key: str, listen: str, **site: Any) -> list[str]:
    """Listen for `runner` as the config key `key` says; the addresses it is bound to (a port 0 says which one it
    got; each runner has this one site)."""
    from aiohttp import web

    try:
        await web.TCPSite(runner, host, port, **site).start()
    except OSError as exc:
        raise cannot_listen(key, listen, exc) from exc
    return [_address(name) for name in runner.addresses] or [listen]


def _address(name: Any) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        return f"[{name[0]}]:{name[1]}" if ":" in str(name[0]) else f"{name[0]}:{name[1]}"
    return str(name)


def cmd_run(args: argparse.Namespace) -> int:
    if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:  # the console script: see sidecar/__main__.py
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = args.worker_index is not None  # one of `server.workers: N`, started by the supervisor
    if worker:
        from sidecar.supervisor import follow_parent

        follow_parent()
    path = _config_path(args.config)
    text = None
    reload_at_start = False
    try:
        # a worker: the config its supervisor started with (the file may have changed since)
        if args.start_config:
            text = Path(args.start_config).read_text(encoding="utf-8")
            config = load_text(text, path)
            # then what of the file applies live, as a reload; a FIFO or pipe is read once, by the supervisor
            # (opened again here it blocks for good with no writer)
            from sidecar.reload import regular_or_missing

            reload_at_start = regular_or_missing(path) and _read_or_none(path) != text
        else:
            config, text = load_with_text(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except OSError as exc:
        # a worker's start config is its supervisor's copy (removed from under it: say so, not the user's file)
        print(f"{exc.filename or path}: cannot read config: {exc.strerror}", file=sys.stderr)
        return 1
    setup_logging(args.log_level or config.logging.level, config.logging.format, worker=args.worker_index)
    from sidecar.supervisor import (
        STORE_URL_ENV,
        Supervisor,
        claim_ports,
        remove_stale_peers_dirs,
        resolve_workers,
    )

    short = _open_files_limit(config)
    if not worker:  # the supervisor says it once for all its workers
        for line in config.warnings() + short:
            logging.getLogger("sidecar.config").warning("%s", line)
        for left in remove_stale_peers_dirs():
            logging.getLogger("sidecar.supervisor").info(
                "removed %s: a sidecar killed with its workers left it (a copy of its config in it)", left
            )

    embedded = None
    url = args.redis_url or (os.environ.get(STORE_URL_ENV) if worker else None) or config.redis.url
    workers = 1 if worker else resolve_workers(config.server.workers)
    # logging is set up: a fatal error is a log line like the rest
    fatal = logging.getLogger("sidecar").critical
    if url == "embedded" and config.redis.wait_replicas:  # --redis-url embedded: the config could not know
        fatal("sidecar: redis.wait_replicas: the embedded store has no replicas; use 0")
        return 1
    try:
        if workers > 1:  # before anything starts: a port another sidecar holds stops this one here
            for key, host, port, listen in (
                ("server.listen", config.server.host, config.server.port, config.server.listen),
                ("admin.listen", config.admin.host, config.admin.port, config.admin.listen),
            ):
                try:
                    claim_ports((host, port))
                except OSError as exc:
                    raise cannot_listen(key, listen, exc) from exc  # as written: `[::1]:8080`, not `::1:8080`
        if url == "embedded":
            from sidecar.store.embedded import EmbeddedValkey

            embedded = EmbeddedValkey(config.redis.data_dir, config.redis.appendfsync)
            url = embedded.start()
        if workers > 1:
            supervisor = Supervisor(path, url, workers, config.server.shutdown_grace, args.log_level, text)
            return supervisor.run()
        _run_loop(
            serve(
                config,
                url,
                config_path=path,
                admin=not args.worker_index,
                reuse_port=worker,
                worker_index=args.worker_index,
                reload_at_start=reload_at_start,
                config_text=text,
            )
        )
    except (SidecarError, OSError) as exc:
        fatal("sidecar: %s", exc)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _open_files_limit(config: Config) -> list[str]:
    """Raise this process's soft limit of open files to its hard limit (a container's soft limit is often 1024, or
    less, under a hard one far above): out of descriptors, the sidecar resets the connections it cannot accept and
    holds its idle upstream connections all the same. A warning when it stays below what the config can hold
    open: a provider's connection and a receiver's per forward in flight, per receiver."""
    import resource
    from urllib.parse import urlsplit

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    except (ValueError, OSError):  # a hard limit the kernel does not allow (above fs.nr_open): kept as it was
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    origins = {urlsplit(r.upstream or config.upstream.url)[:2] for r in config.routes} or {("", "")}
    needed = 2 * config.upstream.max_connections * len(origins) + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        return [
            f"open files limit {soft} (ulimit -n) is below the {needed} that upstream.max_connections"
            f" ({config.upstream.max_connections} per receiver, {len(origins)} receiver(s)) can hold open: past it,"
            " new connections are reset; raise the limit or lower upstream.max_connections"
        ]
    return []


def _run_loop(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        errors = check_config(args.path)
    except OSError as exc:
        print(f"{args.path}: cannot read config: {exc.strerror}", file=sys.stderr)
        return 1
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 1
    for line in load(args.path).warnings():
        print(f"warning: {line}", file=sys.stderr)
    print(f"{args.path}: OK")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from sidecar.bench import run_bench

    setup_logging("error", "text")
    store_dir = Path(args.store_dir) if args.store_dir else None
    if store_dir is not None and not store_dir.is_dir():
        print(f"sidecar bench: --store-dir {store_dir} is not a directory", file=sys.stderr)
        return 2
    if args.rounds not in (1, 3, 5, 7, 9):  # odd: each ratio is one round's, the median's, as in the table
        print(f"sidecar bench: --rounds must be 1, 3, 5, 7 or 9, not {args.rounds}", file=sys.stderr)
        return 2
    figures = run_bench(
        args.duration, args.connections, upstream=args.upstream, store_dir=store_dir, rounds=args.rounds
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def cmd_demo(_: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo()


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line on stderr (exit 2), as every other error of the CLI is, pointing at --help rather
    than printing the whole usage block; subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


LOG_LEVEL: dict[str, Any] = {"type": str.lower, "choices": LEVELS}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="sidecar", description="Webhook reliability sidecar.")
    parser.add_argument("--log-level", **LOG_LEVEL, help="default: the config's logging.level, then info")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve")
    run.add_argument("--config", help=f"config file (default: $SIDECAR_CONFIG, then {DEFAULT_CONFIG})")
    # also after `run` (a walkthrough: `sidecar run --log-level debug` was refused); not given here, the top level's
    run.add_argument("--log-level", **LOG_LEVEL, default=argparse.SUPPRESS, help="as `sidecar --log-level`")
    # Set by the supervisor for its children (server.workers > 1); not for people.
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--start-config", help=argparse.SUPPRESS)
    # the store's URL instead of redis.url (tests); the supervisor passes it in STORE_URL_ENV, off the command line
    run.add_argument("--redis-url", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    bench = sub.add_parser("bench", help="measure the sidecar against a plain pass-through proxy on loopback")
    bench.add_argument("--duration", type=float, default=8.0, help="seconds per scenario (default 8)")
    bench.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds each ratio is the median of: 1, 3 (default), 5, 7 or 9",
    )
    bench.add_argument("--json", dest="json_out", help="also write the figures as JSON to this file")
    bench.add_argument(
        "--upstream",
        choices=("lean", "aiohttp"),
        default="lean",
        help="the receiver behind every scenario: lean (default, ~10-15 us of CPU a request) or aiohttp (~40-50 us)",
    )
    bench.add_argument(
        "--store-dir",
        help="directory for the embedded Valkey's append-only file (default: a temporary directory)",
    )
    bench.set_defaults(func=cmd_bench)
    demo = sub.add_parser("demo", help="a one-minute tour: embedded store, demo receiver, sample events")
    demo.set_defaults(func=cmd_demo)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    add_dlq_parser(sub)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for name, sub in getattr(action, "choices", {}).items():
            if isinstance(sub, argparse.ArgumentParser):
                found[name] = sub
    return found


def _parser_at(parser: argparse.ArgumentParser, argv: Sequence[str], token: str) -> argparse.ArgumentParser:
    """The (sub)command parser in force where `token` first appears in `argv`, so an unknown option is named
    against the command it was given to (`sidecar dlq list: error: ... (see sidecar dlq list --help)`, but
    `sidecar: error: ...` for `sidecar --bogus dlq list`), not the top level or the deepest command. A word
    that names a subcommand where it stands, or is an option's value, is not the unknown one, even when it is
    the same word (`sidecar dlq list dlq`, `sidecar --log-level info dlq list info`, or `--log info`, as argparse
    takes an option's unambiguous prefix)."""
    current = parser
    value_next = False
    for arg in argv:
        if value_next:
            value_next = False
            continue
        sub = _subcommands(current).get(arg)
        if sub is not None:
            current = sub
            continue
        if arg == token:
            break
        option = current._option_string_actions.get(arg)
        if option is None and arg.startswith("--") and current.allow_abbrev:  # `--log` for `--log-level`
            named = {
                action for name, action in current._option_string_actions.items() if name.startswith(arg)
            }
            option = named.pop() if len(named) == 1 else None
        value_next = option is not None and option.nargs in (None, 1)  # `--opt VALUE` (not `--opt=VALUE`)
    return current


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _parser_at(parser, argv, unknown[0]).error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_logging(args.log_level or "info", "auto")
    return int(args.func(args))
