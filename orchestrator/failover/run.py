"""``failover`` as the survivor's agent runs it (one audit record per step; the failback is
``handback.py``).

Order matters. The adoption is a compare-and-swap first: nothing changes on this node
unless it fenced the dead one. Then D's SNAT entries go into the kernel *before* D's address
appears on our uplink, so the first reply to D's address already finds its binding (without
it the reply would reach our own stack and be answered with a reset); an un-NATed copy of
such a flow that we hold ourselves (its guest moved here from D) is replaced, through the
one applier. Then the address, its
maps and the gratuitous ARP; then D's lost guests are released; every other node follows
the store on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import structlog

from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError
from orchestrator.failover.adopt import Changes
from orchestrator.failover.plan import (
    CommitWrites,
    FailoverPlan,
    FailoverRefused,
    commit_writes,
    plan_failover,
)
from orchestrator.handover.applier import apply_writes
from orchestrator.model.conntrack import Entry
from orchestrator.netfilter.conntrack import Conntrack
from orchestrator.store.base import PublicAddress, PublicConflict, Store

log = structlog.get_logger("convergent.failover")
SKIPPABLE = frozenset({"entries", "address"})


class Adoption(Protocol):
    """What a failover needs of :class:`~orchestrator.failover.adopt.AdoptionOps`."""

    async def follow(self, records: Callable[[], Awaitable[list[PublicAddress]]]
                     ) -> Changes: ...  # fmt: skip


class Failover:
    def __init__(self, topology: Topology, node: str, store: Store, table: Conntrack,
                 adoption: Adoption, audit: AuditLog,
                 cached: Callable[[str], list[Entry]], wake: Callable[[], None]) -> None:
        self.topology, self.node, self.store, self.table = topology, node, store, table
        self.adoption, self.audit, self.cached, self.wake = adoption, audit, cached, wake
        self._lock = asyncio.Lock()

    async def plan(self, dead: str, force: bool = False) -> FailoverPlan:
        snap = await self.store.snapshot()
        live = {v.node: v for v in await self.store.list_liveness()}
        return plan_failover(self.topology, snap, live, dead, self.node, self.cached(dead),
                             force)

    async def run(self, dead: str, force: bool = False, dry_run: bool = False,
                  skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        """``skip``: parts left out on purpose (control runs): ``entries`` (no SNAT commit),
        ``address`` (no adoption: nothing answers the dead node's address)."""
        unknown = skip - SKIPPABLE
        if unknown:
            raise ConvergentError(f"failover: cannot skip {sorted(unknown)}; only "
                                  f"{sorted(SKIPPABLE)}")
        async with self._lock:
            planning = time.perf_counter()
            try:
                plan = await self.plan(dead, force)
            except FailoverRefused as exc:
                await self.audit.arecord("failover.begin", from_node=dead, to_node=self.node,
                                         outcome="refused", detail=str(exc))
                raise
            if dry_run:
                return {"dry_run": True, **plan.summary()}
            return await self._run(plan, skip, planning)

    async def _run(self, plan: FailoverPlan, skip: frozenset[str],
                   start: float) -> dict[str, Any]:
        steps = {"plan": round((time.perf_counter() - start) * 1000, 1)}
        common = {"from_node": plan.dead, "to_node": self.node}
        notes = (["forced: lease alive"] if plan.forced else []) + [
            f"control run: without {part}" for part in sorted(skip)]
        await self.audit.arecord("failover.begin", **common,
                                 detail="; ".join(notes) or None)
        if "address" in skip:
            plan = replace(plan, commit=())  # entries without the address serve nothing

        def lap(name: str, t: float) -> None:
            steps[name] = round((time.perf_counter() - t) * 1000, 1)

        epoch = None
        if "address" not in skip:
            t = time.perf_counter()
            epoch = await self._adopt(plan)
            lap("adopt", t)
            await self.audit.arecord("failover.adopt", **common, addresses=[str(plan.pub_ip)],
                                     epoch=epoch, duration_ms=steps["adopt"])
        if "entries" in skip:
            plan = replace(plan, commit=())
        t = time.perf_counter()
        writes = await self._commit_writes(plan)
        applied = await apply_writes(self.table, writes.delete, bound=writes.push)
        lap("commit", t)
        errors = [str(e) for e in applied.errors]
        details = ([f"replaced {writes.replaced} un-NATed"] if writes.replaced else []) + (
            [f"{len(errors)} failed, first: {errors[0]}"] if errors else [])
        await self.audit.arecord("failover.commit", **common, entries=len(plan.commit),
                                 duration_ms=steps["commit"],
                                 outcome="degraded" if errors else "ok",
                                 detail="; ".join(details) or None)
        if "address" not in skip:
            t = time.perf_counter()
            changed = await self.adoption.follow(self.store.list_public)
            lap("program", t)
            await self.audit.arecord("failover.program", **common, addresses=changed.added,
                                     duration_ms=steps["program"],
                                     detail=f"services {', '.join(plan.services)}")
        t = time.perf_counter()
        released = await self._release(plan.lost)
        lap("release", t)
        if released:  # one record for the step: a node may take a thousand guests with it
            names = sorted(released)
            await self.audit.arecord(
                "failover.release", **common, guest=names[0] if len(names) == 1 else None,
                addresses=sorted(a for addrs in released.values() for a in addrs),
                duration_ms=steps["release"],
                detail=f"host died, guests lost: {', '.join(names[:20])}"
                       + (f" and {len(names) - 20} more" if len(names) > 20 else ""))
        self.wake()
        total = round((time.perf_counter() - start) * 1000, 1)
        await self.audit.arecord("failover.end", **common, duration_ms=total,
                                 entries=len(plan.commit))
        log.info("failover.done", dead=plan.dead, ms=total, entries=len(plan.commit))
        return {**plan.summary(), "epoch": epoch, "committed": len(plan.commit) - len(errors),
                "replaced": writes.replaced, "unchanged": writes.unchanged,
                "commit_errors": errors[:5], "steps_ms": steps, "total_ms": total,
                "skipped_parts": sorted(skip)}

    async def _commit_writes(self, plan: FailoverPlan) -> CommitWrites:
        """What we hold of the commit's flows decides how each goes in."""
        guests = sorted({e.tuple_orig.src for e in plan.commit}, key=str)
        existing = await asyncio.to_thread(self.table.dump, guests) if guests else []
        return commit_writes(plan.commit, existing)

    async def _adopt(self, plan: FailoverPlan) -> int:
        if plan.adopt_epoch is None:
            held = await self.store.get_public(plan.dead)
            return held.epoch if held else 0
        try:
            rec = await self.store.claim_public(plan.dead, plan.pub_ip, self.node,
                                                plan.adopt_epoch)
        except PublicConflict as exc:
            raise FailoverRefused(f"{plan.dead}'s address changed hands meanwhile: {exc}") \
                from None
        return rec.epoch

    async def _release(self, lost: Mapping[str, Mapping[Any, int]]) -> dict[str, list[str]]:
        """Each lost guest's addresses, all or nothing per guest, batched by the store."""
        guests = sorted(lost)
        results = await self.store.release_each([lost[g] for g in guests])
        done: dict[str, list[str]] = {}
        for guest, result in zip(guests, results, strict=True):
            if isinstance(result, ConvergentError):  # someone moved it meanwhile: theirs now
                log.warning("failover.release_skipped", guest=guest, error=str(result))
            else:
                done[guest] = sorted(str(o.ip) for o in result)
        return done
