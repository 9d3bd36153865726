"""Figures JSON lines (written by tests/faults) -> the Markdown tables of docs/reliability.md.

SIDECAR_FIGURES=/tmp/figures.jsonl python -m pytest
python -m tests.faults.report /tmp/figures.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FAULT_COLUMNS = [
    ("fault", "fault injected"),
    ("events", "events sent"),
    ("answered_2xx", "answered 2xx"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("in_flight", "in flight (bound)"),
    ("requests", "requests"),
    ("answered_503", "503 answers"),
    ("connection_errors", "connection errors"),
    ("upstream_receipts", "upstream receipts"),
]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render(entries: list[dict[str, Any]]) -> str:
    faults = [e for e in entries if "lost" in e and "fault" in e and "events" in e]
    by_kind = {e["kind"]: e for e in entries}
    out = []
    totals = {
        "faults injected": len(faults),
        "events sent": sum(e["events"] for e in faults),
        "lost": sum(e["lost"] for e in faults),
        "duplicated": sum(e["duplicated"] for e in faults),
    }
    hostile = by_kind.get("hostile_total", {})
    if hostile:
        totals |= {
            "inputs tried": hostile.get("generated"),
            "5xx": hostile.get("status_5xx"),
            "forwards of unverified requests": hostile.get("unverified_forwards"),
        }
    out.append(_table(list(totals), [list(totals.values())]))
    out.append("")
    out.append(_table([c[1] for c in FAULT_COLUMNS], [[e.get(k) for k, _ in FAULT_COLUMNS] for e in faults]))
    paused = by_kind.get("valkey_paused_answers")
    if paused:
        out += [
            "",
            _table([k for k in paused if k != "kind"], [[v for k, v in paused.items() if k != "kind"]]),
        ]
    for kind in ("hostile_total", "config_fuzz", "hostile_slow_clients"):
        entry = by_kind.get(kind)
        if entry:
            fields = {k: v for k, v in entry.items() if k != "kind"}
            out += ["", f"`{kind}`", "", _table(list(fields), [list(fields.values())])]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.faults.report FIGURES.jsonl", file=sys.stderr)
        return 2
    entries = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    sys.stdout.write(render(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
