"""k8s/monitoring: the alert rules pass promtool, and the dashboard and rules name only metrics we export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.telemetry import METRIC_NAMES
from tests.conftest import REPO

MONITORING = REPO / "k8s" / "monitoring"
METRIC = re.compile(r"\bsidecar_[a-z_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exported(name: str) -> bool:
    return name in METRIC_NAMES or any(
        name.endswith(sfx) and name[: -len(sfx)] in METRIC_NAMES for sfx in HISTOGRAM_SUFFIXES
    )


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_monitoring_dashboard_queries_name_only_exported_metrics() -> None:
    names = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert names, "the dashboard queries no sidecar metric"
    assert {n for n in names if not exported(n)} == set()
    # and every contract metric has a panel
    assert {m for m in METRIC_NAMES if not any(n == m or n.startswith(m + "_") for n in names)} == set()


def test_monitoring_alert_rules_name_only_exported_metrics_and_cover_the_issue() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert alerts == {
        "SidecarRetryBacklogGrowing",
        "SidecarSignatureFailureRatioHigh",
        "SidecarDeadLettersPresent",
        "SidecarForwardLatencyHigh",
        "SidecarStoreUnavailable",
        "SidecarOverloaded",
    }
    names = {m for e in rule_exprs() for m in METRIC.findall(e)}
    assert {n for n in names if not exported(n)} == set()


def _fetch_promtool(dest: Path) -> Path | None:
    """promtool from Debian's prometheus package, unpacked (not installed: no service, no user)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=300)
    got = subprocess.run(
        ["apt-get", "download", "-qq", "prometheus"], cwd=dest, capture_output=True, timeout=300, check=False
    )
    debs = sorted(dest.glob("prometheus_*.deb"))
    if got.returncode != 0 or not debs:
        return None
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest / "root")], check=True, timeout=120)
    tool = dest / "root" / "usr" / "bin" / "promtool"
    return tool if tool.exists() else None


@pytest.fixture(scope="session")
def promtool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    found = shutil.which("promtool")
    tool = Path(found) if found else _fetch_promtool(tmp_path_factory.mktemp("promtool"))
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (Debian package 'prometheus') and could not be fetched")
        pytest.skip("promtool not available (no apt-get here)")
    return tool


def test_monitoring_alert_rules_pass_promtool(promtool: Path) -> None:
    result = subprocess.run(
        [str(promtool), "check", "rules", str(MONITORING / "alerts.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout + result.stderr
