"""Handover planner on concrete, seed-like entries: exact outputs per DESIGN §2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config.loader import load
from orchestrator.config.schema import Topology
from orchestrator.errors import MigrationError
from orchestrator.handover.explain import render_abort, render_plan
from orchestrator.handover.planner import (
    MIN_TIMEOUT,
    DestKind,
    FlowKind,
    Plan,
    SourceKind,
    abort_actions,
    dest_key,
    plan_handover,
    plan_source,
)
from orchestrator.handover.rules import RULES, Rule
from orchestrator.model.conntrack import Entry, Proto, Status, TcpFlag, TcpInfo, TcpState, Tuple

ROOT = Path(__file__).resolve().parents[2]

S = Status
TCP, UDP, ICMP = Proto.TCP, Proto.UDP, Proto.ICMP
REQ = S.SEEN_REPLY | S.ASSURED | S.CONFIRMED
LIVE = REQ  # what a live, answered entry on S carries
SNAT_BITS = S.SRC_NAT | S.SRC_NAT_DONE | S.DST_NAT_DONE
WS = TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM
LIB = TcpFlag.BE_LIBERAL

G = "10.5.5.201"
H = "10.5.5.202"  # another guest
CLIENT = "192.168.122.1"
PEER = "198.51.100.7"
PUB = {1: "192.168.122.11", 2: "192.168.122.12", 3: "192.168.122.13"}
GIP = {1: "10.5.5.251", 2: "10.5.5.252", 3: "10.5.5.253"}


def topo() -> Topology:
    nodes = [
        {"name": f"n{i}", "tag": i, "mac_prefix": f"0{a}:00:00", "pub_ip": PUB[i],
         "guest_ip": GIP[i], "pipes": ["pipe0"]}
        for i, a in ((1, "a"), (2, "e"), (3, "2"))
    ]
    return Topology.model_validate({
        "cluster": {"name": "lab", "guest_subnet": "10.5.5.0/24", "gateway": "10.5.5.254"},
        "nodes": nodes,
        "guests": [
            {"name": "g1", "macs": ["52:54:00:00:02:01"], "addresses": [G]},
            {"name": "g2", "macs": ["52:54:00:00:02:02"], "addresses": [H]},
        ],
    })


T = topo()


def tcp(state: TcpState = TcpState.ESTABLISHED, flags: TcpFlag = WS, wscale: int = 7) -> TcpInfo:
    return TcpInfo(state, wscale, wscale, flags, flags)


def flow(src: str, sport: int, dst: str, dport: int, proto: int = TCP, **kw) -> Entry:
    """A non-NAT entry: reply is the original reversed."""
    o = Tuple.of(src, dst, proto, sport, dport)
    kw.setdefault("status", LIVE)
    kw.setdefault("timeout", 431990 if proto == TCP else 120)
    if proto == TCP:
        kw.setdefault("tcp", tcp())
    return Entry(o, o.reversed(), **kw)


def snat(sport: int = 40000, node: int = 1, proto: int = TCP, rport: int | None = None, **kw) -> Entry:
    """Guest-initiated flow SNATed by ``node``: G:sport -> PEER:443, reply to the node's pub."""
    o = Tuple.of(G, PEER, proto, sport, 443 if proto != ICMP else 0)
    r = replace(o.reversed(), dst=Tuple.of(PUB[node], PEER, proto).src)
    if rport is not None:
        r = replace(r, dport=rport)
    kw.setdefault("status", LIVE | SNAT_BITS)
    kw.setdefault("mark", node)
    kw.setdefault("timeout", 431990 if proto == TCP else 120)
    if proto == TCP:
        kw.setdefault("tcp", tcp())
    return Entry(o, r, **kw)


def icmp_echo(src: str, dst: str, ident: int) -> Tuple:
    return replace(Tuple.of(src, dst, ICMP, ident), icmp_type=8)


def plan(entries, dest_existing=None, src="n1", dst="n2", **kw) -> Plan:
    return plan_handover(entries, T, "g1", src, dst, dest_existing, **kw)


def only(p: Plan):
    assert len(p.dest) == 1 and len(p.source) == 1, render_plan(p)
    return p.dest[0], p.source[0]


# --- the seed's flows, exact output -------------------------------------------------------


def test_snat_flow_is_pushed_unnated_with_the_source_tag():
    e = snat(mark=0xAB00 | 1, tcp=tcp(flags=WS | TcpFlag.DATA_UNACKNOWLEDGED | TcpFlag.MAXACK_SET))
    d, s = only(plan([e]))
    assert d.kind is DestKind.PUSH
    assert d.rules == (Rule.SNAT_UNNAT, Rule.D_ABSENT)
    assert d.entry == Entry(
        Tuple.of(G, PEER, TCP, 40000, 443),
        Tuple.of(PEER, G, TCP, 443, 40000),
        status=REQ,
        mark=0xAB01,
        timeout=431990,
        tcp=TcpInfo(TcpState.ESTABLISHED, 7, 7, WS | LIB, WS | LIB),
    )
    assert s.kind is SourceKind.MAKE_LIBERAL and s.rule is Rule.S_LIBERAL
    assert s.entry == replace(e, tcp=TcpInfo(TcpState.ESTABLISHED, 7, 7,
                                             WS | TcpFlag.DATA_UNACKNOWLEDGED | TcpFlag.MAXACK_SET | LIB,
                                             WS | TcpFlag.DATA_UNACKNOWLEDGED | TcpFlag.MAXACK_SET | LIB))


def test_snat_mark_tag_is_forced_to_the_source_even_if_the_entry_says_otherwise():
    d, _ = only(plan([snat(mark=0x7700)]))
    assert d.entry is not None and d.entry.mark == 0x7701


def test_inbound_flows_keep_the_entry_nodes_mark():
    entries = [flow(CLIENT, 51000 + k, G, 80, mark=0x100 | k) for k in (1, 2, 3)]
    p = plan(entries)
    assert [a.kind for a in p.dest] == [DestKind.PUSH] * 3
    for e, a in zip(entries, p.dest, strict=True):
        assert a.rules == (Rule.INBOUND_COPY, Rule.D_ABSENT)
        assert a.entry == replace(e, status=REQ, tcp=tcp(flags=WS | LIB))


def test_status_is_normalised_and_nat_dying_bits_never_pushed():
    e = flow(CLIENT, 51000, G, 80, mark=3, status=LIVE | S.FIXED_TIMEOUT | S.HELPER | S.SEQ_ADJUST)
    d, _ = only(plan([e]))
    assert d.entry is not None and d.entry.status == REQ


def test_udp_inbound_via_destination_updates_ds_unreplied_entry():
    e = flow(CLIENT, 40123, G, 123, UDP, mark=2, timeout=170)
    on_d = flow(CLIENT, 40123, G, 123, UDP, mark=2, timeout=20, status=S.CONFIRMED)
    d, _ = only(plan([e], [on_d]))
    assert d.kind is DestKind.UPDATE and d.rules == (Rule.INBOUND_COPY, Rule.D_DIFFERS)
    assert d.entry == replace(e, status=REQ)


def test_icmp_snat_gets_un_natted_and_a_timeout_floor():
    o = icmp_echo(G, PEER, 77)
    r = replace(Tuple.of(PEER, PUB[1], ICMP, 77), icmp_type=0)
    e = Entry(o, r, status=LIVE | SNAT_BITS, mark=1, timeout=4)
    d, s = only(plan([e]))
    assert d.kind is DestKind.PUSH
    assert d.entry == Entry(o, replace(Tuple.of(PEER, G, ICMP, 77), icmp_type=0), status=REQ,
                            mark=1, timeout=MIN_TIMEOUT)
    assert s.kind is SourceKind.KEEP and s.rule is Rule.S_KEEP_SNAT


def test_timeout_floor_is_a_parameter():
    d, _ = only(plan([flow(CLIENT, 1, G, 123, UDP, mark=1, timeout=3)], min_timeout=90))
    assert d.entry is not None and d.entry.timeout == 90


def test_zone_is_kept():
    e = snat(zone=7)
    d, _ = only(plan([e]))
    assert d.entry is not None and d.entry.zone == 7 and d.entry.key == (e.tuple_orig, 7)


# --- skips -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        (flow(CLIENT, 1, G, 80, mark=1, status=LIVE | S.DYING), Rule.DYING),
        (flow(CLIENT, 1, G, 80, mark=1, tcp=tcp(TcpState.TIME_WAIT)), Rule.TCP_CLOSED),
        (snat(tcp=tcp(TcpState.CLOSE)), Rule.TCP_CLOSED),
        (flow(CLIENT, 1, G, 80, mark=3, status=S.CONFIRMED, tcp=tcp(TcpState.SYN_SENT)), Rule.HALF_OPEN),
        (snat(rport=40001), Rule.SNAT_REMAPPED),
        (snat(node=3, mark=1), Rule.SNAT_ELSEWHERE),
        (flow(G, 33000, "10.5.5.254", 53, UDP), Rule.GATEWAY_LOCAL),
        (Entry(Tuple.of(CLIENT, G, TCP, 1, 80), Tuple.of(G, "203.0.113.9", TCP, 80, 1), status=LIVE,
               tcp=tcp()), Rule.UNSUPPORTED_NAT),
    ],
    ids=lambda v: v.value if isinstance(v, Rule) else "",
)
def test_skipped_flows(entry, rule):
    d, s = only(plan([entry]))
    assert d.kind is DestKind.SKIP and d.rules == (rule,) and d.entry is None
    assert s.kind in (SourceKind.KEEP, SourceKind.MAKE_LIBERAL)


def test_guest_initiated_half_open_syn_is_pushed():
    # G waits for the SYN-ACK that comes back via S; its ACK must leave D spoofed as S
    e = snat(status=S.CONFIRMED | SNAT_BITS, tcp=tcp(TcpState.SYN_SENT))
    d, _ = only(plan([e]))
    assert d.kind is DestKind.PUSH and d.entry is not None
    assert d.entry.tcp == tcp(TcpState.SYN_SENT, flags=WS | LIB) and d.entry.status == REQ


def test_foreign_entries_are_ignored_even_when_passed():
    h_snat = replace(snat(), tuple_orig=Tuple.of(H, PEER, TCP, 40000, 443))
    other = [flow(CLIENT, 1, H, 80, mark=1), h_snat]
    p = plan(other, dest_existing=[flow(CLIENT, 9, H, 80, mark=2)])
    assert p.dest == () and p.source == () and p.ignored == 2
    assert plan_source(other, T, "g1") == []


def test_duplicate_entries_in_a_dump_get_one_push():
    e = snat()
    p = plan([e, e])
    assert [a.kind for a in p.dest] == [DestKind.PUSH, DestKind.SKIP]
    assert p.dest[1].rules == (Rule.SNAT_UNNAT, Rule.DUPLICATE)


# --- full-NAT and east-west -----------------------------------------------------------------


def fullnat(node: int, cport: int = 52000) -> Entry:
    o = Tuple.of(CLIENT, PUB[node], TCP, cport, 2201)
    r = Tuple.of(G, GIP[node], TCP, 22, cport)
    return Entry(o, r, status=LIVE | S.SRC_NAT | S.DST_NAT | S.SRC_NAT_DONE | S.DST_NAT_DONE,
                 timeout=431990, tcp=tcp())


def test_fullnat_through_the_source_pushes_the_bridged_leg():
    d, s = only(plan([fullnat(1)]))
    assert d.kind is DestKind.PUSH and d.rules == (Rule.FULLNAT_LEG, Rule.D_ABSENT)
    assert d.entry == Entry(Tuple.of(GIP[1], G, TCP, 52000, 22), Tuple.of(G, GIP[1], TCP, 22, 52000),
                            status=REQ, mark=1, timeout=431990, tcp=tcp(flags=WS | LIB))
    assert s.kind is SourceKind.MAKE_LIBERAL


def test_fullnat_leg_of_another_entry_node_is_copied():
    leg = flow(GIP[3], 52000, G, 22, mark=3)
    d, _ = only(plan([leg]))
    assert d.kind is DestKind.PUSH and d.rules == (Rule.EAST_WEST_COPY, Rule.D_ABSENT)
    assert d.entry == replace(leg, status=REQ, tcp=tcp(flags=WS | LIB))


def test_fullnat_leg_of_the_destination_defers_to_ds_binding():
    leg = flow(GIP[2], 52000, G, 22, mark=2)  # on S: bridged from D, D is the entry node
    d, _ = only(plan([leg], dest_existing=[fullnat(2)]))
    assert d.kind is DestKind.SKIP and d.rules == (Rule.EAST_WEST_COPY, Rule.D_OWNS_NAT)


def test_east_west_to_another_guest_is_copied_with_its_mark():
    e = flow(G, 41000, H, 5432, mark=0)
    d, _ = only(plan([e]))
    assert d.flow is FlowKind.EAST_WEST
    assert d.entry == replace(e, status=REQ, tcp=tcp(flags=WS | LIB))


# --- conflicts on D -----------------------------------------------------------------------------


def test_identical_entry_on_d_is_skipped_and_fresh_enough_timeouts_count_as_identical():
    e = flow(CLIENT, 51000, G, 80, mark=3)
    pushed = plan([e]).dest[0].entry
    assert pushed is not None
    assert plan([e], [pushed]).dest[0].kind is DestKind.SKIP
    aged = replace(pushed, timeout=MIN_TIMEOUT)
    assert plan([e], [aged]).dest[0].rules == (Rule.INBOUND_COPY, Rule.D_SAME)
    expiring = replace(pushed, timeout=MIN_TIMEOUT - 1)
    assert plan([e], [expiring]).dest[0].kind is DestKind.UPDATE


def test_d_with_extra_tcp_flags_is_still_the_same():
    e = flow(CLIENT, 51000, G, 80, mark=3)
    pushed = plan([e]).dest[0].entry
    assert pushed is not None and pushed.tcp is not None
    tracked = replace(pushed, tcp=replace(pushed.tcp, flags_orig=pushed.tcp.flags_orig | TcpFlag.MAXACK_SET))
    assert plan([e], [tracked]).dest[0].kind is DestKind.SKIP


def test_ds_own_snat_of_a_racing_packet_is_replaced():
    e = snat(node=1)
    racing = snat(node=2)  # D SNATed the guest's packet to its own address
    d, _ = only(plan([e], [racing]))
    assert d.kind is DestKind.REPLACE and d.rules == (Rule.SNAT_UNNAT, Rule.D_CLASH)
    assert d.delete == (racing,)
    assert d.entry is not None and d.entry.tuple_reply == Tuple.of(PEER, G, TCP, 443, 40000)


def test_a_migration_marks_what_it_adds_and_only_that():
    bit = T.cluster.handover_bit
    added = snat(node=1, mark=1 | bit)  # S still carries an earlier handover's bit
    inbound = flow(CLIENT, 50000, G, 80, mark=2)
    ds_own = flow(CLIENT, 50000, G, 80, mark=2, status=S.CONFIRMED, timeout=20)  # via D
    p = plan([added, inbound], [ds_own], handover_bit=bit)
    assert [a.kind for a in p.dest] == [DestKind.PUSH, DestKind.UPDATE]
    assert p.dest[0].entry is not None and p.dest[0].entry.mark == 1 | bit
    assert p.dest[1].entry is not None and p.dest[1].entry.mark == 2  # D's own: no bit
    held = [p.dest[0].entry, p.dest[1].entry]
    assert plan([added, inbound], held, handover_bit=bit).done  # the bit is no difference


def test_d_entry_the_other_way_round_is_replaced():
    e = snat(node=1)
    picked_up = flow(PEER, 443, G, 40000, mark=1, status=S.CONFIRMED)  # D saw S's bridged reply first
    d, _ = only(plan([e], [picked_up]))
    assert d.kind is DestKind.REPLACE and d.delete == (picked_up,)


def test_d_syn_sent_entry_of_an_inbound_flow_via_d_is_updated():
    # the "dies 120 s later" case: D, the entry node, only saw the client's side
    e = flow(CLIENT, 51000, G, 80, mark=2)
    on_d = flow(CLIENT, 51000, G, 80, mark=2, status=S.CONFIRMED, timeout=100,
                tcp=tcp(TcpState.SYN_SENT, flags=WS))
    d, _ = only(plan([e], [on_d]))
    assert d.kind is DestKind.UPDATE and d.entry == replace(e, status=REQ, tcp=tcp(flags=WS | LIB))


def test_dying_entry_on_d_is_replaced():
    e = flow(CLIENT, 51000, G, 80, mark=3)
    pushed = plan([e]).dest[0].entry
    assert pushed is not None
    dying = replace(pushed, status=pushed.status | S.DYING)
    assert plan([e], [dying]).dest[0].kind is DestKind.REPLACE


def test_homecoming_keeps_ds_snat_binding_and_refreshes_it():
    # G left D earlier (D kept its SNAT binding); S holds the un-NATed copy with D's tag
    back = flow(G, 40000, PEER, 443, mark=2, tcp=tcp(TcpState.FIN_WAIT))
    on_d = snat(node=2, tcp=tcp(TcpState.ESTABLISHED), timeout=400000)
    d, _ = only(plan([back], [on_d]))
    assert d.flow is FlowKind.OUTBOUND_UNNATED
    assert d.kind is DestKind.UPDATE and d.rules == (Rule.OUTBOUND_COPY, Rule.D_HOMECOMING)
    assert d.entry == replace(on_d, timeout=431990, tcp=tcp(TcpState.FIN_WAIT, flags=WS | LIB))
    again = plan([back], [d.entry])
    assert again.dest[0].kind is DestKind.SKIP and again.done


# --- the source side -------------------------------------------------------------------------


def test_source_never_deletes_and_keeps_what_needs_no_change():
    liberal_already = flow(CLIENT, 2, G, 80, mark=1, tcp=tcp(flags=WS | LIB))
    entries = [snat(), snat(proto=UDP), liberal_already,
               flow(CLIENT, 3, G, 80, mark=1, status=LIVE | S.DYING)]
    p = plan(entries)
    assert [(a.kind, a.rule) for a in p.source] == [
        (SourceKind.MAKE_LIBERAL, Rule.S_LIBERAL),
        (SourceKind.KEEP, Rule.S_KEEP_SNAT),
        (SourceKind.KEEP, Rule.S_KEEP),
        (SourceKind.KEEP, Rule.S_ENDING),
    ]
    assert all(a.origin is e for a, e in zip(p.source, entries, strict=True))
    assert p.source[1].entry is entries[1]


# --- re-planning and abort ----------------------------------------------------------------


def apply(table: dict, p: Plan, upto: int | None = None) -> dict:
    out = dict(table)
    for a in p.dest[:upto]:
        for x in a.delete:
            out.pop(x.key, None)
        if a.writes:
            assert a.entry is not None
            out[a.entry.key] = a.entry
    return out


def mixed() -> tuple[list[Entry], list[Entry]]:
    on_s = [snat(), flow(CLIENT, 51000, G, 80, mark=2), flow(CLIENT, 51001, G, 80, mark=3),
            fullnat(1), snat(40002, proto=UDP), flow(CLIENT, 9, H, 80, mark=1)]
    on_d = [flow(CLIENT, 51000, G, 80, mark=2, status=S.CONFIRMED, tcp=tcp(TcpState.SYN_SENT)),
            snat(40002, node=2, proto=UDP), flow(CLIENT, 7, H, 80, mark=2)]
    return on_s, on_d


def test_replanning_after_a_partial_apply_finishes_the_job():
    on_s, on_d = mixed()
    d0 = {x.key: x for x in on_d}
    first = plan(on_s, on_d)
    assert [a.kind for a in first.dest] == [DestKind.PUSH, DestKind.UPDATE, DestKind.PUSH,
                                            DestKind.PUSH, DestKind.REPLACE]
    full = apply(d0, first)
    partial = apply(d0, first, 2)
    second = plan(on_s, partial.values())
    assert [a.kind for a in second.dest][:2] == [DestKind.SKIP, DestKind.SKIP]
    assert apply(partial, second) == full
    assert plan(on_s, full.values()).done


def test_abort_removes_pushes_but_not_what_d_had():
    on_s, on_d = mixed()
    d0 = {x.key: x for x in on_d}
    first = plan(on_s, on_d)
    partial = apply(d0, first, 3)
    second = plan(on_s, partial.values())
    done = apply(partial, second)
    undo = abort_actions(first, second)
    after = {k: v for k, v in done.items() if k not in {a.key for a in undo}}
    assert set(after) == {on_d[0].key, on_d[2].key}  # the updated one and g2's stay
    assert after[on_d[2].key] == on_d[2]
    text = render_abort(undo)
    assert "abort-pushed" in text and RULES[Rule.ABORT_PUSHED] in text


# --- explain, errors, config -----------------------------------------------------------------


def test_explain_names_every_used_rule_once():
    on_s, on_d = mixed()
    text = render_plan(plan(on_s, on_d))
    assert text.splitlines()[0].startswith("handover g1: n1 -> n2: 5 entries of the guest, 1 others")
    legend = text.split("\nrules:\n")[1]
    for rule in (Rule.SNAT_UNNAT, Rule.INBOUND_COPY, Rule.FULLNAT_LEG, Rule.D_CLASH, Rule.S_LIBERAL):
        assert legend.count(f"  {rule.value} ") == 1
        assert RULES[rule] in legend
    assert Rule.HALF_OPEN.value not in text
    assert "(written form)" in text
    assert "delete " in text  # the REPLACE shows what it deletes


def test_every_rule_has_a_reason():
    assert set(RULES) == set(Rule) and all(RULES.values())


def test_errors_are_readable():
    with pytest.raises(MigrationError, match="both n1"):
        plan([], src="n1", dst="n1")
    with pytest.raises(MigrationError, match="unknown node 'n9'"):
        plan([], dst="n9")
    with pytest.raises(MigrationError, match="unknown guest"):
        plan_handover([], T, "nope", "n1", "n2")


def test_seed_config_plans_node1_to_node2():
    t = load(ROOT / "examples" / "seed-2node.toml")
    e = snat()
    p = plan_handover([e], t, "guest1", "node1", "node2")
    assert p.dest[0].entry is not None and p.dest[0].entry.mark == 1
    assert p.dest[0].entry.tuple_reply == Tuple.of(PEER, G, TCP, 443, 40000)


def test_dest_key_follows_the_translation_for_destroy_events():
    e = snat(status=LIVE | SNAT_BITS | S.DYING, tcp=tcp(TcpState.CLOSE))
    assert dest_key(e, T, "g1", "n1", "n2") == (e.tuple_orig, 0)
    leg = dest_key(fullnat(1), T, "g1", "n1", "n2")
    assert leg == (Tuple.of(GIP[1], G, TCP, 52000, 22), 0)
    assert dest_key(snat(rport=1), T, "g1", "n1", "n2") is None
    assert dest_key(flow(CLIENT, 1, H, 80), T, "g1", "n1", "n2") is None
