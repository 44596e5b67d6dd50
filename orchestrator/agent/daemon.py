"""``convergent agent``: one per node (DESIGN §6).

It owns the node's kernel state: the ruleset and its sets (reconciled from the store,
periodically and whenever the store changes), the conntrack engine, the migrations in
flight (``inflight.Migrations``: arriving here, and the source's part of those leaving),
the replicator, and the intake of guest events (``intake.Intake``: hook calls, the spool,
the hypervisor's stream, judged by the pure table in ``events``). It answers hooks and the
CLI on a Unix socket.

This module builds the collaborators (``Parts``: the store, the audit log, the node's
kernel, the hypervisor adapter; a unit test passes fakes) and maps the API's operations
onto them. A restarted agent remembers nothing: ``Migrations.recover`` reads its
unfinished migrations from the store, and the handover bit in D's kernel tells an abort
exactly which entries to take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from orchestrator.agent.api import ApiServer, Handler
from orchestrator.agent.audit_anchor import AuditAnchoring
from orchestrator.agent.events import Op, OpName
from orchestrator.agent.failpoints import Failpoints
from orchestrator.agent.guests import GuestBook
from orchestrator.agent.inflight import Migrations
from orchestrator.agent.intake import Intake
from orchestrator.agent.jobs import MigrateJobs
from orchestrator.agent.keys import load_key
from orchestrator.agent.metrics import AgentMetrics, timed_store
from orchestrator.agent.operator import OperatorRequests
from orchestrator.agent.owners import Owners
from orchestrator.agent.peer import PeerFeed, PeerServer
from orchestrator.agent.reconcile import Reconciler
from orchestrator.agent.reload import reload_problems
from orchestrator.audit.key import audit_key
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.hypervisor import GuestEvent, Hypervisor, open_hypervisor
from orchestrator.logs import is_journal
from orchestrator.migration.coordinator import Coordinator, FeedFactory, NodeHandle, record_guest
from orchestrator.migration.feed import SourceFeed, SourceSide
from orchestrator.migration.nodeops import NftNodeOps, NodeOps
from orchestrator.netfilter.conntrack import Conntrack, ConntrackTable
from orchestrator.replicator.precopy import PrecopySource
from orchestrator.store import open_store
from orchestrator.store.base import MigrationRecord, Store

log = structlog.get_logger("convergent.agent")
WATCH_DEBOUNCE = 0.01


class NodeTable(Conntrack, Protocol):
    """The node's conntrack table: what the coordinator needs, and a failover's commit
    (``push_snat`` is part of the Conntrack seam now)."""


@dataclass
class Kernel:
    """The node's kernel as the agent drives it: its conntrack table, and its ruleset,
    nft sets and gratuitous ARP (``NodeOps``, which the coordinator and the reconciler
    share). Both are seams with in-memory fakes held to the kernel by contract suites."""

    table: NodeTable
    ops: NodeOps

    def close(self) -> None:
        self.table.close()


@dataclass
class Parts:
    """What the agent is built from (``open_parts`` makes the real ones)."""

    store: Store
    audit: AuditLog
    kernel: Kernel
    hypervisor: Hypervisor
    feed_factory: FeedFactory | None = None  # None: the peer channel to the source's agent
    serve_peers: bool = True  # listen for destinations asking this node for entries
    replicate: bool = True  # run the replicator (when the sync interface exists)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.hypervisor.close()
        self.kernel.close()
        await self.store.close()


async def open_parts(topology: Topology, node: str, metrics: AgentMetrics) -> Parts:
    settings = topology.agent
    hypervisor = open_hypervisor(topology.hypervisor.kind, topology.hypervisor.settings, node)
    store = timed_store(await open_store(settings.store), metrics)
    audit = AuditLog(_per_node(str(settings.audit_log), node), node=node, actor="agent",
                     key=audit_key(settings.audit_key_file))
    kernel = Kernel(ConntrackTable(None), NftNodeOps(node, None, topology.cluster.guest_bridge))
    return Parts(store, audit, kernel, hypervisor)


class Agent:
    def __init__(self, topology: Topology, node: str, parts: Parts | None = None) -> None:
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
        self.wake = asyncio.Event()
        self.started = time.time()
        self.sync: Any = None  # replicator SyncService, when the sync interface exists
        self.metrics = AgentMetrics(node)
        self.ready = asyncio.Event()  # set once it serves: systemd's READY=1 (lifecycle.py)
        self.stop_reason = "stopped"
        self._given = parts

    @property
    def arriving(self) -> list[str]:
        """The guests migrating here (a reload waits for them)."""
        return list(self.migrations.arrivals)

    # building ---------------------------------------------------------------------------
    def _build(self, parts: Parts) -> None:
        self.parts = parts
        self.store, self.audit, self.table = parts.store, parts.audit, parts.kernel.table
        self.audit.subscribe(self.metrics.on_audit)
        self.anchoring = AuditAnchoring(self.node, self.audit.writer, self.store)
        self.hypervisor = parts.hypervisor
        self.guests = GuestBook(self.topology, self.hypervisor)
        handle = NodeHandle(self.node, parts.kernel.table, parts.kernel.ops)
        self.coordinator = Coordinator(self.topology, self.store, {self.node: handle},
                                       self.audit, feed_factory=parts.feed_factory or self._feed,
                                       failpoint=self.failpoint)
        self.peer = PeerServer(self.node, self.key, self._authorize, self.wake.set,
                               self.failpoint, open_precopy=self._open_precopy,
                               addresses={n.name: str(n.peer_ip) for n in self.topology.nodes},
                               on_forward=lambda *a: self.requests.serve(*a),
                               handback=self._serve_handback)
        self.migrations = Migrations(
            self.node, self.topology, self.store, self.coordinator, self.audit, self.guests,
            self.hypervisor, reconcile=lambda: self.reconciler.run(),
            release=lambda guest: self.owners.stopped(guest),
            close_streams=self.peer.end_migration)
        self.reconciler = Reconciler(self.topology, self.node, self.store, ops=parts.kernel.ops,
                                     ungated=self.migrations.ungated(), audit=self.audit)
        self.owners = Owners(self.node, self.store, self.guests, self.migrations.record,
                             self.migrations.arrivals, self.wake.set)
        self.intake = Intake(self.node, self.hypervisor, self.guests, self.store, self.audit,
                             self._execute, self.settings.spool(self.node))
        self.jobs = MigrateJobs(self.node, self.topology, self.store, self.guests,
                                self.hypervisor, self.migrations)
        self.requests = OperatorRequests(self.node, self.topology, self.store, self.audit,
                                         self.key, {
                                             "guest.migrate": self.jobs.migrate,
                                             "guest.migrate_abort": self.jobs.abort,
                                             "migration.abort": self.migrations.abort,
                                             "failover.run": self.failover,
                                             "failover.back": self.failback})
        self.api = ApiServer(self.settings.socket(self.node), self._handlers(),
                             streaming=frozenset({"guest.migrate"}),
                             on_bad=self.intake.bad_request,
                             identified=frozenset({"guest.migrate", "migrate.abort",
                                                   "failover.run", "failover.back"}))

    # lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._build(self._given or await open_parts(self.topology, self.node, self.metrics))
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self.store.upsert_node(self.node, self.me.tag, self.me.mac_prefix,
                                         self.me.pub_ip)
            await self.store.grant_lease(self.node, self.settings.lease_ttl_s)
            await self.audit.arecord("agent.start", detail=f"pid {os.getpid()}, hypervisor "
                                     f"{self.hypervisor.kind}")
            await self.reconciler.run(ruleset=True)
            await self._register_public()
            if self.parts.serve_peers:
                await self.peer.start(str(self.me.peer_ip), self.settings.peer_port)
            if self.parts.replicate:
                await self._start_sync()
            await self.migrations.recover()
            self.wake.set()
            await self.intake.replay()  # what hooks spooled while this agent was away
            await self.api.start()
            self._serve_metrics()
            await self.intake.replay()  # and what they spooled while it was starting
            await self._truth()
            tasks = [asyncio.create_task(c) for c in (
                self._reconcile_loop(), self._watch(), self.migrations.watchdog(),
                self._sync_audit(), self._heartbeats(), self.intake.follow(),
                self.anchoring.run())]
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
            await self.migrations.close()
            with contextlib.suppress(Exception):  # a record, never a reason not to stop
                await self.audit.arecord("agent.stop", detail=self.stop_reason, outcome=(
                    "failed" if self.stop_reason.startswith("failed") else "ok"))
                await self.anchoring.flush()  # the log's last word, anchored too
            self.metrics.close()
            await self.api.close()
            await self.peer.close()
            if self.sync is not None:
                await self.sync.stop()
            with contextlib.suppress(Exception):  # a clean stop: dead at once, not after a TTL
                await self.store.revoke_lease(self.node)
            await self.parts.close()

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
        problems = reload_problems(self.topology, new, self.node, self.arriving)
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
        self.guests.topology = self.migrations.topology = self.jobs.topology = topology
        self.requests.topology = topology
        if self.sync is not None:
            self.sync.topology = topology  # same peers (reload_problems checked)
        adoption = getattr(self, "adoption", None)  # made once the store is open
        if adoption is not None:
            adoption.topology, adoption.me = topology, topology.node(self.node)
            self.failovers.topology = self.failbacks.topology = topology

    async def _register_public(self) -> None:
        """This node's public address as an owned record (created on first start). Held by
        another node: a survivor adopted it while we were gone; we stay fenced (the
        adoption pass keeps the address off our uplink) until a failback."""
        from orchestrator.failover.adopt import AdoptionOps
        from orchestrator.failover.handback import Failback
        from orchestrator.failover.run import Failover

        self.adoption = AdoptionOps(  # its uplink's shape survives a restart while fenced
            self.topology, self.node,
            state_path=self.topology.agent.state_dir / f"uplink-{self.node}.json")
        self.failovers = Failover(self.topology, self.node, self.store, self.table,
                                  self.adoption, self.audit, self._cached, self.wake.set)
        self.failbacks = Failback(self.topology, self.node, self.store, self.table,
                                  self.adoption, self.audit, self._holder,
                                  lambda: self.reconciler.run(ruleset=True))
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
        await self.adoption.follow(self.store.list_public)

    async def _holder(self, node: str) -> Any:
        """The agent holding our address, over the peer channel (a failback)."""
        from orchestrator.failover.handback import PeerHolder
        peer = self.topology.node(node)
        return PeerHolder(self.node, self.key, str(peer.peer_ip), self.settings.peer_port,
                          self.settings.peer_retry_s)

    async def _serve_handback(self, home: str, ch: Any) -> None:
        failbacks = getattr(self, "failbacks", None)  # made once the store is open
        if failbacks is None:
            raise ConvergentError(f"{self.node} is starting: ask again")
        await failbacks.serve(home, ch)

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
        the ruleset too (someone may have flushed it), the spool's leftovers and the
        hypervisor's truth."""
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
            with contextlib.suppress(Exception):  # counted by the intake
                if self.intake.pending():
                    await self.intake.replay()
                if periodic:
                    await self._truth()

    async def _truth(self) -> None:
        try:
            await self.intake.truth()
        except Exception:
            log.exception("intake.truth_failed")

    async def _watch(self) -> None:
        rev = await self.store.revision()
        async for change in self.store.watch(after=rev):
            del change
            await asyncio.sleep(WATCH_DEBOUNCE)  # a burst of changes: one pass
            self.wake.set()

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

    # the intake's operations -------------------------------------------------------------
    async def _execute(self, op: Op, event: GuestEvent) -> Any:
        a = dict(op.args)
        guest = a["guest"]
        if op.name == OpName.PREPARE:
            return await self.migrations.prepare(guest, a["src"], wait=False, id=a["id"])
        if op.name == OpName.RESUMED:
            return await self.migrations.resumed(guest)
        if op.name == OpName.FINALIZE:
            return await self.migrations.finalize(guest, a["how"])
        if op.name == OpName.ABORT:
            return await self.migrations.abort(guest, a["reason"])
        if op.name == OpName.STARTED:
            return await self.owners.started(guest)
        if op.name == OpName.STOPPED:
            return await self.owners.stopped(guest)
        raise AssertionError(op.name)

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
        return SourceSide(self.table, self.topology, record_guest(mig), mig.src, mig.dst,
                          mig.addresses)

    # API ---------------------------------------------------------------------------------
    def _handlers(self) -> dict[str, Handler]:
        m = self.migrations
        return {
            "ping": self.ping, "status": self.status, "reconcile": self.reconcile,
            "hook.deliver": self.intake.deliver, "intake.replay": self.intake.replay,
            "migration.prepare": m.prepare, "migration.resumed": m.resumed,
            "migration.abort": m.abort, "migration.finalize": m.finalize,
            "guest.started": self.owners.started, "guest.stopped": self.owners.stopped,
            # the operator's, run here or by the node they belong to (operator.py)
            "guest.migrate": self.requests.migrate, "migrate.abort": self.requests.abort,
            "failover.run": self.requests.failover,
            "guest.migrate_abort": self.jobs.abort,  # this node's own move only
            "sync.status": self.sync_status, "sync.commit": self.sync_commit,
            "failover.back": self.requests.failback,
            "cluster.status": self.cluster_status,
        }

    async def ping(self) -> dict[str, Any]:
        return {"node": self.node, "pid": os.getpid()}

    async def status(self) -> dict[str, Any]:
        owned = await self.store.list_ownership(node=self.node)
        stats = self.reconciler.stats
        return {
            "node": self.node, "pid": os.getpid(), "uptime_s": round(time.time() - self.started),
            "hypervisor": self.hypervisor.kind,
            "owned": {str(o.ip): {"guest": o.guest, "epoch": o.epoch} for o in owned},
            "migrations": self.migrations.status(),
            "recent": list(self.migrations.recent),
            "jobs": self.jobs.status(),
            "intake": self.intake.status(),
            "reconcile": {"runs": stats.runs, "changed": stats.changed, "errors": stats.errors,
                          "last_ms": round(stats.last_ms, 1), "total_ms": round(stats.total_ms, 1),
                          "last_error": stats.last_error},
            "api": {"requests": self.api.requests, "errors": self.api.errors},
            "peer": {"streams": self.peer.streams, "refused": self.peer.refused,
                     "forwarded": self.peer.forwarded,
                     "refusals": dict(self.peer.counters)},
            "audit": {"errors": self.coordinator.audit_errors + self.migrations.audit_errors},
            "sync": self.sync is not None,
        }

    async def reconcile(self) -> dict[str, Any]:
        return {"changes": await self.reconciler.run(ruleset=True)}

    async def failover(self, from_node: str, force: bool = False, dry_run: bool = False,
                       skip: list[str] | None = None) -> dict[str, Any]:
        """This node adopts dead ``from_node``'s address and flows (orchestrator/failover);
        ``skip``: parts left out on purpose (control runs)."""
        return await self.failovers.run(from_node, force, dry_run, frozenset(skip or ()))

    async def failback(self, node: str, dry_run: bool = False,
                       skip: list[str] | None = None) -> dict[str, Any]:
        """This node takes its address and flows back from the node that adopted them
        (orchestrator/failover/handback); ``skip``: ``entries`` for a control run."""
        if node != self.node:
            raise ConvergentError(f"the failback of {node} runs on {node}'s agent (it takes "
                                  f"the flows and the address back), not on {self.node}'s")
        return await self.failbacks.run(dry_run, frozenset(skip or ()))

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


def _per_node(path: str, node: str) -> str:
    return path.replace("{node}", node)
