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
from collections.abc import Mapping
from typing import Any

OUTCOME_FIELDS = (
    "route", "event_id", "outcome", "status", "attempt", "duration_ms", "trace_id", "error", "detail", "method", "path",
    "client", "forwarded_for", "worker",
)  # fmt: skip


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


def _plain(value: Any) -> str:
    """A field as text, quoted (repr) when a client could have put a space, a control character or a line
    separator in it (a path, X-Forwarded-For): it cannot forge another field or line of a text log."""
    text = str(value)
    return text if text.isprintable() and " " not in text and "=" not in text else repr(text)


def printable(text: str, keep: str = "") -> str:
    """`text` with its line separators and other control characters escaped (as repr writes them), but those in
    `keep`: one line of a log, of a config error, of a terminal (an escape sequence in an event's body or id would
    act on the operator's terminal: clear it, retitle it)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def _escaped(args: Any) -> Any:
    """A log record's arguments (a tuple, or a mapping for `%(name)s`) with their strings made one line."""
    if isinstance(args, Mapping):
        return {k: printable(v) if isinstance(v, str) else v for k, v in args.items()}
    return tuple(printable(a) if isinstance(a, str) else a for a in args)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # A message's string arguments may come from a request (an event id from a signed body may hold a
        # newline): escaped, they cannot start a forged line. The message's own text keeps its lines (a refused
        # reload lists its errors one a line), and so does a traceback.
        args = record.args
        if args:
            record.args = _escaped(args)
        try:
            line = super().format(record)
        finally:
            record.args = args
        extras = [
            f"{k}={_plain(record.__dict__[k])}" for k in OUTCOME_FIELDS if record.__dict__.get(k) is not None
        ]
        return f"{line} {' '.join(extras)}" if extras else line


LEVELS = ("debug", "info", "warning", "error")  # logging.level, --log-level and SIDECAR_LOG_LEVEL


class WorkerField(logging.Filter):
    """Gives every line of one of `server.workers: N` its `worker` index: the N processes share one log."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def setup_logging(
    level: str = "info", fmt: str = "auto", stream: Any = None, worker: int | None = None
) -> None:
    """Root logging: `SIDECAR_LOG_LEVEL` / `SIDECAR_LOG_FORMAT` override the config; `auto` is text on a terminal,
    JSON otherwise (what log shippers expect). `worker`: the index of this worker process, on every line."""
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
    if worker is not None:
        handler.addFilter(WorkerField(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class Tally:
    """Something that happens again and again for one cause (a full store, a store down), said once, then at most
    every `every` seconds with a count, then once when it is over: one log line per cause, not one per event.

    While it goes on, `began` is when it began (monotonic) and `total` how many times it happened."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.began: float | None = None
        self.total = 0
        self._said_at = 0.0
        self._since = 0  # occurrences since the last time it was said

    def count(self) -> int | None:
        """Count one occurrence: how many to report now (this one included; `total == 1` for the first), or None
        when it is not time yet."""
        now = time.monotonic()
        if self.began is None:  # the first occurrence is said at once
            self.began, self._said_at = now, float("-inf")
        self.total += 1
        self._since += 1
        if now - self._said_at < self.every:
            return None
        self._said_at, since, self._since = now, self._since, 0
        return since

    def say(self, logger: logging.Logger, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        """Count one occurrence and, when it is time, log `msg` with the count as its first argument."""
        since = self.count()
        if since is not None:
            logger.log(level, msg, since, *args, **kwargs)

    def over(self) -> int | None:
        """It stopped happening: how many occurrences were not said yet (to say so once), or None when it had not
        been happening. Cheap when nothing happened: one test."""
        if self.began is None:
            return None
        since, self._since, self.began, self.total = self._since, 0, None, 0
        return since
