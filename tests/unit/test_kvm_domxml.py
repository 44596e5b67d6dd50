"""Domain XML both ways: what the adapter reads, what the lab writes (and reads back)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from kvm.domxml import (
    METADATA_NS,
    DomainXMLError,
    Interface,
    LabDomain,
    lab_domain_xml,
    metadata_element,
    parse_domain,
)
from kvm.libvirtd import lab_host_uuid, libvirtd_conf


def _lab_domain(**kw: object) -> LabDomain:
    base: dict[str, object] = dict(
        name="guest1", uuid="81585649-028d-1e3a-95c7-fb01bcae8d8b", mac="52:54:00:00:02:01",
        bridge="guestbr0", address=IPv4Interface("10.5.5.201/24"),
        gateway=IPv4Address("10.5.5.254"), kernel="/c/vmlinuz", initrd="/c/initrd.gz",
        rootfs="/c/rootfs.ext4", console_log="/lab/console/guest1.log", ssh_key="AAAAC3Nz",
        tcp_ports=(80,), udp_ports=(123,))
    base.update(kw)
    return LabDomain(**base)  # type: ignore[arg-type]


def test_lab_domain_reads_back() -> None:
    d = parse_domain(lab_domain_xml(_lab_domain()))
    assert d.name == "guest1" and d.uuid == "81585649-028d-1e3a-95c7-fb01bcae8d8b"
    assert d.interfaces == (Interface("52:54:00:00:02:01", "guestbr0", None),)
    assert d.addresses == () and d.id is None


def test_lab_domain_is_tcg_with_a_read_only_disk_and_small_memory() -> None:
    xml = lab_domain_xml(_lab_domain())
    assert "<domain type='qemu'>" in xml and "<readonly/>" in xml
    assert "<memory unit='MiB'>128</memory>" in xml and "tb-cache unit='MiB'>32" in xml
    cmd = _lab_domain().cmdline()
    assert "cv_ip=10.5.5.201/24" in cmd and "cv_gw=10.5.5.254" in cmd
    assert "cv_tcp=80" in cmd and "cv_udp=123" in cmd and "cv_key=AAAAC3Nz" in cmd


def test_metadata_addresses_round_trip() -> None:
    xml = lab_domain_xml(_lab_domain(metadata=(IPv4Address("10.5.5.201"),
                                               IPv4Address("10.5.5.202"))))
    assert parse_domain(xml).addresses == (IPv4Address("10.5.5.201"), IPv4Address("10.5.5.202"))
    assert METADATA_NS in metadata_element(["10.5.5.9"])


def test_bad_metadata_is_reported_not_guessed() -> None:
    xml = (f"<domain><name>g</name><metadata><cv:guest xmlns:cv='{METADATA_NS}'>"
           "<cv:address>10.5.5.300</cv:address><cv:address>10.5.5.7</cv:address>"
           "</cv:guest><other xmlns='urn:x'><address>1.2.3.4</address></other></metadata>"
           "</domain>")
    d = parse_domain(xml)
    assert d.addresses == (IPv4Address("10.5.5.7"),)
    assert d.metadata_errors == ("metadata address '10.5.5.300' is not an IPv4 address",)


@pytest.mark.parametrize("xml, message", [
    ("<domain><name>g", "does not parse"),
    ("<network><name>g</name></network>", "expected a <domain>"),
    ("<domain><uuid>u</uuid></domain>", "no <name>"),
])
def test_unreadable_domains_say_why(xml: str, message: str) -> None:
    with pytest.raises(DomainXMLError, match=message):
        parse_domain(xml)


def test_running_domain_xml_has_id_and_tap() -> None:
    xml = ("<domain type='qemu' id='7'><name>g</name><devices>"
           "<interface type='bridge'><mac address='52:54:00:AA:00:01'/>"
           "<source bridge='guestbr0'/><target dev='vnet3'/></interface>"
           "<interface type='network'><mac address='52:54:00:aa:00:02'/>"
           "<source network='default'/></interface>"
           "<interface type='user'/></devices></domain>")
    d = parse_domain(xml)
    assert d.id == 7
    assert d.macs == ("52:54:00:aa:00:01", "52:54:00:aa:00:02")
    assert d.bridges == ("guestbr0",) and d.interfaces[0].tap == "vnet3"


def test_every_lab_daemon_has_its_own_host_uuid() -> None:
    uuids = {lab_host_uuid(lab, node) for lab in ("a", "b") for node in ("n1", "n2")}
    assert len(uuids) == 4 and lab_host_uuid("a", "n1") == lab_host_uuid("a", "n1")
    conf = libvirtd_conf(lab_host_uuid("a", "n1"), "172.30.0.11", "/l/libvirtd.log")  # type: ignore[arg-type]
    assert 'listen_addr = "172.30.0.11"' in conf and "listen_tls = 0" in conf
