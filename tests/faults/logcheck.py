"""No secret and no request body in any log line of the whole test run: captured as it goes, checked at the end.

What is captured
  - every LogRecord created in the pytest process, as its message, extra fields and traceback. A record factory
    wraps the default one rather than a handler: `sidecar.telemetry.setup_logging` removes the root handlers, a
    factory cannot be removed that way. (Records below a logger's level are never created, so they cannot leak.)
  - at the end, every `*.log` file under pytest's base temp dir: the logs of the `sidecar run` processes that
    tests start (tests.procs.SidecarProcess writes them beside their config file).

What is looked for
  - secrets: every secret-typed value of every config loaded in the pytest process (`sidecar.config._load` is
    wrapped: route secrets, secret files, admin token, sign_upstream secret) plus a Redis URL password, and the
    same for the config file of every `sidecar run` process found by its log. Secrets shorter than 8 characters
    are skipped: "t" or "12345" would match unrelated text.
  - bodies: BODY_MARKER, which issue 9's tests put in the bodies they send, and the first 24 characters of every
    JSON body the recording upstream received (tests.conftest.Upstream calls `note_body`).

`pytest_sessionfinish` (wired in tests/conftest.py) prints one `[logcheck]` line and fails the run on a leak.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BODY_MARKER = "zq-body-marker-5e1f"
MIN_SECRET = 8
PROBE = 24
MAX_PROBES = 200_000

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_LOG_NAME = re.compile(r"^(?P<stem>.+)\.\d+\.log$")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.texts: list[str] = []
        self.pending: logging.LogRecord | None = None
        self.secrets: set[str] = set()
        self.probes: set[str] = set()
        self.recording_secrets = True
        self.installed = False


STATE = _State()


def record_text(record: logging.LogRecord) -> str:
    """Everything a formatter could put on a line: message, extra fields, traceback, stack."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string still has its parts looked at
        message = f"{record.msg!s} {record.args!r}"
    parts = [record.name, message]
    parts += [f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD]
    if record.exc_info and record.exc_info[0] is not None:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return " ".join(parts)


def _flush_pending() -> None:
    # A record's `extra` fields are set after the factory returns, so a record is read when the next one is made.
    if STATE.pending is not None:
        STATE.texts.append(record_text(STATE.pending))
        STATE.pending = None


def install() -> None:
    """Start capturing (idempotent). Called when tests/conftest.py is imported."""
    if STATE.installed:
        return
    STATE.installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        with STATE.lock:
            _flush_pending()
            STATE.pending = record
        return record

    logging.setLogRecordFactory(factory)

    import sidecar.config as config_module

    load = config_module._load

    def recording_load(ctx: Any, text: str) -> Any:
        config = None
        try:
            config = load(ctx, text)
            return config
        finally:
            if STATE.recording_secrets:
                add_secrets(ctx.secrets)
                if config is not None:
                    add_secrets([urlsplit(config.redis.url).password or ""])

    config_module._load = recording_load  # type: ignore[assignment]


def add_secrets(values: Iterable[str]) -> None:
    STATE.secrets.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET)


@contextlib.contextmanager
def secrets_not_recorded() -> Iterator[None]:
    """For config fuzzing: generated "secrets" are configured nowhere and would match random text."""
    STATE.recording_secrets = False
    try:
        yield
    finally:
        STATE.recording_secrets = True


def note_body(body: bytes) -> None:
    """A body that crossed the sidecar (the recording upstream got it). JSON objects only: a probe is its start."""
    if len(body) < PROBE or not body.startswith(b"{") or len(STATE.probes) >= MAX_PROBES:
        return
    text = body[: PROBE * 4].decode("utf-8", "ignore")
    if len(text) >= PROBE:
        STATE.probes.add(text[:PROBE])


def captured() -> list[str]:
    with STATE.lock:
        _flush_pending()
        return list(STATE.texts)


def _context(text: str, at: int, hide: str) -> str:
    start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
    line = text[start : end if end >= 0 else len(text)]
    return line.replace(hide, "[hidden]")[:200]


def find_leaks(texts: Iterable[tuple[str, str]], secrets: Iterable[str], probes: set[str]) -> list[str]:
    """(where, text) pairs -> one line per leak found: a secret, BODY_MARKER, or the start of a seen body.
    The line shown has the secret itself hidden (the report must not leak it either)."""
    secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET})
    starts = {p[0] for p in probes}
    leaks = []
    for where, text in texts:
        for secret in [*secrets, BODY_MARKER]:
            at = text.find(secret)
            if at >= 0:
                what = "the body marker" if secret == BODY_MARKER else f"a secret of {len(secret)} chars"
                leaks.append(f"{where}: {what} in: {_context(text, at, secret)}")
        for first in starts:
            at = text.find(first)
            while at >= 0:
                if text[at : at + PROBE] in probes:
                    leaks.append(f"{where}: the start of a request body in: {_context(text, at, '')}")
                    break
                at = text.find(first, at + 1)
    return leaks


def _process_logs(base: Path | None) -> list[tuple[str, str]]:
    if base is None or not base.exists():
        return []
    from sidecar.config import load

    found = []
    for path in sorted(base.rglob("*.log")):
        m = _LOG_NAME.match(path.name)
        if m:  # a `sidecar run` log: its config's secrets are configured secrets too
            for suffix in (".yaml", ".yml"):
                config = path.with_name(m.group("stem") + suffix)
                if config.exists():
                    with contextlib.suppress(Exception):
                        load(config, env={})
        found.append((str(path.relative_to(base)), path.read_text(errors="replace")))
    return found


def check_session(base: Path | None) -> tuple[str, list[str]]:
    """(summary line, leaks) over the in-process records and the process logs under `base`."""
    files = _process_logs(base)
    records = captured()
    texts = [("log record", "\n".join(records)), *files]
    leaks = find_leaks(texts, STATE.secrets, STATE.probes)
    summary = (
        f"[logcheck] {len(records)} log records in the pytest process + {len(files)} process log files "
        f"({sum(len(t) for _, t in files)} chars) checked for {len(STATE.secrets)} configured secrets, "
        f"the body marker and {len(STATE.probes)} body starts: {len(leaks)} leak(s)"
    )
    return summary, leaks


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = getattr(factory, "_basetemp", None) if factory is not None else None
    summary, leaks = check_session(base)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter is not None else print
    write("")
    write(summary)
    if leaks:
        for leak in leaks[:50]:
            write(f"[logcheck] LEAK {leak}")
        session.exitstatus = 1  # pytest.ExitCode.TESTS_FAILED: the run fails even if every test passed
