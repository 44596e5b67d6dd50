"""Wire format v1 of the replicator: one datagram = header + body + HMAC-SHA256-128.

Pure codec, no sockets: ``Codec.decode(bytes) -> Message`` and back. The layout is the
table in ``docs/wire-format.md``; the constants below are the source of truth for it.

The decoder checks everything (size, magic, version, key id, HMAC, type, flags, body
length against the record count, every record in bounds, every enum and address) and
raises nothing but :class:`DecodeError`, whose ``reason`` a receiver turns into a counter.

Sequence numbers are u32 on the wire and wrap; the protocol core keeps them as unbounded
ints and converts at this boundary with RFC 1982 serial arithmetic (:func:`unwrap`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Hashable, Mapping, MutableMapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from orchestrator.errors import ConvergentError
from orchestrator.model.conntrack import (
    Entry,
    EventType,
    IPAddress,
    Key,
    Proto,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)

MAGIC = 0x4356  # "CV"
VERSION = 1
MAC_SIZE = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 section 5, RFC 4868)
HEADER = struct.Struct("!HBBBBHHHIQ")  # magic version type flags key_id tag stream count seq boot
HEADER_SIZE = HEADER.size  # 24
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
SEQ_MOD = 1 << 32
_HALF = 1 << 31

WireKey = bytes  # the same key as it travels: family proto zone orig-tuple; hashes in C
Peer = Hashable  # whatever the channel uses to name a peer, e.g. ("10.0.0.2", 3780)


class MsgType(enum.IntEnum):
    DATA = 1
    NACK = 2
    ALIVE = 3
    HELLO = 4
    RESYNC_REQUEST = 5
    RESYNC_BEGIN = 6
    RESYNC_END = 7


SEQUENCED = frozenset({MsgType.DATA, MsgType.RESYNC_END})  # consume a seq, kept in the backlog


class Flag(enum.IntFlag):
    RESEND = 0x01  # DATA: rebuilt from current state; the body starts with ``as_of``
    VOID = 0x02  # RESYNC_BEGIN: carries a range of seqs the sender can no longer serve


# plain ints: ~ of an IntFlag member only flips the *defined* bits
_TYPE_FLAGS: dict[int, int] = {MsgType.DATA: int(Flag.RESEND), MsgType.RESYNC_BEGIN: int(Flag.VOID)}

RECORD_HAS_TCP = 0x01  # record flags: five bytes of TCP state follow


class DecodeReason(enum.Enum):
    """Why a datagram was dropped; the value is the counter name."""

    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    UNKNOWN_KEY = "unknown_key"
    BAD_HMAC = "bad_hmac"
    BAD_TYPE = "bad_type"
    BAD_FLAGS = "bad_flags"
    BAD_LENGTH = "bad_length"
    RECORD_BOUNDS = "record_bounds"
    BAD_RECORD = "bad_record"
    INTERNAL = "internal"  # a parser bug caught at the edge; the fuzz test proves it unused


class DecodeError(ConvergentError):
    def __init__(self, reason: DecodeReason, detail: str = "") -> None:
        super().__init__(f"bad datagram: {reason.value}{': ' + detail if detail else ''}")
        self.reason = reason


class EncodeError(ConvergentError, ValueError):
    """An entry the wire cannot carry (value out of range, unknown proto or status bit)."""


# --- sequence numbers -------------------------------------------------------------------


def unwrap(seq32: int, ref: int) -> int:
    """The unbounded seq nearest to ``ref`` whose low 32 bits are ``seq32`` (RFC 1982)."""
    d = (seq32 - ref) % SEQ_MOD
    return ref + d - SEQ_MOD if d >= _HALF else ref + d


# --- records and messages ---------------------------------------------------------------


class Record:
    """One NEW/UPDATE/DESTROY record: its validated wire bytes, with the objects built only
    when asked for (a receiver stores 100k of these and seldom reads one back).

    NEW/UPDATE carry a whole entry; DESTROY only the key (orig tuple + zone). Two records
    are equal when their bytes are."""

    __slots__ = ("_decoded", "data", "op", "wkey")

    def __init__(self, op: EventType, wkey: WireKey, data: bytes,
                 decoded: tuple[Tuple, Entry | None] | None = None) -> None:  # fmt: skip
        self.op, self.wkey, self.data = op, wkey, data
        self._decoded = decoded

    @classmethod
    def upsert(cls, entry: Entry, op: EventType = EventType.UPDATE) -> Record:
        """Raises EncodeError for what the wire cannot carry."""
        data = encode_upsert(entry, op)
        return cls(op, key_of_record(data), data, (entry.tuple_orig, entry))

    @classmethod
    def destroy(cls, key: Key) -> Record:
        data = encode_destroy(key)
        return cls(EventType.DESTROY, key_of_record(data), data, (key[0], None))

    @property
    def entry(self) -> Entry | None:
        return self._objects()[1]

    @property
    def tuple_orig(self) -> Tuple:
        return self._objects()[0]

    @property
    def zone(self) -> int:
        return int.from_bytes(self.data[4:6], "big")

    @property
    def key(self) -> Key:
        return (self.tuple_orig, self.zone)

    def _objects(self) -> tuple[Tuple, Entry | None]:
        if self._decoded is None:
            self._decoded = _objects_of(self.data)
        return self._decoded

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and (self.op, self.data) == (other.op, other.data)

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"Record({self.op.name}, {self.entry or self.tuple_orig})"


@dataclass(frozen=True, slots=True)
class Message:
    """One datagram, decoded. Which fields matter depends on ``type`` (docs/wire-format.md).

    ``seq`` is the datagram's own seq for DATA and RESYNC_END, the sender's last sent seq
    for ALIVE, HELLO and RESYNC_BEGIN, and 0 for NACK and RESYNC_REQUEST (which name their
    target in the body). ``first``/``last``: the NACK range, RESYNC_REQUEST's ``first`` is the
    seq from which the requester needs a resync; RESYNC_BEGIN's void range.
    """

    type: MsgType
    tag: int
    boot: int
    seq: int = 0
    stream: int = 0
    records: tuple[Record, ...] = ()
    as_of: int | None = None  # DATA resend: rebuilt when the sender's next seq was this
    target_tag: int = 0  # NACK, RESYNC_REQUEST
    target_boot: int = 0
    first: int = 0
    last: int = 0
    begin: int = 0  # RESYNC_BEGIN/END: seq at which the resync snapshot was taken
    void: bool = False  # RESYNC_BEGIN: first..last are void


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What the protocol core asks a channel to send: ``dest`` None means every peer."""

    dest: Peer | None
    data: bytes
    type: MsgType


# --- record layout ----------------------------------------------------------------------

_RHDR = struct.Struct("!BBBBH")  # op family proto rflags zone
_TUPLE = {4: "4s4sHHBB", 6: "16s16sHHBB"}  # src dst sport dport icmp_type icmp_code
_DESTROY = {f: struct.Struct("!BBBBH" + t) for f, t in _TUPLE.items()}
_UPSERT = {
    (f, tcp): struct.Struct("!BBBBH" + t + t + "III" + ("BBBBB" if tcp else ""))
    for f, t in _TUPLE.items()
    for tcp in (False, True)
}
_UPSERT_V4, _UPSERT_V4_TCP = _UPSERT[4, False], _UPSERT[4, True]
DESTROY_SIZE = {f: s.size for f, s in _DESTROY.items()}
_TUPLE_SIZE = {f: struct.calcsize("!" + t) for f, t in _TUPLE.items()}
_MARK_AT = {f: _RHDR.size + 2 * _TUPLE_SIZE[f] + 4 for f in _TUPLE}  # after both tuples, status
_DESTROY_OP = bytes([EventType.DESTROY])
MIN_RECORD = DESTROY_SIZE[4]
_PROTOS = frozenset({1, 6, 17, 33, 47, 58, 132, 136})  # icmp tcp udp dccp gre icmpv6 sctp udplite
_ICMP: dict[int, int] = {Proto.ICMP: 4, Proto.ICMPV6: 6}  # proto -> the family it lives in
_STATUS_MASK = 0
for _bit in Status:
    _STATUS_MASK |= int(_bit)
STATUS_MASK = _STATUS_MASK  # every status bit the wire carries
PROTOS_BY_FAMILY = {
    f: frozenset(p for p in _PROTOS if _ICMP.get(p, f) == f) for f in _TUPLE
}  # what each family may carry: ICMP only in 4, ICMPv6 only in 6
_TCP_TAIL = struct.Struct("!BBBBB")  # state wscale_orig wscale_reply flags_orig flags_reply
MAX_WSCALE = 14  # RFC 7323
_OPS = frozenset(int(op) for op in EventType)
_TCP_STATES = tuple(TcpState)
_TCP_FLAGS = tuple(TcpFlag(i) for i in range(256))


def _check_tuple(t: Tuple, family: int, proto: int) -> None:
    if t.src.version != family or t.dst.version != family or t.proto != proto:
        raise EncodeError(f"tuple {t} mixes families or protos")
    icmp = _ICMP.get(proto)
    if icmp is not None and (icmp != family or t.dport):
        raise EncodeError(f"icmp tuple {t}: wrong family or dport set")
    if icmp is None and (t.icmp_type or t.icmp_code):
        raise EncodeError(f"non-icmp tuple {t} with icmp type/code")


def _check_entry(e: Entry) -> int:
    o = e.tuple_orig
    family = o.src.version
    if o.proto not in _PROTOS:
        raise EncodeError(f"proto {o.proto} not carried")
    _check_tuple(o, family, o.proto)
    _check_tuple(e.tuple_reply, family, o.proto)
    if int(e.status) & ~_STATUS_MASK:
        raise EncodeError(f"unknown status bits {int(e.status):#x}")
    tcp = e.tcp
    if tcp is not None and (
        o.proto != Proto.TCP or max(tcp.wscale_orig, tcp.wscale_reply) > MAX_WSCALE
    ):
        raise EncodeError("tcp info on a non-tcp entry or window scale > 14")
    return family


def _tuple_fields(t: Tuple) -> tuple[bytes, bytes, int, int, int, int]:
    return (t.src.packed, t.dst.packed, t.sport, t.dport, t.icmp_type, t.icmp_code)


def encode_upsert(entry: Entry, op: EventType = EventType.UPDATE) -> bytes:
    """One NEW/UPDATE record. Raises EncodeError for what the wire cannot carry."""
    o, r, tcp = entry.tuple_orig, entry.tuple_reply, entry.tcp
    p, v4 = o.proto, IPv4Address
    if (  # the common shape, checked inline (the general checks cost as much as the packing)
        (p == 6 or p == 17) and r.proto == p
        and type(o.src) is v4 and type(o.dst) is v4 and type(r.src) is v4 and type(r.dst) is v4
        and not (o.icmp_type or o.icmp_code or r.icmp_type or r.icmp_code)
        and not int(entry.status) & ~_STATUS_MASK
        and (tcp is None or (p == 6 and tcp.wscale_orig <= MAX_WSCALE
                             and tcp.wscale_reply <= MAX_WSCALE))
    ):  # fmt: skip
        try:
            if tcp is None:
                return _UPSERT_V4.pack(
                    op, 4, p, 0, entry.zone, o.src.packed, o.dst.packed, o.sport, o.dport, 0, 0,
                    r.src.packed, r.dst.packed, r.sport, r.dport, 0, 0,
                    entry.status, entry.mark, entry.timeout,
                )  # fmt: skip
            return _UPSERT_V4_TCP.pack(
                op, 4, p, RECORD_HAS_TCP, entry.zone, o.src.packed, o.dst.packed, o.sport,
                o.dport, 0, 0, r.src.packed, r.dst.packed, r.sport, r.dport, 0, 0,
                entry.status, entry.mark, entry.timeout,
                tcp.state, tcp.wscale_orig, tcp.wscale_reply, tcp.flags_orig, tcp.flags_reply,
            )  # fmt: skip
        except struct.error as exc:
            raise EncodeError(f"{entry}: {exc}") from None
    family = _check_entry(entry)
    o, tcp = entry.tuple_orig, entry.tcp
    head = (int(op), family, o.proto, RECORD_HAS_TCP if tcp else 0, entry.zone)
    tail: tuple[int, ...] = (int(entry.status), entry.mark, entry.timeout)
    if tcp is not None:
        tail += (tcp.state, tcp.wscale_orig, tcp.wscale_reply, tcp.flags_orig, tcp.flags_reply)
    try:
        return _UPSERT[family, tcp is not None].pack(
            *head, *_tuple_fields(o), *_tuple_fields(entry.tuple_reply), *tail
        )
    except struct.error as exc:
        raise EncodeError(f"{entry}: {exc}") from None


def encode_tcp(tcp: TcpInfo) -> bytes:
    """The five TCP bytes that end a TCP record (RECORD_HAS_TCP); b"" if out of range."""
    if max(tcp.wscale_orig, tcp.wscale_reply) > MAX_WSCALE:
        return b""
    try:
        return _TCP_TAIL.pack(tcp.state, tcp.wscale_orig, tcp.wscale_reply, tcp.flags_orig,
                              tcp.flags_reply)  # fmt: skip
    except struct.error:
        return b""


def encode_destroy(key: Key) -> bytes:
    t, zone = key
    family = t.src.version
    try:
        return _DESTROY[family].pack(EventType.DESTROY, family, t.proto, 0, zone, *_tuple_fields(t))
    except struct.error as exc:
        raise EncodeError(f"{t}: {exc}") from None


def key_of_record(record: bytes) -> WireKey:
    """The key part of an encoded NEW, UPDATE or DESTROY record."""
    return record[1:3] + record[4 : 6 + _TUPLE_SIZE[record[1]]]


def record_mark(record: bytes) -> int:
    """The ct mark of an encoded NEW or UPDATE record."""
    at = _MARK_AT[record[1]]
    return int.from_bytes(record[at : at + 4], "big")


def record_addresses(record: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """The packed orig src, orig dst, reply src, reply dst of a NEW or UPDATE record."""
    n, t = (4, 12) if record[1] == 4 else (16, 36)
    return (record[6 : 6 + n], record[6 + n : 6 + 2 * n],
            record[6 + t : 6 + t + n], record[6 + t + n : 6 + t + 2 * n])  # fmt: skip


def key_to_wire(key: Key) -> WireKey:
    return key_of_record(encode_destroy(key))


def destroy_record(wkey: WireKey) -> bytes:
    """The DESTROY record for a wire key (it is the key plus op and flags bytes)."""
    return _DESTROY_OP + wkey[:2] + b"\0" + wkey[2:]


# --- message bodies ---------------------------------------------------------------------

_U32 = struct.Struct("!I")
_TARGET = struct.Struct("!HQI")  # target_tag target_boot first
_NACK = struct.Struct("!HQII")  # target_tag target_boot first last
_VOID = struct.Struct("!III")  # begin void_first void_last


def _body(msg: Message) -> tuple[int, bytes]:
    """(flags, body) for a message; records are encoded here too."""
    t = msg.type
    if t == MsgType.DATA:
        records = b"".join(r.data for r in msg.records)
        if msg.as_of is None:
            return 0, records
        return Flag.RESEND, _U32.pack(msg.as_of % SEQ_MOD) + records
    if t == MsgType.NACK:
        first, last = msg.first % SEQ_MOD, msg.last % SEQ_MOD
        return 0, _NACK.pack(msg.target_tag, msg.target_boot, first, last)
    if t == MsgType.RESYNC_REQUEST:
        return 0, _TARGET.pack(msg.target_tag, msg.target_boot, msg.first % SEQ_MOD)
    if t == MsgType.RESYNC_BEGIN and msg.void:
        return Flag.VOID, _VOID.pack(msg.begin % SEQ_MOD, msg.first % SEQ_MOD, msg.last % SEQ_MOD)
    if t in (MsgType.RESYNC_BEGIN, MsgType.RESYNC_END):
        return 0, _U32.pack(msg.begin % SEQ_MOD)
    return 0, b""


# --- the codec --------------------------------------------------------------------------


class Codec:
    """Seals and opens datagrams with the cluster key.

    ``key_id`` names the key used to seal; ``previous`` keeps older keys accepted while a
    rotation rolls through the cluster. ``max_size`` bounds what is even looked at.
    """

    def __init__(
        self,
        key: bytes,
        *,
        key_id: int = 0,
        previous: Mapping[int, bytes] | None = None,
        max_size: int = MAX_DATAGRAM,
    ) -> None:
        if len(key) < 16:
            raise ValueError("cluster key must be at least 16 bytes (32 recommended)")
        self.key_id = key_id
        keys = {**(previous or {}), key_id: key}
        # keyed HMAC states, copied per datagram: half the cost of hmac.digest() here
        self._macs = {i: hmac.new(k, digestmod=hashlib.sha256) for i, k in keys.items()}
        self.max_size = max_size

    # sealing

    def seal(
        self,
        mtype: MsgType,
        tag: int,
        boot: int,
        seq: int,
        body: bytes,
        *,
        count: int = 0,
        stream: int = 0,
        flags: int = 0,
    ) -> bytes:
        """Header + body + MAC. ``seq`` may be unbounded; the wire keeps its low 32 bits."""
        head = HEADER.pack(
            MAGIC, VERSION, mtype, flags, self.key_id, tag, stream, count, seq % SEQ_MOD, boot
        )
        payload = head + body
        mac = self._macs[self.key_id].copy()
        mac.update(payload)
        return payload + mac.digest()[:MAC_SIZE]

    def encode(self, msg: Message) -> bytes:
        flags, body = _body(msg)
        return self.seal(
            msg.type, msg.tag, msg.boot, msg.seq, body,
            count=len(msg.records), stream=msg.stream, flags=flags,
        )  # fmt: skip

    # opening

    def decode(self, data: bytes) -> Message:
        """Validate and parse one datagram. Raises DecodeError, and nothing else."""
        try:
            return self._decode(data)
        except DecodeError:
            raise
        except Exception as exc:  # a parser bug must not take the receiver down
            raise DecodeError(DecodeReason.INTERNAL, repr(exc)) from None

    def _decode(self, data: bytes) -> Message:
        if type(data) is not bytes:  # bytearray, memoryview: keys must be hashable bytes
            data = bytes(data)
        n = len(data)
        if n > self.max_size:
            raise DecodeError(DecodeReason.OVERSIZED, str(n))
        if n < HEADER_SIZE + MAC_SIZE:
            raise DecodeError(DecodeReason.TRUNCATED, str(n))
        magic, version, mtype, flags, key_id, tag, stream, count, seq, boot = HEADER.unpack_from(
            data
        )
        if magic != MAGIC:
            raise DecodeError(DecodeReason.BAD_MAGIC)
        if version != VERSION:
            raise DecodeError(DecodeReason.BAD_VERSION, str(version))
        self._verify(data, key_id)
        if mtype not in _BODY_SIZE and mtype != MsgType.DATA:
            raise DecodeError(DecodeReason.BAD_TYPE, str(mtype))
        mtype = MsgType(mtype)
        if flags & ~_TYPE_FLAGS.get(mtype, 0):
            raise DecodeError(DecodeReason.BAD_FLAGS, f"{flags:#x}")
        end = n - MAC_SIZE
        base = Message(mtype, tag, boot, seq, stream)
        if mtype == MsgType.DATA:
            return self._data(base, data, end, count, flags)
        if count:
            raise DecodeError(DecodeReason.BAD_LENGTH, "records on a control message")
        return _control(base, data, end, flags)

    def _verify(self, data: bytes, key_id: int) -> None:
        base = self._macs.get(key_id)
        if base is None:
            raise DecodeError(DecodeReason.UNKNOWN_KEY, str(key_id))
        end = len(data) - MAC_SIZE
        mac = base.copy()
        mac.update(memoryview(data)[:end])
        if not hmac.compare_digest(mac.digest()[:MAC_SIZE], data[end:]):
            raise DecodeError(DecodeReason.BAD_HMAC)

    def _data(self, base: Message, data: bytes, end: int, count: int, flags: int) -> Message:
        off = HEADER_SIZE
        as_of = None
        if flags & Flag.RESEND:
            if end - off < 4:
                raise DecodeError(DecodeReason.BAD_LENGTH, "resend without as_of")
            (as_of,) = _U32.unpack_from(data, off)
            off += 4
        if count * MIN_RECORD > end - off:
            raise DecodeError(DecodeReason.BAD_LENGTH, f"{count} records in {end - off} bytes")
        records = self._records(data, off, end, count)
        return Message(MsgType.DATA, base.tag, base.boot, base.seq, base.stream, records, as_of)

    def _records(self, data: bytes, off: int, end: int, count: int) -> tuple[Record, ...]:
        out: list[Record] = []
        append, kinds = out.append, _KINDS
        for _ in range(count):
            kind = kinds.get(data[off : off + 4])  # op family proto rflags, all checked at once
            if kind is None:
                raise DecodeError(_short(data, off, end) or DecodeReason.BAD_RECORD)
            layout, op, icmp, tsize = kind
            nxt = off + layout.size
            if nxt > end:
                raise DecodeError(DecodeReason.RECORD_BOUNDS)
            _check_fields(layout.unpack_from(data, off), op, icmp)
            append(Record(op, data[off + 1 : off + 3] + data[off + 4 : off + 6 + tsize],
                          data[off:nxt]))  # fmt: skip
            off = nxt
        if off != end:
            raise DecodeError(DecodeReason.BAD_LENGTH, f"{end - off} trailing bytes")
        return tuple(out)


def _check_fields(f: tuple[Any, ...], op: EventType, icmp: bool) -> None:
    """What a record's layout alone does not rule out (addresses are any bytes)."""
    if op == EventType.DESTROY:
        if f[8] if icmp else (f[9] or f[10]):
            raise DecodeError(DecodeReason.BAD_RECORD, "icmp fields on the wrong proto")
        return
    if (f[8] or f[14]) if icmp else (f[9] or f[10] or f[15] or f[16]):
        raise DecodeError(DecodeReason.BAD_RECORD, "icmp fields on the wrong proto")
    if f[17] & ~_STATUS_MASK:
        raise DecodeError(DecodeReason.BAD_RECORD, f"status {f[17]:#x}")
    if len(f) > 20 and (f[20] >= len(_TCP_STATES) or f[21] > MAX_WSCALE or f[22] > MAX_WSCALE):
        raise DecodeError(DecodeReason.BAD_RECORD, f"tcp state={f[20]} wscale={f[21]}/{f[22]}")


# --- lazy objects of a validated record ---------------------------------------------------

_ADDRS: dict[bytes, IPAddress] = {}  # packed -> address, bounded
_STATUSES: dict[int, Status] = {}


def _addr(packed: bytes) -> IPAddress:
    addr = _ADDRS.get(packed)
    if addr is None:
        if len(_ADDRS) >= 65536:
            _ADDRS.clear()
        addr = _ADDRS[packed] = IPv4Address(packed) if len(packed) == 4 else IPv6Address(packed)
    return addr


def _objects_of(data: bytes) -> tuple[Tuple, Entry | None]:
    """The orig tuple and (NEW/UPDATE) the entry of one record the decoder validated."""
    layout, op, _icmp, _tsize = _KINDS[data[:4]]
    f = layout.unpack_from(data)
    proto, zone = f[2], f[4]
    orig = Tuple(_addr(f[5]), _addr(f[6]), proto, f[7], f[8], f[9], f[10])
    if op == EventType.DESTROY:
        return orig, None
    reply = Tuple(_addr(f[11]), _addr(f[12]), proto, f[13], f[14], f[15], f[16])
    status = _STATUSES.get(f[17])
    if status is None:
        status = _STATUSES[f[17]] = Status(f[17])
    tcp = None
    if len(f) > 20:
        tcp = _TCP_INFOS.get(f[20:25])
        if tcp is None:
            tcp = _tcp_cached(f)
    return orig, Entry(orig, reply, status, f[18], f[19], zone, tcp)


def _short(data: bytes, off: int, end: int) -> DecodeReason | None:
    return DecodeReason.RECORD_BOUNDS if off + _RHDR.size > end else None


_TCP_INFOS: dict[tuple[int, ...], TcpInfo] = {}  # a few hundred shapes in a real table


def _tcp_cached(f: tuple[int, ...]) -> TcpInfo:
    tcp = _tcp(f)  # validates: only valid shapes are ever cached
    if len(_TCP_INFOS) >= 4096:
        _TCP_INFOS.clear()
    _TCP_INFOS[f[20:25]] = tcp
    return tcp


def _tcp(f: tuple[int, ...]) -> TcpInfo:
    state, ws_o, ws_r, fl_o, fl_r = f[20:25]
    if state >= len(_TCP_STATES) or ws_o > MAX_WSCALE or ws_r > MAX_WSCALE:
        raise DecodeError(DecodeReason.BAD_RECORD, f"tcp state={state} wscale={ws_o}/{ws_r}")
    return TcpInfo(_TCP_STATES[state], ws_o, ws_r, _TCP_FLAGS[fl_o], _TCP_FLAGS[fl_r])


def _kinds() -> dict[bytes, tuple[struct.Struct, EventType, bool, int]]:
    """Every valid (op, family, proto, rflags) record head -> (layout, op, is icmp, tuple
    size)."""
    kinds = {}
    for op in EventType:
        for family in _TUPLE:
            for proto in _PROTOS:
                icmp = proto in _ICMP
                if icmp and _ICMP[proto] != family:
                    continue
                has_tcp = (
                    (False, True) if proto == Proto.TCP and op != EventType.DESTROY else (False,)
                )
                for tcp in has_tcp:
                    head = bytes([op, family, proto, RECORD_HAS_TCP if tcp else 0])
                    layout = _DESTROY[family] if op == EventType.DESTROY else _UPSERT[family, tcp]
                    kinds[head] = (layout, op, icmp, _TUPLE_SIZE[family])
    return kinds


_KINDS = _kinds()


_BODY_SIZE = {
    MsgType.NACK: _NACK.size,
    MsgType.ALIVE: 0,
    MsgType.HELLO: 0,
    MsgType.RESYNC_REQUEST: _TARGET.size,
    MsgType.RESYNC_BEGIN: _U32.size,
    MsgType.RESYNC_END: _U32.size,
}


def _control(base: Message, data: bytes, end: int, flags: int) -> Message:
    t = base.type
    size = _VOID.size if flags & Flag.VOID else _BODY_SIZE[t]
    if end - HEADER_SIZE != size:
        raise DecodeError(DecodeReason.BAD_LENGTH, f"{t.name} body {end - HEADER_SIZE} != {size}")
    common = (base.type, base.tag, base.boot, base.seq, base.stream)
    if t == MsgType.NACK:
        tt, tb, first, last = _NACK.unpack_from(data, HEADER_SIZE)
        return Message(*common, target_tag=tt, target_boot=tb, first=first, last=last)
    if t == MsgType.RESYNC_REQUEST:
        tt, tb, first = _TARGET.unpack_from(data, HEADER_SIZE)
        return Message(*common, target_tag=tt, target_boot=tb, first=first)
    if flags & Flag.VOID:
        begin, first, last = _VOID.unpack_from(data, HEADER_SIZE)
        return Message(*common, begin=begin, first=first, last=last, void=True)
    if size:
        (begin,) = _U32.unpack_from(data, HEADER_SIZE)
        return Message(*common, begin=begin)
    return base


def boot_id(wall_seconds: int, random_bits: int) -> int:
    """A u64 boot id: boot time in the high 32 bits (so a later boot usually compares
    greater, which lets receivers refuse replayed datagrams of an older boot), 32 random
    bits below. The agent calls ``boot_id(int(time.time()), secrets.randbits(32))``."""
    return ((wall_seconds % SEQ_MOD) << 32) | (random_bits % SEQ_MOD)


def decode_counted(codec: Codec, data: bytes, counters: MutableMapping[str, int]) -> Message | None:
    """``codec.decode``, or None with the reason counted: a bad datagram is dropped, never
    applied (what every ``on_datagram`` of the protocol core does first)."""
    try:
        return codec.decode(data)
    except DecodeError as exc:
        counters[exc.reason.value] += 1
        return None
