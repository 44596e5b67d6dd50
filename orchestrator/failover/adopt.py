"""Program a node's public addresses from the store's records (the reconcile side of a
failover and a failback).

``desired_adoption`` is pure: from the public-address records, what node X must answer
for. X holds a dead node D's address: D's address on X's uplink (announced by gratuitous
ARP when it appears), D's tag in the ``adopted_entry`` map (stateless DNAT keeps D's tag),
D's tag in ``adopted_tags`` (replies of D's committed SNAT flows are marked as D's) and D's
bridge MAC in ``adopted_macs`` (those frames leave X's pipes as D's). X's own record held
by another node: X is fenced, its own address leaves its uplink until a failback, which
puts it back as it was: its prefix and the routes the kernel dropped with it
(``orchestrator/failover/uplink.py``, kept in the agent's state dir).

A failback hands D's address back in steps (``orchestrator/failover/back.py``): while X is
*releasing* D, X keeps D's maps (packets the upstream router still sends X are answered as
before) but no longer carries D's address, whatever the record says, so D can take it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import structlog

from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError
from orchestrator.failover import uplink
from orchestrator.migration.nodeops import send_gratuitous_arp
from orchestrator.netfilter import nft
from orchestrator.netfilter.render import (
    IP_TABLE,
    MAP_ADOPTED,
    MAP_ADOPTED_MACS,
    NETDEV_TABLE,
    SET_ADOPTED_TAGS,
)
from orchestrator.netns import in_netns
from orchestrator.store.base import PublicAddress

log = structlog.get_logger("convergent.failover")


@dataclass(frozen=True)
class Adoption:
    """What one node answers for beyond its own services."""

    entry: frozenset[tuple[str, int]] = frozenset()  # (public address, its node's tag)
    macs: frozenset[tuple[int, str]] = frozenset()  # (tag, that node's bridge MAC)
    fenced: bool = False  # its own address is held by another node
    quiet: frozenset[str] = frozenset()  # addresses in ``entry`` kept off the uplink

    @property
    def tags(self) -> frozenset[int]:
        return frozenset(t for _, t in self.entry)

    def addresses(self, own: str) -> frozenset[str]:
        """The public addresses its uplink must carry."""
        extra = {ip for ip, _ in self.entry} - self.quiet
        return frozenset(extra if self.fenced else extra | {own})


def desired_adoption(records: tuple[PublicAddress, ...] | list[PublicAddress],
                     topology: Topology, node: str,
                     releasing: frozenset[str] | set[str] = frozenset()) -> Adoption:
    """``releasing``: nodes whose address ``node`` is handing back (a failback under way):
    their maps stay whoever the record names, their address leaves the uplink."""
    entry, macs, quiet, fenced = set(), set(), set(), False
    for p in records:
        if p.node == node:
            fenced = p.holder != node
        elif p.holder == node or p.node in releasing:
            home = topology.node(p.node)
            entry.add((str(p.ip), home.tag))
            macs.add((home.tag, home.bridge_mac))
            if p.node in releasing:
                quiet.add(str(p.ip))
    return Adoption(frozenset(entry), frozenset(macs), fenced, frozenset(quiet))


@dataclass
class Changes:
    added: list[str]
    removed: list[str]
    nft: bool

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.nft)


class AdoptionOps:
    """The node's nft maps and uplink addresses (in ``netns``, None: here). ``state_path``:
    where the own address's shape survives an agent restart (None: in memory only)."""

    def __init__(self, topology: Topology, node: str, netns: str | None = None,
                 state_path: Path | None = None) -> None:
        self.topology, self.node, self.netns = topology, node, netns
        self.me = topology.node(node)
        self.uplink = topology.cluster.uplink
        self.state_path = state_path
        self.shape = uplink.load(state_path)  # the own address as last seen configured
        self._seen = False  # this life has read the shape from the kernel
        self.releasing: set[str] = set()  # nodes a failback is handing their address back
        # one pass at a time: the reconcile loop and a failover/failback step both program
        # the uplink, and two passes would each try to delete the same address
        self._lock = asyncio.Lock()

    def _elements(self, family: str, table: str, name: str, kind: str) -> set[str]:
        out = set()
        for obj in nft.query(["list", kind, family, table, name], self.netns):
            for e in obj.get(kind, {}).get("elem", []):
                out.add(" : ".join(map(_norm, e)) if isinstance(e, list) else _norm(e))
        return out

    def _uplink_addresses(self) -> set[str]:
        argv = [*nft.netns_prefix(self.netns), "ip", "-j", "addr", "show", "dev", self.uplink]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise ConvergentError(f"uplink {self.uplink}: {proc.stderr.strip()}")
        return {a["local"] for link in json.loads(proc.stdout or "[]")
                for a in link.get("addr_info", []) if a.get("family") == "inet"}

    def _ip(self, *args: str) -> str:
        argv = [*nft.netns_prefix(self.netns), "ip", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise ConvergentError(f"{' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, want: Adoption) -> Changes:
        """Bring the kernel to ``want``; returns what changed (nothing on a second run)."""
        entry = {f"{ip} : {tag:#010x}" for ip, tag in want.entry}
        tags = {f"{t:#010x}" for t in want.tags}
        macs = {f"{t:#010x} : {mac}" for t, mac in want.macs}
        have_entry = self._elements("ip", IP_TABLE, MAP_ADOPTED, "map")
        have_tags = self._elements("ip", IP_TABLE, SET_ADOPTED_TAGS, "set")
        have_macs = self._elements("netdev", NETDEV_TABLE, MAP_ADOPTED_MACS, "map")
        ip_changes = {MAP_ADOPTED: (sorted(entry - have_entry), sorted(have_entry - entry)),
                      SET_ADOPTED_TAGS: (sorted(tags - have_tags), sorted(have_tags - tags))}
        ip_changes = {k: v for k, v in ip_changes.items() if v[0] or v[1]}
        mac_changes = (sorted(macs - have_macs), sorted(have_macs - macs))
        # the maps first: by the time the address answers ARP, its flows are tagged right
        if ip_changes:
            nft.update_sets("ip", IP_TABLE, ip_changes, self.netns)
        if mac_changes[0] or mac_changes[1]:
            nft.update_sets("netdev", NETDEV_TABLE, {MAP_ADOPTED_MACS: mac_changes}, self.netns)
        on_link = self._uplink_addresses()
        own = str(self.me.pub_ip)
        target = want.addresses(own)
        added = sorted(target - on_link)
        removed = sorted(a for a in on_link - target if a in self._public())
        if own in on_link and (not self._seen or own in removed):
            self._record(own)  # as configured; and afresh just before a fence drops it
        for a in removed:
            plen = self.shape.prefixlen if a == own and self.shape else 32
            self._ip("addr", "del", f"{a}/{plen}", "dev", self.uplink)
        for a in added:
            if a == own:
                self._restore(own)
            else:
                self._ip("addr", "add", f"{a}/32", "dev", self.uplink)
        return Changes(added, removed, bool(ip_changes or mac_changes[0] or mac_changes[1]))

    def _record(self, own: str) -> None:
        shape = uplink.read_shape(own, self.uplink, self._ip)
        if shape is None:
            return
        self.shape, self._seen = shape, True
        try:
            uplink.save(self.state_path, shape)
        except OSError as exc:  # the fence goes on: being off the address is what matters
            log.warning("failover.uplink_shape_unsaved", path=str(self.state_path),
                        error=str(exc))

    def _restore(self, own: str) -> None:
        """The own address back as it was, and the routes the kernel dropped with it."""
        shape = self.shape if self.shape is not None and self.shape.ip == own else None
        if shape is None:
            log.warning("failover.uplink_shape_unknown", address=own,
                        detail="never seen configured: restored as /32, without routes")
            self._ip("addr", "add", f"{own}/32", "dev", self.uplink)
            return
        self._ip(*shape.address_argv(self.uplink))
        for argv in shape.route_argvs(self.uplink):
            try:
                self._ip(*argv)
            except ConvergentError as exc:  # "File exists": the kernel kept or re-made it
                if "File exists" not in str(exc):
                    log.warning("failover.route_not_restored", error=str(exc))

    def _public(self) -> set[str]:
        return {str(n.pub_ip) for n in self.topology.nodes}

    def announce(self, addresses: list[str]) -> None:
        """Gratuitous ARP from the uplink: the upstream router moves the address here
        (sent from inside the node's namespace when it has one)."""
        for a in addresses:
            in_netns(self.netns, send_gratuitous_arp, self.uplink, IPv4Address(a))

    async def reconcile(self, records: list[PublicAddress]) -> Changes:
        async with self._lock:
            return await self._reconcile(records)

    async def follow(self, records: Callable[[], Awaitable[list[PublicAddress]]]) -> Changes:
        """Read the records *inside* the pass: a pass that waited for another one must not
        apply what it read before that one changed the store."""
        async with self._lock:
            return await self._reconcile(await records())

    async def _reconcile(self, records: list[PublicAddress]) -> Changes:
        want = desired_adoption(records, self.topology, self.node, self.releasing)
        changed = await asyncio.to_thread(self.apply, want)
        if changed.added:
            await asyncio.to_thread(self.announce, changed.added)
        if changed:
            log.info("failover.adoption", node=self.node, added=changed.added,
                     removed=changed.removed, fenced=want.fenced)
        return changed


def _norm(v: object) -> str:
    if isinstance(v, int):
        return f"{v:#010x}"
    return str(v)
