"""The sender's kernel-to-wire translators against the reference path: decode the message to
an ``Entry`` (``ctnetlink.decode_entry_ref``), encode that (``wire.encode_upsert``). Same
bytes, or ``None`` exactly where the reference raises EncodeError."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.model.conntrack import Entry, EventType, Proto, Status, TcpInfo, Tuple
from orchestrator.netfilter import ctnetlink as nl
from orchestrator.replicator import kernel
from orchestrator.replicator.wire import EncodeError, encode_upsert
from tests.recordings import recvs
from tests.unit.test_ctnetlink import KERNEL_DUMP, entries


def reference(buf: bytes, start: int, end: int) -> bytes | None:
    try:
        return encode_upsert(nl.decode_entry_ref(buf, start, end))
    except EncodeError:
        return None


def test_kernel_bytes_translate_like_the_reference() -> None:
    """ICMP in zone 3, UDP with SNAT, TCP ESTABLISHED with a mark: captured from a kernel."""
    messages = list(nl.iter_messages(KERNEL_DUMP))
    assert len(messages) == 3
    for _ in range(2):  # the second pass goes through the learned translators
        for _mtype, _flags, _seq, start, end in messages:
            got = kernel.translate(KERNEL_DUMP, start, end)
            assert got is not None and got == reference(KERNEL_DUMP, start, end)


@given(entries(), st.sampled_from([nl.NLM_F_CREATE | nl.NLM_F_EXCL, 0]))
@settings(max_examples=500)
def test_any_entry_translates_like_the_reference(entry: Entry, flags: int) -> None:
    msg = nl.encode_create(entry, 1, flags)
    assert kernel.translate(msg, 0, len(msg)) == reference(msg, 0, len(msg))


def test_shapes_that_share_a_length_are_not_confused() -> None:
    """A v4 entry in a zone and one without a mark can have the same length; each gets its
    own translator (the attribute headers are checked, not only the length)."""
    a = Entry(Tuple.of("10.0.0.1", "10.0.0.2", Proto.UDP, 1, 2),
              Tuple.of("10.0.0.2", "10.0.0.1", Proto.UDP, 2, 1), Status(8), 7, 30, 5)  # fmt: skip
    b = Entry(Tuple.of("10.0.0.3", "10.0.0.4", Proto.TCP, 3, 4),
              Tuple.of("10.0.0.4", "10.0.0.3", Proto.TCP, 4, 3), Status(8), 9, 30, 0,
              TcpInfo())  # fmt: skip
    for e in (a, b, a, b):
        msg = nl.encode_create(e, 1)
        assert kernel.translate(msg, 0, len(msg)) == encode_upsert(e)


def test_events_become_records_with_their_op() -> None:
    entry = nl.decode_entry_ref(KERNEL_DUMP, *list(nl.iter_messages(KERNEL_DUMP))[2][3:])
    new = nl.encode_create(entry, 1)  # REQUEST|CREATE|EXCL, as the kernel flags a NEW
    update = bytearray(new)
    struct.pack_into("=H", update, 6, 0)
    destroy = bytearray(new)
    struct.pack_into("=H", destroy, 4, nl.MSG_DELETE)
    done = struct.pack("=IHHIIi", 20, nl.NLMSG_DONE, 0, 0, 0, 0)  # not an event: skipped
    out: list[kernel.KernelRecord] = []
    for raw in (new, bytes(update), done, bytes(destroy)):
        kernel.decode_event_records(raw, len(raw), out)
    assert [op for op, _ in out] == [EventType.NEW, EventType.UPDATE, EventType.DESTROY]
    assert all(record == encode_upsert(entry) for _, record in out)


def test_what_the_wire_cannot_carry_is_marked_not_dropped_silently() -> None:
    igmp = Entry(Tuple.of("10.0.0.1", "10.0.0.2", 2), Tuple.of("10.0.0.2", "10.0.0.1", 2))
    unknown_status = Entry(Tuple.of("10.0.0.1", "10.0.0.2", Proto.UDP, 1, 2),
                           Tuple.of("10.0.0.2", "10.0.0.1", Proto.UDP, 2, 1),
                           Status(1 << 30))  # fmt: skip
    for e in (igmp, unknown_status):
        msg = nl.encode_create(e, 1)
        assert reference(msg, 0, len(msg)) is None  # the entry path refuses it too
        out: list[kernel.KernelRecord] = []
        kernel.decode_event_records(msg, len(msg), out)
        assert out == [kernel.UNENCODABLE]


def test_recorded_kernel_events_become_records_like_the_reference() -> None:
    """The events conntrack's changes made (tests/data/ctnetlink/events.hex)."""
    got: list[kernel.KernelRecord] = []
    want = []
    for buf in recvs("events.hex"):
        kernel.decode_event_records(buf, len(buf), got)
        for mtype, flags, _seq, start, end in nl.iter_messages(buf):
            op = (EventType.DESTROY if mtype == nl.MSG_DELETE else EventType.NEW
                  if flags & nl.NLM_F_CREATE else EventType.UPDATE)
            want.append((op, reference(buf, start, end)))
    assert [op for op, _ in got] == [EventType.NEW, EventType.NEW, EventType.UPDATE,
                                     EventType.DESTROY]
    assert got == want
