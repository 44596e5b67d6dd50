"""What the coordinator and the reconciler do to one node's kernel, behind one small seam.

:class:`NodeOps` is the protocol: the node's two nft sets (``local_guests``: the guests it
hosts; ``race_gate``: arriving guests whose new flows are held back), its ruleset, and the
gratuitous ARP of a cutover. :class:`NftNodeOps` is the real thing (every call names the
node's namespace, ``None`` on a production host, so the lab and production run the same
code); :class:`FakeNodeOps` keeps the sets in memory for unit tests. One contract suite
(``tests/functional/test_nodeops_contract.py``) runs against both.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Protocol

from orchestrator.errors import MigrationError, RulesetError
from orchestrator.netfilter import nft
from orchestrator.netfilter.apply import apply
from orchestrator.netfilter.render import IP_TABLE, SET_LOCAL_GUESTS, SET_RACE_GATE
from orchestrator.netns import in_netns

if TYPE_CHECKING:
    from orchestrator.audit.log import AuditLog
    from orchestrator.config.schema import Topology

ETH_P_ARP = 0x0806
SETS = (SET_LOCAL_GUESTS, SET_RACE_GATE)
SetChanges = Mapping[str, tuple[Sequence[str], Sequence[str]]]  # set -> (add, remove)


@dataclass(frozen=True)
class NodeSets:
    """The elements of the node's two dynamic sets."""

    local_guests: frozenset[str] = frozenset()
    race_gate: frozenset[str] = frozenset()

    def by_set(self) -> dict[str, frozenset[str]]:
        return {SET_LOCAL_GUESTS: self.local_guests, SET_RACE_GATE: self.race_gate}


class NodeOps(Protocol):
    """One node's kernel as the coordinator and the reconciler drive it. Every write is
    idempotent (adding a present element or removing an absent one is no error)."""

    @property
    def node(self) -> str: ...

    async def gate(self, addresses: Iterable[IPv4Address], closed: bool) -> None:
        """Close (or open) the race gate for an arriving guest's addresses."""

    async def host(self, addresses: Iterable[IPv4Address], hosted: bool) -> None:
        """Add (or remove) addresses in ``local_guests``."""

    async def arrive(self, addresses: Iterable[IPv4Address], open_gate: bool) -> None:
        """The cutover's flip on D in one transaction: host the guest, open its gate."""

    async def announce_gateway(self, gateway: IPv4Address) -> None:
        """Gratuitous ARP for the shared gateway from this node's guest bridge."""

    async def sets(self) -> NodeSets:
        """What the two sets hold now."""
        ...

    async def update_sets(self, changes: SetChanges) -> None:
        """Several sets' (add, remove) in one transaction."""

    async def apply_rules(self, topology: Topology, audit: AuditLog | None = None) -> None:
        """Keep the node's ruleset applied (a no-op while its digest holds; the sets keep
        their elements across a rule change)."""


@dataclass(frozen=True)
class NftNodeOps:
    """A node's nft sets and guest bridge, in ``netns``."""

    node: str
    netns: str | None
    guest_bridge: str

    async def gate(self, addresses: Iterable[IPv4Address], closed: bool) -> None:
        await self._set(SET_RACE_GATE, addresses, add=closed)

    async def host(self, addresses: Iterable[IPv4Address], hosted: bool) -> None:
        await self._set(SET_LOCAL_GUESTS, addresses, add=hosted)

    async def arrive(self, addresses: Iterable[IPv4Address], open_gate: bool) -> None:
        elems = [str(a) for a in addresses]
        changes: dict[str, tuple[list[str], list[str]]] = {SET_LOCAL_GUESTS: (elems, [])}
        if open_gate:
            changes[SET_RACE_GATE] = ([], elems)
        await self.update_sets(changes)

    async def _set(self, name: str, addresses: Iterable[IPv4Address], add: bool) -> None:
        elems = [str(a) for a in addresses]
        await self.update_sets({name: (elems, []) if add else ([], elems)})

    async def update_sets(self, changes: SetChanges) -> None:
        await asyncio.to_thread(nft.update_sets, "ip", IP_TABLE, changes, self.netns)

    async def sets(self) -> NodeSets:
        both = await asyncio.to_thread(nft.sets_elements, "ip", IP_TABLE,
                                       [SET_LOCAL_GUESTS, SET_RACE_GATE], self.netns)
        return NodeSets(frozenset(both[SET_LOCAL_GUESTS]), frozenset(both[SET_RACE_GATE]))

    async def apply_rules(self, topology: Topology, audit: AuditLog | None = None) -> None:
        # recorded only when it changed something (someone flushed our rules)
        await asyncio.to_thread(apply, topology, self.node, self.netns, audit,
                                record_unchanged=False)  # fmt: skip

    async def announce_gateway(self, gateway: IPv4Address) -> None:
        """A guest that kept its ARP cache across the move stops hair-pinning through the
        source. One raw frame from a packet socket: no arping process lingering for its
        reply timeout."""
        # in_netns: a thread of its own enters the namespace, never a pool thread
        await asyncio.to_thread(in_netns, self.netns, send_gratuitous_arp, self.guest_bridge,
                                gateway)


@dataclass
class FakeNodeOps:
    """A node's sets in memory; ``announced`` lists the gratuitous ARPs sent, ``applied``
    counts rule applications (``drop_rules`` stands in for someone flushing our tables)."""

    node: str
    guest_bridge: str = "guestbr0"
    elements: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in SETS})
    announced: list[tuple[str, IPv4Address]] = field(default_factory=list)
    applied: int = 0
    writes: int = 0  # transactions that reached the sets
    rules: bool = True

    async def gate(self, addresses: Iterable[IPv4Address], closed: bool) -> None:
        elems = [str(a) for a in addresses]
        await self.update_sets({SET_RACE_GATE: (elems, []) if closed else ([], elems)})

    async def host(self, addresses: Iterable[IPv4Address], hosted: bool) -> None:
        elems = [str(a) for a in addresses]
        await self.update_sets({SET_LOCAL_GUESTS: (elems, []) if hosted else ([], elems)})

    async def arrive(self, addresses: Iterable[IPv4Address], open_gate: bool) -> None:
        elems = [str(a) for a in addresses]
        changes: dict[str, tuple[list[str], list[str]]] = {SET_LOCAL_GUESTS: (elems, [])}
        if open_gate:
            changes[SET_RACE_GATE] = ([], elems)
        await self.update_sets(changes)

    async def update_sets(self, changes: SetChanges) -> None:
        if not self.rules:
            raise RulesetError(f"{self.node}: no table ip {IP_TABLE} (rules not applied)")
        for name, (add, remove) in changes.items():
            self.elements[name] = (self.elements[name] - set(remove)) | set(add)
        self.writes += 1

    async def sets(self) -> NodeSets:
        e = self.elements
        return NodeSets(frozenset(e[SET_LOCAL_GUESTS]), frozenset(e[SET_RACE_GATE]))

    async def apply_rules(self, topology: Topology, audit: AuditLog | None = None) -> None:
        self.applied += 1
        if not self.rules:
            self.rules = True
            self.elements = {s: set() for s in SETS}

    async def announce_gateway(self, gateway: IPv4Address) -> None:
        self.announced.append((self.guest_bridge, gateway))

    def drop_rules(self) -> None:
        """As if someone had deleted our tables: the sets are gone until the next apply."""
        self.rules = False


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


_held_to_the_protocol: tuple[type[NodeOps], ...] = (NftNodeOps, FakeNodeOps)  # mypy checks
