"""The cluster as one validated description: settings, nodes, services, guests.

These pydantic models are both the config schema and the in-memory topology the rest
of the core reads. Cross-field rules (unique tags, addresses inside the subnet, ...)
live here so every entry point (CLI, agent, lab, tests) gets the same verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

IFNAME = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,15}$")]
NAME = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_PREFIX_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){0,4}$")


def _error(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Cluster(_Strict):
    name: NAME = "convergent"
    guest_subnet: IPv4Network
    gateway: IPv4Address
    guest_bridge: IFNAME = "guestbr0"
    uplink: IFNAME = "xenbr0"
    tag_mask: int = Field(0xFF, ge=1, le=0xFFFFFFFF)
    # ct mark bit on entries a migration pushed to its destination: outside tag_mask so the
    # rules ignore it; an abort (even after a crash) finds exactly those entries by it
    handover_bit: int = Field(0x40000000, ge=1, le=0xFFFFFFFF)

    @field_validator("tag_mask")
    @classmethod
    def _contiguous_low_bits(cls, v: int) -> int:
        if v & (v + 1):
            raise _error("tag_mask", "must be contiguous low bits such as 0xff, got {v:#x}", v=v)
        return v

    @field_validator("handover_bit")
    @classmethod
    def _one_bit(cls, v: int) -> int:
        return _single_bit(v)

    @model_validator(mode="after")
    def _gateway_in_subnet(self) -> Cluster:
        if self.gateway not in self.guest_subnet:
            raise _error(
                "subnet",
                "gateway {gw} is outside guest_subnet {net}",
                gw=str(self.gateway),
                net=str(self.guest_subnet),
            )
        return self


class Node(_Strict):
    name: NAME
    tag: int = Field(ge=1)
    mac_prefix: str
    pub_ip: IPv4Address
    guest_ip: IPv4Address
    pipes: list[IFNAME] = Field(min_length=1)
    # where the other agents reach this one (peer channel, unicast sync); pub_ip if unset
    sync_ip: IPv4Address | None = None

    @property
    def peer_ip(self) -> IPv4Address:
        return self.sync_ip or self.pub_ip

    @field_validator("mac_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.lower()
        if not _PREFIX_RE.match(v):
            raise _error("mac", "must be 1 to 5 hex octets such as '0a:00:00', got {v!r}", v=v)
        if int(v[:2], 16) & 1:
            raise _error("mac", "{v!r} is a multicast prefix (lowest bit of first octet set)", v=v)
        return v

    @property
    def prefix_octets(self) -> int:
        return len(self.mac_prefix.split(":"))

    @property
    def mac_mask(self) -> str:
        return ":".join(["ff"] * self.prefix_octets + ["00"] * (6 - self.prefix_octets))

    @property
    def mac_match(self) -> str:
        """The prefix padded to a full MAC, as the netdev rule compares it."""
        return ":".join(self.mac_prefix.split(":") + ["00"] * (6 - self.prefix_octets))

    @property
    def bridge_mac(self) -> str:
        """The guest bridge's MAC: the prefix, then the tag in the low octets."""
        free = 6 - self.prefix_octets
        tail = [f"{(self.tag >> (8 * i)) & 0xFF:02x}" for i in reversed(range(free))]
        return ":".join(self.mac_prefix.split(":") + tail)

    def owns_mac(self, mac: str) -> bool:
        return mac.lower().startswith(self.mac_prefix)


class Mode(StrEnum):
    STATELESS = "stateless"
    FULLNAT = "fullnat"


class Service(_Strict):
    name: NAME
    port: int = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp"] = "tcp"
    guest: NAME
    address: IPv4Address | None = None
    guest_port: int | None = Field(None, ge=1, le=65535)
    mode: Mode = Mode.STATELESS

    @property
    def target_port(self) -> int:
        return self.guest_port or self.port


class Guest(_Strict):
    name: NAME
    macs: list[str] = Field(min_length=1)
    addresses: list[IPv4Address] = Field(min_length=1)
    home: NAME | None = None  # where the lab starts it; runtime ownership lives in the store

    @field_validator("macs")
    @classmethod
    def _macs(cls, v: list[str]) -> list[str]:
        out = []
        for mac in v:
            mac = mac.lower()
            if not _MAC_RE.match(mac):
                raise _error("mac", "{mac!r} is not a MAC address like 52:54:00:12:34:56", mac=mac)
            if int(mac[:2], 16) & 1:
                raise _error("mac", "{mac!r} is a multicast MAC", mac=mac)
            out.append(mac)
        return out


class Lab(_Strict):
    """Only read by ``convergent lab``: the workstation on the uplink segment."""

    workstation: IPv4Address = IPv4Address("192.168.122.1")
    uplink_prefix: int = Field(24, ge=8, le=30)


class Agent(_Strict):
    """Where one node's agent keeps its state and how it reaches its peers."""

    run_dir: Path = Path("/run/convergent")  # the API socket: run_dir/agent-<node>.sock
    store: str = "sqlite:///var/lib/convergent/store.db"
    audit_log: Path = Path("/var/log/convergent/audit.log")
    spool_dir: Path = Path("/var/spool/convergent")
    key_file: Path = Path("/etc/convergent/cluster.key")  # the cluster's HMAC key
    peer_port: int = Field(7404, ge=1, le=65535)
    reconcile_interval_s: float = Field(10.0, gt=0, le=3600)
    # a migration with no progress for this long is aborted by its destination
    migration_timeout_s: float = Field(900.0, gt=0)
    # how long a destination keeps retrying a source agent that went away mid-migration
    peer_retry_s: float = Field(5.0, ge=0, le=300)

    def socket(self, node: str) -> Path:
        return self.run_dir / f"agent-{node}.sock"


class Sync(_Strict):
    """The replicator's channel and scope (DESIGN §4)."""

    transport: Literal["multicast", "unicast"] = "multicast"
    group: IPv4Address = IPv4Address("239.255.77.1")
    port: int = Field(7405, ge=1, le=65535)
    interface: IFNAME = "sync0"
    ttl: int = Field(1, ge=1, le=255)
    mark_bit: int = Field(0x80000000, ge=1, le=0xFFFFFFFF)  # ct_sync's cmarkbit
    backlog: int = Field(4096, ge=16, le=1 << 20)  # datagrams kept for NACKed resends
    flush_ms: float = Field(5.0, gt=0, le=1000)
    resync_rate: int = Field(50_000, ge=100)  # entries/s a full resync may send
    # what carries a handover's precopy: the agents' TCP peer channel, or a stream of the
    # replicator (NACKed UDP on the sync link; control stays on the peer channel)
    precopy: Literal["peer", "replicator"] = "peer"

    @field_validator("mark_bit")
    @classmethod
    def _one_bit(cls, v: int) -> int:
        return _single_bit(v)

    @field_validator("group")
    @classmethod
    def _multicast(cls, v: IPv4Address) -> IPv4Address:
        if not v.is_multicast:
            raise _error("group", "{v} is not an IPv4 multicast address", v=str(v))
        return v


class Topology(_Strict):
    """One file describes the whole cluster."""

    cluster: Cluster
    nodes: list[Node] = Field(min_length=1)
    services: list[Service] = []
    guests: list[Guest] = []
    lab: Lab = Field(default_factory=Lab)
    agent: Agent = Field(default_factory=Agent)
    sync: Sync = Field(default_factory=Sync)

    @model_validator(mode="after")
    def _cross_checks(self) -> Topology:
        problems = list(cross_check(self))
        if problems:
            # one pydantic error carries them all; the loader prints one line per problem
            text = "; ".join(f"{loc}: {msg}" for loc, msg in problems)
            raise _error("topology", "{text}", text=text, problems=problems)
        return self

    # lookups --------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def node_by_tag(self, tag: int) -> Node | None:
        for n in self.nodes:
            if n.tag == tag:
                return n
        return None

    def guest(self, name: str) -> Guest:
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(name)

    def service_address(self, svc: Service) -> IPv4Address:
        return svc.address or self.guest(svc.guest).addresses[0]


def _single_bit(v: int) -> int:
    if v & (v - 1):
        raise _error("bit", "must be a single bit such as 0x40000000, got {v:#x}", v=v)
    return v


def _dupes(values: list[Any]) -> set[Any]:
    seen: set[Any] = set()
    return {v for v in values if v in seen or seen.add(v)}  # type: ignore[func-returns-value]


def cross_check(t: Topology) -> Iterator[tuple[str, str]]:
    """Every cross-field problem as (key path, reason). Pure; the loader reports them all."""
    c = t.cluster
    for key in ("name", "tag", "mac_prefix", "pub_ip", "guest_ip"):
        for dup in _dupes([getattr(n, key) for n in t.nodes]):
            i = [getattr(n, key) for n in t.nodes].index(dup)
            yield f"nodes[{i}].{key}", f"duplicate {key} {dup}"
    for i, n in enumerate(t.nodes):
        if n.tag & ~c.tag_mask:
            yield f"nodes[{i}].tag", f"tag {n.tag} does not fit tag_mask {c.tag_mask:#x}"
        if n.guest_ip not in c.guest_subnet:
            yield f"nodes[{i}].guest_ip", f"{n.guest_ip} is outside guest_subnet {c.guest_subnet}"
        if n.guest_ip == c.gateway:
            yield f"nodes[{i}].guest_ip", f"{n.guest_ip} is the shared gateway address"
        if n.pub_ip in c.guest_subnet:
            yield f"nodes[{i}].pub_ip", f"{n.pub_ip} is inside guest_subnet {c.guest_subnet}"
        for j, m in enumerate(t.nodes):
            if j != i and (m.mac_prefix.startswith(n.mac_prefix)) and m.mac_prefix != n.mac_prefix:
                yield f"nodes[{j}].mac_prefix", f"{m.mac_prefix} overlaps {n.name}'s {n.mac_prefix}"
        for dup in _dupes(n.pipes):
            yield f"nodes[{i}].pipes", f"pipe {dup} listed twice"
    for key, bit in (("cluster.handover_bit", c.handover_bit), ("sync.mark_bit", t.sync.mark_bit)):
        if bit & c.tag_mask:
            yield key, f"bit {bit:#x} overlaps tag_mask {c.tag_mask:#x}"
    if c.handover_bit == t.sync.mark_bit:
        yield "sync.mark_bit", f"bit {t.sync.mark_bit:#x} is also cluster.handover_bit"
    node_names = {n.name for n in t.nodes}
    reserved = {c.gateway, *(n.guest_ip for n in t.nodes), c.guest_subnet.network_address,
                c.guest_subnet.broadcast_address}
    for dup in _dupes([g.name for g in t.guests]):
        yield f"guests[{[g.name for g in t.guests].index(dup)}].name", f"duplicate guest {dup}"
    all_macs = [m for g in t.guests for m in g.macs]
    all_addrs = [a for g in t.guests for a in g.addresses]
    for i, g in enumerate(t.guests):
        for k, a in enumerate(g.addresses):
            if a not in c.guest_subnet:
                yield f"guests[{i}].addresses[{k}]", f"{a} is outside guest_subnet {c.guest_subnet}"
            elif a in reserved:
                yield f"guests[{i}].addresses[{k}]", f"{a} is reserved (gateway, node, net)"
            elif a in _dupes(all_addrs):
                yield f"guests[{i}].addresses[{k}]", f"{a} is used by another guest"
        for k, mac in enumerate(g.macs):
            for n in t.nodes:
                if n.owns_mac(mac):
                    yield f"guests[{i}].macs[{k}]", f"{mac} falls in node {n.name}'s prefix"
            if mac in _dupes(all_macs):
                yield f"guests[{i}].macs[{k}]", f"{mac} is used by another guest"
        if g.home is not None and g.home not in node_names:
            yield f"guests[{i}].home", f"unknown node {g.home!r}"
    guests = {g.name: g for g in t.guests}
    seen_ports: dict[tuple[str, int], int] = {}
    for i, s in enumerate(t.services):
        if (s.proto, s.port) in seen_ports:
            yield f"services[{i}].port", (
                f"{s.proto}/{s.port} already published by services[{seen_ports[(s.proto, s.port)]}]"
            )
        seen_ports[(s.proto, s.port)] = i
        if s.guest not in guests:
            yield f"services[{i}].guest", f"unknown guest {s.guest!r}"
        elif s.address is not None and s.address not in guests[s.guest].addresses:
            yield f"services[{i}].address", f"{s.address} is not an address of guest {s.guest}"
    for dup in _dupes([s.name for s in t.services]):
        i = [s.name for s in t.services].index(dup)
        yield f"services[{i}].name", f"duplicate service {dup}"
