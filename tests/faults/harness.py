"""What the fault and hostile-input tests share: a raw HTTP client, sidecar configs, a simulated provider that keeps
a ledger, a fault-injecting upstream, and the figures every test reports.

Figures: each test calls `report(kind, **numbers)`, which prints one `[figures] kind k=v …` line and appends the
same as one JSON object to the figures file: `$SIDECAR_FIGURES` if set, else `figures.jsonl` in pytest's base temp
dir. `python -m tests.faults.report FILE` turns that file into the table of docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.faults.logcheck import BODY_MARKER

STRIPE_SECRET = "whsec_faults_stripe_0b7e"
ADMIN_TOKEN = "admin-token-faults-91c2d"

_figures_file: Path | None = None


def set_figures_dir(path: Path) -> None:
    """Once per session: the figures file starts empty, so it holds exactly one run's figures."""
    global _figures_file
    _figures_file = Path(os.environ.get("SIDECAR_FIGURES") or path / "figures.jsonl")
    _figures_file.write_text("")


def figures_file() -> Path | None:
    return _figures_file


def report(kind: str, **numbers: Any) -> dict[str, Any]:
    entry = {"kind": kind, **numbers}
    print("\n[figures] " + kind + " " + " ".join(f"{k}={v}" for k, v in numbers.items()))
    if _figures_file is not None:
        with open(_figures_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
    return entry


# ---- raw HTTP --------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: the connection closed (or timed out) without a final answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str | bytes, str | bytes]],
    body: bytes = b"",
    *,
    length: bool = True,
    close: bool = True,
) -> bytes:
    """Request bytes exactly as given (no validation: hostile input is the point)."""

    def b(x: str | bytes) -> bytes:
        return x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape")

    lines = [b(method) + b" " + b(target) + b" HTTP/1.1"]
    lines += [b(k) + b": " + b(v) for k, v in headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _read_answer(reader: asyncio.StreamReader, head_only: bool) -> Answer:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        parts = status_line.split(b" ", 2)
        status = int(parts[1])
        headers = {}
        for line in header_lines:
            k, _, v = line.partition(b":")
            headers[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
        if 100 <= status < 200:
            continue  # 100 Continue: the final answer follows
        if head_only or status in (204, 304):
            return Answer(status, headers)
        if "content-length" in headers:
            return Answer(status, headers, await reader.readexactly(int(headers["content-length"])))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await reader.readexactly(size + 2))
                if size == 0:
                    return Answer(status, headers, b"".join(chunks)[:-2])
        return Answer(status, headers, await reader.read())


async def raw_http(port: int, data: bytes, *, timeout: float = 10.0, head: bool = False) -> Answer:
    """Send `data` on a new loopback connection and read one final answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError) as exc:
        return Answer(None, error=type(exc).__name__)
    try:
        writer.write(data)
        return await asyncio.wait_for(_read_answer(reader, head), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        return Answer(None, error=type(exc).__name__)
    finally:
        writer.close()


# ---- signing -----------------------------------------------------------------------------------------------------


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, t: int | None = None) -> dict[str, str]:
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


def event_body(event_id: str, **extra: Any) -> bytes:
    return json.dumps({"id": event_id, "type": "invoice.paid", "note": BODY_MARKER, **extra}).encode()


# ---- sidecar processes -------------------------------------------------------------------------------------------


def stripe_route(name: str = "stripe", path: str = "/webhooks/stripe", secret: str = STRIPE_SECRET) -> str:
    return f'  - {{name: {name}, path: {path}, provider: stripe, secrets: ["{secret}"]}}\n'


def write_sidecar_config(
    path: Path,
    *,
    port: int,
    admin_port: int,
    redis_url: str,
    upstream_url: str,
    routes: str | None = None,
    server: str = "",
    redis: str = "",
    upstream: str = "timeout: 5s",
    retry: str = "{base_delay: 100ms, multiplier: 2, max_delay: 1s, jitter: 0.1, max_attempts: 50, lease: 3s}",
    logging: str = "{level: info}",
    admin: str = "",
) -> Path:
    path.write_text(
        f"""
server: {{listen: "127.0.0.1:{port}", shutdown_grace: 1s{", " + server if server else ""}}}
admin: {{listen: "127.0.0.1:{admin_port}", token: "{ADMIN_TOKEN}"{", " + admin if admin else ""}}}
redis: {{url: "{redis_url}", shards: 4{", " + redis if redis else ""}}}
upstream: {{url: "{upstream_url}", {upstream}}}
retry: {retry}
logging: {logging}
routes:
{routes or stripe_route()}"""
    )
    return path


# ---- the ledger --------------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every send of every event and what the sidecar answered, and every receipt at the upstream."""

    answers: dict[str, list[int | str]] = field(default_factory=dict)  # event id -> status or error per send
    outstanding: int = 0  # sends in progress right now

    def sent(self, event_id: str, answer: int | str) -> None:
        self.answers.setdefault(event_id, []).append(answer)

    def accepted(self) -> set[str]:
        return {e for e, got in self.answers.items() if any(isinstance(a, int) and a < 300 for a in got)}

    def count(self, pred: Callable[[int | str], bool]) -> int:
        return sum(1 for got in self.answers.values() for a in got if pred(a))

    def figures(self, delivered: Counter[str], dead: set[str], in_flight: int) -> dict[str, int]:
        """Lost: answered 2xx but neither delivered nor dead-lettered. Duplicated: deliveries beyond the first."""
        accepted = self.accepted()
        return {
            "events": len(self.answers),
            "requests": sum(len(v) for v in self.answers.values()),
            "answered_2xx": len(accepted),
            "answered_503": self.count(lambda a: a == 503),
            "connection_errors": self.count(lambda a: isinstance(a, str)),
            "lost": len(accepted - set(delivered) - dead),
            "dead_lettered": len(dead & accepted),
            "duplicated": sum(n - 1 for n in delivered.values() if n > 1),
            "in_flight": in_flight,
        }


class Provider:
    """A webhook provider: sends each event, re-signed, until it is answered 2xx (bounded in count and time),
    spreading sends over the replicas' URLs (a failed one tries the next)."""

    def __init__(self, ledger: Ledger, urls: list[str], *, concurrency: int = 20, deadline: float = 60.0):
        self.ledger = ledger
        self.urls = urls
        self.sem = asyncio.Semaphore(concurrency)
        self.deadline = time.monotonic() + deadline
        self.session: aiohttp.ClientSession | None = None
        self.pause = 0.05

    async def __aenter__(self) -> Provider:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self.session is not None
        await self.session.close()

    async def send_once(self, event_id: str, url: str) -> int | str:
        assert self.session is not None
        body = event_body(event_id)
        self.ledger.outstanding += 1
        try:
            async with self.session.post(url, data=body, headers=stripe_headers(body)) as resp:
                await resp.read()
                answer: int | str = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            answer = type(exc).__name__
        finally:
            self.ledger.outstanding -= 1
        self.ledger.sent(event_id, answer)
        return answer

    async def deliver(self, event_id: str, first: int = 0, attempts: int = 200) -> bool:
        for i in range(attempts):
            if time.monotonic() > self.deadline:
                return False
            async with self.sem:
                answer = await self.send_once(event_id, self.urls[(first + i) % len(self.urls)])
            if isinstance(answer, int) and answer < 300:
                return True
            await asyncio.sleep(self.pause * (1 + random.random()))
        return False

    async def deliver_all(self, ids: list[str]) -> list[bool]:
        return list(await asyncio.gather(*(self.deliver(e, i) for i, e in enumerate(ids))))


# ---- the upstream ------------------------------------------------------------------------------------------------


class FaultUpstream:
    """A real upstream on 127.0.0.1 whose `mode` says how it misbehaves. Counts deliveries per event id (the
    receiver acted on the event), receipts, and the attempts the sidecar could not have seen succeed (`abandoned`:
    a reset after the receiver acted, an answer later than the sidecar's timeout) — the only source of duplicates.

        ok     answers 200 after `delay`
        flap   503 half the time, else 200
        hang   never answers while in this mode (the sidecar times out); answers 503 once released
        reset  half the time acts on the event, writes part of a 200 and aborts the connection
        slow   answers 200 after 0.1 .. 1.5 x `timeout` (the receiver acted even when the sidecar gave up)
        down   503
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.rng = random.Random(9)
        self.delivered: Counter[str] = Counter()
        self.receipts: Counter[str] = Counter()
        self.active = 0
        self.abandoned = 0
        self.timeout = 1.0  # the sidecar's upstream.timeout, for `slow`
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        event_id = request.headers.get("X-Sidecar-Event-Id", "")
        self.receipts[event_id] += 1
        self.active += 1
        try:
            return await self._answer(request, event_id)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request, event_id: str) -> web.StreamResponse:
        mode = self.mode
        if mode == "down" or (mode == "flap" and self.rng.random() < 0.5):
            return web.Response(status=503)
        if mode == "hang":
            self.abandoned += 1
            await self.release.wait()
            return web.Response(status=503)
        if mode == "reset" and self.rng.random() < 0.5:
            self.delivered[event_id] += 1
            self.abandoned += 1
            resp = web.StreamResponse(status=200, headers={"Content-Length": "100"})
            await resp.prepare(request)
            await resp.write(b'{"partial": ')
            assert request.transport is not None
            request.transport.abort()  # mid-response
            return resp
        if mode == "slow":
            delay = self.rng.uniform(0.1, self.timeout * 1.5)
            await asyncio.sleep(delay)
            # Given up on: the sidecar aborted the connection (its deadline started before the request got here,
            # so a delay just under `timeout` can miss it too), or the answer lands at the deadline's edge, where
            # the sidecar's timer may fire before it reads the bytes.
            transport = request.transport
            if delay >= self.timeout * 0.9 or transport is None or transport.is_closing():
                self.abandoned += 1
        elif self.delay:
            await asyncio.sleep(self.delay)
        self.delivered[event_id] += 1
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
