"""ctnetlink codec: conntrack ``Entry`` <-> netlink message bytes. Pure: no sockets, no root.

A message is an ``nlmsghdr`` (host order), an ``nfgenmsg``, then attributes whose payloads are
in network order (``include/uapi/linux/netfilter/nfnetlink_conntrack.h``).

Speed matters here (a migration moves whole tables), so both directions avoid per-attribute
Python work on the common shapes:
- encoding: IPv4 TCP/UDP entries are one ``struct.pack`` with the constant headers passed as
  byte strings; everything else goes through the readable ``nla``/``nest`` builders, which
  also serve as the reference the fast path is tested against;
- decoding: the kernel sends every entry of one shape with the same attribute layout, so the
  first message of a shape is walked once to learn where each field sits (``learn_layout``)
  and a decoder is generated for it (as ``dataclasses`` generates ``__init__``): it checks
  the header words of each following message with one unpack, reads the fields with another
  and decodes whole runs of same-shaped messages in one call. ``decode_entry_ref`` is the
  plain walk-and-construct reference it is tested against.

Sequence numbers travel in network byte order (``wire_seq``): the kernel only echoes them, and
a fixed byte order lets the whole message be one big-endian ``struct``.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from orchestrator.model.conntrack import (
    Entry,
    Event,
    EventType,
    IPAddress,
    Proto,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)

# --- constants -----------------------------------------------------------------------------
NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_CTNETLINK: Final = 1
MSG_NEW: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 0  # IPCTNL_MSG_CT_NEW
MSG_GET: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 1
MSG_DELETE: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 2
MSG_GET_STATS: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 5

NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_DUMP: Final = 0x300
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400

NFNLGRP_CONNTRACK_NEW: Final = 1
NFNLGRP_CONNTRACK_UPDATE: Final = 2
NFNLGRP_CONNTRACK_DESTROY: Final = 3
ALL_CT_GROUPS: Final = 0b111  # bind() takes a bitmask of groups 1..3

NLA_F_NESTED: Final = 0x8000
NLA_TYPE_MASK: Final = 0x3FFF

# enum ctattr_type
CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_REPLY: Final = 2
CTA_STATUS: Final = 3
CTA_PROTOINFO: Final = 4
CTA_TIMEOUT: Final = 7
CTA_MARK: Final = 8
CTA_ID: Final = 12
CTA_NAT_SRC: Final = 6
CTA_ZONE: Final = 18
CTA_NAT_V4_MINIP: Final = 1
CTA_NAT_V4_MAXIP: Final = 2
CTA_NAT_PROTO: Final = 3
CTA_PROTONAT_PORT_MIN: Final = 1
CTA_PROTONAT_PORT_MAX: Final = 2
CTA_MARK_MASK: Final = 21
CTA_FILTER: Final = 25
CTA_STATUS_MASK: Final = 26
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_IP_V4_SRC: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_IP_V6_SRC: Final = 3
CTA_IP_V6_DST: Final = 4
CTA_PROTO_NUM: Final = 1
CTA_PROTO_SRC_PORT: Final = 2
CTA_PROTO_DST_PORT: Final = 3
CTA_PROTO_ICMP_ID: Final = 4
CTA_PROTO_ICMP_TYPE: Final = 5
CTA_PROTO_ICMP_CODE: Final = 6
CTA_PROTO_ICMPV6_ID: Final = 7
CTA_PROTO_ICMPV6_TYPE: Final = 8
CTA_PROTO_ICMPV6_CODE: Final = 9
# enum ctattr_protoinfo, ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP: Final = 1
CTA_PROTOINFO_TCP_STATE: Final = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: Final = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY: Final = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: Final = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY: Final = 5
# enum ctattr_filter; CTA_FILTER_F_* live in net/netfilter/nf_internals.h
CTA_FILTER_ORIG_FLAGS: Final = 1
CTA_FILTER_REPLY_FLAGS: Final = 2
CTA_FILTER_F_IP_SRC: Final = 1 << 0
CTA_FILTER_F_IP_DST: Final = 1 << 1
# enum ctattr_stats_global
CTA_STATS_GLOBAL_ENTRIES: Final = 1

HDR_LEN: Final = 20  # nlmsghdr + nfgenmsg
NLMSG_HDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq (wire order), portid
_LEN_TYPE_FLAGS: Final = struct.Struct("=IHH")
_NLA_HDR: Final = struct.Struct("=HH")
_U8: Final = struct.Struct(">B")
_BE16: Final = struct.Struct(">H")
_BE32: Final = struct.Struct(">I")
_ERRNO: Final = struct.Struct("=i")

PORT_PROTOS: Final = frozenset({6, 17, 33, 132, 136})  # TCP UDP DCCP SCTP UDPLITE
_AF: Final = {4: socket.AF_INET, 6: socket.AF_INET6}


def wire_seq(seq: int) -> int:
    """The host-order value of a sequence number written in network order (an involution:
    it also maps a received ``nlmsg_seq`` back to ours)."""
    return int.from_bytes(seq.to_bytes(4, "big"), sys.byteorder)


def family_of(t: Tuple) -> int:
    """``AF_INET``/``AF_INET6`` for the tuple's addresses."""
    return _AF[t.src.version]


# --- encoding: readable builders -----------------------------------------------------------


def nla(atype: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return _NLA_HDR.pack(n, atype) + payload + b"\0" * (-n % 4)


def nest(atype: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return _NLA_HDR.pack(4 + len(body), atype | NLA_F_NESTED) + body


def message(msg_type: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    """A complete ctnetlink message (``nlmsghdr`` + ``nfgenmsg`` + attributes)."""
    head = _LEN_TYPE_FLAGS.pack(HDR_LEN + len(body), msg_type, flags | NLM_F_REQUEST)
    return head + _BE32.pack(seq) + b"\0\0\0\0" + bytes((family, 0, 0, 0)) + body


def encode_tuple(atype: int, t: Tuple) -> bytes:
    """``CTA_TUPLE_ORIG``/``CTA_TUPLE_REPLY`` nest for ``t``."""
    v4 = t.src.version == 4
    ip = nest(
        CTA_TUPLE_IP,
        nla(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, t.src.packed),
        nla(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, t.dst.packed),
    )
    parts = [nla(CTA_PROTO_NUM, _U8.pack(t.proto))]
    if t.proto in (Proto.ICMP, Proto.ICMPV6):
        ids = (4, 5, 6) if t.proto == Proto.ICMP else (7, 8, 9)  # CTA_PROTO_ICMP[V6]_*
        parts += [
            nla(ids[0], _BE16.pack(t.sport)),
            nla(ids[1], _U8.pack(t.icmp_type)),
            nla(ids[2], _U8.pack(t.icmp_code)),
        ]
    elif t.proto in PORT_PROTOS:
        parts += [
            nla(CTA_PROTO_SRC_PORT, _BE16.pack(t.sport)),
            nla(CTA_PROTO_DST_PORT, _BE16.pack(t.dport)),
        ]
    return nest(atype, ip, nest(CTA_TUPLE_PROTO, *parts))


def encode_tcpinfo(tcp: TcpInfo) -> bytes:
    """Full TCP protoinfo. Flags go with mask 0xff: the entry's flags become exactly these
    (the kernel applies window scales only when WINDOW_SCALE is set in both directions)."""
    return nest(
        CTA_PROTOINFO,
        nest(
            CTA_PROTOINFO_TCP,
            nla(CTA_PROTOINFO_TCP_STATE, _U8.pack(tcp.state)),
            nla(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, _U8.pack(tcp.wscale_orig)),
            nla(CTA_PROTOINFO_TCP_WSCALE_REPLY, _U8.pack(tcp.wscale_reply)),
            nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes((tcp.flags_orig, 0xFF))),
            nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes((tcp.flags_reply, 0xFF))),
        ),
    )


def encode_tcp_flags(orig: tuple[int, int], reply: tuple[int, int]) -> bytes:
    """Protoinfo changing only TCP flags, as (flags, mask) per direction."""
    return nest(
        CTA_PROTOINFO,
        nest(
            CTA_PROTOINFO_TCP,
            nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes(orig)),
            nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes(reply)),
        ),
    )


def encode_entry_body(e: Entry) -> bytes:
    """Attributes creating (or fully updating) ``e``: both tuples, status, timeout, mark, zone,
    TCP protoinfo. NAT bindings are never encoded: pushed entries are un-NATed (DESIGN §2)."""
    body = [
        encode_tuple(CTA_TUPLE_ORIG, e.tuple_orig),
        encode_tuple(CTA_TUPLE_REPLY, e.tuple_reply),
        nla(CTA_STATUS, _BE32.pack(e.status)),
        nla(CTA_TIMEOUT, _BE32.pack(e.timeout)),
        nla(CTA_MARK, _BE32.pack(e.mark)),
        nla(CTA_ZONE, _BE16.pack(e.zone)),
    ]
    if e.tcp is not None and e.tuple_orig.proto == Proto.TCP:
        body.append(encode_tcpinfo(e.tcp))
    return b"".join(body)


def encode_create_snat(e: Entry, seq: int) -> bytes:
    """Create ``e`` *with* its SNAT binding (failover: the node adopting a dead node's
    address de-SNATs the replies itself). The kernel takes the un-NATed reply tuple and the
    binding (``CTA_NAT_SRC``: the address and port the reply tuple's destination holds) and
    builds the NATed reply tuple; sending that tuple as is would translate nothing."""
    o, r = e.tuple_orig, e.tuple_reply
    if r.dst.version != 4:
        raise ValueError(f"SNAT binding of {e}: IPv4 only")
    binding = nest(CTA_NAT_SRC, nla(CTA_NAT_V4_MINIP, r.dst.packed),
                   nla(CTA_NAT_V4_MAXIP, r.dst.packed),
                   nest(CTA_NAT_PROTO, nla(CTA_PROTONAT_PORT_MIN, _BE16.pack(r.dport)),
                        nla(CTA_PROTONAT_PORT_MAX, _BE16.pack(r.dport))))
    plain = replace(e, tuple_reply=o.reversed())
    return message(MSG_NEW, NLM_F_CREATE | NLM_F_EXCL, seq, family_of(o),
                   encode_entry_body(plain) + binding)


def encode_create_ref(e: Entry, seq: int, flags: int = NLM_F_CREATE | NLM_F_EXCL) -> bytes:
    """``IPCTNL_MSG_CT_NEW`` built attribute by attribute (any family and protocol)."""
    return message(MSG_NEW, flags, seq, family_of(e.tuple_orig), encode_entry_body(e))


def encode_key(t: Tuple, zone: int, atype: int = CTA_TUPLE_ORIG) -> bytes:
    """Lookup attributes: one tuple (either direction finds the entry) and the zone."""
    return encode_tuple(atype, t) + nla(CTA_ZONE, _BE16.pack(zone))


def encode_mark(mark: int) -> bytes:
    return nla(CTA_MARK, _BE32.pack(mark))


def encode_change(key: tuple[Tuple, int], seq: int, extra: bytes) -> bytes:
    """Update the entry found by ``key`` (orig tuple, zone): ``extra`` holds what changes."""
    return message(MSG_NEW, 0, seq, family_of(key[0]), encode_key(*key) + extra)


def encode_delete(key: tuple[Tuple, int], seq: int) -> bytes:
    return message(MSG_DELETE, 0, seq, family_of(key[0]), encode_key(*key))


def encode_get(key: tuple[Tuple, int], seq: int) -> bytes:
    """Look up the entry holding ``key``'s tuple in either direction (both are hashed)."""
    return message(MSG_GET, 0, seq, family_of(key[0]), encode_key(*key))


def encode_flush(seq: int, mark: int | None = None, mark_mask: int = 0xFFFFFFFF) -> bytes:
    """``IPCTNL_MSG_CT_DELETE`` without a tuple: flush all, or entries with this mark."""
    body = b""
    if mark is not None:
        body = nla(CTA_MARK, _BE32.pack(mark)) + nla(CTA_MARK_MASK, _BE32.pack(mark_mask))
    return message(MSG_DELETE, NLM_F_ACK, seq, 0, body)


def encode_get_stats(seq: int) -> bytes:
    return message(MSG_GET_STATS, 0, seq, 0, b"")


@dataclass(frozen=True, slots=True)
class DumpFilter:
    """Kernel-side dump filter (``ctnetlink_filter_match``): every given field must match.

    Address filters need ``family`` (the kernel ignores them for AF_UNSPEC). A zone filter
    rides on ``CTA_FILTER``, and zone 0 cannot be expressed (it means "no filter"): callers
    re-check zones in userspace."""

    family: int = 0
    mark: int | None = None
    mark_mask: int = 0xFFFFFFFF
    status: int | None = None
    status_mask: int | None = None
    zone: int | None = None
    orig_src: IPAddress | None = None
    orig_dst: IPAddress | None = None
    reply_src: IPAddress | None = None
    reply_dst: IPAddress | None = None


def encode_dump(seq: int, f: DumpFilter | None = None) -> bytes:
    """``IPCTNL_MSG_CT_GET`` with ``NLM_F_DUMP`` and the filter's attributes."""
    f = f or DumpFilter()
    attrs = []
    if f.mark is not None:
        attrs += [nla(CTA_MARK, _BE32.pack(f.mark)), nla(CTA_MARK_MASK, _BE32.pack(f.mark_mask))]
    if f.status is not None:
        mask = f.status if f.status_mask is None else f.status_mask
        attrs += [nla(CTA_STATUS, _BE32.pack(f.status)), nla(CTA_STATUS_MASK, _BE32.pack(mask))]
    oflags, orig = _filter_tuple(CTA_TUPLE_ORIG, f.orig_src, f.orig_dst)
    rflags, reply = _filter_tuple(CTA_TUPLE_REPLY, f.reply_src, f.reply_dst)
    if oflags or rflags or f.zone:
        # the flags are NLA_U32 read with nla_get_u32: host order, unlike the payloads
        flags = nla(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", oflags))
        flags += nla(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", rflags))
        attrs += [nest(CTA_FILTER, flags), orig, reply]
        if f.zone:
            attrs.append(nla(CTA_ZONE, _BE16.pack(f.zone)))
    return message(MSG_GET, NLM_F_DUMP, seq, f.family, b"".join(attrs))


def _filter_tuple(atype: int, src: IPAddress | None, dst: IPAddress | None) -> tuple[int, bytes]:
    """(CTA_FILTER_F_* flags, tuple nest) matching the given addresses."""
    parts, flags = [], 0
    for addr, (v4, v6), flag in (
        (src, (CTA_IP_V4_SRC, CTA_IP_V6_SRC), CTA_FILTER_F_IP_SRC),
        (dst, (CTA_IP_V4_DST, CTA_IP_V6_DST), CTA_FILTER_F_IP_DST),
    ):
        if addr is not None:
            parts.append(nla(v4 if addr.version == 4 else v6, addr.packed))
            flags |= flag
    return (flags, nest(atype, nest(CTA_TUPLE_IP, *parts))) if parts else (0, b"")


# --- encoding: the fused fast path ---------------------------------------------------------

Template = tuple[struct.Struct, tuple[bytes, ...]]


def compile_template(*pieces: bytes | str) -> Template:
    """A big-endian ``Struct`` for a message: ``bytes`` pieces are constants (passed as ``Ns``
    fields, adjacent ones merged), ``str`` pieces are struct codes of variables. The caller
    passes constants and variables alternately, starting and ending with a constant."""
    fmt, consts, run = [">"], [], b""
    for p in pieces:
        if isinstance(p, bytes):
            run += p
            continue
        fmt += [f"{len(run)}s", p]
        consts.append(run)
        run = b""
    fmt.append(f"{len(run)}s")
    consts.append(run)
    return struct.Struct("".join(fmt)), tuple(consts)


def _hdr(n: int, atype: int) -> bytes:
    return _NLA_HDR.pack(n, atype)


def _v4_entry_template(flags: int, tcp: bool) -> Template:
    """IPv4 TCP/UDP ``IPCTNL_MSG_CT_NEW``: the layout ``encode_create_ref`` produces."""
    size = HDR_LEN + 2 * 52 + 32 + (48 if tcp else 0)
    pieces: list[bytes | str] = [
        _LEN_TYPE_FLAGS.pack(size, MSG_NEW, flags | NLM_F_REQUEST), "I",  # seq
        b"\0\0\0\0" + bytes((socket.AF_INET, 0, 0, 0)),
    ]  # fmt: skip
    for atype in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
        pieces += [
            _hdr(52, atype | NLA_F_NESTED) + _hdr(20, CTA_TUPLE_IP | NLA_F_NESTED),
            _hdr(8, CTA_IP_V4_SRC), "I", _hdr(8, CTA_IP_V4_DST), "I",
            _hdr(28, CTA_TUPLE_PROTO | NLA_F_NESTED) + _hdr(5, CTA_PROTO_NUM), "B", b"\0" * 3,
            _hdr(6, CTA_PROTO_SRC_PORT), "H", b"\0\0", _hdr(6, CTA_PROTO_DST_PORT), "H", b"\0\0",
        ]  # fmt: skip
    pieces += [
        _hdr(8, CTA_STATUS), "I", _hdr(8, CTA_TIMEOUT), "I", _hdr(8, CTA_MARK), "I",
        _hdr(6, CTA_ZONE), "H", b"\0\0",
    ]  # fmt: skip
    if tcp:
        pieces += [
            _hdr(48, CTA_PROTOINFO | NLA_F_NESTED) + _hdr(44, CTA_PROTOINFO_TCP | NLA_F_NESTED),
            _hdr(5, CTA_PROTOINFO_TCP_STATE), "B", b"\0" * 3,
            _hdr(5, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL), "B", b"\0" * 3,
            _hdr(5, CTA_PROTOINFO_TCP_WSCALE_REPLY), "B", b"\0" * 3,
            _hdr(6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL), "B", b"\xff\0\0",
            _hdr(6, CTA_PROTOINFO_TCP_FLAGS_REPLY), "B", b"\xff\0\0",
        ]  # fmt: skip
    return compile_template(*pieces)


_CREATE: Final = NLM_F_CREATE | NLM_F_EXCL
_V4_TCP: Final = {f: _v4_entry_template(f, True) for f in (_CREATE, 0)}
_V4_PLAIN: Final = {f: _v4_entry_template(f, False) for f in (_CREATE, 0)}
_CACHE_MAX: Final = 1 << 16


def encode_create(e: Entry, seq: int, flags: int = _CREATE) -> bytes:
    """``IPCTNL_MSG_CT_NEW`` for ``e`` (flags ``CREATE|EXCL``: create; 0: update, ``set``).
    IPv4 TCP/UDP entries take one ``pack``; the rest is built attribute by attribute.
    Addresses go in as ``_ip``, the int ``IPv4Address`` keeps: ``int()`` and ``packed`` cost
    5x more, and hashing one (for a cache) costs 300 ns."""
    o, r = e.tuple_orig, e.tuple_reply
    if (
        o.proto in PORT_PROTOS
        and r.proto == o.proto
        and o.src.__class__ is IPv4Address
        and r.src.__class__ is IPv4Address
        and flags in _V4_TCP
    ):
        t = e.tcp
        if t is not None and o.proto == 6:
            st, c = _V4_TCP[flags]
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, c18, c19, c20 = c  # fmt: skip  # noqa: E501
            return st.pack(
                c0, seq, c1,
                o.src._ip, c2, o.dst._ip, c3,  # type: ignore[attr-defined,union-attr]
                o.proto, c4, o.sport, c5, o.dport, c6,
                r.src._ip, c7, r.dst._ip, c8,  # type: ignore[attr-defined,union-attr]
                r.proto, c9, r.sport, c10, r.dport, c11,
                e.status, c12, e.timeout, c13, e.mark, c14, e.zone, c15,
                t.state, c16, t.wscale_orig, c17, t.wscale_reply, c18,
                t.flags_orig, c19, t.flags_reply, c20,
            )  # fmt: skip
        st, c = _V4_PLAIN[flags]
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = c
        return st.pack(
            c0, seq, c1,
            o.src._ip, c2, o.dst._ip, c3,  # type: ignore[attr-defined,union-attr]
            o.proto, c4, o.sport, c5, o.dport, c6,
            r.src._ip, c7, r.dst._ip, c8,  # type: ignore[attr-defined,union-attr]
            r.proto, c9, r.sport, c10, r.dport, c11,
            e.status, c12, e.timeout, c13, e.mark, c14, e.zone, c15,
        )  # fmt: skip
    return encode_create_ref(e, seq, flags)


# --- decoding ------------------------------------------------------------------------------

Buffer = bytes | bytearray | memoryview


def walk(buf: Buffer, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``buf[off:end]``."""
    unpack = _NLA_HDR.unpack_from
    end = min(end, len(buf))
    while off + 4 <= end:
        alen, atype = unpack(buf, off)
        if alen < 4 or off + alen > end:
            raise ValueError(f"malformed attribute at {off}: len {alen}")
        yield atype & NLA_TYPE_MASK, off + 4, off + alen
        off += (alen + 3) & ~3


def _shadow(cls: type) -> type:
    """A plain class with ``cls``'s slots. Objects are built on it with fast attribute stores
    and then become ``cls`` by ``__class__`` assignment (allowed between classes with the same
    ``__slots__``): 2-3x faster than a frozen dataclass's ``__init__``, the same object."""
    return type(f"_{cls.__name__}Shadow", (), {"__slots__": cls.__slots__})  # type: ignore[attr-defined]


_TupleShadow: Final = _shadow(Tuple)
_EntryShadow: Final = _shadow(Entry)
_EventShadow: Final = _shadow(Event)


def make_tuple(src: IPAddress, dst: IPAddress, proto: int, sport: int, dport: int,
               icmp_type: int, icmp_code: int) -> Tuple:  # fmt: skip
    t: Any = object.__new__(_TupleShadow)
    t.src, t.dst, t.proto, t.sport, t.dport = src, dst, proto, sport, dport
    t.icmp_type, t.icmp_code = icmp_type, icmp_code
    t.__class__ = Tuple
    return t


def make_entry(orig: Tuple, reply: Tuple, status: Status, mark: int, timeout: int, zone: int,
               tcp: TcpInfo | None, eid: int | None) -> Entry:  # fmt: skip
    e: Any = object.__new__(_EntryShadow)
    e.tuple_orig, e.tuple_reply, e.status, e.mark = orig, reply, status, mark
    e.timeout, e.zone, e.tcp, e.id = timeout, zone, tcp, eid
    e.__class__ = Entry
    return e


def make_event(kind: EventType, entry: Entry) -> Event:
    ev: Any = object.__new__(_EventShadow)
    ev.type, ev.entry = kind, entry
    ev.__class__ = Event
    return ev


def _check_makers() -> None:
    """Fail at import, not with wrong data, if the model's fields change."""
    a = IPv4Address("192.0.2.1")
    t = Tuple(a, a, 1, 2, 3, 4, 5)
    e = Entry(t, t, Status.CONFIRMED, 6, 7, 8, TcpInfo(), 9)
    if (
        make_tuple(a, a, 1, 2, 3, 4, 5) != t
        or make_entry(t, t, Status.CONFIRMED, 6, 7, 8, TcpInfo(), 9) != e
        or make_entry(t, t, Status.CONFIRMED, 6, 7, 8, TcpInfo(), 9).id != e.id
        or make_event(EventType.NEW, e) != Event(EventType.NEW, e)
    ):
        raise TypeError("Tuple/Entry fields changed: update ctnetlink.make_tuple/make_entry")


_check_makers()


_ADDRS: dict[int | bytes, IPAddress] = {}
_STATUSES: dict[int, Status] = {}
_TCPINFOS: dict[bytes, TcpInfo | None] = {}


def _addr(raw: int | bytes) -> IPAddress:
    if len(_ADDRS) > _CACHE_MAX:
        _ADDRS.clear()
    a = _ADDRS[raw] = IPv4Address(raw) if isinstance(raw, int) else IPv6Address(raw)
    return a


def _status(raw: int) -> Status:
    s = _STATUSES[raw] = Status(raw)
    return s


def decode_tcpinfo(raw: bytes) -> TcpInfo | None:
    """A ``CTA_PROTOINFO`` payload; ``None`` unless it is TCP."""
    for atype, a, b in walk(raw, 0, len(raw)):
        if atype != CTA_PROTOINFO_TCP:
            continue
        v = {t: raw[a2] for t, a2, _ in walk(raw, a, b)}
        state = v.get(CTA_PROTOINFO_TCP_STATE, 0)
        return TcpInfo(
            state=TcpState(state) if state in TcpState._value2member_map_ else state,  # type: ignore[arg-type]
            wscale_orig=v.get(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, 0),
            wscale_reply=v.get(CTA_PROTOINFO_TCP_WSCALE_REPLY, 0),
            flags_orig=TcpFlag(v.get(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, 0)),
            flags_reply=TcpFlag(v.get(CTA_PROTOINFO_TCP_FLAGS_REPLY, 0)),
        )
    return None


def _tcpinfo(raw: bytes) -> TcpInfo | None:
    if len(_TCPINFOS) > _CACHE_MAX:
        _TCPINFOS.clear()
    info = _TCPINFOS[raw] = decode_tcpinfo(raw)
    return info


_TUPLE_LEAVES: Final = {
    (CTA_TUPLE_IP, CTA_IP_V4_SRC): ("src", "I"),
    (CTA_TUPLE_IP, CTA_IP_V4_DST): ("dst", "I"),
    (CTA_TUPLE_IP, CTA_IP_V6_SRC): ("src", "16s"),
    (CTA_TUPLE_IP, CTA_IP_V6_DST): ("dst", "16s"),
    (CTA_TUPLE_PROTO, CTA_PROTO_NUM): ("proto", "B"),
    (CTA_TUPLE_PROTO, CTA_PROTO_SRC_PORT): ("sport", "H"),
    (CTA_TUPLE_PROTO, CTA_PROTO_DST_PORT): ("dport", "H"),
    (CTA_TUPLE_PROTO, CTA_PROTO_ICMP_ID): ("sport", "H"),
    (CTA_TUPLE_PROTO, CTA_PROTO_ICMP_TYPE): ("itype", "B"),
    (CTA_TUPLE_PROTO, CTA_PROTO_ICMP_CODE): ("icode", "B"),
    (CTA_TUPLE_PROTO, CTA_PROTO_ICMPV6_ID): ("sport", "H"),
    (CTA_TUPLE_PROTO, CTA_PROTO_ICMPV6_TYPE): ("itype", "B"),
    (CTA_TUPLE_PROTO, CTA_PROTO_ICMPV6_CODE): ("icode", "B"),
}
_SCALARS: Final = {
    CTA_STATUS: ("status", "I"),
    CTA_MARK: ("mark", "I"),
    CTA_TIMEOUT: ("timeout", "I"),
    CTA_ID: ("id", "I"),
    CTA_ZONE: ("zone", "H"),
}


def entry_fields(buf: Buffer, start: int, end: int) -> tuple[list[int], dict[str, tuple[int, str]]]:
    """Walk one entry message: offsets of the attribute headers that fix its shape and, for
    each field, its offset and struct code (offsets from the message start). Fields are named
    ``o_src`` ... ``r_icode`` for the tuples, then ``status mark timeout id zone tcp``.

    The shape headers are the top-level ones and the IP/PROTO nests of each tuple: their
    lengths fix the leaves (an IPv4 tuple with a zone and an ICMP one have the same length,
    their PROTO nests do not). Leaf headers need no check."""
    headers: list[int] = []
    fields: dict[str, tuple[int, str]] = {}
    for atype, a, b in walk(buf, start + HDR_LEN, end):
        headers.append(a - 4 - start)
        if atype in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            prefix = "o_" if atype == CTA_TUPLE_ORIG else "r_"
            for t1, a1, b1 in walk(buf, a, b):
                headers.append(a1 - 4 - start)
                if t1 not in (CTA_TUPLE_IP, CTA_TUPLE_PROTO):
                    continue
                for t2, a2, _b2 in walk(buf, a1, b1):
                    leaf = _TUPLE_LEAVES.get((t1, t2))
                    if leaf:
                        fields[prefix + leaf[0]] = (a2 - start, leaf[1])
        elif atype in _SCALARS:
            role, code = _SCALARS[atype]
            fields[role] = (a - start, code)
        elif atype == CTA_PROTOINFO:
            fields["tcp"] = (a - start, f"{b - a}s")
    if not {"o_src", "o_dst", "r_src", "r_dst"} <= fields.keys():
        raise ValueError("entry message without both tuples")
    return headers, fields


def decode_entry_ref(buf: Buffer, start: int, end: int) -> Entry:
    """Reference decoder: walk and construct, no caches. ``decode_entry`` must agree."""
    _, fields = entry_fields(buf, start, end)
    v: dict[str, Any] = {
        role: struct.unpack_from(">" + code, buf, start + off)[0]
        for role, (off, code) in fields.items()
    }

    def addr(raw: int | bytes) -> IPAddress:
        return IPv4Address(raw) if isinstance(raw, int) else IPv6Address(raw)

    def tup(p: str) -> Tuple:
        return Tuple(
            addr(v[p + "src"]), addr(v[p + "dst"]), v.get(p + "proto", 0),
            v.get(p + "sport", 0), v.get(p + "dport", 0),
            v.get(p + "itype", 0), v.get(p + "icode", 0),
        )  # fmt: skip

    tcp = v.get("tcp")
    return Entry(
        tup("o_"), tup("r_"), Status(v.get("status", 0)), v.get("mark", 0),
        v.get("timeout", 0), v.get("zone", 0),
        decode_tcpinfo(tcp) if tcp is not None else None, v.get("id"),
    )  # fmt: skip


# The decoder generated per layout: it decodes consecutive messages of its shape (a dump is
# mostly one shape) in straight-line code: one unpack checks the shape (nlmsghdr length and
# type/flags words and the attribute headers), one reads the fields, objects are built on
# shadow classes. ``{...}`` are field names or defaults.
_DECODER_SRC: Final = """\
def decode(buf, off, end, out):
    append = out.append
    while off + size <= end and headers(buf, off) == expect:
        {names} = fields(buf, off)
        {body}
        append(e)
        off += step
    return off
"""
_BUILD_SRC: Final = """\
o = new(TupleShadow)
o.src = addrs.get({o_src}) or addr({o_src})
o.dst = addrs.get({o_dst}) or addr({o_dst})
o.proto, o.sport, o.dport = {o_proto}, {o_sport}, {o_dport}
o.icmp_type, o.icmp_code = {o_itype}, {o_icode}
o.__class__ = Tuple
r = new(TupleShadow)
r.src = addrs.get({r_src}) or addr({r_src})
r.dst = addrs.get({r_dst}) or addr({r_dst})
r.proto, r.sport, r.dport = {r_proto}, {r_sport}, {r_dport}
r.icmp_type, r.icmp_code = {r_itype}, {r_icode}
r.__class__ = Tuple
e = new(EntryShadow)
e.tuple_orig, e.tuple_reply = o, r
e.status = statuses.get({status}) or status_of({status})
e.mark, e.timeout, e.zone, e.id = {mark}, {timeout}, {zone}, {id}
e.tcp = {tcp_expr}
e.__class__ = Entry
"""
_ROLES: Final = (
    "o_src", "o_dst", "o_proto", "o_sport", "o_dport", "o_itype", "o_icode",
    "r_src", "r_dst", "r_proto", "r_sport", "r_dport", "r_itype", "r_icode",
    "status", "mark", "timeout", "id", "zone", "tcp",
)  # fmt: skip

# (buf, offset, end, out) -> offset after the run of messages it decoded into ``out``
Decoder = Callable[[Buffer, int, int, list[Entry]], int]


def learn_layout(buf: Buffer, start: int, end: int) -> Decoder:
    """A decoder for every message shaped like this one."""
    headers, fields = entry_fields(buf, start, end)
    hdr_struct = struct_at("=", [(0, "I"), (4, "I"), *((off, "I") for off in headers)])
    ordered = sorted(fields, key=lambda role: fields[role][0])
    subst = {r: (f"v_{r}" if r in fields else ("None" if r == "id" else "0")) for r in _ROLES}
    subst["tcp_expr"] = "tcpinfos.get(v_tcp) or tcpinfo_of(v_tcp)" if "tcp" in fields else "None"
    subst["names"] = ", ".join(f"v_{r}" for r in ordered) + ","
    body = _BUILD_SRC.format(**subst).strip().replace("\n", "\n        ")
    namespace: dict[str, Any] = {
        "size": end - start, "step": (end - start + 3) & ~3,
        "headers": hdr_struct.unpack_from,
        "expect": hdr_struct.unpack_from(buf, start),
        "fields": struct_at(">", [fields[r] for r in ordered]).unpack_from,
        "new": object.__new__, "TupleShadow": _TupleShadow, "EntryShadow": _EntryShadow,
        "Tuple": Tuple, "Entry": Entry, "addrs": _ADDRS, "addr": _addr,
        "statuses": _STATUSES, "status_of": _status, "tcpinfos": _TCPINFOS,
        "tcpinfo_of": _tcpinfo,
    }  # fmt: skip
    # trusted templates: the substituted names come from _ROLES only
    exec(_DECODER_SRC.format(names=subst["names"], body=body), namespace)
    decoder: Decoder = namespace["decode"]
    return decoder


def struct_at(order: str, specs: list[tuple[int, str]]) -> struct.Struct:
    """A struct reading ``code`` at each ``offset`` (ascending), skipping the bytes between."""
    fmt, pos = [order], 0
    for off, code in specs:
        fmt.append(f"{off - pos}x{code}")
        pos = off + struct.calcsize(order + code)
    return struct.Struct("".join(fmt))


_DECODERS: dict[int, list[Decoder]] = {}  # by message length; shapes are few


def _learn(buf: Buffer, start: int, end: int, out: list[Entry]) -> int:
    """Learn the layout of the message at ``start``, decode from there; the new offset."""
    decoder = learn_layout(buf, start, end)
    if sum(map(len, _DECODERS.values())) > 256:  # bounds odd input
        _DECODERS.clear()
    _DECODERS.setdefault(end - start, []).append(decoder)
    return decoder(buf, start, end, out)


def decode_entry(buf: Buffer, start: int, end: int) -> Entry:
    """One ctnetlink entry message at ``buf[start:end]`` (from its ``nlmsghdr``)."""
    out: list[Entry] = []
    for decoder in _DECODERS.get(end - start, ()):
        if decoder(buf, start, end, out) != start:
            return out[0]
    _learn(buf, start, end, out)
    return out[0]


def iter_messages(buf: Buffer, n: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, our seq, start, end) of each netlink message in ``buf[:n]``."""
    end = len(buf) if n is None else n
    off = 0
    unpack = NLMSG_HDR.unpack_from
    while off + 16 <= end:
        mlen, mtype, flags, seq, _pid = unpack(buf, off)
        if mlen < 16 or off + mlen > end:
            raise ValueError(f"malformed netlink message at {off}: len {mlen}")
        yield mtype, flags, wire_seq(seq), off, off + mlen
        off += (mlen + 3) & ~3


def error_code(buf: Buffer, start: int) -> int:
    """The positive errno of an ``NLMSG_ERROR`` message at ``start`` (0 for an ACK)."""
    return -int(_ERRNO.unpack_from(buf, start + 16)[0])


DUMP_MORE: Final = -1


def decode_dump(buf: Buffer, n: int, seq: int, out: list[Entry]) -> int:
    """Append the entries of one dump ``recv`` to ``out``. Returns ``DUMP_MORE``, 0 when the
    dump is done, or the kernel's errno. Messages of other requests are skipped."""
    wseq = wire_seq(seq)
    off = 0
    unpack = NLMSG_HDR.unpack_from
    decoders = _DECODERS
    while off + 16 <= n:
        mlen, mtype, _flags, mseq, _pid = unpack(buf, off)
        if mlen < 16 or off + mlen > n:
            raise ValueError(f"malformed netlink message at {off}: len {mlen}")
        if mseq == wseq:
            if mtype in (MSG_NEW, MSG_GET):
                # a run of same-shaped messages (the socket is ours alone during a dump)
                for decoder in decoders.get(mlen, ()):
                    after = decoder(buf, off, n, out)
                    if after != off:
                        off = after
                        break
                else:
                    off = _learn(buf, off, off + mlen, out)
                continue
            if mtype == NLMSG_DONE:
                return 0
            elif mtype == NLMSG_ERROR:
                return error_code(buf, off)
        off += (mlen + 3) & ~3
    return DUMP_MORE


def decode_events(buf: Buffer, n: int, out: list[Event]) -> None:
    """Append the conntrack events in one ``recv`` (the kernel sends one per datagram)."""
    off = 0
    unpack = NLMSG_HDR.unpack_from
    while off + 16 <= n:
        mlen, mtype, flags, _seq, _pid = unpack(buf, off)
        if mlen < 16 or off + mlen > n:
            raise ValueError(f"malformed netlink message at {off}: len {mlen}")
        if mtype == MSG_NEW:
            kind = _NEW if flags & (NLM_F_CREATE | NLM_F_EXCL) else _UPDATE
            out.append(make_event(kind, decode_entry(buf, off, off + mlen)))
        elif mtype == MSG_DELETE:
            out.append(make_event(_DESTROY, decode_entry(buf, off, off + mlen)))
        off += (mlen + 3) & ~3


_NEW, _UPDATE, _DESTROY = EventType.NEW, EventType.UPDATE, EventType.DESTROY


def decode_stats_entries(buf: Buffer, start: int, end: int) -> int:
    """``CTA_STATS_GLOBAL_ENTRIES`` of an ``IPCTNL_MSG_CT_GET_STATS`` reply."""
    for atype, a, _b in walk(buf, start + HDR_LEN, end):
        if atype == CTA_STATS_GLOBAL_ENTRIES:
            return int(_BE32.unpack_from(buf, a)[0])
    raise ValueError("stats reply without an entry count")
