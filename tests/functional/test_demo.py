"""Flow survival across live migration: real OpenSSH, websockets, HTTP keep-alive, UDP and
a guest-initiated stream through every entry node, with the control run beside it."""

from __future__ import annotations

import pytest

from orchestrator.lab.demo import run_demo
from tests.conftest import unique

pytestmark = pytest.mark.root


def by_name(result: dict) -> dict[str, dict]:
    return {f["name"]: f for f in result["flows"]}


def test_every_flow_survives_three_migrations():
    result = run_demo(unique("d"), settle_s=2.5)
    flows = by_name(result)
    assert len(flows) == 16
    dead = {n: f["error"] for n, f in flows.items() if not f["survived"]}
    assert dead == {}
    assert [(m["from"], m["to"]) for m in result["migrations"]] == [
        ("n1", "n2"), ("n2", "n3"), ("n3", "n1")]
    assert all(m["entries"] >= 15 for m in result["migrations"])
    # no gap beyond what the move alone causes (one retransmission timeout at most)
    assert max(f["max_gap_ms"] for f in flows.values()) < 1500


def test_control_run_breaks_snat_and_guest_first_flows():
    """The same tour without the handover: proves the survival test can fail."""
    flows = by_name(run_demo(unique("d"), control=True, settle_s=2.5))
    assert not flows["guest-snat"]["survived"]
    assert not flows["ws-server-push@n1"]["survived"]  # guest-first via the source


def test_every_flow_survives_with_tcp_loose_off():
    flows = by_name(run_demo(unique("d"), settle_s=2.5, tcp_loose=0))
    assert [n for n, f in flows.items() if not f["survived"]] == []


@pytest.mark.slow
def test_flow_entering_via_destination_outlives_syn_sent_expiry():
    """D's own entry for a flow it only saw one way would expire after ~120 s (SYN_SENT);
    the handed-over entry keeps it alive."""
    flows = by_name(run_demo(unique("d"), tour=["n2"], warmup_s=2.0, settle_s=130.0))
    for name in ("ssh@n2", "ws-server-push@n2", "http-keepalive@n2", "ws-client-push@n2"):
        assert flows[name]["survived"], (name, flows[name]["error"])
