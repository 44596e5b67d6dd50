"""Migration coordinator on the lab: race gate, gratuitous ARP, refusals, abort."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterator

import pytest

from orchestrator.agent.client import AgentError, acall
from orchestrator.errors import MigrationError
from orchestrator.lab import netns as ns
from orchestrator.lab.hypervisor import VifMover
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import bootstrap_ownership, migrate, node_handles, store_url
from orchestrator.migration.coordinator import Coordinator
from orchestrator.store import open_store
from tests.conftest import running_lab
from tests.functional.nsock import socket_in

pytestmark = pytest.mark.root
WS = "192.168.122.1"


@pytest.fixture
def lab() -> Iterator[Lab]:
    yield from running_lab("m")


@pytest.fixture
def bare_lab() -> Iterator[Lab]:
    """No agents: the test drives a coordinator itself (its control run must not be gated
    by an agent that knows nothing of it)."""
    yield from running_lab("mb", agents=False)


def gate_drops(lab: Lab, node: str) -> int:
    out = ns.in_ns(lab.names.node(node), "nft", "list", "chain", "ip", "convergent", "race_gate")
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


def established_pair(lab: Lab, port: int) -> tuple[socket.socket, socket.socket]:
    """A guest-initiated TCP connection guest -> workstation (SNATed by the hosting node)."""
    srv = socket_in(lab.names.workstation)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((WS, port))
    srv.listen(1)
    cli = socket_in(lab.names.guest("guest1"))
    cli.settimeout(5)
    cli.connect((WS, port))
    conn, peer = srv.accept()
    srv.close()
    conn.settimeout(5)
    assert peer[0] == "192.168.122.11"  # SNATed by n1
    cli.sendall(b"hello")
    assert conn.recv(10) == b"hello"
    return cli, conn


def received_within(conn: socket.socket, seconds: float) -> bytes:
    conn.settimeout(seconds)
    try:
        return conn.recv(100)
    except TimeoutError:
        return b""


async def _coordinator(lab: Lab, handover: bool) -> tuple[Coordinator, object]:
    store = await open_store(store_url(lab))
    await bootstrap_ownership(lab, store)
    return Coordinator(lab.topology(), store, node_handles(lab), handover=handover), store


@pytest.mark.parametrize("handover", [True, False], ids=["gated", "control"])
def test_guest_packet_racing_the_handover_is_dropped_not_snatted(bare_lab, handover):
    lab = bare_lab
    cli, conn = established_pair(lab, 7100)

    async def scenario() -> bytes:
        coord, store = await _coordinator(lab, handover)
        h = await coord.prepare("guest1", "n1", "n2")
        # precopy delayed past the move; the guest re-ARPs and now routes through n2
        VifMover(lab, keep_arp=False).move_vif("guest1", "n1", "n2")
        cli.sendall(b"raced")
        early = await asyncio.to_thread(received_within, conn, 0.6)
        await coord.precopy(h)
        await coord.cutover(h)
        await coord.finalize(h)
        await store.close()
        return early

    early = asyncio.run(scenario())
    if handover:
        assert early == b"", "the racing segment got through before the handover"
        assert gate_drops(lab, "n2") >= 1
        # once the entries are there, TCP's retransmission carries the data on (its
        # backoff doubles: under load the next try can be several seconds away)
        assert received_within(conn, 20) == b"raced"
        conn.sendall(b"back")
        assert cli.recv(10) == b"back"
    else:
        # control: no gate, no handover: n2 SNATs the segment to its own address and the
        # workstation's stack answers with a reset; the application never sees the data
        assert early == b""
        assert gate_drops(lab, "n2") == 0
        assert received_within(conn, 2) == b""
        cli.settimeout(20)  # the reset answers a retransmission, whenever that comes
        with pytest.raises(ConnectionResetError):
            cli.recv(10)
    cli.close()
    conn.close()


def test_gratuitous_arp_moves_a_guest_that_kept_the_old_gateway_mac(lab):
    t = lab.topology()
    g_ns = lab.names.guest("guest1")
    ns.in_ns(g_ns, "ping", "-c1", "-W1", str(t.cluster.gateway))  # learn n1's MAC
    report = asyncio.run(migrate(lab, "guest1", "n2"))
    assert report.dst == "n2"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        neigh = ns.ip(g_ns, "neigh", "show", str(t.cluster.gateway))
        if t.node("n2").bridge_mac in neigh:
            break
        time.sleep(0.05)
    assert t.node("n2").bridge_mac in neigh, neigh


def test_control_move_keeps_the_stale_gateway_mac(lab):
    """Without the destination's announcement the pinned entry stays on n1 (the test above
    can fail)."""
    t = lab.topology()
    g_ns = lab.names.guest("guest1")
    ns.in_ns(g_ns, "ping", "-c1", "-W1", str(t.cluster.gateway))
    asyncio.run(migrate(lab, "guest1", "n2", handover=False))
    time.sleep(0.3)
    assert t.node("n1").bridge_mac in ns.ip(g_ns, "neigh", "show", str(t.cluster.gateway))


def agent(lab: Lab, node: str, op: str, **args: object) -> dict:
    return asyncio.run(acall(lab.topology().agent.socket(node), op, **args))


def test_refusals_and_ownership(lab):
    h = agent(lab, "n2", "migration.prepare", guest="guest1", src="n1")
    with pytest.raises(AgentError, match="already has an active migration"):
        agent(lab, "n3", "migration.prepare", guest="guest1", src="n1")
    with pytest.raises(AgentError, match="already migrating to n2"):
        agent(lab, "n2", "migration.prepare", guest="guest1", src="n1")
    with pytest.raises(AgentError, match="unknown node 'n9'"):
        agent(lab, "n3", "migration.prepare", guest="guest1", src="n9")
    with pytest.raises(MigrationError, match="unknown node 'n9'"):
        asyncio.run(migrate(lab, "guest1", "n9"))
    agent(lab, "n2", "migration.abort", guest="guest1", reason="operator gave up")
    assert owners(lab) == [("n1", 1)]
    r = asyncio.run(migrate(lab, "guest1", "n3"))
    assert (r.src, r.dst) == ("n1", "n3")
    assert owners(lab) == [("n3", 2)]  # one owner, epoch advanced once
    assert h["phase"] == "precopy"


def owners(lab: Lab) -> list[tuple[str | None, int]]:
    async def read() -> list[tuple[str | None, int]]:
        store = await open_store(store_url(lab))
        try:
            return [(o.node, o.epoch) for o in await store.list_ownership(guest="guest1")]
        finally:
            await store.close()
    return asyncio.run(read())


def test_abort_removes_what_the_destination_got(lab):
    cli, conn = established_pair(lab, 7101)
    agent(lab, "n2", "migration.prepare", guest="guest1", src="n1")
    pushed = ns.in_ns(lab.names.node("n2"), "conntrack", "-L", "-p", "tcp", "--dport", "7101")
    assert "dport=7101" in pushed
    agent(lab, "n2", "migration.abort", guest="guest1", reason="test")
    left = ns.in_ns(lab.names.node("n2"), "conntrack", "-L", "-p", "tcp", "--dport", "7101")
    assert "dport=7101" not in left
    assert gate_drops(lab, "n2") == 0 and "elements" not in ns.in_ns(
        lab.names.node("n2"), "nft", "list", "set", "ip", "convergent", "race_gate")
    cli.sendall(b"still")  # the guest never left n1: its flow is untouched
    assert received_within(conn, 2) == b"still"
    cli.close()
    conn.close()


def test_lab_migrate_control_is_the_demos_control(lab):
    """`lab migrate --control` moves as `lab demo --control` does (plan.move_options): no
    handover, the guest learns its gateway afresh, and keeps the rest of its table."""
    import subprocess
    import sys

    t = lab.topology()
    g_ns = lab.names.guest("guest1")
    for peer in (t.cluster.gateway, t.node("n3").guest_ip):
        ns.in_ns(g_ns, "ping", "-c1", "-W1", str(peer))
    before = dict(ns.neighbours(g_ns, "eth0"))
    got = subprocess.run([sys.executable, "-m", "orchestrator", "lab", "migrate", "guest1",
                          "--to", "n2", "--control", "--name", lab.name],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CONVERGENT_LAB_DIR": str(lab.dir.parent)})
    assert got.returncode == 0, got.stderr
    after = dict(ns.neighbours(g_ns, "eth0"))
    assert after.get(str(t.node("n3").guest_ip)) == before[str(t.node("n3").guest_ip)]
    assert after.get(str(t.cluster.gateway)) != t.node("n1").bridge_mac  # not the stale one
