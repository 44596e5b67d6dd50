"""The receiving half of the replication protocol: per-sender seq tracking, NACK, replay
window, boot ids, resync requests, and one external cache per sender stream.

Pure state machine (conntrackd's ``ftfw_recv`` and ``mcast_track_seq``, per sender): no
sockets, no clock; ``on_datagram(bytes, peer, now)`` and ``on_tick(now)`` return the
:class:`~.wire.Outgoing` NACKs and RESYNC_REQUESTs to send.

Per sender stream (tag, stream) it keeps the boot id, the next seq to apply
(``expected``), the highest seq known to exist, and a reorder buffer of up to ``window``
datagrams. Datagrams are applied strictly in seq order; anything below ``expected`` or
already buffered is a duplicate or a replay and is dropped. A gap is NACKed at once and
again every ``nack_retry`` seconds; ALIVE/HELLO/RESYNC_BEGIN carry the sender's last seq so
a lost tail shows too. A seq further ahead than the sender could have sent since it was
last heard (``max_rate``) is refused as ``implausible``, so one bad datagram cannot move the
expectation past everything genuine; an older boot id than the newest seen of a sender is
always a replay (``stale_boot``), also across this receiver's restart (``boots``).
What the sender declares void (older than its backlog), what lies
beyond the window, and what ``nack_retries`` could not recover is skipped, and a resync is
requested from the first seq after the skip. A RESYNC_END sweeps the cache only if this
receiver applied everything since the resync's snapshot seq.

Everything dropped is counted in ``counters`` (``conntrackd -s`` style), never logged.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

from orchestrator.model.conntrack import Entry, Event

from .cache import ExternalCache
from .wire import (
    SEQ_MOD,
    SEQUENCED,
    Codec,
    Key,
    Message,
    MsgType,
    Outgoing,
    Peer,
    decode_counted,
    unwrap,
)

StreamListener = Callable[[int, int, Event], None]  # (sender tag, stream, what changed)
_CARRY_LAST = frozenset({MsgType.ALIVE, MsgType.HELLO, MsgType.RESYNC_BEGIN})  # seq = last sent
_EMPTY: Mapping[Key, Entry] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    window: int = 4096  # datagrams buffered ahead of a gap; further ahead means resync
    nack_retry: float = 0.05  # seconds between NACKs for a gap that persists
    nack_retries: int = 20  # then skip the gap and ask for a resync
    max_nacks: int = 8  # NACK datagrams per stream per tick
    resync_retry: float = 1.0  # ask again if no RESYNC_END covering us came by then
    dead_after: float = 3.0  # a silent sender is not pestered with NACKs or requests
    # datagrams/s no sender reaches (~140 MB/s of 1400-byte datagrams): a seq further ahead
    # than this allows since the sender was last heard is a forgery or a bug, not a gap
    max_rate: float = 100_000.0


@dataclass(slots=True)
class _Stream:
    tag: int
    stream: int
    boot: int
    peer: Peer
    cache: ExternalCache
    last_heard: float
    expected: int = 0  # next seq to apply (unbounded int)
    highest: int = -1  # highest seq known to exist
    since: int = 0  # applied without a skip from this seq on
    buffer: dict[int, Message] = field(default_factory=dict)
    nack_at: float = -math.inf
    nack_tries: int = 0
    resync_from: int | None = None  # waiting for a resync whose snapshot is at or after this
    resync_at: float = -math.inf
    counters: Counter[str] = field(default_factory=Counter)  # this stream's share


@dataclass(frozen=True, slots=True)
class StreamInfo:
    tag: int
    stream: int
    boot: int
    peer: Peer
    expected: int  # next seq to apply
    lag: int  # seqs known to exist, not applied yet
    entries: int
    last_heard: float
    resync_pending: bool
    counters: Counter[str]


class Receiver:
    """All sender streams one node listens to. ``tag``/``boot`` are this node's own, used as
    the origin of its NACKs; ``peers`` (tags) limits who is listened to."""

    def __init__(
        self,
        codec: Codec,
        tag: int,
        boot: int,
        *,
        peers: Collection[int] | None = None,
        config: ReceiverConfig | None = None,
        listener: StreamListener | None = None,
        boots: Mapping[int, int] | None = None,
    ) -> None:
        self.codec, self.tag, self.boot = codec, tag, boot
        self.config = config or ReceiverConfig()
        self.counters: Counter[str] = Counter()
        self._peers = None if peers is None else frozenset(peers)
        self._listener = listener
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._boots: dict[int, int] = dict(boots or {})  # tag -> newest boot id ever seen
        self.boots_changed = 0  # bumped when ``boots()`` changes: time to persist it

    # --- what the agent and the tests look at -------------------------------------------

    def cache(self, tag: int, stream: int = 0) -> Mapping[Key, Entry]:
        st = self._streams.get((tag, stream))
        return _EMPTY if st is None else st.cache.entries

    def boots(self) -> dict[int, int]:
        """The newest boot id seen of each sender: persist it, hand it to the next life."""
        return dict(self._boots)

    def boot_of(self, tag: int, stream: int = 0) -> int | None:
        st = self._streams.get((tag, stream))
        return None if st is None else st.boot

    def senders(self) -> list[tuple[int, int, int]]:
        """(tag, stream, boot) of every sender stream heard of."""
        return [(s.tag, s.stream, s.boot) for s in self._streams.values()]

    def forget(self, tag: int, stream: int) -> Mapping[Key, Entry]:
        """Drop a sender stream (a finished precopy); returns its last cache."""
        st = self._streams.pop((tag, stream), None)
        return _EMPTY if st is None else st.cache.entries

    def follow(self, tag: int, stream: int, boot: int, seq: int, peer: Peer, now: float,
               listener: Callable[[Event], None] | None = None) -> None:  # fmt: skip
        """Follow a sender stream announced out of band (a precopy the source named over the
        peer channel): its first datagram will be ``seq``, so losing even that one is a gap
        to NACK, not a reason to resync. ``listener`` hears every change to its cache."""
        st = _Stream(tag, stream, boot, peer, ExternalCache(listener), now)
        st.expected = st.since = seq % SEQ_MOD
        st.highest = st.expected - 1
        self._streams[tag, stream] = st
        self._count(st, "followed")

    def expect(self, tag: int, stream: int, last: int, now: float) -> list[Outgoing]:
        """The sender said (out of band) that it has sent up to ``last`` and someone waits
        for it: NACK every hole up to there now, rather than at its next ALIVE or retry."""
        st = self._streams.get((tag, stream))
        if st is None:
            return []
        last = unwrap(last, st.expected)
        if last < st.expected:
            return []
        st.highest = max(st.highest, last)
        holes = _holes(st)[: self.config.max_nacks]
        if holes:
            self._count(st, "gap")
            st.nack_at = now
        return [self._nack(st, lo, hi) for lo, hi in holes]

    def position(self, tag: int, stream: int = 0) -> int | None:
        """The next seq this receiver will apply from that sender (unbounded int)."""
        st = self._streams.get((tag, stream))
        return None if st is None else st.expected

    def stream_info(self) -> list[StreamInfo]:
        """Per sender stream: where we are in its sequence space and what it cost."""
        return [
            StreamInfo(s.tag, s.stream, s.boot, s.peer, s.expected,
                       max(s.highest - s.expected + 1, 0), len(s.cache), s.last_heard,
                       s.resync_from is not None, Counter(s.counters))
            for s in self._streams.values()
        ]  # fmt: skip

    def _count(self, st: _Stream, name: str, n: int = 1) -> None:
        self.counters[name] += n
        st.counters[name] += n

    # --- inputs -------------------------------------------------------------------------

    def on_datagram(self, data: bytes, peer: Peer, now: float) -> list[Outgoing]:
        msg = decode_counted(self.codec, data, self.counters)
        return [] if msg is None else self.on_message(msg, peer, now)

    def on_message(self, msg: Message, peer: Peer, now: float) -> list[Outgoing]:
        drop = self._screen(msg)
        if drop:
            self.counters[drop] += 1
            return []
        st, out = self._stream_for(msg, peer, now)
        if st is None:
            return out
        if not self._plausible(st, msg, now):
            self._count(st, "implausible")  # not heard: last_heard stays the genuine one
            return out
        st.last_heard, st.peer = now, peer
        if msg.type in SEQUENCED:
            return out + self._on_sequenced(st, msg, now)
        return out + self._on_control(st, msg, now)

    def on_tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for st in self._streams.values():
            if now - st.last_heard > self.config.dead_after:
                continue  # silent: keep its cache for a failover, stop asking
            out += self._retry_nacks(st, now)
            if st.resync_from is not None and now - st.resync_at >= self.config.resync_retry:
                out.append(self._resync_request(st, now))
        return out

    # --- who is talking -----------------------------------------------------------------

    def _screen(self, msg: Message) -> str | None:
        if msg.tag == self.tag:
            return "own"  # our own multicast looped back
        if self._peers is not None and msg.tag not in self._peers:
            return "unknown_sender"
        if msg.type in (MsgType.NACK, MsgType.RESYNC_REQUEST):
            return "not_for_receiver"  # a sender's business
        return None

    def _stream_for(
        self, msg: Message, peer: Peer, now: float
    ) -> tuple[_Stream | None, list[Outgoing]]:
        st = self._streams.get((msg.tag, msg.stream))
        if msg.boot < self._boots.get(msg.tag, 0) or (st is not None and msg.boot < st.boot):
            # a replay of an earlier life: never go back, whatever the newer one is doing
            self.counters["stale_boot"] += 1
            if st is not None:
                st.counters["stale_boot"] += 1
            return None, []
        self._note_boot(msg.tag, msg.boot)
        if st is None:
            cache = ExternalCache(self._bind(msg.tag, msg.stream))
            st = _Stream(msg.tag, msg.stream, msg.boot, peer, cache, now)
            self._streams[msg.tag, msg.stream] = st
            self._count(st, "new_sender")
            return st, self._first_contact(st, msg, now)
        if msg.boot == st.boot:
            return st, []
        self._count(st, "new_boot")
        st.boot, st.peer = msg.boot, peer
        st.cache.forget_versions()
        return st, self._first_contact(st, msg, now)

    def _note_boot(self, tag: int, boot: int) -> None:
        if boot > self._boots.get(tag, 0):
            self._boots[tag] = boot
            self.boots_changed += 1

    def _plausible(self, st: _Stream, msg: Message, now: float) -> bool:
        """Could the sender have sent this seq by now? Since it was last heard it could
        have sent at most ``max_rate`` datagrams a second beyond what we knew existed (a
        window's worth of slack on top). RESYNC_END names a snapshot at or before itself."""
        if msg.type not in SEQUENCED and msg.type not in _CARRY_LAST:
            return True
        limit = (max(st.highest, st.expected) + self.config.window
                 + self.config.max_rate * max(now - st.last_heard, 0.0))  # fmt: skip
        seq = unwrap(msg.seq, st.expected)
        if seq > limit:
            return False
        if msg.type == MsgType.RESYNC_BEGIN and msg.void:
            return unwrap(msg.last, st.expected) <= seq
        if msg.type == MsgType.RESYNC_END:
            return unwrap(msg.begin, seq) <= seq
        return msg.as_of is None or unwrap(msg.as_of, seq) <= limit + 1

    def _bind(self, tag: int, stream: int) -> Callable[[Event], None] | None:
        return None if self._listener is None else partial(self._listener, tag, stream)

    def _first_contact(self, st: _Stream, msg: Message, now: float) -> list[Outgoing]:
        """Start following a sender (or a new boot of it) at this message."""
        st.expected = msg.seq if msg.type in SEQUENCED else msg.seq + 1
        st.highest, st.since = st.expected - 1, st.expected
        st.buffer.clear()
        st.nack_tries, st.resync_from = 0, None
        if msg.type == MsgType.HELLO and not len(st.cache):
            return []  # a fresh sender and nothing to forget: nothing was missed
        return self._want_resync(st, st.expected, now)

    # --- sequenced datagrams ------------------------------------------------------------

    def _on_sequenced(self, st: _Stream, msg: Message, now: float) -> list[Outgoing]:
        seq = unwrap(msg.seq, st.expected)
        if seq < st.expected:
            self._count(st, "old")  # applied already: duplicate or replay
            return []
        if seq in st.buffer:
            self._count(st, "duplicate")
            return []
        out: list[Outgoing] = []
        if seq - st.expected >= self.config.window:
            self._count(st, "overrun")
            self._skip_to(st, seq)
            out += self._want_resync(st, seq, now)
        st.buffer[seq] = msg
        out += self._learn(st, seq - 1, seq, now)
        self._drain(st)
        return out

    def _on_control(self, st: _Stream, msg: Message, now: float) -> list[Outgoing]:
        """ALIVE, HELLO, RESYNC_BEGIN: seq is the sender's last sent seq."""
        out: list[Outgoing] = []
        if msg.type == MsgType.RESYNC_BEGIN:
            self._count(st, "resync_begin")
            if msg.void:
                self._on_void(st, msg, now)
        last = unwrap(msg.seq, st.expected)
        if last - st.expected >= self.config.window:
            self._count(st, "overrun")
            self._skip_to(st, last + 1)
            out += self._want_resync(st, last + 1, now)
        elif last >= st.expected:
            out += self._learn(st, last, last, now)
        return out

    def _on_void(self, st: _Stream, msg: Message, now: float) -> None:
        """The sender cannot serve first..last any more; a resync from last+1 is running."""
        first, last = unwrap(msg.first, st.expected), unwrap(msg.last, st.expected)
        if last < st.expected or first > last:
            self._count(st, "void_ignored")
            return
        self._count(st, "void")
        self._skip_to(st, last + 1)
        st.resync_from = max(st.resync_from or last + 1, last + 1)
        st.resync_at = now  # the sender started it; ask again only if no END comes

    def _learn(self, st: _Stream, missing_upto: int, highest: int, now: float) -> list[Outgoing]:
        """Seqs up to ``highest`` exist; NACK the ones up to ``missing_upto`` never seen."""
        out: list[Outgoing] = []
        lo = max(st.highest + 1, st.expected)
        if lo <= missing_upto:
            self._count(st, "gap")
            out.append(self._nack(st, lo, missing_upto))
            st.nack_at = now
        st.highest = max(st.highest, highest)
        return out

    def _drain(self, st: _Stream) -> None:
        start = st.expected
        while st.expected in st.buffer:
            self._apply(st, st.buffer.pop(st.expected), st.expected)
            st.expected += 1
        if st.expected != start:
            st.cache.prune(st.expected)
            st.nack_tries = 0
        st.highest = max(st.highest, st.expected - 1)

    def _skip_to(self, st: _Stream, upto: int) -> None:
        """Give up on every missing seq below ``upto``; apply what we hold, in order. After
        each hole ``since`` moves, so a held RESYNC_END spanning a hole does not sweep."""
        for seq in sorted(s for s in st.buffer if s < upto):
            self._jump(st, seq)
            self._apply(st, st.buffer.pop(seq), seq)
            st.expected = seq + 1
        self._jump(st, upto)
        st.cache.prune(st.expected)
        st.highest = max(st.highest, upto - 1)
        st.nack_tries = 0
        self._drain(st)

    def _jump(self, st: _Stream, to: int) -> None:
        if to > st.expected:
            self._count(st, "skipped", to - st.expected)
            st.expected = st.since = to

    def _apply(self, st: _Stream, msg: Message, seq: int) -> None:
        if msg.type == MsgType.RESYNC_END:
            self._on_end(st, unwrap(msg.begin, seq))
            return
        version = seq if msg.as_of is None else max(seq, unwrap(msg.as_of, seq))
        st.cache.apply_all(msg.records, version, seq + 1, self.counters)

    def _on_end(self, st: _Stream, begin: int) -> None:
        if begin < st.since:
            self._count(st, "sweep_skipped")  # we missed part of that resync
            return
        self._count(st, "swept", st.cache.sweep(begin))
        self._count(st, "resync_end")
        if st.resync_from is not None and begin >= st.resync_from:
            st.resync_from = None

    # --- asking -------------------------------------------------------------------------

    def _retry_nacks(self, st: _Stream, now: float) -> list[Outgoing]:
        if st.expected > st.highest or now - st.nack_at < self.config.nack_retry:
            return []
        if st.nack_tries >= self.config.nack_retries:
            self._count(st, "gave_up")
            upto = st.highest + 1
            self._skip_to(st, upto)
            return self._want_resync(st, upto, now)
        st.nack_tries += 1
        st.nack_at = now
        self._count(st, "nack_retry")
        return [self._nack(st, lo, hi) for lo, hi in _holes(st)[: self.config.max_nacks]]

    def _want_resync(self, st: _Stream, needed_from: int, now: float) -> list[Outgoing]:
        st.resync_from = max(st.resync_from or needed_from, needed_from)
        return [self._resync_request(st, now)]

    def _resync_request(self, st: _Stream, now: float) -> Outgoing:
        st.resync_at = now
        self._count(st, "resync_requested")
        assert st.resync_from is not None
        msg = Message(MsgType.RESYNC_REQUEST, self.tag, self.boot, stream=st.stream,
                      target_tag=st.tag, target_boot=st.boot, first=st.resync_from)  # fmt: skip
        return Outgoing(st.peer, self.codec.encode(msg), MsgType.RESYNC_REQUEST)

    def _nack(self, st: _Stream, lo: int, hi: int) -> Outgoing:
        self._count(st, "nack_sent")
        msg = Message(MsgType.NACK, self.tag, self.boot, stream=st.stream,
                      target_tag=st.tag, target_boot=st.boot, first=lo, last=hi)  # fmt: skip
        return Outgoing(st.peer, self.codec.encode(msg), MsgType.NACK)


def _holes(st: _Stream) -> list[tuple[int, int]]:
    """The missing ranges between ``expected`` and ``highest``."""
    holes, lo = [], st.expected
    for seq in sorted(st.buffer):
        if seq > lo:
            holes.append((lo, seq - 1))
        lo = seq + 1
    if lo <= st.highest:
        holes.append((lo, st.highest))
    return holes
