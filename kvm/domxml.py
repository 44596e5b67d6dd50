"""Domain XML, both ways (pure): what convergent reads from a libvirt domain (name, uuid,
MACs, bridges, tap names, the guest's addresses from convergent's own ``<metadata>``
element), and the lab's own diskless TCG domain.

The metadata element lives in convergent's XML namespace, so a guest needs no entry in the
cluster file::

    <metadata>
      <cv:guest xmlns:cv="urn:convergent:guest:1">
        <cv:address>10.5.5.201</cv:address>
      </cv:guest>
    </metadata>
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from xml.sax.saxutils import escape, quoteattr

METADATA_NS = "urn:convergent:guest:1"
METADATA_PREFIX = "cv"


@dataclass(frozen=True)
class Interface:
    mac: str
    bridge: str | None = None  # <source bridge=...> of a bridge interface
    tap: str | None = None  # <target dev=...>: only in a running domain's XML


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str | None
    id: int | None  # libvirt's domain id: only while it runs
    interfaces: tuple[Interface, ...] = ()
    addresses: tuple[IPv4Address, ...] = ()  # from convergent's metadata; () if none
    metadata_errors: tuple[str, ...] = field(default=(), compare=False)

    @property
    def macs(self) -> tuple[str, ...]:
        return tuple(i.mac for i in self.interfaces)

    @property
    def bridges(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i.bridge for i in self.interfaces if i.bridge))


class DomainXMLError(ValueError):
    """A domain description convergent cannot read (one line: what and why)."""


def parse_domain(xml: str) -> Domain:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXMLError(f"domain XML does not parse: {exc}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"expected a <domain> element, got <{root.tag}>")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise DomainXMLError("domain XML has no <name>")
    raw_id = root.get("id")
    interfaces = tuple(_interface(e) for e in root.findall("./devices/interface"))
    addresses, errors = metadata_addresses(root)
    return Domain(name, (root.findtext("uuid") or "").strip() or None,
                  int(raw_id) if raw_id and raw_id.lstrip("-").isdigit() else None,
                  tuple(i for i in interfaces if i is not None), addresses, errors)


def _interface(e: ET.Element) -> Interface | None:
    mac = e.find("mac")
    if mac is None or not mac.get("address"):
        return None
    source, target = e.find("source"), e.find("target")
    return Interface(mac.get("address", "").lower(),
                     source.get("bridge") if source is not None else None,
                     target.get("dev") if target is not None else None)


def metadata_addresses(root: ET.Element) -> tuple[tuple[IPv4Address, ...], tuple[str, ...]]:
    """The addresses in convergent's metadata element; unreadable ones are reported, not
    guessed at."""
    found: list[IPv4Address] = []
    errors: list[str] = []
    for guest in root.findall(f"./metadata/{{{METADATA_NS}}}guest"):
        # `virsh metadata --set` puts only the top element in the namespace: its children
        # may come without one
        for e in [*guest.findall(f"{{{METADATA_NS}}}address"), *guest.findall("address")]:
            text = (e.text or "").strip()
            try:
                addr = IPv4Address(text)
            except ValueError:
                errors.append(f"metadata address {text!r} is not an IPv4 address")
                continue
            if addr not in found:
                found.append(addr)
    return tuple(found), tuple(errors)


def metadata_element(addresses: Sequence[IPv4Address | str]) -> str:
    """convergent's metadata element (what ``virsh metadata --set`` or a domain's
    ``<metadata>`` carries)."""
    inner = "".join(f"<{METADATA_PREFIX}:address>{escape(str(a))}</{METADATA_PREFIX}:address>"
                    for a in addresses)
    return (f'<{METADATA_PREFIX}:guest xmlns:{METADATA_PREFIX}="{METADATA_NS}">{inner}'
            f"</{METADATA_PREFIX}:guest>")


# the lab's domain --------------------------------------------------------------------
@dataclass(frozen=True)
class LabDomain:
    """A diskless-to-the-migration TCG guest: kernel + initramfs, the root disk read-only."""

    name: str
    uuid: str
    mac: str
    bridge: str
    address: IPv4Interface  # the guest's address and prefix, given on its kernel command line
    gateway: IPv4Address
    kernel: str
    initrd: str
    rootfs: str
    console_log: str
    ssh_key: str  # the base64 of the ed25519 key allowed to log in as root
    tcp_ports: tuple[int, ...] = ()  # the lab responder's ports inside the guest
    udp_ports: tuple[int, ...] = ()
    metadata: tuple[IPv4Address, ...] = ()  # convergent metadata addresses, if any
    memory_mib: int = 128
    tb_cache_mib: int = 32

    def cmdline(self) -> str:
        args = ["console=ttyS0", "quiet", "panic=-1", f"cv_name={self.name}",
                f"cv_ip={self.address.with_prefixlen}", f"cv_gw={self.gateway}",
                f"cv_key={self.ssh_key}"]
        if self.tcp_ports:
            args.append("cv_tcp=" + ",".join(map(str, self.tcp_ports)))
        if self.udp_ports:
            args.append("cv_udp=" + ",".join(map(str, self.udp_ports)))
        return " ".join(args)


def lab_domain_xml(d: LabDomain) -> str:
    metadata = (f"  <metadata>{metadata_element(d.metadata)}</metadata>\n"
                if d.metadata else "")
    return f"""<domain type='qemu'>
  <name>{escape(d.name)}</name>
  <uuid>{d.uuid}</uuid>
{metadata}  <memory unit='MiB'>{d.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(d.kernel)}</kernel>
    <initrd>{escape(d.initrd)}</initrd>
    <cmdline>{escape(d.cmdline())}</cmdline>
  </os>
  <features><acpi/><tcg><tb-cache unit='MiB'>{d.tb_cache_mib}</tb-cache></tcg></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(d.rootfs)}/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='{d.mac}'/>
      <source bridge={quoteattr(d.bridge)}/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path={quoteattr(d.console_log)} append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
