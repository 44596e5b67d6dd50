"""Handover figures: ``python -m bench.handover --json``.

A 3-node lab (``cvg-bh-<run>-*``, always torn down), guest1 on n1 holding N established
flows (1k, then 10k) that the real coordinator moves to n2, in-process, as
``convergent lab migrate`` does (VifMover moves the vif between the resume signal's
callbacks).

The flows are real plus synthetic:

- real: TCP connections from the workstation through each node's public address to port 80
  on the guest (stateless DNAT; the entry node's tag as mark), and guest-initiated connections
  to the workstation (SNAT by n1). The lab's guest responder answers one request and closes
  within 2 s, so the bench stops it (by pid, in its own lab) and holds port 80 itself: the
  connections stay ESTABLISHED for the whole run;
- synthetic: the rest, pushed into n1's table with the engine's encoder, shaped like the real
  ones: inbound stateless-DNAT entries (``client -> guest:80``, mark 1/2/3: entered via
  n1/n2/n3, NAT null bindings as the kernel gives them) and guest-initiated SNAT entries
  (``guest -> peer:443``, reply NATed to n1's pub_ip: a real ``CTA_NAT_SRC`` binding, so
  ``IPS_SRC_NAT`` is the kernel's own).

Per size, alternating, ``--repeat`` times each (medians reported, samples kept):

handover  ``Coordinator.run`` (prepare, precopy: subscribe + filtered dump + push to D,
          live events followed; the vif moves; cutover: ``MigrationState.timings``, i.e. the
          resume callback's ``cutover`` call: last delta, ownership claim, nft sets, gate,
          ARP; finalize). The cutover is broken down by timing the calls it makes
          (``cutover_breakdown_ms``).
naive     no precopy: at the resume signal, dump S's entries for the guest, translate them
          with the same planner, push them to D one netlink request per entry, each waiting
          for its ACK (``NLM_F_ACK``; EEXIST -> one ``set`` request + ACK), then the same
          bookkeeping (ownership claim, nft sets, gate, ARP). The engine's own encoder and
          socket: the fairest naive (pyroute2's ``entry('add')`` does the same round trip
          with a slower encoder, ~1k/s in bench.conntrack).
churn     the handover again while S's table changes during precopy: ``--churn`` entries
          created and as many updated on S (half before a pause, half right before the move,
          so part of it is the cutover's final delta).
settled   the handover once more with ``--settle`` seconds between precopy and the move (a
          VM's memory precopy takes at least that): the follower has caught up by then. The
          main runs move the vif at once, as ``lab migrate`` does.

After every run D's table must hold every entry the plan translates (checked by key).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from types import FrameType
from typing import Any, TypeVar

import structlog
import tenacity

from bench._common import load_average, read_root_sysctl
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.handover.planner import dest_key, plan_handover
from orchestrator.lab import netns as ns
from orchestrator.lab.hypervisor import VifMover
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import bootstrap_ownership, node_handles
from orchestrator.migration.coordinator import Coordinator, MigrationState, NodeHandle
from orchestrator.migration.nodeops import NodeOps, NodeSets, SetChanges
from orchestrator.model.conntrack import (
    Entry,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.netfilter import ctnetlink as nl
from orchestrator.netfilter.conntrack import ConntrackTable, open_socket
from orchestrator.netns import in_netns
from orchestrator.store import open_store
from orchestrator.store.base import Store

T = TypeVar("T")
GUEST, SRC, DST = "guest1", "n1", "n2"
TARGET_CUTOVER_MS = 100
PORT = 80  # the stateless-DNAT service of the default lab config
WS_PORT = 7300  # the workstation's listener for guest-initiated flows
TIMEOUT = 431999  # what the kernel gives an ESTABLISHED entry (5 days)
LIVE = Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED
WS = TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM
TCP_INFO = TcpInfo(TcpState.ESTABLISHED, 7, 7, WS, WS)
CTA_NAT_SRC = 6  # enum ctattr_type
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP = 1, 2  # enum ctattr_nat


# --- the flows -------------------------------------------------------------------------------


def socket_in(netns: str) -> socket.socket:
    """A TCP socket created inside ``netns`` (a socket keeps the namespace it was born in)."""
    return in_netns(netns, socket.socket)


@dataclass
class RealFlows:
    """Connections this process holds open at both ends."""

    pairs: list[tuple[socket.socket, socket.socket]] = field(default_factory=list)
    listeners: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()
        for s in self.listeners:
            s.close()
        self.pairs.clear()
        self.listeners.clear()

    def alive(self, timeout: float = 3.0) -> int:
        """How many still carry a byte each way."""
        ok = 0
        for a, b in self.pairs:
            try:
                a.settimeout(timeout)
                b.settimeout(timeout)
                a.sendall(b"p")
                if b.recv(1) != b"p":
                    continue
                b.sendall(b"q")
                ok += a.recv(1) == b"q"
            except OSError:
                continue
        return ok


def _listener(netns: str, addr: str, port: int) -> socket.socket:
    srv = socket_in(netns)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(64)
    srv.settimeout(5)
    return srv


def _connect(client: socket.socket, srv: socket.socket, dst: tuple[str, int]) -> tuple[
        socket.socket, socket.socket]:  # fmt: skip
    client.settimeout(5)
    client.connect(dst)
    conn, _ = srv.accept()
    client.sendall(b"x")  # data both ways: ESTABLISHED, ASSURED, SEEN_REPLY
    assert conn.recv(1) == b"x"
    conn.sendall(b"y")
    assert client.recv(1) == b"y"
    return client, conn


def stop_guest_responder(lab: Lab) -> None:
    """The lab's guest responder closes each connection within 2 s; port 80 is ours now
    (until nothing in the guest's namespace listens on it any more)."""
    g_ns = lab.names.guest(GUEST)

    @tenacity.retry(stop=tenacity.stop_after_delay(5), wait=tenacity.wait_fixed(0.05),
                    retry=tenacity.retry_if_result(bool))  # fmt: skip
    def stopped() -> str:
        """What still listens on the port (empty: free); each try signals what is left."""
        for pid in map(int, ns.sh(["ip", "netns", "pids", g_ns], check=False).split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return ns.in_ns(g_ns, "ss", "-Hltnp", f"sport = :{PORT}", check=False).strip()

    try:
        stopped()
    except tenacity.RetryError as exc:
        raise RuntimeError(f"port {PORT} in {g_ns} stays taken: "
                           f"{exc.last_attempt.result()}") from None


def open_real_flows(lab: Lab, t: Topology, per_node: int, snat: int) -> RealFlows:
    """``per_node`` inbound connections through each node's public address, ``snat``
    guest-initiated ones (SNATed by n1)."""
    flows = RealFlows()
    ws_ip = str(t.lab.workstation)
    try:
        srv = _listener(lab.names.guest(GUEST), "0.0.0.0", PORT)
        flows.listeners.append(srv)
        for node in t.nodes:
            for _ in range(per_node):
                cli = socket_in(lab.names.workstation)
                flows.pairs.append(_connect(cli, srv, (str(node.pub_ip), PORT)))
        wsrv = _listener(lab.names.workstation, ws_ip, WS_PORT)
        flows.listeners.append(wsrv)
        for _ in range(snat):
            cli = socket_in(lab.names.guest(GUEST))
            flows.pairs.append(_connect(cli, wsrv, (ws_ip, WS_PORT)))
    except BaseException:
        flows.close()
        raise
    return flows


@dataclass(frozen=True)
class Synthetic:
    entry: Entry
    snat_to: IPv4Address | None  # None: null NAT bindings (as a DNAT-ed inbound entry has)


def synthetic(t: Topology, count: int, base: int = 0) -> list[Synthetic]:
    """``count`` entries of guest1 shaped like the real ones: 3 in 5 inbound stateless-DNAT
    (client -> guest:80, mark = the entry node's tag, spread over the nodes), 2 in 5
    guest-initiated SNAT (guest -> peer:443, reply to n1's pub_ip, mark 1)."""
    g = t.guest(GUEST).addresses[0]
    tags = [n.tag for n in t.nodes]
    pub = t.node(SRC).pub_ip
    out = []
    for i in range(base, base + count):
        port = 1024 + i % 60000
        if i % 5 < 3:
            client = IPv4Address(0xC6120000 + i // 60000 * 256 + i % 251)  # 198.18/15
            o = Tuple(client, g, 6, port, PORT)
            e = Entry(o, o.reversed(), LIVE, tags[i % len(tags)], TIMEOUT, 0, TCP_INFO)
            out.append(Synthetic(e, None))
        else:
            peer = IPv4Address(0xC6130000 + i // 60000 * 256 + i % 251)  # 198.19/16
            o = Tuple(g, peer, 6, port, 443)
            e = Entry(o, o.reversed(), LIVE, t.node(SRC).tag, TIMEOUT, 0, TCP_INFO)
            out.append(Synthetic(e, pub))
    return out


def _nat_src(to: IPv4Address | None) -> bytes:
    if to is None:  # an empty CTA_NAT_SRC: the null binding (SRC_NAT_DONE, no SRC_NAT)
        return nl.nest(CTA_NAT_SRC)
    return nl.nest(CTA_NAT_SRC, nl.nla(CTA_NAT_V4_MINIP, to.packed),
                   nl.nla(CTA_NAT_V4_MAXIP, to.packed))  # fmt: skip


def push_synthetic(netns: str, items: list[Synthetic]) -> None:
    """Create the entries with their NAT bindings (the engine pushes un-NATed entries only,
    so the messages are built here from its encoder's parts), batched, errors collected."""
    sock = open_socket(netns)
    errors: dict[int, int] = {}
    buf = bytearray(1 << 16)

    def drain() -> None:
        while True:
            try:
                n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            for mtype, _f, seq, start, _end in nl.iter_messages(buf, n):
                if mtype == nl.NLMSG_ERROR and (err := nl.error_code(buf, start)):
                    errors[seq] = err

    try:
        parts: list[bytes] = []
        for seq, s in enumerate(items, start=1):
            body = nl.encode_entry_body(s.entry) + _nat_src(s.snat_to)
            parts.append(nl.message(nl.MSG_NEW, nl.NLM_F_CREATE | nl.NLM_F_EXCL, seq,
                                    socket.AF_INET, body))  # fmt: skip
            if len(parts) == 200:
                sock.send(b"".join(parts))
                parts.clear()
                drain()
        if parts:
            sock.send(b"".join(parts))
        drain()
    finally:
        sock.close()
    if errors:
        seq, err = next(iter(errors.items()))
        raise RuntimeError(f"synthetic push into {netns}: {len(errors)} errors, first "
                           f"{items[seq - 1].entry}: {os.strerror(err)}")  # fmt: skip


# --- the naive way -----------------------------------------------------------------------------


def push_one_by_one(netns: str, entries: list[Entry]) -> int:
    """One request per entry, each waiting for its ACK; an existing entry gets one ``set``
    request (and its ACK) more. Returns the entries written."""
    sock = open_socket(netns)
    buf = bytearray(1 << 16)
    written = 0

    def ask(msg: bytes, seq: int) -> int:
        sock.send(msg)
        while True:
            n = sock.recv_into(buf)
            for mtype, _f, mseq, start, _end in nl.iter_messages(buf, n):
                if mtype == nl.NLMSG_ERROR and mseq == seq:
                    return nl.error_code(buf, start)

    try:
        seq = 0
        for e in entries:
            seq += 1
            err = ask(nl.encode_create(e, seq, nl.NLM_F_CREATE | nl.NLM_F_EXCL | nl.NLM_F_ACK),
                      seq)  # fmt: skip
            if err == errno.EEXIST:
                seq += 1
                err = ask(nl.encode_create(e, seq, nl.NLM_F_ACK), seq)
            written += err == 0
    finally:
        sock.close()
    return written


# --- instrumentation ---------------------------------------------------------------------------


class Probe:
    """Times, while ``on`` (the cutover), the calls the coordinator makes through its seams:
    each node's :class:`NodeOps` (through :class:`TimedNodeOps`) and the store's
    compare-and-swap calls; the coordinator times its own final delta
    (``MigrationState.steps``)."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[tuple[str, float]] = []

    async def timed(self, name: str, call: Awaitable[T]) -> T:
        if not self.on:
            return await call
        t0 = time.perf_counter()
        try:
            return await call
        finally:
            self.calls.append((name, (time.perf_counter() - t0) * 1000))

    def wrap_store(self, store: Store) -> None:
        """The store calls of a cutover, timed on this instance (the Store ABC has no
        hook for it; only public methods are wrapped)."""
        for attr in ("claim_all", "advance_phase", "record_timing", "list_ownership"):
            fn = getattr(store, attr)

            async def timed(*args: Any, _fn: Any = fn, _name: str = f"store.{attr}",
                            **kwargs: Any) -> Any:  # fmt: skip
                return await self.timed(_name, _fn(*args, **kwargs))

            setattr(store, attr, timed)

    def totals(self, h: MigrationState) -> dict[str, float]:
        """Time per call name, the coordinator's final delta, and ``other``: what those
        leave of the cutover (its own code between them, the event loop's scheduling)."""
        out: dict[str, float] = {}
        for name, ms in self.calls:
            out[name] = out.get(name, 0.0) + ms
        out["final_delta"] = h.steps.get("final_delta", 0.0)
        whole = h.timings.get("cutover")
        if whole is not None:
            # record_timing runs after the coordinator stopped the phase's clock
            out["other"] = whole - sum(v for k, v in out.items() if k != "store.record_timing")
        return out


class TimedNodeOps:
    """A node's :class:`NodeOps`, each call timed by the probe while it is on."""

    def __init__(self, ops: NodeOps, probe: Probe) -> None:
        self._ops, self._probe = ops, probe

    @property
    def node(self) -> str:
        return self._ops.node

    def _name(self, call: str) -> str:
        return f"{self._ops.node}.{call}"

    async def gate(self, addresses: Iterable[IPv4Address], closed: bool) -> None:
        await self._probe.timed(self._name("gate"), self._ops.gate(addresses, closed))

    async def host(self, addresses: Iterable[IPv4Address], hosted: bool) -> None:
        await self._probe.timed(self._name("host"), self._ops.host(addresses, hosted))

    async def arrive(self, addresses: Iterable[IPv4Address], open_gate: bool) -> None:
        await self._probe.timed(self._name("arrive"), self._ops.arrive(addresses, open_gate))

    async def announce_gateway(self, gateway: IPv4Address) -> None:
        await self._probe.timed(self._name("announce_gateway"),
                                self._ops.announce_gateway(gateway))  # fmt: skip

    async def sets(self) -> NodeSets:
        return await self._ops.sets()

    async def update_sets(self, changes: SetChanges) -> None:
        await self._ops.update_sets(changes)

    async def apply_rules(self, topology: Topology, audit: AuditLog | None = None) -> None:
        await self._ops.apply_rules(topology, audit)


def timed_nodes(nodes: dict[str, NodeHandle], probe: Probe) -> dict[str, NodeHandle]:
    return {name: NodeHandle(name, n.table, TimedNodeOps(n.ops, probe))
            for name, n in nodes.items()}


# --- one run -----------------------------------------------------------------------------------


@dataclass
class Bench:
    lab: Lab
    t: Topology
    synth: list[Synthetic] = field(default_factory=list)
    runs: int = 0

    @property
    def addrs(self) -> list[IPv4Address]:
        return list(self.t.guest(GUEST).addresses)

    def ns(self, node: str) -> str:
        return self.lab.names.node(node)

    async def fresh_store(self) -> Store:
        self.runs += 1
        store = await open_store(f"sqlite://{self.lab.dir / f'bench-{self.runs}.db'}")
        await bootstrap_ownership(self.lab, store)
        return store

    def fill(self, total: int, real: int) -> None:
        """n1 holds ``total`` entries of the guest: the real ones plus synthetic."""
        want = total - real
        if want > len(self.synth):
            more = synthetic(self.t, want - len(self.synth), base=len(self.synth))
            push_synthetic(self.ns(SRC), more)
            self.synth += more

    async def reset(self) -> None:
        """Guest back on n1; D empty; nft sets as before a migration; S's synthetic entries
        re-created (the last run made them liberal, which precopy would otherwise skip)."""
        hv = VifMover(self.lab, keep_arp=False)
        where = self.lab.guest_node(self.t, GUEST)
        if where != SRC:
            assert where is not None
            await asyncio.to_thread(hv.move_vif, GUEST, where, SRC)
        with ConntrackTable(self.ns(DST)) as d, ConntrackTable(self.ns(SRC)) as s:
            d.flush()
            s.delete([x.entry.key for x in self.synth])
        await asyncio.to_thread(push_synthetic, self.ns(SRC), self.synth)
        nodes = node_handles(self.lab)
        for name, n in nodes.items():
            await n.ops.host(self.addrs, hosted=name == SRC)
            await n.ops.gate(self.addrs, closed=False)
            n.table.close()

    def count_src(self) -> int:
        with ConntrackTable(self.ns(SRC)) as s:
            return len(s.dump(addresses=self.addrs))

    def expected_keys(self) -> set[Any]:
        with ConntrackTable(self.ns(SRC)) as s:
            entries = s.dump(addresses=self.addrs)
        keys = {dest_key(e, self.t, GUEST, SRC, DST) for e in entries}
        keys.discard(None)
        return keys

    def verify(self, expected: set[Any]) -> dict[str, Any]:
        with ConntrackTable(self.ns(DST)) as d:
            held = {e.key for e in d.dump(addresses=self.addrs)}
        missing = expected - held
        if missing:
            raise RuntimeError(f"D lacks {len(missing)} of {len(expected)} entries, e.g. "
                               f"{next(iter(missing))}")  # fmt: skip
        return {"dest_entries": len(held), "verified": True}

    async def handover(self, churn: int = 0, settle: float = 0.0) -> dict[str, Any]:
        expected = self.expected_keys()
        store = await self.fresh_store()
        probe = Probe()
        nodes = timed_nodes(node_handles(self.lab), probe)
        probe.wrap_store(store)
        coord = Coordinator(self.t, store, nodes, audit=None, handover=True)
        hv = VifMover(self.lab)
        resumed_ms: list[float] = []
        created: list[Entry] = []
        updated: list[Entry] = []
        try:
            async def move(resumed: Callable[[], Awaitable[None]]) -> None:
                if settle:  # the guest's memory precopy: the follower catches up meanwhile
                    await asyncio.sleep(settle)
                if churn:
                    new, touched = await self.churn(nodes[SRC], churn)
                    created.extend(new)
                    updated.extend(touched)

                async def on_resumed() -> None:
                    probe.on = True
                    t0 = time.perf_counter()
                    try:
                        await resumed()
                    finally:
                        resumed_ms.append((time.perf_counter() - t0) * 1000)
                        probe.on = False

                await hv.migrate(GUEST, SRC, DST, on_paused=_nothing, on_resumed=on_resumed)

            h = await coord.run(GUEST, SRC, DST, move)
        finally:
            for n in nodes.values():
                n.table.close()
            await store.close()
        if created:
            expected |= {k for e in created if (k := dest_key(e, self.t, GUEST, SRC, DST))}
        out = {
            "precopy_ms": h.timings.get("precopy"),
            "cutover_ms": h.timings.get("cutover"),
            "resume_callback_ms": resumed_ms[0] if resumed_ms else None,
            "entries": h.entries_pushed,
            "breakdown": probe.totals(h),
            "created": len(created),
            "updated": len(updated),
            **self.verify(expected),
        }
        if created:  # leave S as it was: the real and synthetic entries only
            with ConntrackTable(self.ns(SRC)) as s:
                s.delete([e.key for e in created])
        return out

    async def churn(self, src: NodeHandle, n: int) -> tuple[list[Entry], list[Entry]]:
        """While precopy's follower runs: ``n`` new inbound entries and ``n`` updated ones
        on S, half now, a pause for the follower, half right before the move (the final
        delta). Returns (created, updated)."""
        made = synthetic(self.t, n * 2, base=500_000)
        new = [x.entry for x in made if x.snat_to is None][:n]
        old = [x.entry for x in self.synth[:n]]
        half_new, half_old = len(new) // 2, len(old) // 2
        touched = [replace(e, timeout=TIMEOUT - 7) for e in old]
        await asyncio.to_thread(src.table.push, new[:half_new])
        await asyncio.to_thread(src.table.push, touched[:half_old])
        await asyncio.sleep(0.2)
        await asyncio.to_thread(src.table.push, new[half_new:])
        await asyncio.to_thread(src.table.push, touched[half_old:])
        return new, touched

    async def naive(self) -> dict[str, Any]:
        """No precopy: the resume signal starts a dump of S, the planner's translation, and
        a push to D one request + ACK at a time; then the same bookkeeping as the cutover."""
        expected = self.expected_keys()
        store = await self.fresh_store()
        nodes = node_handles(self.lab)
        coord = Coordinator(self.t, store, nodes, audit=None, handover=False)
        hv = VifMover(self.lab)
        parts: dict[str, float] = {}
        written = 0
        try:
            h = await coord.prepare(GUEST, SRC, DST)
            await nodes[DST].ops.gate(self.addrs, closed=True)  # as the handover's prepare
            await coord.precopy(h)  # handover=False: nothing moves before the resume

            async def on_resumed() -> None:
                nonlocal written
                t0 = time.perf_counter()
                entries = await asyncio.to_thread(nodes[SRC].table.dump, addresses=self.addrs)
                t1 = time.perf_counter()
                plan = plan_handover(entries, self.t, GUEST, SRC, DST)
                writes = [a.entry for a in plan.writes if a.entry is not None]
                t2 = time.perf_counter()
                written = await asyncio.to_thread(push_one_by_one, self.ns(DST), writes)
                t3 = time.perf_counter()
                await coord.cutover(h)
                await nodes[DST].ops.gate(self.addrs, closed=False)
                await nodes[DST].ops.announce_gateway(self.t.cluster.gateway)
                t4 = time.perf_counter()
                parts.update(dump=(t1 - t0) * 1000, plan=(t2 - t1) * 1000,
                             push=(t3 - t2) * 1000, bookkeeping=(t4 - t3) * 1000,
                             total=(t4 - t0) * 1000)  # fmt: skip

            await hv.migrate(GUEST, SRC, DST, on_paused=_nothing, on_resumed=on_resumed)
            await coord.finalize(h)
        finally:
            for n in nodes.values():
                n.table.close()
            await store.close()
        return {"naive_cutover_ms": parts["total"], "naive_entries": written,
                "naive_breakdown": parts, **self.verify(expected)}  # fmt: skip


async def _nothing() -> None:
    return None


# --- the run -------------------------------------------------------------------------------------


def _med(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(statistics.median(got), 1) if got else None


def _med_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: round(statistics.median(d.get(k, 0.0) for d in dicts), 2) for k in keys}


async def measure(bench: Bench, flows: int, real: int, repeat: int, churn: int,
                  settle: float) -> dict[str, Any]:
    bench.fill(flows, real)
    hand: list[dict[str, Any]] = []
    naive: list[dict[str, Any]] = []
    for _ in range(repeat):  # alternating: a shared machine's load hits both alike
        await bench.reset()
        hand.append(await bench.handover())
        await bench.reset()
        naive.append(await bench.naive())
    run: dict[str, Any] = {
        "flows": flows,
        "real_flows": real,
        "precopy_ms": _med([h["precopy_ms"] for h in hand]),
        "cutover_ms": _med([h["cutover_ms"] for h in hand]),
        "naive_cutover_ms": _med([n["naive_cutover_ms"] for n in naive]),
        "entries": hand[-1]["entries"],
        "naive_entries": naive[-1]["naive_entries"],
        "dest_entries": hand[-1]["dest_entries"],
        "verified": all(x["verified"] for x in hand + naive),
        "cutover_breakdown_ms": _med_dicts([h["breakdown"] for h in hand]),
        "naive_breakdown_ms": _med_dicts([n["naive_breakdown"] for n in naive]),
        "samples": {
            "precopy_ms": [round(h["precopy_ms"], 1) for h in hand],
            "cutover_ms": [round(h["cutover_ms"], 1) for h in hand],
            "resume_callback_ms": [round(h["resume_callback_ms"], 1) for h in hand],
            "naive_cutover_ms": [round(n["naive_cutover_ms"], 1) for n in naive],
        },
    }
    if settle:
        await bench.reset()
        st = await bench.handover(settle=settle)
        run["settled"] = {
            "settle_s": settle,
            "cutover_ms": round(st["cutover_ms"], 1),
            "verified": st["verified"],
            "cutover_breakdown_ms": {k: round(v, 2) for k, v in st["breakdown"].items()},
        }
    c = run["cutover_ms"]
    run["speedup_vs_naive"] = round(run["naive_cutover_ms"] / c, 1) if c else None
    if churn:
        await bench.reset()
        ch = await bench.handover(churn=churn)
        run["churn"] = {
            "created": ch["created"],
            "updated": ch["updated"],
            "precopy_ms": round(ch["precopy_ms"], 1),
            "cutover_ms": round(ch["cutover_ms"], 1),
            "entries": ch["entries"],
            "dest_entries": ch["dest_entries"],
            "verified": ch["verified"],
            "cutover_breakdown_ms": {k: round(v, 2) for k, v in ch["breakdown"].items()},
        }
    return run


async def run_all(sizes: list[int], repeat: int, churn: int, per_node: int, snat: int,
                  settle: float = 0.0) -> dict[str, Any]:  # fmt: skip
    env: dict[str, Any] = {
        "kernel": os.uname().release, "cpus": os.cpu_count(), "load_before": load_average(),
        "nf_conntrack_max": read_root_sysctl("net.netfilter.nf_conntrack_max"),
        "repeat": repeat,
    }  # fmt: skip
    lab = Lab(f"bh-{uuid.uuid4().hex[:6]}")
    flows: RealFlows | None = None
    try:
        t = await asyncio.to_thread(lab.up, 3)
        stop_guest_responder(lab)
        flows = open_real_flows(lab, t, per_node, snat)
        bench = Bench(lab, t)
        real = bench.count_src()  # the real flows' entries on n1
        runs = [await measure(bench, n, real, repeat, churn, settle) for n in sorted(sizes)]
        await bench.reset()
        alive = f"{flows.alive()}/{len(flows.pairs)}"
    finally:
        if flows is not None:
            flows.close()
        lab.down()
    env["load_after"] = load_average()
    biggest = runs[-1]
    return {
        "runs": runs,
        "target_cutover_ms": TARGET_CUTOVER_MS,
        "target_flows": biggest["flows"],
        "within_target": biggest["cutover_ms"] is not None
        and biggest["cutover_ms"] <= TARGET_CUTOVER_MS,
        "real_flows_alive_after_all_runs": alive,
        "naive": "dump S at the resume signal, plan, push one netlink request per entry "
                 "waiting for each ACK (the engine's encoder), then the same bookkeeping",
        "env": env,
    }


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _fds(n: int) -> Iterator[None]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(n, hard)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.handover", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--flows", type=int, nargs="+", default=[1000, 10_000],
                        help="guest entries per run (1000 10000)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--churn", type=int, default=300,
                        help="entries created and as many updated on S during precopy, in "
                             "one extra run per size (0: skip)")  # fmt: skip
    parser.add_argument("--real-per-node", type=int, default=4,
                        help="real inbound connections through each node (4)")
    parser.add_argument("--real-snat", type=int, default=8,
                        help="real guest-initiated connections (8)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="one extra run per size with this pause (s) between precopy and "
                             "the move, as a VM's memory precopy gives (0: skip)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.handover needs root (network namespaces)")
    # the coordinator's log lines go to stderr: stdout carries the JSON alone
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through ``finally``: lab.down()
        signal.signal(sig, _on_signal)
    with _fds(4096):
        figures = asyncio.run(run_all(args.flows, args.repeat, args.churn,
                                      args.real_per_node, args.real_snat, args.settle))
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
