"""`server.workers: N`: worker 0's /metrics adds the other workers' counts (sidecar/peers.py), over real Unix
sockets. The sums must never go down, or Prometheus reads a counter reset and counts every worker's whole total as
new: a worker that misses a scrape is counted with its last answer, a replaced worker process with its final one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.peers import PeerCounts, leave_peers_dir, serve_state
from sidecar.supervisor import PARENT_ENV
from sidecar.telemetry import Telemetry


def forwarded(tel: Telemetry) -> tuple[float, float]:
    """(sidecar_requests_total for route r / forwarded, forward-duration count for r) as /metrics shows them."""
    samples = {
        (s.name, s.labels.get("route"), s.labels.get("outcome")): s.value
        for family in text_string_to_metric_families(tel.render().decode())
        for s in family.samples
    }
    return (
        samples.get(("sidecar_requests_total", "r", "forwarded"), 0.0),
        samples.get(("sidecar_forward_duration_seconds_count", "r", None), 0.0),
    )


def worker(pid: int, requests: int) -> Telemetry:
    tel = Telemetry()
    tel.pid = pid
    tel.requests[("r", "forwarded")] += requests
    for _ in range(requests):
        tel.forward_duration.record(0.01, tel.route_labels("r"))
    return tel


async def test_peer_counts_add_up_and_never_go_down(tmp_path: Path) -> None:
    peers = str(tmp_path)
    worker0 = worker(100, 1)
    counts = PeerCounts(peers)
    first = await serve_state(worker(101, 5), peers, 1)
    assert first is not None
    try:
        worker0.peers = await counts.states()
        assert forwarded(worker0) == (6, 6)
    finally:
        await first.cleanup()
    worker0.peers = await counts.states()  # worker 1 is restarting: no answer this scrape
    assert forwarded(worker0) == (6, 6)  # its last answer still counts
    second = await serve_state(worker(102, 2), peers, 1)  # the new process, counting from 0
    assert second is not None
    try:
        worker0.peers = await counts.states()
        assert forwarded(worker0) == (8, 8)  # 1 + the replaced process's 5 + the new one's 2
    finally:
        await second.cleanup()
    # the OTLP export (the instruments' callbacks) carries this process's own counts only
    observe = worker0._counter("requests", worker0.requests, ("route", "outcome"))
    assert [(o.value, o.attributes) for o in observe(None)] == [(1, {"route": "r", "outcome": "forwarded"})]


async def test_peer_counts_survive_worker_0_being_replaced(tmp_path: Path) -> None:
    """Worker 0 (which serves /metrics) is replaced: its successor starts from what the sums held, its own counts
    included. Before (an observability audit), the sums fell from 200 to 105 after a SIGKILL of worker 0, and
    Prometheus counted the whole of the rest as new."""
    peers = str(tmp_path)
    worker0 = worker(100, 1)
    other = await serve_state(worker(101, 5), peers, 1)
    assert other is not None
    try:
        counts = PeerCounts(peers)
        worker0.peers = await counts.states()
        assert forwarded(worker0) == (6, 6)
        counts.remember(worker0.state())  # after the scrape's render, as /metrics does
        worker0.requests[("r", "forwarded")] += 1  # counted after the last scrape: gone with the process
        successor = worker(200, 0)  # the replacement worker 0, counting from 0
        successor.peers = await PeerCounts(peers).states()
        assert forwarded(successor) == (6, 6)
        successor.requests[("r", "forwarded")] += 2
        assert forwarded(successor)[0] == 8
    finally:
        await other.cleanup()


async def test_a_worker_whose_socket_cannot_be_made_still_serves(tmp_path: Path) -> None:
    gone = str(tmp_path / "removed")
    assert await serve_state(worker(103, 1), gone, 1) is None  # logged; the worker runs on


def test_a_worker_leaving_a_peers_dir_another_worker_removes_meanwhile_does_not_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILLed supervisor's two workers both leave at once: one removed the directory between the other's
    is-it-a-directory test and its listing, whose FileNotFoundError was the worker's critical exit (a soak: 1 in
    40 supervisor kills). Here the listing fails so, for the worker that sees the supervisor gone."""
    peers_dir = tmp_path / "sidecar-workers-1-x"
    peers_dir.mkdir()
    (peers_dir / "counts.json").write_text("{}")
    monkeypatch.setenv(PARENT_ENV, "1")  # not this process's parent: the supervisor is gone
    real_glob = Path.glob

    def vanishing(self: Path, pattern: str) -> Any:
        if self == peers_dir:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_glob(self, pattern)

    monkeypatch.setattr(Path, "glob", vanishing)
    leave_peers_dir(str(peers_dir), 1)  # no exception
