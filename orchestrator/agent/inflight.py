"""The migrations in flight on one node (DESIGN §2, §6).

Arriving here, this node drives them: prepare (the record, the gate), precopy in the
background, cutover on the resume, finalize off the caller's path, abort on a failure,
and a watchdog for a migration that never hears its resume. Leaving from here, the peer
channel serves the destination, and this node closes its part once the guest is gone
(``finalize``): the migration's outcome decides what that means. A restarted agent
remembers nothing: ``recover`` takes both kinds from the store, and a migration it was
preparing is settled from the hypervisor's view if no resume or failure comes soon.

Whether a migration hands the guest's flows over is a field of the migration
(``MigrationState.hands_over``), so one coordinator serves the control run too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from orchestrator.agent.guests import GuestBook
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.hypervisor import Hypervisor, NoopHypervisor
from orchestrator.migration.coordinator import Coordinator, MigrationState
from orchestrator.store.base import ABORTABLE, MigrationRecord, Phase, Store

log = structlog.get_logger("convergent.migrations")
PRE_CUTOVER = (Phase.PREPARE, Phase.PRECOPY)
POLL_S = 0.1  # how often a closing source looks at its migration's record
RECENT = 16  # finished arrivals kept for ``status`` (timings, entries)


@dataclass
class Arrival:
    """A migration arriving here, with the task that runs its precopy."""

    state: MigrationState
    precopy: asyncio.Task[None] | None = None
    failed: str | None = None  # why precopy failed (it then aborted the migration)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one phase change at a time


class Migrations:
    def __init__(self, node: str, topology: Topology, store: Store, coordinator: Coordinator,
                 audit: AuditLog, guests: GuestBook, hypervisor: Hypervisor,
                 reconcile: Callable[[], Awaitable[object]],
                 release: Callable[[str], Awaitable[object]],
                 close_streams: Callable[[str], object] = lambda migration: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.node, self.topology, self.store = node, topology, store
        self.coordinator, self.audit, self.guests = coordinator, audit, guests
        self.hypervisor = hypervisor
        self.reconcile = reconcile  # one reconcile pass of this node's sets
        self.release = release  # give up this node's ownership of a guest that stopped here
        self.close_streams = close_streams  # end the peer channel's streams of a migration
        self.clock = clock
        self.arrivals: dict[str, Arrival] = {}
        self.finalizers: set[asyncio.Task[None]] = set()
        self.closers: dict[str, asyncio.Task[None]] = {}  # migration id -> source's closer
        self.closed: deque[str] = deque(maxlen=256)  # migrations whose source part is closed
        self.settlers: set[asyncio.Task[None]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.audit_errors = 0

    @property
    def settings(self) -> Any:
        return self.topology.agent

    # the guests whose migration here runs without handover (no gate for them) ----------
    def ungated(self) -> _Ungated:
        return _Ungated(self)

    # arriving ---------------------------------------------------------------------------
    async def prepare(self, guest: str, src: str | None = None, handover: bool = True,
                      wait: bool = True, id: str | None = None) -> dict[str, Any]:
        """A guest is about to arrive here. ``wait``: return after precopy's first sync
        (else right after the record and the gate: what a hook waits for)."""
        current = self.arrivals.get(guest)
        if current is not None:
            if id is not None and current.state.record.id == id:
                return view(current.state)  # the same event again
            raise MigrationError(f"{guest} is already migrating to {self.node} "
                                 f"(migration {current.state.record.id})")
        g = await self.guests.resolve(guest)
        src = src or await self._owner_node(g)
        h = await self.coordinator.prepare(g, src, self.node, handover=handover, id=id)
        arrival = Arrival(h)
        self.arrivals[guest] = arrival
        arrival.precopy = asyncio.create_task(self._precopy(arrival))
        if wait:
            await asyncio.shield(arrival.precopy)
            if arrival.failed is not None:
                raise MigrationError(f"{guest}: precopy failed, migration aborted: "
                                     f"{arrival.failed}")
        return view(h)

    async def _precopy(self, arrival: Arrival) -> None:
        h = arrival.state
        try:
            await self.coordinator.precopy(h)
        except Exception as exc:
            log.exception("migration.precopy_failed", guest=h.record.guest)
            arrival.failed = f"{type(exc).__name__}: {exc}"
            await self._abort(h.record.guest, f"precopy failed: {arrival.failed}")

    async def resumed(self, guest: str, wait_finalize: bool = False) -> dict[str, Any]:
        """The guest runs here now: cutover, then finalize off the caller's path. Repeated
        (across an agent restart too) it reports the cutover already done."""
        arrival = self.arrivals.get(guest)
        if arrival is None:
            done = await self._latest_arrival(guest)
            if done is not None:
                return record_view(done)
            raise MigrationError(f"no migration of {guest} to {self.node} in flight")
        if arrival.precopy is not None:
            await asyncio.shield(arrival.precopy)  # cutover follows the first sync
        if self.arrivals.get(guest) is not arrival:
            raise MigrationError(f"{guest}: migration {arrival.state.record.id} was "
                                 f"aborted before it resumed ({arrival.failed})")
        h = arrival.state
        async with arrival.lock:
            if h.record.phase in PRE_CUTOVER:
                try:
                    await self.coordinator.cutover(h)
                except Exception as exc:
                    if not await self._owns(h):  # past the flip there is nothing to abort
                        await self._abort(guest, f"cutover failed: {exc}", locked=True)
                    raise
                self._finalize_later(guest, arrival)
        if wait_finalize:
            await self.wait_finalizers()
        return view(h)

    async def abort(self, guest: str, reason: str = "aborted by request") -> dict[str, Any]:
        arrival = self.arrivals.get(guest)
        if arrival is None:
            raise MigrationError(f"no migration of {guest} to {self.node} in flight")
        h = arrival.state
        if h.record.phase not in ABORTABLE or await self._owns(h):
            raise MigrationError(f"{guest}: migration {h.record.id} is in phase "
                                 f"{h.record.phase}; nothing to abort")
        await self._abort(guest, reason)
        return view(h)

    async def _abort(self, guest: str, reason: str, locked: bool = False) -> None:
        arrival = self.arrivals.pop(guest, None)
        if arrival is None:
            return
        task = arrival.precopy
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if locked:
            await self.coordinator.abort(arrival.state, reason)
        else:
            async with arrival.lock:
                await self.coordinator.abort(arrival.state, reason)
        self.recent.append(view(arrival.state))
        # a pass that read the store before the abort may still re-close the gate the
        # abort opened; passes are serialized, so this one runs after it and undoes that
        with contextlib.suppress(Exception):  # counted in its stats; the loop retries
            await self.reconcile()

    def _finalize_later(self, guest: str, arrival: Arrival) -> None:
        async def run() -> None:
            try:
                await self.coordinator.finalize(arrival.state)
            except Exception:
                log.exception("migration.finalize_failed", guest=guest)
            finally:
                if self.arrivals.get(guest) is arrival:
                    del self.arrivals[guest]
                self.recent.append(view(arrival.state))
        task = asyncio.create_task(run())
        self.finalizers.add(task)
        task.add_done_callback(self.finalizers.discard)

    async def wait_finalizers(self) -> None:
        await asyncio.gather(*self.finalizers, return_exceptions=True)

    # leaving ----------------------------------------------------------------------------
    async def finalize(self, guest: str, how: str = "gone") -> dict[str, Any]:
        """The guest left this node (``how``: "gone", a completed migration away; or
        "stopped", which a hook cannot tell from a destroy): close this node's part of its
        migration once the migration ends. Done: the streams end and the sets follow at
        once. Aborted: "stopped" means it stopped here, so its addresses are released.
        Idempotent; on a destination it waits for the local finalize."""
        await self.wait_finalizers()
        mig = await self._leaving(guest)
        if mig is None:
            return {"guest": guest, "closing": False, "in_flight": guest in self.arrivals}
        if mig.id in self.closed:
            return {"guest": guest, "migration": mig.id, "closing": False, "closed": True}
        if mig.id not in self.closers:
            task = asyncio.create_task(self._close_source(mig, how))
            self.closers[mig.id] = task
            task.add_done_callback(functools.partial(self._closer_done, mig.id))
        return {"guest": guest, "migration": mig.id, "closing": True}

    def _closer_done(self, migration: str, _task: asyncio.Task[None]) -> None:
        self.closers.pop(migration, None)

    async def _close_source(self, mig: MigrationRecord, how: str) -> None:
        limit = self.settings.migration_timeout_s * 1.5  # D's watchdog ends it before this
        final = await self._outcome(mig.id, limit)
        audit: dict[str, Any] = {"guest": mig.guest, "migration": mig.id, "from_node": mig.src,
                                 "to_node": mig.dst,
                                 "addresses": [str(a) for a in mig.addresses]}
        if final is not None and final.phase == Phase.DONE:
            self.close_streams(mig.id)
            await self.record("migration.leave", detail=f"left for {mig.dst} ({how})",
                               **audit)
        elif final is not None and final.phase == Phase.ABORTED and how == "stopped":
            await self.record("migration.leave", outcome="failed", detail=(
                "the migration was aborted and the guest stopped here: released"), **audit)
            await self.release(mig.guest)
        else:
            state = final.phase if final is not None else f"unfinished after {limit:g} s"
            await self.record("hook.report", outcome="refused", detail=(
                f"left {self.node} ({how}) but its migration is {state}: ownership stays "
                "as the store says"), **audit)
        self.closed.append(mig.id)
        with contextlib.suppress(Exception):
            await self.reconcile()

    async def _outcome(self, migration: str, limit: float) -> MigrationRecord | None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            m = await self.store.get_migration(migration)
            if m is None or not m.active:
                return m
            await asyncio.sleep(POLL_S)
        return None

    async def _leaving(self, guest: str) -> MigrationRecord | None:
        """The migration of ``guest`` away from here: the active one, else the newest."""
        migs = await self.store.list_migrations(active=False, guest=guest)
        active = [m for m in migs if m.active]
        if active:
            return active[0] if active[0].src == self.node else None
        mine = [m for m in migs if m.src == self.node]
        return max(mine, key=lambda m: m.updated) if mine else None

    # recovery and the watchdog ----------------------------------------------------------
    async def recover(self) -> None:
        """Finish what a previous life of this agent left open in the store: migrations
        arriving here (resumed, finished or aborted), and leaving (closed once the guest is
        gone from here)."""
        for m in await self.store.list_migrations(active=True):
            if m.dst == self.node:
                await self.record("agent.recover", guest=m.guest, migration=m.id,
                                   detail=f"arriving, found in phase {m.phase}")
                try:
                    await self._recover_arrival(m)
                except Exception as exc:
                    log.exception("agent.recover_failed", guest=m.guest)
                    await self._abort(m.guest, f"recovery failed: {exc}")
            elif m.src == self.node:
                await self.record("agent.recover", guest=m.guest, migration=m.id,
                                   detail=f"leaving, found in phase {m.phase}")
                if not await self._here(m.guest):
                    await self.finalize(m.guest, "gone")

    async def _recover_arrival(self, m: MigrationRecord) -> None:
        g = self.guests.known(m.guest)
        h = MigrationState(m, guest=g if g is not None else None)
        arrival = Arrival(h)
        if m.phase in PRE_CUTOVER:
            self.arrivals[m.guest] = arrival
            await self.coordinator.precopy(h)  # re-plans against what D already has
            self._settle_later(m.guest, arrival)
        elif m.phase == Phase.CUTOVER:
            self.arrivals[m.guest] = arrival  # the guest runs here: finish the flip
            async with arrival.lock:
                await self.coordinator.cutover(h)
            self._finalize_later(m.guest, arrival)
        elif m.phase == Phase.FINALIZE:
            await self.coordinator.finalize(h)
        elif m.phase == Phase.ABORT:
            await self.coordinator.abort(h, m.error or "aborted before a restart")

    def _settle_later(self, guest: str, arrival: Arrival) -> None:
        """A migration this agent was preparing when it died gets ``recovery_settle_s`` to
        hear its resume or failure (a replayed hook, an event); then the hypervisor's view
        settles it, so the gate never stays closed for the whole migration timeout."""
        async def run() -> None:
            while self.arrivals.get(guest) is arrival \
                    and arrival.state.record.phase in PRE_CUTOVER:
                await asyncio.sleep(self.settings.recovery_settle_s)
                if self.arrivals.get(guest) is not arrival \
                        or arrival.state.record.phase not in PRE_CUTOVER:
                    return
                where = await self._where(guest)
                if where == "running":
                    log.info("migration.settled", guest=guest, outcome="resumed")
                    await self.resumed(guest)
                elif where != "arriving":
                    log.info("migration.settled", guest=guest, outcome="aborted")
                    await self._abort(guest, "no resume within recovery_settle_s of a "
                                             f"restart, and the guest is not on {self.node}")
        if isinstance(self.hypervisor, NoopHypervisor):
            return  # nothing can tell: the watchdog's timeout decides
        task = asyncio.create_task(run())
        self.settlers.add(task)
        task.add_done_callback(self.settlers.discard)

    async def _where(self, guest: str) -> str:
        """"running" here, "arriving" here, or "elsewhere", as the hypervisor says."""
        try:
            info = await self.hypervisor.describe(guest)
        except ConvergentError:
            return "elsewhere"
        if info.node != self.node:
            return "elsewhere"
        return "running" if info.running else "arriving"

    async def _here(self, guest: str) -> bool:
        if isinstance(self.hypervisor, NoopHypervisor):
            return True  # cannot tell: leave it to the events
        return await self._where(guest) != "elsewhere"

    async def watchdog(self) -> None:
        """A migration here that never got its resume or abort is aborted in the end."""
        while True:
            await asyncio.sleep(min(self.settings.migration_timeout_s / 4, 30))
            now = self.clock()
            for guest, a in list(self.arrivals.items()):
                r = a.state.record
                if r.phase in PRE_CUTOVER and now - r.updated > self.settings.migration_timeout_s:
                    await self._abort(guest, "no resume within migration_timeout_s")

    # helpers ---------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        return [view(a.state) for a in self.arrivals.values()]

    async def close(self, grace: float = 5.0) -> None:
        """Stop: a finalize under way gets ``grace`` to finish (a restart would replay it
        anyway); everything else stops now."""
        if self.finalizers:
            await asyncio.wait(self.finalizers, timeout=grace)
        tasks = [*self.settlers, *self.closers.values(), *self.finalizers,
                 *(a.precopy for a in self.arrivals.values() if a.precopy is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _owns(self, h: MigrationState) -> bool:
        owners = {o.ip: o.node for o in await self.store.list_ownership(guest=h.record.guest)}
        return all(owners.get(a) == self.node for a in h.record.addresses)

    async def _latest_arrival(self, guest: str) -> MigrationRecord | None:
        """The newest migration of ``guest`` here that got past its cutover, if any."""
        migs = await self.store.list_migrations(active=False, guest=guest)
        mine = [m for m in migs if m.dst == self.node and m.phase in
                (Phase.CUTOVER, Phase.FINALIZE, Phase.DONE)]
        return max(mine, key=lambda m: m.started) if mine else None

    async def _owner_node(self, g: Guest) -> str:
        owners = {o.node for o in await self.store.list_ownership(guest=g.name)}
        owners.discard(None)
        if len(owners) != 1:
            found = sorted(map(str, owners))
            raise MigrationError(f"cannot tell where {g.name} runs: owners {found} of "
                                 f"{[str(a) for a in g.addresses]}; pass src")
        return str(owners.pop())

    async def record(self, action: str, **fields: Any) -> None:
        """An audit record that cannot be written is counted and logged, never a reason to
        leave a migration (or an ownership change) half-done."""
        try:
            await self.audit.arecord(action, **fields)
        except Exception as exc:
            self.audit_errors += 1
            log.error("audit.write_failed", action=action, error=f"{type(exc).__name__}: {exc}")


class _Ungated:
    """Guests migrating here without handover: the reconciler leaves their gate open."""

    def __init__(self, migrations: Migrations) -> None:
        self.migrations = migrations

    def __contains__(self, guest: object) -> bool:
        a = self.migrations.arrivals.get(guest) if isinstance(guest, str) else None
        return a is not None and not a.state.hands_over

    def __iter__(self) -> Iterator[str]:
        return (g for g, a in self.migrations.arrivals.items() if not a.state.hands_over)


def view(h: MigrationState) -> dict[str, Any]:
    r = h.record
    return {"id": r.id, "guest": r.guest, "from": r.src, "to": r.dst, "phase": str(r.phase),
            "timings": dict(h.timings) or dict(r.timings), "entries": h.entries_pushed,
            "source_lost": h.source_lost, "handover": h.hands_over}


def record_view(r: MigrationRecord) -> dict[str, Any]:
    return {"id": r.id, "guest": r.guest, "from": r.src, "to": r.dst, "phase": str(r.phase),
            "timings": dict(r.timings), "entries": None, "source_lost": None,
            "handover": None}
