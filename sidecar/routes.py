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
from sidecar.providers.registry import build_verifier


@dataclass(frozen=True, slots=True)
class Route:
    cfg: RouteConfig
    verifier: Verifier
    policy: RetryPolicy

    @classmethod
    def build(cls, cfg: RouteConfig) -> Route:
        return cls(
            cfg,
            build_verifier(cfg.provider, cfg.secrets, cfg.tolerance, cfg.signature),
            RetryPolicy.parse(cfg.retry.retry_on),
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


def target_url(config: Config, route: RouteConfig, path_qs: str) -> str:
    """Where the event goes: the route's `upstream` (plus the original query), else upstream.url + path + query."""
    if route.upstream:
        _, sep, query = path_qs.partition("?")
        if sep and "?" not in route.upstream:
            return f"{route.upstream}?{query}"
        return route.upstream
    return config.upstream.url.rstrip("/") + path_qs
