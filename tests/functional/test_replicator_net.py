"""The replicator over real sockets and real conntrack tables: three node namespaces on one
bridge (a fourth namespace), multicast between them, ``tc netem`` on every node's sync link.

Every check compares a receiver's external cache with the sender's kernel table as
``conntrack -L`` prints it in the sender's namespace (a second tool, parsed here), so the
engine's own dump is not what the replicator is judged against.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.schema import Topology
from orchestrator.handover.planner import plan_handover
from orchestrator.model.conntrack import (
    Entry,
    Proto,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.netfilter.conntrack import ConntrackTable
from orchestrator.netfilter.render import render
from orchestrator.netns import in_netns
from orchestrator.replicator.receiver import ReceiverConfig
from orchestrator.replicator.service import SyncService
from orchestrator.replicator.wire import (
    HEADER_SIZE,
    Codec,
    Message,
    MsgType,
    encode_upsert,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

KEY = b"functional-test-cluster-key-0001"
BIT = 0x80000000
PORT = 7405
REQUIRED = Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED
TCP = TcpInfo(TcpState.ESTABLISHED, 7, 7, TcpFlag.WINDOW_SCALE, TcpFlag.WINDOW_SCALE)
GUEST = "10.5.5.201"


def topology(backlog: int = 4096) -> Topology:
    nodes = [
        {"name": f"n{i}", "tag": i, "mac_prefix": f"0a:00:0{i}", "pub_ip": f"192.168.122.1{i}",
         "guest_ip": f"10.5.5.25{i}", "pipes": ["pipe0"], "sync_ip": f"10.99.0.{i}"}
        for i in (1, 2, 3)
    ]  # fmt: skip
    return Topology.model_validate({
        "cluster": {"guest_subnet": "10.5.5.0/24", "gateway": "10.5.5.254"},
        "nodes": nodes,
        "guests": [{"name": "g1", "macs": ["52:54:00:00:02:01"], "addresses": [GUEST]}],
        "sync": {"interface": "sync0", "port": PORT, "backlog": backlog, "flush_ms": 5,
                 "resync_rate": 20000},
    })  # fmt: skip


def entries(n: int, base: int = 0, mark: int = BIT | 1, guest_every: int = 10) -> list[Entry]:
    """TCP and UDP entries; every ``guest_every``-th is a client's flow to the guest."""
    out = []
    for i in range(base, base + n):
        client = IPv4Address(0xC6336400 + i // 40000)  # 198.51.100.x
        if i % guest_every == 0:
            o = Tuple(client, ip_address(GUEST), Proto.TCP, 1024 + i % 40000, 80)
            out.append(Entry(o, o.reversed(), REQUIRED, mark, 600, 0, TCP))
        elif i % 3:
            o = Tuple(ip_address(f"10.6.{i % 200}.1"), client, Proto.TCP, 1024 + i % 40000, 443)
            out.append(Entry(o, o.reversed(), REQUIRED, mark, 600, 0, TCP))
        else:
            o = Tuple(ip_address(f"10.7.{i % 200}.1"), client, Proto.UDP, 1024 + i % 40000, 53)
            out.append(Entry(o, o.reversed(), REQUIRED, mark, 120, 0))
    return out


# --- the lab ------------------------------------------------------------------------------


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=20).stdout


# This kernel has no sch_netem (CONFIG_NET_SCH_NETEM unset), so the impairments are built
# from what it has: loss = nft numgen drops at each node's ingress; reordering = an HTB class
# at a few Mbit/s that a classic-BPF random classifier sends ~30 % of the datagrams through
# (they fall behind the rest); duplication = nft ``dup to`` the other ports of the bridge.
RANDOM_CLASSIFIER = "4,32 0 0 4294963256,37 0 1 {thr},6 0 0 0,6 0 0 65568"  # ld rand; 1:20


@dataclass
class Net:
    bridge: str
    nodes: dict[str, str]  # node name -> namespace
    state: Path  # where the services keep their boot ids across restarts

    def impair(self, node: str, loss: float = 0.0, reorder: float = 0.0,
               duplicate: float = 0.0) -> None:  # fmt: skip
        ns = self.nodes[node]
        if loss:
            sh_in(ns, "nft", "-f", "-", stdin=(
                "table netdev cvimpair {\n chain rx {\n"
                '  type filter hook ingress device "sync0" priority 0; policy accept;\n'
                f"  udp dport {PORT} numgen random mod 10000 < {int(loss * 10000)} drop\n }}\n}}\n"))  # fmt: skip
        if reorder:
            tc = ["tc", "-n", ns]
            sh(*tc, "qdisc", "add", "dev", "sync0", "root", "handle", "1:", "htb", "default", "10")
            sh(*tc, "class", "add", "dev", "sync0", "parent", "1:", "classid", "1:10", "htb",
               "rate", "10gbit")  # fmt: skip
            sh(*tc, "class", "add", "dev", "sync0", "parent", "1:", "classid", "1:20", "htb",
               "rate", "4mbit", "ceil", "4mbit")  # fmt: skip
            code = RANDOM_CLASSIFIER.format(thr=int(reorder * 0xFFFFFFFF))
            sh(*tc, "filter", "add", "dev", "sync0", "parent", "1:", "bpf", "bytecode", code)
        if duplicate:
            me = f"p{node[1:]}"
            others = [f"p{n[1:]}" for n in self.nodes if n != node]
            dups = "\n".join(
                f"  udp dport {PORT} numgen random mod 10000 < {int(duplicate * 10000)} "
                f'dup to "{p}"' for p in others)  # fmt: skip
            sh_in(self.bridge, "nft", "-f", "-", stdin=(
                f"table netdev cvdup{me} {{\n chain rx {{\n"
                f'  type filter hook ingress device "{me}" priority 0; policy accept;\n'
                f"{dups}\n }}\n}}\n"))  # fmt: skip

    def block_ingress(self, node: str, blocked: bool) -> None:
        """Everything sent to ``node`` is lost (an nft drop on its sync link's ingress)."""
        ns = self.nodes[node]
        if blocked:
            sh_in(ns, "nft", "-f", "-", stdin=(
                "table netdev cvblock {\n chain rx {\n"
                '  type filter hook ingress device "sync0" priority 0; policy accept;\n'
                f"  udp dport {PORT} drop\n }}\n}}\n"))  # fmt: skip
        else:
            sh_in(ns, "nft", "delete", "table", "netdev", "cvblock")


@pytest.fixture
def net(netns: Callable[[str], str], tmp_path: Path) -> Net:
    br = netns("rbr")
    sh("ip", "-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
    sh("ip", "-n", br, "link", "set", "br0", "up")
    nodes = {}
    for i in (1, 2, 3):
        ns = nodes[f"n{i}"] = netns(f"rn{i}")
        sh("ip", "-n", ns, "link", "add", "sync0", "type", "veth", "peer", "name", f"p{i}",
           "netns", br)  # fmt: skip
        sh("ip", "-n", br, "link", "set", f"p{i}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"10.99.0.{i}/24", "dev", "sync0")
        sh("ip", "-n", ns, "link", "set", "sync0", "up")
        # the rendered notrack chains: sync traffic never becomes a conntrack entry
        sh_in(ns, "nft", "-f", "-", stdin=notrack_table(topology()))
    return Net(br, nodes, tmp_path)


def notrack_table(t: Topology) -> str:
    script = render(t, "n1").script()
    chains = re.findall(r"\tchain sync_notrack_\w+ \{.*?\n\t\}", script, re.S)
    assert len(chains) == 2, script
    return "table ip cvtest {\n" + "\n".join(chains) + "\n}\n"


def sh_in(ns: str, *argv: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True,
                          text=True, input=stdin, timeout=20).stdout  # fmt: skip


# --- conntrack -L, parsed -------------------------------------------------------------------

Flow = tuple[str, tuple[str, ...], tuple[str, ...], int, int, str | None, bool]
_KV = re.compile(r"(\w+)=(\S+)")


def conntrack_list(ns: str, bit: int = BIT) -> set[Flow]:
    """The sender's table as ``conntrack -L`` prints it: entries with the sync bit."""
    out = set()
    for line in sh_in(ns, "conntrack", "-L").splitlines():
        words = line.split()
        if len(words) < 4 or "=" in words[0]:
            continue
        proto = words[0]
        state = words[3] if proto == "tcp" else None
        pairs = _KV.findall(line)
        addrs = [v for k, v in pairs if k in ("src", "dst", "sport", "dport")]
        extra = {k: v for k, v in pairs if k in ("mark", "zone")}
        mark = int(extra.get("mark", "0"))
        if mark & bit:
            out.add((proto, tuple(addrs[:4]), tuple(addrs[4:8]), mark, int(extra.get("zone", 0)),
                     state, "[ASSURED]" in words))  # fmt: skip
    return out


def flows(cache: object) -> set[Flow]:
    out = set()
    for e in cache.values():  # type: ignore[attr-defined]
        o, r = e.tuple_orig, e.tuple_reply
        name = {6: "tcp", 17: "udp", 1: "icmp"}[o.proto]
        out.add((name, (str(o.src), str(o.dst), str(o.sport), str(o.dport)),
                 (str(r.src), str(r.dst), str(r.sport), str(r.dport)), e.mark, e.zone,
                 e.tcp.state.name if e.tcp else None, bool(e.status & Status.ASSURED)))  # fmt: skip
    return out


async def peer_status(c: Cluster, rx: str, tx: str, until: Callable[[dict[str, Any]], bool],
                      timeout: float = 5.0) -> dict[str, Any]:
    """``rx``'s view of ``tx`` once ``until`` holds, or as it stands after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        peer = {p["node"]: p for p in c.svc[rx].status()["peers"]}[tx]
        if until(peer) or loop.time() >= end:
            return peer
        await asyncio.sleep(0.05)


async def eventually(read: Callable[[], Any], until: Callable[[Any], bool],
                     timeout: float = 10.0) -> Any:
    """``read()`` once ``until`` holds of it, or as it stands after ``timeout`` (the caller
    asserts on it): datagrams are counted when they arrive, not when they are sent."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = read()
        if until(got) or loop.time() >= end:
            return got
        await asyncio.sleep(0.05)


async def converge(want: Callable[[], set[Flow]], *caches: Callable[[], object],
                   timeout: float = 15.0) -> set[Flow]:  # fmt: skip
    """Wait until every cache equals ``want()`` (re-read: the kernel may still change)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    target: set[Flow] = set()
    while loop.time() < end:
        target = await asyncio.to_thread(want)
        if all(flows(c()) == target for c in caches):
            return target
        await asyncio.sleep(0.1)
    for c in caches:
        got = flows(c())
        assert got == target, (f"{len(got)} cached, {len(target)} in the table; missing "
                               f"{sorted(target - got)[:3]}, extra {sorted(got - target)[:3]}")  # fmt: skip
    return target


class Cluster:
    """Three services on one loop, each in its node's namespace."""

    def __init__(self, net: Net, t: Topology, **kw: object) -> None:
        self.net, self.t, self.kw = net, t, kw
        self.svc: dict[str, SyncService] = {}
        self.tables = {n: ConntrackTable(ns) for n, ns in net.nodes.items()}

    async def start(self, *names: str) -> None:
        for name in names or tuple(self.net.nodes):
            svc = SyncService(self.t, name, KEY, self.net.nodes[name],  # type: ignore[arg-type]
                              state_path=self.net.state / f"sync-{name}.json", **self.kw)
            await svc.start()
            self.svc[name] = svc

    async def stop(self, *names: str) -> None:
        for name in names or tuple(self.svc):
            await self.svc.pop(name).stop()

    def table(self, node: str) -> Callable[[], set[Flow]]:
        return lambda: conntrack_list(self.net.nodes[node])

    def cache(self, at: str, of: str) -> Callable[[], object]:
        return lambda: self.svc[at].cache(of)


def run(net: Net, body: Callable[[Cluster], Awaitable[None]], backlog: int = 4096,
        **kw: object) -> None:  # fmt: skip
    async def main() -> None:
        c = Cluster(net, topology(backlog), **kw)
        try:
            await body(c)
        finally:
            await c.stop()
            for t in c.tables.values():
                t.close()

    asyncio.run(main())


async def churn(table: ConntrackTable, n: int, base: int = 0) -> None:
    """Create ``n`` entries, change the mark of a tenth, delete a tenth, add a few unmarked."""
    made = entries(n, base)
    for i in range(0, n, n // 4):
        assert (await asyncio.to_thread(table.push, made[i : i + n // 4])).ok
        await asyncio.sleep(0.05)
    await asyncio.to_thread(table.set_mark, made[1::10], BIT | 0x1234)
    await asyncio.to_thread(table.delete, made[2::10])
    await asyncio.to_thread(table.push, entries(50, base + 10 * n, mark=0x1))


# --- the tests ------------------------------------------------------------------------------

IMPAIRMENTS: dict[str, dict[str, float]] = {
    "lossless": {},
    "loss5": {"loss": 0.05},
    "loss20": {"loss": 0.20},
    "reorder_dup": {"reorder": 0.3, "duplicate": 0.05, "loss": 0.02},
}


@pytest.mark.parametrize("netem", list(IMPAIRMENTS), ids=list(IMPAIRMENTS))
def test_every_cache_equals_the_senders_table(net: Net, netem: str) -> None:
    for node in net.nodes:
        net.impair(node, **IMPAIRMENTS[netem])

    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 2000)
        want = await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
        assert len(want) == 2000 - 200  # the unmarked ones stay home
        sent = c.svc["n1"].status()["sender"]
        peers = {p["node"]: p for p in c.svc["n2"].status()["peers"]}
        if netem in ("loss5", "loss20"):
            assert sent["nack"] > 0 and sent["resent"] > 0, sent
            # ~80 datagrams at 5 %: one receiver may lose none (~2 %), both almost never
            nacked = [next(p["nacks"] for p in c.svc[rx].status()["peers"] if p["node"] == "n1")
                      for rx in ("n2", "n3")]  # fmt: skip
            assert sum(nacked) > 0, nacked
        if netem == "reorder_dup":
            assert peers["n1"]["drops"].get("duplicate", 0) + peers["n1"]["drops"].get("old", 0)
        # sync traffic itself was never tracked (the rendered notrack chains)
        assert f"dport={PORT}" not in sh_in(net.nodes["n1"], "conntrack", "-L", "-p", "udp")

    run(net, body)


def test_backlog_overflow_ends_in_an_automatic_resync(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 400)
        await converge(c.table("n1"), c.cache("n3", "n1"))
        net.block_ingress("n3", True)
        await churn(c.tables["n1"], 3000, base=5000)  # ~110 datagrams > backlog 16
        await asyncio.sleep(0.3)
        net.block_ingress("n3", False)
        await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
        sent = c.svc["n1"].status()["sender"]
        assert sent["nack_void"] >= 1 and sent["resync_done"] >= 1, sent
        # the cache can equal the table before the resync's END arrives: wait for the END
        n3 = await peer_status(c, "n3", "n1", until=lambda p: p["resyncs"] >= 1)
        assert n3["resyncs"] >= 1 and n3["skipped"] > 0, n3

    run(net, body, backlog=16)


def test_restarted_sender_is_resynced(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        t1 = c.tables["n1"]
        await churn(t1, 1000)
        await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
        old_boot = c.svc["n1"].boot
        await c.stop("n1")
        # while n1 is down its table changes: receivers must lose these, gain those
        await asyncio.to_thread(t1.delete, entries(1000)[3::10])
        await asyncio.to_thread(t1.push, entries(300, base=9000))
        await c.start("n1")
        assert c.svc["n1"].boot > old_boot
        await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
        for at in ("n2", "n3"):
            st = c.svc[at].status()
            assert st["receiver"]["new_boot"] >= 1 and st["receiver"]["swept"] >= 60, st
            assert {p["node"]: p for p in st["peers"]}["n1"]["boot"] == c.svc["n1"].boot

    run(net, body)


def test_two_senders_at_once(net: Net) -> None:
    for node in net.nodes:
        net.impair(node, loss=0.05)

    async def body(c: Cluster) -> None:
        await c.start()
        await asyncio.gather(churn(c.tables["n1"], 1500), churn(c.tables["n2"], 1500, base=50_000))
        await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
        await converge(c.table("n2"), c.cache("n1", "n2"), c.cache("n3", "n2"))
        assert not c.svc["n3"].cache("n1").keys() & c.svc["n3"].cache("n2").keys()

    run(net, body)


def test_real_tcp_connections_are_replicated(net: Net) -> None:
    """Entries the kernel made itself (real handshakes over lo, marked by a ct rule)."""
    n1 = net.nodes["n1"]
    sh_in(n1, "nft", "-f", "-", stdin=(
        "table ip cvmark {\n chain mk {\n  type filter hook output priority 0; policy accept;\n"
        f"  tcp dport 9000 ct mark set ct mark or {BIT:#x}\n }}\n}}\n"))  # fmt: skip

    async def body(c: Cluster) -> None:
        await c.start()
        with tcp_connections(n1, 9000, 5):
            want = await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
            assert sum(1 for f in want if f[0] == "tcp" and f[5] == "ESTABLISHED") >= 5

    run(net, body)


def tcp_connections(ns: str, port: int, n: int) -> _ConnCtx:
    return _ConnCtx(ns, port, n)


class _ConnCtx:
    def __init__(self, ns: str, port: int, n: int) -> None:
        self.ns, self.port, self.n = ns, port, n
        self.socks: list[object] = []

    def __enter__(self) -> _ConnCtx:
        import socket

        def run() -> None:
            srv = socket.create_server(("127.0.0.1", self.port))
            self.socks.append(srv)
            for _ in range(self.n):
                self.socks.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))
                self.socks.append(srv.accept()[0])

        in_netns(self.ns, run)
        assert len(self.socks) == 2 * self.n + 1
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.socks:
            s.close()  # type: ignore[attr-defined]


def test_commit_writes_the_planners_translation(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 1000)
        await converge(c.table("n1"), c.cache("n2", "n1"))
        got = await c.svc["n2"].commit("n1", guest="g1")
        n1_entries = [e for e in await asyncio.to_thread(c.tables["n1"].dump, [GUEST])
                      if e.mark & BIT]  # the replicated ones
        plan = plan_handover(n1_entries, c.t, "g1", "n1", "n2")
        want = {a.entry.key: a.entry for a in plan.writes if a.entry is not None}
        assert got["pushed"] == len(want) > 50 and got["errors"] == 0, got
        held = {e.key: e for e in await asyncio.to_thread(c.tables["n2"].dump, [GUEST])}
        assert held.keys() == want.keys()
        for key, e in want.items():
            h = held[key]
            assert (h.tuple_reply, h.mark, h.status & REQUIRED) == (e.tuple_reply, e.mark, REQUIRED)
            assert h.mark & 0xFF == 1 and h.tcp and h.tcp.flags_orig & TcpFlag.BE_LIBERAL
        again = await c.svc["n2"].commit("n1", guest="g1")
        assert again["pushed"] == 0 and again["unchanged"] == len(want), again

    run(net, body)


# --- security: hostile datagrams through a real socket ---------------------------------------

IP_TRANSPARENT = 19  # linux/in.h: send from an address this host does not hold (a spoofer)


def send_from(ns: str, dest: tuple[str, int], datagrams: list[bytes],
              source: tuple[str, int] | None = None) -> None:  # fmt: skip
    """Send from namespace ``ns``; ``source``: forge that source address (IP_TRANSPARENT)."""
    import socket

    def run() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            if source is not None:
                s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                s.bind(source)
            for d in datagrams:
                s.sendto(d, dest)

    in_netns(ns, run)


def stranger(net: Net) -> str:
    """The bridge's own namespace as a host on the sync segment, 10.99.0.9."""
    sh("ip", "-n", net.bridge, "addr", "add", "10.99.0.9/24", "dev", "br0")
    return net.bridge


def as_node(i: int) -> tuple[str, int]:
    return (f"10.99.0.{i}", PORT)


def peer_of(c: Cluster, at: str, node: str) -> dict:
    return {q["node"]: q for q in c.svc[at].status()["peers"]}[node]


def test_hostile_datagrams_are_counted_and_never_applied(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 300)
        await converge(c.table("n1"), c.cache("n2", "n1"))
        s1 = c.svc["n1"].status()
        p = peer_of(c, "n2", "n1")
        tag, boot, nxt = 1, s1["boot"], p["expected_seq"]
        forged = replace(entries(1, base=777_777)[0], mark=BIT | 0x77)
        rec = encode_upsert(forged)
        good = Codec(KEY)
        data = good.seal(MsgType.DATA, tag, boot, nxt - 1, rec, count=1)
        attacks = {
            "bad_hmac": Codec(b"not-the-cluster-key-at-all-0001!").seal(
                MsgType.DATA, tag, boot, nxt, rec, count=1),
            "truncated": data[:30],
            "oversized": good.seal(MsgType.DATA, tag, boot, nxt, rec * 300, count=300),
            "bad_version": data[:2] + b"\x02" + data[3:],
            "record_bounds": good.seal(MsgType.DATA, tag, boot, nxt, rec[:-7], count=1),
            "old": data,  # a replay: seq already applied
            "stale_boot": good.seal(MsgType.DATA, tag, boot - (1 << 32), nxt, rec, count=1),
            "unknown_sender": good.seal(MsgType.DATA, 99, boot, 1, rec, count=1),
        }  # fmt: skip
        assert len(attacks["oversized"]) > 9216 and len(attacks["truncated"]) < HEADER_SIZE + 16
        before = c.svc["n2"].status()["receiver"]
        # a stranger on the sync segment, forging n1's address, then from its own, and n3
        ns = stranger(net)
        send_from(ns, as_node(2), list(attacks.values()), source=as_node(1))
        send_from(ns, as_node(2), [attacks["bad_hmac"], data])
        send_from(net.nodes["n3"], as_node(2), [attacks["bad_hmac"]])

        def counted(st: dict[str, Any]) -> bool:
            peers = {q["node"]: q for q in st["peers"]}
            return (all(st["receiver"].get(r, 0) > before.get(r, 0)
                        for r in [*attacks, "wrong_source"])
                    and st["unattributed_drops"].get("bad_hmac", 0) >= 1
                    and peers["n3"]["drops"].get("bad_hmac", 0) >= 1)
        after = await eventually(c.svc["n2"].status, counted)
        for reason in [*attacks, "wrong_source"]:
            assert after["receiver"].get(reason, 0) > before.get(reason, 0), reason
        assert after["unattributed_drops"]["bad_hmac"] >= 1
        n3 = {q["node"]: q for q in after["peers"]}["n3"]
        assert n3["drops"]["bad_hmac"] == 1
        assert forged.key not in c.svc["n2"].cache("n1")
        await converge(c.table("n1"), c.cache("n2", "n1"))

    run(net, body)


def test_replayed_hello_and_resync_request_cost_no_resync(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 300)
        await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))
        while any(svc.sender.resync_due for svc in c.svc.values()):  # the joins' own resyncs
            await asyncio.sleep(0.1)
        n2 = c.svc["n2"]
        hello = n2.codec.seal(MsgType.HELLO, 2, n2.boot, n2.sender.last_seq % (1 << 32), b"")
        request = n2.codec.encode(Message(MsgType.RESYNC_REQUEST, 2, n2.boot, target_tag=1,
                                          target_boot=c.svc["n1"].boot, first=0))  # fmt: skip
        started = {n: c.svc[n].sender.counters["resync_started"] for n in c.svc}
        ns = stranger(net)
        for _ in range(20):  # n2's HELLO and its resync request, captured and replayed
            send_from(ns, as_node(1), [hello, request], source=as_node(2))
            send_from(ns, as_node(3), [hello], source=as_node(2))
            await asyncio.sleep(0.05)
        sent = await eventually(lambda: c.svc["n1"].sender.counters,  # all of them heard
                                lambda s: s["resync_covered"] >= 20 and s["resync_request"] >= 20)
        await asyncio.sleep(1.5)  # past resync_gap: a deferred resync would have started
        assert {n: c.svc[n].sender.counters["resync_started"] for n in c.svc} == started
        assert sent["resync_covered"] >= 20 and sent["resync_request"] >= 20, dict(sent)
        await churn(c.tables["n1"], 100, base=3000)
        await converge(c.table("n1"), c.cache("n2", "n1"), c.cache("n3", "n1"))

    run(net, body)


def test_an_implausible_seq_jump_does_not_move_the_expectation(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 200)
        await converge(c.table("n1"), c.cache("n2", "n1"))
        n1, nxt = c.svc["n1"], peer_of(c, "n2", "n1")["expected_seq"]
        forged = replace(entries(1, base=888_888)[0], mark=BIT | 0x77)
        jump = n1.codec.seal(MsgType.DATA, 1, n1.boot, (nxt + (1 << 30)) % (1 << 32),
                             encode_upsert(forged), count=1)  # authenticated, seq + 2**30
        send_from(stranger(net), as_node(2), [jump], source=as_node(1))
        p = await peer_status(c, "n2", "n1", until=lambda p: "implausible" in p["drops"])
        assert p["drops"].get("implausible") == 1 and p["expected_seq"] == nxt, p
        assert forged.key not in c.svc["n2"].cache("n1")
        # n1's genuine datagrams still apply: the receiver never lost its place
        await churn(c.tables["n1"], 200, base=4000)
        await converge(c.table("n1"), c.cache("n2", "n1"))
        assert peer_of(c, "n2", "n1")["skipped"] == 0

    run(net, body)


def test_a_tag_is_heard_from_its_own_address_only_and_answered_there(net: Net) -> None:
    import socket

    async def body(c: Cluster) -> None:
        await c.start()
        await churn(c.tables["n1"], 100)
        await converge(c.table("n1"), c.cache("n2", "n1"))
        n2 = c.svc["n2"]
        ns = stranger(net)
        listen = in_netns(ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        listen.bind(("10.99.0.9", PORT))
        listen.settimeout(0.5)
        # a NACK claiming to be n2, from the stranger's address: n1 must not answer it there
        nack = n2.codec.encode(Message(MsgType.NACK, 2, n2.boot, target_tag=1,
                                       target_boot=c.svc["n1"].boot, first=0, last=3))  # fmt: skip
        listen.sendto(nack, as_node(1))
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(listen.recvfrom, 65536)
        listen.close()
        assert c.svc["n1"].status()["receiver"]["wrong_source"] == 1
        assert c.svc["n1"].sender.counters["nack"] == 0

    run(net, body)


def test_an_older_boot_is_never_taken_back_also_after_the_receivers_restart(net: Net) -> None:
    async def body(c: Cluster) -> None:
        await c.start()
        t1 = c.tables["n1"]
        made = entries(100)
        await asyncio.to_thread(t1.push, made)
        await converge(c.table("n1"), c.cache("n2", "n1"))
        old = c.svc["n1"]
        gone = made[0]
        # a datagram of n1's first life naming an entry n1 destroys later
        replay = old.codec.seal(MsgType.DATA, 1, old.boot, peer_of(c, "n2", "n1")["expected_seq"],
                                encode_upsert(gone), count=1)  # fmt: skip
        await asyncio.to_thread(t1.delete, [gone])
        await c.stop("n1")
        await c.start("n1")
        await converge(c.table("n1"), c.cache("n2", "n1"))
        assert gone.key not in c.svc["n2"].cache("n1")
        await c.stop("n1")  # n1 goes silent, for longer than dead_after
        await asyncio.sleep(0.6)
        ns = stranger(net)
        send_from(ns, as_node(2), [replay], source=as_node(1))
        p = await peer_status(c, "n2", "n1", until=lambda p: "stale_boot" in p["drops"])
        assert gone.key not in c.svc["n2"].cache("n1")
        assert p["drops"]["stale_boot"] >= 1
        # n2 restarts: what it saw survives in its state file, so the replay is refused still
        await c.stop("n2")
        await c.start("n2")
        send_from(ns, as_node(2), [replay], source=as_node(1))
        rx = await eventually(lambda: c.svc["n2"].status()["receiver"],
                              lambda r: r.get("stale_boot", 0) >= 1)
        assert rx["stale_boot"] >= 1
        assert gone.key not in c.svc["n2"].cache("n1")
        result = await c.svc["n2"].commit("n1")
        assert result["pushed"] == 0, result  # nothing of the old life is written

    run(net, body, receiver_config=ReceiverConfig(dead_after=0.5))
