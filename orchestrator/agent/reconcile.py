"""Program one node's kernel from the store (DESIGN §3: the store is the truth; events only
trigger a pass, as kube-proxy learned).

``desired_sets`` and ``changes`` are pure; ``Reconciler`` reads the node's sets through its
:class:`~orchestrator.migration.nodeops.NodeOps`, writes the difference in one transaction,
and keeps the ruleset itself applied (a no-op while its digest holds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Container
from dataclasses import dataclass, field

import structlog

from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.migration.nodeops import NftNodeOps, NodeOps, NodeSets
from orchestrator.store.base import Phase, Snapshot, Store

log = structlog.get_logger("convergent.reconcile")
GATED_PHASES = frozenset({Phase.PREPARE, Phase.PRECOPY, Phase.CUTOVER})


def desired_sets(snap: Snapshot, node: str, ungated: Container[str] = ()) -> NodeSets:
    """``local_guests``: addresses this node owns. ``race_gate``: addresses of guests
    migrating here that it does not own yet (the gate opens with the ownership flip, never
    before the final delta is in). ``ungated``: guests whose migration runs without handover
    (the control run)."""
    owned = frozenset(str(o.ip) for o in snap.ownership if o.node == node)
    gate = frozenset(
        str(a) for m in snap.migrations
        if m.dst == node and m.phase in GATED_PHASES and m.guest not in ungated
        for a in m.addresses if str(a) not in owned
    )
    return NodeSets(owned, gate)


def changes(current: NodeSets, desired: NodeSets) -> dict[str, tuple[list[str], list[str]]]:
    """Per set: (to add, to remove), only for sets that differ."""
    out = {}
    have = current.by_set()
    for name, want in desired.by_set().items():
        add, remove = sorted(want - have[name]), sorted(have[name] - want)
        if add or remove:
            out[name] = (add, remove)
    return out


@dataclass
class ReconcileStats:
    runs: int = 0
    changed: int = 0
    errors: int = 0
    last_ms: float = 0.0
    total_ms: float = 0.0
    last_error: str | None = None
    last_changes: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)


class Reconciler:
    """Passes over one node: ``ops`` defaults to the node's real nft in this namespace."""

    def __init__(self, topology: Topology, node: str, store: Store,
                 ops: NodeOps | None = None, ungated: Container[str] = (),
                 audit: AuditLog | None = None) -> None:
        self.topology, self.node, self.store = topology, node, store
        self.ops = ops or NftNodeOps(node, None, topology.cluster.guest_bridge)
        self.ungated = ungated
        self.audit = audit
        self.stats = ReconcileStats()
        self._lock = asyncio.Lock()

    async def run(self, ruleset: bool = False) -> dict[str, tuple[list[str], list[str]]]:
        """One pass; ``ruleset``: also re-apply the rules (cheap when unchanged)."""
        async with self._lock:  # passes never interleave their reads and writes
            start = time.monotonic()
            self.stats.runs += 1
            try:
                if ruleset:
                    await self.ops.apply_rules(self.topology, self.audit)
                snap = await self.store.snapshot()
                todo = changes(await self.ops.sets(),
                               desired_sets(snap, self.node, self.ungated))
                if todo:
                    await self.ops.update_sets(todo)
            except Exception as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reconcile.failed", error=self.stats.last_error)
                raise
            finally:
                self.stats.last_ms = (time.monotonic() - start) * 1000
                self.stats.total_ms += self.stats.last_ms
            if todo:
                self.stats.changed += 1
                self.stats.last_changes = todo
                log.info("reconcile.changed", changes=todo)
            return todo
