"""A soak: a request refused 503 overloaded whose body was all in closed its connection at once (front.py
`_refuse`, `remaining <= 0`), and a refused body's connection closed as soon as that body was in: a client that
pipelined more requests behind it was still sending, so the close reset the connection and the client read
ECONNRESET after (or, clients that check the socket error first, instead of) the 503."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

from tests.conftest import Upstream
from tests.test_front import post
from tests.test_ingress import ROUTES, _padded, held_by_upstream, stripe_headers


def _pipelining_client(port: int, first: bytes, more: bytes) -> tuple[bytes, str | None]:
    s = socket.create_connection(("127.0.0.1", port))
    try:
        with contextlib.suppress(OSError):
            s.sendall(first + more)  # requests pipelined behind the one refused
        time.sleep(0.5)  # a client that reads its answers once it has written its requests
        s.settimeout(10)
        got, err = b"", None
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError as exc:
            err = type(exc).__name__
        return got, err
    finally:
        s.close()


async def test_a_pipelining_client_refused_overloaded_is_not_reset(
    sidecar_factory: Any, upstream: Upstream
) -> None:
    from sidecar.app import RUNTIME

    client = await sidecar_factory(ROUTES, server="max_inflight_bytes: 100000, read_timeout: 5s")
    ingress = client.server.app[RUNTIME].ingress
    big, held, gate = await held_by_upstream(client, upstream, "evt_big")
    assert ingress.inflight_bytes == len(big)  # 60 KB of the 100 KB budget held
    one, two = _padded("evt_one", 60_000), _padded("evt_two", 60_000)
    first = post("/webhooks/stripe", one, stripe_headers(one))
    more = post("/webhooks/stripe", two, stripe_headers(two)) * 8
    try:
        got, err = await asyncio.to_thread(_pipelining_client, client.port, first, more)
    finally:
        gate.set()
        await asyncio.wait_for(held, 10)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), got[:200]
    assert json.loads(body) == {"error": "overloaded"}
    assert err is None, f"the connection was reset after the 503 ({err})"
