"""What a failback of home node H from the holder V does (pure; the steps run in
``orchestrator/failover/handback.py``).

V adopted H's public address in a failover and committed H's SNAT bindings into its own
kernel; H is back (its agent runs, its lease is alive), fenced off its address, maybe with an
empty conntrack table. Moving the address back alone would break every SNAT flow V carried:
the replies would reach H, which has no binding for them, and H's stack would reset them. So
the failback hands the flows back first, in an order where no packet finds neither node
ready:

1. **plan**: H asks V (peer channel) for V's entries tagged with H's tag, and keeps the ones
   H's address owns (:func:`select_handback`): the SNAT bindings anchored at H's address,
   and the entries the stateless DNAT of H's address made on V. The handover planner plans
   them with V as S and H as D against H's table (:func:`plan_handback`): a binding goes
   back whole (``Rule.SNAT_HOME_BINDING``), an inbound entry as a copy;
2. **commit**: H re-applies its ruleset (it may have come back with stale rules) and writes
   the plans through the one applier;
3. **release**: V takes H's address off its uplink but keeps its maps and entries, so what
   the upstream router still sends V is answered as before;
4. **adopt**: the compare-and-swap gives H its record back (the fence ends only here); H's
   address goes on H's uplink with a gratuitous ARP, the router follows;
5. **retire**: V drops H's maps and deletes its copies of H's bindings.

A second failback finds H holding its address: nothing to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import Any

from orchestrator.config.schema import Node, Topology
from orchestrator.errors import ConvergentError
from orchestrator.handover.planner import DestKind, Plan, plan_handover
from orchestrator.model.conntrack import Entry, Proto, Status, TcpState
from orchestrator.store.base import Liveness, PublicAddress

STEPS = ("plan", "commit", "release", "adopt", "retire")
SKIPPABLE = frozenset({"entries"})


class FailbackRefused(ConvergentError):
    pass


@dataclass(frozen=True)
class FailbackStart:
    """A failback that has something to do: who holds the address, at which epoch."""

    home: str
    holder: str
    pub_ip: IPv4Address
    tag: int
    epoch: int  # the record's epoch now: the CAS back to ``home`` expects it


@dataclass(frozen=True)
class Handback:
    """The holder's entries the home takes back, and why the rest stay."""

    entries: tuple[Entry, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FailbackPlan:
    start: FailbackStart
    plans: tuple[Plan, ...]  # one per guest named by a handed-back entry
    skipped: Mapping[str, int] = field(default_factory=dict)
    offered: int = 0  # entries the holder sent

    @property
    def writes(self) -> int:
        return sum(len(p.writes) for p in self.plans)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.plans:
            for a in p.dest:
                out[a.kind.value] = out.get(a.kind.value, 0) + 1
        return out

    def flows_by_guest(self) -> dict[str, int]:
        """Flows of each guest the home holds once the plans are written."""
        return {p.guest: n for p in self.plans
                if (n := sum(1 for a in p.dest if a.entry is not None))}

    def bindings(self) -> int:
        return sum(1 for p in self.plans for a in p.dest
                   if a.entry is not None and a.entry.is_src_nat)

    def summary(self) -> dict[str, object]:
        s = self.start
        skipped, unchanged = dict(self.skipped), 0
        for p in self.plans:
            for a in p.dest:
                if a.entry is None:
                    why = f"planner: {a.rules[0].value}"
                    skipped[why] = skipped.get(why, 0) + 1
                elif a.kind is DestKind.SKIP:
                    unchanged += 1
        return {
            "from": s.holder, "to": s.home, "public_address": str(s.pub_ip), "tag": s.tag,
            "nothing_to_do": False, "offered": self.offered, "entries": self.writes,
            "bindings": self.bindings(), "unchanged": unchanged, "by_kind": self.by_kind(),
            "flows_by_guest": self.flows_by_guest(), "skipped": skipped,
        }


def nothing_to_do(home: str, pub_ip: IPv4Address) -> dict[str, object]:
    return {"from": None, "to": home, "public_address": str(pub_ip), "nothing_to_do": True,
            "entries": 0, "flows_by_guest": {}, "skipped": {}}


def plan_failback(topology: Topology, record: PublicAddress | None,
                  liveness: Mapping[str, Liveness], home: str) -> FailbackStart | None:
    """Refusals in one line; None: ``home`` holds its address already (nothing to do)."""
    h = _node(topology, home)
    if record is None:
        raise FailbackRefused(f"{h.name} has no public-address record: its agent registers "
                              "it when it starts")
    if record.ip != h.pub_ip:
        raise FailbackRefused(f"the store says {h.name}'s public address is {record.ip}, the "
                              f"config says {h.pub_ip}: fix one of them first")
    if not record.adopted:
        return None
    live = liveness.get(h.name)
    if live is None or not live.alive:
        raise FailbackRefused(f"{h.name} is not alive (no lease): start its agent first")
    holder = _node(topology, record.holder)
    held = liveness.get(holder.name)
    if held is not None and held.ttl and not held.alive:
        raise FailbackRefused(
            f"{holder.name} holds {h.name}'s address {record.ip} but is not alive itself: "
            f"its entries are gone with it (fail {holder.name} over instead)")
    return FailbackStart(h.name, holder.name, h.pub_ip, h.tag, record.epoch)


def select_handback(entries: Iterable[Entry], topology: Topology, home: str) -> Handback:
    """Of the holder's entries, the ones ``home``'s address owns: SNAT bindings anchored at
    it, and the entries its stateless DNAT made (tagged ``home``, client -> guest).

    The entry node of a stateless flow never sees the replies (the hosting node sends them
    out itself), so its live TCP entries lack SEEN_REPLY; handed back, they get it, or the
    planner would take them for half-open flows. A binding gets the replication bit back:
    the home's SNAT rule sets it, but on the holder the adopted replies' tag overwrote the
    ct mark (``bridge_state``), and without it the home would not replicate the flow, so a
    second failover would find nothing to commit."""
    h = topology.node(home)
    sync_bit = topology.sync.mark_bit
    guests = frozenset(a for g in topology.guests for a in g.addresses)
    subnet, mask = topology.cluster.guest_subnet, topology.cluster.tag_mask
    out: list[Entry] = []
    skipped: dict[str, int] = {}
    for e in entries:
        why = _why_not(e, h, guests, mask, subnet)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        if e.is_src_nat:
            e = replace(e, mark=e.mark | sync_bit)
        elif _live_tcp(e) and not e.status & Status.SEEN_REPLY:
            e = replace(e, status=e.status | Status.SEEN_REPLY)
        out.append(e)
    return Handback(tuple(out), skipped)


def _why_not(e: Entry, h: Node, guests: frozenset[object], mask: int,
             subnet: object) -> str | None:
    if e.mark & mask != h.tag:
        return f"not tagged {h.name}"
    if e.is_dst_nat:
        return "FULL-NAT (its binding was the dead node's alone)"
    if e.is_src_nat:
        if e.tuple_reply.dst != h.pub_ip:
            return f"SNAT not anchored at {h.pub_ip}"
        if e.tuple_orig.src not in guests:
            return "SNAT of no configured guest"
        return None
    if e.tuple_orig.dst in guests and e.tuple_orig.src not in subnet:  # type: ignore[operator]
        return None
    return "not a flow of the address (the holder's own state for the guest)"


def _live_tcp(e: Entry) -> bool:
    return (e.tuple_orig.proto == Proto.TCP and e.tcp is not None
            and e.tcp.state is TcpState.ESTABLISHED)


def plan_handback(start: FailbackStart, handback: Handback, topology: Topology,
                  existing: Iterable[Entry], offered: int = 0) -> FailbackPlan:
    """The handover planner per guest, the holder as S and the home as D, against the
    home's own entries (``existing``): a second plan of the same entries writes nothing."""
    by_address = {a: g.name for g in topology.guests for a in g.addresses}
    theirs = _per_guest(handback.entries, by_address)
    mine = _per_guest(existing, by_address)
    plans = tuple(plan_handover(theirs[g.name], topology, g, start.holder, start.home,
                                mine.get(g.name, []))
                  for g in topology.guests if g.name in theirs)
    return FailbackPlan(start, plans, handback.skipped, offered)


def _per_guest(entries: Iterable[Entry], by_address: Mapping[Any, str]) -> dict[str, list[Entry]]:
    """Entries by the name of each guest they name (one pass: thousands are handed back)."""
    out: dict[str, list[Entry]] = {}
    for e in entries:
        for g in {by_address[a] for a in e.addresses() if a in by_address}:
            out.setdefault(g, []).append(e)
    return out


def guest_addresses(topology: Topology, handback: Handback) -> list[IPv4Address]:
    """The guest addresses the handed-back entries name (what the home dumps to plan)."""
    named = set().union(*(e.addresses() for e in handback.entries)) if handback.entries \
        else set()
    return sorted(a for g in topology.guests for a in g.addresses if a in named)


def retired(entries: Iterable[Entry], home: Node) -> list[Entry]:
    """The holder's copies it deletes once the home holds its address again: the bindings
    anchored at it (the inbound entries expire on their own: the holder may host the
    guest, and then they are its own)."""
    return [e for e in entries if e.is_src_nat and not e.is_dst_nat
            and e.tuple_reply.dst == home.pub_ip]


def _node(topology: Topology, name: str) -> Node:
    try:
        return topology.node(name)
    except KeyError:
        known = ", ".join(n.name for n in topology.nodes)
        raise FailbackRefused(f"unknown node {name!r} (nodes: {known})") from None
