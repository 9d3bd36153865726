"""Log formatting: one JSON object per line (or text on a terminal), with the outcome fields when present.

Kept apart from telemetry.py so `sidecar dlq …` and `check-config` can set up logging without importing the
OpenTelemetry SDK and the server.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

OUTCOME_FIELDS = ("route", "event_id", "outcome", "status", "attempt", "duration_ms", "trace_id", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the outcome fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in OUTCOME_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={record.__dict__[k]}" for k in OUTCOME_FIELDS if record.__dict__.get(k) is not None]
        return f"{line} {' '.join(extras)}" if extras else line


LEVELS = ("debug", "info", "warning", "error")  # logging.level, --log-level and SIDECAR_LOG_LEVEL


def setup_logging(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Root logging: `SIDECAR_LOG_LEVEL` / `SIDECAR_LOG_FORMAT` override the config; `auto` is text on a terminal,
    JSON otherwise (what log shippers expect)."""
    stream = stream or sys.stderr
    chosen = os.environ.get("SIDECAR_LOG_LEVEL", level).lower()
    if chosen not in LEVELS:  # a typo in the environment must not stop the sidecar: say it, keep the config's
        print(
            f"sidecar: SIDECAR_LOG_LEVEL={chosen!r} is not one of {', '.join(LEVELS)}; using {level}",
            file=stream,
        )
        chosen = level.lower()
    level = chosen.upper()
    fmt = os.environ.get("SIDECAR_LOG_FORMAT", fmt).lower()
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
