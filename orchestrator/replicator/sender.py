"""The sending half of the replication protocol: seq, batching, backlog, resend, resync.

Pure state machine in the style of conntrackd's ``sync-ftfw.c``: no sockets, no clock of
its own. The caller feeds it conntrack changes (``update``), datagrams addressed to it
(``on_datagram``: NACK, RESYNC_REQUEST) and the time (``on_tick``); it answers with
:class:`~.wire.Outgoing` datagrams for a channel to send.

What it keeps:
- ``table``: the current state, key -> (Entry, its encoded record). Everything that goes
  out is materialized from here at send time, so a record is never older than the table
  was when the datagram left: the tx queue, the backlog and a resync hold *keys*, not
  entries (conntrackd's "resends rebuild from current state").
- the tx queue: keys changed since the last flush, coalesced, flushed when a datagram is
  full or ``flush_after`` seconds after the first change.
- the backlog: the keys of the last ``backlog`` datagrams, by seq. A NACK inside it is
  answered with the same seqs rebuilt from current state (flag RESEND, ``as_of`` = our next
  seq, so the receiver knows how new they are). The part of a NACK older than the backlog
  is declared void and a resync (snapshot at a seq after the void range) covers it.
- a resync: a snapshot of the keys fed into the tx queue at ``resync_rate`` records per
  second, so it interleaves with live updates; it ends with a sequenced RESYNC_END naming
  the snapshot seq, at which receivers drop every key the resync did not refresh.

A resync is the expensive answer, so it is given once per need: a request (RESYNC_REQUEST,
a void NACK, a peer's new boot) that the latest resync already covers (its snapshot seq is
at or after what the asker needs) starts nothing, so a replayed request costs nothing; a
request from the future is refused; and resyncs start at most once per ``resync_gap``
seconds, a need arriving sooner waiting for the next start, which covers every waiter.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from orchestrator.model.conntrack import Entry, Event, EventType

from .wire import (
    HEADER_SIZE,
    MAC_SIZE,
    SEQ_MOD,
    Codec,
    EncodeError,
    Flag,
    Key,
    Message,
    MsgType,
    Outgoing,
    Peer,
    Record,
    WireKey,
    decode_counted,
    destroy_record,
    encode_upsert,
    key_of_record,
    key_to_wire,
    unwrap,
)

_NEW = bytes([EventType.NEW])
_NEW_OP, _DESTROY = EventType.NEW, EventType.DESTROY
_AS_OF = 4


@dataclass(frozen=True, slots=True)
class SenderConfig:
    mtu: int = 1400  # largest datagram: header + records + MAC (the UDP payload)
    flush_after: float = 0.005  # seconds a change may wait for company
    backlog: int = 1024  # datagrams kept to answer NACKs
    resync_rate: float = 20_000.0  # records per second during a resync
    alive_every: float = 1.0  # an idle sender says ALIVE{last seq} this often
    resync_gap: float = 1.0  # at least this long between two resync starts

    def __post_init__(self) -> None:
        if (not 200 <= self.mtu <= 65507 or self.backlog < 1 or self.resync_rate <= 0
                or self.resync_gap < 0):
            raise ValueError(f"bad sender config {self}")


class _Sent(NamedTuple):
    seq: int
    keys: tuple[WireKey, ...] | None  # None: a RESYNC_END
    begin: int = 0


@dataclass(slots=True)
class _Resync:
    begin: int  # first seq that can carry snapshot records
    keys: list[WireKey]
    last: float
    pos: int = 0
    budget: float = 0.0


class Sender:
    """One sequence space: a node's replication stream (stream 0) or a per-guest precopy
    stream (``stream`` n, ``scope`` selecting the guest's entries, ``dest`` its target)."""

    def __init__(
        self,
        codec: Codec,
        tag: int,
        boot: int,
        *,
        stream: int = 0,
        initial_seq: int = 0,
        config: SenderConfig | None = None,
        scope: Callable[[Entry], bool] | None = None,
        dest: Peer | None = None,
    ) -> None:
        self.codec, self.tag, self.boot, self.stream = codec, tag, boot, stream
        self.config = config or SenderConfig()
        self.counters: Counter[str] = Counter()
        self._scope, self._dest = scope, dest
        self._room = self.config.mtu - HEADER_SIZE - MAC_SIZE
        # keyed by wire key (bytes: hashed once, in C) rather than Entry.key
        self._table: dict[WireKey, bytes] = {}  # -> the UPDATE record; NEW swaps byte 0
        self._queue: dict[WireKey, tuple[EventType, int]] = {}  # -> (op hint, record size)
        self._queued = 0  # bytes
        self._deadline: float | None = None
        self._next = initial_seq % SEQ_MOD
        self._backlog: deque[_Sent] = deque(maxlen=self.config.backlog)
        self._resync: _Resync | None = None
        self._resync_begun = -1  # snapshot seq of the latest resync started (running or done)
        self._resync_started_at = -math.inf
        self._resync_wanted: int | None = None  # a need that waits for resync_gap
        self._last_sent = -math.inf

    # --- what the agent and the tests look at -------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._next - 1

    @property
    def resyncing(self) -> bool:
        return self._resync is not None

    @property
    def resync_due(self) -> bool:
        """A resync runs, or one waits for ``resync_gap``."""
        return self._resync is not None or self._resync_wanted is not None

    @property
    def busy(self) -> bool:
        """Something waits for a flush deadline or a resync is running: tick soon."""
        return self._deadline is not None or self._resync is not None

    def __len__(self) -> int:
        return len(self._table)

    def state(self) -> Mapping[Key, Entry]:
        """The current table (a copy, keyed by Entry.key), built from the records."""
        out: dict[Key, Entry] = {}
        for key, wire in self._table.items():
            entry = Record(EventType.UPDATE, key, wire).entry
            assert entry is not None
            out[entry.key] = entry
        return out

    # --- inputs -------------------------------------------------------------------------

    def start(self, now: float) -> list[Outgoing]:
        """HELLO: a new boot id; receivers that knew an older one reset and resync."""
        return [self._control(MsgType.HELLO, now)]

    def update(self, item: Event | Entry, now: float) -> list[Outgoing]:
        """A conntrack change (an Event, or an Entry meaning 'it is now this')."""
        entry = item.entry if isinstance(item, Event) else item
        op = item.type if isinstance(item, Event) else EventType.UPDATE
        try:
            if op == EventType.DESTROY or (self._scope is not None and not self._scope(entry)):
                return self._remove(key_to_wire(entry.key), now)
            wire = encode_upsert(entry)
        except EncodeError:
            self.counters["unencodable"] += 1
            return []
        return self.update_records(((op, wire),), now)

    def update_records(self, changes: Iterable[tuple[EventType, bytes]],
                       now: float) -> list[Outgoing]:  # fmt: skip
        """``update`` for changes already in wire form (``kernel.decode_event_records``), in
        order: each is (op, the entry's UPDATE record). The caller has scoped them; a DESTROY
        of an entry not held (out of scope all along) is nothing to send."""
        out: list[Outgoing] = []
        table, enqueue, room = self._table, self._enqueue, self._room
        for op, wire in changes:
            key = key_of_record(wire)
            if op == _DESTROY:
                if table.pop(key, None) is None:
                    continue
                enqueue(key, op, len(key) + 2, now)
            else:
                if key not in table:
                    op = _NEW_OP
                table[key] = wire
                enqueue(key, op, len(wire), now)
            if self._queued > room:
                out += self._drain(now, force=False)
        return out

    def reconcile(self, entries: Iterable[Entry], now: float) -> list[Outgoing]:
        """The table is now exactly ``entries`` (a dump after lost events): keys missing from
        it are destroyed, changed entries updated, identical ones left alone."""
        out: list[Outgoing] = []
        seen: set[WireKey] = set()
        for entry in entries:
            try:
                wire = encode_upsert(entry)
            except EncodeError:
                self.counters["unencodable"] += 1
                continue
            key = key_of_record(wire)
            seen.add(key)
            if self._table.get(key) != wire:
                out += self.update(entry, now)
        for key in [k for k in self._table if k not in seen]:
            out += self._remove(key, now)
        return out

    def on_datagram(self, data: bytes, peer: Peer, now: float) -> list[Outgoing]:
        msg = decode_counted(self.codec, data, self.counters)
        return [] if msg is None else self.on_message(msg, peer, now)

    def on_message(self, msg: Message, peer: Peer, now: float) -> list[Outgoing]:
        """NACK and RESYNC_REQUEST addressed to this stream; anything else is ignored."""
        if msg.type not in (MsgType.NACK, MsgType.RESYNC_REQUEST):
            self.counters["ignored"] += 1
            return []
        if (msg.target_tag, msg.target_boot, msg.stream) != (self.tag, self.boot, self.stream):
            self.counters["not_for_me"] += 1  # another node, stream, or an older boot of ours
            return []
        if msg.type == MsgType.NACK:
            return self._on_nack(msg, peer, now)
        first = unwrap(msg.first, self._next)
        if first > self._next:
            self.counters["bad_resync_request"] += 1  # needs what we have not sent yet
            return []
        self.counters["resync_request"] += 1
        return self._ensure_resync(first, now)

    def peer_joined(self, now: float) -> list[Outgoing]:
        """A peer (re)started and holds nothing of ours: everything up to now, once."""
        self.counters["peer_joined"] += 1
        return self._ensure_resync(self._next, now)

    def on_tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self._resync_wanted is not None and self._may_start(now):
            wanted, self._resync_wanted = self._resync_wanted, None
            out += self._ensure_resync(wanted, now)
        out += self._resync_step(now)
        if self._deadline is not None and now >= self._deadline:
            out += self._drain(now, force=True)
        if now - self._last_sent >= self.config.alive_every:
            out.append(self._control(MsgType.ALIVE, now))
        return out

    def flush(self, now: float) -> list[Outgoing]:
        """Send what waits for company now (a precopy barrier cannot wait for a deadline)."""
        return self._drain(now, force=True) if self._queue else []

    def request_resync(self, now: float) -> list[Outgoing]:
        """A resync for everyone from now on (e.g. after an event overrun refilled the
        table), as soon as ``resync_gap`` allows."""
        return self._ensure_resync(self._next, now)

    # --- tx queue and datagrams ---------------------------------------------------------

    def _remove(self, key: WireKey, now: float) -> list[Outgoing]:
        if self._table.pop(key, None) is None:
            self.counters["destroy_unknown"] += 1
            return []
        self._enqueue(key, EventType.DESTROY, len(key) + 2, now)
        return self._flush_full(now)

    def _enqueue(self, key: WireKey, op: EventType, size: int, now: float) -> None:
        old = self._queue.get(key)
        if old is not None:
            self._queued -= old[1]
            if old[0] == EventType.NEW and op == EventType.UPDATE:
                op = EventType.NEW
        self._queue[key] = (op, size)
        self._queued += size
        if self._deadline is None:
            self._deadline = now + self.config.flush_after

    def _record(self, key: WireKey, op: EventType) -> bytes:
        wire = self._table.get(key)
        if wire is None:
            return destroy_record(key)
        return _NEW + wire[1:] if op == EventType.NEW else wire

    def _flush_full(self, now: float) -> list[Outgoing]:
        return self._drain(now, force=False) if self._queued > self._room else []

    def _drain(self, now: float, force: bool) -> list[Outgoing]:
        """Pack the queue into datagrams; without ``force`` keep the last partial one."""
        out: list[Outgoing] = []
        keys: list[WireKey] = []
        parts: list[bytes] = []
        size = 0
        for key, (op, _) in self._queue.items():
            rec = self._record(key, op)
            if size + len(rec) > self._room and keys:
                out.append(self._emit(keys, parts, now))
                keys, parts, size = [], [], 0
            keys.append(key)
            parts.append(rec)
            size += len(rec)
        if force and keys:
            out.append(self._emit(keys, parts, now))
            keys, size = [], 0
        self._queue = {k: self._queue[k] for k in keys}
        self._queued = size
        self._deadline = self._deadline if keys else None
        return out

    def _emit(self, keys: list[WireKey], parts: list[bytes], now: float) -> Outgoing:
        seq = self._next
        self._next += 1
        self._backlog.append(_Sent(seq, tuple(keys)))
        data = self.codec.seal(
            MsgType.DATA, self.tag, self.boot, seq, b"".join(parts),
            count=len(parts), stream=self.stream,
        )  # fmt: skip
        self.counters["data_sent"] += 1
        self.counters["records_sent"] += len(parts)
        self._last_sent = now
        return Outgoing(self._dest, data, MsgType.DATA)

    def _control(
        self, mtype: MsgType, now: float, begin: int = 0, void: tuple[int, int] | None = None,
        dest: Peer | None = None,
    ) -> Outgoing:  # fmt: skip
        """ALIVE, HELLO, RESYNC_BEGIN: unsequenced, seq = our last sent seq."""
        body, flags = b"", 0
        if mtype == MsgType.RESYNC_BEGIN:
            body = _u32(begin) + (_u32(void[0]) + _u32(void[1]) if void else b"")
            flags = Flag.VOID if void else 0
        data = self.codec.seal(
            mtype, self.tag, self.boot, self.last_seq, body, stream=self.stream, flags=flags
        )
        if dest is None:
            self._last_sent = now
        return Outgoing(dest if dest is not None else self._dest, data, mtype)

    # --- NACK: resend from the backlog, void and resync what it no longer holds ----------

    def _on_nack(self, msg: Message, peer: Peer, now: float) -> list[Outgoing]:
        first, last = unwrap(msg.first, self._next), unwrap(msg.last, self._next)
        if not first <= last < self._next:
            self.counters["bad_nack"] += 1
            return []
        self.counters["nack"] += 1
        # flush first: then a rebuild at as_of n shows exactly the state after seq n-1, so
        # equal versions mean equal content and a later rebuild always has a higher as_of
        out = self._drain(now, force=True)
        oldest = self._backlog[0].seq if self._backlog else self._next
        if first < oldest:
            void_last = min(last, oldest - 1)
            out += self._ensure_resync(void_last + 1, now)
            begin = self._resync.begin if self._resync is not None else self._next
            out.append(self._control(MsgType.RESYNC_BEGIN, now, begin, (first, void_last),
                                     dest=peer))  # fmt: skip
            self.counters["nack_void"] += 1
            first = void_last + 1
        out += [self._resend(seq, oldest, peer, now) for seq in range(first, last + 1)]
        return out

    def _resend(self, seq: int, oldest: int, peer: Peer, now: float) -> Outgoing:
        sent = self._backlog[seq - oldest]
        self.counters["resent"] += 1
        if sent.keys is None:
            data = self.codec.seal(MsgType.RESYNC_END, self.tag, self.boot, seq,
                                   _u32(sent.begin), stream=self.stream)  # fmt: skip
            return Outgoing(peer, data, MsgType.RESYNC_END)
        parts, size = [], _AS_OF
        for key in sent.keys:
            rec = self._record(key, EventType.UPDATE)
            if size + len(rec) > self._room:  # grew since (a DESTROY is now an entry)
                self._enqueue(key, EventType.UPDATE, len(rec), now)
                continue
            parts.append(rec)
            size += len(rec)
        data = self.codec.seal(
            MsgType.DATA, self.tag, self.boot, seq, _u32(self._next) + b"".join(parts),
            count=len(parts), stream=self.stream, flags=Flag.RESEND,
        )  # fmt: skip
        return Outgoing(peer, data, MsgType.DATA)

    # --- resync ---------------------------------------------------------------------------

    def _ensure_resync(self, needed_from: int, now: float) -> list[Outgoing]:
        """A resync whose snapshot is at or after ``needed_from`` covers the asker: the
        latest one, running (it reaches the asker) or done (its records and END are in the
        backlog for the asker's NACKs, or the asker learns they are void and asks again from
        after them). A running one that started earlier does not, so it starts over."""
        if self._resync_begun >= needed_from:
            self.counters["resync_covered"] += 1
            return []
        if not self._may_start(now):
            self.counters["resync_deferred"] += 1
            self._resync_wanted = max(self._resync_wanted or needed_from, needed_from)
            return []
        return self._start_resync(now)

    def _may_start(self, now: float) -> bool:
        return now - self._resync_started_at >= self.config.resync_gap

    def _start_resync(self, now: float) -> list[Outgoing]:
        self.counters["resync_started"] += 1
        self._resync = _Resync(self._next, list(self._table), now)
        self._resync_begun, self._resync_started_at = self._next, now
        self._resync_wanted = None
        return [self._control(MsgType.RESYNC_BEGIN, now, self._next)]

    def _resync_step(self, now: float) -> list[Outgoing]:
        r = self._resync
        if r is None:
            return []
        rate = self.config.resync_rate
        r.budget = min(r.budget + max(now - r.last, 0.0) * rate, max(rate, 1.0))
        r.last = now
        chunk = r.keys[r.pos : r.pos + int(r.budget)]
        r.pos += len(chunk)
        r.budget -= len(chunk)
        for key in chunk:
            wire = self._table.get(key)
            if wire is not None:  # gone ones already had their DESTROY sent
                self._enqueue(key, EventType.UPDATE, len(wire), now)
        self.counters["resync_records"] += len(chunk)
        out = self._flush_full(now)
        if r.pos >= len(r.keys):
            out += self._drain(now, force=True)
            out.append(self._end(r.begin, now))
            self._resync = None
        return out

    def _end(self, begin: int, now: float) -> Outgoing:
        seq = self._next
        self._next += 1
        self._backlog.append(_Sent(seq, None, begin))
        self.counters["resync_done"] += 1
        self._last_sent = now
        data = self.codec.seal(
            MsgType.RESYNC_END, self.tag, self.boot, seq, _u32(begin), stream=self.stream
        )
        return Outgoing(self._dest, data, MsgType.RESYNC_END)


def _u32(value: int) -> bytes:
    return (value % SEQ_MOD).to_bytes(4, "big")
