"""Writing a plan into D's table: the one way a handover plan reaches a kernel.

Used by the migration (precopy, its follower and the cutover's final delta), by ``sync
commit`` (a failover taking a dead node's flows over) and by whatever else writes plans.
First the entries every REPLACE names are deleted (ENOENT counts as done), then every write
goes in one batch with policy ``update`` (the plan already says what exists). The entries
carry what the plan says, handover bit included.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from orchestrator.handover.planner import DestKind, Plan
from orchestrator.netfilter.conntrack import Conntrack, EntryError


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
    done = Applied()
    doomed = [d for a in plan.dest if a.kind is DestKind.REPLACE for d in a.delete]
    if doomed:
        deleted = await asyncio.to_thread(table.delete, doomed)
        done.deleted, done.delete_errors = deleted.done, deleted.errors
    writes = [a.entry for a in plan.writes if a.entry is not None]
    if writes:
        pushed = await asyncio.to_thread(table.push, writes, "update")
        done.written, done.write_errors = len(writes) - len(pushed.errors), pushed.errors
    return done
