"""Failover planning (pure): which address is adopted at which epoch, which of the dead
node's cached entries are committed in which form, which guests are lost, what is refused;
and the adoption state each node derives from the public-address records."""

from __future__ import annotations

import time
from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from orchestrator.failover.adopt import desired_adoption
from orchestrator.failover.plan import CommitWrites, FailoverRefused, commit_writes, plan_failover
from orchestrator.model.conntrack import Entry, Status, TcpFlag, TcpState
from orchestrator.netfilter.ctnetlink import (
    CTA_NAT_SRC,
    CTA_TUPLE_REPLY,
    encode_create_snat,
)
from orchestrator.store.base import Liveness, Ownership, PublicAddress, Snapshot
from tests.unit.test_planner import PEER, PUB, SNAT_BITS, G, H, T, flow, snat

NOW = time.time()
ALIVE = {n: Liveness(n, True, 10, 8) for n in ("n1", "n2", "n3")}
N1_DEAD = {**ALIVE, "n1": Liveness("n1", False, 10, 0)}


def own(ip: str, node: str | None, guest: str, epoch: int = 3) -> Ownership:
    return Ownership(IPv4Address(ip), node, guest, epoch, NOW)


def pub(node: str, holder: str, epoch: int = 1) -> PublicAddress:
    return PublicAddress(node, IPv4Address(PUB[int(node[1])]), holder, epoch, NOW)


def snap(*owners: Ownership, public: tuple[PublicAddress, ...] | None = None) -> Snapshot:
    records = public if public is not None else tuple(pub(f"n{i}", f"n{i}") for i in (1, 2, 3))
    return Snapshot(7, owners, (), (), records)


# g1 (G) migrated n1 -> n2 and kept its SNAT flows anchored at n1; g2 (H) ran on n1
SNAP = snap(own(G, "n2", "g1"), own(H, "n1", "g2", 5))
G_VIA_N1 = snat(40000, node=1)
G_VIA_N2 = snat(40001, node=2)  # anchored at n2: not n1's to give
H_VIA_N1 = replace(snat(40002, node=1), tuple_orig=replace(snat(40002).tuple_orig,
                                                           src=IPv4Address(H)))
INBOUND = flow("192.168.122.1", 50000, G, 22, mark=1)  # stateless: nothing to commit
CACHE = [G_VIA_N1, G_VIA_N2, H_VIA_N1, INBOUND]


def test_plan_adopts_the_address_commits_its_snat_flows_and_loses_its_guests() -> None:
    p = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", CACHE)
    assert (p.dead, p.survivor, str(p.pub_ip), p.tag, p.adopt_epoch) == (
        "n1", "n3", PUB[1], 1, 1)
    assert p.mac == T.node("n1").bridge_mac
    assert [e.tuple_orig for e in p.commit] == [G_VIA_N1.tuple_orig]
    (e,) = p.commit
    assert e.tuple_reply == G_VIA_N1.tuple_reply  # the binding: reply to n1's address kept
    assert e.mark & 0xFF == 1 and e.status & Status.SRC_NAT
    assert e.status & (Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED)
    assert e.tcp is not None and e.tcp.flags_orig & e.tcp.flags_reply & TcpFlag.BE_LIBERAL
    assert p.flows == {"g1": 1}
    assert p.lost == {"g2": {IPv4Address(H): 5}}
    assert p.skipped == {
        f"not anchored at {PUB[1]}": 1,
        "guest not alive elsewhere (ran on the dead node, or unknown)": 1,
        "not SNAT (stateless flows need no state on the entry node)": 1}
    s = p.summary()
    assert s["lost_guests"] == {"g2": [H]} and s["entries"] == 1 and not s["forced"]


def test_plan_refuses_a_live_node_unless_forced() -> None:
    with pytest.raises(FailoverRefused, match=r"n1 is alive: its lease has 8 s of 10 s left; "
                       r"fail over only a dead node \(--force"):
        plan_failover(T, SNAP, ALIVE, "n1", "n3", CACHE)
    assert plan_failover(T, SNAP, ALIVE, "n1", "n3", CACHE, force=True).forced


@pytest.mark.parametrize(("dead", "to", "public", "message"), [
    ("n1", "n1", None, "cannot fail n1 over to itself"),
    ("n9", "n3", None, r"unknown node 'n9' \(nodes: n1, n2, n3\)"),
    ("n1", "n3", (pub("n1", "n2", 2),), "already adopted by n2 \\(epoch 2\\)"),
    ("n1", "n3", (replace(pub("n1", "n1"), ip=IPv4Address("192.168.122.99")),),
     "the store says n1's public address is 192.168.122.99, the config says"),
])
def test_plan_refusals_are_one_line(dead: str, to: str, public: tuple[PublicAddress, ...] | None,
                                    message: str) -> None:
    s = SNAP if public is None else snap(*SNAP.ownership, public=public)
    with pytest.raises(FailoverRefused, match=message) as err:
        plan_failover(T, s, N1_DEAD, dead, to, CACHE)
    assert "\n" not in str(err.value)


def test_a_second_run_redoes_everything_but_the_adoption() -> None:
    again = snap(*SNAP.ownership, public=(pub("n1", "n3", 2), pub("n2", "n2"), pub("n3", "n3")))
    p = plan_failover(T, again, N1_DEAD, "n1", "n3", CACHE)
    assert p.adopt_epoch is None and len(p.commit) == 1


def test_closing_flows_are_not_committed() -> None:
    closing = replace(G_VIA_N1, tcp=replace(G_VIA_N1.tcp, state=TcpState.TIME_WAIT))
    p = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", [closing])
    assert p.commit == () and p.skipped == {"closing": 1}


def test_snat_create_carries_the_binding_and_the_unnatted_reply() -> None:
    (e,) = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", CACHE).commit
    msg = encode_create_snat(e, 1)
    # the binding: n1's address (twice: min and max) and the port the reply goes to
    assert msg.count(IPv4Address(PUB[1]).packed) == 2
    assert e.tuple_reply.dport.to_bytes(2, "big") in msg
    assert bytes([CTA_NAT_SRC]) in msg and bytes([CTA_TUPLE_REPLY]) in msg
    assert IPv4Address(G).packed in msg and IPv4Address(PEER).packed in msg


def test_adoption_state_from_the_records() -> None:
    records = [pub("n1", "n3", 2), pub("n2", "n2"), pub("n3", "n3")]
    n3 = desired_adoption(records, T, "n3")
    assert n3.entry == {(PUB[1], 1)} and n3.tags == {1}
    assert n3.macs == {(1, T.node("n1").bridge_mac)} and not n3.fenced
    assert n3.addresses(PUB[3]) == {PUB[1], PUB[3]}
    n1 = desired_adoption(records, T, "n1")  # came back: fenced, answers for nothing
    assert n1.fenced and n1.entry == frozenset() and n1.addresses(PUB[1]) == frozenset()
    n2 = desired_adoption(records, T, "n2")
    assert n2 == desired_adoption([], T, "n2") and n2.addresses(PUB[2]) == {PUB[2]}
    back = desired_adoption([pub("n1", "n1", 3), pub("n3", "n3")], T, "n3")
    assert back.entry == frozenset() and back.addresses(PUB[3]) == {PUB[3]}


def unnated(e: Entry) -> Entry:
    """What a migration left the survivor of a flow its guest opened while on n1: the same
    original tuple, the reply to the guest itself (n1 did the SNAT)."""
    return replace(e, tuple_reply=e.tuple_orig.reversed(), status=e.status & ~SNAT_BITS,
                   mark=3)


def test_commit_replaces_the_survivors_unnated_copy_and_keeps_a_bound_one() -> None:
    (bound,) = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", CACHE).commit
    other = replace(bound, tuple_orig=replace(bound.tuple_orig, sport=40100),
                    tuple_reply=replace(bound.tuple_reply, dport=40100))
    assert commit_writes([bound, other], []) == CommitWrites((bound, other), (), 0, 0)
    copy = unnated(bound)
    w = commit_writes([bound, other], [copy, flow(G, 1, PEER, 2)])
    assert (w.push, w.delete, w.unchanged, w.replaced) == ((bound, other), (copy,), 0, 1)
    # held with the binding already (a second run): left as it is
    w = commit_writes([bound, other], [replace(bound, id=7), other])
    assert (w.push, w.delete, w.unchanged, w.replaced) == ((), (), 2, 0)
    # the reply tuple held by another entry: that one goes too
    thief = flow(str(bound.tuple_reply.src), bound.tuple_reply.sport,
                 str(bound.tuple_reply.dst), bound.tuple_reply.dport)
    w = commit_writes([bound], [copy, thief])
    assert w.push == (bound,) and set(w.delete) == {copy, thief} and w.replaced == 1
