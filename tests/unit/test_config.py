"""Config validation: every bad input gets one line naming file, key path and reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.config.loader import load, parse
from orchestrator.errors import ConfigError
from orchestrator.lab.plan import default_config

SEED = (Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml").read_text()


def bad(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(text, "cluster.toml")
    return str(exc.value).splitlines()


def test_seed_and_lab_defaults_are_valid():
    t = parse(SEED)
    assert [n.name for n in t.nodes] == ["node1", "node2"]
    assert t.nodes[1].bridge_mac == "0e:00:00:00:00:02"
    for n in (1, 3, 16):
        assert len(parse(default_config(n)).nodes) == n


CASES = [
    # (what, edit of the seed, expected key path, expected reason fragment)
    ("duplicate tag", ("tag = 2", "tag = 1"), "nodes[0].tag", "duplicate tag 1"),
    ("duplicate prefix", ('"0e:00:00"', '"0a:00:00"'), "nodes[0].mac_prefix", "duplicate"),
    ("overlapping prefix", ('"0e:00:00"', '"0a:00:00:05"'), "nodes[1].mac_prefix", "overlaps"),
    ("multicast prefix", ('"0e:00:00"', '"01:00:00"'), "nodes[1].mac_prefix", "multicast"),
    ("malformed prefix", ('"0e:00:00"', '"0e:zz"'), "nodes[1].mac_prefix", "hex octets"),
    ("guest outside subnet", ('"10.5.5.201"', '"10.6.5.201"'), "guests[0].addresses[0]",
     "outside guest_subnet"),
    ("guest on gateway", ('addresses = ["10.5.5.201"]', 'addresses = ["10.5.5.254"]'),
     "guests[0].addresses[0]", "reserved"),
    ("node guest_ip outside", ('"10.5.5.252"', '"10.9.9.252"'), "nodes[1].guest_ip",
     "outside guest_subnet"),
    ("gateway outside", ('gateway = "10.5.5.254"', 'gateway = "10.5.6.254"'), "cluster",
     "outside guest_subnet"),
    ("unknown service guest", ('name = "http"\nport = 80\nguest = "guest1"',
                               'name = "http"\nport = 80\nguest = "guest9"'),
     "services[0].guest", "unknown guest 'guest9'"),
    ("tag does not fit", ("tag = 2", "tag = 256"), "nodes[1].tag", "does not fit tag_mask"),
    ("unknown key", ('uplink = "xenbr0"', 'uplink = "xenbr0"\nuplnk = "x"'), "cluster.uplnk",
     "unknown key"),
    ("wrong type", ("tag = 2", 'tag = "two"'), "nodes[1].tag", "valid integer"),
    ("bad mode", ('mode = "fullnat"', 'mode = "halfnat"'), "services[2].mode", "stateless"),
    ("port out of range", ("port = 80", "port = 70000"), "services[0].port", "65535"),
    ("bad interface name", ('pipes = ["pipe0"]', 'pipes = ["this-name-is-too-long"]', 1),
     "nodes[0].pipes[0]", "pattern"),
    ("guest mac in node prefix", ('"52:54:00:00:02:01"', '"0a:00:00:00:02:01"'),
     "guests[0].macs[0]", "node node1's prefix"),
    ("duplicate published port", ('port = 123\nproto = "udp"', 'port = 80\nproto = "tcp"'),
     "services[1].port", "tcp/80 already published"),
    ("unknown home", ('home = "node1"', 'home = "node7"'), "guests[0].home", "unknown node"),
    ("missing key", ('pub_ip = "192.168.122.12"\n', ""), "nodes[1].pub_ip", "required"),
    ("non-contiguous mask", ("tag_mask = 0xff", "tag_mask = 0xf0"), "cluster.tag_mask",
     "contiguous"),
    ("pub ip inside subnet", ('"192.168.122.12"', '"10.5.5.12"'), "nodes[1].pub_ip",
     "inside guest_subnet"),
    ("service address not of guest", ('guest = "guest1"\n\n[[services]]\nname = "ntp"',
                                      'guest = "guest1"\naddress = "10.5.5.77"\n\n'
                                      '[[services]]\nname = "ntp"'),
     "services[0].address", "not an address of guest"),
    ("handover bit not single", ("tag_mask = 0xff", "tag_mask = 0xff\nhandover_bit = 0x300"),
     "cluster.handover_bit", "single bit"),
    ("handover bit inside tag mask", ("tag_mask = 0xff", "tag_mask = 0xff\nhandover_bit = 0x80"),
     "cluster.handover_bit", "overlaps tag_mask"),
    ("sync group not multicast", ("tag_mask = 0xff", 'tag_mask = 0xff\n[sync]\ngroup = "10.1.1.1"'),
     "sync.group", "not an IPv4 multicast"),
    ("sync bit equals handover bit", ("tag_mask = 0xff",
                                      "tag_mask = 0xff\n[sync]\nmark_bit = 0x40000000"),
     "sync.mark_bit", "also cluster.handover_bit"),
    ("unknown precopy carrier", ("tag_mask = 0xff",
                                 'tag_mask = 0xff\n[sync]\nprecopy = "pigeon"'),
     "sync.precopy", "'peer' or 'replicator'"),
    ("agent port out of range", ("tag_mask = 0xff", "tag_mask = 0xff\n[agent]\npeer_port = 0"),
     "agent.peer_port", "greater than or equal to 1"),
    ("agent unknown key", ("tag_mask = 0xff", "tag_mask = 0xff\n[agent]\nsocket = 'x'"),
     "agent.socket", "unknown key"),
]


@pytest.mark.parametrize("what,edit,key,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_file_key_and_reason(what, edit, key, reason):
    old, new, *count = edit
    assert old in SEED, f"case {what}: edit does not apply"
    lines = bad(SEED.replace(old, new, count[0] if count else -1))
    matching = [ln for ln in lines if ln.startswith(f"cluster.toml: {key}: ")]
    assert matching, f"no line for {key} in {lines}"
    assert any(reason in ln for ln in matching), matching


def test_several_problems_are_all_reported():
    text = SEED.replace("tag = 2", "tag = 1").replace('"10.5.5.201"', '"10.6.5.201"')
    lines = bad(text)
    assert len(lines) >= 2
    assert all(ln.startswith("cluster.toml: ") for ln in lines)


def test_not_toml_and_missing_file(tmp_path):
    assert re.match(r"cluster\.toml: not valid TOML", bad("[cluster\n")[0])
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load(tmp_path / "nope.toml")


def test_empty_file_names_missing_sections():
    lines = bad("")
    assert "cluster.toml: cluster: required key is missing" in lines
    assert "cluster.toml: nodes: required key is missing" in lines
