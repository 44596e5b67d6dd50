"""The world of ``bench.store``'s failover figure: a dead node n1 holding many guest
addresses and many replicated SNAT entries, a survivor n3 in a namespace of its own with its
real ruleset, and the agent's own ``Failover`` run against them. Then the failback figure:
n1 back in a namespace of its own (its ruleset, an empty table, fenced), and the agents' own
``Failback`` taking the 10,000 entries and the address back from n3 (n3's side called in
process: the peer channel is left out of this figure)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.failover.adopt import AdoptionOps
from orchestrator.failover.handback import Failback, LocalHolder
from orchestrator.failover.run import Failover
from orchestrator.model.conntrack import Entry, Status, TcpFlag, TcpInfo, Tuple
from orchestrator.netfilter.apply import apply
from orchestrator.netfilter.conntrack import ConntrackTable
from orchestrator.store import open_store

PUB = {1: "192.168.122.11", 2: "192.168.122.12", 3: "192.168.122.13"}
PEER = "198.51.100.7"
LOST = 1000  # n1's own guests' addresses: lost with it
ENTRIES = 10_000  # SNAT flows of n2's guests anchored at n1's address
LIVING = 100  # n2's guests whose flows those are


def topology() -> Topology:
    nodes = [{"name": f"n{i}", "tag": i, "mac_prefix": f"0a:00:{i:02x}", "pub_ip": PUB[i],
              "guest_ip": f"10.0.255.{250 + i}", "pipes": ["pipe0"]} for i in (1, 2, 3)]
    return Topology.model_validate({
        "cluster": {"name": "bench", "guest_subnet": "10.0.0.0/16", "gateway": "10.0.255.254"},
        "nodes": nodes,
        "services": [{"name": "ssh", "port": 22, "guest": "g2-0"}],
        "guests": [{"name": f"g2-{i}", "macs": [f"52:54:00:02:{i // 256:02x}:{i % 256:02x}"],
                    "addresses": [f"10.0.1.{i + 1}"]} for i in range(LIVING)],
    })


def snat_entries() -> list[Entry]:
    status = (Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED | Status.SRC_NAT
              | Status.SRC_NAT_DONE)
    tcp = TcpInfo(flags_orig=TcpFlag.WINDOW_SCALE, flags_reply=TcpFlag.WINDOW_SCALE)
    out = []
    for i in range(ENTRIES):
        guest = f"10.0.1.{i % LIVING + 1}"
        o = Tuple.of(guest, PEER, 6, 20000 + i // LIVING, 443)
        r = replace(o.reversed(), dst=IPv4Address(PUB[1]), dport=30000 + i)
        out.append(Entry(o, r, status, mark=0x80000001, timeout=600, tcp=tcp))
    return out


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def node_ns(t: Topology, node: str = "n3", address: bool = True) -> str:
    """A node's namespace with its real ruleset (``address``: its public address up; a
    fenced node that came back has it off)."""
    ns = f"cvb-fo-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    for args in (["link", "set", "lo", "up"], ["link", "add", "xenbr0", "type", "bridge"],
                 ["link", "add", "guestbr0", "type", "bridge"],
                 ["link", "add", "pipe0", "type", "veth", "peer", "name", "pipe0p"]):
        sh("ip", "-n", ns, *args)
    if address:
        sh("ip", "-n", ns, "addr", "add", f"{t.node(node).pub_ip}/24", "dev", "xenbr0")
    for dev in ("xenbr0", "guestbr0", "pipe0", "pipe0p"):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    apply(t, node, ns, warn=lambda _m: None)
    return ns


async def failover_once(url: str, tmp: Path) -> dict[str, Any]:
    t = topology()
    ns = node_ns(t)
    home_ns = node_ns(t, "n1", address=False)
    try:
        async with await open_store(url) as store:
            for n in t.nodes:
                await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
                await store.claim_public(n.name, n.pub_ip, n.name, 0)
            await store.grant_lease("n3", 60)  # n1 never got one: dead
            for i in range(LOST):  # n1's own guests, one address each
                await store.claim(f"10.0.2{i // 250}.{i % 250 + 1}", "n1", f"g1-{i}", 0)
            for g in t.guests:
                await store.claim_all({a: 0 for a in g.addresses}, "n2", g.name)
            cache = snat_entries()
            adoption = AdoptionOps(t, "n3", ns)
            with ConntrackTable(ns) as table:
                fo = Failover(t, "n3", store, table, adoption, audit(tmp, "n3"),
                              lambda _node: cache, lambda: None)
                start = time.perf_counter()
                report = await fo.run("n1")
                took = (time.perf_counter() - start) * 1000
                in_kernel = sum(1 for e in cache if table.get(e) is not None)
                released = len(await store.list_ownership(node="n1"))
                back = await failback_once(t, store, table, adoption, home_ns, cache, tmp)
        return {"total_ms": round(took, 1), "agent_total_ms": report["total_ms"],
                "steps_ms": report["steps_ms"], "entries": len(cache),
                "in_kernel": in_kernel, "lost_addresses": LOST,
                "still_owned_by_dead_node": released, "target_ms": 2000, "failback": back}
    finally:
        for name in (ns, home_ns):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def audit(tmp: Path, node: str) -> AuditLog:
    return AuditLog(str(tmp / f"audit-{uuid.uuid4().hex[:6]}.log"), node=node, actor="agent")


async def failback_once(t: Topology, store: Any, holder_table: ConntrackTable,
                        holder_adoption: AdoptionOps, home_ns: str, cache: list[Entry],
                        tmp: Path) -> dict[str, Any]:
    """n1 back (lease, fenced, empty table): ``Failback.run`` from the call to its return,
    then every entry checked in n1's kernel (with its binding) and gone from n3's."""
    await store.grant_lease("n1", 60)

    async def nothing() -> None:
        return None

    async def unused(node: str) -> LocalHolder:
        raise AssertionError(f"n3 asked {node} for its address: it holds none")

    holder = Failback(t, "n3", store, holder_table, holder_adoption, audit(tmp, "n3"),
                      connect=unused, rules=nothing)
    with ConntrackTable(home_ns) as table:
        adoption = AdoptionOps(t, "n1", home_ns)
        await adoption.follow(store.list_public)  # fenced: its address stays off

        async def connect(_node: str) -> LocalHolder:
            return LocalHolder(holder, "n1")

        async def rules() -> None:
            await asyncio.to_thread(apply, t, "n1", home_ns, warn=lambda _m: None)

        home = Failback(t, "n1", store, table, adoption, audit(tmp, "n1"), connect, rules)
        start = time.perf_counter()
        report = await home.run()
        took = (time.perf_counter() - start) * 1000
        bound = sum(1 for e in cache if (got := table.get(e)) is not None
                    and got.tuple_reply == e.tuple_reply)
        left = sum(1 for e in cache if holder_table.get(e) is not None)
        again = await home.run()
    return {"total_ms": round(took, 1), "agent_total_ms": report["total_ms"],
            "steps_ms": report["steps_ms"], "entries": report["committed"],
            "in_kernel_with_binding": bound, "left_on_holder": left,
            "second_run_nothing_to_do": bool(again["nothing_to_do"])}
