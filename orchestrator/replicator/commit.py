"""Commit an external cache into the local kernel: a failover takes a sender's flows over.

conntrackd's ``-c``, but through the handover planner (DESIGN §2): the cached entries are
S's (the node that died or handed over), this node is D, and every entry is written in the
form D holds after a handover (tag in the mark, BE_LIBERAL, the SNAT binding un-NATed...),
planned against what D's table already holds so a second commit writes nothing new.
Entries that name no configured guest have no translation and are only counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError
from orchestrator.handover.applier import apply_plan
from orchestrator.handover.planner import DestKind, plan_handover
from orchestrator.model.conntrack import Entry
from orchestrator.netfilter.conntrack import Conntrack


class CommitError(ConvergentError):
    pass


@dataclass(slots=True)
class CommitResult:
    from_node: str
    to_node: str
    guests: list[str]
    cached: int = 0  # entries in the external cache
    no_guest: int = 0  # naming no configured guest: not committed
    planned: int = 0  # one per (guest, cached entry of that guest)
    pushed: int = 0  # created or changed in the kernel
    unchanged: int = 0  # the kernel already held them as planned
    skipped: int = 0  # the planner gives D nothing for them (closing, half-open, ...)
    deleted: int = 0  # D's own clashing entries replaced
    errors: int = 0
    first_error: str | None = None
    by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def commit(
    table: Conntrack, topology: Topology, entries: Iterable[Entry], from_node: str,
    to_node: str, guest: str | None = None,
) -> CommitResult:  # fmt: skip
    """Plan and write ``entries`` (from ``from_node``'s cache) into ``table`` (``to_node``)."""
    names = {n.name for n in topology.nodes}
    for n in (from_node, to_node):
        if n not in names:
            raise CommitError(f"unknown node {n!r} (known: {', '.join(sorted(names))})")
    if from_node == to_node:
        raise CommitError(f"cannot commit {to_node}'s own entries into itself")
    if guest is not None and guest not in {g.name for g in topology.guests}:
        raise CommitError(f"unknown guest {guest!r}")
    guests = [g for g in topology.guests if guest is None or g.name == guest]
    cached = list(entries)
    result = CommitResult(from_node, to_node, [g.name for g in guests], cached=len(cached))
    if guest is None:
        everyone = frozenset(a for g in topology.guests for a in g.addresses)
        result.no_guest = sum(1 for e in cached if not e.addresses() & everyone)
    for g in guests:
        existing = await asyncio.to_thread(table.dump, g.addresses)
        plan = plan_handover(cached, topology, g, from_node, to_node, existing)
        result.planned += len(plan.dest)
        for a in plan.dest:
            result.by_kind[a.kind.value] = result.by_kind.get(a.kind.value, 0) + 1
            if a.kind is DestKind.SKIP:
                if a.entry is None:
                    result.skipped += 1
                else:
                    result.unchanged += 1
        done = await apply_plan(table, plan)
        result.deleted += done.deleted
        result.pushed += done.written
        _errors(result, [str(e) for e in done.errors])
    return result


def _errors(result: CommitResult, errors: list[str]) -> None:
    if errors:
        result.errors += len(errors)
        result.first_error = result.first_error or errors[0]
