"""Adoption on a real node namespace: the maps, sets and uplink addresses a survivor holds
for a dead node, programmed from the records, idempotent, undone by a failback; the home
node fenced off its own address; a holder releasing it keeps the maps. And a SNAT entry
created with its binding really un-SNATs: the kernel builds the NATed reply tuple from it,
for a failover's commit and for a failback's plan through the applier."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from orchestrator.failover.adopt import AdoptionOps, desired_adoption
from orchestrator.failover.back import plan_handback, select_handback
from orchestrator.failover.plan import plan_failover
from orchestrator.handover.applier import apply_plan
from orchestrator.netfilter.apply import apply
from orchestrator.netfilter.conntrack import ConntrackTable
from tests.unit.test_failback import BOUND, HOLDER_TABLE, INBOUND, START
from tests.unit.test_failover_plan import CACHE, N1_DEAD, SNAP, pub, unnated
from tests.unit.test_failover_run import world
from tests.unit.test_planner import PUB, G, T

pytestmark = pytest.mark.root


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def node_ns(netns: Callable[[str], str]) -> str:
    ns = netns("adopt")
    sh("ip", "-n", ns, "link", "add", "xenbr0", "type", "bridge")
    sh("ip", "-n", ns, "link", "add", "guestbr0", "type", "bridge")
    sh("ip", "-n", ns, "link", "add", "pipe0", "type", "veth", "peer", "name", "pipe0p")
    for dev in ("xenbr0", "guestbr0", "pipe0", "pipe0p"):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", ns, "addr", "add", f"{PUB[3]}/24", "dev", "xenbr0")
    apply(T, "n3", ns, warn=lambda _m: None)
    return ns


def addresses(ns: str) -> set[str]:
    out = json.loads(sh("ip", "-n", ns, "-j", "addr", "show", "dev", "xenbr0"))
    return {a["local"] for link in out for a in link["addr_info"] if a["family"] == "inet"}


def test_adoption_is_programmed_idempotent_and_undone(netns: Callable[[str], str]) -> None:
    ns = node_ns(netns)
    ops = AdoptionOps(T, "n3", ns)
    adopted = [pub("n1", "n3", 2), pub("n2", "n2"), pub("n3", "n3")]
    first = ops.apply(desired_adoption(adopted, T, "n3"))
    assert first.added == [PUB[1]] and first.nft
    assert addresses(ns) == {PUB[1], PUB[3]}
    rules = sh("ip", "netns", "exec", ns, "nft", "list", "ruleset")
    assert f"{PUB[1]} : 0x00000001" in rules
    assert f"0x00000001 : {T.node('n1').bridge_mac}" in rules
    assert not ops.apply(desired_adoption(adopted, T, "n3"))  # nothing left to change
    back = ops.apply(desired_adoption([pub("n1", "n1", 3), pub("n3", "n3")], T, "n3"))
    assert back.removed == [PUB[1]] and back.nft and addresses(ns) == {PUB[3]}
    assert f"{PUB[1]} : 0x00000001" not in sh("ip", "netns", "exec", ns, "nft", "list",
                                               "ruleset")
    # n3's own address adopted by someone else: n3 is fenced off it
    fenced = ops.apply(desired_adoption([pub("n3", "n2", 2)], T, "n3"))
    assert fenced.removed == [PUB[3]] and addresses(ns) == set()


def uplink_config(ns: str) -> tuple[str, str]:
    """What the operator sees of n3's uplink: ``ip -4 addr`` and every route."""
    return (sh("ip", "-n", ns, "-4", "addr", "show", "dev", "xenbr0"),
            sh("ip", "-n", ns, "-4", "route", "show", "table", "all"))


def test_fenced_address_comes_back_as_it_was(netns: Callable[[str], str],
                                             tmp_path: Path) -> None:
    """Fenced, then failed back, with an agent restart in between each time: the own
    address returns with its prefix, and the routes the kernel dropped with it return
    too. Second round: the address was taken off by a reboot (never seen by the fence):
    the shape the agent saw configured on its first pass puts it back."""
    ns = node_ns(netns)
    gw = "192.168.122.1"
    sh("ip", "-n", ns, "route", "add", "default", "via", gw)
    sh("ip", "-n", ns, "route", "add", "10.99.0.0/16", "via", gw, "metric", "50", "mtu", "1400")
    sh("ip", "-n", ns, "route", "add", "198.51.100.0/24", "dev", "xenbr0", "scope", "link",
       "src", PUB[3], "proto", "static")
    before = uplink_config(ns)
    state = tmp_path / "uplink-n3.json"
    fenced, home = [pub("n3", "n2", 2)], [pub("n3", "n3", 3)]
    assert AdoptionOps(T, "n3", ns, state).apply(desired_adoption(fenced, T, "n3")).removed \
        == [PUB[3]]
    gone = uplink_config(ns)
    assert PUB[3] not in gone[0] and "default" not in gone[1]  # the kernel dropped them
    back = AdoptionOps(T, "n3", ns, state).apply(desired_adoption(home, T, "n3"))  # restarted
    assert back.added == [PUB[3]]
    assert uplink_config(ns) == before
    # round two: a reboot took it off; the agent's first pass saw it configured earlier
    AdoptionOps(T, "n3", ns, state).apply(desired_adoption(home, T, "n3"))
    sh("ip", "-n", ns, "addr", "del", f"{PUB[3]}/24", "dev", "xenbr0")
    AdoptionOps(T, "n3", ns, state).apply(desired_adoption(fenced, T, "n3"))
    assert AdoptionOps(T, "n3", ns, state).apply(desired_adoption(home, T, "n3")).added \
        == [PUB[3]]
    assert uplink_config(ns) == before


def test_committed_snat_entry_keeps_its_binding(netns: Callable[[str], str]) -> None:
    ns = node_ns(netns)
    (entry,) = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", CACHE).commit
    with ConntrackTable(ns) as table:
        result = table.push_snat([entry])
        assert result.ok and result.created == 1
        got = table.get(entry)
        assert got is not None
        assert got.tuple_reply == entry.tuple_reply  # replies to n1's address:port
        assert got.tuple_reply.dst == IPv4Address(PUB[1])
        assert got.is_src_nat and got.mark & 0xFF == 1
        assert table.push_snat([entry]).ok  # a second commit: already there, no error


def test_commit_replaces_the_survivors_unnated_copy(netns: Callable[[str], str],
                                                    tmp_path: Path) -> None:
    """G moved n1 -> n3 before n1 died: n3's kernel holds G's n1-SNATed flow un-NATed (as
    the migration wrote it). Control: the old commit (``push_snat`` alone) leaves it so, and
    a reply to n1's address finds no entry on n3 (its stack answers with a reset). The
    failover's commit replaces it: the reply tuple is found, un-SNATed to G."""
    ns = node_ns(netns)
    (bound,) = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", CACHE).commit
    reply_key = (bound.tuple_reply, bound.zone)
    with ConntrackTable(ns) as table:
        assert table.push([unnated(bound)], "fail").ok
        assert table.push_snat([bound]).ok  # the old commit: EEXIST, counted unchanged
        assert table.get(reply_key) is None  # a reply to n1's address: no binding here

        async def failover() -> dict[str, object]:
            store, _t, fo, _log, _audit = await world(tmp_path, table)
            try:
                return await fo.run("n1")
            finally:
                await store.close()

        report = asyncio.run(failover())
        assert report["replaced"] == 1 and not report["commit_errors"], report
        got = table.get(reply_key)
        assert got is not None and got.key == bound.key and got.is_src_nat
        assert got.tuple_reply == bound.tuple_reply and got.mark & 0xFF == 1


def test_releasing_keeps_the_maps_off_the_uplink(netns: Callable[[str], str]) -> None:
    """A holder handing n1's address back: the address leaves, the maps stay until it
    retires (then the record decides alone)."""
    ns = node_ns(netns)
    ops = AdoptionOps(T, "n3", ns)
    held = [pub("n1", "n3", 2), pub("n3", "n3")]
    ops.apply(desired_adoption(held, T, "n3"))
    released = ops.apply(desired_adoption(held, T, "n3", {"n1"}))
    assert released.removed == [PUB[1]] and not released.nft and addresses(ns) == {PUB[3]}
    assert f"{PUB[1]} : 0x00000001" in sh("ip", "netns", "exec", ns, "nft", "list", "ruleset")
    back = [pub("n1", "n1", 3), pub("n3", "n3")]
    assert not ops.apply(desired_adoption(back, T, "n3", {"n1"}))  # claimed: still answered
    retired = ops.apply(desired_adoption(back, T, "n3"))
    assert retired.nft and not retired.removed
    assert f"{PUB[1]} : 0x00000001" not in sh("ip", "netns", "exec", ns, "nft", "list",
                                               "ruleset")


def test_handed_back_binding_is_written_with_it_once(netns: Callable[[str], str]) -> None:
    """The failback's plan through the one applier into a real kernel: the binding goes
    in with its NATed reply and the replication bit, the inbound copy as a copy; a second
    plan against what the kernel holds writes nothing."""
    ns = node_ns(netns)  # n3's ruleset; the kernel does not care whose node it is
    h = select_handback(HOLDER_TABLE, T, "n1")
    with ConntrackTable(ns) as table:
        (p,) = plan_handback(START, h, T, existing=[]).plans
        done = asyncio.run(apply_plan(table, p))
        assert done.written == 2 and not done.errors, done.errors
        got = table.get(BOUND)
        assert got is not None and got.is_src_nat and got.tuple_reply == BOUND.tuple_reply
        assert got.mark == BOUND.mark | T.sync.mark_bit
        assert table.get(INBOUND) is not None
        (again,) = plan_handback(START, h, T, existing=table.dump([G])).plans
        assert not again.writes, [(a.kind, a.rules) for a in again.dest]
