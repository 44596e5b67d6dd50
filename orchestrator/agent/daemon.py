"""``convergent agent``: one per node (DESIGN §6).

It owns the node's kernel state: the ruleset and its sets (reconciled from the store,
periodically and whenever the store changes), the conntrack engine, the migration
coordinator for guests arriving here, the source side of the peer channel for guests
leaving, and the replicator. It answers hooks and the CLI on a Unix socket.

A restarted agent remembers nothing: it reads its unfinished migrations from the store and
finishes or aborts each (``recover``), and the handover bit in D's kernel tells an abort
exactly which entries to take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
from typing import Any

import structlog

from orchestrator.agent.api import ApiServer, Handler
from orchestrator.agent.failpoints import Failpoints
from orchestrator.agent.keys import load_key
from orchestrator.agent.metrics import AgentMetrics, timed_store
from orchestrator.agent.peer import PeerFeed, PeerServer
from orchestrator.agent.reconcile import Reconciler
from orchestrator.agent.reload import reload_problems
from orchestrator.audit.key import audit_key
from orchestrator.audit.log import AuditLog
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.logs import is_journal
from orchestrator.migration.coordinator import Coordinator, Handover, NodeHandle
from orchestrator.migration.feed import SourceFeed, SourceSide
from orchestrator.migration.nodeops import NftNodeOps
from orchestrator.model.cluster import Topology
from orchestrator.netfilter.conntrack import ConntrackTable
from orchestrator.replicator.precopy import PrecopySource
from orchestrator.store import open_store
from orchestrator.store.base import ABORTABLE, Address, MigrationRecord, Phase, Store

log = structlog.get_logger("convergent.agent")
WATCH_DEBOUNCE = 0.01


class Agent:
    def __init__(self, topology: Topology, node: str) -> None:
        try:
            self.me = topology.node(node)
        except KeyError:
            raise ConvergentError(f"node {node!r} is not in the cluster config (nodes: "
                                  f"{', '.join(n.name for n in topology.nodes)})") from None
        self.topology = topology
        self.node = node
        self.settings = topology.agent
        self.key = load_key(self.settings.key_file)
        self.failpoint = Failpoints()
        self.handovers: dict[str, Handover] = {}  # guest -> migration arriving here
        self.ungated: set[str] = set()  # guests migrating here without handover (control)
        self.finalizers: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.started = time.time()
        self.sync: Any = None  # replicator SyncService, when the sync interface exists
        self.metrics = AgentMetrics(node)
        self.ready = asyncio.Event()  # set once it serves: systemd's READY=1 (lifecycle.py)
        self.stop_reason = "stopped"

    # lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.store: Store = timed_store(await open_store(self.settings.store), self.metrics)
        self.audit = AuditLog(_per_node(str(self.settings.audit_log), self.node),
                              node=self.node, actor="agent",
                              key=audit_key(self.settings.audit_key_file))
        self.audit.subscribe(self.metrics.on_audit)
        self.table = ConntrackTable(None)
        handle = NodeHandle(self.node, self.table,
                            NftNodeOps(self.node, None, self.topology.cluster.guest_bridge))
        self.coordinator = Coordinator(self.topology, self.store, {self.node: handle},
                                       self.audit, feed_factory=self._feed,
                                       failpoint=self.failpoint)
        self.reconciler = Reconciler(self.topology, self.node, self.store,
                                     ungated=self.ungated, audit=self.audit)
        self.api = ApiServer(self.settings.socket(self.node), self._handlers())
        self.peer = PeerServer(self.node, self.key, self._authorize, self.wake.set,
                               self.failpoint, open_precopy=self._open_precopy,
                               addresses={n.name: str(n.peer_ip) for n in self.topology.nodes})
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self.store.upsert_node(self.node, self.me.tag, self.me.mac_prefix,
                                         self.me.pub_ip)
            await self.store.grant_lease(self.node, self.settings.lease_ttl_s)
            await self.audit.arecord("agent.start", detail=f"pid {os.getpid()}")
            await self.reconciler.run(ruleset=True)
            await self._register_public()
            await self.peer.start(str(self.me.peer_ip), self.settings.peer_port)
            await self._start_sync()
            await self.recover()
            await self.api.start()
            self._serve_metrics()
            tasks = [asyncio.create_task(c) for c in (self._reconcile_loop(), self._watch(),
                                                      self._watchdog(), self._sync_audit(),
                                                      self._heartbeats())]
            log.info("agent.ready", node=self.node, socket=str(self.api.path))
            if not is_journal(sys.stdout):  # the journal has the agent.ready log line
                print(f"convergent agent {self.node} ready", flush=True)
            self.ready.set()
            await stop.wait()
        except asyncio.CancelledError:
            self.stop_reason = "cancelled"
            raise
        except BaseException as exc:
            self.stop_reason = f"failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):  # a record, never a reason not to stop
                await self.audit.arecord("agent.stop", detail=self.stop_reason, outcome=(
                    "failed" if self.stop_reason.startswith("failed") else "ok"))
            self.metrics.close()
            await self.api.close()
            await self.peer.close()
            if self.sync is not None:
                await self.sync.stop()
            self.table.close()
            with contextlib.suppress(Exception):  # a clean stop: dead at once, not after a TTL
                await self.store.revoke_lease(self.node)
            await self.store.close()

    def _serve_metrics(self) -> None:
        listen = self.settings.metrics_listen()
        if listen is None:
            return
        self.metrics.watch_state(self._metrics_snapshot, asyncio.get_running_loop(),
                                 self.settings.spool(self.node))
        self.metrics.serve(*listen)

    async def _metrics_snapshot(self) -> dict[str, Any]:
        return {"status": await self.status(),
                "sync": self.sync.status() if self.sync is not None else None}

    async def reload(self, new: Topology) -> list[str]:
        """Take a re-read cluster file (SIGHUP): the reasons it cannot, or apply it and
        re-apply the ruleset. A ruleset the kernel rejects keeps the old file in force."""
        problems = reload_problems(self.topology, new, self.node, list(self.handovers))
        if problems:
            return problems
        old = self.topology
        self._use(new)
        try:
            await self.reconciler.run(ruleset=True)
        except Exception as exc:
            self._use(old)
            return [f"the new ruleset was refused ({type(exc).__name__}: {exc}); "
                    f"the old one stays"]
        return []

    def _use(self, topology: Topology) -> None:
        self.topology, self.settings = topology, topology.agent
        self.me = topology.node(self.node)
        self.reconciler.topology = self.coordinator.topology = topology
        if self.sync is not None:
            self.sync.topology = topology  # same peers (reload_problems checked)

    async def _register_public(self) -> None:
        """This node's public address as an owned record (created on first start). Held by
        another node: a survivor adopted it while we were gone; we stay fenced (the
        adoption pass keeps the address off our uplink) until a failback."""
        from orchestrator.failover.adopt import AdoptionOps
        from orchestrator.failover.run import Failover

        self.adoption = AdoptionOps(self.topology, self.node)
        self.failovers = Failover(self.topology, self.node, self.store, self.table,
                                  self.adoption, self.audit, self._cached, self.wake.set)
        pub = await self.store.get_public(self.node)
        if pub is None:
            pub = await self.store.claim_public(self.node, self.me.pub_ip, self.node, 0)
        elif pub.adopted:
            log.warning("failover.fenced", holder=pub.holder, address=str(pub.ip))
            await self.audit.arecord("failover.fenced", from_node=self.node,
                                     to_node=pub.holder, addresses=[str(pub.ip)],
                                     epoch=pub.epoch, detail="adopted while this node was "
                                     "away: staying off it until `convergent failback`")
        try:
            await self._adopt()
        except Exception as exc:  # the reconcile loop retries; never a reason not to start
            log.warning("failover.adoption_failed", error=str(exc))

    async def _adopt(self) -> None:
        await self.adoption.reconcile(await self.store.list_public())

    def _cached(self, node: str) -> list[Any]:
        return [] if self.sync is None else list(self.sync.cache(node).values())

    async def _heartbeats(self) -> None:
        """The liveness lease: renewed three times per TTL, so one lost renewal is not
        death. A renewal that fails (no quorum) is retried at the next tick."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s / 3)
            try:
                await self.store.heartbeat(self.node)
            except Exception as exc:
                log.warning("agent.heartbeat_failed", error=str(exc))

    async def _start_sync(self) -> None:
        iface = self.topology.sync.interface
        if not os.path.exists(f"/sys/class/net/{iface}"):
            log.warning("sync.disabled", reason=f"no interface {iface}")
            return
        from orchestrator.replicator.service import SyncService
        self.sync = SyncService(self.topology, self.node, self.key)
        await self.sync.start()

    # background loops -----------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        """Every store change wakes it; it also runs every reconcile_interval_s, then with
        the ruleset too (someone may have flushed it)."""
        while True:
            periodic = False
            try:
                await asyncio.wait_for(self.wake.wait(), self.settings.reconcile_interval_s)
            except TimeoutError:
                periodic = True
            self.wake.clear()
            with contextlib.suppress(Exception):  # counted in its stats; try again later
                await self.reconciler.run(ruleset=periodic)
            try:
                await self._adopt()
            except Exception as exc:
                log.warning("failover.adoption_failed", error=str(exc))

    async def _watch(self) -> None:
        rev = await self.store.revision()
        async for change in self.store.watch(after=rev):
            del change
            await asyncio.sleep(WATCH_DEBOUNCE)  # a burst of changes: one pass
            self.wake.set()

    async def _watchdog(self) -> None:
        """A migration here that never got its resume or abort is aborted in the end."""
        while True:
            await asyncio.sleep(min(self.settings.migration_timeout_s / 4, 30))
            now = time.time()
            for guest, h in list(self.handovers.items()):
                if (h.record.phase in (Phase.PREPARE, Phase.PRECOPY)
                        and now - h.record.updated > self.settings.migration_timeout_s):
                    await self._abort(guest, "no resume within migration_timeout_s")

    async def _sync_audit(self) -> None:
        """One ``sync.resync`` record per full resync this node's sender starts (a peer
        joined or restarted, or asked for more than the backlog still holds)."""
        seen = 0
        while self.sync is not None:
            started = self.sync.sender.counters["resync_started"]
            for _ in range(started - seen):
                await self.audit.arecord("sync.resync", from_node=self.node,
                                         detail="full resync of this node's entries")
            seen = started
            await asyncio.sleep(1.0)

    # recovery ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """Finish what a previous life of this agent left open in the store."""
        for m in await self.store.list_migrations(active=True):
            if m.dst != self.node:
                continue
            await self.audit.arecord("agent.recover", guest=m.guest, migration=m.id,
                                     detail=f"found in phase {m.phase}")
            try:
                await self._recover_one(m)
            except Exception as exc:
                log.exception("agent.recover_failed", guest=m.guest)
                if m.guest in self.handovers:
                    await self._abort(m.guest, f"recovery failed: {exc}")
        self.wake.set()

    async def _recover_one(self, m: MigrationRecord) -> None:
        h = Handover(m)
        if m.phase in (Phase.PREPARE, Phase.PRECOPY):
            self.handovers[m.guest] = h
            await self.coordinator.precopy(h)  # re-plans against what D already has
        elif m.phase == Phase.CUTOVER:
            self.handovers[m.guest] = h  # the guest runs here: finish the flip
            await self.coordinator.cutover(h)
            self._finalize_later(m.guest, h)
        elif m.phase == Phase.FINALIZE:
            await self.coordinator.finalize(h)
        elif m.phase == Phase.ABORT:
            await self.coordinator.abort(h, m.error or "aborted before a restart")

    # the peer channel (source side) -----------------------------------------------------
    def _feed(self, record: MigrationRecord) -> SourceFeed:
        src = self.topology.node(record.src)
        follow = None
        if self.topology.sync.precopy == "replicator" and self.sync is not None:
            follow = functools.partial(self.sync.follow_precopy, record.src)
        return PeerFeed(self.node, self.key, str(src.peer_ip), self.settings.peer_port,
                        {"migration": record.id, "guest": record.guest},
                        self.settings.peer_retry_s, follow)

    def _open_precopy(self, dst: str) -> PrecopySource | None:
        """A replicator stream for a precopy D asked to get that way (None: replication is
        off here, so the peer channel carries it)."""
        if self.sync is None:
            return None
        stream: PrecopySource = self.sync.open_precopy(dst)
        return stream

    async def _authorize(self, peer: str, req: dict[str, Any]) -> SourceSide:
        mig = await self.store.get_migration(str(req.get("migration")))
        if mig is None or not mig.active or mig.src != self.node or mig.dst != peer \
                or mig.guest != req.get("guest"):
            raise MigrationError(f"{peer} asked for {req.get('guest')}'s entries without an "
                                 f"active migration {self.node} -> {peer}")
        return SourceSide(self.table, self.topology, mig.guest, mig.src, mig.dst,
                          mig.addresses)

    # API ---------------------------------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        return {
            "ping": self.ping, "status": self.status, "reconcile": self.reconcile,
            "migration.prepare": self.prepare, "migration.resumed": self.resumed,
            "migration.abort": self.abort, "migration.finalize": self.finalize,
            "guest.started": self.guest_started, "guest.stopped": self.guest_stopped,
            "sync.status": self.sync_status, "sync.commit": self.sync_commit,
            "failover.run": self.failover, "failover.back": self.failback,
            "cluster.status": self.cluster_status,
        }

    async def ping(self) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid()}

    async def status(self) -> dict[str, Any]:
        owned = await self.store.list_ownership(node=self.node)
        stats = self.reconciler.stats
        return {
            "node": self.node, "pid": os.getpid(), "uptime_s": round(time.time() - self.started),
            "owned": {str(o.ip): {"guest": o.guest, "epoch": o.epoch} for o in owned},
            "migrations": [_mig_view(h) for h in self.handovers.values()],
            "reconcile": {"runs": stats.runs, "changed": stats.changed, "errors": stats.errors,
                          "last_ms": round(stats.last_ms, 1), "total_ms": round(stats.total_ms, 1),
                          "last_error": stats.last_error},
            "api": {"requests": self.api.requests, "errors": self.api.errors},
            "peer": {"streams": self.peer.streams, "refused": self.peer.refused,
                     "refusals": dict(self.peer.counters)},
            "sync": self.sync is not None,
        }

    async def reconcile(self) -> dict[str, Any]:
        return {"changes": await self.reconciler.run(ruleset=True)}

    async def prepare(self, guest: str, src: str | None = None, handover: bool = True,
                      wait: bool = True) -> dict[str, Any]:
        """A guest is about to arrive here (libvirt ``migrate begin`` on D, Xen
        ``--incoming``, or ``lab migrate``). ``wait``: return after precopy's first sync."""
        if guest in self.handovers:
            raise MigrationError(f"{guest} is already migrating to {self.node} "
                                 f"(migration {self.handovers[guest].record.id})")
        src = src or await self._owner_node(guest)
        if not handover:
            self.ungated.add(guest)
        coord = self._coordinator(handover)
        try:
            h = await coord.prepare(guest, src, self.node)
        except BaseException:
            self.ungated.discard(guest)
            raise
        self.handovers[guest] = h
        task = asyncio.create_task(self._precopy(coord, guest, h))
        if wait:
            await asyncio.shield(task)
        return _mig_view(h)

    async def _precopy(self, coord: Coordinator, guest: str, h: Handover) -> None:
        try:
            await coord.precopy(h)
        except Exception as exc:
            log.exception("migration.precopy_failed", guest=guest)
            await self._abort(guest, f"precopy failed: {exc}")
            raise

    async def resumed(self, guest: str, wait_finalize: bool = False) -> dict[str, Any]:
        """The guest runs here now: cutover, then finalize off the caller's path. Repeated
        (a caller retrying across an agent restart) it reports the cutover already done."""
        if guest not in self.handovers:
            done = await self._latest_arrival(guest)
            if done is not None:
                return _mig_view(Handover(done, timings=dict(done.timings)))
        h = self._handover(guest)
        if h.record.phase not in (Phase.PREPARE, Phase.PRECOPY):
            # recovery already replays this cutover: wait for it rather than race it
            await asyncio.gather(*self.finalizers, return_exceptions=True)
            return _mig_view(h)
        try:
            await self._coordinator(guest not in self.ungated).cutover(h)
        except Exception as exc:
            if not await self._owns(h):  # past the flip there is nothing to abort
                await self._abort(guest, f"cutover failed: {exc}")
            raise
        self._finalize_later(guest, h)
        if wait_finalize:
            await asyncio.gather(*self.finalizers, return_exceptions=True)
        return _mig_view(h)

    async def abort(self, guest: str, reason: str = "aborted by request") -> dict[str, Any]:
        h = self._handover(guest)
        if h.record.phase not in ABORTABLE:
            raise MigrationError(f"{guest}: migration {h.record.id} is in phase "
                                 f"{h.record.phase}; nothing to abort")
        await self._abort(guest, reason)
        return _mig_view(h)

    async def _abort(self, guest: str, reason: str) -> None:
        h = self.handovers.pop(guest, None)
        self.ungated.discard(guest)
        if h is not None:
            await self.coordinator.abort(h, reason)
            # a pass that read the store before the abort may still re-close the gate the
            # abort opened; passes are serialized, so this one runs after it and undoes that
            with contextlib.suppress(Exception):  # counted in its stats; the loop retries
                await self.reconciler.run()

    async def finalize(self, guest: str) -> dict[str, Any]:
        """S's "guest gone" signal: D finalizes on its own right after cutover, so this
        only waits for that (idempotent; a no-op for a guest with nothing in flight)."""
        await asyncio.gather(*self.finalizers, return_exceptions=True)
        return {"guest": guest, "in_flight": guest in self.handovers}

    def _finalize_later(self, guest: str, h: Handover) -> None:
        async def run() -> None:
            try:
                await self.coordinator.finalize(h)
            finally:
                self.handovers.pop(guest, None)
                self.ungated.discard(guest)
        task = asyncio.create_task(run())
        self.finalizers.add(task)
        task.add_done_callback(self.finalizers.discard)

    async def guest_started(self, guest: str) -> dict[str, Any]:
        """A guest booted here (not by migration): claim its addresses if nobody owns them."""
        g = self._guest(guest)
        owners = {o.ip: o for o in await self.store.list_ownership(guest=guest,
                                                                   include_released=True)}
        await self.audit.arecord("guest.start", guest=guest, addresses=_strs(g.addresses))
        free = {a: owners[a].epoch if a in owners else 0 for a in g.addresses
                if a not in owners or owners[a].node is None}
        taken = {str(a): owners[a].node for a in g.addresses
                 if a in owners and owners[a].node not in (None, self.node)}
        if free:
            claimed = await self.store.claim_all(free, self.node, guest)
            await self.audit.arecord("ownership.claim", guest=guest,
                                     addresses=_strs(free), epoch=max(o.epoch for o in claimed))
        self.wake.set()
        return {"claimed": _strs(free), "owned_elsewhere": taken}

    async def guest_stopped(self, guest: str) -> dict[str, Any]:
        """A guest shut down here (not migrated away): release what this node owns of it."""
        g = self._guest(guest)
        await self.audit.arecord("guest.stop", guest=guest, addresses=_strs(g.addresses))
        if guest in self.handovers:
            return {"released": [], "reason": "migrating"}
        owned = await self.store.list_ownership(guest=guest)
        mine: dict[Address, int] = {o.ip: o.epoch for o in owned if o.node == self.node}
        if mine:
            released = await self.store.release_all(mine)
            await self.audit.arecord("ownership.release", guest=guest, addresses=_strs(mine),
                                     epoch=max(o.epoch for o in released))
        self.wake.set()
        return {"released": _strs(mine)}

    async def failover(self, from_node: str, force: bool = False, dry_run: bool = False,
                       skip: list[str] | None = None) -> dict[str, Any]:
        """This node adopts dead ``from_node``'s address and flows (orchestrator/failover)."""
        return await self.failovers.run(from_node, force, dry_run, frozenset(skip or ()))

    async def failback(self, node: str) -> dict[str, Any]:
        return await self.failovers.back(node)

    async def cluster_status(self) -> dict[str, Any]:
        from orchestrator.store.view import cluster_view
        view = await cluster_view(self.store)
        view["replicator"] = self.sync.status() if self.sync is not None else None
        return view

    async def sync_status(self) -> dict[str, Any]:
        if self.sync is None:
            raise ConvergentError(f"replication is off on {self.node}: no interface "
                                  f"{self.topology.sync.interface}")
        status: dict[str, Any] = self.sync.status()
        return status

    async def sync_commit(self, from_node: str, guest: str | None = None) -> dict[str, Any]:
        if self.sync is None:
            raise ConvergentError(f"replication is off on {self.node}")
        result: dict[str, Any] = await self.sync.commit(from_node, guest)
        await self.audit.arecord("sync.commit", guest=guest, from_node=from_node,
                                 to_node=self.node, entries=result.get("committed"))
        return result

    # helpers ---------------------------------------------------------------------------
    def _coordinator(self, handover: bool) -> Coordinator:
        if handover:
            return self.coordinator
        c = Coordinator(self.topology, self.store, self.coordinator.nodes, self.audit,
                        handover=False, feed_factory=self._feed, failpoint=self.failpoint)
        return c

    async def _owns(self, h: Handover) -> bool:
        owners = {o.ip: o.node for o in await self.store.list_ownership(guest=h.record.guest)}
        return all(owners.get(a) == self.node for a in h.record.addresses)

    async def _latest_arrival(self, guest: str) -> MigrationRecord | None:
        """The newest migration of ``guest`` here that got past its cutover, if any."""
        migs = await self.store.list_migrations(active=False, guest=guest)
        mine = [m for m in migs if m.dst == self.node and m.phase in
                (Phase.CUTOVER, Phase.FINALIZE, Phase.DONE)]
        return max(mine, key=lambda m: m.started) if mine else None

    def _handover(self, guest: str) -> Handover:
        h = self.handovers.get(guest)
        if h is None:
            raise MigrationError(f"no migration of {guest} to {self.node} in flight")
        return h

    def _guest(self, guest: str) -> Any:
        try:
            return self.topology.guest(guest)
        except KeyError:
            raise ConvergentError(f"unknown guest {guest!r}") from None

    async def _owner_node(self, guest: str) -> str:
        g = self._guest(guest)
        owners = {o.node for o in await self.store.list_ownership(guest=guest)}
        owners.discard(None)
        if len(owners) != 1:
            found = sorted(map(str, owners))
            raise MigrationError(f"cannot tell where {guest} runs: owners {found} of "
                                 f"{_strs(g.addresses)}; pass src")
        return str(owners.pop())


def _mig_view(h: Handover) -> dict[str, Any]:
    r = h.record
    return {"id": r.id, "guest": r.guest, "from": r.src, "to": r.dst, "phase": str(r.phase),
            "timings": h.timings, "entries": h.entries_pushed, "source_lost": h.source_lost}


def _strs(addrs: Any) -> list[str]:
    return [str(a) for a in addrs]


def _per_node(path: str, node: str) -> str:
    return path.replace("{node}", node)

