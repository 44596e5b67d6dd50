"""Contract suite for the node seam: every case runs against ``FakeNodeOps`` and against
``NftNodeOps`` on the real ruleset in a throwaway namespace (sets read back through the
seam; the gratuitous ARP caught by a packet socket on the guest bridge)."""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.loader import load
from orchestrator.config.schema import Topology
from orchestrator.errors import RulesetError
from orchestrator.lab.plan import default_config
from orchestrator.migration.nodeops import (
    ETH_P_ARP,
    FakeNodeOps,
    NftNodeOps,
    NodeOps,
    NodeSets,
)
from orchestrator.netfilter import nft
from orchestrator.netfilter.render import IP_TABLE
from orchestrator.netns import in_netns

A, B = IPv4Address("10.5.5.201"), IPv4Address("10.5.5.202")
BRIDGE = "guestbr0"


@dataclass
class Node:
    """One implementation and what a test can observe of it beyond the seam."""

    ops: NodeOps
    topology: Topology
    drop_rules: Callable[[], None]
    announced: Callable[[], list[IPv4Address]]
    closers: list[Callable[[], None]] = field(default_factory=list)


def fake_node(t: Topology) -> Node:
    ops = FakeNodeOps("n1", BRIDGE)
    return Node(ops, t, ops.drop_rules, lambda: [ip for _, ip in ops.announced])


def kernel_node(t: Topology, ns: str) -> Node:
    in_netns(ns, _bridge_up)
    sniffer = in_netns(ns, _sniffer)

    def announced() -> list[IPv4Address]:
        out = []
        while select.select([sniffer], [], [], 0.5)[0]:
            frame = sniffer.recv(2048)
            # Ethernet (14) + ARP: op at 20, sender ip at 28, target ip at 38
            assert frame[:6] == b"\xff" * 6 and frame[20:22] == b"\0\1"
            assert frame[28:32] == frame[38:42]  # gratuitous: sender = target
            out.append(IPv4Address(frame[28:32]))
        return out

    def drop() -> None:
        nft.run(f"delete table ip {IP_TABLE}\n", ns)

    node = Node(NftNodeOps("n1", ns, BRIDGE), t, drop, announced)
    node.closers.append(sniffer.close)
    return node


def _bridge_up() -> None:
    """The guest bridge with one port, as a pipe is; the frame is caught at its far end."""
    for argv in (["link", "add", BRIDGE, "type", "bridge"],
                 ["link", "add", "port0", "type", "veth", "peer", "tap0"],
                 ["link", "set", "port0", "master", BRIDGE]):
        subprocess.run(["ip", *argv], check=True)
    for dev in (BRIDGE, "port0", "tap0"):
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)


def _sniffer() -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind(("tap0", ETH_P_ARP))
    return s


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.root)])
def node(request: pytest.FixtureRequest, netns: Callable[[str], str],
         tmp_path: Path) -> Iterator[Node]:  # fmt: skip
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(default_config(3, "nc"))
    t = load(cfg)
    made = fake_node(t) if request.param == "fake" else kernel_node(t, netns("nc"))
    run(made.ops.apply_rules(t))
    yield made
    for close in made.closers:
        close()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 15))


def sets(node: Node) -> NodeSets:
    got: NodeSets = run(node.ops.sets())
    return got


def test_fresh_rules_have_empty_sets(node: Node) -> None:
    assert sets(node) == NodeSets()


def test_gate_and_host_are_idempotent(node: Node) -> None:
    for _ in range(2):
        run(node.ops.gate([A, B], closed=True))
    assert sets(node) == NodeSets(race_gate=frozenset({str(A), str(B)}))
    for _ in range(2):
        run(node.ops.gate([A], closed=False))
        run(node.ops.host([A], hosted=True))
    assert sets(node) == NodeSets(frozenset({str(A)}), frozenset({str(B)}))
    run(node.ops.host([A, B], hosted=False))  # B was never hosted: no error
    assert sets(node) == NodeSets(race_gate=frozenset({str(B)}))


def test_arrive_hosts_and_opens_the_gate_at_once(node: Node) -> None:
    run(node.ops.gate([A, B], closed=True))
    run(node.ops.arrive([A], open_gate=True))
    assert sets(node) == NodeSets(frozenset({str(A)}), frozenset({str(B)}))
    run(node.ops.arrive([B], open_gate=False))  # the control run: the gate stays
    assert sets(node) == NodeSets(frozenset({str(A), str(B)}), frozenset({str(B)}))


def test_update_sets_adds_and_removes_in_one_go(node: Node) -> None:
    run(node.ops.update_sets({"local_guests": ([str(A)], [str(B)]),
                              "race_gate": ([str(B)], [])}))  # fmt: skip
    assert sets(node) == NodeSets(frozenset({str(A)}), frozenset({str(B)}))


def test_a_rule_change_keeps_the_elements_a_lost_table_does_not(node: Node) -> None:
    run(node.ops.host([A], hosted=True))
    run(node.ops.apply_rules(node.topology))
    assert sets(node) == NodeSets(local_guests=frozenset({str(A)}))
    node.drop_rules()
    with pytest.raises(RulesetError):
        run(node.ops.gate([B], closed=True))
    run(node.ops.apply_rules(node.topology))
    assert sets(node) == NodeSets()


def test_announce_gateway_sends_one_gratuitous_arp(node: Node) -> None:
    gw = node.topology.cluster.gateway
    run(node.ops.announce_gateway(gw))
    assert node.announced() == [gw]
