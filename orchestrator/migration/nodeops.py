"""What the migration coordinator does to one node's kernel, behind one small seam.

Every operation names the node's namespace (``None`` on a production host), so the lab
and production run the same code.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from orchestrator.errors import MigrationError
from orchestrator.netfilter import nft
from orchestrator.netfilter.conntrack import in_netns
from orchestrator.netfilter.render import IP_TABLE, SET_LOCAL_GUESTS, SET_RACE_GATE

ETH_P_ARP = 0x0806


@dataclass(frozen=True)
class NodeOps:
    node: str
    netns: str | None
    guest_bridge: str

    async def gate(self, addresses: Iterable[IPv4Address], closed: bool) -> None:
        """Close (or open) the race gate for an arriving guest's addresses."""
        await self._set(SET_RACE_GATE, addresses, add=closed)

    async def arrive(self, addresses: Iterable[IPv4Address], open_gate: bool) -> None:
        """The cutover's flip on D in one nft transaction: host the guest, open its gate."""
        elems = [str(a) for a in addresses]
        changes: dict[str, tuple[list[str], list[str]]] = {SET_LOCAL_GUESTS: (elems, [])}
        if open_gate:
            changes[SET_RACE_GATE] = ([], elems)
        await asyncio.to_thread(nft.update_sets, "ip", IP_TABLE, changes, self.netns)

    async def host(self, addresses: Iterable[IPv4Address], hosted: bool) -> None:
        await self._set(SET_LOCAL_GUESTS, addresses, add=hosted)

    async def _set(self, name: str, addresses: Iterable[IPv4Address], add: bool) -> None:
        """One nft call; idempotent (``update_set`` never fails on present/absent)."""
        elems = [str(a) for a in addresses]
        await asyncio.to_thread(nft.update_set, "ip", IP_TABLE, name,
                                elems if add else (), () if add else elems, self.netns)

    async def announce_gateway(self, gateway: IPv4Address) -> None:
        """Gratuitous ARP for the shared gateway from this node's guest bridge: a guest that
        kept its ARP cache across the move stops hair-pinning through the source. One raw
        frame from a packet socket: no arping process lingering for its reply timeout."""
        # in_netns: a thread of its own enters D's namespace, never a pool thread
        await asyncio.to_thread(in_netns, self.netns, send_gratuitous_arp, self.guest_bridge,
                                gateway)


def gratuitous_arp(mac: bytes, ip: IPv4Address) -> bytes:
    """An unsolicited ARP request (what ``arping -U`` sends): "ip is at mac", broadcast."""
    broadcast = b"\xff" * 6
    return (broadcast + mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac + ip.packed + b"\0" * 6 + ip.packed)


def send_gratuitous_arp(ifname: str, ip: IPv4Address) -> None:
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((ifname, ETH_P_ARP))
            mac = sock.getsockname()[4]
            sock.send(gratuitous_arp(mac, ip))
    except OSError as exc:
        raise MigrationError(f"gratuitous ARP on {ifname}: {exc.strerror or exc}") from None
