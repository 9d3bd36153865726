"""The route table: a config and everything built from it for request time (verifiers, retry policies).

Immutable, built once per config load. The ingress and the dispatcher both read the current table through
`Dispatcher.table`, so a reload swaps routes, secrets and retry settings with one assignment: requests already
in flight keep the `Route` they started with, new ones see the new table.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import Config, RouteConfig
from sidecar.forwarder import RetryPolicy
from sidecar.providers.base import Verifier
from sidecar.providers.crypto import b64_secret
from sidecar.providers.registry import build_verifier


@dataclass(frozen=True, slots=True)
class Route:
    cfg: RouteConfig
    verifier: Verifier
    policy: RetryPolicy
    upstream_key: bytes | None = None  # sign_upstream's HMAC key, decoded once

    @classmethod
    def build(cls, cfg: RouteConfig) -> Route:
        return cls(
            cfg,
            build_verifier(cfg.provider, cfg.secrets, cfg.tolerance, cfg.signature),
            RetryPolicy.parse(cfg.retry.retry_on),
            signing_key(cfg.sign_upstream.secret) if cfg.sign_upstream else None,
        )


@dataclass(frozen=True, slots=True)
class RouteTable:
    config: Config
    by_path: dict[str, Route]
    by_name: dict[str, Route]

    @classmethod
    def build(cls, config: Config) -> RouteTable:
        routes = [Route.build(r) for r in config.routes]
        return cls(config, {r.cfg.path: r for r in routes}, {r.cfg.name: r for r in routes})


def signing_key(secret: str) -> bytes:
    """Standard Webhooks key bytes, derived as the receiver's SDK derives them from the same string
    (standardwebhooks / svix `Webhook(secret)`), as the inbound Standard Webhooks verifier does: an optional
    `whsec_` prefix, then base64 (config validation refuses a secret that does not decode)."""
    return b64_secret(secret, "whsec_", "sign_upstream.secret")


def target_url(config: Config, route: RouteConfig, path_qs: str) -> str:
    """Where the event goes: the route's `upstream` (plus the original query, after the route's own if it has
    one), else upstream.url + path + query.

    Only the configured URL chooses the host: an absolute-form request target (`POST http://elsewhere/p`, which
    RFC 9112 §3.2.2 makes servers accept) contributes its path and query only.
    """
    if not path_qs.startswith("/"):
        path_qs = origin_form(path_qs)
    if route.upstream:
        _, _, query = path_qs.partition("?")
        if not query:
            return route.upstream
        if "?" not in route.upstream:
            return f"{route.upstream}?{query}"
        # the route's own query first, then the request's (a receiver that checks a URL signature needs it)
        return route.upstream + ("" if route.upstream.endswith(("?", "&")) else "&") + query
    base, _, base_query = config.upstream.url.partition("?")
    if not base_query:
        return base.rstrip("/") + path_qs
    # upstream.url with a query of its own: the request's path goes on its path, the queries after each other
    # (appended whole, the path landed inside the query: `/base?k=v/webhooks/x?a=1`)
    path, _, query = path_qs.partition("?")
    return f"{base.rstrip('/')}{path}?{base_query}" + (f"&{query}" if query else "")


def origin_form(target: str) -> str:
    """`http://host:port/p?q` -> `/p?q`: what an absolute-form request target asks of this server."""
    _, sep, rest = target.partition("://")
    if not sep:
        return "/" + target
    ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
    tail = rest[min(ends) :] if ends else ""
    return tail if tail.startswith("/") else "/" + tail
