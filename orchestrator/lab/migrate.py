"""``convergent lab migrate``: the production coordinator driving the lab hypervisor."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity

from orchestrator.agent.client import AgentUnavailable, acall
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.hypervisor import Progress
from orchestrator.lab.hypervisor import LabHypervisor
from orchestrator.lab.lab import Lab
from orchestrator.migration.coordinator import Coordinator, NodeHandle
from orchestrator.migration.nodeops import NftNodeOps
from orchestrator.netfilter.conntrack import ConntrackTable
from orchestrator.store import open_store
from orchestrator.store.base import Store

AGENT_RETRY_S = 15.0


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

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst, "precopy_ms": round(self.precopy_ms, 1),
                "cutover_ms": round(self.cutover_ms, 1), "pause_ms": round(self.pause_ms, 1),
                "entries": self.entries, "total_ms": round(self.total_ms, 1)}


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
                  keep_arp: bool = True) -> MigrationReport:
    """Move ``guest`` to ``dst``: through the nodes' agents when the lab runs them (as a
    hypervisor's hooks would), else with a coordinator in this process."""
    t = lab.topology()
    hv = LabHypervisor(lab, keep_arp=keep_arp)
    src = hv.describe(guest).node
    if src is None:
        raise MigrationError(f"guest {guest} is not running on any node")
    if dst not in {n.name for n in t.nodes}:
        raise MigrationError(f"unknown node {dst!r}")
    drv = lab.driver(t)
    if drv is not None:
        return await _via_driver(lab, guest, src, dst, handover, before_move)
    if lab.has_agents(t):
        return await _via_agents(lab, hv, guest, src, dst, handover, before_move)
    return await _in_process(lab, hv, guest, src, dst, handover, before_move)


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


async def _via_agents(lab: Lab, hv: LabHypervisor, guest: str, src: str, dst: str,
                      handover: bool, before_move: Callable[[], Awaitable[None]] | None
                      ) -> MigrationReport:
    """prepare on D (what libvirt's ``migrate begin`` hook sends), the move, then resume on
    D (the RESUMED event). A D agent that is restarting gets ``AGENT_RETRY_S`` to answer."""
    sock = lab.topology().agent.socket(dst)
    start = time.monotonic()
    prep = await acall(sock, "migration.prepare", guest=guest, src=src, handover=handover)
    done: dict[str, Any] = {}

    async def resumed() -> None:
        done.update(await _retrying(sock, "migration.resumed", guest=guest))

    try:
        if before_move is not None:
            await before_move()
        await hv.migrate(guest, src, dst, on_paused=_nothing, on_resumed=resumed)
    except BaseException as exc:
        if not done:
            with contextlib.suppress(ConvergentError):
                await _retrying(sock, "migration.abort", guest=guest,
                                reason=f"{type(exc).__name__}: {exc}")
        raise
    # S's "guest gone" event in a real cluster; D finalizes right after cutover anyway
    await _retrying(sock, "migration.finalize", guest=guest)
    timings = done.get("timings", {})
    return MigrationReport(guest, src, dst, prep["timings"].get("precopy", 0.0),
                           timings.get("cutover", 0.0), hv.last_pause_ms,
                           int(done.get("entries") or 0), (time.monotonic() - start) * 1000)


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
    await drv.migrate(guest, src, dst, progress, env={"CONVERGENT_XEN_KEEP_ARP": "0"})
    return MigrationReport(guest, src, dst, 0.0, 0.0,
                           at.get("resumed", 0.0) - at.get("paused", 0.0), 0,
                           (time.monotonic() - start) * 1000)


async def _retrying(sock: Path, op: str, **args: Any) -> Any:
    """``op`` on the agent at ``sock``, retried every 0.1 s while it is unavailable (a
    restarting agent) for up to ``AGENT_RETRY_S``; then its last AgentUnavailable."""
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(AgentUnavailable),
        stop=tenacity.stop_after_delay(AGENT_RETRY_S), wait=tenacity.wait_fixed(0.1),
        reraise=True)
    return await retrying(acall, sock, op, **args)


async def _in_process(lab: Lab, hv: LabHypervisor, guest: str, src: str, dst: str,
                      handover: bool, before_move: Callable[[], Awaitable[None]] | None
                      ) -> MigrationReport:
    t = lab.topology()
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
                               h.entries_pushed, (time.monotonic() - start) * 1000)
    finally:
        for n in nodes.values():
            n.table.close()
        await store.close()


async def _nothing() -> None:
    return None
