"""Encoding ``Entry`` and requests to ctnetlink messages: readable builders (any family and
protocol; the reference), and the fused fast path for IPv4 TCP/UDP entries."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Final

from orchestrator.model.conntrack import (
    Entry,
    IPAddress,
    Key,
    Proto,
    TcpInfo,
    Tuple,
)

from .attrs import (
    BE16,
    BE32,
    CTA_FILTER,
    CTA_FILTER_F_IP_DST,
    CTA_FILTER_F_IP_SRC,
    CTA_FILTER_ORIG_FLAGS,
    CTA_FILTER_REPLY_FLAGS,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_NAT_PROTO,
    CTA_NAT_SRC,
    CTA_NAT_V4_MAXIP,
    CTA_NAT_V4_MINIP,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_FLAGS_REPLY,
    CTA_PROTOINFO_TCP_STATE,
    CTA_PROTOINFO_TCP_WSCALE_ORIGINAL,
    CTA_PROTOINFO_TCP_WSCALE_REPLY,
    CTA_PROTONAT_PORT_MAX,
    CTA_PROTONAT_PORT_MIN,
    CTA_STATUS,
    CTA_STATUS_MASK,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    HDR_LEN,
    LEN_TYPE_FLAGS,
    MSG_DELETE,
    MSG_GET,
    MSG_GET_STATS,
    MSG_NEW,
    NLA_F_NESTED,
    NLA_HDR,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    PORT_PROTOS,
    U8,
    family_of,
)

# --- encoding: readable builders -----------------------------------------------------------


def nla(atype: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return NLA_HDR.pack(n, atype) + payload + b"\0" * (-n % 4)


def nest(atype: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return NLA_HDR.pack(4 + len(body), atype | NLA_F_NESTED) + body


def message(msg_type: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    """A complete ctnetlink message (``nlmsghdr`` + ``nfgenmsg`` + attributes)."""
    head = LEN_TYPE_FLAGS.pack(HDR_LEN + len(body), msg_type, flags | NLM_F_REQUEST)
    return head + BE32.pack(seq) + b"\0\0\0\0" + bytes((family, 0, 0, 0)) + body


def encode_tuple(atype: int, t: Tuple) -> bytes:
    """``CTA_TUPLE_ORIG``/``CTA_TUPLE_REPLY`` nest for ``t``."""
    v4 = t.src.version == 4
    ip = nest(
        CTA_TUPLE_IP,
        nla(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, t.src.packed),
        nla(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, t.dst.packed),
    )
    parts = [nla(CTA_PROTO_NUM, U8.pack(t.proto))]
    if t.proto in (Proto.ICMP, Proto.ICMPV6):
        ids = (4, 5, 6) if t.proto == Proto.ICMP else (7, 8, 9)  # CTA_PROTO_ICMP[V6]_*
        parts += [
            nla(ids[0], BE16.pack(t.sport)),
            nla(ids[1], U8.pack(t.icmp_type)),
            nla(ids[2], U8.pack(t.icmp_code)),
        ]
    elif t.proto in PORT_PROTOS:
        parts += [
            nla(CTA_PROTO_SRC_PORT, BE16.pack(t.sport)),
            nla(CTA_PROTO_DST_PORT, BE16.pack(t.dport)),
        ]
    return nest(atype, ip, nest(CTA_TUPLE_PROTO, *parts))


def encode_tcpinfo(tcp: TcpInfo) -> bytes:
    """Full TCP protoinfo. Flags go with mask 0xff: the entry's flags become exactly these
    (the kernel applies window scales only when WINDOW_SCALE is set in both directions)."""
    return nest(
        CTA_PROTOINFO,
        nest(
            CTA_PROTOINFO_TCP,
            nla(CTA_PROTOINFO_TCP_STATE, U8.pack(tcp.state)),
            nla(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, U8.pack(tcp.wscale_orig)),
            nla(CTA_PROTOINFO_TCP_WSCALE_REPLY, U8.pack(tcp.wscale_reply)),
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
        nla(CTA_STATUS, BE32.pack(e.status)),
        nla(CTA_TIMEOUT, BE32.pack(e.timeout)),
        nla(CTA_MARK, BE32.pack(e.mark)),
        nla(CTA_ZONE, BE16.pack(e.zone)),
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
                   nest(CTA_NAT_PROTO, nla(CTA_PROTONAT_PORT_MIN, BE16.pack(r.dport)),
                        nla(CTA_PROTONAT_PORT_MAX, BE16.pack(r.dport))))
    plain = replace(e, tuple_reply=o.reversed())
    return message(MSG_NEW, NLM_F_CREATE | NLM_F_EXCL, seq, family_of(o),
                   encode_entry_body(plain) + binding)


def encode_create_ref(e: Entry, seq: int, flags: int = NLM_F_CREATE | NLM_F_EXCL) -> bytes:
    """``IPCTNL_MSG_CT_NEW`` built attribute by attribute (any family and protocol)."""
    return message(MSG_NEW, flags, seq, family_of(e.tuple_orig), encode_entry_body(e))


def encode_key(t: Tuple, zone: int, atype: int = CTA_TUPLE_ORIG) -> bytes:
    """Lookup attributes: one tuple (either direction finds the entry) and the zone."""
    return encode_tuple(atype, t) + nla(CTA_ZONE, BE16.pack(zone))


def encode_mark(mark: int) -> bytes:
    return nla(CTA_MARK, BE32.pack(mark))


def encode_change(key: Key, seq: int, extra: bytes) -> bytes:
    """Update the entry found by ``key`` (orig tuple, zone): ``extra`` holds what changes."""
    return message(MSG_NEW, 0, seq, family_of(key[0]), encode_key(*key) + extra)


def encode_delete(key: Key, seq: int) -> bytes:
    return message(MSG_DELETE, 0, seq, family_of(key[0]), encode_key(*key))


def encode_get(key: Key, seq: int) -> bytes:
    """Look up the entry holding ``key``'s tuple in either direction (both are hashed)."""
    return message(MSG_GET, 0, seq, family_of(key[0]), encode_key(*key))


def encode_flush(seq: int, mark: int | None = None, mark_mask: int = 0xFFFFFFFF) -> bytes:
    """``IPCTNL_MSG_CT_DELETE`` without a tuple: flush all, or entries with this mark."""
    body = b""
    if mark is not None:
        body = nla(CTA_MARK, BE32.pack(mark)) + nla(CTA_MARK_MASK, BE32.pack(mark_mask))
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
        attrs += [nla(CTA_MARK, BE32.pack(f.mark)), nla(CTA_MARK_MASK, BE32.pack(f.mark_mask))]
    if f.status is not None:
        mask = f.status if f.status_mask is None else f.status_mask
        attrs += [nla(CTA_STATUS, BE32.pack(f.status)), nla(CTA_STATUS_MASK, BE32.pack(mask))]
    oflags, orig = _filter_tuple(CTA_TUPLE_ORIG, f.orig_src, f.orig_dst)
    rflags, reply = _filter_tuple(CTA_TUPLE_REPLY, f.reply_src, f.reply_dst)
    if oflags or rflags or f.zone:
        # the flags are NLA_U32 read with nla_get_u32: host order, unlike the payloads
        flags = nla(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", oflags))
        flags += nla(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", rflags))
        attrs += [nest(CTA_FILTER, flags), orig, reply]
        if f.zone:
            attrs.append(nla(CTA_ZONE, BE16.pack(f.zone)))
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
    return NLA_HDR.pack(n, atype)


def _v4_entry_template(flags: int, tcp: bool) -> Template:
    """IPv4 TCP/UDP ``IPCTNL_MSG_CT_NEW``: the layout ``encode_create_ref`` produces."""
    size = HDR_LEN + 2 * 52 + 32 + (48 if tcp else 0)
    pieces: list[bytes | str] = [
        LEN_TYPE_FLAGS.pack(size, MSG_NEW, flags | NLM_F_REQUEST), "I",  # seq
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


