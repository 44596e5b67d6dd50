"""The hypervisor seam in the lab: every move runs the lab's real hook (``hooks/lab``, a
process of its own under ``python3 -I -S``) into the agents' intake.

- an agent hung mid-tour: its hooks wait out their timeout, spool and exit 0; the guest
  moves anyway; the restarted agent replays its spool and the store ends where the guest
  runs; the tour goes on;
- ``convergent migrate``: success with phases and timings, one-line refusals, an abort
  mid-way that leaves the guest, its ownership and the destination as they were;
- the destination killed during prepare: ``lab migrate`` aborts with one line and the
  restarted destination settles at once; left alone, it settles after recovery_settle_s;
- an agent down: ``lab migrate`` refuses, ``--in-process`` beside agents refuses;
- the audit log unwritable: the migration still completes, the failures are counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import MigrationError
from orchestrator.hypervisor import Progress
from orchestrator.lab.hypervisor import lab_hypervisor
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from orchestrator.lab.plan import default_config, lab_section
from tests.conftest import running_lab
from tests.functional.test_agent_faults import gate, pushed_left, restart_with
from tests.functional.test_migration import agent, established_pair, owners, received_within

pytestmark = pytest.mark.root
HOOK_TIMEOUT_S = 1.5  # the lab's hook.json (LabHypervisor's default)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield from running_lab("hk", config=stall_config, config_dir=tmp_path)


STALL_S = 60  # the abort test's precopy stall, and how long the lab's move waits for it


def stall_config(lab: Lab) -> str:
    """The seed lab, its hypervisor waiting out a stalled precopy as long as it stalls (with
    the default 10 s, an abort that a loaded machine delays past it finds the move gone on
    without the precopy, and the migration done)."""
    return (default_config(3, lab.name, lab.dir) + "\n" + lab_section(lab.name, lab.dir)
            + f"precopy_wait_s = {STALL_S}\n")


def cli(lab: Lab, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *argv, "--config",
                           str(lab.config_path)], capture_output=True, text=True,
                          timeout=timeout)


def spooled(lab: Lab, node: str) -> list[str]:
    d = lab.topology().agent.spool(node)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def in_flight(lab: Lab) -> list[Any]:
    async def read() -> list[Any]:
        from orchestrator.store import open_store
        store = await open_store(lab.topology().agent.store)
        try:
            return await store.list_migrations(active=True)
        finally:
            await store.close()
    return asyncio.run(read())


def test_a_hung_agent_mid_tour_spools_and_its_restart_replays_to_the_truth(lab):
    pid = lab.agent_pid("n2")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # hung: it accepts connections, answers nothing
    steps: list[Progress] = []
    try:  # the hypervisor moves the guest whatever the agents do (virsh migrate would)
        hv = lab_hypervisor(lab, "n1", strict=False)
        asyncio.run(hv.migrate("guest1", "n2", steps.append))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
    assert lab.guest_node(lab.topology(), "guest1") == "n2"
    assert [s.phase for s in steps] == ["starting", "memory", "paused", "resumed", "done"]
    to_n2 = [v for v in hv.verdicts if v["hook"]["node"] == "n2"]
    assert [v["hook"]["event"] for v in to_n2] == ["incoming", "resumed"]
    for v in to_n2:  # each waited out its timeout, spooled, and let the hypervisor go on
        assert v["spooled"] and v["verdict"] == "allow" and v["hook"]["exit"] == 0
        # (the slack: a hook's own start and spool on a loaded 2-core machine)
        assert HOOK_TIMEOUT_S * 1000 <= v["hook"]["ms"] <= HOOK_TIMEOUT_S * 1000 + 4000, v
    gone = next(v for v in hv.verdicts if v["hook"]["node"] == "n1")
    assert gone["outcome"] == "report"  # n1 heard "gone" with no migration in the store
    assert len(spooled(lab, "n2")) == 2
    assert owners(lab) == [("n1", 1)]  # the store has not heard of the move yet
    lab.kill_agent("n2")
    lab.start_agent("n2")  # it replays its spool: a handover after the fact, then claims
    until(lambda: not in_flight(lab), 30, "the replayed migration to end")
    assert owners(lab) == [("n2", 2)]  # the store says where the guest runs
    assert spooled(lab, "n2") == []
    counts = agent(lab, "n2", "status")["intake"]["counts"]
    assert counts["spool.taken"] == 2 and counts["apply"] == 2
    problems = agent(lab, "n1", "status")["intake"]["problems"]
    assert any("store has no migration" in p["detail"] for p in problems)
    r = asyncio.run(migrate(lab, "guest1", "n3"))  # and the tour goes on
    assert (r.src, r.dst) == ("n2", "n3") and owners(lab) == [("n3", 3)]
    assert r.entries >= 0 and r.precopy_ms > 0


def test_convergent_migrate_success_refusals_and_an_abort_mid_way(lab):
    ok = cli(lab, "migrate", "guest1", "--to", "n2", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert (report["from"], report["to"], report["outcome"]) == ("n1", "n2", "done")
    assert [p["phase"] for p in report["phases"]] == [
        "starting", "memory", "paused", "resumed", "done"]
    assert report["migration"]["timings"]["cutover"] > 0
    assert owners(lab) == [("n2", 2)]
    for argv, line in (
            (("nosuch", "--to", "n1"), "unknown guest 'nosuch' (known: guest1)"),
            (("guest1", "--to", "n2"), "guest1 already runs on n2"),
            (("guest1", "--to", "n9"), "unknown node 'n9' (nodes: n1, n2, n3)")):
        refused = cli(lab, "migrate", *argv)
        assert (refused.returncode, refused.stderr) == (1, f"convergent: {line}\n"), argv

    # abort mid-way: n3's precopy stalls, the operator aborts from another shell
    restart_with(lab, "n3", f"precopy.synced=sleep:{STALL_S}")
    moving = subprocess.Popen([sys.executable, "-m", "orchestrator", "migrate", "guest1",
                               "--to", "n3", "--config", str(lab.config_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: bool(in_flight(lab)), 30, "the migration to start")
        aborted = cli(lab, "migrate", "--abort", "guest1")
        _, err = moving.communicate(timeout=30)
    finally:
        moving.kill()
    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout.count("\n") == 1 and "n2 -> n3 aborted; guest1 stays on n2" in \
        aborted.stdout
    assert moving.returncode == 1 and err.strip().splitlines()[-1].startswith(
        "convergent: guest1: migration n2 -> n3 aborted by request"), err
    assert owners(lab) == [("n2", 2)]  # ownership never moved
    assert lab.guest_node(lab.topology(), "guest1") == "n2"
    until(lambda: "10.5.5.201" not in gate(lab, "n3"), 20, "n3's gate to open")
    assert "10.5.5.201" not in pushed_left(lab, "n3")
    lab.kill_agent("n3")
    lab.start_agent("n3")
    r = asyncio.run(migrate(lab, "guest1", "n3"))  # nothing left behind blocks the next one
    assert owners(lab) == [("n3", 3)] and r.dst == "n3"


def test_a_destination_killed_in_prepare_is_aborted_and_settles(lab):
    cli_sock, conn = established_pair(lab, 7400)  # a flow: entries for the precopy to push
    restart_with(lab, "n2", "precopy.synced=kill")
    with pytest.raises(MigrationError, match="n2's agent went away during the precopy"):
        asyncio.run(migrate(lab, "guest1", "n2"))
    assert lab.agent_pid("n2") is None and "10.5.5.201" in pushed_left(lab, "n2")
    assert len(spooled(lab, "n2")) == 1  # the driver's "failed", for the agent's replay
    lab.start_agent("n2")
    until(lambda: not in_flight(lab), 20, "the restarted destination to abort")  # not 900 s
    # (a reconcile pass that read the store before the abort may close the gate once more;
    # the pass the abort runs after itself opens it again)
    until(lambda: "10.5.5.201" not in gate(lab, "n2"), 20, "n2's gate to open")
    assert owners(lab) == [("n1", 1)]
    assert "10.5.5.201" not in pushed_left(lab, "n2")
    assert lab.guest_node(lab.topology(), "guest1") == "n1"

    # nobody tells it anything: it settles from the hypervisor's view (the guest is not
    # here) after recovery_settle_s (5 s in a lab)
    restart_with(lab, "n2", "precopy.synced=kill")
    with pytest.raises(Exception, match=r"closed the connection|did not answer"):
        agent(lab, "n2", "migration.prepare", guest="guest1", src="n1")
    lab.start_agent("n2")
    started = time.monotonic()
    until(lambda: not in_flight(lab), 30, "the destination to settle")
    # recovery_settle_s (5 s) after an agent start that may take seconds under load: not
    # the migration's 900 s timeout
    assert time.monotonic() - started < 20
    until(lambda: "10.5.5.201" not in gate(lab, "n2"), 20, "n2's gate to open")
    assert owners(lab) == [("n1", 1)]
    r = asyncio.run(migrate(lab, "guest1", "n2"))
    assert owners(lab) == [("n2", 2)] and r.dst == "n2"
    cli_sock.sendall(b"moved")  # the flow survived the aborted tries and the real move
    assert received_within(conn, 5) == b"moved"
    cli_sock.close()
    conn.close()


def test_an_agent_down_is_refused_and_in_process_beside_agents_too(lab):
    lab.kill_agent("n3")
    with pytest.raises(MigrationError, match=r"the agent of n3 is not running .*--in-process"):
        asyncio.run(migrate(lab, "guest1", "n3"))
    got = subprocess.run([sys.executable, "-m", "orchestrator", "lab", "migrate", "guest1",
                          "--to", "n3", "--name", lab.name], capture_output=True, text=True,
                         env={**os.environ, "CONVERGENT_LAB_DIR": str(lab.dir.parent)})
    assert got.returncode == 1 and len(got.stderr.splitlines()) == 1
    assert got.stderr.startswith("convergent: the agent of n3 is not running")
    with pytest.raises(MigrationError, match="this lab runs agents"):
        asyncio.run(migrate(lab, "guest1", "n2", in_process=True))
    assert owners(lab) == [("n1", 1)] and lab.guest_node(lab.topology(), "guest1") == "n1"


def test_an_unwritable_audit_log_never_strands_a_migration(lab):
    log = lab.dir / "audit.log"
    aside = lab.dir / "audit.log.aside"
    log.rename(aside)
    log.mkdir()  # every agent's next write fails: it cannot open the log
    try:
        r = asyncio.run(migrate(lab, "guest1", "n2"))
        assert r.dst == "n2" and owners(lab) == [("n2", 2)]
        errors = agent(lab, "n2", "status")["audit"]["errors"]
        assert errors >= 4  # prepare, precopy, cutover, finalize: none written, none fatal
    finally:
        shutil.rmtree(log)
        aside.rename(log)
    r = asyncio.run(migrate(lab, "guest1", "n3"))
    assert owners(lab) == [("n3", 3)]
