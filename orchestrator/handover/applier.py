"""Writing a plan into D's table: the one way a handover plan reaches a kernel.

Used by the migration (precopy, its follower and the cutover's final delta), by ``sync
commit`` (a failover taking a dead node's flows over) and by whatever else writes plans.
First the entries every REPLACE names are deleted (ENOENT counts as done), then every write
goes in one batch with policy ``update`` (the plan already says what exists), except the
adds of entries that carry their SNAT binding (a failback gives a node its own bindings
back: ``Rule.SNAT_HOME_BINDING``), which are created with it (``push_snat``; a binding
cannot be set on a live entry). The entries carry what the plan says, handover bit
included. ``apply_writes`` is the same order for writes that do not come from a handover
plan (a failover's commit: its bound entries, and the survivor's un-NATed copies they
replace).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.handover.planner import DestAction, DestKind, Plan
from orchestrator.model.conntrack import Entry
from orchestrator.netfilter.conntrack import Conntrack, EntryError, PushResult


@dataclass(slots=True)
class Applied:
    deleted: int = 0  # D's clashing entries removed
    delete_errors: list[EntryError] = field(default_factory=list)
    written: int = 0  # entries created or changed
    write_errors: list[EntryError] = field(default_factory=list)

    @property
    def errors(self) -> list[EntryError]:
        return self.delete_errors + self.write_errors


async def apply_plan(table: Conntrack, plan: Plan) -> Applied:
    """Delete what REPLACE actions name, then push every write (table calls off the loop)."""
    doomed = [d for a in plan.dest if a.kind is DestKind.REPLACE for d in a.delete]
    plain = [a.entry for a in plan.writes if a.entry is not None and not _creates_binding(a)]
    bound = [a.entry for a in plan.writes if a.entry is not None and _creates_binding(a)]
    return await apply_writes(table, doomed, plain, bound)


async def apply_writes(table: Conntrack, doomed: Sequence[Entry], plain: Sequence[Entry] = (),
                       bound: Sequence[Entry] = ()) -> Applied:
    """Delete ``doomed`` (ENOENT counts as done), then push ``plain`` (policy ``update``)
    and create ``bound`` with their binding."""
    done = Applied()
    if doomed:
        deleted = await asyncio.to_thread(table.delete, list(doomed))
        done.deleted, done.delete_errors = deleted.done, deleted.errors
    if plain:
        _count(done, plain, await asyncio.to_thread(table.push, list(plain), "update"))
    if bound:
        _count(done, bound, await asyncio.to_thread(table.push_snat, list(bound)))
    return done


def _count(done: Applied, entries: Sequence[Entry], pushed: PushResult) -> None:
    done.written += len(entries) - len(pushed.errors)
    done.write_errors += pushed.errors


def _creates_binding(a: DestAction) -> bool:
    return a.kind is not DestKind.UPDATE and a.entry is not None and a.entry.is_src_nat
