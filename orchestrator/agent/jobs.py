"""``convergent migrate``: the operator's move of a guest, run by the agent of the node the
guest runs on, through that node's hypervisor adapter.

The adapter moves the guest; the agents learn each moment from hooks and events, as for
any migration the hypervisor runs (``virsh migrate``, ``xl migrate``). This job only
checks the request first (a known guest running here, a known other node whose agent is
alive), relays the adapter's progress, then waits for the store to say how the migration
ended. ``abort`` cancels the adapter's task, which cancels the hypervisor's job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from orchestrator.agent.events import reported_at
from orchestrator.agent.guests import GuestBook
from orchestrator.agent.inflight import Migrations, record_view
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.hypervisor import Hypervisor, Progress
from orchestrator.store.base import MigrationRecord, Store

log = structlog.get_logger("convergent.jobs")
Emit = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]
OUTCOME_WAIT_S = 30.0  # after the hypervisor is done: until the store shows the end
ALIVE_S = 15.0  # a destination agent heard from within this (or 3 reconcile intervals)


class MigrateJobs:
    def __init__(self, node: str, topology: Topology, store: Store, guests: GuestBook,
                 hypervisor: Hypervisor, migrations: Migrations) -> None:
        self.node, self.topology, self.store = node, topology, store
        self.guests, self.hypervisor, self.migrations = guests, hypervisor, migrations
        self.running: dict[str, tuple[str, asyncio.Task[None]]] = {}  # guest -> (dst, job)

    async def migrate(self, guest: str, to: str, emit: Emit | None = None) -> dict[str, Any]:
        dst = to
        await self._check(guest, dst)
        start, wall = time.monotonic(), time.time()
        phases: list[dict[str, Any]] = []
        sent: list[asyncio.Task[None]] = []  # progress lines, in order, before the answer

        def progress(p: Progress) -> None:
            step = {"phase": p.phase, "detail": p.detail, "fraction": p.fraction,
                    "at_ms": round((time.monotonic() - start) * 1000, 1)}
            phases.append(step)
            if emit is not None:
                sent.append(asyncio.get_running_loop().create_task(emit(step)))

        job = asyncio.create_task(self.hypervisor.migrate(guest, dst, progress))
        self.running[guest] = (dst, job)
        try:
            await asyncio.wait({job})
        finally:
            self.running.pop(guest, None)
            await asyncio.gather(*sent, return_exceptions=True)
        if job.cancelled():
            raise MigrationError(f"{guest}: migration {self.node} -> {dst} aborted by "
                                 "request; it stays on " + self.node)
        exc = job.exception()
        if isinstance(exc, ConvergentError):
            raise MigrationError(f"{guest}: {exc}")
        if exc is not None:
            raise MigrationError(f"{guest}: the hypervisor failed: {type(exc).__name__}: "
                                 f"{exc}") from exc
        record = await self._outcome(guest, wall)
        total = round((time.monotonic() - start) * 1000, 1)
        if record is not None and record.phase.value == "aborted":
            raise MigrationError(f"{guest}: migration {record.id} {self.node} -> {dst} "
                                 f"aborted: {record.error or 'no reason given'}")
        return {"guest": guest, "from": self.node, "to": dst, "total_ms": total,
                "phases": phases,
                "migration": record_view(record) if record is not None else None,
                "outcome": record.phase.value if record is not None else "unknown"}

    async def abort(self, guest: str) -> dict[str, Any]:
        """Cancel the running move of ``guest`` (the adapter aborts the hypervisor's job and
        tells the destination, whose agent undoes its part)."""
        found = self.running.get(guest)
        if found is None:
            raise MigrationError(f"{guest}: no migration run by {self.node}'s agent")
        dst, job = found
        job.cancel()
        await asyncio.wait({job}, timeout=OUTCOME_WAIT_S)
        return {"guest": guest, "from": self.node, "to": dst, "aborted": job.done()}

    def status(self) -> list[dict[str, Any]]:
        return [{"guest": g, "to": dst} for g, (dst, _) in self.running.items()]

    async def _check(self, guest: str, dst: str) -> None:
        """One line for each refusal: before anything moves."""
        g = await self.guests.resolve(guest)
        names = [n.name for n in self.topology.nodes]
        if dst not in names:
            raise MigrationError(f"unknown node {dst!r} (nodes: {', '.join(names)})")
        if dst == self.node:
            raise MigrationError(f"{g.name} already runs on {dst}")
        if guest in self.running:
            raise MigrationError(f"{guest} is already being moved to "
                                 f"{self.running[guest][0]}")
        info = await self.hypervisor.describe(guest)
        if info.node != self.node or not info.running:
            where = info.node or "no node"
            raise MigrationError(f"{guest} runs on {where}, not on {self.node}")
        if await self.store.list_migrations(active=True, guest=guest):
            raise MigrationError(f"{guest} is already migrating")
        rec = await self.store.get_node(dst)
        alive = max(ALIVE_S, 3 * self.topology.agent.reconcile_interval_s)
        if rec is None or time.time() - rec.heartbeat > alive:
            seen = "never" if rec is None else f"{time.time() - rec.heartbeat:.0f} s ago"
            raise MigrationError(f"{dst}'s agent is not running (last heard from {seen}): "
                                 f"without it {guest}'s flows cannot be handed over")

    async def _outcome(self, guest: str, since: float) -> MigrationRecord | None:
        """The migration the hypervisor's moves prepared (reported after ``since``), once
        it has ended; None if none showed up."""
        deadline = time.monotonic() + OUTCOME_WAIT_S
        record = None
        while time.monotonic() < deadline:
            migs = [m for m in await self.store.list_migrations(active=False, guest=guest)
                    if reported_at(m) >= since]
            record = max(migs, key=reported_at) if migs else None
            if record is not None and not record.active:
                return record
            await asyncio.sleep(0.05)
        return record
