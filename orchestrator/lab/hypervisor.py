"""The lab's hypervisor (``[hypervisor] kind = "lab"``): a guest is a namespace, its NIC a
veth whose node end (the vif) moves between node namespaces. The guest keeps its sockets
as a VM keeps its memory.

It is an adapter like the real ones: the agents learn each moment of a move from the lab's
hook (``hooks/lab``, the same stdlib client libvirt's and libxl's hooks use, run as a
subprocess under ``python3 -I -S`` with the arguments ``EVENT GUEST [PEER]``), so a move
exercises the agents' real intake: a hook that finds the agent down spools, and the agent
replays it. The phase sequence of a move is written once, in ``LabHypervisor.migrate``:

    incoming on D (its agent prepares: record, gate) -> the memory copy (the lab waits for
    D's precopy to sync, as a real copy gives it time) -> pause and move the vif ->
    resumed on D (cutover) -> gone on S (the source closes its part)

or, on a failure or a cancel before the guest moved, failed on D (its agent aborts).

Settings: ``lab`` (its name), ``dir`` (its state directory), ``keep_arp`` (the guest keeps
its gateway ARP entry across the move, as a VM does; default true), ``hook_timeout_s``
(default 1.5), ``precopy_wait_s`` (longest "memory copy", default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from orchestrator.agent.client import AgentUnavailable, acall
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, LabError, MigrationError
from orchestrator.hypervisor import (
    EventKind,
    GuestEvent,
    GuestInfo,
    HookCall,
    Hypervisor,
    HypervisorError,
    Progress,
    ProgressFn,
)
from orchestrator.lab import netns as ns
from orchestrator.lab.flows import announce_guest
from orchestrator.lab.hookrun import DEFAULT_TIMEOUT_S, hook_conf, run_hook
from orchestrator.lab.lab import Lab
from orchestrator.lab.plan import GUEST_IFACE, vif_name
from orchestrator.store import outwaits_refusal

log = structlog.get_logger("convergent.lab")
Callback = Callable[[], Awaitable[None]]
SETTINGS = {"lab", "dir", "keep_arp", "hook_timeout_s", "precopy_wait_s"}
HOOK = "lab"
POLL_S = 0.02


class VifMover:
    """The lab's moving part alone: the vif from one node namespace to another. The
    coordinator's tests and benchmarks time the coordinator around it without agents."""

    def __init__(self, lab: Lab, keep_arp: bool = True) -> None:
        self.lab = lab
        self.topology = lab.topology()
        # a real VM keeps carrier and its neighbour table across the move; the veth does
        # not, so we put every entry back (the destination's gratuitous ARP must fix the
        # gateway's). keep_arp False: all but the gateway's (the control run, plan.py)
        self.keep_arp = keep_arp
        self.last_pause_ms = 0.0

    async def migrate(self, guest: str, src: str, dst: str, *, on_paused: Callback,
                      on_resumed: Callback) -> None:
        """Move, then the callbacks (in-process coordinators: no hooks, no agents)."""
        where = self.lab.guest_node(self.topology, guest)
        if where != src:
            raise MigrationError(f"{guest} runs on {where}, not {src}")
        self.last_pause_ms = await asyncio.to_thread(self.move_vif, guest, src, dst)
        await on_paused()
        await on_resumed()

    def move_vif(self, guest: str, src: str, dst: str) -> float:
        """The pause: the vif leaves ``src`` and joins ``dst``'s bridge; its length in ms."""
        start = time.monotonic()
        t, names = self.topology, self.lab.names
        vif = vif_name(t, guest)
        g_ns = names.guest(guest)
        gateway = str(t.cluster.gateway)
        kept = [n for n in ns.neighbours(g_ns, GUEST_IFACE) if self.keep_arp or n[0] != gateway]
        ns.ip(names.node(src), "link", "set", vif, "netns", names.node(dst))
        ns.enslave(names.node(dst), vif, t.cluster.guest_bridge)
        # as QEMU/Xen do after a move: RARP from the guest's MAC so the switches relearn it
        announce_guest(self.lab, t, guest)
        # the kernel flushes a veth's neighbours on carrier loss only when its linkwatch
        # runs while the carrier is down (it may not, or may after the restore): flush
        # here, so the guest's table after the move is always exactly ``kept``
        ns.ip(g_ns, "neigh", "flush", "dev", GUEST_IFACE)
        ns.restore_neighbours(g_ns, GUEST_IFACE, kept)  # the whole table, as a VM keeps it
        return (time.monotonic() - start) * 1000


class LabHypervisor(Hypervisor):
    kind = "lab"

    def __init__(self, settings: Mapping[str, Any], node: str, *,
                 before_move: Callback | None = None, strict: bool = True) -> None:
        super().__init__(settings, node)
        unknown = sorted(set(self.settings) - SETTINGS)
        if unknown:
            raise HypervisorError(f"[hypervisor] kind lab: unknown settings {unknown} "
                                  f"(known: {', '.join(sorted(SETTINGS))})")
        if "lab" not in self.settings:
            raise HypervisorError("[hypervisor] kind lab: 'lab' (the lab's name) is required")
        root = Path(self.settings["dir"]).parent if "dir" in self.settings else None
        self.lab = Lab(str(self.settings["lab"]), root=root)
        self.keep_arp = bool(self.settings.get("keep_arp", True))
        self.hook_timeout_s = float(self.settings.get("hook_timeout_s",
                                                      _hook_timeout_for(self.lab)))
        self.precopy_wait_s = float(self.settings.get("precopy_wait_s", 10.0))
        self.before_move = before_move  # a test's (or the demo's) moment before the pause
        # strict: a move convergent drives waits for the destination's precopy and aborts
        # when its agent did not take the migration; not strict: the hypervisor moves the
        # guest whatever the agents do (an operator's virsh migrate behind their back)
        self.strict = strict
        self.last_pause_ms = 0.0
        self.verdicts: list[dict[str, Any]] = []  # what each hook of the last move heard

    @property
    def topology(self) -> Topology:
        return self.lab.topology()

    # what a hook call means --------------------------------------------------------------
    def parse_hook(self, call: HookCall) -> GuestEvent | None:
        if call.hook != HOOK:
            raise ValueError(f"not a lab hook call (hook {call.hook!r})")
        argv = list(call.argv)
        if not 2 <= len(argv) <= 3:
            raise ValueError(f"lab hook: want EVENT GUEST [PEER], got {argv}")
        try:
            kind = EventKind(argv[0])
        except ValueError:
            raise ValueError(f"lab hook: unknown event {argv[0]!r} (known: "
                             f"{', '.join(k.value for k in EventKind)})") from None
        return GuestEvent(kind, argv[1], self.node, "hook:lab", call.at or time.time(),
                          peer=argv[2] if len(argv) == 3 else None, id=call.id,
                          wants_verdict=kind == EventKind.INCOMING)

    async def events(self) -> AsyncIterator[GuestEvent]:
        return  # every moment of the lab comes through its hook
        yield

    # what the lab knows of its guests ----------------------------------------------------
    async def describe(self, guest: str) -> GuestInfo:
        t = self.topology
        try:
            g = t.guest(guest)
        except KeyError:
            raise HypervisorError(f"lab {self.lab.name} has no guest {guest!r}") from None
        node = await asyncio.to_thread(self.lab.guest_node, t, guest)
        return GuestInfo(g.name, tuple(g.macs), tuple(g.addresses), node,
                         running=node is not None)

    async def running(self) -> list[GuestInfo]:
        t = self.topology
        links = await asyncio.to_thread(ns.ip, self.lab.names.node(self.node), "-o", "link",
                                        "show", check=False)
        here = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
                if line.count(":") >= 2}
        return [GuestInfo(g.name, tuple(g.macs), tuple(g.addresses), self.node)
                for g in t.guests if vif_name(t, g.name) in here]

    # the move ------------------------------------------------------------------------
    async def migrate(self, guest: str, dst: str, progress: ProgressFn) -> None:
        src = self.node
        info = await self.describe(guest)
        if info.node != src:
            raise HypervisorError(f"{guest} runs on {info.node or 'no node'}, not {src}")
        if dst not in {n.name for n in self.topology.nodes} or dst == src:
            raise HypervisorError(f"cannot move {guest} from {src} to {dst!r}")
        self.verdicts = []
        progress(Progress("starting", f"{guest} {src} -> {dst}"))
        moved = False
        try:
            incoming = await self.hook(dst, EventKind.INCOMING, guest, src)
            if incoming.get("verdict") == "deny":
                raise HypervisorError(f"{dst} refused the migration: {incoming.get('reason')}")
            progress(Progress("memory", "the destination's precopy runs meanwhile"))
            await self._memory_copy(dst, guest, incoming)
            if self.before_move is not None:
                await self.before_move()
            progress(Progress("paused"))
            mover = VifMover(self.lab, self.keep_arp)
            self.last_pause_ms = await asyncio.to_thread(mover.move_vif, guest, src, dst)
            moved = True
        except BaseException as exc:  # a failure or a cancel before the guest moved
            with contextlib.suppress(Exception):
                await asyncio.shield(self.hook(dst, EventKind.FAILED, guest, src))
            progress(Progress("aborted", f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            if moved:  # past the pause there is no way back: the destination runs it
                await asyncio.shield(self._resumed(guest, src, dst, progress))

    async def _resumed(self, guest: str, src: str, dst: str, progress: ProgressFn) -> None:
        await self.hook(dst, EventKind.RESUMED, guest, src)
        progress(Progress("resumed", f"on {dst} after a {self.last_pause_ms:.0f} ms pause"))
        await self.hook(src, EventKind.GONE, guest, dst)
        progress(Progress("done"))

    async def _memory_copy(self, dst: str, guest: str, incoming: dict[str, Any]) -> None:
        """The lab's move takes no time; a real memory copy gives the destination's precopy
        its first sync meanwhile, so the lab waits for that (up to ``precopy_wait_s``). A
        destination agent that did not take the migration, or lost it, aborts it."""
        if incoming.get("spooled"):
            if not self.strict:
                return
            raise HypervisorError(f"{dst}'s agent did not take the migration "
                                  f"({incoming.get('reason')}): aborted")
        sock = self.topology.agent.socket(dst)
        deadline = time.monotonic() + self.precopy_wait_s
        while time.monotonic() < deadline:
            try:
                st = await acall(sock, "status", timeout=5)
            except AgentUnavailable as exc:
                if await asyncio.to_thread(_listening, sock):
                    continue  # busy (a loaded machine), not gone: ask again
                if not self.strict:
                    return
                raise HypervisorError(f"{dst}'s agent went away during the precopy ({exc}): "
                                      "aborted") from None
            mine = [m for m in st["migrations"] if m["guest"] == guest]
            if not mine and not self.strict:
                return
            if not mine:
                raise HypervisorError(f"{dst} has no migration of {guest} in flight any more "
                                      "(its precopy failed?): aborted")
            if "precopy" in mine[0]["timings"]:
                return
            await asyncio.sleep(POLL_S)

    async def hook(self, node: str, event: EventKind, guest: str,
                   peer: str | None = None) -> dict[str, Any]:
        """Run the lab's hook for ``node`` (``hookrun``); its verdict, kept for the caller."""
        conf = hook_conf(self.lab.dir, node, self.topology.agent, self.hook_timeout_s)
        try:
            verdict = await run_hook(conf, [event.value, guest, *([peer] if peer else [])],
                                     self.hook_timeout_s)
        except LabError as exc:
            raise HypervisorError(str(exc)) from None
        verdict["hook"].update(node=node, event=event.value)
        self.verdicts.append(verdict)
        log.debug("lab.hook", node=node, hook_event=event.value, guest=guest,
                  verdict=verdict.get("verdict"), outcome=verdict.get("outcome"),
                  spooled=bool(verdict.get("spooled")))
        return verdict


def _listening(sock: Path) -> bool:
    """Does a process still listen on the agent's socket (refused or absent: it died)?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock))
        except TimeoutError:
            return True
        except OSError:
            return False
    return True


def lab_hypervisor(lab: Lab, node: str, *, before_move: Callback | None = None,
                   keep_arp: bool | None = None, strict: bool = True) -> LabHypervisor:
    """The adapter of ``node`` as the lab's config sets it up, for a move driven from here."""
    settings = dict(lab.topology().hypervisor.settings)
    if keep_arp is not None:
        settings["keep_arp"] = keep_arp
    try:
        return LabHypervisor(settings, node, before_move=before_move, strict=strict)
    except ConvergentError:
        raise
    except Exception as exc:
        raise HypervisorError(f"lab hypervisor: {exc}") from exc


def _hook_timeout_for(lab: Lab) -> float:
    """The hooks' default, unless the lab's store may take longer to refuse (etcd without
    quorum): then the destination's refusal must still reach the waiting hook."""
    try:
        store = lab.topology().agent.store
    except LabError:  # no lab config (a bench's bare adapter): nothing to outlast
        return DEFAULT_TIMEOUT_S
    return outwaits_refusal(store, DEFAULT_TIMEOUT_S)
