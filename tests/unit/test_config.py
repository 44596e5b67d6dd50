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
    # a duplicate is reported where it repeats, naming the first
    ("duplicate tag", ("tag = 2", "tag = 1"), "nodes[1].tag", "duplicate tag 1 (also nodes[0])"),
    ("duplicate prefix", ('"0e:00:00"', '"0a:00:00"'), "nodes[1].mac_prefix", "duplicate"),
    ("overlapping prefix", ('"0e:00:00"', '"0a:00:00:05"'), "nodes[1].mac_prefix", "overlaps"),
    # templates come filled in, with the bad value
    ("multicast prefix", ('"0e:00:00"', '"01:00:00"'), "nodes[1].mac_prefix",
     "'01:00:00' is a multicast prefix"),
    ("malformed prefix", ('"0e:00:00"', '"0e:zz"'), "nodes[1].mac_prefix",
     "hex octets such as '0a:00:00', got '0e:zz'"),
    ("malformed guest mac", ('"52:54:00:00:02:01"', '"52:54:00:00:02"'), "guests[0].macs",
     "'52:54:00:00:02' is not a MAC address"),
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
     "contiguous low bits such as 0xff, got 0xf0"),
    ("pub ip inside subnet", ('"192.168.122.12"', '"10.5.5.12"'), "nodes[1].pub_ip",
     "inside guest_subnet"),
    ("service address not of guest", ('guest = "guest1"\n\n[[services]]\nname = "ntp"',
                                      'guest = "guest1"\naddress = "10.5.5.77"\n\n'
                                      '[[services]]\nname = "ntp"'),
     "services[0].address", "not an address of guest"),
    ("handover bit not single", ("tag_mask = 0xff", "tag_mask = 0xff\nhandover_bit = 0x300"),
     "cluster.handover_bit", "single bit such as 0x40000000, got 0x300"),
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
    # types are strict: no string, float or bool for an integer, no number for an address
    ("string tag", ("tag = 2", 'tag = "2"'), "nodes[1].tag", "valid integer (got '2')"),
    ("float tag", ("tag = 2", "tag = 2.0"), "nodes[1].tag", "valid integer (got 2.0)"),
    ("bool tag", ("tag = 2", "tag = true"), "nodes[1].tag", "valid integer (got True)"),
    ("number subnet", ('guest_subnet = "10.5.5.0/24"', "guest_subnet = 5"),
     "cluster.guest_subnet", "must be a string, got int 5"),
    ("number path", ("tag_mask = 0xff", "tag_mask = 0xff\n[agent]\nrun_dir = 1"),
     "agent.run_dir", "must be a string"),
    ("bool interval", ("tag_mask = 0xff", "tag_mask = 0xff\n[agent]\nreconcile_interval_s = true"),
     "agent.reconcile_interval_s", "valid number"),
    # every cross-field limit the code relies on
    ("duplicate sync_ip", ('guest_ip = "10.5.5.25', 'sync_ip = "10.9.0.1"\nguest_ip = "10.5.5.25'),
     "nodes[1].sync_ip", "duplicate sync_ip 10.9.0.1 (also nodes[0])"),
    ("sync_ip in guest subnet", ('guest_ip = "10.5.5.252"',
                                 'guest_ip = "10.5.5.252"\nsync_ip = "10.5.5.9"'),
     "nodes[1].sync_ip", "inside guest_subnet"),
    ("sync_ip is another node's pub_ip", ('guest_ip = "10.5.5.252"',
                                          'guest_ip = "10.5.5.252"\nsync_ip = "192.168.122.11"'),
     "nodes[1].sync_ip", "is nodes[0].pub_ip"),
    ("pipe named as the guest bridge", ('pipes = ["pipe0"]', 'pipes = ["guestbr0"]', 1),
     "nodes[0].pipes[0]", "also cluster.guest_bridge"),
    ("uplink named as the guest bridge", ('uplink = "xenbr0"', 'uplink = "guestbr0"'),
     "cluster.uplink", "also cluster.guest_bridge"),
    ("duplicate guest address", ('home = "node1"', 'home = "node1"\n\n[[guests]]\n'
                                 'name = "guest2"\nmacs = ["52:54:00:00:02:02"]\n'
                                 'addresses = ["10.5.5.201"]'),
     "guests[1].addresses[0]", "used by another guest (also guests[0].addresses[0])"),
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


def test_tag_that_fits_its_mask_but_not_the_wire_is_refused():
    # valid for tag_mask 0x1ffff, but the replicator's header carries 16 bits of tag
    text = SEED.replace("tag_mask = 0xff", "tag_mask = 0x1ffff").replace("tag = 2", "tag = 70000")
    assert bad(text) == ["cluster.toml: nodes[1].tag: tag 70000 does not fit the replicator's "
                         "16-bit sender tag (at most 65535)"]


def test_wire_tag_limit_is_the_header_field():
    from orchestrator.config.schema import WIRE_TAG_MAX
    from orchestrator.replicator.wire import HEADER

    assert HEADER.format == "!HBBBBHHHIQ"  # magic version type flags key_id TAG ...
    assert WIRE_TAG_MAX == (1 << (8 * 2)) - 1


def test_field_errors_and_cross_field_errors_in_one_run():
    # node 1's tag has a type error; the duplicate guest address is a cross-field problem
    text = SEED.replace("tag = 2", 'tag = "2"').replace(
        'home = "node1"', 'home = "node1"\n\n[[guests]]\nname = "guest2"\n'
        'macs = ["52:54:00:00:02:02"]\naddresses = ["10.5.5.201"]')
    lines = bad(text)
    assert "cluster.toml: nodes[1].tag: Input should be a valid integer (got '2')" in lines
    assert any(ln.startswith("cluster.toml: guests[1].addresses[0]: 10.5.5.201 is used by")
               for ln in lines), lines


def test_not_utf8_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(SEED.replace('name = "seed"', 'name = "s\xe9ed"').encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load(path)
    offset = SEED.index('name = "seed"') + len('name = "s')
    assert str(exc.value) == (f"{path}: line 4: not UTF-8 (byte 0xe9 at offset {offset}); "
                              "TOML files are UTF-8")


def test_tag_that_does_not_fit_the_bridge_mac_is_refused():
    # a 5-octet prefix leaves one octet of the guest bridge's MAC for the tag
    text = SEED.replace("tag_mask = 0xff", "tag_mask = 0xffff").replace(
        '"0e:00:00"', '"0e:00:00:00:00"').replace("tag = 2", "tag = 300")
    assert bad(text) == ["cluster.toml: nodes[1].tag: tag 300 does not fit the 1 octet(s) that "
                         "mac_prefix 0e:00:00:00:00 leaves for the bridge MAC"]
