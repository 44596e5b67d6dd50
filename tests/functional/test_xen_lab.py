"""The lab on Xen's calling convention (``lab up --hypervisor xl``): Debian's real hotplug
scripts wrapped by convergent-vif on every node, the stand-in xl and xenstore, the agents
running the xl adapter. Migrations are ``xl migrate`` (the operator's own command, or
``convergent migrate`` on the source's agent); the agents learn of them only from the vif
script and xenstore.

- the demo's tour through every entry node: every flow survives; the control run (agents
  stopped: nobody hears the hooks) loses the guest-initiated and guest-first flows;
- a plain ``xl migrate`` is recognised from the vif events alone: ownership moves;
- its failure path (the destination destroys its copy, the source resumes with no vif
  call): aborted cleanly, ownership unchanged, nothing left on the destination;
- the destination's agent absent: the vif comes up, the calls spool, and the restarted
  agent reconciles to where the guest runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator.agent.client import call
from orchestrator.lab.check import report, run_checks
from orchestrator.lab.demo import run_demo
from orchestrator.lab.lab import Lab
from orchestrator.netfilter.conntrack import ConntrackTable
from orchestrator.store import open_store
from orchestrator.xen.lab.cluster import XlLab
from tests.conftest import unique

pytestmark = pytest.mark.root
GUEST = "guest1"


def by_name(result: dict) -> dict[str, dict]:
    return {f["name"]: f for f in result["flows"]}


def test_every_flow_survives_the_tour_over_xl_migrate() -> None:
    result = run_demo(unique("xd"), 3, hypervisor="xl")
    flows = by_name(result)
    assert len(flows) == 16
    assert {n: f["error"] for n, f in flows.items() if not f["survived"]} == {}
    assert [(m["from"], m["to"]) for m in result["migrations"]] == [
        ("n1", "n2"), ("n2", "n3"), ("n3", "n1")]
    assert all(m["entries"] >= 15 for m in result["migrations"])  # handed over, each move


def test_control_run_over_xl_migrate_loses_guest_first_flows() -> None:
    """No agent hears the hooks: proves the survival test can fail."""
    flows = by_name(run_demo(unique("xd"), 3, control=True, hypervisor="xl"))
    assert not flows["guest-snat"]["survived"]
    assert not flows["ws-server-push@n1"]["survived"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(unique("xl"))
    try:
        lab.up(3, hypervisor="xl")
        yield lab
    finally:
        lab.down()


def xl_of(lab: Lab) -> XlLab:
    drv = lab.driver(lab.topology())
    assert isinstance(drv, XlLab)
    return drv


def owner(lab: Lab) -> set[str | None]:
    async def get() -> set[str | None]:
        t = lab.topology()
        store = await open_store(t.agent.store)
        try:
            return {o.node if o else None for o in
                    [await store.get_ownership(a) for a in t.guest(GUEST).addresses]}
        finally:
            await store.close()
    return asyncio.run(get())


def migrations(lab: Lab) -> list[tuple[str, str, str]]:
    async def get() -> list[tuple[str, str, str]]:
        store = await open_store(lab.topology().agent.store)
        try:
            ms = await store.list_migrations(active=False, guest=GUEST)
            return [(m.src, m.dst, str(m.phase)) for m in sorted(ms, key=lambda m: m.started)]
        finally:
            await store.close()
    return asyncio.run(get())


def until(ok: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def operator_migrate(lab: Lab, src: str, dst: str, fault: str = "") -> tuple[int, str]:
    """``xl migrate -s SSH guest1 DST``, typed in the source's dom0."""
    drv = xl_of(lab)
    env = {"CONVERGENT_XL_FAULT": fault} if fault else None
    res = drv.xl(src, "migrate", "-s", str(drv.bin_dir / "lab-ssh"), GUEST, dst, env=env)
    return res.returncode, res.stderr


def pushed_entries(lab: Lab, node: str) -> int:
    """The guest's entries a migration pushed to ``node`` (they carry the handover bit
    until finalize; an abort removes exactly those)."""
    t = lab.topology()
    bit = t.cluster.handover_bit
    with ConntrackTable(lab.names.node(node)) as table:
        return len(table.dump([str(a) for a in t.guest(GUEST).addresses], mark=bit,
                              mark_mask=bit))


def test_a_plain_xl_migrate_is_recognised_from_the_vif_events(lab: Lab) -> None:
    t = lab.topology()
    src = lab.guest_node(t, GUEST)
    assert src == "n1" and owner(lab) == {"n1"}
    before = len(migrations(lab))
    code, err = operator_migrate(lab, "n1", "n2")
    assert code == 0, err
    assert "Migration successful." in err
    assert lab.guest_node(t, GUEST) == "n2"
    until(lambda: owner(lab) == {"n2"}, "ownership on n2")
    until(lambda: migrations(lab)[before:] == [("n1", "n2", "done")], "the migration done")
    assert report(run_checks(lab))["passed"]


def test_the_failure_path_aborts_cleanly(lab: Lab) -> None:
    t = lab.topology()
    src = lab.guest_node(t, GUEST)
    assert src is not None
    dst = next(n.name for n in t.nodes if n.name != src)
    before = len(migrations(lab))
    code, err = operator_migrate(lab, src, dst, fault="unpause")
    assert code == 1 and "Migration failed due to problems at target." in err
    assert "migration sender: Resumed OK." in err
    assert lab.guest_node(t, GUEST) == src  # the source resumed it
    until(lambda: migrations(lab)[before:] == [(src, dst, "aborted")], "the abort")
    assert owner(lab) == {src}
    until(lambda: pushed_entries(lab, dst) == 0, f"nothing pushed left on {dst}")
    assert xl_of(lab).xl(dst, "list").stdout.count(GUEST) == 0
    assert report(run_checks(lab))["passed"]


def test_agent_absent_spools_and_the_restarted_agent_reconciles(lab: Lab) -> None:
    t = lab.topology()
    src = lab.guest_node(t, GUEST)
    assert src is not None
    dst = next(n.name for n in t.nodes if n.name not in (src,))
    spool = t.agent.spool(dst)
    lab.kill_agent(dst)
    try:
        code, err = operator_migrate(lab, src, dst)
        assert code == 0, err  # the vif came up on dst: its script never failed it
        assert lab.guest_node(t, GUEST) == dst
        spooled = sorted(spool.glob("*.call.json"))
        assert spooled, "the destination's vif call was spooled"
    finally:
        lab.start_agent(dst)
    until(lambda: owner(lab) == {dst}, f"ownership reconciled to {dst}")
    until(lambda: not list(spool.glob("*.call.json")), "the spool replayed")
    status = call(t.agent.socket(dst), "status", timeout=10)
    assert status["node"] == dst
    assert report(run_checks(lab))["passed"]


def test_dom0_paths_stay_inside_the_lab(lab: Lab) -> None:
    drv = xl_of(lab)
    for n in lab.topology().nodes:
        d = drv.dom0(n.name)
        assert (d.scripts_dir / "convergent-vif").exists()
        assert str(d.root).startswith(str(lab.dir))
