"""The renderer against the seed's ruleset (seeds/000 and 001), rule by rule.

Differences from the seed are deliberate and asserted: names instead of ifindexes (a
re-created bridge keeps matching), DNAT only for the node's own public address, marks
compared under the tag mask, and SNAT setting this node's tag (DESIGN §1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.config.loader import load
from orchestrator.netfilter.apply import replace_script
from orchestrator.netfilter.render import render

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml"


@pytest.fixture(scope="module")
def topo():
    return load(SEED)


def chain(script: str, name: str) -> list[str]:
    """The rule lines of one chain (hook line excluded)."""
    lines = script.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == f"chain {name} {{")
    body = []
    for ln in lines[start + 1:]:
        if ln.strip() == "}":
            break
        body.append(ln.strip())
    return body


def test_stateless_dnat_matches_seed(topo):
    # seed: iif $nic tcp dport 80 meta mark set 0x01 ip daddr set 10.5.5.201
    s = render(topo, "node1").script()
    rules = chain(s, "stateless_dnat")
    assert rules[0] == "type filter hook prerouting priority -300; policy accept;"
    assert rules[1] == (
        'iifname "xenbr0" ip daddr 192.168.122.11 tcp dport 80 meta mark set 0x00000001 '
        'ip daddr set 10.5.5.201 comment "service http"'
    )
    assert rules[3].startswith('iifname "xenbr0" ip daddr 192.168.122.11 udp dport 123 ')
    # FULL-NAT services never appear in the stateless chain
    assert not any("2201" in r for r in rules)
    node2 = chain(render(topo, "node2").script(), "stateless_dnat")
    assert "meta mark set 0x00000002" in node2[1] and "192.168.122.12" in node2[1]


def test_dunnat_spoof_one_rule_per_node(topo):
    # seed: oif $nic ip saddr 10.5.5.0/24 ct mark == 0x0k ip saddr set PUB_k
    rules = chain(render(topo, "node2").script(), "dunnat_spoof")
    assert rules[0] == "type filter hook postrouting priority 90; policy accept;"
    assert rules[1:] == [
        'oifname "xenbr0" ip saddr 10.5.5.0/24 ct mark and 0x000000ff == 0x00000001 '
        "ip saddr set 192.168.122.11",
        'oifname "xenbr0" ip saddr 10.5.5.0/24 ct mark and 0x000000ff == 0x00000002 '
        "ip saddr set 192.168.122.12",
    ]


def test_pipe_ingress_tags_by_mac_prefix_and_egress_drops_gateway_arp(topo):
    s = render(topo, "node1").script()
    ingress = chain(s, "pipe_ingress")
    assert ingress[0] == 'type filter hook ingress devices = { "pipe0" } priority -500; policy accept;'
    assert ingress[1].startswith(
        "ether saddr & ff:ff:ff:00:00:00 == 0a:00:00:00:00:00 meta mark set 0x00000001")
    assert ingress[2].startswith(
        "ether saddr & ff:ff:ff:00:00:00 == 0e:00:00:00:00:00 meta mark set 0x00000002")
    assert [r for r in chain(s, "pipe_egress")[1:] if not r.startswith("#")] == [
        "arp saddr ip 10.5.5.254 drop", "arp daddr ip 10.5.5.254 drop",
        "ether type ip ether saddr set meta mark and 0x000000ff map @adopted_macs"]


def test_bridge_state_copies_meta_mark_to_ct_mark(topo):
    rules = chain(render(topo, "node1").script(), "bridge_state")
    assert rules[1] == 'oifname "guestbr0" ip daddr 10.5.5.0/24 meta mark != 0 ct mark set meta mark'


def test_snat_sets_own_tag_and_fullnat_rules(topo):
    s = render(topo, "node2").script()
    snat = chain(s, "guest_snat")
    assert snat[0] == "type nat hook postrouting priority srcnat; policy accept;"
    assert snat[-1] == ('oifname "xenbr0" ip saddr 10.5.5.0/24 ct mark set ct mark and '
                        "0xffffff00 or 0x80000002 snat to 192.168.122.12")  # + sync.mark_bit
    # seed 001: dnat on the public port, snat to the node's guest-side address
    assert snat[1] == ('oifname "guestbr0" ip daddr 10.5.5.201 tcp dport 22 ct status dnat '
                       'snat to 10.5.5.252 comment "service ssh-fullnat"')
    pre = chain(s, "fullnat_prerouting")
    assert pre[1] == ('iifname "xenbr0" ip daddr 192.168.122.12 tcp dport 2201 '
                      'dnat to 10.5.5.201:22 comment "service ssh-fullnat"')


def test_adopted_addresses_keep_their_node_tag(topo):
    """Failover: the survivor answers a dead node's public address with that node's tag
    (the map holds pub -> tag), marks the replies of its committed SNAT flows as that node,
    and sends both onto the pipes with that node's bridge MAC."""
    s = render(topo, "node2").script()
    dnat = chain(s, "stateless_dnat")
    assert dnat[2] == ('iifname "xenbr0" tcp dport 80 meta mark set ip daddr map @adopted_entry '
                       'ip daddr set 10.5.5.201 comment "service http (adopted)"')
    assert "map adopted_entry {" in s and "type ipv4_addr : mark" in s
    assert chain(s, "adopted_replies")[1:] == [
        'iifname "xenbr0" meta mark and 0x000000ff == 0 ct mark and 0x000000ff @adopted_tags '
        "meta mark set ct mark and 0x000000ff"]
    assert "map adopted_macs {" in s and "type mark : ether_addr" in s


def test_race_gate_and_sets_are_rendered(topo):
    s = render(topo, "node1").script()
    assert "set race_gate {" in s and "set local_guests {" in s
    gate = chain(s, "race_gate")
    assert gate[0] == "type filter hook prerouting priority -150; policy accept;"
    assert "ct state new tcp flags & (syn | ack) != syn" in gate[1]


def test_no_invalid_drop_anywhere(topo):
    # DESIGN §1: the entry node of every foreign flow sees mostly INVALID packets
    for node in ("node1", "node2"):
        assert "invalid" not in render(topo, node).script()


def test_port_rewrite_gets_reverse_rule(topo):
    t = topo.model_copy(update={"services": [
        s.model_copy(update={"guest_port": 8080}) if s.name == "http" else s
        for s in topo.services]})
    s = render(t, "node1").script()
    assert "tcp dport 80 meta mark set 0x00000001 ip daddr set 10.5.5.201 tcp dport set 8080" in s
    assert ('oifname "xenbr0" ip saddr 10.5.5.201 tcp sport 8080 tcp sport set 80'
            in "\n".join(chain(s, "dunnat_spoof")))


def test_digest_is_stable_and_changes_with_config(topo):
    a, b = render(topo, "node1"), render(topo, "node1")
    assert a.digest == b.digest and f'comment "convergent {a.digest}"' in a.script()
    assert render(topo, "node2").digest != a.digest


def test_replace_script_is_one_batch_keeping_set_elements(topo):
    script = replace_script(render(topo, "node1").script(), {"race_gate": ["10.5.5.201"],
                                                              "local_guests": []})
    lines = script.splitlines()
    assert lines[:4] == ["table ip convergent", "delete table ip convergent",
                         "table netdev convergent_pipes", "delete table netdev convergent_pipes"]
    assert lines[-1] == "add element ip convergent race_gate { 10.5.5.201 }"


def test_sync_traffic_is_notracked_on_the_sync_interface(topo):
    # seeds/002 (ct_sync): replication packets would create state of their own
    t = topo.model_copy(update={"sync": topo.sync.model_copy(update={"interface": "ha0",
                                                                     "port": 3999})})
    s = render(t, "node1").script()
    pre, out = chain(s, "sync_notrack_prerouting"), chain(s, "sync_notrack_output")
    assert pre == ["type filter hook prerouting priority raw; policy accept;",
                   'iifname "ha0" udp dport 3999 notrack comment "replicator"']
    assert out == ["type filter hook output priority raw; policy accept;",
                   'oifname "ha0" udp dport 3999 notrack comment "replicator"']
    assert s.count(" notrack ") == 2  # nothing else escapes conntrack


@pytest.mark.skipif(shutil.which("nft") is None or os.geteuid() != 0,
                    reason="nft -c needs the nft binary and root (a throwaway namespace)")
def test_nft_accepts_the_rendered_ruleset(topo):
    script = render(topo, "node1").script()
    proc = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=script,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    broken = script.replace(" notrack ", " notrakc ", 1)
    proc = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=broken,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0  # the check itself can fail
