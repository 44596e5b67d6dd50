"""Kernel conntrack events straight to replication records, with no objects in between.

The sender's hot path: every conntrack event of the node becomes a wire record (the layout
of ``wire.py``) or nothing. Building an ``Entry`` per event and encoding it again cost about
three quarters of the sender's time; here each ctnetlink message shape is learned once
(``ctnetlink.entry_fields``, the same walk the entry decoder learns from) and a translator is
generated for it: one unpack of the fields, one pack of the record (as ``ctnetlink`` generates
its decoders). ``tests/unit/test_kernel_records.py`` holds every translator to the reference
path, ``wire.encode_upsert(ctnetlink.decode_entry_ref(message))``.

An event the wire cannot carry (a proto it does not know, status bits it does not know)
becomes ``UNENCODABLE``, which the feed counts, as the entry path counts ``encode_upsert``'s
EncodeError.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, cast

from orchestrator.model.conntrack import EventType
from orchestrator.netfilter import ctnetlink as nl
from orchestrator.netfilter.conntrack import EventStream, Overrun

from .wire import PROTOS_BY_FAMILY, RECORD_HAS_TCP, STATUS_MASK, encode_tcp

Buffer = nl.Buffer


# One conntrack event as the wire carries it: (what happened, the entry's UPDATE record,
# whose key is ``wire.key_of_record(record)``). A plain tuple: one is built per event.
KernelRecord = tuple[EventType, bytes]


# (buf, start of the message) -> the record; None: not this translator's shape; b"": the
# wire cannot carry this entry
Translator = Callable[[Buffer, int], "bytes | None"]

_SRC: Final = """\
def translate(buf, off):
    if headers(buf, off) != expect:
        return None
    {names} = fields(buf, off)
    if {proto} not in protos or {status} & ~status_mask:
        return b""
    {tcp}
    return pack(update, family, {proto}, rflags, {zone},
                {o_src}, {o_dst}, {o_sport}, {o_dport}, {o_itype}, {o_icode},
                {r_src}, {r_dst}, {r_sport}, {r_dport}, {r_itype}, {r_icode},
                {status}, {mark}, {timeout}) + tail
"""
# CTA_PROTOINFO: TCP's becomes the record's five TCP bytes; another proto's (SCTP, DCCP) is
# not carried, as ``ctnetlink`` decodes it to ``tcp=None``
_TCP_TAIL: Final = """tail = tcp_tails.get(v_tcp)
    if tail is None:
        tail = tcp_tail(v_tcp)
    if tail and {proto} != 6:
        return b""
    rflags = has_tcp if tail else 0"""

_ROLES: Final = (
    "o_src", "o_dst", "o_proto", "o_sport", "o_dport", "o_itype", "o_icode",
    "r_src", "r_dst", "r_sport", "r_dport", "r_itype", "r_icode",
    "status", "mark", "timeout", "zone", "tcp",
)  # fmt: skip
_ADDRESSES: Final = frozenset({"o_src", "o_dst", "r_src", "r_dst"})
_RAW_CODES: Final = {"I": "4s", "16s": "16s"}  # addresses stay packed bytes

_TCP_TAILS: dict[bytes, bytes] = {}  # protoinfo payload -> the record's 5 TCP bytes ("": bad)


def _tcp_tail(raw: bytes) -> bytes:
    info = nl.decode_tcpinfo(raw)
    tail = b"" if info is None else encode_tcp(info)
    if len(_TCP_TAILS) >= 4096:
        _TCP_TAILS.clear()
    _TCP_TAILS[raw] = tail
    return tail


def learn(buf: Buffer, start: int, end: int) -> Translator:
    """A translator for every message shaped like the one at ``buf[start:end]``."""
    headers, fields = nl.entry_fields(buf, start, end)
    family = 4 if fields["o_src"][1] == "I" else 6
    proto_field = "o_proto" if "o_proto" in fields else None
    has_tcp = "tcp" in fields
    specs = {r: (off, _RAW_CODES[code] if r in _ADDRESSES else code)
             for r, (off, code) in fields.items() if r in _ROLES}  # fmt: skip
    ordered = sorted(specs, key=lambda r: specs[r][0])
    subst = {r: (f"v_{r}" if r in specs else "0") for r in _ROLES}
    subst["proto"] = f"v_{proto_field}" if proto_field else "0"
    subst["names"] = ", ".join(f"v_{r}" for r in ordered) + ","
    subst["tcp"] = _TCP_TAIL.format(proto=subst["proto"]) if has_tcp else "pass"
    tuple_code = "4s4sHHBB" if family == 4 else "16s16sHHBB"
    pack = struct.Struct("!BBBBH" + tuple_code * 2 + "III").pack
    hdr = nl.struct_at("=", [(0, "I"), (4, "I"), *((off, "I") for off in headers)])
    namespace: dict[str, Any] = {
        "headers": hdr.unpack_from, "expect": hdr.unpack_from(buf, start),
        "fields": nl.struct_at(">", [specs[r] for r in ordered]).unpack_from,
        "pack": pack, "update": int(EventType.UPDATE), "family": family,
        "protos": PROTOS_BY_FAMILY[family], "status_mask": STATUS_MASK,
        "has_tcp": RECORD_HAS_TCP, "rflags": 0, "tail": b"",
        "tcp_tails": _TCP_TAILS, "tcp_tail": _tcp_tail,
    }  # fmt: skip
    # a trusted template: the substituted names come from _ROLES only
    exec(_SRC.format(**subst), namespace)
    translator: Translator = namespace["translate"]
    return translator


_TRANSLATORS: dict[int, list[Translator]] = {}  # by message length; shapes are few


def translate(buf: Buffer, start: int, end: int) -> bytes | None:
    """The UPDATE record for the ctnetlink entry message at ``buf[start:end]``; None if the
    wire cannot carry it."""
    for t in _TRANSLATORS.get(end - start, ()):
        record = t(buf, start)
        if record is not None:
            return record or None
    return _learn(buf, start, end) or None


def _learn(buf: Buffer, start: int, end: int) -> bytes:
    try:
        t = learn(buf, start, end)
    except (ValueError, KeyError, struct.error):
        return b""  # not an entry we can read
    if sum(map(len, _TRANSLATORS.values())) > 256:  # bounds odd input
        _TRANSLATORS.clear()
    _TRANSLATORS.setdefault(end - start, []).append(t)
    return t(buf, start) or b""


UNENCODABLE: Final[KernelRecord] = (EventType.DESTROY, b"")  # the feed counts these
_NEW, _UPDATE, _DESTROY = EventType.NEW, EventType.UPDATE, EventType.DESTROY
_CREATED: Final = nl.NLM_F_CREATE | nl.NLM_F_EXCL


def decode_event_records(buf: Buffer, n: int, out: list[Any]) -> None:
    """``ctnetlink.decode_events`` for the sender: one ``KernelRecord`` per event, or
    ``UNENCODABLE``. (``translate`` inlined: this runs once per conntrack event.)"""
    off = 0
    unpack, translators = nl.NLMSG_HDR.unpack_from, _TRANSLATORS
    while off + 16 <= n:
        mlen, mtype, flags, _seq, _pid = unpack(buf, off)
        if mlen < 16 or off + mlen > n:
            raise ValueError(f"malformed netlink message at {off}: len {mlen}")
        if mtype == nl.MSG_NEW or mtype == nl.MSG_DELETE:
            op = _DESTROY if mtype == nl.MSG_DELETE else _NEW if flags & _CREATED else _UPDATE
            for t in translators.get(mlen, ()):
                record = t(buf, off)
                if record is not None:
                    break
            else:
                record = _learn(buf, off, off + mlen)
            out.append((op, record) if record else UNENCODABLE)
        off += (mlen + 3) & ~3


class RecordStream(EventStream):
    """A node's conntrack events as ``KernelRecord`` (or ``UNENCODABLE``, or ``Overrun``)."""

    decode_messages = staticmethod(decode_event_records)

    async def records(self) -> AsyncIterator[list[KernelRecord | Overrun]]:
        async for batch in self.batches():
            yield cast(list[KernelRecord | Overrun], batch)
