"""The embedded store: one SQLite file shared by every agent on one machine.

``SqliteCore`` is synchronous and owns one connection; ``SqliteStore`` runs it on one
worker thread so the event loop never blocks on the disk or on another process's lock.

Concurrency: WAL (readers never block the writer), a busy timeout (writers queue instead
of failing), and every write in ``BEGIN IMMEDIATE`` so its reads and checks happen under
the write lock: a compare-and-swap cannot interleave with another process's. A writer
killed mid-transaction leaves only uncommitted WAL frames, which SQLite ignores.

Revisions: a counter in ``meta`` goes up by one per write transaction that changes
something; the ``changes`` table keeps each changed record under that revision, so a
watcher polls ``rev > last`` and resumes exactly where it stopped.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from ipaddress import IPv4Address
from typing import Any, ParamSpec, TypeVar, cast

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

from orchestrator.errors import StoreError
from orchestrator.store.base import (
    Address,
    AuditAnchor,
    Change,
    Compacted,
    Kind,
    Liveness,
    MigrationRecord,
    NodeRecord,
    Ownership,
    Phase,
    PublicAddress,
    Record,
    Snapshot,
    Store,
    anchor_advances,
    check_advance,
    check_epochs,
    check_known_nodes,
    check_migration_start,
    check_public,
    expected_epochs,
    finish_target,
    from_dict,
    guest_after,
    same_migration,
    to_dict,
    to_ip,
    to_phase,
)

SCHEMA_VERSION = 3  # 2: leases, public addresses; 3: audit anchors (older files gain them)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
CREATE TABLE IF NOT EXISTS ownership (
    ip TEXT PRIMARY KEY, node TEXT, guest TEXT NOT NULL,
    epoch INTEGER NOT NULL, since REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ownership_node ON ownership(node);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, tag INTEGER NOT NULL UNIQUE, mac_prefix TEXT NOT NULL,
    pub_ip TEXT NOT NULL, heartbeat REAL NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY, guest TEXT NOT NULL, phase TEXT NOT NULL, started REAL NOT NULL,
    body TEXT NOT NULL);
-- the rule "one active migration per guest", enforced by the file itself too
CREATE UNIQUE INDEX IF NOT EXISTS one_active_migration ON migrations(guest)
    WHERE phase NOT IN ('done', 'aborted');
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, ttl REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS public (
    node TEXT PRIMARY KEY, ip TEXT NOT NULL, holder TEXT NOT NULL, epoch INTEGER NOT NULL,
    since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit_anchors (
    node TEXT PRIMARY KEY, path TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL,
    time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    rev INTEGER NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT, PRIMARY KEY (rev, idx)) WITHOUT ROWID;
"""
WATCH_BATCH = 256  # revisions per poll


def _own(row: sqlite3.Row) -> Ownership:
    return Ownership(IPv4Address(row["ip"]), row["node"], row["guest"], row["epoch"],
                     row["since"])


def _node(row: sqlite3.Row) -> NodeRecord:
    return NodeRecord(row["name"], row["tag"], row["mac_prefix"], IPv4Address(row["pub_ip"]),
                      row["heartbeat"])


def _pub(row: sqlite3.Row) -> PublicAddress:
    return PublicAddress(row["node"], IPv4Address(row["ip"]), row["holder"], row["epoch"],
                         row["since"])


def _anchor(row: sqlite3.Row) -> AuditAnchor:
    return AuditAnchor(row["node"], row["path"], row["seq"], row["hash"], row["time"])


def _mig(row: sqlite3.Row) -> MigrationRecord:
    return cast(MigrationRecord, from_dict("migration", json.loads(row["body"])))


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


class SqliteCore:
    """Synchronous; use from one thread. Every method is one transaction."""

    def __init__(self, path: str, *, busy_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._rev: int | None = None  # the revision of the open write transaction
        self._idx = 0
        # Opening can fail at once with "database is locked" where the busy timeout does not
        # apply (another process checkpointing the WAL away as it closes, or recovering it):
        # several agents starting together hit that, so the open itself is retried.
        opening = Retrying(
            retry=retry_if_exception(_is_locked), stop=stop_after_delay(busy_timeout),
            wait=wait_random(0.01, 0.1), reraise=True,
        )  # fmt: skip
        try:
            self._db = opening(self._connect, busy_timeout)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            self._db = db
            self._setup()
        except BaseException:
            db.close()
            raise
        return db

    def _setup(self) -> None:
        db = self._db
        # FULL: a committed epoch must survive power loss, or a fencing token could repeat
        db.execute("PRAGMA synchronous=FULL")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise StoreError(f"store {self.path}: cannot switch to WAL (network filesystem?)")
        if self._schema_version() == SCHEMA_VERSION:
            return  # the usual case: no write lock needed to open
        with self._write():
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {self.path} has schema {version}; this convergent "
                             f"knows up to {SCHEMA_VERSION}: upgrade convergent")
        return version

    def close(self) -> None:
        self._db.close()

    # --- transactions ---------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")  # take the write lock before reading
        self._rev, self._idx = None, 0
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._rev = None

    @contextmanager
    def _read(self) -> Iterator[None]:
        self._db.execute("BEGIN")  # one WAL snapshot for several SELECTs
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _log(self, kind: Kind, key: str, rec: Record | None) -> None:
        """Record a change under this transaction's revision (taken on first use)."""
        if self._rev is None:
            row = self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision' "
                                   "RETURNING value").fetchone()
            self._rev = int(row[0])
        value = None if rec is None else json.dumps(to_dict(rec))
        self._db.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?)",
                         (self._rev, self._idx, kind, key, value))
        self._idx += 1

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    # --- ownership ------------------------------------------------------------------

    def get_ownership(self, ip: Address) -> Ownership | None:
        row = self._db.execute("SELECT * FROM ownership WHERE ip = ?", (str(to_ip(ip)),))
        found = row.fetchone()
        return _own(found) if found else None

    def list_ownership(self, node: str | None = None, guest: str | None = None,
                       include_released: bool = False) -> list[Ownership]:
        rows = self._db.execute(
            "SELECT * FROM ownership WHERE (?1 IS NULL OR node = ?1) AND (?2 IS NULL OR guest = ?2)"
            " AND (?3 OR node IS NOT NULL)", (node, guest, include_released))
        return sorted((_own(r) for r in rows), key=lambda o: o.ip)

    def _swap(self, expected: Mapping[Address, int], node: str | None,
              guest: str | None) -> list[Ownership]:
        """The one compare-and-swap behind claim and release."""
        want = expected_epochs(expected)
        out = []
        with self._write():
            if node is not None:
                check_known_nodes(self._node_names(), node)
            current = {ip: self.get_ownership(ip) for ip in want}
            check_epochs(want, current)
            now = self._clock()
            for ip in sorted(want):
                new = Ownership(ip, node, guest_after(ip, current[ip], guest), want[ip] + 1,
                                now)
                self._db.execute("INSERT OR REPLACE INTO ownership VALUES (?, ?, ?, ?, ?)",
                                 (str(ip), new.node, new.guest, new.epoch, new.since))
                self._log("ownership", str(ip), new)
                out.append(new)
        return out

    def claim_all(self, expected: Mapping[Address, int], node: str,
                  guest: str) -> list[Ownership]:
        return self._swap(expected, node, guest)

    def release_each(self, groups: Sequence[Mapping[Address, int]]
                     ) -> list[list[Ownership] | StoreError]:
        """Every group in one write transaction (one fsync); a stale group is skipped."""
        out: list[list[Ownership] | StoreError] = []
        with self._write():
            now = self._clock()
            for expected in groups:
                try:
                    want = expected_epochs(expected)
                    current = {ip: self.get_ownership(ip) for ip in want}
                    check_epochs(want, current)
                    new = [Ownership(ip, None, guest_after(ip, current[ip], None),
                                     want[ip] + 1, now) for ip in sorted(want)]
                except StoreError as exc:
                    out.append(exc)
                    continue
                for rec in new:
                    self._db.execute("INSERT OR REPLACE INTO ownership VALUES (?, ?, ?, ?, ?)",
                                     (str(rec.ip), None, rec.guest, rec.epoch, rec.since))
                    self._log("ownership", str(rec.ip), rec)
                out.append(new)
        return out

    def release_all(self, expected: Mapping[Address, int]) -> list[Ownership]:
        return self._swap(expected, None, None)

    # --- nodes ----------------------------------------------------------------------

    def _node_names(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT name FROM nodes")}

    def get_node(self, name: str) -> NodeRecord | None:
        row = self._db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        return _node(row) if row else None

    def list_nodes(self) -> list[NodeRecord]:
        return [_node(r) for r in self._db.execute("SELECT * FROM nodes ORDER BY name")]

    def upsert_node(self, name: str, tag: int, mac_prefix: str, pub_ip: Address) -> NodeRecord:
        new = NodeRecord(name, tag, mac_prefix.lower(), to_ip(pub_ip), self._clock())
        with self._write():
            clash = self._db.execute("SELECT name FROM nodes WHERE tag = ? AND name != ?",
                                     (tag, name)).fetchone()
            if clash:
                raise StoreError(f"node {name}: tag {tag} already belongs to node {clash[0]}")
            old = self.get_node(name)
            self._db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?)",
                             (name, tag, new.mac_prefix, str(new.pub_ip), new.heartbeat))
            # a restart re-registers with the same values: that is a heartbeat, not news
            if old is None or replace(old, heartbeat=new.heartbeat) != new:
                self._log("node", name, new)
        return new

    def heartbeat(self, name: str) -> NodeRecord:
        now = self._clock()
        with self._write():
            cur = self._db.execute("UPDATE nodes SET heartbeat = ? WHERE name = ?", (now, name))
            if cur.rowcount == 0:
                raise StoreError(f"heartbeat from unknown node {name!r}: upsert it first")
            self._db.execute("UPDATE leases SET expires = ? + ttl WHERE name = ?", (now, name))
            node = self.get_node(name)
        assert node is not None
        return node

    # --- liveness: an expiry time, read against the clock ---------------------------

    def grant_lease(self, name: str, ttl: float) -> Liveness:
        if ttl <= 0:
            raise StoreError(f"lease of {name}: ttl must be positive, got {ttl}")
        with self._write():
            if self.get_node(name) is None:
                raise StoreError(f"lease for unknown node {name!r}: upsert it first")
            self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)",
                             (name, float(ttl), self._clock() + ttl))
        return Liveness(name, True, float(ttl), float(ttl))

    def revoke_lease(self, name: str) -> None:
        with self._write():
            self._db.execute("UPDATE leases SET expires = 0 WHERE name = ?", (name,))

    def list_liveness(self) -> list[Liveness]:
        now = self._clock()
        rows = self._db.execute("SELECT nodes.name, ttl, expires FROM nodes LEFT JOIN leases "
                                "ON leases.name = nodes.name ORDER BY nodes.name")
        out = []
        for name, ttl, expires in rows:
            left = max(0.0, (expires or 0.0) - now)
            out.append(Liveness(name, left > 0, float(ttl or 0.0), left))
        return out

    # --- public addresses -----------------------------------------------------------

    def get_public(self, node: str) -> PublicAddress | None:
        row = self._db.execute("SELECT * FROM public WHERE node = ?", (node,)).fetchone()
        return _pub(row) if row else None

    def list_public(self) -> list[PublicAddress]:
        return [_pub(r) for r in self._db.execute("SELECT * FROM public ORDER BY node")]

    def claim_public(self, node: str, ip: Address, holder: str,
                     expected_epoch: int) -> PublicAddress:
        addr = to_ip(ip)
        with self._write():
            check_public(node, addr, holder, expected_epoch, self.get_public(node),
                         self._node_names())
            new = PublicAddress(node, addr, holder, expected_epoch + 1, self._clock())
            self._db.execute("INSERT OR REPLACE INTO public VALUES (?, ?, ?, ?, ?)",
                             (node, str(addr), holder, new.epoch, new.since))
            self._log("public", node, new)
        return new

    # --- audit anchors --------------------------------------------------------------

    def anchor_audit(self, anchor: AuditAnchor) -> AuditAnchor:
        with self._write():  # not a change: no revision
            row = self._db.execute("SELECT * FROM audit_anchors WHERE node = ?",
                                   (anchor.node,)).fetchone()
            old = _anchor(row) if row else None
            if not anchor_advances(old, anchor):
                assert old is not None
                return old
            self._db.execute("INSERT OR REPLACE INTO audit_anchors VALUES (?, ?, ?, ?, ?)",
                             (anchor.node, anchor.path, anchor.seq, anchor.hash, anchor.time))
        return anchor

    def list_audit_anchors(self) -> list[AuditAnchor]:
        return [_anchor(r) for r in self._db.execute("SELECT * FROM audit_anchors ORDER BY node")]

    # --- migrations -----------------------------------------------------------------

    def get_migration(self, id: str) -> MigrationRecord | None:
        row = self._db.execute("SELECT body FROM migrations WHERE id = ?", (id,)).fetchone()
        return _mig(row) if row else None

    def list_migrations(self, active: bool = True,
                        guest: str | None = None) -> list[MigrationRecord]:
        rows = self._db.execute(
            "SELECT body FROM migrations WHERE (?1 IS NULL OR guest = ?1)"
            " AND (NOT ?2 OR phase NOT IN ('done', 'aborted')) ORDER BY started, id",
            (guest, active))
        return [_mig(r) for r in rows]

    def create_migration(self, guest: str, addresses: Iterable[Address], src: str, dst: str,
                         id: str | None = None) -> MigrationRecord:
        ips = tuple(sorted({to_ip(a) for a in addresses}))
        if not ips:
            raise StoreError(f"migration of {guest}: no addresses given")
        with self._write():
            old = self.get_migration(id) if id else None
            if old is not None:
                return same_migration(old, guest, ips, src, dst)
            owners = {ip: self.get_ownership(ip) for ip in ips}
            check_migration_start(guest, src, dst, self.list_migrations(guest=guest),
                                  self._node_names(), owners)
            now = self._clock()
            mig = MigrationRecord(
                id=id or uuid.uuid4().hex[:12], guest=guest, addresses=ips, src=src, dst=dst,
                phase=Phase.PREPARE, started=now, updated=now,
                epoch_before={ip: own.epoch if own else 0 for ip, own in owners.items()})
            self._db.execute("INSERT INTO migrations VALUES (?, ?, ?, ?, ?)",
                             (mig.id, guest, mig.phase.value, now, json.dumps(to_dict(mig))))
            self._log("migration", mig.id, mig)
        return mig

    def _update(self, id: str, change: Callable[[MigrationRecord], MigrationRecord | None]
                ) -> MigrationRecord:
        """Read-modify-write one migration; ``change`` returns None for "no change"."""
        with self._write():
            mig = self.get_migration(id)
            if mig is None:
                raise StoreError(f"no migration {id!r}")
            new = change(mig)
            if new is None:
                return mig
            new = replace(new, updated=self._clock())
            self._db.execute("UPDATE migrations SET phase = ?, body = ? WHERE id = ?",
                             (new.phase.value, json.dumps(to_dict(new)), id))
            self._log("migration", id, new)
        return new

    def advance_phase(self, id: str, expected: Phase, to: Phase) -> MigrationRecord:
        was, to = to_phase(expected), to_phase(to)
        return self._update(id, lambda m: replace(m, phase=to)
                            if check_advance(m, was, to) else None)

    def record_timing(self, id: str, phase: Phase, ms: float) -> MigrationRecord:
        key = to_phase(phase).value
        return self._update(id, lambda m: replace(m, timings={**m.timings, key: float(ms)}))

    def abort_migration(self, id: str, error: str) -> MigrationRecord:
        def change(m: MigrationRecord) -> MigrationRecord | None:
            if m.phase in (Phase.ABORT, Phase.ABORTED):
                return None
            check_advance(m, m.phase, Phase.ABORT)
            return replace(m, phase=Phase.ABORT, error=error)
        return self._update(id, change)

    def finish_migration(self, id: str) -> MigrationRecord:
        def change(m: MigrationRecord) -> MigrationRecord | None:
            to = finish_target(m)
            return None if to == m.phase else replace(m, phase=to)
        return self._update(id, change)

    # --- changes --------------------------------------------------------------------

    def revision(self) -> int:
        return self._meta("revision")

    def snapshot(self) -> Snapshot:
        with self._read():
            return Snapshot(self.revision(), tuple(self.list_ownership()),
                            tuple(self.list_nodes()), tuple(self.list_migrations()),
                            tuple(self.list_public()))

    def changes_since(self, after: int, max_revisions: int = WATCH_BATCH) -> list[Change]:
        with self._read():
            compacted = self._meta("compacted")
            if after < compacted:
                raise Compacted(f"store {self.path}: changes up to revision {compacted} are "
                                f"compacted (asked for those after {after}): relist, then watch")
            rows = self._db.execute(
                "SELECT * FROM changes WHERE rev > ? AND rev <= ? ORDER BY rev, idx",
                (after, after + max_revisions)).fetchall()
        return [_change(r) for r in rows]

    def compact(self, revision: int) -> None:
        with self._write():
            if revision > self.revision():
                raise StoreError(f"cannot compact to revision {revision}: the store is at "
                                 f"{self.revision()}")
            self._db.execute("DELETE FROM changes WHERE rev <= ?", (revision,))
            self._db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'compacted'",
                             (revision,))


def _change(row: sqlite3.Row) -> Change:
    kind = cast(Kind, row["kind"])
    rec = None if row["value"] is None else from_dict(kind, json.loads(row["value"]))
    return Change(row["rev"], kind, row["key"], rec)


P = ParamSpec("P")
T = TypeVar("T")


class SqliteStore(Store):
    """The async face of ``SqliteCore``: one worker thread, one connection."""

    def __init__(self, path: str, *, poll_interval: float = 0.05, **core: Any) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self._closed = False
        self._granted: set[str] = set()  # leases this store granted: revoked on close
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="convergent-store")
        try:
            self._core = self._pool.submit(SqliteCore, path, **core).result()
        except BaseException:
            self._pool.shutdown()
            raise

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except sqlite3.Error as exc:
            # wrapped once, here: lock timeouts, full disks, corrupt files
            raise StoreError(f"store {self.path}: {fn.__name__} failed: {exc}") from exc

    async def get_ownership(self, ip: Address) -> Ownership | None:
        return await self._call(self._core.get_ownership, ip)

    async def list_ownership(self, *, node: str | None = None, guest: str | None = None,
                             include_released: bool = False) -> list[Ownership]:
        return await self._call(self._core.list_ownership, node, guest, include_released)

    async def claim_all(self, expected: Mapping[Address, int], node: str,
                        guest: str) -> list[Ownership]:
        return await self._call(self._core.claim_all, expected, node, guest)

    async def release_all(self, expected: Mapping[Address, int]) -> list[Ownership]:
        return await self._call(self._core.release_all, expected)

    async def release_each(self, groups: Sequence[Mapping[Address, int]]
                           ) -> list[list[Ownership] | StoreError]:
        return await self._call(self._core.release_each, list(groups))

    async def upsert_node(self, name: str, tag: int, mac_prefix: str,
                          pub_ip: Address) -> NodeRecord:
        return await self._call(self._core.upsert_node, name, tag, mac_prefix, pub_ip)

    async def heartbeat(self, name: str) -> NodeRecord:
        return await self._call(self._core.heartbeat, name)

    async def get_node(self, name: str) -> NodeRecord | None:
        return await self._call(self._core.get_node, name)

    async def grant_lease(self, name: str, ttl: float) -> Liveness:
        live = await self._call(self._core.grant_lease, name, ttl)
        self._granted.add(name)
        return live

    async def revoke_lease(self, name: str) -> None:
        await self._call(self._core.revoke_lease, name)
        self._granted.discard(name)

    async def list_liveness(self) -> list[Liveness]:
        return await self._call(self._core.list_liveness)

    async def get_public(self, node: str) -> PublicAddress | None:
        return await self._call(self._core.get_public, node)

    async def list_public(self) -> list[PublicAddress]:
        return await self._call(self._core.list_public)

    async def claim_public(self, node: str, ip: Address, holder: str,
                           expected_epoch: int) -> PublicAddress:
        return await self._call(self._core.claim_public, node, ip, holder, expected_epoch)

    async def list_nodes(self) -> list[NodeRecord]:
        return await self._call(self._core.list_nodes)

    async def anchor_audit(self, anchor: AuditAnchor) -> AuditAnchor:
        return await self._call(self._core.anchor_audit, anchor)

    async def list_audit_anchors(self) -> list[AuditAnchor]:
        return await self._call(self._core.list_audit_anchors)

    async def create_migration(self, guest: str, addresses: Iterable[Address], src: str,
                               dst: str, *, id: str | None = None) -> MigrationRecord:
        return await self._call(self._core.create_migration, guest, list(addresses), src, dst,
                                id)

    async def get_migration(self, id: str) -> MigrationRecord | None:
        return await self._call(self._core.get_migration, id)

    async def list_migrations(self, *, active: bool = True,
                              guest: str | None = None) -> list[MigrationRecord]:
        return await self._call(self._core.list_migrations, active, guest)

    async def advance_phase(self, id: str, expected: Phase, to: Phase) -> MigrationRecord:
        return await self._call(self._core.advance_phase, id, expected, to)

    async def record_timing(self, id: str, phase: Phase, ms: float) -> MigrationRecord:
        return await self._call(self._core.record_timing, id, phase, ms)

    async def abort_migration(self, id: str, error: str) -> MigrationRecord:
        return await self._call(self._core.abort_migration, id, error)

    async def finish_migration(self, id: str) -> MigrationRecord:
        return await self._call(self._core.finish_migration, id)

    async def revision(self) -> int:
        return await self._call(self._core.revision)

    async def snapshot(self) -> Snapshot:
        return await self._call(self._core.snapshot)

    async def changes_since(self, after: int) -> list[Change]:
        return await self._call(self._core.changes_since, after)

    async def watch(self, after: int = 0) -> AsyncGenerator[Change, None]:
        # polling a primary-key range is cheap; other processes' commits show up here
        while True:
            batch = await self.changes_since(after)
            for change in batch:
                yield change
                after = change.revision
            if not batch:
                await asyncio.sleep(self.poll_interval)

    async def compact(self, revision: int) -> None:
        await self._call(self._core.compact, revision)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in sorted(self._granted):  # as etcd's: a clean close says "dead" at once
            await self._call(self._core.revoke_lease, name)
        await self._call(self._core.close)
        self._pool.shutdown()
