"""Handover planner properties over random tables on S and D (hypothesis).

S's table mixes every kind of flow of guest g1 (and of g2, which must never be touched), with
random states, marks, zones and timeouts; ports come from tiny ranges so duplicates and
clashes are common. D's table mixes copies of S's flows (some aged or altered, some the
other way round, some NATed by D itself) with D's own entries. Applying a plan is simulated on
a dict keyed like the kernel, ``(tuple_orig, zone)``.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.handover.planner import (
    MIN_TIMEOUT,
    REQUIRED,
    DestKind,
    FlowKind,
    Plan,
    SourceKind,
    abort_actions,
    plan_handover,
    plan_source,
)
from orchestrator.handover.rules import Rule
from orchestrator.model.conntrack import Entry, Proto, Status, TcpFlag, TcpInfo, TcpState, Tuple
from tests.unit.test_planner import GIP, PUB, T

G, H = "10.5.5.201", "10.5.5.202"
GW = "10.5.5.254"
OUTSIDE = ["192.168.122.1", "198.51.100.7", "203.0.113.9"]
NAT = Status.SRC_NAT | Status.DST_NAT | Status.SRC_NAT_DONE | Status.DST_NAT_DONE
LIB = TcpFlag.BE_LIBERAL

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

protos = st.sampled_from([Proto.TCP, Proto.TCP, Proto.UDP, Proto.ICMP])
tags = st.sampled_from([1, 2, 3])
STATUS_BASES = [REQUIRED, REQUIRED, Status.CONFIRMED, Status.CONFIRMED | Status.SEEN_REPLY]
STATUS_EXTRAS = [Status(0)] * 6 + [Status.DYING, Status.FIXED_TIMEOUT, Status.HELPER,
                                   Status.EXPECTED]
SHAPES = ["in", "in", "snat", "snat", "remap", "elsewhere", "out", "fullnat", "leg", "east", "gw",
          "odd"]
# who, with which ports, in which zone: one draw each keeps generation fast
PICKS = st.tuples(st.sampled_from(OUTSIDE), st.sampled_from([G, G, G, H]),
                  st.integers(40000, 40003), st.sampled_from([80, 443, 22]),
                  st.sampled_from([0, 0, 0xAB00]), tags, st.sampled_from([0, 0, 0, 5]))


def tcp_info(state: TcpState, bits: int) -> TcpInfo:
    """Flags and window scales packed in one drawn integer (shrinks towards all zero)."""
    return TcpInfo(state, (bits >> 16) % 15, (bits >> 20) % 15, TcpFlag(bits & 0xFF),
                   TcpFlag((bits >> 8) & 0xFF))


def status_of(bits: int) -> Status:
    return STATUS_BASES[bits % 4] | STATUS_EXTRAS[(bits // 4) % len(STATUS_EXTRAS)]


def tup(src: str, dst: str, proto: int, sport: int, dport: int) -> Tuple:
    if proto == Proto.ICMP:
        return replace(Tuple.of(src, dst, proto, sport), icmp_type=8)
    return Tuple.of(src, dst, proto, sport, dport)


@st.composite
def entries(draw, snat_node: int) -> Entry:
    """One entry of the kinds a node hosting g1 (or g2) holds; ``snat_node`` SNATs."""
    shape, proto = draw(st.sampled_from(SHAPES)), draw(protos)
    peer, me, a, b, hi, tag, zone = draw(PICKS)
    status, mark = status_of(draw(st.integers(0, 39))), hi | tag
    if shape == "in":
        o = tup(peer, me, proto, a, b)
        r = o.reversed()
    elif shape in ("snat", "remap", "elsewhere"):
        by = tag if shape == "elsewhere" else snat_node  # "elsewhere": SNATed by another node
        o = tup(me, peer, proto, a, b)
        r = replace(o.reversed(), dst=Tuple.of(PUB[by], peer, proto).src)
        if shape == "remap":
            r = replace(r, sport=r.sport + 1) if proto == Proto.ICMP else replace(r, dport=r.dport + 1)
        status |= Status.SRC_NAT | Status.SRC_NAT_DONE
        mark = hi | snat_node
    elif shape == "out":
        o = tup(me, peer, proto, a, b)
        r = o.reversed()
    elif shape == "fullnat":
        proto = Proto.TCP
        o = tup(peer, PUB[tag], proto, a, 2201)
        r = tup(me, GIP[tag], proto, 22, a)
        status |= NAT
    elif shape == "leg":
        proto = Proto.TCP
        o = tup(GIP[tag], me, proto, a, 22)
        r = o.reversed()
    elif shape == "east":
        o = tup(me, [G, H, GIP[1], GIP[3]][tag], proto, a, b)
        r = o.reversed()
    elif shape == "gw":
        o = tup(me, GW, proto, a, 53)
        r = o.reversed()
    else:  # asymmetric tuples without NAT status
        o = tup(peer, me, proto, a, b)
        r = tup(me, OUTSIDE[0], proto, b, a)
    tcp = None
    if proto == Proto.TCP:
        tcp = tcp_info(draw(st.sampled_from(list(TcpState))), draw(st.integers(0, 1 << 24)))
    timeout = draw(st.sampled_from([0, 3, 29, 30, 120, 431999]))
    return Entry(o, r, status=status, mark=mark, timeout=timeout, zone=zone, tcp=tcp)


@st.composite
def scenarios(draw):
    src, dst = draw(st.permutations(["n1", "n2", "n3"]))[:2]
    s_tag, d_tag = T.node(src).tag, T.node(dst).tag
    on_s = draw(st.lists(entries(s_tag), max_size=12))
    # D: its own entries, plus S's flows as D might hold them already
    on_d = draw(st.lists(entries(d_tag), max_size=4))
    first = plan_handover(on_s, T, "g1", src, dst)
    for a in first.dest:
        if a.entry is None or not draw(st.booleans()):
            continue
        e = a.entry
        on_d.append(draw(st.sampled_from([
            e,
            replace(e, timeout=draw(st.integers(0, 60))),
            replace(e, mark=d_tag),
            replace(e, status=e.status | Status.DYING),
            replace(e, status=Status.CONFIRMED, tcp=replace(e.tcp, state=TcpState.SYN_SENT) if e.tcp else None),
            Entry(e.tuple_reply, e.tuple_orig, status=Status.CONFIRMED, mark=d_tag, zone=e.zone,
                  timeout=50, tcp=e.tcp),
            replace(e, tuple_reply=replace(e.tuple_reply, dst=Tuple.of(PUB[d_tag], G, 6).src),
                    status=REQUIRED | Status.SRC_NAT | Status.SRC_NAT_DONE, mark=d_tag),
        ])))
    return src, dst, on_s, on_d


def mine(e: Entry) -> bool:
    return bool(e.addresses() & set(T.guest("g1").addresses))


def apply(table: dict, p: Plan, upto: int | None = None) -> dict:
    out = dict(table)
    for a in p.dest[:upto]:
        for x in a.delete:
            out.pop(x.key, None)
        if a.writes:
            assert a.entry is not None
            out[a.entry.key] = a.entry
    return out


# --- the properties -----------------------------------------------------------------------


@PROPS
@given(scenarios())
def test_one_plan(sc):
    src, dst, on_s, on_d = sc
    p = plan_handover(on_s, T, "g1", src, dst, on_d)
    for a in p.dest:  # --hypothesis-show-statistics: every rule gets exercised
        event("/".join(r.value for r in a.rules))
    check_one_action_per_flow_of_the_guest(p, on_s, on_d)
    check_written_form(p, T.node(src).tag, T.node(dst))
    check_source_only_adds_be_liberal(p)
    assert list(p.source) == plan_source(on_s, T, "g1")  # S's half alone agrees


@PROPS
@given(scenarios(), st.data())
def test_partial_apply_then_replan_or_abort(sc, data):
    src, dst, on_s, on_d = sc
    d0 = {x.key: x for x in on_d}
    first = plan_handover(on_s, T, "g1", src, dst, on_d)
    k = data.draw(st.integers(0, len(first.dest)), label="applied")
    partial = apply(d0, first, k)
    second = plan_handover(on_s, T, "g1", src, dst, partial.values())
    # what the prefix wrote is SKIP now: no duplicate pushes
    assert all(second.dest[i].kind is DestKind.SKIP for i in range(k) if first.dest[i].writes)
    done = apply(partial, second)
    assert done == apply(d0, first)
    third = plan_handover(on_s, T, "g1", src, dst, done.values())
    assert third.done and all(a.kind is DestKind.SKIP for a in third.dest)
    check_abort(d0, done, first, second)


@PROPS
@given(scenarios(), st.data())
def test_the_handover_bit_is_what_d_used_to_strip_and_add_back(sc, data):
    """Planning with the migration's bit gives what the coordinator did before the planner
    knew it: strip the bit from S's and D's entries, plan, then set it on what the plan adds
    and on what D already held with it."""
    src, dst, on_s, on_d = sc
    bit = T.cluster.handover_bit

    def some_marked(es: list[Entry]) -> list[Entry]:
        return [replace(e, mark=e.mark | bit) if data.draw(st.booleans()) else e for e in es]

    def strip(es: list[Entry]) -> list[Entry]:
        return [replace(e, mark=e.mark & ~bit) for e in es]

    on_s = some_marked(on_s)
    on_d = list({e.key: e for e in some_marked(on_d)}.values())  # the kernel: one per key
    ours = {e.key for e in on_d if e.mark & bit}
    old = plan_handover(strip(on_s), T, "g1", src, dst, strip(on_d))
    new = plan_handover(on_s, T, "g1", src, dst, on_d, handover_bit=bit)
    assert len(old.dest) == len(new.dest)
    for was, now in zip(old.dest, new.dest, strict=True):
        assert (was.kind, was.rules, was.flow) == (now.kind, now.rules, now.flow)
        assert [x.key for x in was.delete] == [x.key for x in now.delete]
        if not was.writes:
            continue
        assert was.entry is not None
        added = was.kind in (DestKind.PUSH, DestKind.REPLACE) or was.entry.key in ours
        assert now.entry == (replace(was.entry, mark=was.entry.mark | bit) if added
                             else was.entry)


def check_one_action_per_flow_of_the_guest(p: Plan, on_s: list[Entry], on_d: list[Entry]) -> None:
    ours = [e for e in on_s if mine(e)]
    assert [a.origin for a in p.dest] == ours
    assert [a.origin for a in p.source] == ours
    assert p.ignored == len(on_s) - len(ours)
    for a in p.dest:
        assert all(mine(x) and x in on_d for x in a.delete)
        assert a.entry is None or mine(a.entry)
        assert (a.kind is DestKind.SKIP) == (not a.writes)
    d0 = {x.key: x for x in on_d}
    after = apply(d0, p)
    assert all(after.get(k) == x for k, x in d0.items() if not mine(x))


def check_written_form(p: Plan, s_tag: int, d_node) -> None:
    for a in p.dest:
        if a.entry is None:
            continue
        e, o = a.entry, a.origin
        assert e.status & REQUIRED == REQUIRED
        homecoming = e.is_src_nat  # D's own SNAT binding kept: the public address is D's
        if homecoming:
            assert e.tuple_reply.dst == d_node.pub_ip and e.mark & 0xFF == d_node.tag
        else:
            assert e.status == REQUIRED and not e.status & NAT
            assert e.tuple_reply == e.tuple_orig.reversed()
            assert e.zone == o.zone and e.timeout == max(o.timeout, MIN_TIMEOUT)
        if e.tuple_orig.proto == Proto.TCP:
            assert e.tcp is not None and e.tcp.flags_orig & e.tcp.flags_reply & LIB
            assert o.tcp is None or (e.tcp.state, e.tcp.wscale_orig, e.tcp.wscale_reply) == (
                o.tcp.state, o.tcp.wscale_orig, o.tcp.wscale_reply)
        kind = a.flow
        if kind is FlowKind.GUEST_SNAT and o.tuple_reply.dst == d_node.pub_ip:
            # D's own binding, held by S while it answered for D's address: kept whole
            assert e.tuple_orig == o.tuple_orig and e.tuple_reply == o.tuple_reply
            assert e.is_src_nat and e.mark & 0xFF == d_node.tag
            # S's other mark bits, unless D held the binding already (then D's own wins)
            assert e.mark == (o.mark & ~0xFF) | d_node.tag or Rule.D_HOMECOMING in a.rules
        elif kind is FlowKind.GUEST_SNAT:  # un-NATed, the source's tag, other bits kept
            assert e.tuple_orig == o.tuple_orig and e.tuple_reply == o.tuple_orig.reversed()
            assert e.mark == (o.mark & ~0xFF) | s_tag
        if kind in (FlowKind.INBOUND_STATELESS, FlowKind.OUTBOUND_UNNATED, FlowKind.EAST_WEST):
            # the entry node's (or SNAT owner's) mark is preserved; D's own binding keeps its
            assert e.mark == o.mark or (homecoming and e.mark & 0xFF == o.mark & 0xFF)


def check_source_only_adds_be_liberal(p: Plan) -> None:
    for a in p.source:
        assert a.kind in (SourceKind.MAKE_LIBERAL, SourceKind.KEEP)
        if a.kind is SourceKind.KEEP:
            assert a.entry is a.origin
            continue
        assert a.entry.tcp is not None
        assert replace(a.entry, tcp=a.origin.tcp) == a.origin
        before = a.origin.tcp or TcpInfo()
        assert a.entry.tcp.flags_orig == before.flags_orig | LIB
        assert a.entry.tcp.flags_reply == before.flags_reply | LIB


def check_abort(d0: dict, done: dict, first: Plan, second: Plan) -> None:
    """Abort removes what the migration added, keeps what D had (updated or not), and never
    touches another guest's entries."""
    table = dict(done)
    for a in abort_actions(first, second):
        table.pop(a.key, None)
    assert set(table) <= set(d0)
    replaced = {x.key for p in (first, second) for a in p.dest if a.kind is DestKind.REPLACE
                for x in (*a.delete, a.entry) if x is not None}
    assert set(d0) - replaced <= set(table)
    assert all(table[k] == x for k, x in d0.items() if not mine(x))
