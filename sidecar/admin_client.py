"""`sidecar dlq list|show|replay|drain`: a thin client of the admin API (stdlib http.client, nothing to install).

Where it connects: `--admin-url`, else `http://<admin.listen>` from the config (`--config`, `$SIDECAR_CONFIG`,
`config/sidecar.yaml`; a wildcard host becomes loopback), else the default `http://127.0.0.1:9090`. The token:
`--token`, then `$SIDECAR_ADMIN_TOKEN`, then the config's `admin.token`.

Exit codes (scripts may rely on them):

    0  ok
    1  the admin API answered with an error (400, 409, 503, …) or a drain stream broke off
    2  usage: bad arguments, or a config that cannot be read when it is needed
    3  the admin API cannot be reached (refused, timed out, not HTTP)
    4  unauthorized (401): missing or wrong token
    5  not found (404): unknown id or route
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORIZED = 4
EXIT_NOT_FOUND = 5

DEFAULT_CONFIG = "config/sidecar.yaml"
DEFAULT_ADMIN = "127.0.0.1:9090"
# A drain removes an item once the client's TCP acknowledged its line; a small receive buffer keeps the lines
# that could be acknowledged but not yet written to --out (if this process died) to a few items.
DRAIN_RCVBUF = 64 * 1024


class ClientError(Exception):
    """A failure with the exit code that reports it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- where and who ------------------------------------------------------------------------------------------------


def admin_url_from_listen(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def resolve_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """(admin base URL, token) from the flags, the environment and, only when still needed, the config."""
    url: str | None = args.admin_url
    token: str | None = args.token or os.environ.get("SIDECAR_ADMIN_TOKEN") or None
    if url is None or token is None:
        explicit = args.config or os.environ.get("SIDECAR_CONFIG")
        path = explicit or DEFAULT_CONFIG
        if explicit or os.path.exists(path):
            from sidecar.config import load
            from sidecar.errors import ConfigError

            try:
                config = load(path)
            except ConfigError as exc:
                raise ClientError(
                    EXIT_USAGE, f"{exc.errors[0]} (or pass --admin-url and --token to skip the config)"
                ) from None
            except OSError as exc:
                raise ClientError(EXIT_USAGE, f"{path}: cannot read config: {exc.strerror}") from None
            url = url or admin_url_from_listen(config.admin.listen)
            token = token or config.admin.token
    return (url or admin_url_from_listen(DEFAULT_ADMIN)).rstrip("/"), token


# -- HTTP ---------------------------------------------------------------------------------------------------------


class _Connection(http.client.HTTPConnection):
    """HTTPConnection with an optional small receive buffer, set before connecting (it bounds the TCP window)."""

    def __init__(self, host: str, port: int | None, timeout: float, rcvbuf: int | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.rcvbuf = rcvbuf

    def connect(self) -> None:
        if self.rcvbuf is None:
            super().connect()
            return
        last: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                sock.settimeout(self.timeout)
                sock.connect(addr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            self.sock = sock
            return
        raise last or OSError("no address")


@dataclass
class AdminClient:
    base_url: str
    token: str | None
    timeout: float = 60.0

    def _connection(self, rcvbuf: int | None = None) -> http.client.HTTPConnection:
        parts = urlsplit(self.base_url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=self.timeout)
        if parts.scheme != "http" or not parts.hostname:
            raise ClientError(
                EXIT_USAGE, f"--admin-url must be http://host:port or https://…, not {self.base_url!r}"
            )
        return _Connection(parts.hostname, parts.port, self.timeout, rcvbuf)

    def _send(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: Any
    ) -> http.client.HTTPResponse:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        prefix = urlsplit(self.base_url).path.rstrip("/")
        try:
            conn.request(method, prefix + path, body=data, headers=headers)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ClientError(
                EXIT_UNREACHABLE, f"cannot reach the admin API at {self.base_url}: {reason}"
            ) from None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = self._connection()
        try:
            resp = self._send(conn, method, path, body)
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise ClientError(EXIT_UNREACHABLE, f"the admin API broke off its answer: {exc}") from None
            return self._answer(resp.status, raw)
        finally:
            conn.close()

    @contextmanager
    def stream(self, method: str, path: str, body: Any = None) -> Iterator[http.client.HTTPResponse]:
        conn = self._connection(rcvbuf=DRAIN_RCVBUF)
        try:
            resp = self._send(conn, method, path, body)
            if resp.status != 200:
                self._answer(resp.status, resp.read())
            yield resp
        finally:
            conn.close()

    def _answer(self, status: int, raw: bytes) -> Any:
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            raise ClientError(
                EXIT_UNREACHABLE if status < 400 else EXIT_ERROR,
                f"{self.base_url} did not answer like the admin API (HTTP {status}, not JSON)",
            ) from None
        if status < 400:
            return payload
        error = payload.get("error", "error") if isinstance(payload, dict) else "error"
        detail = payload.get("detail", "") if isinstance(payload, dict) else ""
        if status == 401:
            hint = "set --token or SIDECAR_ADMIN_TOKEN (admin.token in the config)"
            raise ClientError(EXIT_UNAUTHORIZED, f"unauthorized: {detail or 'bad token'}; {hint}")
        if status == 404:
            missing = payload.get("ids") if isinstance(payload, dict) else None
            tail = f": {', '.join(missing)}" if missing else ""
            raise ClientError(EXIT_NOT_FOUND, f"not found: {detail}{tail}")
        raise ClientError(EXIT_ERROR, f"{error} (HTTP {status}){': ' + detail if detail else ''}")


# -- output -------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def outcome(item: dict[str, Any]) -> str:
    return _cell(item.get("last_status") or item.get("last_error"))


def print_json(payload: Any, out: IO[str]) -> None:
    out.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def format_item(item: dict[str, Any]) -> str:
    fields = [
        ("id", item.get("id")),
        ("route", item.get("route")),
        ("event id", item.get("event_id")),
        ("attempts", item.get("attempts")),
        ("last status", item.get("last_status")),
        ("last error", item.get("last_error")),
        ("reason", item.get("reason")),
        ("first seen", item.get("first_seen_at")),
        ("dead at", item.get("dead_at")),
        ("request", f"{item.get('method') or '?'} {item.get('path') or '?'}"),
    ]
    lines = [f"{name + ':':<13}{_cell(value)}" for name, value in fields]
    lines.append("headers:")
    lines += [f"  {name}: {value}" for name, value in item.get("headers", [])]
    lines.append("history:")
    for h in item.get("history", []):
        if "replayed_at" in h:
            lines.append(f"  {h['replayed_at']}  replayed  {_cell(h.get('reason'))}")
        else:
            result = _cell(h.get("status") if h.get("status") is not None else h.get("error"))
            lines.append(
                f"  {_cell(h.get('at'))}  attempt {_cell(h.get('attempt'))}  {result}  {h.get('duration_ms')} ms"
            )
    if "body_base64" in item:
        lines += ["body (not UTF-8, base64):", item["body_base64"]]
    else:
        lines += ["body:", item.get("body", "")]
    return "\n".join(lines)


# -- commands -----------------------------------------------------------------------------------------------------


def cmd_list(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    query = {
        k: v
        for k, v in {
            "route": args.route,
            "limit": args.limit,
            "cursor": args.cursor,
            "since": args.since,
            "until": args.until,
            "status": args.status,
        }.items()
        if v is not None
    }
    page = client.request("GET", "/admin/dlq" + (f"?{urlencode(query)}" if query else ""))
    if args.json:
        print_json(page, out)
        return EXIT_OK
    rows = [
        [i["id"], i["route"], i["event_id"], i["attempts"], outcome(i), i["dead_at"], i.get("reason")]
        for i in page["items"]
    ]
    out.write(table(rows, ["ID", "ROUTE", "EVENT ID", "ATTEMPTS", "LAST", "DEAD AT", "REASON"]) + "\n")
    more = f"; next page: --cursor {page['next_cursor']}" if page["next_cursor"] else ""
    print(f"{len(rows)} shown of {page['total']}{more}", file=sys.stderr)
    return EXIT_OK


def cmd_show(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    item = client.request("GET", f"/admin/dlq/{quote(args.id, safe='')}")
    if args.json:
        print_json(item, out)
    else:
        out.write(format_item(item) + "\n")
    return EXIT_OK


def cmd_replay(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    body: dict[str, Any]
    if args.ids:
        body = {"ids": args.ids}
    elif args.route:
        body = {"route": args.route}
    else:
        body = {"all": True}
    if args.dry_run:
        body["dry_run"] = True
    if args.reason:
        body["reason"] = args.reason
    result = client.request("POST", "/admin/dlq/replay", body)
    if args.json:
        print_json(result, out)
    elif "would_replay" in result:
        out.write(f"would replay {result['would_replay']}\n")
    else:
        skipped = result.get("skipped") or {}
        out.write(f"replayed {result['replayed']}\n")
        if skipped.get("pending"):
            out.write(f"skipped {skipped['pending']}: already pending (kept in the DLQ)\n")
        if skipped.get("delivered"):
            out.write(f"removed {skipped['delivered']}: already delivered\n")
    return EXIT_OK


def cmd_drain(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    body: dict[str, Any] = {}
    if args.route:
        body["route"] = args.route
    if args.reason:
        body["reason"] = args.reason
    target = args.out or "stdout"
    sink: IO[bytes]
    # Append, never truncate: a second drain into the same file must not destroy what the first one removed.
    sink = open(args.out, "ab") if args.out else sys.stdout.buffer  # noqa: SIM115
    count = 0
    try:
        with client.stream("POST", "/admin/dlq/drain", body) as resp:
            try:
                while line := resp.readline():
                    sink.write(line)
                    sink.flush()
                    count += 1
            except (OSError, http.client.HTTPException) as exc:
                raise ClientError(
                    EXIT_ERROR,
                    f"drain broke off after {count} item(s) ({type(exc).__name__}); those are in {target}, "
                    "the rest are still in the DLQ",
                ) from None
        if args.out:
            os.fsync(sink.fileno())
    finally:
        if args.out:
            sink.close()
    print(f"drained {count} item(s) to {target}", file=sys.stderr)
    return EXIT_OK


COMMANDS = {"list": cmd_list, "show": cmd_show, "replay": cmd_replay, "drain": cmd_drain}


def usage_problem(args: argparse.Namespace) -> str | None:
    if args.dlq_command == "replay" and sum([bool(args.ids), args.route is not None, args.all]) != 1:
        return "give dead-letter IDs, or --route R, or --all (exactly one of them)"
    return None


def run(args: argparse.Namespace) -> int:
    problem = usage_problem(args)
    if problem:
        print(f"sidecar dlq {args.dlq_command}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        url, token = resolve_target(args)
        client = AdminClient(url, token, timeout=args.timeout)
        return COMMANDS[args.dlq_command](client, args, sys.stdout)
    except ClientError as exc:
        print(f"sidecar dlq {args.dlq_command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


# -- arguments ----------------------------------------------------------------------------------------------------


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError("must be an integer from 1 to 1000")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def add_dlq_parser(sub: Any) -> None:
    """Register `dlq` and its subcommands on the top-level parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-url", help="admin API base URL (default: from the config's admin.listen)")
    common.add_argument(
        "--token", help="admin bearer token (default: $SIDECAR_ADMIN_TOKEN, then admin.token)"
    )
    common.add_argument("--config", help=f"config file (default: $SIDECAR_CONFIG, then {DEFAULT_CONFIG})")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    common.add_argument("--timeout", type=_positive, default=60.0, help="seconds (default 60)")

    dlq = sub.add_parser(
        "dlq",
        help="inspect, replay and drain the dead-letter list (admin API client)",
        description="Exit codes: 0 ok, 1 error answer, 2 usage, 3 unreachable, 4 unauthorized, 5 not found.",
    )
    dlq.set_defaults(func=run)
    cmds = dlq.add_subparsers(dest="dlq_command", required=True)

    ls = cmds.add_parser("list", parents=[common], help="list dead letters (one page)")
    ls.add_argument("--route")
    ls.add_argument("--limit", type=_limit, help="page size, 1..1000 (default 100)")
    ls.add_argument("--cursor", help="next page: the cursor the previous page printed")
    ls.add_argument("--since", help="dead at or after (RFC 3339 or epoch seconds)")
    ls.add_argument("--until", help="dead at or before (RFC 3339 or epoch seconds)")
    ls.add_argument("--status", help="last status: 503, 5xx, or `error` (no status)")

    show = cmds.add_parser("show", parents=[common], help="one dead letter: headers, body, history")
    show.add_argument("id")

    replay = cmds.add_parser(
        "replay", parents=[common], help="send dead letters through the retry worker again"
    )
    replay.add_argument("ids", nargs="*", metavar="ID")
    replay.add_argument("--route", help="every dead letter of this route")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--dry-run", action="store_true", help="only count what would be replayed")
    replay.add_argument("--reason", help="why (logged by the sidecar)")

    drain = cmds.add_parser("drain", parents=[common], help="remove dead letters, writing them out as NDJSON")
    drain.add_argument("--route")
    drain.add_argument("--out", metavar="FILE", help="append the NDJSON here (default: stdout)")
    drain.add_argument("--reason", help="why (logged by the sidecar)")
