"""The world of ``bench.store``'s failover figure: a dead node n1 holding many guest
addresses and many replicated SNAT entries, a survivor n3 in a namespace of its own with its
real ruleset, and the agent's own ``Failover`` run against them."""

from __future__ import annotations

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


def survivor_ns(t: Topology) -> str:
    ns = f"cvb-fo-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    for args in (["link", "set", "lo", "up"], ["link", "add", "xenbr0", "type", "bridge"],
                 ["link", "add", "guestbr0", "type", "bridge"],
                 ["link", "add", "pipe0", "type", "veth", "peer", "name", "pipe0p"],
                 ["addr", "add", f"{PUB[3]}/24", "dev", "xenbr0"]):
        sh("ip", "-n", ns, *args)
    for dev in ("xenbr0", "guestbr0", "pipe0", "pipe0p"):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    apply(t, "n3", ns, warn=lambda _m: None)
    return ns


async def failover_once(url: str, tmp: Path) -> dict[str, Any]:
    t = topology()
    ns = survivor_ns(t)
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
            with ConntrackTable(ns) as table:
                fo = Failover(t, "n3", store, table, AdoptionOps(t, "n3", ns),
                              AuditLog(str(tmp / f"audit-{uuid.uuid4().hex[:6]}.log"),
                                       node="n3", actor="agent"),
                              lambda _node: cache, lambda: None)
                start = time.perf_counter()
                report = await fo.run("n1")
                took = (time.perf_counter() - start) * 1000
                in_kernel = sum(1 for e in cache if table.get(e) is not None)
            released = len(await store.list_ownership(node="n1"))
        return {"total_ms": round(took, 1), "agent_total_ms": report["total_ms"],
                "steps_ms": report["steps_ms"], "entries": len(cache),
                "in_kernel": in_kernel, "lost_addresses": LOST,
                "still_owned_by_dead_node": released, "target_ms": 2000}
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
