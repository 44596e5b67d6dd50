"""The libvirt lab and the libvirt adapter against real libvirtd + QEMU (TCG): one lab
and one VM boot for the module, no agents (tests/functional/test_kvm_e2e.py adds them).

The VM is a real Debian kernel with OpenSSH and Python (kvm/image.py), on node n1's guest
bridge; every move is a real live migration between two libvirtd."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.hypervisor import EventKind, GuestEvent, Progress, open_hypervisor
from orchestrator.lab.check import parse_answer, probe, run_checks
from tests.conftest import unique
from tests.functional.kvm_support import driver, kvm_skip_reason, libvirt_lab, ssh_guest, up

pytestmark = [pytest.mark.root, pytest.mark.skipif(kvm_skip_reason() is not None,
                                                   reason=kvm_skip_reason() or "")]
GUEST = "guest1"


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    lab = libvirt_lab(unique("kv"))
    try:
        up(lab, agents=False)
        yield lab
    finally:
        lab.down()


def where(lab: Any) -> str | None:
    node: str | None = lab.guest_node(lab.topology(), GUEST)
    return node


def boot_id(lab: Any) -> str:
    return ssh_guest(lab, "cat /proc/sys/kernel/random/boot_id").strip()


def test_the_vm_answers_through_every_nodes_public_address(lab: Any) -> None:
    t = lab.topology()
    assert where(lab) == "n1"
    for node in t.nodes:
        a = parse_answer(probe(lab.names.workstation, "tcp", str(node.pub_ip), 80)["answer"])
        assert a["name"] == GUEST and a["local"] == "10.5.5.201:80", node.name
        assert a["peer"].startswith(str(t.lab.workstation)), node.name  # stateless DNAT
    # `lab check` on a VM: every service through every node, and the VM's own outbound
    # connection SNATed to its node's address (the probe runs inside the VM, over ssh)
    checks = run_checks(lab)
    assert [c.name for c in checks if not c.passed] == [], [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    assert any(c.name == f"{GUEST} outbound SNAT via n1" for c in checks)
    assert any(c.name.startswith("ntp udp/123 via n3") for c in checks)  # the responder's


def test_hooks_are_installed_and_libvirtd_runs_them(lab: Any) -> None:
    t = lab.topology()
    for node in t.nodes:
        link = driver(lab).daemon(t, node.name).hooks_dir / "qemu.d" / "convergent"
        assert link.is_symlink() and link.resolve().name == "libvirt-qemu"
    # no agent runs: the boot on n1 went through the hook, which spooled its calls
    spooled = sorted(t.agent.spool("n1").glob("*.call.json"))
    assert [p.read_text().count('"started"') > 0 for p in spooled].count(True) >= 1


def test_virsh_migrate_live_moves_the_running_vm(lab: Any) -> None:
    t = lab.topology()
    before = boot_id(lab)
    driver(lab).virsh_migrate(t, GUEST, "n1", "n2")
    assert where(lab) == "n2" and driver(lab).state(t, GUEST, "n1") == ""
    driver(lab).virsh_migrate(t, GUEST, "n2", "n1", p2p=True)
    assert where(lab) == "n1"
    assert boot_id(lab) == before  # the same running kernel: migrated, not rebooted


async def _follow(hv: Any, seen: list[GuestEvent]) -> None:
    async for ev in hv.events():
        seen.append(ev)


async def _until(pred: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def test_adapter_reports_a_migration_it_runs_itself(lab: Any) -> None:
    t = lab.topology()
    hvs = {n.name: open_hypervisor(t.hypervisor.kind, t.hypervisor.settings, n.name)
           for n in t.nodes}
    seen: list[GuestEvent] = []
    steps: list[Progress] = []

    async def run() -> None:
        tasks = [asyncio.create_task(_follow(hv, seen)) for hv in hvs.values()]
        try:
            await _until(lambda: all(hv.subscriptions for hv in hvs.values()))
            info = await hvs["n1"].describe(GUEST)
            assert info.node == "n1" and info.running and info.macs == ("52:54:00:00:02:01",)
            assert [i.name for i in await hvs["n1"].running()] == [GUEST]
            assert await hvs["n2"].running() == []
            await hvs["n1"].migrate(GUEST, "n3", steps.append)
            await _until(lambda: any(e.kind is EventKind.GONE for e in seen))
        finally:
            for task in tasks:
                task.cancel()
            for hv in hvs.values():
                await hv.close()

    asyncio.run(run())
    assert where(lab) == "n3"
    kinds = [(e.node, e.kind) for e in seen]
    assert kinds.index(("n3", EventKind.INCOMING)) < kinds.index(("n3", EventKind.RESUMED))
    assert ("n1", EventKind.GONE) in kinds and not [k for k in kinds if k[0] == "n2"]
    phases = [p.phase for p in steps]
    assert phases[0] == "starting" and phases[-1] == "done" and "memory" in phases


def test_cancelling_a_slow_migration_aborts_libvirts_job(lab: Any) -> None:
    t = lab.topology()
    src = where(lab)
    assert src is not None
    dst = "n2"
    settings = {**t.hypervisor.settings, "bandwidth_mib": 2}
    hv = open_hypervisor("libvirt", settings, src)
    watcher = open_hypervisor("libvirt", settings, dst)
    seen: list[GuestEvent] = []
    steps: list[Progress] = []

    async def run() -> None:
        follow = asyncio.create_task(_follow(watcher, seen))
        await _until(lambda: watcher.subscriptions == 1)  # else its INCOMING goes unseen
        job = asyncio.create_task(hv.migrate(GUEST, dst, steps.append))
        try:
            await _until(lambda: any(e.kind is EventKind.INCOMING for e in seen))
            await asyncio.sleep(1.0)
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            await _until(lambda: any(e.kind is EventKind.FAILED for e in seen))
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await hv.close()
            await watcher.close()

    asyncio.run(run())
    assert where(lab) == src and driver(lab).state(t, GUEST, dst) == ""
    assert steps[-1].phase == "aborted"


def test_the_event_stream_survives_a_libvirtd_restart(lab: Any) -> None:
    t = lab.topology()
    node = where(lab)
    assert node is not None
    hv = open_hypervisor("libvirt", t.hypervisor.settings, node)
    seen: list[GuestEvent] = []

    async def run() -> None:
        follow = asyncio.create_task(_follow(hv, seen))
        try:
            await _until(lambda: hv.subscriptions == 1)
            d = driver(lab).daemon(t, node)
            await asyncio.to_thread(d.stop)
            await asyncio.sleep(1.5)  # the stream retries meanwhile
            await asyncio.to_thread(d.start)
            await _until(lambda: len([e for e in seen
                                      if e.detail == "running here (connected)"]) >= 2)
            other = "n1" if node != "n1" else "n2"
            await asyncio.to_thread(driver(lab).virsh_migrate, t, GUEST, node, other)
            await _until(lambda: any(e.kind is EventKind.GONE for e in seen))
        finally:
            follow.cancel()
            await hv.close()

    asyncio.run(run())
    resumed = [e for e in seen if e.detail == "running here (connected)"]
    assert len(resumed) == 2  # at the first connection, and again after the restart
    assert all(e.kind is EventKind.RESUMED and e.guest == GUEST for e in resumed)
    assert [e.kind for e in seen][-1] is EventKind.GONE


def test_a_guest_unknown_to_libvirt_is_one_line(lab: Any) -> None:
    from orchestrator.hypervisor import HypervisorError

    hv = open_hypervisor("libvirt", lab.topology().hypervisor.settings, "n2")
    with pytest.raises(HypervisorError, match="guest nosuch is not known to libvirt on n2"):
        asyncio.run(hv.describe("nosuch"))
