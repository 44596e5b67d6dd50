"""The live-flow harness on the real kernel: it sees flows live, and it sees them die.

The moves here are bare (no handover): they show what the harness reports when flows
break, which is what the demo's ``--control`` run relies on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.lab import netns as ns
from orchestrator.lab.check import run_checks
from orchestrator.lab.flows import (
    FlowResult,
    FlowSet,
    Migration,
    announce_guest,
    demo_config,
    plot_gaps,
    start_flows,
)
from orchestrator.lab.lab import Lab
from orchestrator.lab.plan import GUEST_IFACE, vif_name
from tests.conftest import running_lab

pytestmark = pytest.mark.root
GUEST = "guest1"
NODES = ["n1", "n2", "n3"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield from running_lab("fl", config=lambda lab: demo_config(3, lab.name), config_dir=tmp_path)


def run(lab: Lab, before: float, after: float, move: bool = False,
        announce: bool = False) -> tuple[dict[str, FlowResult], float]:
    """Flows for ``before`` s, optionally a bare move n1 -> n2, then ``after`` s."""
    t = lab.topology()
    flows: FlowSet = start_flows(lab, t, GUEST, NODES)
    try:
        time.sleep(before)
        moved_at = time.time()
        if move:
            move_vif(lab, "n1", "n2")
            if announce:
                announce_guest(lab, t, GUEST)
        time.sleep(after)
    finally:
        results = flows.stop()
    for r in results:  # shown with -s; the numbers the report quotes
        died = f"died {r.died_at - moved_at:+.2f}s" if r.died_at else ""
        print(f"{r.name:20} survived={r.survived!s:5} max_gap={r.max_gap_ms:7.1f} ms "
              f"sent={r.lines_sent} received={r.lines_received} {died} {r.error or ''}")
    return {r.name: r for r in results}, moved_at


def move_vif(lab: Lab, src: str, dst: str) -> None:
    """What a migration does to the wire, with no handover at all."""
    t = lab.topology()
    vif = vif_name(t, GUEST)
    ns.ip(lab.names.node(src), "link", "set", vif, "netns", lab.names.node(dst))
    ns.ip(lab.names.node(dst), "link", "set", vif, "master", t.cluster.guest_bridge, "up")
    # the carrier's loss empties the guest's neighbour table, but the kernel does it only
    # when its linkwatch runs while the carrier is down: do it, so every run re-ARPs (and
    # only the destination answers for the gateway), not just most
    ns.ip(lab.names.guest(GUEST), "neigh", "flush", "dev", GUEST_IFACE)
    assert lab.guest_node(t, GUEST) == dst


def test_static_lab_every_flow_survives(lab: Lab, tmp_path: Path) -> None:
    results, _ = run(lab, before=3, after=0)
    assert len(results) == 3 * 5 + 1
    bad = {n: (r.max_gap_ms, r.error) for n, r in results.items()
           if not r.survived or r.max_gap_ms >= 500}
    assert bad == {}
    for r in results.values():
        assert r.lines_received >= 25, r  # ~3 s of lines at 50 ms each
        if r.kind not in ("udp", "ws-server-push"):
            assert r.lines_sent - r.lines_received <= 3, r  # echoes keep up
    plot_gaps(list(results.values()), [], tmp_path / "static.png")
    assert (tmp_path / "static.png").stat().st_size > 10_000
    # stop gave the demo's ports back to the lab's responder
    assert [c.name for c in run_checks(lab) if not c.passed] == []


def test_bare_move_kills_guest_initiated_and_foreign_flows(lab: Lab, tmp_path: Path) -> None:
    results, moved_at = run(lab, before=1, after=4, move=True)
    snat = results["guest-snat"]
    assert not snat.survived and snat.error and "reset" in snat.error.lower(), snat
    assert snat.died_at is not None and snat.died_at - moved_at < 2.0  # at once (+ carrier)
    # nothing tells the cluster switch the guest moved: what enters via n1 or n3 is lost
    for node in ("n1", "n3"):
        assert not any(r.survived for r in results.values() if r.entry_node == node
                       and r.kind != "guest-snat")
    # the destination's own entries still work: the harness does not call everything dead
    assert all(r.survived for r in results.values() if r.entry_node == "n2")
    plot_gaps(list(results.values()), [Migration(moved_at, moved_at + 0.05, "n1", "n2")],
              tmp_path / "bare.png", title="bare move")
    assert (tmp_path / "bare.png").stat().st_size > 10_000


def test_move_with_mac_announcement_matches_the_measured_table(lab: Lab) -> None:
    """FACTS.md's no-handover row: SNAT dies (RST), guest-first via the source dies,
    flows entering via the destination survive."""
    results, moved_at = run(lab, before=1, after=4, move=True, announce=True)
    snat = results["guest-snat"]
    assert not snat.survived and snat.error and "reset" in snat.error.lower(), snat
    assert snat.died_at is not None and snat.died_at - moved_at < 2.0
    assert not results["ws-server-push@n1"].survived
    assert all(r.survived for r in results.values() if r.entry_node == "n2")
    assert results["udp@n1"].survived and results["udp@n3"].survived
