"""Ownership store (DESIGN §3): ``open_store(url)`` picks the backend.

``sqlite:///var/lib/convergent/store.db`` (or a bare path) is the embedded default;
``etcd://host:2379[,host:2379]/prefix`` (``etcds://`` with TLS) is for real clusters: see
``orchestrator/store/etcdurl.py`` for the options.
"""

from __future__ import annotations

import asyncio
from typing import Any

from orchestrator.errors import StoreError
from orchestrator.store.base import (
    AuditAnchor,
    Change,
    Compacted,
    EpochConflict,
    Liveness,
    MigrationRecord,
    NodeRecord,
    Ownership,
    Phase,
    PhaseConflict,
    PublicAddress,
    PublicConflict,
    Snapshot,
    Store,
)

DEFAULT_URL = "sqlite:///var/lib/convergent/store.db"

__all__ = [
    "DEFAULT_URL",
    "AuditAnchor",
    "Change",
    "Compacted",
    "EpochConflict",
    "Liveness",
    "MigrationRecord",
    "NodeRecord",
    "Ownership",
    "Phase",
    "PhaseConflict",
    "PublicAddress",
    "PublicConflict",
    "Snapshot",
    "Store",
    "open_store",
    "outwaits_refusal",
    "refusal_within_s",
    "sqlite_path",
]


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL or bare path; None for another scheme.
    ``sqlite:///abs/file.db`` is /abs/file.db, ``sqlite://rel.db`` is rel.db."""
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
    elif "://" not in url:
        path = url
    else:
        return None
    if not path:
        raise StoreError(f"store URL {url!r} names no file: use sqlite:///path/to/store.db")
    return path


def refusal_within_s(url: str) -> float:
    """How long a store may take to say it cannot answer: a hook waiting for the agent's
    verdict must wait longer, or the refusal never reaches it. etcd: the URL's
    ``timeout`` (across all members); SQLite refuses at once (a held lock is a wait)."""
    if sqlite_path(url) is not None:
        return 0.0
    from orchestrator.store.etcdurl import parse_etcd_url

    return parse_etcd_url(url).timeout


def outwaits_refusal(url: str, floor: float) -> float:
    """How long a hook waiting for a verdict waits: ``floor``, or a second longer than the
    store at ``url`` may take to refuse."""
    return max(floor, refusal_within_s(url) + 1.0)


async def open_store(url: str = DEFAULT_URL, **options: Any) -> Store:
    """Open (creating if needed) the store at ``url``; options go to the backend."""
    path = sqlite_path(url)
    if path is not None:
        from orchestrator.store.sqlite import SqliteStore

        return await asyncio.to_thread(SqliteStore, path, **options)
    scheme = url.split("://", 1)[0]
    if scheme in ("etcd", "etcds"):
        from orchestrator.store.etcd import EtcdStore

        if options:
            raise StoreError(f"store {url}: options go in the URL's query for etcd")
        return await EtcdStore.open(url)
    raise StoreError(f"store {url}: unknown scheme {scheme!r}; use sqlite:///path or etcd://")
