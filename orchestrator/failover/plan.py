"""What a failover of a dead node D to a survivor V does (pure; DESIGN §3).

D was two things. As a **host**, its guests died with it: their addresses are released
(the hypervisor's HA may restart them elsewhere; convergent cannot save their flows). As an
**entry and exit point**, it can be replaced:

- V adopts D's public address: a compare-and-swap on the address's record (fencing D:
  if it comes back it sees another holder and stays away until a failback);
- V answers it with D's stateless DNAT rules *tagged with D's tag*, so the node hosting
  the guest still sees the flows as D's and keeps spoofing D's address on the replies;
- V commits the SNAT entries anchored at D's address from its cache of D's replicated
  entries, *with their real binding* (V now receives the replies to D's address and must
  un-SNAT them), each marked with D's tag so the replies leave V as D's frames.

What V itself holds for those flows decides how each goes in (``commit_writes``): a guest
that moved D -> V earlier left V the flow *un-NATed* under the same original tuple (D did
the SNAT); that entry is replaced by the bound one, else the replies to D's address would
find no binding on V. One V holds with the binding already is left as it is.

Refusals are one line each: D's lease still alive (without ``force``), D = V, an address
already adopted by a third node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from orchestrator.config.schema import Mode, Node, Topology
from orchestrator.errors import ConvergentError
from orchestrator.handover.planner import REQUIRED, liberal
from orchestrator.model.conntrack import Entry, Key
from orchestrator.store.base import Liveness, Ownership, PublicAddress, Snapshot


class FailoverRefused(ConvergentError):
    pass


@dataclass(frozen=True)
class FailoverPlan:
    dead: str
    survivor: str
    pub_ip: IPv4Address
    tag: int
    mac: str  # D's bridge MAC: the source of D's flows' frames on V's pipes
    adopt_epoch: int | None  # expected epoch of the adoption CAS; None: V holds it already
    services: tuple[str, ...]  # stateless services answered on D's address
    commit: tuple[Entry, ...]  # SNAT entries with their binding, for V's kernel
    lost: Mapping[str, Mapping[IPv4Address, int]]  # guest -> its addresses at their epochs
    forced: bool = False
    skipped: Mapping[str, int] = field(default_factory=dict)  # why cached entries stay out
    flows: Mapping[str, int] = field(default_factory=dict)  # guest -> SNAT flows committed

    def summary(self) -> dict[str, object]:
        return {
            "from": self.dead, "to": self.survivor, "public_address": str(self.pub_ip),
            "tag": self.tag, "adopt": self.adopt_epoch is not None, "forced": self.forced,
            "services": list(self.services), "entries": len(self.commit),
            "flows_by_guest": dict(self.flows),
            "lost_guests": {g: sorted(map(str, a)) for g, a in self.lost.items()},
            "skipped": dict(self.skipped),
        }


def plan_failover(topology: Topology, snap: Snapshot, liveness: Mapping[str, Liveness],
                  dead: str, survivor: str, cached: Iterable[Entry],
                  force: bool = False) -> FailoverPlan:
    d, v = _node(topology, dead), _node(topology, survivor)
    if d.name == v.name:
        raise FailoverRefused(f"cannot fail {d.name} over to itself: name a survivor (--to)")
    live = liveness.get(d.name)
    if live is not None and live.alive and not force:
        raise FailoverRefused(
            f"{d.name} is alive: its lease has {live.remaining:g} s of {live.ttl:g} s left; "
            "fail over only a dead node (--force to do it anyway, audited)")
    survivor_live = liveness.get(v.name)
    if survivor_live is not None and survivor_live.ttl and not survivor_live.alive:
        raise FailoverRefused(f"the survivor {v.name} is not alive itself (its lease expired)")
    pub = {p.node: p for p in snap.public}.get(d.name)
    epoch = _adopt_epoch(d, v, pub)
    lost = _lost_guests(snap.ownership, d.name)
    living = {o.ip for o in snap.ownership if o.node not in (None, d.name)}
    commit, skipped, flows = _snat_entries(cached, d, living, topology)
    services = tuple(s.name for s in topology.services if s.mode is Mode.STATELESS)
    return FailoverPlan(d.name, v.name, d.pub_ip, d.tag, d.bridge_mac, epoch, services,
                        tuple(commit), lost, force, skipped, flows)


def _node(topology: Topology, name: str) -> Node:
    try:
        return topology.node(name)
    except KeyError:
        known = ", ".join(n.name for n in topology.nodes)
        raise FailoverRefused(f"unknown node {name!r} (nodes: {known})") from None


def _adopt_epoch(d: Node, v: Node, pub: PublicAddress | None) -> int | None:
    if pub is None:
        return 0  # never registered (a store from before public records): claim it fresh
    if pub.ip != d.pub_ip:
        raise FailoverRefused(f"the store says {d.name}'s public address is {pub.ip}, the "
                              f"config says {d.pub_ip}: fix one of them first")
    if pub.holder == v.name:
        return None  # a second run: V holds it already, redo the rest
    if pub.holder != d.name:
        raise FailoverRefused(f"{d.name}'s public address {pub.ip} is already adopted by "
                              f"{pub.holder} (epoch {pub.epoch}): fail over from there, or "
                              "fail it back first")
    return pub.epoch


def _lost_guests(ownership: Iterable[Ownership], dead: str) -> dict[str, dict[IPv4Address, int]]:
    lost: dict[str, dict[IPv4Address, int]] = {}
    for o in ownership:
        if o.node == dead:
            lost.setdefault(o.guest, {})[o.ip] = o.epoch
    return lost


def _snat_entries(cached: Iterable[Entry], d: Node, living: set[IPv4Address],
                  topology: Topology) -> tuple[list[Entry], dict[str, int], dict[str, int]]:
    """D's SNAT entries anchored at its address, of guests alive elsewhere, in the form V
    writes: binding kept, D's tag (and the bits D set) in the mark, liberal, confirmed."""
    by_ip = {a: g.name for g in topology.guests for a in g.addresses}
    out: list[Entry] = []
    skipped: dict[str, int] = {}
    flows: dict[str, int] = {}
    mask = topology.cluster.tag_mask
    for e in cached:
        why = _why_not(e, d, living)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        out.append(replace(e, status=e.status | REQUIRED,
                           mark=(e.mark & ~mask) | d.tag,
                           tcp=liberal(e.tcp) if e.tcp is not None else None, id=None))
        guest = by_ip.get(e.tuple_orig.src, str(e.tuple_orig.src))  # type: ignore[arg-type]
        flows[guest] = flows.get(guest, 0) + 1
    return out, skipped, flows


def _why_not(e: Entry, d: Node, living: set[IPv4Address]) -> str | None:
    if not e.is_src_nat:
        return "not SNAT (stateless flows need no state on the entry node)"
    if e.tuple_reply.dst != d.pub_ip:
        return f"not anchored at {d.pub_ip}"
    if e.tuple_orig.src not in living:
        return "guest not alive elsewhere (ran on the dead node, or unknown)"
    if e.tcp is not None and e.tcp.state.name in _CLOSING:
        return "closing"
    return None


_CLOSING = frozenset({"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE"})


@dataclass(frozen=True)
class CommitWrites:
    """How the commit's entries go into V's kernel."""

    push: tuple[Entry, ...]  # created with their binding
    delete: tuple[Entry, ...]  # V's entries holding one of their tuples otherwise: first
    unchanged: int  # V holds them with the binding already
    replaced: int  # entries of ``push`` that take the place of ``delete``'s


def commit_writes(commit: Sequence[Entry], existing: Iterable[Entry]) -> CommitWrites:
    """``existing``: what V's table holds naming the commit's guests."""
    held: dict[Key, Entry] = {}
    for e in existing:
        held[(e.tuple_orig, e.zone)] = held[(e.tuple_reply, e.zone)] = e
    push: list[Entry] = []
    doomed: dict[Key, Entry] = {}
    unchanged = replaced = 0
    for c in commit:
        holders = {h.key: h for h in (held.get((c.tuple_orig, c.zone)),
                                      held.get((c.tuple_reply, c.zone))) if h is not None}
        if list(holders) == [c.key] and holders[c.key].tuple_reply == c.tuple_reply:
            unchanged += 1
            continue
        if holders:
            doomed.update(holders)
            replaced += 1
        push.append(c)
    return CommitWrites(tuple(push), tuple(doomed.values()), unchanged, replaced)
