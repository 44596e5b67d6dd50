"""The config schema, beside its loader (``loader.py``): the cluster as one validated
description of settings, nodes, services, guests.

These pydantic models are both the config schema and the in-memory topology the rest
of the core reads. Cross-field rules (unique tags, addresses inside the subnet, ...)
live here so every entry point (CLI, agent, lab, tests) gets the same verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.errors import UnknownName

IFNAME = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,15}$")]
NAME = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_PREFIX_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){0,4}$")
# the replicator's datagram header carries the sender's tag in 16 bits (replicator.wire)
WIRE_TAG_MAX = 0xFFFF


def _error(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    """A validation error whose text is already filled in: pydantic only substitutes bare
    ``{name}`` fields, so ``{v!r}`` or ``{v:#x}`` would reach the operator unfilled."""
    return PydanticCustomError(kind, message.format(**ctx))  # no context: taken as written


def _text(v: Any) -> Any:
    """Addresses, networks and paths are written as strings: pydantic would otherwise read
    ``guest_subnet = 5`` as 0.0.0.5/32 and ``run_dir = 1`` as a path named "1"."""
    if isinstance(v, str | IPv4Address | IPv4Network | Path):
        return v
    raise _error("string_type", "must be a string, got {t} {v!r}", t=type(v).__name__, v=v)


# strict: ``tag = "2"``, ``2.0`` or ``true`` are mistakes, not 2 (bool is an int to Python)
INT = StrictInt
FLOAT = Annotated[float, Field(strict=True)]  # an int is still a fine float
IPV4 = Annotated[IPv4Address, BeforeValidator(_text)]
NET4 = Annotated[IPv4Network, BeforeValidator(_text)]
PATH = Annotated[Path, BeforeValidator(_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


_M = TypeVar("_M", bound=_Strict)


class Cluster(_Strict):
    name: NAME = "convergent"
    guest_subnet: NET4
    gateway: IPV4
    guest_bridge: IFNAME = "guestbr0"
    uplink: IFNAME = "xenbr0"
    tag_mask: INT = Field(0xFF, ge=1, le=0xFFFFFFFF)
    # ct mark bit on entries a migration pushed to its destination: outside tag_mask so the
    # rules ignore it; an abort (even after a crash) finds exactly those entries by it
    handover_bit: INT = Field(0x40000000, ge=1, le=0xFFFFFFFF)

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
    tag: INT = Field(ge=1)
    mac_prefix: str
    pub_ip: IPV4
    guest_ip: IPV4
    pipes: list[IFNAME] = Field(min_length=1)
    # where the other agents reach this one (peer channel, unicast sync); pub_ip if unset
    sync_ip: IPV4 | None = None

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
    port: INT = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp"] = "tcp"
    guest: NAME
    address: IPV4 | None = None
    guest_port: INT | None = Field(None, ge=1, le=65535)
    mode: Mode = Mode.STATELESS

    @property
    def target_port(self) -> int:
        return self.guest_port or self.port


class Guest(_Strict):
    name: NAME
    macs: list[str] = Field(min_length=1)
    addresses: list[IPV4] = Field(min_length=1)
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


class LabSettings(_Strict):
    """``[lab]``, only read by ``convergent lab``: the workstation on the uplink segment."""

    workstation: IPV4 = IPv4Address("192.168.122.1")
    uplink_prefix: INT = Field(24, ge=8, le=30)


class AgentSettings(_Strict):
    """``[agent]``: where one node's agent keeps its state and how it reaches its peers."""

    run_dir: PATH = Path("/run/convergent")  # the API socket: run_dir/agent-<node>.sock
    store: str = "sqlite:///var/lib/convergent/store.db"
    audit_log: PATH = Path("/var/log/convergent/audit.log")
    spool_dir: PATH = Path("/var/spool/convergent")
    key_file: PATH = Path("/etc/convergent/cluster.key")  # the cluster's HMAC key
    # the audit chain's own key (made on first start): every line carries a mac under it
    audit_key_file: PATH = Path("/etc/convergent/audit.key")
    # what must survive a restart of the agent (the replicator's boot ids)
    state_dir: PATH = Path("/var/lib/convergent")
    peer_port: INT = Field(7404, ge=1, le=65535)
    reconcile_interval_s: FLOAT = Field(10.0, gt=0, le=3600)
    # the node's liveness lease: dead this long after its last heartbeat (etcd's minimum
    # is about 1.5 election timeouts; a failover refuses a node whose lease is alive)
    lease_ttl_s: FLOAT = Field(10.0, ge=1, le=600)
    # a migration with no progress for this long is aborted by its destination
    migration_timeout_s: FLOAT = Field(900.0, gt=0)
    # how long a destination keeps retrying a source agent that went away mid-migration
    peer_retry_s: FLOAT = Field(5.0, ge=0, le=300)
    # a migration a restarted agent finds half-done gets this long to hear its resume or
    # failure; then the hypervisor's view settles it (runs here: cut over; absent: abort)
    recovery_settle_s: FLOAT = Field(30.0, gt=0, le=3600)
    # Prometheus /metrics: "HOST:PORT" (an address of this host, "[v6]:port" too) or "" (off)
    metrics: str = "127.0.0.1:9474"

    @field_validator("metrics")
    @classmethod
    def _listen(cls, v: str) -> str:
        listen_address(v)
        return v

    def socket(self, node: str) -> Path:
        return self.run_dir / f"agent-{node}.sock"

    def spool(self, node: str) -> Path:
        """Where this node's hooks spool (``{node}`` is replaced: agents sharing one file,
        as in the lab, each replay only their own node's calls)."""
        return Path(str(self.spool_dir).replace("{node}", node))

    def metrics_listen(self) -> tuple[str, int] | None:
        return listen_address(self.metrics)


def listen_address(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9474"`` -> ``("127.0.0.1", 9474)``; ``"[::1]:9474"``, ``"localhost:9474"``
    too; ``""`` -> None (off)."""
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT with a port from 1 to 65535")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address or localhost") from None
    return host, int(port)


class Sync(_Strict):
    """The replicator's channel and scope (DESIGN §4)."""

    transport: Literal["multicast", "unicast"] = "multicast"
    group: IPV4 = IPv4Address("239.255.77.1")
    port: INT = Field(7405, ge=1, le=65535)
    interface: IFNAME = "sync0"
    ttl: INT = Field(1, ge=1, le=255)
    mark_bit: INT = Field(0x80000000, ge=1, le=0xFFFFFFFF)  # ct_sync's cmarkbit
    backlog: INT = Field(4096, ge=16, le=1 << 20)  # datagrams kept for NACKed resends
    flush_ms: FLOAT = Field(5.0, gt=0, le=1000)
    resync_rate: INT = Field(50_000, ge=100)  # entries/s a full resync may send
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


class HypervisorSection(BaseModel):
    """``[hypervisor]``: which adapter the node's agent runs (an entry point of group
    ``convergent.hypervisors``, or ``noop`` for a node that only NATs) and that adapter's
    own settings: every other key, handed to it as written."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: NAME = "noop"

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Topology(_Strict):
    """One file describes the whole cluster."""

    cluster: Cluster
    nodes: list[Node] = Field(min_length=1)
    services: list[Service] = []
    guests: list[Guest] = []
    lab: LabSettings = Field(default_factory=LabSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    sync: Sync = Field(default_factory=Sync)
    hypervisor: HypervisorSection = Field(default_factory=HypervisorSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Topology:
        problems = list(cross_check(Parts.of(self)))
        if problems:
            # one pydantic error carries them all; the loader prints one line per problem
            text = "; ".join(f"{loc}: {msg}" for loc, msg in problems)
            raise PydanticCustomError("topology", "{text}", {"text": text, "problems": problems})
        return self

    # lookups --------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UnknownName("node", name, [n.name for n in self.nodes])

    def guest(self, name: str) -> Guest:
        for g in self.guests:
            if g.name == name:
                return g
        raise UnknownName("guest", name, [g.name for g in self.guests])

    def service_address(self, svc: Service) -> IPv4Address:
        return svc.address or self.guest(svc.guest).addresses[0]


def _single_bit(v: int) -> int:
    if v & (v - 1):
        raise _error("bit", "must be a single bit such as 0x40000000, got {v:#x}", v=v)
    return v


# --- cross-field checks ------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """What validated of a config, section by section and item by item (None: that part
    has field errors of its own), so the cross-field checks still run on the rest and
    one run reports every problem."""

    cluster: Cluster | None
    nodes: list[Node | None]
    services: list[Service | None]
    guests: list[Guest | None]
    sync: Sync | None

    @classmethod
    def of(cls, t: Topology) -> Parts:
        return cls(t.cluster, list(t.nodes), list(t.services), list(t.guests), t.sync)

    @classmethod
    def salvage(cls, data: Any) -> Parts:
        """Validate each part of raw config data on its own; what fails becomes None."""
        data = data if isinstance(data, dict) else {}
        return cls(_one(Cluster, data.get("cluster")), _each(Node, data.get("nodes")),
                   _each(Service, data.get("services")), _each(Guest, data.get("guests")),
                   _one(Sync, data.get("sync", {})))  # fmt: skip


def _one(model: type[_M], raw: Any) -> _M | None:
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _each(model: type[_M], raw: Any) -> list[_M | None]:
    return [_one(model, item) for item in raw] if isinstance(raw, list) else []


def _repeats(values: list[Any]) -> Iterator[tuple[int, int, Any]]:
    """(index, index of its first occurrence, value) for every repeated value (None and
    missing parts are not values)."""
    first: dict[Any, int] = {}
    for i, v in enumerate(values):
        if v is None:
            continue
        if v in first:
            yield i, first[v], v
        else:
            first[v] = i


def _valid(items: list[_M | None]) -> Iterator[tuple[int, _M]]:
    return ((i, x) for i, x in enumerate(items) if x is not None)


def cross_check(p: Parts) -> Iterator[tuple[str, str]]:
    """Every cross-field problem as (key path, reason), each where it occurs: a duplicate
    where it repeats, naming the first. Pure; the loader reports them all at once."""
    yield from _node_checks(p)
    yield from _interface_checks(p)
    yield from _bit_checks(p)
    yield from _guest_checks(p)
    yield from _service_checks(p)


def _node_checks(p: Parts) -> Iterator[tuple[str, str]]:
    nodes = p.nodes
    for key in ("name", "tag", "mac_prefix", "pub_ip", "guest_ip", "sync_ip"):
        values = [getattr(n, key) if n else None for n in nodes]
        for i, j, dup in _repeats(values):
            yield f"nodes[{i}].{key}", f"duplicate {key} {dup} (also nodes[{j}])"
    # where the other agents reach a node: its sync_ip, else its pub_ip
    for i, n in _valid(nodes):
        for j, m in _valid(nodes):
            if j != i and n.sync_ip is not None and n.sync_ip == m.pub_ip:
                yield f"nodes[{i}].sync_ip", f"{n.sync_ip} is nodes[{j}].pub_ip ({m.name})"
    c = p.cluster
    for i, n in _valid(nodes):
        if n.tag > WIRE_TAG_MAX:
            yield f"nodes[{i}].tag", (f"tag {n.tag} does not fit the replicator's 16-bit "
                                      f"sender tag (at most {WIRE_TAG_MAX})")
        free = 6 - n.prefix_octets
        if n.tag >= 256**free:
            yield f"nodes[{i}].tag", (f"tag {n.tag} does not fit the {free} octet(s) that "
                                      f"mac_prefix {n.mac_prefix} leaves for the bridge MAC")
        for j, m in _valid(nodes):
            if j != i and m.mac_prefix.startswith(n.mac_prefix) and m.mac_prefix != n.mac_prefix:
                yield f"nodes[{j}].mac_prefix", f"{m.mac_prefix} overlaps {n.name}'s {n.mac_prefix}"
        for k, _, dup in _repeats(list(n.pipes)):
            yield f"nodes[{i}].pipes[{k}]", f"pipe {dup} listed twice"
        if c is None:
            continue
        if n.tag & ~c.tag_mask:
            yield f"nodes[{i}].tag", f"tag {n.tag} does not fit tag_mask {c.tag_mask:#x}"
        if n.guest_ip not in c.guest_subnet:
            yield f"nodes[{i}].guest_ip", f"{n.guest_ip} is outside guest_subnet {c.guest_subnet}"
        if n.guest_ip == c.gateway:
            yield f"nodes[{i}].guest_ip", f"{n.guest_ip} is the shared gateway address"
        if n.pub_ip in c.guest_subnet:
            yield f"nodes[{i}].pub_ip", f"{n.pub_ip} is inside guest_subnet {c.guest_subnet}"
        if n.sync_ip is not None and n.sync_ip in c.guest_subnet:
            yield f"nodes[{i}].sync_ip", f"{n.sync_ip} is inside guest_subnet {c.guest_subnet}"


def _interface_checks(p: Parts) -> Iterator[tuple[str, str]]:
    """Every interface of a node has its own name: the bridges, the sync link, the pipes."""
    c, sync = p.cluster, p.sync
    named: dict[str, str] = {}
    if c is not None:
        named[c.guest_bridge] = "cluster.guest_bridge"
        if c.uplink in named:
            yield "cluster.uplink", f"{c.uplink} is also cluster.guest_bridge"
        named.setdefault(c.uplink, "cluster.uplink")
    if sync is not None:
        if sync.interface in named:
            yield "sync.interface", f"{sync.interface} is also {named[sync.interface]}"
        named.setdefault(sync.interface, "sync.interface")
    for i, n in _valid(p.nodes):
        for k, pipe in enumerate(n.pipes):
            if pipe in named:
                yield f"nodes[{i}].pipes[{k}]", f"pipe {pipe} is also {named[pipe]}"


def _bit_checks(p: Parts) -> Iterator[tuple[str, str]]:
    c, sync = p.cluster, p.sync
    if c is None or sync is None:
        return
    for key, bit in (("cluster.handover_bit", c.handover_bit), ("sync.mark_bit", sync.mark_bit)):
        if bit & c.tag_mask:
            yield key, f"bit {bit:#x} overlaps tag_mask {c.tag_mask:#x}"
    if c.handover_bit == sync.mark_bit:
        yield "sync.mark_bit", f"bit {sync.mark_bit:#x} is also cluster.handover_bit"


def _guest_checks(p: Parts) -> Iterator[tuple[str, str]]:
    c = p.cluster
    nodes = [n for _, n in _valid(p.nodes)]
    for i, j, dup in _repeats([g.name if g else None for g in p.guests]):
        yield f"guests[{i}].name", f"duplicate guest {dup} (also guests[{j}])"
    addr_at: dict[IPv4Address, str] = {}
    mac_at: dict[str, str] = {}
    for i, g in _valid(p.guests):
        for k, a in enumerate(g.addresses):
            where = f"guests[{i}].addresses[{k}]"
            if c is not None and a not in c.guest_subnet:
                yield where, f"{a} is outside guest_subnet {c.guest_subnet}"
            elif c is not None and a in _reserved(c, nodes):
                yield where, f"{a} is reserved (gateway, node, net)"
            elif a in addr_at:
                yield where, f"{a} is used by another guest (also {addr_at[a]})"
            addr_at.setdefault(a, where)
        for k, mac in enumerate(g.macs):
            where = f"guests[{i}].macs[{k}]"
            for n in nodes:
                if n.owns_mac(mac):
                    yield where, f"{mac} falls in node {n.name}'s prefix"
            if mac in mac_at:
                yield where, f"{mac} is used by another guest (also {mac_at[mac]})"
            mac_at.setdefault(mac, where)
        if g.home is not None and g.home not in {n.name for n in nodes}:
            yield f"guests[{i}].home", f"unknown node {g.home!r}"


def _reserved(c: Cluster, nodes: list[Node]) -> set[IPv4Address]:
    return {c.gateway, *(n.guest_ip for n in nodes), c.guest_subnet.network_address,
            c.guest_subnet.broadcast_address}  # fmt: skip


def _service_checks(p: Parts) -> Iterator[tuple[str, str]]:
    guests = {g.name: g for _, g in _valid(p.guests)}
    seen_ports: dict[tuple[str, int], int] = {}
    for i, s in _valid(p.services):
        if (s.proto, s.port) in seen_ports:
            yield f"services[{i}].port", (
                f"{s.proto}/{s.port} already published by services[{seen_ports[(s.proto, s.port)]}]"
            )
        seen_ports.setdefault((s.proto, s.port), i)
        if s.guest not in guests:
            if None not in p.guests:  # else it may be one that failed to validate
                yield f"services[{i}].guest", f"unknown guest {s.guest!r}"
        elif s.address is not None and s.address not in guests[s.guest].addresses:
            yield f"services[{i}].address", f"{s.address} is not an address of guest {s.guest}"
    for i, j, dup in _repeats([s.name if s else None for s in p.services]):
        yield f"services[{i}].name", f"duplicate service {dup} (also services[{j}])"
