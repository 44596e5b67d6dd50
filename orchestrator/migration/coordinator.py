"""The migration coordinator: prepare -> precopy -> cutover -> finalize, or abort (DESIGN §2).

The coordinator runs next to the destination's kernel. Each phase is idempotent and
recorded (store phase, timing, audit line), so a phase replayed after a crash changes
nothing it already did. The source's entries arrive through a :class:`SourceFeed` (S's
table in this process, or S's agent over the peer channel), so the coordinator does not
care where S is. Every entry it adds on D carries ``cluster.handover_bit`` until finalize:
an abort, even one replayed by a restarted agent that remembers nothing, deletes exactly
what was pushed by asking D's kernel for that bit.
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
from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.handover.applier import apply_plan
from orchestrator.handover.planner import Plan, abort_actions, dest_key, plan_handover
from orchestrator.migration.feed import FeedBatch, FeedLost, LocalFeed, SourceFeed, SourceSide
from orchestrator.migration.nodeops import NodeOps
from orchestrator.model.conntrack import Entry, EventType, Key
from orchestrator.netfilter.conntrack import Conntrack
from orchestrator.store.base import Address, EpochConflict, MigrationRecord, Phase, Store

log = structlog.get_logger("convergent.migration")
T = TypeVar("T")


FeedFactory = Callable[[MigrationRecord], SourceFeed]
# test seam: awaited at named points (orchestrator.agent.failpoints in the agent)
Failpoint = Callable[[str], Awaitable[None]]


@dataclass
class NodeHandle:
    """One node as the coordinator drives it: its kernel table and its nft sets."""

    name: str
    table: Conntrack
    ops: NodeOps


@dataclass
class MigrationState:
    """Live state of one migration on the coordinating (destination) side. ``hands_over``
    False: the control run, which moves the guest without any handover (no gate, no
    entries) to show what breaks without it."""

    record: MigrationRecord
    hands_over: bool = True
    guest: Guest | None = None  # resolved once: the cluster file's, or the hypervisor's
    plans: list[Plan] = field(default_factory=list)
    feed: SourceFeed | None = None
    follower: asyncio.Task[None] | None = None
    entries_pushed: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # phase -> ms
    steps: dict[str, float] = field(default_factory=dict)  # step of a phase -> ms
    source_lost: bool = False  # S's entries could not be fetched at some point
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.guest is None:
            self.guest = record_guest(self.record)

    @property
    def who(self) -> Guest:
        assert self.guest is not None
        return self.guest


def record_guest(record: MigrationRecord) -> Guest:
    """The guest as its migration record names it: what the planner needs (name and
    addresses), also for a guest only the hypervisor knows, after a restart."""
    return Guest.model_construct(name=record.guest, macs=[], addresses=list(record.addresses),
                                 home=None)


class Coordinator:
    """Drives migrations into the nodes in ``nodes``; the source may be any cluster node.

    In-process (lab, benchmarks) ``nodes`` holds every node and the feed reads S's table
    directly; in an agent ``nodes`` holds the agent's own node and ``feed_factory`` reaches
    S's agent."""

    def __init__(self, topology: Topology, store: Store, nodes: dict[str, NodeHandle],
                 audit: AuditLog | None = None, handover: bool = True,
                 feed_factory: FeedFactory | None = None,
                 failpoint: Failpoint | None = None) -> None:
        self.topology = topology
        self.store = store
        self.nodes = nodes
        self.audit = audit
        self.handover_default = handover  # False: the control run (what breaks without us)
        self.feed_factory = feed_factory or self._local_feed
        self.failpoint = failpoint or _no_failpoint
        self.bit = topology.cluster.handover_bit
        self.audit_errors = 0

    # phases -------------------------------------------------------------------------
    async def prepare(self, guest: str | Guest, src: str, dst: str, *,
                      handover: bool | None = None, id: str | None = None) -> MigrationState:
        """``guest``: a name from the cluster file, or a Guest resolved elsewhere (the
        hypervisor's metadata). ``id``: the migration's id (the same id again is the same
        migration). ``handover``: None for the coordinator's default."""
        known = {n.name for n in self.topology.nodes}
        for node in (src, dst):
            if node not in known:
                raise MigrationError(f"unknown node {node!r} (cluster nodes: "
                                     f"{', '.join(sorted(known))})")
        if dst not in self.nodes:
            raise MigrationError(f"this coordinator drives {', '.join(self.nodes)}, not {dst}")
        g = guest if isinstance(guest, Guest) else self._guest(guest)
        if src == dst:
            raise MigrationError(f"{g.name} is already on {dst}")
        record = await self.store.create_migration(g.name, g.addresses, src, dst, id=id)
        h = MigrationState(record, self.handover_default if handover is None else handover, g)
        try:
            if h.hands_over:
                await self._dst(h).ops.gate(g.addresses, closed=True)
            await self._phase_done(h, Phase.PREPARE, 0.0)
        except BaseException as exc:
            # the record exists: never leave it for the watchdog with the gate closed
            with contextlib.suppress(Exception):
                await self.abort(h, f"prepare failed: {type(exc).__name__}: {exc}")
            raise
        return h

    def _guest(self, name: str) -> Guest:
        try:
            return self.topology.guest(name)
        except KeyError:
            known = ", ".join(g.name for g in self.topology.guests) or "none"
            raise MigrationError(f"unknown guest {name!r} (known: {known})") from None

    async def precopy(self, h: MigrationState) -> None:
        """Stream G's entries S -> D while G still runs on S: subscribe, dump, push, follow.
        Replayable: a restarted agent calls it again and re-plans against D's table."""
        start = time.monotonic()
        await self._advance(h, Phase.PREPARE, Phase.PRECOPY)
        if h.hands_over:
            await self._dst(h).ops.gate(h.record.addresses, closed=True)
            await self._open_feed(h)
            await self.failpoint("precopy.synced")
            if h.feed is not None:
                h.follower = asyncio.create_task(self._follow(h))
        await self._phase_done(h, Phase.PRECOPY, _ms(start), entries=h.entries_pushed)

    async def cutover(self, h: MigrationState) -> None:
        """G runs on D now: last delta, ownership flip, gate open, ARP. Replayable."""
        start = time.monotonic()
        await self._advance(h, Phase.PRECOPY, Phase.CUTOVER)
        dst = self._dst(h)
        if h.hands_over:
            step = time.monotonic()
            await self._final_delta(h)
            h.steps["final_delta"] = _ms(step)  # what the cutover waits on S for
        await self.failpoint("cutover.drained")
        await self._claim(h)
        await self.failpoint("cutover.claimed")
        await dst.ops.arrive(h.record.addresses, open_gate=h.hands_over)
        src = self.nodes.get(h.record.src)
        if src is not None:
            await src.ops.host(h.record.addresses, hosted=False)
        if h.feed is not None:
            await h.feed.close(released=True)  # S reconciles its sets now, not at next poll
            h.feed = None
        if h.hands_over:
            await dst.ops.announce_gateway(self.topology.cluster.gateway)
        await self._phase_done(h, Phase.CUTOVER, _ms(start), entries=h.entries_pushed,
                               epoch=max(h.record.epoch_before.values(), default=-1) + 1,
                               **({"outcome": "degraded"} if h.source_lost else {}))

    async def finalize(self, h: MigrationState) -> None:
        start = time.monotonic()
        await self._advance(h, Phase.CUTOVER, Phase.FINALIZE)
        await self._clear_bits(h)
        await self.store.finish_migration(h.record.id)
        await self._phase_done(h, Phase.FINALIZE, _ms(start))

    async def abort(self, h: MigrationState, error: str) -> None:
        """Ownership stays with S; D forgets what we pushed and reopens its gate. Replayable:
        what was pushed is found by the handover bit, not remembered."""
        start = time.monotonic()
        await self._close_feed(h)
        dst = self._dst(h)
        undo = {a.key for a in abort_actions(*h.plans)}
        undo |= {e.key for e in await self._pushed(h)}
        if undo:
            await asyncio.to_thread(dst.table.delete, list(undo))
        await dst.ops.gate(h.record.addresses, closed=False)
        current = await self.store.get_migration(h.record.id)
        if current is not None and current.phase not in (Phase.ABORT, Phase.ABORTED):
            await self.store.abort_migration(h.record.id, error)
        h.record = await self.store.finish_migration(h.record.id)
        await self._audit("migration.abort", h, outcome="failed", detail=error,
                          entries=len(undo), duration_ms=_ms(start))

    async def run(self, guest: str | Guest, src: str, dst: str,
                  move: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]
                  ) -> MigrationState:  # fmt: skip
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
    def _local_feed(self, record: MigrationRecord) -> SourceFeed:
        src = self.nodes[record.src]
        return LocalFeed(SourceSide(src.table, self.topology, record_guest(record), record.src,
                                    record.dst, record.addresses))

    def _dst(self, h: MigrationState) -> NodeHandle:
        return self.nodes[h.record.dst]

    async def _open_feed(self, h: MigrationState) -> None:
        """Open the feed and sync its snapshot; an unreachable S costs the handover of
        this phase, never the migration (the hypervisor moves the guest regardless)."""
        await self._close_feed(h)
        feed = self.feed_factory(h.record)
        try:
            entries = await feed.open()
        except ConvergentError as exc:  # gone (FeedLost), or refused (wrong key, no record)
            h.source_lost = True
            await feed.close()
            log.warning("migration.source_lost", guest=h.record.guest, error=str(exc))
            return
        h.feed = feed
        await self._sync(h, entries)

    async def _final_delta(self, h: MigrationState) -> None:
        if h.follower is not None and h.follower.done() and h.feed is not None:
            await self._close_feed(h)  # the follower died with the feed: reopen below
        await self._stop_follower(h)
        if h.feed is None:
            await self._open_feed(h)  # replayed cutover, or S was lost: a fresh snapshot
            return
        try:
            for batch in await h.feed.drain():
                await self._apply_batch(h, batch)
        except FeedLost:
            await self._close_feed(h)
            await self._open_feed(h)

    async def _sync(self, h: MigrationState, entries: list[Entry]) -> None:
        """Plan against D's current entries and write what differs; what the plan adds
        carries the handover bit."""
        dst = self._dst(h)
        existing = await asyncio.to_thread(dst.table.dump, addresses=list(h.record.addresses))
        plan = plan_handover(entries, self.topology, h.who, h.record.src,
                             h.record.dst, existing, handover_bit=self.bit)
        h.plans.append(plan)
        done = await apply_plan(dst.table, plan)
        if done.write_errors:
            log.warning("migration.push_errors", count=len(done.write_errors),
                        first=str(done.write_errors[0]))
        h.entries_pushed += done.written

    async def _follow(self, h: MigrationState) -> None:
        """Precopy's live part: S's changes for G become D's writes until cutover. Waiting
        is the only point where it is cancelled (``_stop_follower`` holds the lock), so a
        batch taken from the feed always reaches D. A lost feed ends it; the cutover then
        starts over from a fresh snapshot."""
        assert h.feed is not None
        try:
            while True:
                await h.feed.wait()
                async with h.lock:
                    for batch in await h.feed.take():
                        await self._apply_batch(h, batch)
        except FeedLost as exc:
            log.warning("migration.feed_lost", guest=h.record.guest, error=str(exc))

    async def _apply_batch(self, h: MigrationState, batch: FeedBatch) -> None:
        if batch.snapshot is not None:
            await self._sync(h, batch.snapshot)
        live = [e.entry for e in batch.events if e.type != EventType.DESTROY]
        gone = [e.entry for e in batch.events if e.type == EventType.DESTROY]
        if live:
            await self._sync(h, live)
        keys = [k for e in gone if (k := dest_key(e, self.topology, h.who,
                                                   h.record.src, h.record.dst)) is not None]
        if keys:
            await asyncio.to_thread(self._dst(h).table.delete, keys)

    async def _stop_follower(self, h: MigrationState) -> None:
        if h.follower is not None:
            async with h.lock:  # not while it applies a batch: only while it waits
                h.follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await h.follower
            h.follower = None

    async def _close_feed(self, h: MigrationState) -> None:
        await self._stop_follower(h)
        if h.feed is not None:
            await h.feed.close()
            h.feed = None

    async def _pushed(self, h: MigrationState) -> list[Entry]:
        """D's entries of G that a handover added (and finalize has not yet made D's own)."""
        dst = self._dst(h)
        return await asyncio.to_thread(dst.table.dump, addresses=list(h.record.addresses),
                                       mark=self.bit, mark_mask=self.bit)

    async def _clear_bits(self, h: MigrationState) -> None:
        by_mark: dict[int, list[Key]] = {}
        for e in await self._pushed(h):
            by_mark.setdefault(e.mark & ~self.bit, []).append(e.key)
        for mark, keys in by_mark.items():
            await asyncio.to_thread(self._dst(h).table.set_mark, keys, mark)

    async def _claim(self, h: MigrationState) -> None:
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
    async def _advance(self, h: MigrationState, expected: Phase, to: Phase) -> None:
        h.record = await self.store.advance_phase(h.record.id, expected, to)

    async def _phase_done(self, h: MigrationState, phase: Phase, ms: float, **fields: Any) -> None:
        h.timings[phase.value] = ms
        h.record = await self.store.record_timing(h.record.id, phase, ms)
        await self._audit(f"migration.{phase.value}", h, duration_ms=round(ms, 3), **fields)
        log.info(f"migration.{phase.value}", guest=h.record.guest, ms=round(ms, 1), **fields)

    async def _audit(self, action: str, h: MigrationState, **fields: Any) -> None:
        """A record that cannot be written is counted and logged, never a reason for a
        migration to stop half-way (issue 15: a junk line in the log stranded one)."""
        if self.audit is None:
            return
        try:
            # arecord: the log's lock and fsync stay off the event loop
            await self.audit.arecord(action, guest=h.record.guest, migration=h.record.id,
                                     from_node=h.record.src, to_node=h.record.dst,
                                     addresses=[str(a) for a in h.record.addresses], **fields)
        except Exception as exc:
            self.audit_errors += 1
            log.error("audit.write_failed", action=action, guest=h.record.guest,
                      error=f"{type(exc).__name__}: {exc}")


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000


async def _no_failpoint(name: str) -> None:
    return None
