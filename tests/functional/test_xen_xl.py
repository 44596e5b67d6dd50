"""``xl migrate`` on Xen's calling convention: two dom0s in namespaces, the stand-in xl
doing what libxl does in libxl's order, Debian's real vif-bridge wrapped by convergent's vif
script (installed with the install-hooks code) reporting to each node's agent socket (the
agent's real API server, recording), and the xl adapter driving and watching.

What must hold, from LIBVIRT-XEN.md §5 and tools/xl/xl_migrate.c: on the destination the
vif ``online`` runs for ``NAME--incoming`` before the guest resumes; on the source the vif
``offline`` runs for ``NAME--migratedaway`` after it; the guest answers only through the
node it runs on; a failure after GO destroys the destination's copy and resumes the
source with no vif call there.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.hypervisor import EventKind, GuestEvent, HookCall, HypervisorError, Progress
from orchestrator.xen.adapter import XenHypervisor
from orchestrator.xen.install import HookConf, install
from orchestrator.xen.lab.dom0 import Dom0, write_ssh
from orchestrator.xen.vifcall import parse_vif_call
from orchestrator.xen.xllist import parse_list_long
from tests.functional.test_xen_vif import Agent

pytestmark = pytest.mark.root
GUEST_IP, MAC = "10.5.5.201", "52:54:00:00:02:01"
CFG = f"""\
# a PV guest as an operator writes it
name = "guest1"
uuid = "039e9ee6-4a84-3055-4c81-8ba426ae2656"
memory = 128
vcpus = 1
vif = [ 'mac={MAC},bridge=guestbr0,ip={GUEST_IP},script=convergent-vif' ]
"""


@dataclass
class Node:
    name: str
    dom0: Dom0
    agent: Agent
    guest_netns: str

    def env(self) -> dict[str, str]:
        return self.dom0.env(self.guest_netns)

    def xl(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.dom0.netns,
                               str(self.dom0.bin_dir / "xl"), *args],
                              env={**self.env(), **(env or {})}, capture_output=True, text=True,
                              timeout=120)

    def adapter(self, ssh: Path) -> XenHypervisor:
        return XenHypervisor({"xl": f"ip netns exec {self.dom0.netns} {self.dom0.bin_dir}/xl",
                              "ssh": str(ssh), "env": self.env(), "poll_s": 0.02,
                              "resync_s": 2.0}, self.name)

    def events(self) -> list[GuestEvent]:
        return [e for c in self.agent.calls
                if (e := parse_vif_call(HookCall.from_dict(c), self.name)) is not None]

    def reaches_guest(self, tries: int = 5) -> bool:
        """Pinged through this node's bridge (a loaded machine gets a few tries)."""
        for _ in range(tries):
            if subprocess.run(["ip", "netns", "exec", self.dom0.netns, "ping", "-c", "1", "-W",
                               "1", GUEST_IP], capture_output=True).returncode == 0:
                return True
        return False


@dataclass
class Cluster:
    nodes: dict[str, Node]
    guest: str
    ssh: Path
    cfg: Path


@pytest.fixture
def cluster(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Cluster]:
    guest = netns("xg")
    bin_dir = tmp_path / "bin"
    nodes: dict[str, Node] = {}
    agents = []
    for i, name in enumerate(("n1", "n2"), start=1):
        ns = netns(f"x{name}")
        for cmd in (["link", "add", "guestbr0", "type", "bridge"],
                    ["addr", "add", f"10.5.5.{250 + i}/24", "dev", "guestbr0"],
                    ["link", "set", "guestbr0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        dom0 = Dom0(tmp_path / name, ns, bin_dir)
        dom0.build()
        agent = Agent(tmp_path / "run" / f"agent-{name}.sock")
        agents.append(agent)
        install(dom0.root, HookConf(str(agent.path), str(tmp_path / "spool" / name), name))
        nodes[name] = Node(name, dom0, agent, guest)
    ssh = write_ssh(bin_dir, {n: node.dom0 for n, node in nodes.items()}, guest)
    cfg = tmp_path / "guest1.cfg"
    cfg.write_text(CFG)
    try:
        yield Cluster(nodes, guest, ssh, cfg)
    finally:
        for a in agents:
            a.close()


def boot(c: Cluster, on: str) -> None:
    res = c.nodes[on].xl("create", str(c.cfg))
    assert res.returncode == 0, res.stderr
    for cmd in (["addr", "add", f"{GUEST_IP}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
        subprocess.run(["ip", "-n", c.guest, *cmd], check=True)


async def migrate_watching(c: Cluster, src: str, dst: str) -> tuple[
        list[Progress], list[GuestEvent], BaseException | None]:
    """S's adapter runs xl migrate while D's adapter watches its events."""
    seen: list[GuestEvent] = []
    steps: list[Progress] = []
    watcher = c.nodes[dst].adapter(c.ssh)

    async def watch() -> None:
        async for ev in watcher.events():
            seen.append(ev)

    task = asyncio.create_task(watch())
    await asyncio.wait_for(watcher.watching.wait(), 10)
    error: BaseException | None = None
    try:
        await c.nodes[src].adapter(c.ssh).migrate("guest1", dst, steps.append)
    except HypervisorError as exc:
        error = exc
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return steps, seen, error


def test_create_migrate_and_destroy_in_libxls_order(cluster: Cluster) -> None:
    c = cluster
    n1, n2 = c.nodes["n1"], c.nodes["n2"]
    boot(c, "n1")
    assert [(e.kind, e.guest) for e in n1.events()] == [(EventKind.STARTED, "guest1")]
    assert n1.reaches_guest() and not n2.reaches_guest(1)
    (dom,) = parse_list_long(n1.xl("list", "-l").stdout)
    assert (dom.name, dom.domid, dom.macs) == ("guest1", 1, (MAC,))
    info = asyncio.run(n1.adapter(c.ssh).describe("guest1"))
    assert (info.node, info.running, [str(a) for a in info.addresses]) == ("n1", True,
                                                                           [GUEST_IP])

    steps, seen, error = asyncio.run(migrate_watching(c, "n1", "n2"))
    assert error is None
    assert [s.phase for s in steps if s.phase != "memory"] == ["starting", "paused", "resumed",
                                                              "done"]
    assert any(s.phase == "memory" for s in steps)
    # D: online for the incoming copy; S: offline for the copy handed over; nothing else
    (incoming,) = n2.events()
    assert (incoming.kind, incoming.guest) == (EventKind.INCOMING, "guest1")
    assert [(e.kind, e.guest) for e in n1.events()][1:] == [(EventKind.GONE, "guest1")]
    gone = n1.events()[1]
    resumed = [e for e in seen if e.kind is EventKind.RESUMED]
    assert [e.guest for e in resumed] == ["guest1"] and resumed[0].node == "n2"
    # online before the resume, offline after it
    assert incoming.at < resumed[0].at and gone.at > incoming.at
    assert n2.reaches_guest() and not n1.reaches_guest(1)
    (dom2,) = parse_list_long(n2.xl("list", "-l").stdout)
    assert (dom2.name, dom2.domid) == ("guest1", 1)  # n2's own first domid
    assert parse_list_long(n1.xl("list", "-l").stdout) == []
    assert not [p for p in n1.dom0.tree() if p.startswith(("/local/domain/1", "/vm/"))]

    res = n2.xl("destroy", "guest1")
    assert res.returncode == 0, res.stderr
    assert [e.kind for e in n2.events()] == [EventKind.INCOMING, EventKind.STOPPED]
    assert subprocess.run(["ip", "-n", c.guest, "link", "show", "eth0"],
                          capture_output=True).returncode != 0  # the guest lost its NIC


@pytest.mark.parametrize("fault", ["unpause", "rename"])
def test_failure_after_go_destroys_the_copy_and_the_source_resumes(
        cluster: Cluster, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    n1, n2 = c.nodes["n1"], c.nodes["n2"]
    boot(c, "n1")
    monkeypatch.setenv("CONVERGENT_XL_FAULT", fault)  # reaches n2's migrate-receive by ssh
    steps, seen, error = asyncio.run(migrate_watching(c, "n1", "n2"))
    assert isinstance(error, HypervisorError) and "Migration failed" in str(error)
    assert steps[-1].phase == "aborted"
    kinds = [(e.kind, e.guest) for e in n2.events()]
    # destroyed after the rename: its offline names the guest plainly (the agent's table
    # aborts the open migration on STOPPED); before it, the --incoming copy FAILED
    after = EventKind.STOPPED if fault == "unpause" else EventKind.FAILED
    assert kinds == [(EventKind.INCOMING, "guest1"), (after, "guest1")]
    assert [e.kind for e in seen] == [EventKind.FAILED]  # never ran there
    assert [e.kind for e in n1.events()] == [EventKind.STARTED]  # no vif call on S
    assert n1.reaches_guest() and not n2.reaches_guest(1)
    (dom,) = parse_list_long(n1.xl("list", "-l").stdout)
    assert dom.name == "guest1"
    assert "-b----" in n1.xl("list", "guest1").stdout  # resumed, not paused
    assert parse_list_long(n2.xl("list", "-l").stdout) == []
    assert not [p for p in n2.dom0.tree() if "/backend/vif/" in p]


def test_a_broken_stream_never_attaches_devices_on_the_destination(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    n1, n2 = c.nodes["n1"], c.nodes["n2"]
    boot(c, "n1")
    monkeypatch.setenv("CONVERGENT_XL_FAULT", "stream")
    steps, seen, error = asyncio.run(migrate_watching(c, "n1", "n2"))
    assert error is not None and [s.phase for s in steps][-1] == "aborted"
    assert n2.events() == []  # no vif was attached: nothing to report
    # the --incoming copy vanished; a watch that reads its name only after it is gone
    # cannot tell it was one, and nothing was prepared for it anyway
    assert [e.kind for e in seen] in ([], [EventKind.FAILED])
    assert n1.reaches_guest() and "-b----" in n1.xl("list", "guest1").stdout


def test_xl_refuses_what_xl_refuses(cluster: Cluster) -> None:
    n1 = cluster.nodes["n1"]
    res = n1.xl("destroy", "nosuch")
    assert res.returncode == 1 and "nosuch is an invalid domain identifier" in res.stderr
    res = n1.xl("migrate", "nosuch", "n2")
    assert res.returncode == 1
    bad = cluster.cfg.with_name("bad.cfg")
    bad.write_text('name = "g"\nvif = [ "bridge=guestbr0" ]\n')
    res = n1.xl("create", str(bad))
    assert res.returncode == 1 and "no mac" in res.stderr


