"""The lab's hypervisor: a guest is a namespace, its NIC a veth whose node end (the vif)
moves between node namespaces. The guest keeps its sockets as a VM keeps its memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from orchestrator.errors import MigrationError
from orchestrator.hypervisor import GuestInfo
from orchestrator.lab import netns as ns
from orchestrator.lab.flows import announce_guest
from orchestrator.lab.lab import Lab
from orchestrator.lab.plan import GUEST_IFACE, vif_name

Callback = Callable[[], Awaitable[None]]


class LabHypervisor:  # moves to the event-driven seam with issue 11
    name = "lab"

    def __init__(self, lab: Lab, keep_arp: bool = True) -> None:
        self.lab = lab
        self.topology = lab.topology()
        # a real VM keeps carrier and its neighbour table across the move; the veth does
        # not, so we put every entry back (the destination's gratuitous ARP must fix the
        # gateway's). keep_arp False: all but the gateway's (the control run, plan.py)
        self.keep_arp = keep_arp
        self.last_pause_ms = 0.0

    def describe(self, guest: str) -> GuestInfo:
        g = self.topology.guest(guest)
        return GuestInfo(g.name, tuple(g.macs), tuple(g.addresses),
                         self.lab.guest_node(self.topology, guest))

    async def migrate(self, guest: str, src: str, dst: str, *, on_paused: Callback,
                      on_resumed: Callback) -> None:
        where = self.lab.guest_node(self.topology, guest)
        if where != src:
            raise MigrationError(f"{guest} runs on {where}, not {src}")
        start = time.monotonic()
        await asyncio.to_thread(self.move_vif, guest, src, dst)
        self.last_pause_ms = (time.monotonic() - start) * 1000
        await on_paused()
        await on_resumed()

    def move_vif(self, guest: str, src: str, dst: str) -> None:
        t, names = self.topology, self.lab.names
        vif = vif_name(t, guest)
        g_ns = names.guest(guest)
        gateway = str(t.cluster.gateway)
        kept = [n for n in ns.neighbours(g_ns, GUEST_IFACE) if self.keep_arp or n[0] != gateway]
        ns.ip(names.node(src), "link", "set", vif, "netns", names.node(dst))
        ns.enslave(names.node(dst), vif, t.cluster.guest_bridge)
        # as QEMU/Xen do after a move: RARP from the guest's MAC so the switches relearn it
        announce_guest(self.lab, t, guest)
        ns.restore_neighbours(g_ns, GUEST_IFACE, kept)  # the whole table, as a VM keeps it
