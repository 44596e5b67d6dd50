"""Fuzz the decoder: it raises nothing but DecodeError, never INTERNAL, and whatever it
accepts is canonical (re-encodes to the very same bytes), so no byte goes unchecked.

The MAC is recomputed on mutated datagrams, otherwise only the HMAC check would be tested.
A plain seeded loop does the volume (fast, reproducible); hypothesis adds structure.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.model.conntrack import EventType
from orchestrator.replicator.receiver import Receiver
from orchestrator.replicator.sender import Sender
from orchestrator.replicator.wire import (
    HEADER,
    HEADER_SIZE,
    MAC_SIZE,
    MAGIC,
    Codec,
    DecodeError,
    DecodeReason,
    Message,
    MsgType,
    Record,
)

from .test_wire import KEY, icmp6_entry, messages, tcp_entry

CODEC = Codec(KEY)
SEED = 20240505


_MAC = hmac.new(KEY, digestmod=hashlib.sha256)


def reseal(data: bytes) -> bytes:
    """Replace the last 16 bytes with a valid MAC over the rest."""
    body = data[:-MAC_SIZE] if len(data) >= MAC_SIZE else data
    mac = _MAC.copy()
    mac.update(body)
    return body + mac.digest()[:MAC_SIZE]


def corpus() -> list[bytes]:
    e4, e6 = tcp_entry(), icmp6_entry()
    udp = tcp_entry(tcp=None)
    recs = (
        Record.upsert(e4, EventType.NEW),
        Record.upsert(e6),
        Record.destroy(e4.key),
        Record.destroy(e6.key),
        Record.upsert(udp),
    )
    msgs = [
        Message(MsgType.DATA, 1, 2, 3, records=recs),
        Message(MsgType.DATA, 1, 2, 4, records=recs[:2], as_of=9),
        Message(MsgType.DATA, 1, 2, 5),
        Message(MsgType.NACK, 2, 3, target_tag=1, target_boot=2, first=3, last=9),
        Message(MsgType.ALIVE, 1, 2, 8),
        Message(MsgType.HELLO, 1, 2, 8),
        Message(MsgType.RESYNC_REQUEST, 2, 3, target_tag=1, target_boot=2, first=4),
        Message(MsgType.RESYNC_BEGIN, 1, 2, 8, begin=9),
        Message(MsgType.RESYNC_BEGIN, 1, 2, 8, begin=9, first=1, last=3, void=True),
        Message(MsgType.RESYNC_END, 1, 2, 10, begin=9),
    ]
    return [CODEC.encode(m) for m in msgs]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:  # flip a bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to an edge value
            buf[pos] = rng.choice((0, 1, 2, 3, 4, 6, 0x7F, 0x80, 0xFF))
        elif op == 2:  # cut
            del buf[pos : pos + rng.randrange(1, 64)]
        elif op == 3:  # insert junk
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 32))
        elif op == 4 and len(buf) > HEADER_SIZE:  # fiddle with the record count
            buf[10:12] = rng.randrange(0, 12).to_bytes(2, "big")
        elif op == 5:  # splice another datagram's tail
            other = rng.choice(pool)
            buf[pos:] = other[rng.randrange(len(other)) :]
        elif op == 6 and len(buf) > 4:  # a valid type/flags pair on the wrong body
            buf[3], buf[4] = rng.randrange(0, 9), rng.choice((0, 1, 2, 3))
    return bytes(buf)


def check(data: bytes, seen: Counter[str]) -> None:
    try:
        msg = CODEC.decode(data)
    except DecodeError as exc:
        assert exc.reason != DecodeReason.INTERNAL, exc
        seen[exc.reason.value] += 1
        return
    seen["accepted"] += 1
    assert CODEC.encode(msg) == data, "accepted a non-canonical datagram"


def test_decoder_survives_100k_mutations() -> None:
    rng = random.Random(SEED)
    pool = corpus()
    seen: Counter[str] = Counter()
    for i in range(100_000):
        data = mutate(rng, rng.choice(pool), pool)
        check(reseal(data) if i % 10 else data, seen)
    reasons = set(seen) - {"accepted"}
    assert seen["accepted"] > 1000, seen  # the parser, not just the MAC, was exercised
    assert seen["bad_hmac"] > 1000, seen
    must = {"truncated", "bad_type", "bad_flags", "bad_length", "record_bounds", "bad_record"}
    assert must <= reasons, seen


def test_decoder_survives_random_bytes() -> None:
    rng = random.Random(SEED + 1)
    seen: Counter[str] = Counter()
    for _ in range(20_000):
        data = rng.randbytes(rng.choice((0, 1, 23, 39, 40, 41, 64, 200, 1400, rng.randrange(2000))))
        check(data, seen)
        # the same junk behind a plausible header and a valid MAC
        head = HEADER.pack(MAGIC, 1, rng.randrange(9), rng.randrange(4), 0, 1, 0,
                           rng.randrange(8), 1, 2)  # fmt: skip
        check(reseal(head + data[:300] + b"\0" * MAC_SIZE), seen)
    assert seen["bad_magic"] > 10_000 and seen["accepted"] > 0, seen


def test_protocol_core_survives_what_the_decoder_accepts() -> None:
    """Valid but strange datagrams (wild seqs, ranges, boots) must not crash the cores."""
    rng = random.Random(SEED + 2)
    pool = corpus()
    receiver = Receiver(CODEC, 7, 70)
    sender = Sender(CODEC, 1, 2)
    sender.update(tcp_entry(), 0.0)
    sender.on_tick(1.0)
    for i in range(20_000):
        data = reseal(mutate(rng, rng.choice(pool), pool))
        now = i * 0.01
        receiver.on_datagram(data, "p", now)
        sender.on_datagram(data, "p", now)
        if i % 50 == 0:
            receiver.on_tick(now)
            sender.on_tick(now)
    assert sum(receiver.counters.values()) > 0 and sum(sender.counters.values()) > 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data, Counter())
    check(reseal(data + b"\0" * MAC_SIZE), Counter())


@settings(max_examples=300, deadline=None)
@given(messages(), st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_structured_corruption(msg: Message, where: int, junk: bytes) -> None:
    data = bytearray(CODEC.encode(msg)[:-MAC_SIZE])
    pos = where % len(data)
    data[pos : pos + len(junk)] = junk
    check(reseal(bytes(data) + b"\0" * MAC_SIZE), Counter())
