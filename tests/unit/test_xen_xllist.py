"""``xl list`` and ``xl list -l`` output (xen/xllist.py), from recordings of Xen's format."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from orchestrator.xen.names import Phase
from orchestrator.xen.xllist import parse_list, parse_list_long

DATA = Path(__file__).resolve().parents[1] / "data" / "xen"


def test_running_domains_without_dom0() -> None:
    doms = parse_list_long((DATA / "xl-list-l-running.json").read_text())
    assert [(d.domid, d.name, d.type) for d in doms] == [(5, "guest1", "pv"), (7, "web2", "hvm")]
    g, w = doms
    assert g.uuid == "039e9ee6-4a84-3055-4c81-8ba426ae2656"
    assert g.macs == ("52:54:00:00:02:01",) and g.addresses == (IPv4Address("10.5.5.201"),)
    assert g.nics[0].bridge == "guestbr0" and g.nics[0].script == "/etc/xen/scripts/convergent-vif"
    # MACs lower-cased; networks and IPv6 in ip are not the guest's addresses; a nic with
    # no ip and no bridge key (libxl left the default out)
    assert w.macs == ("00:16:3e:3e:86:60", "00:16:3e:3e:86:61")
    assert w.addresses == (IPv4Address("10.5.5.202"),)
    assert (w.nics[1].devid, w.nics[1].ip, w.nics[1].bridge) == (1, "", None)


@pytest.mark.parametrize(("file", "name", "phase", "domid"), [
    ("xl-list-l-migrating-dst.json", "guest1--incoming", Phase.INCOMING, 12),
    ("xl-list-l-migrating-src.json", "guest1--migratedaway", Phase.AWAY, 5),
])
def test_migrating_copies_carry_libxls_suffix(file: str, name: str, phase: Phase,
                                               domid: int) -> None:
    (dom,) = parse_list_long((DATA / file).read_text())
    assert (dom.name, dom.guest, dom.phase, dom.domid) == (name, "guest1", phase, domid)


def test_empty_list_and_dry_run_domid() -> None:
    assert parse_list_long("[]") == []
    (dom,) = parse_list_long(json.dumps([{"domid": None, "config": {"c_info": {"name": "x"}}}]))
    assert dom.domid is None and dom.nics == ()


@pytest.mark.parametrize(("text", "message"), [
    ("nope", "not JSON"),
    ("{}", "expected a JSON array"),
    ("[1]", r"\[0\]: expected an object with a config"),
    ('[{"domid": -1, "config": {"c_info": {"name": "x"}}}]', "domid: -1 is not a domain id"),
    ('[{"domid": 1, "config": {}}]', "c_info: missing"),
    ('[{"domid": 1, "config": {"c_info": {"name": ""}}}]', "c_info.name: missing"),
    ('[{"domid": 1, "config": {"c_info": {"name": "x"}, "nics": {}}}]', "nics: expected a list"),
    ('[{"domid": 1, "config": {"c_info": {"name": "x"}, "nics": [3]}}]', r"nics\[0\]: expected"),
    ('[{"domid": 1, "config": {"c_info": {"name": "x"}, "nics": [{"devid": "a"}]}}]',
     "devid: 'a' is not a number"),
])
def test_malformed_output_is_refused_naming_the_place(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_list_long(text, source="xl list -l")


def test_short_listing_states() -> None:
    rows = parse_list((DATA / "xl-list.txt").read_text())
    assert [(r.name, r.domid) for r in rows] == [
        ("Domain-0", 0), ("guest1", 5), ("guest1--incoming", 12), ("my guest", 7)]
    by = {r.name: r for r in rows}
    assert by["guest1"].running and not by["guest1"].paused
    assert by["guest1--incoming"].paused and not by["guest1--incoming"].running
    with pytest.raises(ValueError, match="no 'Name ID"):
        parse_list("")
    with pytest.raises(ValueError, match="line 2"):
        parse_list("Name ID Mem VCPUs State Time(s)\nbroken line\n")
