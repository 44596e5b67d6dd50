"""Conntrack entries as plain data: what crosses the netlink, planner and wire seams.

Kernel words on purpose (``tuple_orig``, ``status``, ``mark``, ``zone``) so this
reads next to ``conntrack -L`` and ``include/uapi/linux/netfilter/nf_conntrack_common.h``.
Addresses are ``ipaddress`` objects so IPv6 needs no new types later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address, ip_address

IPAddress = IPv4Address | IPv6Address


class Proto(enum.IntEnum):
    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58


class Status(enum.IntFlag):
    """``enum ip_conntrack_status`` bits."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SEQ_ADJUST = 1 << 6
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9
    FIXED_TIMEOUT = 1 << 10
    TEMPLATE = 1 << 11
    UNTRACKED = 1 << 12
    HELPER = 1 << 13
    OFFLOAD = 1 << 14
    HW_OFFLOAD = 1 << 15


class TcpState(enum.IntEnum):
    """``enum tcp_conntrack``."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class TcpFlag(enum.IntFlag):
    """``IP_CT_TCP_FLAG_*`` per direction."""

    WINDOW_SCALE = 0x01
    SACK_PERM = 0x02
    CLOSE_INIT = 0x04
    BE_LIBERAL = 0x08
    DATA_UNACKNOWLEDGED = 0x10
    MAXACK_SET = 0x20
    CHALLENGE_ACK = 0x40
    SIMULTANEOUS_OPEN = 0x80


class EventType(enum.IntEnum):
    NEW = 1
    UPDATE = 2
    DESTROY = 3


@dataclass(frozen=True, slots=True)
class Tuple:
    """One direction of a flow. For ICMP ``sport`` carries the id, ``icmp_type``/``icmp_code``
    the type and code (as the kernel's tuple does)."""

    src: IPAddress
    dst: IPAddress
    proto: int
    sport: int = 0
    dport: int = 0
    icmp_type: int = 0
    icmp_code: int = 0

    @classmethod
    def of(
        cls, src: str | IPAddress, dst: str | IPAddress, proto: int, sport: int = 0, dport: int = 0
    ) -> Tuple:
        return cls(ip_address(src), ip_address(dst), int(proto), sport, dport)

    def reversed(self) -> Tuple:
        """The tuple the other direction would carry without NAT."""
        if self.proto in (Proto.ICMP, Proto.ICMPV6):
            return replace(self, src=self.dst, dst=self.src, icmp_type=_icmp_reply(self.icmp_type))
        return replace(self, src=self.dst, dst=self.src, sport=self.dport, dport=self.sport)

    @property
    def family(self) -> int:
        return self.src.version

    def __str__(self) -> str:
        if self.proto in (Proto.ICMP, Proto.ICMPV6):
            return f"{self.src}>{self.dst} icmp id={self.sport} type={self.icmp_type}"
        known = self.proto in Proto._value2member_map_
        name = Proto(self.proto).name.lower() if known else self.proto
        return f"{self.src}:{self.sport}>{self.dst}:{self.dport}/{name}"


# echo request <-> echo reply, for v4 and v6
_ICMP_REPLY = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17, 128: 129, 129: 128}


def _icmp_reply(icmp_type: int) -> int:
    return _ICMP_REPLY.get(icmp_type, icmp_type)


Key = tuple[Tuple, int]  # (orig tuple, zone): what identifies an entry, as in the kernel


@dataclass(frozen=True, slots=True)
class TcpInfo:
    state: TcpState = TcpState.ESTABLISHED
    wscale_orig: int = 0
    wscale_reply: int = 0
    flags_orig: TcpFlag = TcpFlag(0)  # noqa: RUF009 (immutable)
    flags_reply: TcpFlag = TcpFlag(0)  # noqa: RUF009 (immutable)


@dataclass(frozen=True, slots=True)
class Entry:
    """A conntrack entry. ``key`` (orig tuple + zone) identifies it, as in the kernel."""

    tuple_orig: Tuple
    tuple_reply: Tuple
    status: Status = Status.CONFIRMED
    mark: int = 0
    timeout: int = 0
    zone: int = 0
    tcp: TcpInfo | None = None
    id: int | None = field(default=None, compare=False)

    @property
    def key(self) -> Key:
        return (self.tuple_orig, self.zone)

    @property
    def is_src_nat(self) -> bool:
        return bool(self.status & Status.SRC_NAT)

    @property
    def is_dst_nat(self) -> bool:
        return bool(self.status & Status.DST_NAT)

    def addresses(self) -> frozenset[IPAddress]:
        """Every address the entry names, in either direction."""
        o, r = self.tuple_orig, self.tuple_reply
        return frozenset((o.src, o.dst, r.src, r.dst))

    def __str__(self) -> str:
        extra = f" tcp={self.tcp.state.name}" if self.tcp else ""
        return (
            f"{self.tuple_orig} reply={self.tuple_reply} status={int(self.status):#x} "
            f"mark={self.mark:#x} zone={self.zone} timeout={self.timeout}{extra}"
        )


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    entry: Entry
