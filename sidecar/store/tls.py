"""TLS for a rediss:// or rediss+cluster:// store URL, read from the query parameters redis-py reads, so that both of the store's
clients (the pipelined transport and redis-py) trust the same server the same way. No redis import: the config
checks a URL's settings with it at load time."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

log = logging.getLogger("sidecar.store")

MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
SUPPORTED = {
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_ca_data",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_ciphers",
}


def url_query(query: str) -> dict[str, str]:
    """A URL's query parameters as redis-py reads them: the first of repeated keys counts."""
    return {k: v[0] for k, v in parse_qs(query).items()}


# redis-py's cluster client takes no ssl_ca_path or ssl_password: on a cluster they would hold for the hot path's
# connections only, so they are refused there
NOT_ON_A_CLUSTER = ("ssl_ca_path", "ssl_password")


def _modes(query: dict[str, str], cluster: bool) -> tuple[str, bool]:
    """(ssl_cert_reqs, whether the host name is checked), after refusing what cannot be honoured."""
    allowed = SUPPORTED.difference(NOT_ON_A_CLUSTER) if cluster else SUPPORTED
    unknown = sorted(k for k in query if k.startswith("ssl_") and k not in allowed)
    if unknown:
        where = " on a cluster" if cluster and set(unknown) & set(NOT_ON_A_CLUSTER) else ""
        raise ValueError(
            f"unsupported TLS parameter(s){where}: {', '.join(unknown)} (supported: {', '.join(sorted(allowed))})"
        )
    reqs = query.get("ssl_cert_reqs", "required")  # case-sensitive, as redis-py reads it
    if reqs not in MODES:
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")
    check = query.get("ssl_check_hostname", "true").lower() not in ("false", "0", "no", "n", "f", "")
    return reqs, check and reqs != "none"


def cluster_tls(query: dict[str, str]) -> dict[str, Any]:
    """redis-py cluster client keyword arguments for the TLS that `tls_context(query, cluster=True)` sets up for the
    hot path, so both clients trust every node the same way."""
    reqs, check = _modes(query, cluster=True)
    options: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": reqs, "ssl_check_hostname": check}
    for key in ("ssl_ca_certs", "ssl_ca_data", "ssl_certfile", "ssl_keyfile", "ssl_ciphers"):
        if query.get(key):
            options[key] = query[key]
    return options


def tls_context(query: dict[str, str], cluster: bool = False) -> ssl.SSLContext:
    """The system's CAs and a matching host name unless told otherwise. Raises ValueError (or OSError /
    ssl.SSLError for unreadable files) naming the problem. `cluster`: for every node of a rediss+cluster:// URL,
    where redis-py's cluster client cannot take ssl_ca_path or ssl_password."""
    reqs, check = _modes(query, cluster)
    context = ssl.create_default_context()
    context.check_hostname = check
    context.verify_mode = MODES[reqs]
    if query.get("ssl_keyfile") and not query.get("ssl_certfile"):
        raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate it belongs to)")
    if query.get("ssl_certfile"):
        password = query.get("ssl_password")

        def no_prompt() -> str:  # an encrypted key without ssl_password must fail, not wait at a prompt
            raise ValueError("ssl_keyfile is encrypted: give its ssl_password")

        _load(
            _named(query, "ssl_certfile", "ssl_keyfile"),
            lambda: context.load_cert_chain(
                query["ssl_certfile"], query.get("ssl_keyfile"), password or no_prompt
            ),
        )
    if query.get("ssl_ca_certs") or query.get("ssl_ca_path") or query.get("ssl_ca_data"):
        _load(
            _named(query, "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data"),
            lambda: context.load_verify_locations(
                cafile=query.get("ssl_ca_certs"),
                capath=query.get("ssl_ca_path"),
                cadata=query.get("ssl_ca_data"),
            ),
        )
    if query.get("ssl_ciphers"):
        _load("ssl_ciphers", lambda: context.set_ciphers(query["ssl_ciphers"]))
    return context


def _named(query: dict[str, str], *keys: str) -> str:
    """The given ones of `keys`, each with its file (a missing CA file was "ssl_ca_certs / ssl_ca_path /
    ssl_ca_data: [Errno 2] No such file or directory", naming neither which nor the file)."""
    given = [k if k == "ssl_ca_data" else f"{k}={query[k]!r}" for k in keys if query.get(k)]
    return ", ".join(given)


def _load(what: str, load: Callable[[], object]) -> None:
    try:
        load()
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{what}: {exc}") from exc


FILES = ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "ssl_ca_path")


class ReloadingTLS:
    """`tls_context(query, cluster)` that follows its files. Certificates rotate (cert-manager, a managed store's
    CA renewal) under a sidecar that runs for months: `current()`, called for each new connection, builds a fresh
    context when a file named in the URL changed (a stat per file; Kubernetes' symlink swaps included). Files
    caught half written keep the last good context, with a warning, until they change again. Connections already
    open keep the context they were made with, as TLS does."""

    def __init__(self, query: dict[str, str], cluster: bool = False) -> None:
        self._query, self._cluster = query, cluster
        self._stamp = self._files()
        self._context = tls_context(query, cluster)
        self._refused: tuple[Any, ...] | None = None

    def _files(self) -> tuple[Any, ...]:
        stamp: list[Any] = []
        for key in FILES:
            if path := self._query.get(key):
                try:
                    st = os.stat(path)
                except OSError as exc:
                    stamp.append(exc.errno)
                else:
                    stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def current(self) -> ssl.SSLContext:
        stamp = self._files()
        if stamp == self._stamp or stamp == self._refused:
            return self._context
        try:
            context = tls_context(self._query, self._cluster)
        except ValueError as exc:
            log.warning(
                "the store's TLS files changed but do not load (the previous ones stay in use): %s", exc
            )
            self._refused = stamp
            return self._context
        log.info("the store's TLS files changed: new connections use them")
        self._context, self._stamp, self._refused = context, stamp, None
        return context
