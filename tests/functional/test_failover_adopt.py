"""Adoption on a real node namespace: the maps, sets and uplink addresses a survivor holds
for a dead node, programmed from the records, idempotent, undone by a failback; the home
node fenced off its own address. And a SNAT entry created with its binding really
un-SNATs: the kernel builds the NATed reply tuple from it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from orchestrator.failover.adopt import AdoptionOps, desired_adoption
from orchestrator.failover.plan import plan_failover
from orchestrator.netfilter.apply import apply
from orchestrator.netfilter.conntrack import ConntrackTable
from tests.unit.test_failover_plan import CACHE, N1_DEAD, SNAP, pub
from tests.unit.test_planner import PUB, T

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
