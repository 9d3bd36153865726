"""`sidecar demo` runs as a newcomer would run it, and tells the right story."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_demo_tour_reports_every_case() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert 'sidecar answered 200 {"received": "evt_valid"}' in out
    assert '"duplicate": true, "event_id": "evt_valid", "state": "delivered"' in out
    assert 'sidecar answered 401 {"error": "invalid_signature"' in out
    assert "receiver got evt_forged" not in out
    assert '"queued": true, "event_id": "evt_flaky"' in out
    assert "receiver got evt_flaky (attempt 3) -> 200" in out
    assert "evt_flaky is delivered" in out
    assert '"dead_lettered": true, "event_id": "evt_reject"' in out
    assert "event=evt_reject attempts=1 last_status=400 reason=rejected" in out
    assert result.stderr.strip() == ""  # no stray log noise or tracebacks
