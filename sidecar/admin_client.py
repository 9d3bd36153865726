"""`sidecar dlq list|show|replay|drain`: a thin client of the admin API (stdlib http.client, nothing to install).

Where it connects: `--admin-url`, else `http://<admin.listen>` from the config (`--config`, `$SIDECAR_CONFIG`,
`config/sidecar.yaml`; a wildcard host becomes loopback), else the default `http://127.0.0.1:9090`. The token:
`--token`, then `$SIDECAR_ADMIN_TOKEN`, then the config's `admin.token`.

Exit codes (scripts may rely on them):

    0  ok
    1  the admin API answered with an error (400, 409, 503, …), a drain stream broke off, or the output could not
       be written (a full disk, a closed pipe)
    2  usage: bad arguments, an --out that cannot be opened, or a config that cannot be read when it is needed
    3  the admin API cannot be reached (refused, timed out, not HTTP) or what answered is not the admin API
       (another service, the ingress port, a wrong path prefix, answers of the wrong shape)
    4  unauthorized (401): missing or wrong token
    5  not found (404): unknown id or route
   130 interrupted (Ctrl-C)

A drain never lets an item vanish unseen. It is a held drain (`HeldDrain`): the sidecar leaves each item it streams
in the DLQ, held for this drain, and the client removes it only once its line is surely in the output; whatever
stops the drain (the output failing, Ctrl-C, this process killed) leaves the rest in the DLQ. Against a sidecar from
before held drains (`Drain`), every line read is written to the output or, when the output fails (or on Ctrl-C),
saved to a rescue file whose path the error names. Both files are created 0600 (they hold webhook bodies); an
existing --out keeps its mode.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import re
import select
import shlex
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, Any, cast
from urllib.parse import quote, urlencode, urlsplit

from sidecar.admin_spec import DEAD_ID, DRAIN_HEADER, DRAIN_ID, MAX_HOLD, MAX_IDS, MAX_REASON
from sidecar.logs import printable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORIZED = 4
EXIT_NOT_FOUND = 5
EXIT_INTERRUPTED = 130

DEFAULT_CONFIG = "config/sidecar.yaml"
DEFAULT_ADMIN = "127.0.0.1:9090"
# A drain removes an item once the client's TCP acknowledged its line; a small receive buffer keeps the lines
# that could be acknowledged but not yet written to --out (if this process died) to a few items.
DRAIN_RCVBUF = 64 * 1024
# A held drain (the default): how long the server holds the items it streamed, at most, for this client to store
# and remove them (`--hold`); items removed a batch at a time, once surely in the output.
DEFAULT_HOLD = "10m"
REMOVE_BATCH = 200
_DRAIN_ID = re.compile(DRAIN_ID)
_DEAD_ID = re.compile(DEAD_ID)


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
    # trimmed as the sidecar trims it: a token read from a file ends in a newline
    token = token.strip() if token else None
    if token:
        from sidecar.config import control_characters  # as admin.token is checked

        if control_characters(token):
            raise ClientError(
                EXIT_USAGE, "the admin token contains a control character; it cannot be sent in a header"
            )
    return (url or admin_url_from_listen(DEFAULT_ADMIN)).rstrip("/"), token


# -- HTTP ---------------------------------------------------------------------------------------------------------


class _Connection(http.client.HTTPConnection):
    """HTTPConnection with an optional small receive buffer, set before connecting (it bounds the TCP window).
    `raw_sock` outlives `close()` of a connection whose answer said `Connection: close` (the answer still reads
    from it), so a drain can always stop the server's sending on it."""

    def __init__(self, host: str, port: int | None, timeout: float, rcvbuf: int | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self.rcvbuf = rcvbuf
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        if self.rcvbuf is None:
            super().connect()
            self.raw_sock = self.sock
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
            self.sock = self.raw_sock = sock
            return
        raise last or OSError("no address")


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPSConnection that keeps `raw_sock` (as `_Connection` does)."""

    def __init__(self, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        super().connect()
        self.raw_sock = self.sock


def refuse_more(sock: socket.socket | None) -> None:
    """Take nothing more from the server on `sock`, keeping what already arrived readable.

    Why: the server removes an item once our TCP acknowledged its line, whether or not this process read it. A
    shutdown sends FIN; bytes arriving after it are answered with a reset, never acknowledged, so the server counts
    no further item as handed over, and everything it did count is in our buffers, to be read out. The base class's
    shutdown is called on purpose: ssl.SSLSocket.shutdown would drop its decrypted buffer. Safe to repeat, and to
    call from a signal handler (`SigintGuard`).
    """
    if sock is None:
        return
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    # after the shutdown a read never waits; this bounds it should the shutdown have failed
    with suppress(OSError):
        sock.settimeout(1.0)


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class LineReader:
    """The lines of a streamed answer, read so that no byte taken from the socket is ever dropped.

    http.client's readline loses the part of a line it has read when a read fails (a timeout, a reset, an
    exception from a signal handler): the rest of that line would then pass for a whole one, and the line the server
    counted as handed over would be gone. This reader decodes the chunked coding itself and keeps everything it took
    in its own buffers until a whole line is handed out, so after any failure the lines that still arrive (see
    `Stream.received_lines`) are whole. A line cut short stays in `body`, never handed out as a line.
    """

    READ_SIZE = 65536

    def __init__(self, resp: http.client.HTTPResponse, sock: socket.socket | None) -> None:
        self.fp = resp.fp
        self.sock = sock
        self.chunked = bool(resp.chunked)
        self.left = resp.length  # not chunked: body bytes still to come (None: until the connection closes)
        self.raw = bytearray()  # taken from the socket, chunk framing not parsed yet
        self.body = bytearray()  # body bytes not handed out yet: the start of the next line
        self.scanned = 0  # how much of `body` is known to hold no newline
        self.chunk_left = 0  # data bytes of the current chunk still to come
        self.crlf = False  # the CRLF after a chunk's data is still to come
        self.ended = self.left == 0  # the end of the body was seen
        self.timed_out = False

    def readline(self) -> bytes:
        """The next line with its newline; at the end of the body what is left (b"" when nothing is). Raises OSError
        or http.client.HTTPException when the answer breaks off; nothing read is lost (a retry goes on from there)."""
        while True:
            end = self.body.find(b"\n", self.scanned)
            if end >= 0 or self.ended:
                end = end + 1 if end >= 0 else len(self.body)
                line = bytes(self.body[:end])
                del self.body[:end]
                self.scanned = 0
                return line
            self.scanned = len(self.body)
            self._take()

    def _take(self) -> None:
        data = self._read()
        if not data:
            if self.chunked or self.left:
                raise http.client.IncompleteRead(b"")  # the connection closed before the end of the body
            self.ended = True
        elif self.chunked:
            self.raw += data
            self._decode()
        else:
            if self.left is not None:
                data = data[: self.left]
                self.left -= len(data)
                self.ended = self.left == 0
            self.body += data

    def _read(self) -> bytes:
        # socket.SocketIO refuses every read after a timeout; the socket itself does not, and after a timeout the
        # buffered reader holds nothing (read1 reads the socket only when its buffer is empty)
        if self.timed_out and self.sock is not None:
            return self.sock.recv(self.READ_SIZE)
        try:
            return self.fp.read1(self.READ_SIZE)
        except TimeoutError:
            self.timed_out = True
            raise

    def _decode(self) -> None:
        """Move the chunks' data from `raw` to `body`."""
        while not self.ended:
            if self.chunk_left:
                take = min(self.chunk_left, len(self.raw))
                if not take:
                    return
                self.body += self.raw[:take]
                del self.raw[:take]
                self.chunk_left -= take
                if self.chunk_left:
                    return
                self.crlf = True
            if self.crlf:
                if len(self.raw) < 2:
                    return
                if self.raw[:2] != b"\r\n":
                    raise http.client.HTTPException("bad chunked encoding: no CRLF after a chunk")
                del self.raw[:2]
                self.crlf = False
            end = self.raw.find(b"\r\n")
            if end < 0:
                if len(self.raw) > 4096:
                    raise http.client.HTTPException("bad chunked encoding: no chunk size")
                return
            size = bytes(self.raw[:end]).partition(b";")[0].strip()
            del self.raw[: end + 2]
            if not _CHUNK_SIZE.fullmatch(size):
                raise http.client.HTTPException(f"bad chunked encoding: chunk size {size[:20]!r}")
            self.chunk_left = int(size, 16)
            self.ended = self.chunk_left == 0  # the last chunk (its trailer is of no interest)


@dataclass
class Stream:
    """A streamed answer of the admin API and the socket it arrives on."""

    resp: http.client.HTTPResponse
    sock: socket.socket | None
    reader: LineReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = LineReader(self.resp, self.sock)

    def readline(self) -> bytes:
        return self.reader.readline()

    def refuse_more(self) -> None:
        refuse_more(self.sock)

    def received_lines(self) -> list[bytes]:
        """After `refuse_more`: the complete lines still buffered. A line cut short was not acknowledged whole, so
        the server did not count it (it stays in the DLQ); its part is left unread."""
        lines: list[bytes] = []
        while True:
            try:
                line = self.readline()
            except (OSError, http.client.HTTPException):
                return lines
            if not line.endswith(b"\n"):
                return lines
            lines.append(line)


def _read_all(resp: http.client.HTTPResponse) -> bytes:
    try:
        return resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError(EXIT_UNREACHABLE, f"the admin API broke off its answer: {exc!r}") from None


def not_admin_message(base_url: str, what: str) -> str:
    return (
        f"{base_url} is not the admin API ({what}); --admin-url is the admin listener's base URL, "
        "e.g. http://127.0.0.1:9090 (admin.listen, not the webhook port, no /admin)"
    )


def not_the_admin_api(base_url: str, what: str) -> ClientError:
    return ClientError(EXIT_UNREACHABLE, not_admin_message(base_url, what))


@dataclass
class AdminClient:
    base_url: str
    token: str | None
    timeout: float = 60.0

    def _connection(self, rcvbuf: int | None = None) -> _Connection | _TLSConnection:
        bad = ClientError(
            EXIT_USAGE, f"--admin-url must be http://host:port or https://…, not {self.base_url!r}"
        )
        try:  # urlsplit and .port raise ValueError on `http://[::1` or a port out of range
            parts = urlsplit(self.base_url)
            port = parts.port
        except ValueError as exc:
            raise ClientError(EXIT_USAGE, f"{bad}: {exc}") from None
        # each was dropped without a word: credentials in the URL were never sent, a query never applied
        if parts.username is not None or parts.password is not None:
            raise ClientError(EXIT_USAGE, f"{bad}: credentials in the URL are not sent (use --token)")
        if parts.query or parts.fragment or self.base_url.endswith(("?", "#")):
            raise ClientError(
                EXIT_USAGE, f"{bad}: it has a query or fragment (filters are options: see --help)"
            )
        if parts.scheme == "https":
            return _TLSConnection(parts.hostname or "", port, self.timeout)
        if parts.scheme != "http" or not parts.hostname:
            raise bad
        return _Connection(parts.hostname, port, self.timeout, rcvbuf)

    def _send(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: Any
    ) -> http.client.HTTPResponse:
        headers: dict[str, str | bytes] = {"Accept": "application/json"}
        if self.token:
            # as the sidecar reads it (UTF-8): http.client would encode a str as Latin-1 (a 401 for `é`, a
            # UnicodeEncodeError for `€`)
            headers["Authorization"] = b"Bearer " + self.token.encode("utf-8", "surrogateescape")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        prefix = urlsplit(self.base_url).path.rstrip("/")
        try:
            conn.request(method, prefix + path, body=data, headers=headers)
        except UnicodeError:
            # the host does not encode as IDNA (a label over 63 characters, ...), or the URL's path is not ASCII
            what = (
                "its path is not ASCII (percent-encode it)"
                if not prefix.isascii()
                else "the host is not a valid hostname"
            )
            raise ClientError(EXIT_USAGE, f"--admin-url {self.base_url!r}: {what}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        try:
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            if method == "GET" or not isinstance(exc, ConnectionError | TimeoutError):
                # nothing was changed, or what answered is no HTTP server: as good as unreachable
                raise self._unreachable(exc) from None
            # sent, and then no answer (the sidecar was killed, or restarted): it may have acted, in part or all
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ClientError(
                EXIT_ERROR,
                f"the admin API at {self.base_url} took the request but gave no answer ({reason}): it may have "
                "been carried out in part or in full; `sidecar dlq list` shows what is left (a replay is safe to "
                "run again)",
            ) from None

    def _unreachable(self, exc: Exception) -> ClientError:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        return ClientError(EXIT_UNREACHABLE, f"cannot reach the admin API at {self.base_url}: {reason}")

    def _exchange(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = self._connection()
        try:
            resp = self._send(conn, method, path, body)
            return resp.status, _read_all(resp)
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None, *, shape: Shape) -> Any:
        """The answer's JSON, once it has the `shape` the admin API gives (else exit 3: not the admin API)."""
        status, raw = self._exchange(method, path, body)
        payload = self._answer(status, raw, f"{method} {path}")
        if not shape.check(payload):
            raise not_the_admin_api(self.base_url, f"its answer to {method} {path} is not {shape.name}")
        return payload

    @contextmanager
    def stream(
        self, method: str, path: str, body: Any = None, guard: SigintGuard | None = None
    ) -> Iterator[Stream]:
        """The streamed answer. With a `guard` (installed), Ctrl-C raises at once only while connecting (nothing
        sent yet); once connected it stops the server's sending instead (see `SigintGuard`), and a request that
        fails because of that is reported as interrupted (exit 130): nothing was drained."""
        conn = self._connection(rcvbuf=DRAIN_RCVBUF)
        try:
            try:
                if guard is not None:
                    try:
                        conn.connect()
                    except OSError as exc:
                        raise self._unreachable(exc) from None
                    guard.sock = conn.raw_sock
                    guard.eager = False
                resp = self._send(conn, method, path, body)
                if resp.status != 200:
                    self._answer(resp.status, _read_all(resp), f"{method} {path}")
            except ClientError as exc:
                if guard is not None and guard.interrupted and exc.code == EXIT_UNREACHABLE:
                    raise ClientError(
                        EXIT_INTERRUPTED, "interrupted before the drain began; nothing was drained"
                    ) from None
                raise
            kind = (resp.getheader("Content-Type") or "").partition(";")[0].strip().lower()
            if kind != "application/x-ndjson":
                raise not_the_admin_api(self.base_url, f"it answered {kind or 'no Content-Type'}, not NDJSON")
            yield Stream(resp, conn.raw_sock)
        finally:
            conn.close()

    def _answer(self, status: int, raw: bytes, call: str) -> Any:
        """The JSON of a 200 answer; any other answer raised as the error it reports, once it is one the admin API
        gives: `{"error": code, …}` (exit 3 when it is not, e.g. the ingress's 404 `no_route`)."""
        try:
            payload: Any = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            raise not_the_admin_api(self.base_url, f"{call}: HTTP {status}, not JSON") from None
        if status == 200 and payload is not None:
            return payload
        error = payload.get("error") if isinstance(payload, dict) else None
        if status < 400 or not isinstance(error, str):
            raise not_the_admin_api(
                self.base_url, f"{call}: HTTP {status} without the admin API's error body"
            )
        detail = payload.get("detail") or ""
        if status == 401 and error == "unauthorized":
            hint = "set --token or SIDECAR_ADMIN_TOKEN (admin.token in the config)"
            raise ClientError(EXIT_UNAUTHORIZED, f"unauthorized: {detail or 'bad token'}; {hint}")
        if status == 404:
            # The admin API answers an unknown path with the same `not_found` as an unknown id; only a path that
            # exists there (its OpenAPI document) tells "this id is unknown" from "this is not the admin API".
            if error != "not_found" or not self._is_admin_api():
                raise not_the_admin_api(self.base_url, f"{call}: HTTP 404 {error!r}")
            missing = payload.get("ids")
            tail = f": {', '.join(map(str, missing))}" if isinstance(missing, list) and missing else ""
            raise ClientError(EXIT_NOT_FOUND, f"not found: {detail}{tail}")
        if status == 401:
            raise not_the_admin_api(self.base_url, f"{call}: HTTP 401 {error!r}")
        raise ClientError(EXIT_ERROR, f"{error} (HTTP {status}){': ' + str(detail) if detail else ''}")

    def _is_admin_api(self) -> bool:
        try:
            status, raw = self._exchange("GET", "/admin/openapi.json")
            spec = json.loads(raw)
        except (ClientError, ValueError, RecursionError):
            return False
        paths = spec.get("paths") if isinstance(spec, dict) else None
        return status == 200 and isinstance(paths, dict) and "/admin/dlq" in paths


# -- answer shapes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What an answer of the admin API looks like: checked before anything is printed, so a foreign service's
    JSON is an error (exit 3), never a KeyError or an empty table with exit 0."""

    name: str
    check: Callable[[Any], bool]


def is_item(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("id"), str)
        and isinstance(item.get("route"), str)
        and all(k in item for k in ("event_id", "attempts", "dead_at"))
    )


def is_full_item(item: Any) -> bool:
    return (
        is_item(item)
        and isinstance(item.get("headers"), list)
        and isinstance(item.get("history"), list)
        and (isinstance(item.get("body"), str) or isinstance(item.get("body_base64"), str))
    )


def is_page(page: Any) -> bool:
    return (
        isinstance(page, dict)
        and isinstance(page.get("items"), list)
        and all(is_item(i) for i in page["items"])
        and isinstance(page.get("total"), int)
        and "next_cursor" in page
        and (page["next_cursor"] is None or isinstance(page["next_cursor"], str))
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_replay_answer(answer: Any) -> bool:
    return isinstance(answer, dict) and (_count(answer.get("replayed")) or _count(answer.get("would_replay")))


def drained_id(line: bytes) -> str | None:
    """The id of one NDJSON line of a drain, a dead letter (an object with an `id` and a `route`); None when the
    line is not one."""
    try:
        item = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(item, dict) and isinstance(item.get("id"), str) and isinstance(item.get("route"), str):
        return cast(str, item["id"])
    return None


def is_drained_line(line: bytes) -> bool:
    return drained_id(line) is not None


PAGE = Shape("a page of dead letters (items, total, next_cursor)", is_page)
ITEM = Shape("a dead letter (id, route, headers, body, history)", is_full_item)
REPLAY = Shape("a replay count (replayed or would_replay)", is_replay_answer)


# -- output -------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """One field for the terminal: control characters escaped, so an event id, route, error or reason a sender
    or another operator chose cannot act on the terminal (an escape sequence clears it or sets its title)."""
    return "-" if value is None or value == "" else printable(str(value))


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def outcome(item: dict[str, Any]) -> str:
    return _cell(item.get("last_status") or item.get("last_error"))


def print_json(payload: Any, out: IO[str]) -> None:
    # ASCII: a C1 control (U+009B starts an escape sequence) or a header's lone surrogate (a non-UTF-8 byte) is
    # written as a \u escape, not raw (which acted on the terminal, or crashed the write under a strict locale)
    out.write(json.dumps(payload, indent=2, ensure_ascii=True) + "\n")


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
    lines += [f"  {printable(str(name))}: {printable(str(value))}" for name, value in item.get("headers", [])]
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
    elif item.get("body_missing"):
        lines += ["body: (gone from the store: evicted; only the metadata and history are left)"]
    else:  # its line breaks and tabs kept, other control characters escaped (as in every other field)
        lines += ["body:", printable(item.get("body", ""), keep="\n\t")]
    return "\n".join(lines)


# -- drain --------------------------------------------------------------------------------------------------------

# A regular file is fsynced after this many bytes or lines (and at the end); until then its lines are kept here.
SYNC_BYTES = 1 << 20
FINISH_S = 1.0  # how long a Ctrl-C waits for a pipe's reader to take the rest of a line cut short
WAIT_STEP_S = 0.1  # a pipe's write waits for room this long at a time, then looks for a Ctrl-C
SYNC_LINES = 200
RESCUE_NAME = "sidecar-drain.unwritten.ndjson"


class OutputFailed(Exception):
    """A write or fsync of the drain's output failed; `lines` came from the server and are not surely in it."""

    def __init__(self, cause: OSError, lines: list[bytes]) -> None:
        super().__init__(cause.strerror or type(cause).__name__)
        self.lines = lines


class NotDeadLetter(Exception):
    """A drain answer's line that is not a dead letter: what answered is not the admin API."""

    def __init__(self, line: bytes) -> None:
        super().__init__("not a dead letter")
        self.line = line


class Sink:
    """Where drained lines go: --out opened for append, or stdout.

    Written with os.write, so a failed write leaves nothing in a Python buffer for close() or the interpreter's exit
    to fail on again (and hide the first error). In a regular file a line counts as written once fsynced: a failing
    fsync (ENOSPC or EIO found at writeback) means it may not be on disk, so lines are kept until then. A failure
    cuts the file back to its last sure end, when nobody else appended meanwhile: the file never ends in half a line
    and a rescued line is not in it as well.
    """

    def __init__(self, fd: int, name: str, *, owned: bool, sync_lines: int | None = SYNC_LINES) -> None:
        self.fd, self.name, self.owned, self.sync_lines = fd, name, owned, sync_lines
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.synced_end = self._end() if self.regular else 0
        self.unsynced: list[bytes] = []
        self.unsynced_bytes = 0
        self.count = 0  # lines surely in the output
        # whether a Ctrl-C came (the drain's `SigintGuard`): a pipe's write checks it while it waits for room
        self.interrupted: Callable[[], bool] = lambda: False
        # Ctrl-C while part of a line was out in a pipe: it was finished (a whole line in the output), or not
        self.finished_on_interrupt = False
        self.partial_line = False
        # told how many more lines (the oldest written) are surely in the output: a held drain removes them then
        self.on_sure: Callable[[int], None] | None = None

    @classmethod
    def open(cls, path: str, mode: int = 0o600, sync_lines: int | None = SYNC_LINES) -> Sink:
        """Open `path` for append, created with `mode` (0600: the lines hold webhook bodies, secrets and personal
        data; an existing file keeps its mode)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            return cls(fd, path, owned=True, sync_lines=sync_lines)
        except OSError:
            os.close(fd)
            raise

    def _end(self) -> int:
        if fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_APPEND:
            return os.fstat(self.fd).st_size
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def write(self, line: bytes) -> None:
        if not self.regular:
            finished_late = self._write_stream(line)
            self.count += 1
            if self.on_sure is not None:
                self.on_sure(1)
            if finished_late:  # the Ctrl-C that came while the line was part way out
                raise KeyboardInterrupt
            return
        done = 0
        try:
            while done < len(line):
                done += os.write(self.fd, line[done:])
        except OSError as exc:
            raise OutputFailed(exc, [*self._after_failed_write(done), line]) from None
        self.unsynced.append(line)
        self.unsynced_bytes += len(line)
        if self.sync_lines and (len(self.unsynced) >= self.sync_lines or self.unsynced_bytes >= SYNC_BYTES):
            self.sync()

    def _write_stream(self, line: bytes) -> bool:
        """Write `line` to a pipe, terminal or device PIPE_BUF bytes at a time, each once `select` says there is
        room (a writable pipe takes PIPE_BUF bytes without waiting): no write waits for a reader that may never come,
        and a Ctrl-C is seen between the waits. Before any of the line is out, it raises KeyboardInterrupt (the
        caller keeps the whole line); after, the rest goes out if the reader takes it within FINISH_S (True: whole,
        but interrupted), else the line stays cut short (`partial_line`) and KeyboardInterrupt is raised. A Ctrl-C
        used to be raised inside os.write, which could lose count of bytes already out: half a line on stdout."""
        done, finish_by = 0, None
        while done < len(line):
            if finish_by is None and self.interrupted():
                if not done:
                    raise KeyboardInterrupt
                finish_by = time.monotonic() + FINISH_S
            wait = WAIT_STEP_S if finish_by is None else min(WAIT_STEP_S, finish_by - time.monotonic())
            if wait <= 0:
                self.partial_line = True
                raise KeyboardInterrupt
            try:
                if select.select([], [self.fd], [], wait)[1]:
                    done += os.write(self.fd, line[done : done + select.PIPE_BUF])
            except OSError as exc:
                raise OutputFailed(exc, [line]) from None
        self.finished_on_interrupt = finish_by is not None
        return self.finished_on_interrupt

    def _after_failed_write(self, partial: int) -> list[bytes]:
        """Cut off the `partial` bytes of the failed line and make sure of the lines before it; those not sure."""
        if not self.regular:
            return []
        self._cut(self.synced_end + self.unsynced_bytes, partial)
        try:
            self.sync()
        except OutputFailed as exc:
            return exc.lines
        return []

    def sync(self) -> None:
        if not self.regular or not self.unsynced:
            return
        lines, size = self.unsynced, self.unsynced_bytes
        self.unsynced, self.unsynced_bytes = [], 0
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self._cut(self.synced_end, size)
            raise OutputFailed(exc, lines) from None
        self.synced_end += size
        self.count += len(lines)
        if self.on_sure is not None:
            self.on_sure(len(lines))

    def _cut(self, end: int, extra: int) -> None:
        with suppress(OSError):
            if extra and os.fstat(self.fd).st_size == end + extra:
                os.ftruncate(self.fd, end)

    def close(self) -> None:
        # Everything counted was fsynced (or went to a pipe or device, which has nothing more to say at close).
        if self.owned:
            with suppress(OSError):
                os.close(self.fd)


def save_lines(path: str, lines: list[bytes]) -> None:
    """Append `lines` to `path` (created 0600: they hold webhook bodies), fsynced; on failure the file is cut back."""
    sink = Sink.open(path, 0o600, sync_lines=None)
    try:
        for line in lines:
            sink.write(line if line.endswith(b"\n") else line + b"\n")
        sink.sync()
    except OutputFailed as exc:
        raise OSError(exc.args[0]) from None
    finally:
        sink.close()


class SigintGuard:
    """Ctrl-C during a drain, taken only where no line can be cut in two.

    A KeyboardInterrupt raised inside a read drops what the reader took of a line, while the rest of that line may
    already have arrived, been acknowledged and so counted by the server. While installed, SIGINT only sets
    `interrupted` and stops the server's sending (`refuse_more` on `sock`): the read in progress goes on (PEP 475)
    with what already arrived and never waits again, and the drain stops at the next line boundary. It raises at
    once only while connecting (`eager`: nothing sent, nothing can be drained); a write to a full pipe waits for room
    in short steps and looks at `interrupted` between them (`Sink._write_stream`).
    Installed only in the main thread and only over a handled SIGINT (an ignored one stays ignored); the previous
    handler is restored on exit. Re-entrant.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.eager = True
        self.sock: socket.socket | None = None
        self.sink: Sink | None = None
        self._previous: Any = None
        self._depth = 0
        self._installed = False

    def __enter__(self) -> SigintGuard:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None and previous != signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGINT, self._on_sigint)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.interrupted = True
        refuse_more(self.sock)
        if self.eager:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise the Ctrl-C that came meanwhile, if one did."""
        if self.interrupted:
            raise KeyboardInterrupt


class Drain:
    """Copies a drain answer into a Sink, one line at a time, so that no item the server removed vanishes unseen.

    The server removes an item once our TCP acknowledged its line. So a line is written (and, in a file, fsynced in
    batches) before the next one is read, and when the output fails, the answer breaks off or is not a dead letter,
    or Ctrl-C comes, the server is stopped (`Stream.refuse_more`) and every line it may have counted that is not
    surely in the output (the one in hand, the unsynced ones, the ones still buffered) is saved to a rescue file:
    next to --out (`<out>.unwritten.ndjson`), else `sidecar-drain.unwritten.ndjson` in the current directory, else
    in the temp directory, else printed to stderr. The last of them may also still be in the DLQ (the server may
    not have counted it): a duplicate, never a loss. Lines are read whole (`LineReader`) and Ctrl-C is taken between
    lines (`SigintGuard`), so a line is never saved in part while the server counted it whole; a line cut short
    by the stop was not acknowledged whole, so the server did not count it: it stays in the DLQ. A saved line that
    is not a whole dead letter (an answer not from the admin API) is saved all the same, and the message says so.
    """

    def __init__(
        self, client: AdminClient, stream: Stream, sink: Sink, guard: SigintGuard | None = None
    ) -> None:
        self.client, self.stream, self.sink = client, stream, sink
        self.guard = guard or SigintGuard()
        self.held: bytes | None = None  # read from the server, not written yet

    def run(self) -> int:
        self.guard.sock, self.guard.sink, self.guard.eager = self.stream.sock, self.sink, False
        guard = self.guard
        self.sink.interrupted = lambda: guard.interrupted
        with self.guard:
            return self._run()

    def _run(self) -> int:
        code, problem, unwritten = self.copy_all()
        if code == EXIT_OK:
            print(f"drained {self.sink.count} item(s) to {self.sink.name}", file=sys.stderr)
            return EXIT_OK
        raise ClientError(code, f"{problem}; {self.summary(unwritten)}")

    def copy_all(self) -> tuple[int, str, list[bytes]]:
        """Copy the answer into the sink, to its end or until something stops it: (exit code, what stopped it,
        the lines read but not surely written: the one in hand, those a failed write or fsync left unsure, those
        still buffered when the server was stopped)."""
        code, problem, unwritten = EXIT_OK, "", []
        try:
            problem = self.copy()
            code = EXIT_ERROR if problem else EXIT_OK
        except OutputFailed as exc:
            code, problem, unwritten = EXIT_ERROR, f"cannot write to {self.sink.name}: {exc}", exc.lines
        except NotDeadLetter as exc:
            problem = not_admin_message(
                self.client.base_url, "a line of its drain answer is not a dead letter"
            )
            code, unwritten = EXIT_UNREACHABLE, [exc.line]
        except KeyboardInterrupt:
            code, problem = EXIT_INTERRUPTED, "interrupted"
            # a line a Ctrl-C cut in a pipe's write and then finished is out whole: not rescued, not given back
            unwritten = [self.held] if self.held and not self.sink.finished_on_interrupt else []
            if self.sink.partial_line:
                problem += f" (the last line in {self.sink.name} is cut short: discard it)"
        if code != EXIT_OK:
            # a broken-off answer too: after a timeout, the rest of a line may still arrive, and be acknowledged
            self.stream.refuse_more()
            unwritten += self.stream.received_lines()
        try:
            self.sink.sync()
        except OutputFailed as exc:
            code = code or EXIT_ERROR
            problem = problem or f"cannot write to {self.sink.name}: {exc} (at fsync)"
            unwritten = exc.lines + unwritten
        return code, problem, unwritten

    def copy(self) -> str:
        """Every line into the sink; "" at the end of the answer, else how the answer broke off. A Ctrl-C that came
        meanwhile is raised here, between lines, with the line in hand (if any) in `held`."""
        while True:
            self.guard.check()
            try:
                line = self.stream.readline()
            except (OSError, http.client.HTTPException) as exc:
                self.guard.check()  # cut off by the stop after Ctrl-C: the part read was not counted
                return f"drain broke off ({type(exc).__name__})"
            if not line:
                return ""
            self.held = line
            self.guard.check()
            item_id = drained_id(line)
            if item_id is None:
                raise NotDeadLetter(line)
            self.writing(item_id)
            self.sink.write(line if line.endswith(b"\n") else line + b"\n")
            self.held = None
            self.wrote()

    def writing(self, item_id: str) -> None:
        """The line of `item_id` goes to the sink now (a held drain keeps track of it)."""

    def wrote(self) -> None:
        """A line went to the sink (a held drain removes items a batch at a time)."""

    def summary(self, unwritten: list[bytes]) -> str:
        text = f"{self.sink.count} item(s) written to {self.sink.name}"
        if unwritten:
            partial = sum(not is_drained_line(line) for line in unwritten)
            saved = f"{len(unwritten) - partial} read but not written"
            if partial:
                saved += f" and {partial} partial line(s) (not a whole dead letter)"
            text += f"; {saved} are saved in {self.rescue(unwritten)}"
        return text + "; any others are still in the DLQ"

    def rescue(self, lines: list[bytes]) -> str:
        places = [os.path.abspath(RESCUE_NAME), os.path.join(tempfile.gettempdir(), RESCUE_NAME)]
        if self.sink.owned and self.sink.regular:
            places.insert(0, f"{self.sink.name}.unwritten.ndjson")
        for path in dict.fromkeys(places):
            try:
                save_lines(path, lines)
            except OSError:
                continue
            return path
        stderr = Sink(sys.stderr.fileno(), "stderr", owned=False, sync_lines=None)
        with suppress(OutputFailed):
            for line in lines:
                stderr.write(line if line.endswith(b"\n") else line + b"\n")
            return "stderr (printed above)"
        return "nowhere (no file or stderr could be written)"


def is_removal(answer: Any) -> bool:
    return (
        isinstance(answer, dict)
        and _count(answer.get("removed"))
        and all(isinstance(answer.get(k), list) for k in ("gone", "busy", "not_held"))
    )


def is_release(answer: Any) -> bool:
    return isinstance(answer, dict) and _count(answer.get("released"))


REMOVAL = Shape("a held drain's removal (removed, gone, busy, not_held)", is_removal)
RELEASED = Shape("a held drain's release (released)", is_release)


class HeldDrain(Drain):
    """A held drain (two phases): the server streams the items and leaves them in the DLQ, held for this drain
    (`--hold`); each is removed only once its line is surely in the output (fsynced in a file, written to a pipe
    or terminal), `REMOVE_BATCH` at a time (`POST /admin/dlq/drain/{drain}/remove`). So whatever stops the drain
    (a full disk, a closed pipe, Ctrl-C, a broken stream, this process killed) leaves every item not surely written
    in the DLQ: all the drain holds but those written are given back at once (`…/release` with `all`: the sidecar
    also holds what it streamed that was never read), or, if the sidecar cannot be told, when the hold ends.
    Nothing needs rescuing. Lines are read and copied as in `Drain`.
    """

    def __init__(
        self,
        client: AdminClient,
        stream: Stream,
        sink: Sink,
        guard: SigintGuard,
        drain_id: str,
        reason: str | None,
    ) -> None:
        super().__init__(client, stream, sink, guard)
        self.drain_id, self.reason = drain_id, reason
        # written, not yet surely in the output (the sink says when, in order)
        self.unsure: deque[str] = deque()
        self.sure: list[str] = []  # surely in the output, not yet removed
        # sent in a removal that failed: the sidecar may have removed some of them
        self.maybe_removed: set[str] = set()
        self.next_remove = REMOVE_BATCH  # after a failed removal, the next waits for a further batch
        self.removed = 0
        self.elsewhere = 0  # written here, but the hold had ended and another drain or a replay had them
        self.unreleased = 0  # read, not written, and no longer this drain's to give back
        self.remove_error = ""
        sink.on_sure = self._on_sure

    def _on_sure(self, count: int) -> None:
        self.sure += [self.unsure.popleft() for _ in range(count)]

    def writing(self, item_id: str) -> None:
        self.unsure.append(item_id)

    def wrote(self) -> None:
        if len(self.sure) >= self.next_remove:
            self.remove()

    def _run(self) -> int:
        code, problem, unwritten = self.copy_all()
        self.remove(everything=True)
        unconfirmed = len(self.sure)
        # read and not surely written: given back (written but unconfirmed ones stay held: given back, they would
        # only come out again sooner)
        back = dict.fromkeys([*self.unsure, *filter(None, map(drained_id, unwritten))])
        written = set(self.sure)
        # After a failure the sidecar may have streamed (and taken) many more than were read here, still in its
        # buffers and the network's when the connection was shut: it gives back all it holds but those written.
        # A sidecar from before that call, or one that did not take it: the ones read, as before.
        released = (code != EXIT_OK and self.release_all(self.sure)) or self.release(
            [i for i in back if i not in written]
        )
        if unconfirmed and code == EXIT_OK:
            code = EXIT_ERROR
            problem = f"the sidecar did not confirm the removal of written items ({self.remove_error})"
        if self.elsewhere:
            print(
                f"warning: {self.elsewhere} item(s) written to {self.sink.name} were handled elsewhere after this "
                "drain's hold ended (another drain, a replay or a delete): dedupe by id",
                file=sys.stderr,
            )
        if code == EXIT_OK:
            print(f"drained {self.removed} item(s) to {self.sink.name}", file=sys.stderr)
            return EXIT_OK
        raise ClientError(code, f"{problem}; {self.held_summary(unconfirmed, released)}")

    def remove(self, *, everything: bool = False) -> None:
        """Remove the items surely written (all of them, or while a whole batch is ready); one that fails stays
        in `sure` for the next call."""
        while self.sure and (everything or len(self.sure) >= REMOVE_BATCH):
            batch = self.sure[:REMOVE_BATCH]
            body: dict[str, Any] = {"ids": batch}
            if self.reason:
                body["reason"] = self.reason
            try:
                answer = self.client.request(
                    "POST", f"/admin/dlq/drain/{self.drain_id}/remove", body, shape=REMOVAL
                )
            except ClientError as exc:
                # a store error may come after some of the batch were removed: those read `gone` next time
                self.remove_error = str(exc)
                self.maybe_removed.update(batch)
                self.next_remove = len(self.sure) + REMOVE_BATCH
                return
            del self.sure[: len(batch)]
            ours = [i for i in answer["gone"] if i in self.maybe_removed]
            self.removed += answer["removed"] + len(ours)
            self.elsewhere += len(answer["busy"]) + len(answer["not_held"]) + len(answer["gone"]) - len(ours)
            self.next_remove = REMOVE_BATCH

    def release_all(self, keep: list[str]) -> bool:
        """Give back every item this drain holds but `keep`; False if the sidecar did not take the call."""
        if len(keep) > MAX_IDS:
            return False
        body: dict[str, Any] = {"all": True, **({"keep": keep} if keep else {})}
        try:
            self.client.request("POST", f"/admin/dlq/drain/{self.drain_id}/release", body, shape=RELEASED)
        except ClientError:
            return False
        return True

    def release(self, ids: list[str]) -> bool:
        """Give back items read but not surely written; False if the sidecar did not take the call (they come
        back when the hold ends)."""
        for start in range(0, len(ids), REMOVE_BATCH):
            batch = ids[start : start + REMOVE_BATCH]
            try:
                answer = self.client.request(
                    "POST", f"/admin/dlq/drain/{self.drain_id}/release", {"ids": batch}, shape=RELEASED
                )
            except ClientError:
                return False
            self.unreleased += len(batch) - answer["released"]
        return True

    def held_summary(self, unconfirmed: int, released: bool) -> str:
        text = f"{self.removed} item(s) written to {self.sink.name} and removed from the DLQ"
        if unconfirmed:
            text += (
                # the removal call failed: how much of it ran is not known (a chaos soak: 19 of 23 said to be
                # still in the DLQ were gone from it)
                f"; {unconfirmed} more written there were not confirmed removed: up to {unconfirmed} may still be "
                "in the DLQ, held by this drain until its hold ends, and a later drain brings those again (dedupe "
                "by id); `sidecar dlq list` shows which"
            )
        if released and self.unreleased:
            return text + (
                f"; {self.unreleased} it read and did not write were no longer its own to give back (its hold "
                "had ended: another drain or a replay took them, or they were deleted); see `sidecar dlq list`"
            )
        if released:
            return text + "; every other item is still in the DLQ"
        return (
            text
            + "; every other item is still in the DLQ (those this drain took come back when its hold ends)"
        )


# -- commands -----------------------------------------------------------------------------------------------------


def _time_arg(value: str | None) -> str | None:
    """RFC 3339 §5.6 lets a space stand for the `T` (GNU `date --rfc-3339=seconds` prints one); the API takes `T`."""
    if value and len(value) > 10 and value[10] == " " and value[:4].isdigit():
        return value[:10] + "T" + value[11:]
    return value


def cmd_list(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    args.since, args.until = _time_arg(args.since), _time_arg(args.until)
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
    page = client.request("GET", "/admin/dlq" + (f"?{urlencode(query)}" if query else ""), shape=PAGE)
    if args.json:
        print_json(page, out)
        return EXIT_OK
    rows = [
        [i["id"], i["route"], i["event_id"], i["attempts"], outcome(i), i["dead_at"], i.get("reason")]
        for i in page["items"]
    ]
    out.write(table(rows, ["ID", "ROUTE", "EVENT ID", "ATTEMPTS", "LAST", "DEAD AT", "REASON"]) + "\n")
    # the same filters again with the cursor (alone, it paged the whole DLQ)
    again = " ".join(
        f"--{name} {shlex.quote(str(value))}"
        for name, value in (
            ("route", args.route),
            ("limit", args.limit),
            ("since", args.since),
            ("until", args.until),
            ("status", args.status),
        )
        if value is not None
    )
    more = (
        f"; next page: {again + ' ' if again else ''}--cursor {page['next_cursor']}"
        if page["next_cursor"]
        else ""
    )
    print(f"{len(rows)} shown of {page['total']}{more}", file=sys.stderr)
    return EXIT_OK


def cmd_show(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    if not _DEAD_ID.fullmatch(args.id.strip()):
        # `show replay` reached the POST-only /admin/dlq/replay: "method not allowed", exit 1
        raise ClientError(EXIT_NOT_FOUND, f"not found: no dead letter {printable(args.id)[:100]!r}")
    item = client.request("GET", f"/admin/dlq/{quote(args.id, safe='')}", shape=ITEM)
    if args.json:
        print_json(item, out)
    else:
        out.write(format_item(item) + "\n")
    return EXIT_OK


def cmd_replay(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    body: dict[str, Any]
    if args.ids:
        body = {"ids": args.ids}
    elif args.route is not None:
        body = {"route": args.route}
    else:
        body = {"all": True}
    if args.dry_run:
        body["dry_run"] = True
    if args.reason:
        body["reason"] = args.reason
    result = client.request("POST", "/admin/dlq/replay", body, shape=REPLAY)
    if args.json:
        print_json(result, out)
    elif "would_replay" in result:
        out.write(f"would replay {result['would_replay']}\n")
        if result.get("busy"):
            out.write(f"would skip {result['busy']}: another drain or replay has them now\n")
        if result.get("body_missing"):
            out.write(
                f"would skip {result['body_missing']}: their stored body is gone from the store (evicted)\n"
            )
    else:
        skipped = result.get("skipped") or {}
        out.write(f"replayed {result['replayed']}\n")
        if skipped.get("pending"):
            out.write(f"skipped {skipped['pending']}: already pending (kept in the DLQ)\n")
        if skipped.get("delivered"):
            out.write(f"removed {skipped['delivered']}: already delivered\n")
        if skipped.get("busy"):
            out.write(
                f"skipped {skipped['busy']}: another drain or replay has them (run again to see what is left)\n"
            )
        if skipped.get("gone"):
            out.write(f"skipped {skipped['gone']}: removed or replayed by someone else meanwhile\n")
        if skipped.get("body_missing"):
            out.write(
                f"skipped {skipped['body_missing']}: their stored body is gone from the store (evicted? check its "
                "maxmemory-policy); kept in the DLQ\n"
            )
    return EXIT_OK


def drain_once(client: AdminClient, body: dict[str, Any], sink: Sink, reason: str | None) -> int:
    """One drain request copied into `sink`: held when the answer names its drain, else removed as it streams."""
    with SigintGuard() as guard, client.stream("POST", "/admin/dlq/drain", body, guard) as stream:
        drain_id = stream.resp.getheader(DRAIN_HEADER)
        if not drain_id:
            return Drain(client, stream, sink, guard).run()
        if not _DRAIN_ID.fullmatch(drain_id):
            raise not_the_admin_api(client.base_url, f"its {DRAIN_HEADER} header is not a drain id")
        return HeldDrain(client, stream, sink, guard, drain_id, reason).run()


def cmd_drain(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    body: dict[str, Any] = {}
    if args.route is not None:
        body["route"] = args.route
    if args.reason:
        body["reason"] = args.reason
    # Opened before the request, so an --out that cannot be written drains nothing. Appended to, never truncated:
    # a second drain into the same file must not destroy what the first one removed. Created 0600.
    created = bool(args.out) and not os.path.lexists(args.out)
    if args.out:
        try:
            sink = Sink.open(args.out)
        except OSError as exc:
            raise ClientError(EXIT_USAGE, f"--out {args.out}: cannot open: {exc.strerror or exc}") from None
    else:
        out.flush()
        sink = Sink(out.fileno(), "stdout", owned=False)
    try:
        if args.hold:
            try:
                return drain_once(client, {**body, "hold": args.hold}, sink, args.reason)
            except ClientError as exc:
                if exc.code != EXIT_ERROR or "unknown field(s): hold" not in str(exc):
                    raise
                # a sidecar from before held drains: drained as with --hold 0
        return drain_once(client, body, sink, args.reason)
    except ClientError:
        if created and sink.count == 0:  # refused (an unknown route, no token, …): no empty file left behind
            with suppress(OSError):
                if os.stat(args.out).st_size == 0:
                    os.unlink(args.out)
        raise
    finally:
        sink.close()


COMMANDS = {"list": cmd_list, "show": cmd_show, "replay": cmd_replay, "drain": cmd_drain}


def usage_problem(args: argparse.Namespace) -> str | None:
    if args.dlq_command == "replay" and sum([bool(args.ids), args.route is not None, args.all]) != 1:
        return "give dead-letter IDs, or --route R, or --all (exactly one of them)"
    if getattr(args, "route", None) is not None and not args.route.strip():
        # `--route "$ROUTE"` with ROUTE unset must not become every route (a drain or replay of the whole DLQ)
        return "--route must name a route (`sidecar dlq list` shows them); leave it out for every route"
    ids = [args.id] if args.dlq_command == "show" else args.ids if args.dlq_command == "replay" else []
    if any(not i.strip() for i in ids):
        return "a dead-letter ID must not be empty (`sidecar dlq list` shows them)"
    if getattr(args, "out", None) is not None and not args.out.strip():
        # `--out "$ARCHIVE"` with ARCHIVE unset drained every item to stdout (to /dev/null in a cron job: gone)
        return "--out must name a file; leave it out to write to stdout"
    if len(getattr(args, "reason", None) or "") > MAX_REASON:
        return f"--reason must be at most {MAX_REASON} characters"
    return None


def run(args: argparse.Namespace) -> int:
    problem = usage_problem(args)
    if problem:
        print(f"sidecar dlq {args.dlq_command}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        url, token = resolve_target(args)
        client = AdminClient(url, token, timeout=args.timeout)
        code = COMMANDS[args.dlq_command](client, args, sys.stdout)
        sys.stdout.flush()
        return code
    except ClientError as exc:
        # the message may quote the server's answer, and that an id a sender chose
        print(f"sidecar dlq {args.dlq_command}: {printable(str(exc))}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # `sidecar dlq list | head`: whatever is still buffered would fail again at exit, with a traceback
        with suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        print(
            f"sidecar dlq {args.dlq_command}: cannot write to stdout: it was closed (broken pipe)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# -- arguments ----------------------------------------------------------------------------------------------------


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1000:  # ("²" is a digit to isdigit)
        raise argparse.ArgumentTypeError("must be an integer from 1 to 1000")
    return int(text)


MAX_TIMEOUT = 86400.0 * 365


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # NaN included; a socket timeout past ~1e9 s overflows
        raise argparse.ArgumentTypeError(f"must be a number of seconds, > 0 and at most {MAX_TIMEOUT:.0f}")
    return value


def _hold(text: str) -> str:
    from sidecar.durations import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds and not 1 <= seconds <= MAX_HOLD:
        raise argparse.ArgumentTypeError("must be 0 or from 1s to 24h")
    return text.strip() if seconds else ""


def add_dlq_parser(sub: Any) -> None:
    """Register `dlq` and its subcommands on the top-level parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-url", help="admin API base URL (default: from the config's admin.listen)")
    common.add_argument(
        "--token", help="admin bearer token (default: $SIDECAR_ADMIN_TOKEN, then admin.token)"
    )
    common.add_argument("--config", help=f"config file (default: $SIDECAR_CONFIG, then {DEFAULT_CONFIG})")
    common.add_argument(
        "--json",
        action="store_true",
        help="print the API's JSON (ASCII) instead of a table (drain: NDJSON always)",
    )
    common.add_argument("--timeout", type=_positive, default=60.0, help="seconds (default 60)")

    dlq = sub.add_parser(
        "dlq",
        help="inspect, replay and drain the dead-letter list (admin API client)",
        description="Exit codes: 0 ok, 1 error answer or output failed, 2 usage, 3 unreachable or not the admin API, "
        "4 unauthorized, 5 not found, 130 interrupted (Ctrl-C).",
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
    drain.add_argument(
        "--out",
        metavar="FILE",
        help="append the NDJSON here (default: stdout; created 0600); items it cannot write stay in the DLQ "
        "(a sidecar older than held drains: lines it cannot take go to FILE.unwritten.ndjson)",
    )
    drain.add_argument("--reason", help="why (logged by the sidecar)")
    drain.add_argument(
        "--hold",
        type=_hold,
        default=DEFAULT_HOLD,
        metavar="DURATION",
        help="how long the sidecar keeps the items this drain took but did not yet remove (each is removed once "
        "written out), before they come back to the DLQ should this command die (default "
        f"{DEFAULT_HOLD}); 0: not held, the sidecar removes each item once its line reached this machine, and "
        "lines this command cannot write go to a rescue file",
    )
