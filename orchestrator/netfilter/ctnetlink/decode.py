"""Decoding ctnetlink messages to ``Entry``/``Event``: the plain reference walk, and decoders
generated per message shape (``learn_layout``)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from orchestrator.model.conntrack import (
    Entry,
    Event,
    EventType,
    IPAddress,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)

from .attrs import (
    BE32,
    CTA_ID,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_MARK,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_ICMP_CODE,
    CTA_PROTO_ICMP_ID,
    CTA_PROTO_ICMP_TYPE,
    CTA_PROTO_ICMPV6_CODE,
    CTA_PROTO_ICMPV6_ID,
    CTA_PROTO_ICMPV6_TYPE,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_FLAGS_REPLY,
    CTA_PROTOINFO_TCP_STATE,
    CTA_PROTOINFO_TCP_WSCALE_ORIGINAL,
    CTA_PROTOINFO_TCP_WSCALE_REPLY,
    CTA_STATS_GLOBAL_ENTRIES,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    ERRNO,
    HDR_LEN,
    MSG_DELETE,
    MSG_GET,
    MSG_NEW,
    NLA_HDR,
    NLA_TYPE_MASK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    wire_seq,
)

# --- decoding ------------------------------------------------------------------------------

Buffer = bytes | bytearray | memoryview


def walk(buf: Buffer, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``buf[off:end]``."""
    unpack = NLA_HDR.unpack_from
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


_CACHE_MAX: Final = 1 << 16  # values kept per cache before it starts over
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
    return -int(ERRNO.unpack_from(buf, start + 16)[0])


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
            return int(BE32.unpack_from(buf, a)[0])
    raise ValueError("stats reply without an entry count")
