"""``etcd://`` store URLs, parsed without I/O.

    etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/convergent
    etcds://etcd1:2379,etcd2:2379/convergent?ca=/etc/convergent/etcd-ca.pem
        &cert=/etc/convergent/etcd.pem&key=/etc/convergent/etcd-key.pem
    etcd://%2Frun%2Fetcd%2Fclient.sock/convergent        (a Unix socket: percent-encoded)

The path is the key prefix (default ``/convergent``). Query options: ``ca``, ``cert``,
``key`` (PEM files; ``etcds://`` needs ``ca``; a client cert needs both ``cert`` and
``key``), ``server_name`` (the name the members' certificates carry, if not their host),
``timeout`` (seconds an operation may take across all members, default 5),
``max_txn_ops`` (the members' ``--max-txn-ops``, default 128, as etcd's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from orchestrator.errors import StoreError

OPTIONS = ("ca", "cert", "key", "server_name", "timeout", "max_txn_ops")
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class EtcdUrl:
    endpoints: tuple[str, ...]  # "host:port" or "unix:/path"
    prefix: str
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    timeout: float = 5.0
    max_txn_ops: int = 128

    @property
    def display(self) -> str:
        """The URL without options: what error messages name."""
        hosts = ",".join(e if not e.startswith("unix:") else e[5:] for e in self.endpoints)
        return f"{'etcds' if self.tls else 'etcd'}://{hosts}{self.prefix}"


def parse_etcd_url(url: str) -> EtcdUrl:
    parts = urlsplit(url)
    if parts.scheme not in ("etcd", "etcds"):
        raise StoreError(f"store {url}: not an etcd URL (etcd:// or etcds://)")
    hosts = [h for h in parts.netloc.split(",") if h]
    if not hosts:
        raise StoreError(f"store {url}: names no etcd member, e.g. etcd://10.0.0.1:2379/convergent")
    endpoints = tuple(_endpoint(url, h) for h in hosts)
    prefix = unquote(parts.path).rstrip("/") or "/convergent"
    opts = _options(url, parts.query)
    tls = parts.scheme == "etcds"
    if tls and not opts.get("ca"):
        raise StoreError(f"store {url}: etcds:// needs ca=FILE (the members' CA certificate)")
    if not tls and any(opts.get(k) for k in ("ca", "cert", "key")):
        raise StoreError(f"store {url}: ca/cert/key given for a plain etcd:// URL; use etcds://")
    if bool(opts.get("cert")) != bool(opts.get("key")):
        raise StoreError(f"store {url}: a client certificate needs both cert= and key=")
    return EtcdUrl(endpoints, prefix, tls, opts.get("ca"), opts.get("cert"), opts.get("key"),
                   opts.get("server_name"), _number(url, opts, "timeout", 5.0, float),
                   int(_number(url, opts, "max_txn_ops", 128, int)))


def _endpoint(url: str, host: str) -> str:
    host = unquote(host)
    if host.startswith("/"):
        return f"unix:{host}"
    if not _HOSTPORT.match(host) or not 0 < int(host.rsplit(":", 1)[1]) < 65536:
        raise StoreError(f"store {url}: member {host!r} is not host:port")
    return host


def _options(url: str, query: str) -> dict[str, str]:
    raw = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise StoreError(f"store {url}: unknown option {unknown[0]!r}; options: "
                         f"{', '.join(OPTIONS)}")
    twice = [k for k, v in raw.items() if len(v) > 1]
    if twice:
        raise StoreError(f"store {url}: option {twice[0]!r} given twice")
    return {k: v[0] for k, v in raw.items()}


def _number(url: str, opts: dict[str, str], name: str, default: float,
            kind: type[int] | type[float]) -> float:
    if name not in opts:
        return default
    try:
        value = kind(opts[name])
    except ValueError:
        raise StoreError(f"store {url}: {name}={opts[name]!r} is not a number") from None
    if value <= 0 or (name == "max_txn_ops" and value < 4):
        raise StoreError(f"store {url}: {name}={opts[name]} is too small")
    return value
