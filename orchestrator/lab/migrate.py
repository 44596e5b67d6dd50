"""``convergent lab migrate``: move a lab guest as an operator moves a VM with the
hypervisor's own tool. The lab hypervisor (``lab/hypervisor.py``) moves it and runs its
hooks; the agents learn each moment through their intake, exactly as from libvirt's or
libxl's hooks. This driver refuses a move the agents could not follow (an agent down: no
silent in-process coordination beside running agents), waits for the store to say how the
migration ended, and reports its timings. ``--in-process`` is the agentless lab."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.agent.client import AgentUnavailable, acall
from orchestrator.agent.events import reported_at
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.hypervisor import HypervisorError, Progress, ProgressFn
from orchestrator.lab.hypervisor import VifMover, lab_hypervisor
from orchestrator.lab.lab import Lab
from orchestrator.migration.coordinator import Coordinator, NodeHandle
from orchestrator.migration.nodeops import NftNodeOps
from orchestrator.netfilter.conntrack import ConntrackTable
from orchestrator.store import open_store
from orchestrator.store.base import MigrationRecord, Phase, Store

OUTCOME_WAIT_S = 30.0  # after the move: until the store shows the migration ended


@dataclass
class MigrationReport:
    guest: str
    src: str
    dst: str
    precopy_ms: float
    cutover_ms: float
    pause_ms: float
    entries: int
    total_ms: float
    migration: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst, "precopy_ms": round(self.precopy_ms, 1),
                "cutover_ms": round(self.cutover_ms, 1), "pause_ms": round(self.pause_ms, 1),
                "entries": self.entries, "total_ms": round(self.total_ms, 1),
                "migration": self.migration}


def store_url(lab: Lab) -> str:
    return f"sqlite://{lab.dir / 'store.db'}"


async def bootstrap_ownership(lab: Lab, store: Store) -> None:
    """Register the nodes and let each guest's current node claim its addresses once."""
    t = lab.topology()
    for n in t.nodes:
        await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
    for g in t.guests:
        node = lab.guest_node(t, g.name)
        owned = await store.list_ownership(guest=g.name, include_released=True)
        if node is not None and not owned:
            await store.claim_all({a: 0 for a in g.addresses}, node, g.name)


def node_handles(lab: Lab) -> dict[str, NodeHandle]:
    t = lab.topology()
    return {
        n.name: NodeHandle(n.name, ConntrackTable(lab.names.node(n.name)),
                           NftNodeOps(n.name, lab.names.node(n.name), t.cluster.guest_bridge))
        for n in t.nodes
    }


async def migrate(lab: Lab, guest: str, dst: str, handover: bool = True,
                  before_move: Callable[[], Awaitable[None]] | None = None,
                  keep_arp: bool = True, in_process: bool = False,
                  progress: ProgressFn | None = None) -> MigrationReport:
    """Move ``guest`` to ``dst`` as an operator would with the hypervisor's own tool: the
    lab's hypervisor moves it and runs its hooks, and the agents learn every moment through
    their intake. Refused with one line when the guest, the node or an agent is not there.
    ``in_process``: no agents at all; a coordinator in this process drives the nodes."""
    t = lab.topology()
    t.guest(guest)  # an unknown guest is one line naming the known ones
    if dst not in {n.name for n in t.nodes}:
        raise MigrationError(f"unknown node {dst!r} (nodes: {', '.join(n.name for n in t.nodes)})")
    src = lab.guest_node(t, guest)  # where the lab's hypervisor says it runs
    if src is None:
        raise MigrationError(f"guest {guest} is not running on any node")
    if src == dst:
        raise MigrationError(f"{guest} already runs on {dst}")
    if in_process:
        return await _in_process(lab, VifMover(lab, keep_arp), guest, src, dst, handover,
                                 before_move)
    if lab.driver(t) is not None:  # a real hypervisor's stand-in (lab up --hypervisor KIND)
        return await _via_driver(lab, guest, src, dst, handover, before_move)
    for node in (src, dst):
        await _agent_serves(lab, t, node)
    return await _by_hypervisor(lab, t, guest, src, dst, handover, before_move, keep_arp,
                                progress or _no_progress)


async def _agent_serves(lab: Lab, t: Topology, node: str) -> None:
    sock = t.agent.socket(node)
    try:
        await acall(sock, "ping", timeout=5)
    except AgentUnavailable as exc:
        raise MigrationError(f"the agent of {node} is not running ({exc}): start it "
                             "(a lab restarts it with lab up), or pass --in-process to move "
                             "the guest without agents") from None


async def _by_hypervisor(lab: Lab, t: Topology, guest: str, src: str, dst: str,
                         handover: bool, before_move: Callable[[], Awaitable[None]] | None,
                         keep_arp: bool, progress: ProgressFn) -> MigrationReport:
    hv = lab_hypervisor(lab, src, before_move=before_move, keep_arp=keep_arp)
    start, since = time.monotonic(), time.time()
    if not handover:  # the control run: D prepares a migration that hands nothing over
        await acall(t.agent.socket(dst), "migration.prepare", guest=guest, src=src,
                    handover=False)
    try:
        await hv.migrate(guest, dst, progress)
    except HypervisorError as exc:
        raise MigrationError(f"{guest}: {exc}") from None
    record = await _outcome(t, guest, since)
    if record is None:
        raise MigrationError(f"{guest} moved to {dst}, but no migration of it ended within "
                             f"{OUTCOME_WAIT_S:g} s: see convergent status on {dst}")
    if record.phase == Phase.ABORTED:
        raise MigrationError(f"{guest}: migration {record.id} {src} -> {dst} aborted: "
                             f"{record.error}")
    entries = await _entries(t, dst, record.id)
    return MigrationReport(guest, src, dst, record.timings.get("precopy", 0.0),
                           record.timings.get("cutover", 0.0), hv.last_pause_ms, entries,
                           (time.monotonic() - start) * 1000, record.id)


async def _via_driver(lab: Lab, guest: str, src: str, dst: str, handover: bool,
                      before_move: Callable[[], Awaitable[None]] | None) -> MigrationReport:
    """A lab on a real hypervisor's calling convention (``lab up --hypervisor KIND``): the
    move is ``convergent migrate`` on the source's agent, which runs the hypervisor's own
    migration; the agents learn of it only through their hooks and events."""
    t = lab.topology()
    if before_move is not None:
        await before_move()
    start = time.monotonic()
    if not handover:
        return await _plain_move(lab, guest, src, dst, start)
    if not lab.has_agents(t):
        raise MigrationError(f"a lab on {t.hypervisor.kind} hands over through its agents "
                             "(lab up starts them)")
    res = await acall(t.agent.socket(src), "guest.migrate", guest=guest, to=dst,
                      timeout=300)
    # the guest is suspended from the end of the memory stream until it resumes there
    at = {p["phase"]: p["at_ms"] for p in res.get("phases", [])}
    at["paused"] = at.get("memory", at.get("paused", 0.0))
    m = res.get("migration") or {}
    timings = m.get("timings") or {}
    return MigrationReport(guest, src, dst, float(timings.get("precopy") or 0.0),
                           float(timings.get("cutover") or 0.0),
                           float(at.get("resumed", 0.0) - at.get("paused", 0.0)),
                           _entries_pushed(t, dst, str(m.get("id") or "")),
                           (time.monotonic() - start) * 1000)


def _entries_pushed(t: Topology, dst: str, migration: str) -> int:
    """What the destination pushed (its precopy and cutover audit records): the source's
    answer does not carry it."""
    path = Path(str(t.agent.audit_log).replace("{node}", dst))
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("migration") == migration and rec.get("action") in (
                        "migration.precopy", "migration.cutover"):
                    total += int(rec.get("entries") or 0)
    return total


async def _plain_move(lab: Lab, guest: str, src: str, dst: str,
                      start: float) -> MigrationReport:
    """The control run: the hypervisor's own migration with no agent to hear of it."""
    t = lab.topology()
    drv = lab.driver(t)
    assert drv is not None
    if any(lab.agent_pid(n.name) is not None for n in t.nodes):
        raise MigrationError("--control on a lab hypervisor: the agents must be stopped, or "
                             "their hooks hand the flows over")
    at: dict[str, float] = {}

    def progress(p: Progress) -> None:
        now = (time.monotonic() - start) * 1000
        at.setdefault(p.phase, now)
        if p.phase == "memory":
            at["paused"] = now  # the last of the stream: the guest is suspended from here

    # as the built-in control: the guest's ARP cache lapses and it finds D's gateway
    await drv.migrate(guest, src, dst, progress, env={"CONVERGENT_LAB_KEEP_ARP": "0"})
    return MigrationReport(guest, src, dst, 0.0, 0.0,
                           at.get("resumed", 0.0) - at.get("paused", 0.0), 0,
                           (time.monotonic() - start) * 1000)


async def _outcome(t: Topology, guest: str, since: float) -> MigrationRecord | None:
    """The migration the move's hooks prepared, once it ended (its finalize included)."""
    store = await open_store(t.agent.store)
    try:
        deadline = time.monotonic() + OUTCOME_WAIT_S
        while time.monotonic() < deadline:
            migs = [m for m in await store.list_migrations(active=False, guest=guest)
                    if reported_at(m) >= since]
            done = [m for m in migs if not m.active]
            if done and not [m for m in migs if m.active]:
                return max(done, key=reported_at)
            await asyncio.sleep(0.05)
        return None
    finally:
        await store.close()


async def _entries(t: Topology, dst: str, migration: str) -> int:
    """How many entries D's agent pushed: its status keeps its recent migrations; when it
    does not answer in time (a loaded machine) or was restarted, its audit records say."""
    with contextlib.suppress(ConvergentError):
        st = await acall(t.agent.socket(dst), "status", timeout=15)
        for m in st.get("recent", []):
            if m["id"] == migration:
                return int(m.get("entries") or 0)
    return _entries_pushed(t, dst, migration)


def _no_progress(_: Progress) -> None:
    return None


async def _in_process(lab: Lab, hv: VifMover, guest: str, src: str, dst: str,
                      handover: bool, before_move: Callable[[], Awaitable[None]] | None
                      ) -> MigrationReport:
    """No agents: this process's coordinator drives both nodes (lab up --no-agents)."""
    t = lab.topology()
    if lab.has_any_agent(t):
        raise MigrationError("--in-process: this lab runs agents; two coordinators would "
                             "fight over the guest: drop --in-process")
    store = await open_store(store_url(lab))
    nodes = node_handles(lab)
    try:
        await bootstrap_ownership(lab, store)
        audit = AuditLog(lab.dir / "audit.log", node=dst, actor="cli")
        coord = Coordinator(t, store, nodes, audit, handover=handover)
        start = time.monotonic()

        async def move(resumed: Callable[[], Awaitable[None]]) -> None:
            if before_move is not None:
                await before_move()
            await hv.migrate(guest, src, dst, on_paused=_nothing, on_resumed=resumed)

        h = await coord.run(guest, src, dst, move)
        return MigrationReport(guest, src, dst, h.timings.get("precopy", 0.0),
                               h.timings.get("cutover", 0.0), hv.last_pause_ms,
                               h.entries_pushed, (time.monotonic() - start) * 1000,
                               h.record.id)
    finally:
        for n in nodes.values():
            n.table.close()
        await store.close()


async def _nothing() -> None:
    return None
