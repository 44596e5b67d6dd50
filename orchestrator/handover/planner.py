"""The handover planner: S's conntrack entries for guest G -> what D writes, what S adjusts.

Pure: entries and the topology in, a :class:`Plan` out; no netlink, no store. DESIGN §2 is the
contract. Each action names the rules of :data:`orchestrator.handover.rules.RULES` that
decided it, so the reasons live in one table.

D's side is :func:`plan_handover`; S's side, :func:`plan_source`, needs only the
classification, so S never plans D's writes (``Plan.source`` gives both sides for reading).
A migration passes its ``handover_bit``: every entry the plan adds carries it (and entries
an earlier plan added keep it) until finalize, the bit never travels from S, and D's
entries are compared without it. A failover commit passes none: its writes are final.

Applying a plan (``handover.applier``): PUSH = add (with its NAT binding when the entry
carries SRC_NAT: a binding D takes back, SNAT_HOME_BINDING); UPDATE = set (status, mark,
timeout, TCP state and flags, written whole); REPLACE = delete every entry of ``delete`` by
key (ENOENT counts as done), then add; SKIP = nothing. MAKE_LIBERAL on S = set the TCP flags
with mask BE_LIBERAL only (never NAT attributes). Planning again with D's current entries
yields only what is left, so a partial apply is finished by re-planning, and
:func:`abort_actions` over every plan of the migration undoes it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Network

from orchestrator.config.schema import Guest, Node, Topology
from orchestrator.errors import MigrationError
from orchestrator.handover.rules import Rule, reason
from orchestrator.model.conntrack import (
    Entry,
    IPAddress,
    Key,
    Proto,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)

MIN_TIMEOUT = 30
REQUIRED = Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED
NAT = Status.SRC_NAT | Status.DST_NAT | Status.SRC_NAT_DONE | Status.DST_NAT_DONE
# bits ctnetlink's set cannot clear (EBUSY or silently kept): such an entry must be re-added
_CANNOT_SET = (
    NAT | Status.SEQ_ADJUST | Status.EXPECTED | Status.DYING | Status.TEMPLATE
    | Status.UNTRACKED | Status.OFFLOAD | Status.HW_OFFLOAD
)
# the kernel attaches helpers on its own; not a difference worth a write
_IGNORED_STATUS = Status.HELPER
# negotiated options and close bookkeeping; MAXACK_SET & co. need values that do not travel
_KEPT_TCP_FLAGS = TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM | TcpFlag.CLOSE_INIT
_OVER = frozenset({TcpState.CLOSE, TcpState.TIME_WAIT})
_U32 = 0xFFFFFFFF
_ALL_TCP_FLAGS = TcpFlag(0xFF)


class FlowKind(enum.Enum):
    FOREIGN = "foreign"  # names none of G's addresses: never touched
    INBOUND_STATELESS = "inbound-stateless"
    INBOUND_FULLNAT = "inbound-fullnat"  # the NAT binding of the entry node (S)
    GUEST_SNAT = "guest-snat"
    OUTBOUND_UNNATED = "outbound-unnated"  # SNAT flow handed over before; owner in the mark
    EAST_WEST = "east-west"
    GATEWAY_LOCAL = "gateway-local"
    UNSUPPORTED_NAT = "unsupported-nat"


class DestKind(enum.Enum):
    PUSH = "push"
    UPDATE = "update"
    REPLACE = "replace"
    SKIP = "skip"


class SourceKind(enum.Enum):
    MAKE_LIBERAL = "liberal"
    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class DestAction:
    """What D does for one of G's entries on S (``origin``).

    ``entry`` is what D ends up holding for the flow (written unless SKIP; None when D gets
    nothing); ``delete`` lists D's entries to delete first (REPLACE only); ``flow`` is the
    kind of flow ``origin`` is, seen from the node hosting G."""

    kind: DestKind
    rules: tuple[Rule, ...]
    origin: Entry
    flow: FlowKind
    entry: Entry | None = None
    delete: tuple[Entry, ...] = ()

    @property
    def reason(self) -> str:
        return reason(self.rules)

    @property
    def writes(self) -> bool:
        return self.kind is not DestKind.SKIP


@dataclass(frozen=True, slots=True)
class SourceAction:
    """What S does with its own entry ``origin``; ``entry`` is what it becomes."""

    kind: SourceKind
    rule: Rule
    origin: Entry
    entry: Entry

    @property
    def reason(self) -> str:
        return reason((self.rule,))


@dataclass(frozen=True, slots=True)
class AbortAction:
    key: Key
    entry: Entry  # what the migration wrote under that key
    rule: Rule = Rule.ABORT_PUSHED

    @property
    def reason(self) -> str:
        return reason((self.rule,))


@dataclass(frozen=True, slots=True)
class Plan:
    guest: str
    src: str
    dst: str
    dest: tuple[DestAction, ...]  # one per entry of G, in input order
    ignored: int  # entries passed in that name none of G's addresses
    min_timeout: int = MIN_TIMEOUT

    @property
    def writes(self) -> tuple[DestAction, ...]:
        return tuple(a for a in self.dest if a.writes)

    @property
    def done(self) -> bool:
        """Nothing left to write on D (re-planning after a full apply gives this)."""
        return not self.writes

    @property
    def source(self) -> tuple[SourceAction, ...]:
        """What S does with each entry (as :func:`plan_source`), computed when read."""
        return tuple(_source_action(a.origin, a.flow) for a in self.dest)


@dataclass(frozen=True, slots=True)
class _Ctx:
    addrs: frozenset[IPAddress]
    subnet: IPv4Network
    gateway: IPAddress
    src: Node
    dst: Node
    tag_mask: int
    guest_side: dict[IPAddress, Node]  # node guest-side address -> node
    min_timeout: int
    bit: int = 0  # the migration's handover bit (0: the plan's writes are final)

    @classmethod
    def of(cls, t: Topology, g: Guest, src: Node, dst: Node, min_timeout: int,
           bit: int = 0) -> _Ctx:  # fmt: skip
        return cls(
            frozenset(g.addresses), t.cluster.guest_subnet, t.cluster.gateway, src, dst,
            t.cluster.tag_mask, {n.guest_ip: n for n in t.nodes}, min_timeout, bit,
        )

    def tagged(self, mark: int, tag: int) -> int:
        """``mark`` with its tag bits naming ``tag``; the other bits are someone else's."""
        return (mark & ~self.tag_mask & _U32) | tag

    def tag_of(self, mark: int) -> int:
        return mark & self.tag_mask


# --- classification ------------------------------------------------------------------------


def _classify(e: Entry, c: _Ctx) -> FlowKind:
    if not e.addresses() & c.addrs:
        return FlowKind.FOREIGN
    o, r = e.tuple_orig, e.tuple_reply
    if e.is_dst_nat:
        # full-NAT: DNAT to the guest plus SNAT to the entry node's guest-side address
        fullnat = e.is_src_nat and r.src in c.addrs and r.dst in c.guest_side
        return FlowKind.INBOUND_FULLNAT if fullnat else FlowKind.UNSUPPORTED_NAT
    if e.is_src_nat:
        snat = o.src in c.addrs and o.dst not in c.subnet
        return FlowKind.GUEST_SNAT if snat else FlowKind.UNSUPPORTED_NAT
    if r != o.reversed():
        return FlowKind.UNSUPPORTED_NAT
    peer = o.dst if o.src in c.addrs else o.src
    if peer == c.gateway:
        return FlowKind.GATEWAY_LOCAL
    if peer in c.subnet:
        return FlowKind.EAST_WEST
    return FlowKind.OUTBOUND_UNNATED if o.src in c.addrs else FlowKind.INBOUND_STATELESS


# --- translation of one S entry into what D should hold ------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    rule: Rule
    entry: Entry | None  # None: D gets nothing


def _translate(e: Entry, kind: FlowKind, c: _Ctx) -> _Target:
    tcp = e.tuple_orig.proto == Proto.TCP
    if e.status & Status.DYING:
        return _Target(Rule.DYING, None)
    if tcp and e.tcp is not None and e.tcp.state in _OVER:
        return _Target(Rule.TCP_CLOSED, None)
    if tcp and not e.status & Status.SEEN_REPLY and e.tuple_orig.src not in c.addrs:
        return _Target(Rule.HALF_OPEN, None)
    o, r = e.tuple_orig, e.tuple_reply
    if kind is FlowKind.INBOUND_STATELESS:
        return _Target(Rule.INBOUND_COPY, _pushed(e, c, o, r, e.mark))
    if kind is FlowKind.OUTBOUND_UNNATED:
        return _Target(Rule.OUTBOUND_COPY, _pushed(e, c, o, r, e.mark))
    if kind is FlowKind.EAST_WEST:
        return _Target(Rule.EAST_WEST_COPY, _pushed(e, c, o, r, e.mark))
    if kind is FlowKind.GUEST_SNAT:
        return _translate_snat(e, c)
    if kind is FlowKind.INBOUND_FULLNAT:
        # the leg as D's bridge sees it: entry node's guest-side address <-> guest
        mark = c.tagged(e.mark, c.guest_side[r.dst].tag)
        return _Target(Rule.FULLNAT_LEG, _pushed(e, c, r.reversed(), r, mark))
    if kind is FlowKind.GATEWAY_LOCAL:
        return _Target(Rule.GATEWAY_LOCAL, None)
    return _Target(Rule.UNSUPPORTED_NAT, None)


def _translate_snat(e: Entry, c: _Ctx) -> _Target:
    o, r = e.tuple_orig, e.tuple_reply
    if r.dst == c.dst.pub_ip:
        return _Target(Rule.SNAT_HOME_BINDING, _bound(e, c))
    if r.dst != c.src.pub_ip:
        return _Target(Rule.SNAT_ELSEWHERE, None)
    if r != replace(o.reversed(), dst=r.dst):
        return _Target(Rule.SNAT_REMAPPED, None)
    return _Target(Rule.SNAT_UNNAT, _pushed(e, c, o, o.reversed(), c.tagged(e.mark, c.src.tag)))


def _pushed(e: Entry, c: _Ctx, orig: Tuple, reply: Tuple, mark: int) -> Entry:
    """The form every entry D writes takes (rules.PUSHED_FORM), marked as added by this
    migration (``_dest_action`` takes the bit off an update of D's own entry)."""
    tcp = None
    if orig.proto == Proto.TCP:
        # a kernel dump always carries protoinfo; without it, liberal ESTABLISHED is safest
        tcp = liberal(e.tcp or TcpInfo(), keep=_KEPT_TCP_FLAGS)
    return Entry(
        tuple_orig=orig,
        tuple_reply=reply,
        status=REQUIRED,
        mark=mark | c.bit,
        timeout=max(e.timeout, c.min_timeout),
        zone=e.zone,
        tcp=tcp,
    )


def _bound(e: Entry, c: _Ctx) -> Entry:
    """The pushed form, but with S's binding kept (D's own SNAT, written back whole)."""
    pushed = _pushed(e, c, e.tuple_orig, e.tuple_reply, c.tagged(e.mark, c.dst.tag))
    return replace(pushed, status=REQUIRED | Status.SRC_NAT | Status.SRC_NAT_DONE)


def liberal(tcp: TcpInfo, keep: TcpFlag = _ALL_TCP_FLAGS) -> TcpInfo:
    """``tcp`` with BE_LIBERAL in both directions, other flags filtered by ``keep``."""
    return replace(
        tcp,
        flags_orig=(tcp.flags_orig & keep) | TcpFlag.BE_LIBERAL,
        flags_reply=(tcp.flags_reply & keep) | TcpFlag.BE_LIBERAL,
    )


# --- meeting D's table -------------------------------------------------------------------------


_Resolution = tuple[DestKind, Rule, Entry | None, tuple[Entry, ...]]


class _DestTable:
    """D's entries for G, found by key and by either tuple (the kernel refuses an add whose
    orig *or* reply tuple is already hashed)."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.by_key: dict[Key, Entry] = {}
        self.by_tuple: dict[Key, list[Entry]] = {}
        for x in entries:
            self.by_key[x.key] = x
        for x in self.by_key.values():
            for t in (x.tuple_orig, x.tuple_reply):
                self.by_tuple.setdefault((t, x.zone), []).append(x)

    def clashes(self, e: Entry) -> list[Entry]:
        found = {x.key: x for t in _tuples(e) for x in self.by_tuple.get(t, [])}
        return list(found.values())


def _tuples(e: Entry) -> tuple[Key, Key]:
    return (e.tuple_orig, e.zone), (e.tuple_reply, e.zone)


def _resolve(t: Entry, d: _DestTable, c: _Ctx) -> _Resolution:
    same = d.by_key.get(t.key)
    clashes = d.clashes(t)
    if c.tag_of(t.mark) == c.dst.tag:
        home = _homecoming(t, same, clashes, c)
        if home is not None:
            return home
    if not clashes:
        return DestKind.PUSH, Rule.D_ABSENT, t, ()
    if clashes == [same] and same is not None and _settable(same, t):
        if _satisfies(same, t, c):
            return DestKind.SKIP, Rule.D_SAME, t, ()
        return DestKind.UPDATE, Rule.D_DIFFERS, t, ()
    return DestKind.REPLACE, Rule.D_CLASH, t, tuple(clashes)


def _homecoming(t: Entry, same: Entry | None, clashes: list[Entry], c: _Ctx) -> _Resolution | None:
    """The flow's public address is D's: D's own NAT binding for it wins over our copy."""
    if same is not None and _snat_by(same, c.dst, c):
        merged = replace(same, status=same.status | REQUIRED, timeout=t.timeout, tcp=t.tcp)
        if _satisfies(same, merged, c):
            return DestKind.SKIP, Rule.D_HOMECOMING, merged, ()
        return DestKind.UPDATE, Rule.D_HOMECOMING, merged, ()
    if any(x.is_dst_nat and x.tuple_reply == t.tuple_reply for x in clashes):
        return DestKind.SKIP, Rule.D_OWNS_NAT, None, ()
    return None


def _snat_by(x: Entry, node: Node, c: _Ctx) -> bool:
    """``x`` is ``node``'s SNAT binding of a guest-initiated flow."""
    return (
        x.is_src_nat
        and not x.is_dst_nat
        and x.tuple_orig.src in c.addrs
        and x.tuple_reply.dst == node.pub_ip
    )


def _settable(x: Entry, t: Entry) -> bool:
    return x.tuple_reply == t.tuple_reply and not x.status & _CANNOT_SET


def _satisfies(x: Entry, t: Entry, c: _Ctx) -> bool:
    """D's ``x`` already does what ``t`` would: same tuples, mark (the handover bit aside),
    status and TCP state, flags at least ``t``'s, and enough time left to survive the
    cutover."""
    return (
        x.key == t.key
        and x.tuple_reply == t.tuple_reply
        and (x.mark ^ t.mark) & ~c.bit == 0
        and x.status & ~_IGNORED_STATUS == t.status & ~_IGNORED_STATUS
        and _tcp_satisfies(x.tcp, t.tcp)
        and x.timeout >= min(t.timeout, c.min_timeout)
    )


def _tcp_satisfies(x: TcpInfo | None, t: TcpInfo | None) -> bool:
    if x is None or t is None:
        return x is t
    return (
        (x.state, x.wscale_orig, x.wscale_reply) == (t.state, t.wscale_orig, t.wscale_reply)
        and t.flags_orig & ~x.flags_orig == 0
        and t.flags_reply & ~x.flags_reply == 0
    )


# --- S's side --------------------------------------------------------------------------------


def _source_action(e: Entry, kind: FlowKind) -> SourceAction:
    ending = e.status & Status.DYING or (e.tcp is not None and e.tcp.state in _OVER)
    if ending:
        return SourceAction(SourceKind.KEEP, Rule.S_ENDING, e, e)
    if e.tuple_orig.proto == Proto.TCP:
        tcp = e.tcp or TcpInfo()
        done = tcp.flags_orig & tcp.flags_reply & TcpFlag.BE_LIBERAL
        if not done:
            made = replace(e, tcp=liberal(tcp))
            return SourceAction(SourceKind.MAKE_LIBERAL, Rule.S_LIBERAL, e, made)
    rule = Rule.S_KEEP_SNAT if kind is FlowKind.GUEST_SNAT else Rule.S_KEEP
    return SourceAction(SourceKind.KEEP, rule, e, e)


# --- the plan ----------------------------------------------------------------------------------


def plan_handover(
    entries: Iterable[Entry],
    topology: Topology,
    guest: str | Guest,
    src: str | Node,
    dst: str | Node,
    dest_existing: Iterable[Entry] | None = None,
    *,
    min_timeout: int = MIN_TIMEOUT,
    handover_bit: int = 0,
) -> Plan:
    """Plan what D writes to take ``guest``'s flows over from ``src``.

    ``entries``: S's dump (anything not naming G is ignored). ``dest_existing``: D's current
    entries (only G's are looked at); without it every translated entry is a PUSH.
    ``handover_bit``: the migration's bit (module docstring); 0 for a final write. One dest
    action per entry of G, in input order."""
    g = _guest(topology, guest)
    s, d = _node(topology, src), _node(topology, dst)
    if s.name == d.name:
        raise MigrationError(f"guest {g.name}: source and destination are both {s.name}")
    c = _Ctx.of(topology, g, s, d, min_timeout, handover_bit)
    table = _DestTable(x for x in dest_existing or () if x.addresses() & c.addrs)
    dest: list[DestAction] = []
    claimed: set[Key] = set()
    ignored = 0
    for e in entries:
        kind = _classify(e, c)
        if kind is FlowKind.FOREIGN:
            ignored += 1
            continue
        dest.append(_dest_action(e, kind, c, table, claimed))
    return Plan(g.name, s.name, d.name, tuple(dest), ignored, min_timeout)


def plan_source(entries: Iterable[Entry], topology: Topology,
                guest: str | Guest) -> list[SourceAction]:  # fmt: skip
    """What S does with each of its entries naming ``guest`` (make it liberal, or keep it);
    S needs nothing of D's side for that."""
    g = _guest(topology, guest)
    node = topology.nodes[0]  # classification does not depend on S or D
    c = _Ctx.of(topology, g, node, node, MIN_TIMEOUT)
    return [_source_action(e, kind) for e in entries
            if (kind := _classify(e, c)) is not FlowKind.FOREIGN]


def _dest_action(
    e: Entry, kind: FlowKind, c: _Ctx, table: _DestTable, claimed: set[Key]
) -> DestAction:
    target = _translate(e, kind, c)
    if target.entry is None:
        return DestAction(DestKind.SKIP, (target.rule,), e, kind)
    tuples = _tuples(target.entry)
    if claimed.intersection(tuples):
        return DestAction(DestKind.SKIP, (target.rule, Rule.DUPLICATE), e, kind)
    claimed.update(tuples)
    kind_, rule, written, delete = _resolve(target.entry, table, c)
    if written is not None and c.bit and kind_ in (DestKind.UPDATE, DestKind.SKIP):
        written = _marked_as_held(written, table.by_key.get(written.key), c.bit)
    return DestAction(kind_, (target.rule, rule), e, kind, written, delete)


def _marked_as_held(written: Entry, held: Entry | None, bit: int) -> Entry:
    """An update keeps the bit of what D holds: set on what a migration added, off on D's
    own entries (an abort must not take those)."""
    want = written.mark | bit if held is not None and held.mark & bit else written.mark & ~bit
    return written if want == written.mark else replace(written, mark=want)


def dest_key(
    entry: Entry, topology: Topology, guest: str | Guest, src: str | Node, dst: str | Node
) -> Key | None:
    """Where D holds S's ``entry`` once handed over (None: D gets nothing). For precopy's
    DESTROY events: D deletes that key (ENOENT counts as done)."""
    g, s, d = _guest(topology, guest), _node(topology, src), _node(topology, dst)
    c = _Ctx.of(topology, g, s, d, MIN_TIMEOUT)
    kind = _classify(entry, c)
    if kind is FlowKind.FOREIGN:
        return None
    # a DESTROY event may carry DYING or a closed state: translate the live flow it was
    alive = replace(entry, status=entry.status & ~Status.DYING | Status.SEEN_REPLY, tcp=None)
    target = _translate(alive, kind, c).entry
    return None if target is None else target.key


def abort_actions(*plans: Plan) -> list[AbortAction]:
    """What D deletes to undo a migration: every key any of its plans added (PUSH, or the add
    of a REPLACE). Pass every plan of the migration: a re-plan sees earlier pushes as D's and
    SKIPs them. Updated entries stay; entries a REPLACE deleted are not restored (ABORT_PUSHED)."""
    out: dict[Key, AbortAction] = {}
    for plan in plans:
        for a in plan.dest:
            if a.kind in (DestKind.PUSH, DestKind.REPLACE) and a.entry is not None:
                out.setdefault(a.entry.key, AbortAction(a.entry.key, a.entry))
    return list(out.values())


def _guest(t: Topology, guest: str | Guest) -> Guest:
    if isinstance(guest, Guest):
        return guest
    try:
        return t.guest(guest)
    except KeyError:
        raise MigrationError(f"unknown guest {guest!r}") from None


def _node(t: Topology, node: str | Node) -> Node:
    if isinstance(node, Node):
        return node
    try:
        return t.node(node)
    except KeyError:
        raise MigrationError(f"unknown node {node!r}") from None
