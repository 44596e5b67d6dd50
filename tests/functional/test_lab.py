"""The seed acceptance through the lab, on the real kernel, in sealed namespaces."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config.loader import load
from orchestrator.errors import RulesetError
from orchestrator.lab import netns as ns
from orchestrator.lab.check import Check, run_checks
from orchestrator.lab.hypervisor import VifMover
from orchestrator.lab.lab import Lab
from orchestrator.lab.plan import default_config
from orchestrator.netfilter import nft
from orchestrator.netfilter.apply import apply, replace_script
from orchestrator.netfilter.render import render
from tests.conftest import running_lab, unique

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


def lab_namespaces(lab: Lab) -> list[str]:
    return [n for n in ns.list_netns() if n.startswith(lab.names.prefix)]


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    yield from running_lab("t")


@pytest.fixture(scope="module")
def checks(lab3: Lab) -> dict[str, Check]:
    return {c.name: c for c in run_checks(lab3)}


def test_foreign_http_reaches_guest_and_reply_carries_entry_address(checks):
    c = checks["http tcp/80 via n2 (foreign, guest on n1)"]
    assert c.passed, c.detail
    assert "reply from 192.168.122.12:80" in c.detail and "ct mark on n1 = 2" in c.detail


def test_local_path(checks):
    c = checks["http tcp/80 via n1 (local)"]
    assert c.passed and "ct mark on n1 = 1" in c.detail, c.detail


def test_guest_initiated_is_snatted_to_its_node(checks):
    c = checks["guest1 outbound SNAT via n1"]
    assert c.passed and "workstation saw 192.168.122.11" in c.detail, c.detail


def test_udp_service_both_directions_every_entry(checks):
    for node in ("n1", "n2", "n3"):
        c = next(v for k, v in checks.items() if k.startswith(f"ntp udp/123 via {node}"))
        assert c.passed, c.detail


def test_fullnat_service_sees_entry_nodes_guest_side_address(checks):
    c = checks["web-fullnat tcp/8080 via n3 (foreign, guest on n1)"]
    assert c.passed and "guest saw 10.5.5.253" in c.detail, c.detail


def test_every_node_is_an_entry_for_every_service(checks, lab3):
    t = lab3.topology()
    assert len(checks) == len(t.services) * len(t.nodes) + len(t.guests)
    failed = [f"{c.name}: {c.detail}" for c in checks.values() if not c.passed]
    assert failed == []


def test_check_fails_when_the_spoof_is_missing(lab3):
    """The acceptance can fail: without D-UN-NAT the foreign reply leaves as the guest."""
    n1 = lab3.names.node("n1")
    ns.in_ns(n1, "nft", "flush", "chain", "ip", "convergent", "dunnat_spoof")
    try:
        bad = {c.name: c for c in run_checks(lab3)}
        assert not bad["http tcp/80 via n2 (foreign, guest on n1)"].passed
        assert bad["http tcp/80 via n1 (local)"].passed is False
    finally:
        ns.in_ns(n1, "nft", "delete", "table", "ip", "convergent")
        apply(lab3.topology(), "n1", n1)
    assert all(c.passed for c in run_checks(lab3))


def test_apply_twice_changes_nothing(lab3):
    n2 = lab3.names.node("n2")
    before = ns.in_ns(n2, "nft", "list", "ruleset")
    result = apply(lab3.topology(), "n2", n2)
    assert not result.ruleset_changed and result.sysctls_changed == {}
    assert ns.in_ns(n2, "nft", "list", "ruleset") == before


def test_rejected_ruleset_leaves_running_one_untouched(lab3):
    n3 = lab3.names.node("n3")
    before = ns.in_ns(n3, "nft", "list", "ruleset")
    script = render(lab3.topology(), "n3").script().replace(
        "policy accept;\n", "policy accept;\n\t\tjump no_such_chain\n", 1)
    with pytest.raises(RulesetError, match="nft rejected the ruleset"):
        nft.run(replace_script(script, {}), n3)
    assert ns.in_ns(n3, "nft", "list", "ruleset") == before


def test_guest_on_another_node_with_its_own_config(tmp_path):
    """Its own config: the guest on n2, with a second address that a UDP service publishes
    (the responder must answer from the address it was asked on, as a real service does).
    Then its vif moves, and the guest keeps its whole neighbour table, as a VM keeps it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(default_config(2).replace('home = "n1"', 'home = "n2"').replace(
        'addresses = ["10.5.5.201"]', 'addresses = ["10.5.5.201", "10.5.5.202"]')
        + '\n[[services]]\nname = "dns2"\nport = 5353\nproto = "udp"\nguest = "guest1"\n'
          'address = "10.5.5.202"\n')
    lab = Lab(unique("t"))
    try:
        lab.up(config=cfg)
        results = run_checks(lab)
        assert all(c.passed for c in results), [c for c in results if not c.passed]
        assert any(c.name == "http tcp/80 via n1 (foreign, guest on n2)" for c in results)
        assert any(c.name == "dns2 udp/5353 via n1 (foreign, guest on n2)" for c in results)
        t = lab.topology()
        g_ns = lab.names.guest("guest1")
        for peer in (t.cluster.gateway, t.node("n1").guest_ip, t.node("n2").guest_ip):
            ns.in_ns(g_ns, "ping", "-c1", "-W1", str(peer))
        before = dict(ns.neighbours(g_ns, "eth0"))
        assert len(before) == 3, before
        VifMover(lab).move_vif("guest1", "n2", "n1")
        assert dict(ns.neighbours(g_ns, "eth0")) == before
    finally:
        lab.down()


def test_up_twice_down_twice_leaves_nothing():
    lab = Lab(unique("t"))
    try:
        lab.up(2)
        first = lab_namespaces(lab)
        lab.up(2)
        assert lab_namespaces(lab) == first and len(first) == 5
    finally:
        assert len(lab.down()) == 5
    assert lab.down() == []
    assert lab_namespaces(lab) == [] and not lab.dir.exists()
    # nothing of ours in the root namespace
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab.names.prefix not in links


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\n")
    for argv in (["render-rules", "--config", str(bad), "--node", "x"],
                 ["lab", "check", "--name", unique("absent")]):
        proc = subprocess.run([str(ROOT / ".venv/bin/convergent"), *argv],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert all(ln.startswith("convergent: ") for ln in proc.stderr.splitlines()), proc.stderr


def test_render_rules_cli_passes_nft_check():
    proc = subprocess.run([str(ROOT / ".venv/bin/convergent"), "render-rules", "--config",
                           str(ROOT / "examples/seed-2node.toml"), "--node", "node2", "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert load(ROOT / "examples/seed-2node.toml").nodes[1].pub_ip.exploded in proc.stdout
