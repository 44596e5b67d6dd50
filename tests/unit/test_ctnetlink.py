"""The ctnetlink codec without root: kernel bytes captured once, round trips, and the fast
paths (fused encoder, learned-layout decoder) checked against the readable reference ones."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.model.conntrack import (
    Entry,
    Event,
    EventType,
    Proto,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.netfilter import ctnetlink as nl
from tests.recordings import recvs

# Recorded from the kernel (tests/data/ctnetlink/README.md): a dump of three entries.
KERNEL_DUMP, KERNEL_DONE = recvs("dump.hex")
KERNEL_SEQ = nl.wire_seq(1)  # the capture was sent with a host-order seq of 1


def kernel_entries() -> list[Entry]:
    out: list[Entry] = []
    assert nl.decode_dump(KERNEL_DUMP, len(KERNEL_DUMP), KERNEL_SEQ, out) == nl.DUMP_MORE
    return out


def test_kernel_dump_icmp_entry_in_a_zone() -> None:
    icmp = kernel_entries()[0]
    o = icmp.tuple_orig
    assert (o.src, o.dst, o.proto) == (IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), 1)
    assert (o.sport, o.icmp_type, o.icmp_code) == (77, 8, 0)
    assert icmp.tuple_reply == o.reversed()
    assert (icmp.zone, icmp.timeout, icmp.mark, icmp.tcp) == (3, 29, 0, None)
    assert icmp.status == Status.CONFIRMED


def test_kernel_dump_snat_entry_keeps_its_reply_tuple() -> None:
    udp = kernel_entries()[1]
    assert udp.tuple_orig == Tuple.of("10.0.0.1", "10.0.0.9", Proto.UDP, 53, 5353)
    assert udp.tuple_reply == Tuple.of("10.0.0.9", "1.2.3.4", Proto.UDP, 5353, 53)
    assert udp.tuple_reply != udp.tuple_orig.reversed()
    assert udp.is_src_nat and udp.status & Status.SRC_NAT_DONE


def test_kernel_dump_tcp_entry() -> None:
    tcp = kernel_entries()[2]
    assert tcp.tuple_orig == Tuple.of("10.0.0.1", "10.0.0.2", Proto.TCP, 1000, 80)
    assert tcp.tuple_reply == tcp.tuple_orig.reversed()
    assert tcp.status == Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED
    assert (tcp.mark, tcp.timeout, tcp.zone, tcp.id) == (5, 99, 0, 0xC41223BA)
    assert tcp.tcp == TcpInfo(TcpState.ESTABLISHED, 0, 0, TcpFlag(0x0A), TcpFlag(0x0A))


def test_kernel_dump_done_and_foreign_messages() -> None:
    out: list[Entry] = []
    assert nl.decode_dump(KERNEL_DONE, len(KERNEL_DONE), KERNEL_SEQ, out) == 0
    # another request's messages are skipped, not decoded
    assert nl.decode_dump(KERNEL_DUMP, len(KERNEL_DUMP), KERNEL_SEQ + 1, out) == nl.DUMP_MORE
    assert out == []


def test_fast_decoder_agrees_with_reference_on_kernel_bytes() -> None:
    for _mtype, _flags, _seq, start, end in nl.iter_messages(KERNEL_DUMP):
        fast = nl.decode_entry(KERNEL_DUMP, start, end)
        ref = nl.decode_entry_ref(KERNEL_DUMP, start, end)
        assert fast == ref and fast.id == ref.id
        assert nl.decode_entry(KERNEL_DUMP, start, end) == ref  # second time: learned layout


def test_dump_buffer_with_runs_of_shapes() -> None:
    """Runs of same-shaped messages, shapes changing in between, then DONE: all decoded in
    order (as a dump recv delivers them)."""
    tcp = [Entry(Tuple.of("10.0.0.1", "10.0.0.2", Proto.TCP, p, 80),
                 Tuple.of("10.0.0.2", "10.0.0.1", Proto.TCP, 80, p),
                 Status(14), p, 60, 0, TcpInfo()) for p in range(1, 6)]  # fmt: skip
    udp = [Entry(Tuple.of("10.0.0.1", "10.0.0.3", Proto.UDP, p, 53),
                 Tuple.of("10.0.0.3", "10.0.0.1", Proto.UDP, 53, p)) for p in range(1, 4)]  # fmt: skip
    entries = [*tcp[:3], *udp, *tcp[3:]]
    done = struct.pack("=IHHIIi", 20, nl.NLMSG_DONE, 2, nl.wire_seq(9), 0, 0)
    buf = b"".join(nl.encode_create(e, 9) for e in entries) + done
    out: list[Entry] = []
    assert nl.decode_dump(buf, len(buf), 9, out) == 0
    assert out == entries


def test_error_message() -> None:
    msg = struct.pack("=IHHIIi", 36, nl.NLMSG_ERROR, 0, nl.wire_seq(7), 0, -17) + bytes(16)
    [(mtype, _flags, seq, start, _end)] = nl.iter_messages(msg)
    assert (mtype, seq, nl.error_code(msg, start)) == (nl.NLMSG_ERROR, 7, 17)
    out: list[Entry] = []
    assert nl.decode_dump(msg, len(msg), 7, out) == 17


def test_wire_seq_is_an_involution() -> None:
    for seq in (0, 1, 0x12345678, 2**31 - 1):
        assert nl.wire_seq(nl.wire_seq(seq)) == seq
    assert nl.encode_get_stats(0x01020304)[8:12] == bytes((1, 2, 3, 4))


# --- round trips -----------------------------------------------------------------------------

v4 = st.integers(0, 2**32 - 1).map(IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(IPv6Address)
u8, u16, u32 = st.integers(0, 255), st.integers(0, 65535), st.integers(0, 2**32 - 1)


@st.composite
def tuples(draw: st.DrawFn, version: int, proto: int) -> Tuple:
    addr = v4 if version == 4 else v6
    if proto in (Proto.ICMP, Proto.ICMPV6):
        return Tuple(draw(addr), draw(addr), proto, draw(u16), 0, draw(u8), draw(u8))
    return Tuple(draw(addr), draw(addr), proto, draw(u16), draw(u16))


@st.composite
def entries(draw: st.DrawFn, version: int | None = None, protos: tuple[int, ...] = ()) -> Entry:
    version = version or draw(st.sampled_from([4, 6]))
    icmp = Proto.ICMP if version == 4 else Proto.ICMPV6
    proto = draw(st.sampled_from(protos or (Proto.TCP, Proto.UDP, icmp)))
    orig = draw(tuples(version, proto))
    reply = draw(st.one_of(st.just(orig.reversed()), tuples(version, proto)))  # NAT: any
    tcp = None
    if proto == Proto.TCP:
        tcp = TcpInfo(
            draw(st.sampled_from(list(TcpState))), draw(st.integers(0, 14)),
            draw(st.integers(0, 14)), TcpFlag(draw(u8)), TcpFlag(draw(u8)),
        )  # fmt: skip
    return Entry(
        orig, reply, Status(draw(st.integers(0, 2**16 - 1))), draw(u32), draw(u32),
        draw(u16), tcp,
    )  # fmt: skip


@given(entries(), st.integers(1, 2**31 - 1))
@settings(max_examples=300)
def test_entry_round_trip(entry: Entry, seq: int) -> None:
    msg = nl.encode_create(entry, seq)
    [(mtype, flags, got_seq, start, end)] = nl.iter_messages(msg)
    assert (mtype, got_seq) == (nl.MSG_NEW, seq)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_CREATE | nl.NLM_F_EXCL
    assert nl.decode_entry(msg, start, end) == entry
    assert nl.decode_entry_ref(msg, start, end) == entry


@given(entries(version=4, protos=(Proto.TCP, Proto.UDP)), st.integers(0, 2**31 - 1))
@settings(max_examples=300)
def test_fused_encoder_matches_reference(entry: Entry, seq: int) -> None:
    for flags in (nl.NLM_F_CREATE | nl.NLM_F_EXCL, 0):
        assert nl.encode_create(entry, seq, flags) == nl.encode_create_ref(entry, seq, flags)


def test_same_length_different_shape_is_not_misread() -> None:
    """An IPv4 ICMP tuple and an IPv4 UDP tuple carrying a zone have the same length: the
    layout learned from one must not decode the other."""
    icmp = Entry(
        Tuple(ip_address("10.0.0.1"), ip_address("10.0.0.2"), Proto.ICMP, 9, 0, 8, 0),
        Tuple(ip_address("10.0.0.2"), ip_address("10.0.0.1"), Proto.ICMP, 9, 0, 0, 0),
    )
    udp = Entry(
        Tuple.of("10.0.0.3", "10.0.0.4", Proto.UDP, 1, 2),
        Tuple.of("10.0.0.4", "10.0.0.3", Proto.UDP, 2, 1),
    )
    zone_attr = nl.nla(3, struct.pack(">H", 7))  # CTA_TUPLE_ZONE inside each tuple
    body_udp = b"".join(
        nl.nest(atype, nl.encode_tuple(atype, t)[4:] + zone_attr)
        for atype, t in ((nl.CTA_TUPLE_ORIG, udp.tuple_orig), (nl.CTA_TUPLE_REPLY, udp.tuple_reply))
    ) + nl.nla(nl.CTA_STATUS, struct.pack(">I", 8))
    body_icmp = (
        nl.encode_tuple(nl.CTA_TUPLE_ORIG, icmp.tuple_orig)
        + nl.encode_tuple(nl.CTA_TUPLE_REPLY, icmp.tuple_reply)
        + nl.nla(nl.CTA_STATUS, struct.pack(">I", 8))
    )
    m_udp = nl.message(nl.MSG_NEW, 0, 1, 2, body_udp)
    m_icmp = nl.message(nl.MSG_NEW, 0, 1, 2, body_icmp)
    assert len(m_udp) == len(m_icmp)
    for first, second in ((m_udp, m_icmp), (m_icmp, m_udp)):
        nl.decode._DECODERS.clear()  # learn both shapes afresh
        for msg in (first, second, first):
            assert nl.decode_entry(msg, 0, len(msg)) == nl.decode_entry_ref(msg, 0, len(msg))
    assert nl.decode_entry(m_icmp, 0, len(m_icmp)).tuple_orig == icmp.tuple_orig
    assert nl.decode_entry(m_udp, 0, len(m_udp)).tuple_orig == udp.tuple_orig


def test_malformed_message_raises_value_error() -> None:
    msg = nl.encode_create(kernel_entries()[2], 1)
    with pytest.raises(ValueError):
        list(nl.iter_messages(msg[:-8]))  # nlmsg_len beyond the buffer
    truncated = msg[:20] + struct.pack("=HH", 200, nl.CTA_TUPLE_ORIG) + msg[24:]
    with pytest.raises(ValueError):
        nl.decode_entry(truncated, 0, len(truncated))


# --- requests --------------------------------------------------------------------------------


def attrs(msg: bytes) -> dict[int, bytes]:
    return {t: msg[a:b] for t, a, b in nl.walk(msg, nl.HDR_LEN, len(msg))}


def test_dump_request_with_filters() -> None:
    f = nl.DumpFilter(
        family=2, mark=0x10, mark_mask=0xF0, status=8, zone=4,
        orig_src=ip_address("10.5.5.2"), reply_dst=ip_address("10.5.5.2"),
    )  # fmt: skip
    msg = nl.encode_dump(9, f)
    mlen, mtype, flags, _seq, _pid = nl.NLMSG_HDR.unpack_from(msg)
    assert (mlen, mtype, flags, msg[16]) == (len(msg), nl.MSG_GET, 0x301, 2)
    a = attrs(msg)
    assert struct.unpack(">I", a[nl.CTA_MARK])[0] == 0x10
    assert struct.unpack(">I", a[nl.CTA_MARK_MASK])[0] == 0xF0
    assert struct.unpack(">I", a[nl.CTA_STATUS_MASK])[0] == 8  # mask defaults to the value
    assert struct.unpack(">H", a[nl.CTA_ZONE][:2])[0] == 4
    raw = a[nl.CTA_FILTER]
    flt = {t: struct.unpack("=I", raw[x:y])[0] for t, x, y in nl.walk(raw, 0, len(raw))}
    assert flt == {
        nl.CTA_FILTER_ORIG_FLAGS: nl.CTA_FILTER_F_IP_SRC,
        nl.CTA_FILTER_REPLY_FLAGS: nl.CTA_FILTER_F_IP_DST,
    }
    assert bytes([10, 5, 5, 2]) in a[nl.CTA_TUPLE_ORIG]
    assert bytes([10, 5, 5, 2]) in a[nl.CTA_TUPLE_REPLY]


def test_plain_dump_request_has_no_attributes() -> None:
    assert len(nl.encode_dump(1)) == nl.HDR_LEN


def test_change_delete_get_carry_key_and_zone() -> None:
    t = Tuple.of("10.0.0.1", "10.0.0.2", Proto.TCP, 1, 2)
    for msg, mtype in (
        (nl.encode_change((t, 5), 1, nl.encode_mark(3)), nl.MSG_NEW),
        (nl.encode_delete((t, 5), 1), nl.MSG_DELETE),
        (nl.encode_get((t, 5), 1), nl.MSG_GET),
    ):
        _len, got_type, flags, _seq, _pid = nl.NLMSG_HDR.unpack_from(msg)
        assert (got_type, flags) == (mtype, nl.NLM_F_REQUEST)  # no CREATE, no ACK
        a = attrs(msg)
        assert a[nl.CTA_TUPLE_ORIG] == nl.encode_tuple(nl.CTA_TUPLE_ORIG, t)[4:]
        assert a[nl.CTA_ZONE][:2] == b"\0\x05"


def test_tcp_flags_change_is_flags_and_mask() -> None:
    raw = nl.encode_tcp_flags((8, 8), (8, 8))
    [(_t, a, b)] = nl.walk(raw, 0, len(raw))
    [(_t2, a2, b2)] = nl.walk(raw, a, b)
    leaves = {t: raw[x:y] for t, x, y in nl.walk(raw, a2, b2)}
    assert leaves == {
        nl.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: b"\x08\x08",
        nl.CTA_PROTOINFO_TCP_FLAGS_REPLY: b"\x08\x08",
    }


def test_events_by_type_and_flags() -> None:
    entry = kernel_entries()[2]
    msg = nl.encode_create(entry, 1)  # flags REQUEST|CREATE|EXCL: how the kernel flags NEW
    update = bytearray(msg)
    struct.pack_into("=H", update, 6, 0)  # no CREATE|EXCL: an UPDATE
    destroy = bytearray(msg)
    struct.pack_into("=H", destroy, 4, nl.MSG_DELETE)
    done = struct.pack("=IHHIIi", 20, nl.NLMSG_DONE, 0, 0, 0, 0)  # not an event: skipped
    events: list[Event] = []
    for raw in (msg, bytes(update), done, bytes(destroy)):
        nl.decode_events(raw, len(raw), events)
    assert [ev.type for ev in events] == [EventType.NEW, EventType.UPDATE, EventType.DESTROY]
    assert all(ev.entry == entry for ev in events)
    assert events[0] == Event(EventType.NEW, entry)


# --- events, as the kernel sent them ---------------------------------------------------------


def test_recorded_kernel_events_decode_with_their_kind() -> None:
    """conntrack -I (TCP, then UDP in zone 3), -U (TCP mark), -D (TCP): tests/data."""
    got: list[Event] = []
    for buf in recvs("events.hex"):
        nl.decode_events(buf, len(buf), got)
    assert [ev.type for ev in got] == [EventType.NEW, EventType.NEW, EventType.UPDATE,
                                       EventType.DESTROY]
    tcp_new, udp_new, update, destroy = (ev.entry for ev in got)
    assert tcp_new.tuple_orig == Tuple.of("10.5.5.201", "198.51.100.7", Proto.TCP, 40000, 443)
    assert tcp_new.tcp is not None and tcp_new.tcp.state == TcpState.ESTABLISHED
    assert tcp_new.status & (Status.SEEN_REPLY | Status.ASSURED) and tcp_new.mark == 1
    assert (udp_new.zone, udp_new.tuple_orig.dport, udp_new.timeout) == (3, 123, 120)
    assert update.key == tcp_new.key and update.mark == 2
    assert destroy.key == tcp_new.key and destroy.status & Status.DYING
