"""Wire format v1: layout (checked against docs/wire-format.md), round trips, rejections."""

from __future__ import annotations

import hmac
import re
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.model.conntrack import (
    Entry,
    EventType,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.replicator.wire import (
    DESTROY_SIZE,
    HEADER,
    HEADER_SIZE,
    MAC_SIZE,
    MAGIC,
    SEQ_MOD,
    Codec,
    DecodeError,
    DecodeReason,
    EncodeError,
    Message,
    MsgType,
    Record,
    boot_id,
    encode_destroy,
    encode_upsert,
    unwrap,
)

KEY = bytes(range(32))
CODEC = Codec(KEY)
DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"

# --- strategies ---------------------------------------------------------------------------

_PROTOS_V4 = [1, 6, 17, 33, 47, 132, 136]
_PROTOS_V6 = [58, 6, 17, 33, 47, 132, 136]


def _addrs(family: int) -> st.SearchStrategy:
    if family == 4:
        return st.integers(0, 2**32 - 1).map(IPv4Address)
    return st.integers(0, 2**128 - 1).map(IPv6Address)


@st.composite
def tuples(draw, family: int, proto: int) -> Tuple:
    src, dst = draw(_addrs(family)), draw(_addrs(family))
    if proto in (1, 58):
        ident, itype, icode = (draw(st.integers(0, m)) for m in (65535, 255, 255))
        return Tuple(src, dst, proto, ident, 0, itype, icode)
    return Tuple(src, dst, proto, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))


@st.composite
def entries(draw, family: int | None = None) -> Entry:
    family = family or draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from(_PROTOS_V4 if family == 4 else _PROTOS_V6))
    tcp = None
    if proto == 6 and draw(st.booleans()):
        tcp = TcpInfo(
            draw(st.sampled_from(list(TcpState))),
            draw(st.integers(0, 14)),
            draw(st.integers(0, 14)),
            TcpFlag(draw(st.integers(0, 255))),
            TcpFlag(draw(st.integers(0, 255))),
        )
    return Entry(
        draw(tuples(family, proto)),
        draw(tuples(family, proto)),
        Status(draw(st.integers(0, 0xFFFF))),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 65535)),
        tcp,
    )


@st.composite
def records(draw) -> Record:
    entry = draw(entries())
    op = draw(st.sampled_from(list(EventType)))
    return Record.destroy(entry.key) if op == EventType.DESTROY else Record.upsert(entry, op)


U16, U32, U64 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


@st.composite
def messages(draw) -> Message:
    t = draw(st.sampled_from(list(MsgType)))
    head = {"tag": draw(U16), "boot": draw(U64), "seq": draw(U32), "stream": draw(U16)}
    if t == MsgType.DATA:
        recs = tuple(draw(st.lists(records(), max_size=8)))
        return Message(t, **head, records=recs, as_of=draw(st.none() | U32))
    if t in (MsgType.NACK, MsgType.RESYNC_REQUEST):
        last = draw(U32) if t == MsgType.NACK else 0
        return Message(t, **head, target_tag=draw(U16), target_boot=draw(U64),
                       first=draw(U32), last=last)  # fmt: skip
    if t == MsgType.RESYNC_BEGIN and draw(st.booleans()):
        return Message(t, **head, begin=draw(U32), first=draw(U32), last=draw(U32), void=True)
    if t in (MsgType.RESYNC_BEGIN, MsgType.RESYNC_END):
        return Message(t, **head, begin=draw(U32))
    return Message(t, **head)


def tcp_entry(**kw) -> Entry:
    e = Entry(
        Tuple.of("10.5.5.2", "1.1.1.1", 6, 40000, 443),
        Tuple.of("1.1.1.1", "192.168.122.11", 6, 443, 40000),
        Status.CONFIRMED | Status.SRC_NAT | Status.SEEN_REPLY | Status.ASSURED,
        1,
        431999,
        0,
        TcpInfo(TcpState.ESTABLISHED, 7, 7, TcpFlag.BE_LIBERAL, TcpFlag.BE_LIBERAL | 2),
    )
    return Entry(**{**{f: getattr(e, f) for f in e.__dataclass_fields__}, **kw})


def icmp6_entry() -> Entry:
    a, b = ip_address("fd00::2"), ip_address("fd00::1")
    return Entry(Tuple(a, b, 58, 77, 0, 128, 0), Tuple(b, a, 58, 77, 0, 129, 0),
                 Status.CONFIRMED, 0, 30, 5)  # fmt: skip


def reseal(body: bytes, key: bytes = KEY) -> bytes:
    """Header+body with a valid MAC: lets a test reach the parser behind the HMAC."""
    return body + hmac.digest(key, body, "sha256")[:MAC_SIZE]


def header(mtype: int = 1, flags: int = 0, count: int = 0, version: int = 1, key_id: int = 0):
    return HEADER.pack(MAGIC, version, mtype, flags, key_id, 1, 0, count, 7, 42)


def reason(data: bytes, codec: Codec = CODEC) -> DecodeReason:
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    return info.value.reason


# --- layout: code and doc agree -------------------------------------------------------------


def test_sizes() -> None:
    assert (HEADER_SIZE, MAC_SIZE) == (24, 16)
    assert DESTROY_SIZE == {4: 20, 6: 44}
    v4, v6 = tcp_entry(), icmp6_entry()
    assert len(encode_upsert(v4)) == 51
    assert len(encode_upsert(tcp_entry(tcp=None))) == 46
    assert len(encode_upsert(v6)) == 94
    assert len(encode_destroy(v4.key)) == 20 and len(encode_destroy(v6.key)) == 44


def test_doc_header_table_matches_struct() -> None:
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([a-z ]+) \|", DOC.read_text(), re.M)
    fields = [(int(off), int(size)) for off, size, _ in rows]
    offsets, off = [], 0
    for ch in HEADER.format[1:]:
        size = struct.calcsize("!" + ch)
        offsets.append((off, size))
        off += size
    assert fields == offsets
    text = DOC.read_text()
    for needle in ("| 20 | 44 |", "| 46 | 94 |", "| 51 | 99 |", "| **14** | **38** |"):
        assert needle in text


def test_golden_datagram() -> None:
    """Freezes v1: if this changes, bump VERSION and update docs/wire-format.md."""
    msg = Message(MsgType.DATA, 1, 0x6500000012345678, 0xFFFFFFFE, 0,
                  (Record.upsert(tcp_entry(), EventType.NEW), Record.destroy(icmp6_entry().key)))  # fmt: skip
    golden = (
        "435601010000000100000002fffffffe65000000123456780104060100000a050502010101019c4001bb"
        "000001010101c0a87a0b01bb9c4000000000001e000000010006977f030707080a03063a000005fd0000"
        "00000000000000000000000002fd000000000000000000000000000001004d00008000ed400be15911d1"
        "51b4f35904638100e6"
    )
    assert CODEC.encode(msg).hex() == golden
    assert CODEC.decode(bytes.fromhex(golden)) == msg


# --- round trips --------------------------------------------------------------------------


@given(messages())
def test_roundtrip(msg: Message) -> None:
    assert CODEC.decode(CODEC.encode(msg)) == msg


@given(entries())
def test_entry_roundtrip_exact(entry: Entry) -> None:
    msg = Message(MsgType.DATA, 3, 4, 5, records=(Record.upsert(entry),))
    (rec,) = CODEC.decode(CODEC.encode(msg)).records
    assert rec.entry == entry and rec.key == entry.key
    assert (
        type(rec.entry.status) is Status and rec.entry.tuple_orig.family == entry.tuple_orig.family
    )


def test_each_type_roundtrips() -> None:
    for msg in (
        Message(MsgType.DATA, 1, 2, 3, records=(Record.upsert(tcp_entry()),), as_of=9),
        Message(MsgType.NACK, 1, 2, target_tag=3, target_boot=4, first=5, last=6),
        Message(MsgType.ALIVE, 1, 2, 99),
        Message(MsgType.HELLO, 1, 2, SEQ_MOD - 1),
        Message(MsgType.RESYNC_REQUEST, 1, 2, target_tag=3, target_boot=4, first=5),
        Message(MsgType.RESYNC_BEGIN, 1, 2, 10, begin=11),
        Message(MsgType.RESYNC_BEGIN, 1, 2, 10, begin=11, first=1, last=4, void=True),
        Message(MsgType.RESYNC_END, 1, 2, 12, begin=11),
    ):
        assert CODEC.decode(CODEC.encode(msg)) == msg


def test_unbounded_seqs_go_out_as_u32() -> None:
    msg = Message(
        MsgType.NACK, 1, 2, target_tag=3, target_boot=4, first=SEQ_MOD + 5, last=SEQ_MOD + 6
    )
    got = CODEC.decode(CODEC.encode(msg))
    assert (got.first, got.last) == (5, 6)
    assert CODEC.decode(CODEC.seal(MsgType.ALIVE, 1, 2, 3 * SEQ_MOD + 7, b"")).seq == 7


def test_key_rotation() -> None:
    old, new = Codec(b"o" * 32, key_id=1), Codec(b"n" * 32, key_id=2, previous={1: b"o" * 32})
    data = old.encode(Message(MsgType.ALIVE, 1, 2, 3))
    assert new.decode(data).seq == 3
    assert reason(new.encode(Message(MsgType.ALIVE, 1, 2, 3)), old) == DecodeReason.UNKNOWN_KEY
    with pytest.raises(ValueError):
        Codec(b"short")


# --- rejections ---------------------------------------------------------------------------


def test_rejects_header_problems() -> None:
    good = CODEC.encode(Message(MsgType.ALIVE, 1, 2, 3))
    assert reason(good[:39]) == DecodeReason.TRUNCATED
    assert reason(b"") == DecodeReason.TRUNCATED
    assert reason(good + b"\0" * 70000) == DecodeReason.OVERSIZED
    assert reason(good, Codec(KEY, max_size=39)) == DecodeReason.OVERSIZED
    assert reason(b"XX" + good[2:]) == DecodeReason.BAD_MAGIC
    assert reason(reseal(header(version=2))) == DecodeReason.BAD_VERSION
    assert reason(reseal(header(version=0))) == DecodeReason.BAD_VERSION
    assert reason(Codec(b"w" * 32).encode(Message(MsgType.ALIVE, 1, 2, 3))) == DecodeReason.BAD_HMAC
    assert reason(good[:-1] + bytes([good[-1] ^ 1])) == DecodeReason.BAD_HMAC
    assert reason(good[:20] + b"\xff" + good[21:]) == DecodeReason.BAD_HMAC  # boot id altered
    assert reason(reseal(header(key_id=9))) == DecodeReason.UNKNOWN_KEY
    assert reason(reseal(header(mtype=0))) == DecodeReason.BAD_TYPE
    assert reason(reseal(header(mtype=8))) == DecodeReason.BAD_TYPE
    assert reason(reseal(header(mtype=3, flags=1))) == DecodeReason.BAD_FLAGS
    assert reason(reseal(header(mtype=1, flags=2))) == DecodeReason.BAD_FLAGS
    assert reason(reseal(header(mtype=1, flags=0x80))) == DecodeReason.BAD_FLAGS


def test_rejects_body_length_problems() -> None:
    rec = encode_upsert(tcp_entry())
    assert reason(reseal(header(mtype=3) + b"\0")) == DecodeReason.BAD_LENGTH
    assert reason(reseal(header(mtype=2) + b"\0" * 17)) == DecodeReason.BAD_LENGTH
    assert reason(reseal(header(mtype=6, flags=2) + b"\0" * 4)) == DecodeReason.BAD_LENGTH
    assert reason(reseal(header(mtype=3, count=1))) == DecodeReason.BAD_LENGTH
    assert reason(reseal(header(count=3) + rec)) == DecodeReason.BAD_LENGTH  # 3 * 20 > 51
    assert reason(reseal(header(count=1) + rec + b"\0")) == DecodeReason.BAD_LENGTH  # trailing
    assert reason(reseal(header(count=0) + rec)) == DecodeReason.BAD_LENGTH
    assert reason(reseal(header(flags=1) + b"\0\0")) == DecodeReason.BAD_LENGTH  # no as_of


def test_rejects_records_out_of_bounds() -> None:
    rec = encode_upsert(tcp_entry())
    # count says 2, the body holds 1.9 records: the second runs past the end
    assert reason(reseal(header(count=2) + rec + rec[:46])) == DecodeReason.RECORD_BOUNDS
    assert reason(reseal(header(count=2) + rec)) == DecodeReason.RECORD_BOUNDS  # nothing left
    # a destroy, then a head claiming an IPv6 upsert (94 bytes) with 20 bytes left
    body = encode_destroy(tcp_entry().key) + bytes([2, 6, 6, 0]) + b"\0" * 16
    assert reason(reseal(header(count=2) + body)) == DecodeReason.RECORD_BOUNDS


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0, 0),  # op 0
        (0, 4),  # op 4
        (1, 5),  # family 5
        (2, 2),  # proto igmp
        (2, 1),  # icmp in an ipv4 record whose tuple has ports set
        (2, 58),  # icmpv6 in an ipv4 record
        (3, 2),  # unknown record flag
        (3, 0),  # tcp flag cleared: the layout no longer matches (trailing bytes)
        (46, 10),  # tcp state 10
        (47, 15),  # wscale 15
        (34, 0x01),  # status bit 24 (outside Status)
    ],
)
def test_rejects_bad_records(offset: int, value: int) -> None:
    rec = bytearray(encode_upsert(tcp_entry()))
    rec[offset] = value
    got = reason(reseal(header(count=1) + bytes(rec)))
    assert got in (DecodeReason.BAD_RECORD, DecodeReason.BAD_LENGTH, DecodeReason.RECORD_BOUNDS)
    if offset != 3 or value != 0:
        assert got == DecodeReason.BAD_RECORD


def test_rejects_icmp_inconsistencies() -> None:
    rec = bytearray(encode_upsert(icmp6_entry()))
    rec[6 + 34] = 1  # dport low byte of the orig tuple
    assert reason(reseal(header(count=1) + bytes(rec))) == DecodeReason.BAD_RECORD
    rec = bytearray(encode_upsert(tcp_entry(tcp=None)))
    rec[6 + 12] = 8  # icmp type on a tcp tuple
    assert reason(reseal(header(count=1) + bytes(rec))) == DecodeReason.BAD_RECORD
    destroy = bytearray(encode_destroy(tcp_entry().key))
    destroy[3] = 1  # destroy with tcp info
    assert reason(reseal(header(count=1) + bytes(destroy))) == DecodeReason.BAD_RECORD


def test_encoder_refuses_what_the_wire_cannot_carry() -> None:
    bad = [
        tcp_entry(mark=2**32),
        tcp_entry(zone=70000),
        tcp_entry(status=Status(1 << 20)),
        tcp_entry(tcp=TcpInfo(wscale_orig=15)),
        tcp_entry(tuple_reply=Tuple.of("fd00::1", "fd00::2", 6, 1, 2)),
        tcp_entry(tuple_reply=Tuple.of("1.1.1.1", "2.2.2.2", 17, 1, 2)),
        Entry(Tuple.of("1.1.1.1", "2.2.2.2", 2), Tuple.of("2.2.2.2", "1.1.1.1", 2)),
        Entry(Tuple.of("1.1.1.1", "2.2.2.2", 1, 5, 9), Tuple.of("2.2.2.2", "1.1.1.1", 1, 5)),
        Entry(Tuple.of("1.1.1.1", "2.2.2.2", 58, 5), Tuple.of("2.2.2.2", "1.1.1.1", 58, 5)),
        Entry(
            Tuple(IPv4Address(1), IPv4Address(2), 17, 1, 2, 8), Tuple.of("0.0.0.2", "0.0.0.1", 17)
        ),
        Entry(Tuple.of("1.1.1.1", "2.2.2.2", 17, 70000), Tuple.of("2.2.2.2", "1.1.1.1", 17)),
        Entry(
            Tuple.of("1.1.1.1", "2.2.2.2", 17), Tuple.of("2.2.2.2", "1.1.1.1", 17), tcp=TcpInfo()
        ),
    ]
    for entry in bad:
        with pytest.raises(EncodeError):
            encode_upsert(entry)
    with pytest.raises(EncodeError):
        encode_destroy((Tuple.of("1.1.1.1", "2.2.2.2", 6), 1 << 16))


# --- sequence arithmetic ------------------------------------------------------------------


@given(U32, st.integers(0, 2**40), st.integers(-(2**31) + 1, 2**31 - 1))
def test_unwrap_finds_the_nearest(seq32: int, ref: int, delta: int) -> None:
    assert unwrap((ref + delta) % SEQ_MOD, ref) == ref + delta
    assert unwrap(seq32, ref) % SEQ_MOD == seq32


def test_boot_id_orders_by_time() -> None:
    assert boot_id(1000, 2**32 - 1) < boot_id(1001, 0)
    assert boot_id(5, 7) == (5 << 32) | 7 < 2**64
