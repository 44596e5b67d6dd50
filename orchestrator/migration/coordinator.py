"""The migration coordinator: prepare -> precopy -> cutover -> finalize, or abort (DESIGN §2).

Each phase is idempotent and recorded (store phase, timing, audit line), so a phase replayed
after a crash changes nothing it already did. The source's entries reach the destination
through an :class:`EntryFeed` (here: the source's conntrack table directly; the replicator
carries the same feed between agents), so the coordinator does not care where S is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from orchestrator.audit.log import AuditLog
from orchestrator.errors import MigrationError
from orchestrator.handover.planner import (
    DestKind,
    Plan,
    SourceKind,
    abort_actions,
    dest_key,
    plan_handover,
)
from orchestrator.migration.nodeops import NodeOps
from orchestrator.model.cluster import Topology
from orchestrator.model.conntrack import Entry, Event, EventType
from orchestrator.netfilter.conntrack import ConntrackTable, EventStream, Overrun
from orchestrator.store.base import Address, EpochConflict, MigrationRecord, Phase, Store

log = structlog.get_logger("convergent.migration")
T = TypeVar("T")


@dataclass
class NodeHandle:
    """One node as the coordinator drives it: its kernel table and its nft sets."""

    name: str
    table: ConntrackTable
    ops: NodeOps


@dataclass
class Handover:
    """Live state of one migration on the coordinating side."""

    record: MigrationRecord
    plans: list[Plan] = field(default_factory=list)
    stream: EventStream | None = None
    follower: asyncio.Task[None] | None = None
    entries_pushed: int = 0
    announce: asyncio.Task[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Coordinator:
    def __init__(self, topology: Topology, store: Store, nodes: dict[str, NodeHandle],
                 audit: AuditLog | None = None, handover: bool = True) -> None:
        self.topology = topology
        self.store = store
        self.nodes = nodes
        self.audit = audit
        self.handover_enabled = handover  # False: the control run (what breaks without us)

    # phases -------------------------------------------------------------------------
    async def prepare(self, guest: str, src: str, dst: str) -> Handover:
        for node in (src, dst):
            if node not in self.nodes:
                raise MigrationError(f"unknown node {node!r}")
        g = self.topology.guest(guest)
        record = await self.store.create_migration(guest, g.addresses, src, dst)
        h = Handover(record)
        if self.handover_enabled:
            await self.nodes[dst].ops.gate(g.addresses, closed=True)
        await self._phase_done(h, Phase.PREPARE, 0.0)
        return h

    async def precopy(self, h: Handover) -> None:
        """Stream G's entries S -> D while G still runs on S: subscribe, dump, push."""
        start = time.monotonic()
        await self._advance(h, Phase.PREPARE, Phase.PRECOPY)
        if self.handover_enabled:
            src = self.nodes[h.record.src]
            addrs = list(h.record.addresses)
            h.stream, entries = await asyncio.to_thread(
                src.table.subscribe_and_dump, addresses=addrs)
            await self._sync(h, entries)
            await self._liberal_on_source(h, entries)
            h.follower = asyncio.create_task(self._follow(h))
        await self._phase_done(h, Phase.PRECOPY, _ms(start), entries=h.entries_pushed)

    async def cutover(self, h: Handover) -> None:
        """G runs on D now: last delta, ownership flip, ARP, gate open."""
        start = time.monotonic()
        await self._advance(h, Phase.PRECOPY, Phase.CUTOVER)
        g = self.topology.guest(h.record.guest)
        dst, src = self.nodes[h.record.dst], self.nodes[h.record.src]
        if self.handover_enabled:
            await self._stop_follower(h, drain=True)
        await self._claim(h)
        await dst.ops.host(g.addresses, hosted=True)
        await src.ops.host(g.addresses, hosted=False)
        if self.handover_enabled:
            await dst.ops.gate(g.addresses, closed=False)
            h.announce = await dst.ops.announce_gateway(self.topology.cluster.gateway)
        await self._phase_done(h, Phase.CUTOVER, _ms(start), entries=h.entries_pushed)

    async def finalize(self, h: Handover) -> None:
        start = time.monotonic()
        await self._advance(h, Phase.CUTOVER, Phase.FINALIZE)
        if h.announce is not None:
            await h.announce
        await self.store.finish_migration(h.record.id)
        await self._phase_done(h, Phase.FINALIZE, _ms(start))

    async def abort(self, h: Handover, error: str) -> None:
        """Ownership stays with S; D forgets what we pushed and reopens its gate."""
        start = time.monotonic()
        await self._stop_follower(h, drain=False)
        dst = self.nodes[h.record.dst]
        undo = [a.key for a in abort_actions(*h.plans)]
        if undo:
            await asyncio.to_thread(dst.table.delete, undo)
        g = self.topology.guest(h.record.guest)
        await dst.ops.gate(g.addresses, closed=False)
        current = await self.store.get_migration(h.record.id)
        if current is not None and current.phase not in (Phase.ABORT, Phase.ABORTED):
            await self.store.abort_migration(h.record.id, error)
        await self.store.finish_migration(h.record.id)
        await self._audit("migration.abort", h, outcome="failed", detail=error,
                    entries=len(undo), duration_ms=_ms(start))

    async def run(self, guest: str, src: str, dst: str,
                  move: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]) -> Handover:
        """The whole migration around ``move`` (the hypervisor's part), which calls back
        once the guest runs on the destination."""
        h = await self.prepare(guest, src, dst)
        try:
            await self.precopy(h)
            await move(lambda: self.cutover(h))
            await self.finalize(h)
        except BaseException as exc:
            await self.abort(h, f"{type(exc).__name__}: {exc}")
            raise
        return h

    # handover mechanics -------------------------------------------------------------
    async def _sync(self, h: Handover, entries: list[Entry]) -> None:
        """Plan against D's current entries and write what differs."""
        dst = self.nodes[h.record.dst]
        existing = await asyncio.to_thread(dst.table.dump, addresses=list(h.record.addresses))
        plan = plan_handover(entries, self.topology, h.record.guest, h.record.src,
                             h.record.dst, existing)
        await self._apply(h, plan)

    async def _apply(self, h: Handover, plan: Plan) -> None:
        h.plans.append(plan)
        dst = self.nodes[h.record.dst]
        doomed = [d for a in plan.dest if a.kind is DestKind.REPLACE for d in a.delete]
        if doomed:
            await asyncio.to_thread(dst.table.delete, doomed)
        writes = [a.entry for a in plan.writes if a.entry is not None]
        if writes:
            result = await asyncio.to_thread(dst.table.push, writes, "update")
            if result.errors:
                log.warning("migration.push_errors", count=len(result.errors),
                            first=str(result.errors[0]))
            h.entries_pushed += len(writes) - len(result.errors)

    async def _liberal_on_source(self, h: Handover, entries: list[Entry]) -> None:
        plan = plan_handover(entries, self.topology, h.record.guest, h.record.src, h.record.dst)
        liberal = [a.origin for a in plan.source if a.kind is SourceKind.MAKE_LIBERAL]
        if liberal:
            await asyncio.to_thread(self.nodes[h.record.src].table.set_liberal, liberal)

    async def _follow(self, h: Handover) -> None:
        """Precopy's live part: S's events for G become D's writes until cutover."""
        assert h.stream is not None
        async for batch in h.stream.batches():
            await self._apply_events(h, batch)

    async def _apply_events(self, h: Handover, batch: list[Event | Overrun]) -> None:
        if any(isinstance(e, Overrun) for e in batch):
            # events were lost: the dump is the truth again
            src = self.nodes[h.record.src]
            entries = await asyncio.to_thread(src.table.dump, addresses=list(h.record.addresses))
            await self._sync(h, entries)
            return
        live = [e.entry for e in batch if isinstance(e, Event) and e.type != EventType.DESTROY]
        gone = [e.entry for e in batch if isinstance(e, Event) and e.type == EventType.DESTROY]
        if live:
            await self._sync(h, live)
            await self._liberal_on_source(h, live)
        keys = [k for e in gone if (k := dest_key(e, self.topology, h.record.guest,
                                                   h.record.src, h.record.dst)) is not None]
        if keys:
            await asyncio.to_thread(self.nodes[h.record.dst].table.delete, keys)

    async def _stop_follower(self, h: Handover, drain: bool) -> None:
        if h.follower is not None:
            h.follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await h.follower
            h.follower = None
        if h.stream is not None:
            if drain:  # the final delta: whatever S reported until now
                pending = await asyncio.to_thread(h.stream.read, 0.0)
                if pending:
                    await self._apply_events(h, pending)
            h.stream.close()
            h.stream = None

    async def _claim(self, h: Handover) -> None:
        try:
            expected: dict[Address, int] = {ip: ep for ip, ep in h.record.epoch_before.items()}
            await self.store.claim_all(expected, h.record.dst, h.record.guest)
        except EpochConflict as exc:
            # a replayed cutover finds its own claim: that is success, anything else is not
            mine = {ip: ep + 1 for ip, ep in h.record.epoch_before.items()}
            owners = await self.store.list_ownership(guest=h.record.guest)
            if {o.ip: o.epoch for o in owners if o.node == h.record.dst} != mine:
                raise MigrationError(str(exc)) from exc

    # bookkeeping --------------------------------------------------------------------
    async def _advance(self, h: Handover, expected: Phase, to: Phase) -> None:
        h.record = await self.store.advance_phase(h.record.id, expected, to)

    async def _phase_done(self, h: Handover, phase: Phase, ms: float, **fields: Any) -> None:
        h.timings[phase.value] = ms
        h.record = await self.store.record_timing(h.record.id, phase, ms)
        await self._audit(f"migration.{phase.value}", h, duration_ms=round(ms, 3), **fields)
        log.info(f"migration.{phase.value}", guest=h.record.guest, ms=round(ms, 1), **fields)

    async def _audit(self, action: str, h: Handover, **fields: Any) -> None:
        if self.audit is None:
            return
        # arecord: the log's lock and fsync stay off the event loop
        await self.audit.arecord(action, guest=h.record.guest, migration=h.record.id,
                                 from_node=h.record.src, to_node=h.record.dst,
                                 addresses=[str(a) for a in h.record.addresses], **fields)


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000
