"""Agents killed with SIGKILL in the middle of a migration, then restarted.

Each case: a real guest-initiated TCP flow (the kind that dies at once without handover)
through a lab whose agents run as in production. After the crash and restart the migration
either completes (the flow survives, one owner, the epoch advanced once) or aborts cleanly
(ownership stays, no entry D got is left behind, the gate is open).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator.agent.client import acall
from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from tests.conftest import lab_with_precopy_over
from tests.functional.test_migration import established_pair, owners, received_within

pytestmark = pytest.mark.root


@pytest.fixture(params=["peer", "replicator"], ids=["precopy-peer", "precopy-replicator"])
def lab(request, tmp_path) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    """Both carriers of the precopy: the peer channel, and a replicator stream."""
    yield from lab_with_precopy_over(request.param, "f", tmp_path)


def restart_with(lab: Lab, node: str, failpoints: str) -> None:
    lab.kill_agent(node)
    lab.start_agent(node, env={"CONVERGENT_FAILPOINTS": failpoints})


def restart_when_dead(lab: Lab, node: str) -> threading.Thread:
    """Like a supervisor (systemd Restart=always): bring the agent back once it died."""
    def watch() -> None:
        deadline = time.monotonic() + 20
        while lab.agent_pid(node) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        lab.start_agent(node)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def pushed_left(lab: Lab, node: str) -> str:
    """Entries still carrying the handover bit on ``node``."""
    bit = lab.topology().cluster.handover_bit
    return ns.in_ns(lab.names.node(node), "conntrack", "-L", "-d", "10.5.5.201",
                    "-m", f"{bit}/{bit}", check=False) + ns.in_ns(
        lab.names.node(node), "conntrack", "-L", "-s", "10.5.5.201", "-m", f"{bit}/{bit}",
        check=False)


def gate(lab: Lab, node: str) -> str:
    return ns.in_ns(lab.names.node(node), "nft", "list", "set", "ip", "convergent", "race_gate")


def audit_actions(lab: Lab) -> list[str]:
    import json
    return [json.loads(line)["action"] for line in
            (lab.dir / "audit.log").read_text().splitlines() if line.strip()]


def assert_completed(lab: Lab, cli, conn) -> None:  # type: ignore[no-untyped-def]
    assert owners(lab) == [("n2", 2)]  # one owner, epoch advanced exactly once
    cli.sendall(b"alive")
    assert received_within(conn, 5) == b"alive"
    assert "10.5.5.201" not in gate(lab, "n2")
    # finalize clears the bit off the critical path, then writes its record
    deadline = time.monotonic() + 20
    while ("10.5.5.201" in pushed_left(lab, "n2")
           or "migration.finalize" not in audit_actions(lab)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "10.5.5.201" not in pushed_left(lab, "n2")
    assert audit_actions(lab).count("migration.finalize") == 1


@pytest.mark.parametrize("killed", ["n2", "n1"], ids=["destination", "source"])
def test_killed_during_precopy_then_restarted_completes(lab, killed):
    cli, conn = established_pair(lab, 7200)

    async def crash() -> None:  # precopy has synced and follows S's events now
        await asyncio.to_thread(lab.kill_agent, killed)
        await asyncio.to_thread(lab.start_agent, killed)

    r = asyncio.run(migrate(lab, "guest1", "n2", before_move=crash))
    assert (r.src, r.dst) == ("n1", "n2")
    assert_completed(lab, cli, conn)
    if killed == "n2":  # the restarted destination found its migration and resumed it
        assert "agent.recover" in audit_actions(lab)


@pytest.mark.parametrize("killed,point", [("n2", "cutover.claimed"), ("n2", "cutover.drained"),
                                          ("n1", "source.barrier")],
                         ids=["destination-after-claim", "destination-before-claim", "source"])
def test_killed_during_cutover_then_restarted_completes(lab, killed, point):
    cli, conn = established_pair(lab, 7201)
    restart_with(lab, killed, f"{point}=kill")
    watcher = restart_when_dead(lab, killed)
    asyncio.run(migrate(lab, "guest1", "n2"))
    watcher.join(20)
    assert lab.agent_pid(killed) is not None
    assert_completed(lab, cli, conn)
    if killed == "n2":
        assert "agent.recover" in audit_actions(lab)


def test_destination_killed_in_precopy_then_aborted_leaves_nothing(lab):
    cli, conn = established_pair(lab, 7202)
    restart_with(lab, "n2", "precopy.synced=kill")
    sock = lab.topology().agent.socket("n2")
    with pytest.raises(Exception, match=r"closed the connection|did not answer"):
        asyncio.run(acall(sock, "migration.prepare", guest="guest1", src="n1"))
    # D crashed with the entries pushed and its gate closed; the restarted agent recovers
    assert "10.5.5.201" in pushed_left(lab, "n2")
    lab.start_agent("n2")
    asyncio.run(acall(sock, "migration.abort", guest="guest1", reason="hypervisor failed"))
    assert pushed_left(lab, "n2").count("10.5.5.201") == 0
    assert "10.5.5.201" not in gate(lab, "n2")
    assert owners(lab) == [("n1", 1)]  # ownership never left the source
    cli.sendall(b"home")
    assert received_within(conn, 5) == b"home"
    # and the guest can still move afterwards
    asyncio.run(migrate(lab, "guest1", "n3"))
    assert owners(lab) == [("n3", 2)]
