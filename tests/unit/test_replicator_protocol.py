"""The replication protocol core: sender and receiver state machines, alone and together.

The together part is a simulated network with virtual time (``Net``): every datagram gets
a fate (dropped, delayed, duplicated) from a list hypothesis draws, so loss, reordering and
duplication schedules are generated and shrunk. After the schedule the network turns
lossless, time goes on, and every receiver's cache must equal the sender's table; on the
way no receiver may ever go back to an older state of a key, and every datagram a receiver
lost must have been NACKed.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.model.conntrack import (
    Entry,
    Event,
    EventType,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.replicator.cache import ExternalCache, Outcome
from orchestrator.replicator.protocol import (
    Receiver,
    ReceiverConfig,
    Replicator,
    Sender,
    SenderConfig,
)
from orchestrator.replicator.wire import (
    SEQ_MOD,
    Codec,
    Message,
    MsgType,
    Outgoing,
    Record,
    boot_id,
    encode_upsert,
)

KEY = b"convergent-test-cluster-key-0001"
CODEC = Codec(KEY)
SMALL = SenderConfig(mtu=200, backlog=64, resync_rate=1000.0)  # 3 TCP records a datagram


def entry(i: int, mark: int = 0, v6: bool = False) -> Entry:
    """Key i; ``mark`` tells versions apart. Some keys are IPv6 so record sizes vary."""
    if v6:
        g, p, pub = (
            ip_address(f"fd00::{i + 1:x}"),
            ip_address("2001:db8::1"),
            ip_address("fd00::fe"),
        )
    else:
        g, p, pub = ip_address(f"10.5.{i // 250}.{i % 250 + 1}"), ip_address("1.1.1.1"), None
    pub = pub or ip_address("192.168.122.11")
    return Entry(
        Tuple(g, p, 6, 1024 + i, 443),
        Tuple(p, pub, 6, 443, 1024 + i),
        Status.CONFIRMED | Status.SRC_NAT | Status.SEEN_REPLY | Status.ASSURED,
        mark,
        3600,
        0,
        TcpInfo(TcpState.ESTABLISHED, 7, 7, TcpFlag.BE_LIBERAL, TcpFlag.BE_LIBERAL),
    )


def decode(outs: Iterable[Outgoing]) -> list[Message]:
    return [CODEC.decode(o.data) for o in outs]


def marks(msg: Message) -> list[int | None]:
    return [r.entry.mark if r.entry else None for r in msg.records]


# --- the simulated network ----------------------------------------------------------------


@dataclass(frozen=True)
class Fate:
    drop: bool = False
    delay: float = 0.001
    dup: bool = False


@dataclass
class Net:
    """Nodes by name, datagrams in flight in a heap, time in fixed ticks."""

    nodes: dict[str, Replicator]
    fates: Iterator[Fate] = field(default_factory=lambda: iter(()))
    tick: float = 0.005
    now: float = 0.0
    lossy: bool = True
    flight: list[tuple[float, int, str, str, bytes]] = field(default_factory=list)
    order: Iterator[int] = field(default_factory=itertools.count)
    dropped: list[tuple[str, str, Message]] = field(default_factory=list)
    posted: list[tuple[str, str, Message]] = field(default_factory=list)
    first: dict[tuple[str, str], Message] = field(default_factory=dict)

    def post(self, src: str, outs: Iterable[Outgoing]) -> None:
        for out in outs:
            dsts = [out.dest] if out.dest is not None else [n for n in self.nodes if n != src]
            for dst in dsts:
                assert isinstance(dst, str)
                fate = next(self.fates, Fate()) if self.lossy else Fate()
                msg = CODEC.decode(out.data)
                self.posted.append((src, dst, msg))
                if fate.drop:
                    self.dropped.append((src, dst, msg))
                    continue
                for copy in range(2 if fate.dup else 1):
                    when = self.now + max(fate.delay, 0.0005) * (copy + 1)
                    heapq.heappush(self.flight, (when, next(self.order), src, dst, out.data))

    def step(self) -> None:
        self.now = round(self.now + self.tick, 6)
        while self.flight and self.flight[0][0] <= self.now:
            when, _, src, dst, data = heapq.heappop(self.flight)
            if dst in self.nodes:
                self.first.setdefault((src, dst), CODEC.decode(data))
                self.post(dst, self.nodes[dst].on_datagram(data, src, when))
        for name, node in self.nodes.items():
            self.post(name, node.on_tick(self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step()


@dataclass
class History:
    """Every state each key went through at the sender, to check receivers never regress."""

    states: dict[tuple[int, int], list[int | None]] = field(default_factory=dict)
    where: dict[tuple[str, int, int], int] = field(default_factory=dict)  # -> state index
    by_mark: dict[int, int] = field(default_factory=dict)  # mark -> state index

    def record(self, tag: int, i: int, mark: int | None) -> None:
        """Sender ``tag`` set key ``i`` to ``mark`` (None: destroyed it)."""
        states = self.states.setdefault((tag, i), [])
        if mark is not None:
            self.by_mark[mark] = len(states)
        states.append(mark)

    def listener(self, receiver: str) -> Callable[[int, int, Event], None]:
        def on_change(tag: int, stream: int, event: Event) -> None:
            i = event.entry.tuple_orig.sport - 1024
            pos = self.where.get((receiver, tag, i), -1)
            if event.type == EventType.DESTROY:
                states = self.states[tag, i]
                later = [j for j, m in enumerate(states) if m is None and j > pos]
                assert later, f"{receiver}: key {i} destroyed but the sender never did after {pos}"
                self.where[receiver, tag, i] = later[0]
                return
            j = self.by_mark[event.entry.mark]
            assert j >= pos, f"{receiver}: key {i} went back from state {pos} to {j}"
            self.where[receiver, tag, i] = j

        return on_change


class Cluster:
    """Senders (tags 1, 11, ...) and receiver-only nodes on one simulated network."""

    def __init__(
        self,
        senders: int = 1,
        receivers: int = 2,
        *,
        fates: Iterable[Fate] = (),
        sconf: SenderConfig = SMALL,
        rconf: ReceiverConfig | None = None,
        initial_seq: int = 0,
    ) -> None:
        self.history = History()
        self.sconf, self.rconf = sconf, rconf or ReceiverConfig(nack_retries=5, resync_retry=0.5)
        self.rnames = [f"R{n + 1}" for n in range(receivers)]
        self.snames = [f"S{n + 1}" for n in range(senders)]
        nodes = {name: self._node(name, 2 + n, n + 1) for n, name in enumerate(self.rnames)}
        for n, name in enumerate(self.snames):
            nodes[name] = self._node(name, 1 + 10 * n, 100 + n, sender=True, seq=initial_seq)
        self.net = Net(nodes, iter(fates))
        self.mark = itertools.count(1)
        for name in self.snames:
            self.net.post(name, self.sender(name).start(0.0))

    def _node(
        self, name: str, tag: int, boot: int, sender: bool = False, seq: int = 0
    ) -> Replicator:
        rx = Receiver(CODEC, tag, boot, config=self.rconf, listener=self.history.listener(name))
        tx = [Sender(CODEC, tag, boot, initial_seq=seq, config=self.sconf)] if sender else []
        return Replicator(CODEC, rx, tx)

    def sender(self, name: str = "S1") -> Sender:
        return self.net.nodes[name].sender()

    def receiver(self, name: str) -> Receiver:
        return self.net.nodes[name].receiver

    def set(self, i: int, sname: str = "S1") -> Entry:
        e = entry(i, next(self.mark), v6=i % 5 == 4)
        self.history.record(self.sender(sname).tag, i, e.mark)
        self.net.post(sname, self.sender(sname).update(Event(EventType.UPDATE, e), self.net.now))
        return e

    def delete(self, i: int, sname: str = "S1") -> None:
        e = self.sender(sname).state().get(entry(i, v6=i % 5 == 4).key)
        if e is not None:
            self.history.record(self.sender(sname).tag, i, None)
            self.net.post(
                sname, self.sender(sname).update(Event(EventType.DESTROY, e), self.net.now)
            )

    def converged(self) -> bool:
        for sname in self.snames:
            sender = self.sender(sname)
            for rname in self.rnames:
                rx = self.receiver(rname)
                if dict(rx.cache(sender.tag)) != dict(sender.state()):
                    return False
                if (rx.position(sender.tag) or 0) % SEQ_MOD != (sender.last_seq + 1) % SEQ_MOD:
                    return False
        return True

    def settle(self, limit: float = 60.0) -> float:
        """Lossless from now on; returns how long it took to converge."""
        self.net.lossy = False
        start = self.net.now
        while not self.converged():
            assert self.net.now - start < limit, self.explain()
            self.net.run(0.05)
        self.net.run(2.5)  # and it stays converged (late ALIVEs, ENDs, retries)
        assert self.converged(), self.explain()
        return self.net.now - start

    def explain(self) -> str:
        lines = []
        for sname in self.snames:
            s = self.sender(sname)
            lines.append(f"{sname} last={s.last_seq} n={len(s.state())} {dict(s.counters)}")
        for rname in self.rnames:
            rx = self.receiver(rname)
            lines.append(f"{rname} {rx.senders()} {dict(rx.counters)}")
        return "\n".join(lines)

    def lost_but_not_nacked(self, sname: str = "S1") -> list[tuple[str, int]]:
        """Sequenced broadcasts a receiver never got (at or after its first contact with the
        sender) and never NACKed."""
        bad = []
        for rname in self.rnames:
            if self.receiver(rname).counters["overrun"]:
                continue  # beyond the window: skipped and resynced, by design
            first = self.net.first.get((sname, rname))
            if first is None:
                continue
            start = first.seq if first.type in (MsgType.DATA, MsgType.RESYNC_END) else first.seq + 1
            nacks = [m for src, dst, m in self.net.posted
                     if src == rname and m.type == MsgType.NACK]  # fmt: skip
            for src, dst, m in self.net.dropped:
                if (src, dst) != (sname, rname) or m.type not in (MsgType.DATA, MsgType.RESYNC_END):
                    continue
                if m.as_of is not None or (m.seq - start) % SEQ_MOD >= 2**31:
                    continue  # a resend (answers a NACK) or before first contact
                if not any(
                    (m.seq - n.first) % SEQ_MOD <= (n.last - n.first) % SEQ_MOD for n in nacks
                ):
                    bad.append((rname, m.seq))
        return bad


# --- schedules ------------------------------------------------------------------------------

fate = st.builds(
    Fate,
    drop=st.integers(0, 9).map(lambda x: x < 3),
    delay=st.integers(0, 60).map(lambda ms: ms / 1000),
    dup=st.integers(0, 9).map(lambda x: x == 0),
)


@dataclass(frozen=True)
class Weather:
    """Fates one by one (hypothesis shrinks them), then seeded loss, duplication and delay
    (reordering) at some rate for as long as the schedule runs."""

    prefix: tuple[Fate, ...] = ()
    seed: int = 0
    loss: float = 0.0
    dup: float = 0.0
    delay: float = 0.001

    def __iter__(self) -> Iterator[Fate]:
        yield from self.prefix
        rng = random.Random(self.seed)
        while True:
            yield Fate(rng.random() < self.loss, rng.random() * self.delay, rng.random() < self.dup)


def fates() -> st.SearchStrategy[Weather]:
    return st.builds(
        Weather,
        st.lists(fate, max_size=40).map(tuple),
        st.integers(0, 2**32),
        st.sampled_from([0.0, 0.05, 0.2, 0.5]),
        st.sampled_from([0.0, 0.05, 0.3]),
        st.sampled_from([0.001, 0.02, 0.2]),
    )


ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 11)),
        st.tuples(st.just("set"), st.integers(0, 11)),
        st.tuples(st.just("del"), st.integers(0, 11)),
        st.tuples(st.just("wait"), st.integers(1, 400)),
    ),
    min_size=6,
    max_size=80,
)


def play(cluster: Cluster, schedule: list[tuple[str, int]], sname: str = "S1") -> None:
    for op, arg in schedule:
        if op == "set":
            cluster.set(arg, sname)
        elif op == "del":
            cluster.delete(arg, sname)
        else:
            cluster.net.run(arg / 1000)


PROPERTY = settings(
    max_examples=int(os.environ.get("REPLICATOR_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY
@given(
    ops,
    fates(),
    st.sampled_from([0, 2**32 - 7, 2**31 - 3]),
    st.sampled_from([2, 8, 64]),
    st.sampled_from([8, 4096]),
)
def test_any_schedule_converges(schedule, fate_list, initial_seq, backlog, window) -> None:
    """Loss, reordering, duplication, wrap-around, small backlogs and windows: once the
    sender stops, every receiver equals the sender; none ever went back in time; every
    lost datagram was NACKed."""
    cluster = Cluster(
        fates=fate_list,
        sconf=SenderConfig(mtu=200, backlog=backlog, resync_rate=1000.0),
        rconf=ReceiverConfig(window=window, nack_retries=5, resync_retry=0.5),
        initial_seq=initial_seq,
    )
    play(cluster, schedule)
    cluster.settle()
    assert cluster.lost_but_not_nacked() == []
    observe(cluster)


def observe(cluster: Cluster) -> None:
    """What the example exercised (pytest --hypothesis-show-statistics)."""
    lost = len(cluster.net.dropped)
    event(f"datagrams lost: {'0' if not lost else '1-9' if lost < 10 else '10+'}")
    seen = Counter[str]()
    for name in cluster.snames + cluster.rnames:
        node = cluster.net.nodes[name]
        seen.update(node.receiver.counters)
        if name in cluster.snames:
            seen.update(node.sender().counters)
    for what in ("nack_void", "resync_started", "superseded", "swept", "overrun", "gave_up",
                 "duplicate", "old", "sweep_skipped", "resent"):  # fmt: skip
        if seen[what]:
            event(what)


@PROPERTY
@given(ops, ops, fates())
def test_two_senders_into_one_receiver(schedule1, schedule2, fate_list) -> None:
    cluster = Cluster(senders=2, receivers=1, fates=fate_list)
    for step1, step2 in itertools.zip_longest(schedule1, schedule2):
        if step1:
            play(cluster, [step1], "S1")
        if step2:
            play(cluster, [step2], "S2")
    cluster.settle()
    rx = cluster.receiver("R1")
    assert {tag for tag, _, _ in rx.senders()} == {1, 11}
    assert dict(rx.cache(1)) == dict(cluster.sender("S1").state())
    assert dict(rx.cache(11)) == dict(cluster.sender("S2").state())
    observe(cluster)


# --- the same, spelled out ------------------------------------------------------------------


def test_lossless_stream() -> None:
    cluster = Cluster()
    for i in range(12):
        cluster.set(i)
    cluster.delete(3)
    cluster.set(4)
    cluster.net.run(0.05)
    assert cluster.converged()
    rx = cluster.receiver("R1")
    assert rx.counters["nack_sent"] == 0 and rx.counters["resync_requested"] == 0
    assert cluster.sender().counters["records_sent"] == 14


def test_every_gap_is_nacked_and_filled() -> None:
    # S1 broadcasts to R1, R2 in turn: lose the 2nd and 3rd data datagrams to R1 only
    drop = [Fate(), Fate()] + [Fate()] * 2 + [Fate(drop=True), Fate(), Fate(drop=True), Fate()]
    cluster = Cluster(fates=drop)
    for i in range(12):
        cluster.set(i)
    cluster.net.run(0.02)
    nacks = [m for src, _, m in cluster.net.posted if src == "R1" and m.type == MsgType.NACK]
    assert nacks and cluster.receiver("R2").counters["nack_sent"] == 0
    cluster.settle()
    assert cluster.lost_but_not_nacked() == []
    assert cluster.sender().counters["resent"] >= 2


def test_tail_loss_is_seen_through_alive() -> None:
    cluster = Cluster(fates=[Fate(), Fate(), Fate(drop=True), Fate(drop=True)])
    cluster.set(0)  # one datagram, lost to both receivers
    cluster.net.run(0.5)
    assert not cluster.converged()
    cluster.net.run(1.0)  # ALIVE{last seq} shows the loss, the NACK gets it back
    assert cluster.converged()
    assert cluster.receiver("R1").counters["gap"] == 1


def test_wraparound() -> None:
    reorder = [Fate(delay=0)] * 2 + [Fate(delay=0.03 * (n % 3)) for n in range(40)]  # HELLO 1st
    cluster = Cluster(initial_seq=2**32 - 3, fates=reorder)
    for i in range(30):
        cluster.set(i % 12)
    cluster.settle()
    assert cluster.sender().last_seq >= 2**32 + 3  # crossed the wrap
    for name in cluster.rnames:  # and nobody got confused by it
        counters = cluster.receiver(name).counters
        assert counters["resync_requested"] == counters["skipped"] == counters["overrun"] == 0


def test_backlog_overflow_ends_in_resync() -> None:
    conf = SenderConfig(mtu=200, backlog=2, resync_rate=1000.0)
    cluster = Cluster(sconf=conf, fates=[Fate(), Fate()] + [Fate(drop=True), Fate()] * 8)
    for i in range(24):
        cluster.set(i % 12)
    cluster.delete(0)
    cluster.settle()
    assert cluster.sender().counters["nack_void"] >= 1
    assert cluster.sender().counters["resync_started"] >= 1
    r1, r2 = cluster.receiver("R1").counters, cluster.receiver("R2").counters
    assert r1["void"] >= 1 and r1["resync_end"] >= 1
    assert r2["void"] == 0  # R2 lost nothing; the resync refreshed it, harmlessly


def test_stale_key_is_swept_after_void() -> None:
    """R1 misses a DESTROY that falls out of the backlog: the resync's END removes it."""
    conf = SenderConfig(mtu=200, backlog=1, resync_rate=1000.0)
    cluster = Cluster(sconf=conf, receivers=1)
    for i in range(3):
        cluster.set(i)
    cluster.net.run(0.05)
    cluster.net.lossy, cluster.net.fates = True, iter([Fate(drop=True)] * 3)
    cluster.delete(1)
    cluster.net.run(0.01)  # the DESTROY datagram is lost
    cluster.set(2)
    cluster.net.run(0.01)  # and pushed out of the one-datagram backlog by this
    cluster.settle()
    assert entry(1).key not in cluster.receiver("R1").cache(1)
    assert cluster.receiver("R1").counters["swept"] == 1


def test_new_boot_id_resets_and_resyncs() -> None:
    cluster = Cluster(receivers=1)
    for i in range(6):
        cluster.set(i)
    cluster.settle()
    rx = cluster.receiver("R1")
    old = cluster.net.nodes["S1"]
    # the agent restarts: a new boot id, a table dumped again from the kernel, where
    # key 0 died meanwhile and key 9 appeared
    new = Sender(CODEC, 1, boot_id(2_000_000_000, 1), initial_seq=5, config=SMALL)
    cluster.net.nodes["S1"] = Replicator(CODEC, Receiver(CODEC, 1, new.boot), [new])
    cluster.net.post("S1", new.start(cluster.net.now))
    cluster.history.record(1, 0, None)
    for i in (1, 2, 3, 4, 5, 9):
        e = entry(i, next(cluster.mark), v6=i % 5 == 4)
        cluster.history.record(1, i, e.mark)
        cluster.net.post("S1", new.update(e, cluster.net.now))
    cluster.settle()
    assert rx.counters["new_boot"] == 1 and rx.counters["swept"] == 1
    assert rx.senders() == [(1, 0, new.boot)]
    assert new.counters["resync_started"] == 1
    # a replay of the old boot's datagrams changes nothing
    replay = old.sender()
    before = dict(rx.cache(1))
    for out in replay.update(entry(7, 999), cluster.net.now) + replay.on_tick(cluster.net.now + 1):
        rx.on_datagram(out.data, "S1", cluster.net.now)
    assert dict(rx.cache(1)) == before and rx.counters["stale_boot"] >= 1


def test_resync_is_rate_limited_and_interleaved() -> None:
    conf = SenderConfig(mtu=1400, resync_rate=100.0)
    sender = Sender(CODEC, 1, 1, config=conf)
    for i in range(500):
        sender.update(entry(i), 0.0)
    sender.on_tick(1.0)
    out = sender.request_resync(1.0)
    assert decode(out)[0].type == MsgType.RESYNC_BEGIN
    records = 0
    for n in range(1, 21):  # 2 s in 0.1 s ticks
        msgs = decode(sender.on_tick(1.0 + n / 10))
        if n == 10:  # a live change in the middle goes out within flush_after
            live = sender.update(entry(3, 77), 2.0) + sender.on_tick(2.0 + conf.flush_after)
            assert any(77 in marks(m) for m in decode(live))
        records += sum(len(m.records) for m in msgs)
        assert all(m.type != MsgType.RESYNC_END for m in msgs)
    assert 150 <= records <= 230  # ~100 records/s, never a burst of the whole table
    assert sender.resyncing
    ends = []
    for n in range(1, 60):
        ends += [m for m in decode(sender.on_tick(3.0 + n / 10)) if m.type == MsgType.RESYNC_END]
    assert len(ends) == 1 and not sender.resyncing


# --- sender, alone ---------------------------------------------------------------------------


def test_batches_up_to_mtu_and_flushes_on_deadline() -> None:
    sender = Sender(CODEC, 1, 1, config=SMALL)
    early = []
    for i in range(7):
        early += sender.update(entry(i), 0.0)
    assert [len(m.records) for m in decode(early)] == [3, 3]  # full ones go at once
    assert sender.on_tick(0.004) == [] or all(
        m.type == MsgType.ALIVE for m in decode(sender.on_tick(0.004))
    )
    late = [m for m in decode(sender.on_tick(0.005)) if m.type == MsgType.DATA]
    assert [len(m.records) for m in late] == [1]
    assert all(len(o.data) <= 200 for o in early)
    assert [m.seq for m in decode(early)] + [late[0].seq] == [0, 1, 2]


def test_coalesces_before_flush_and_sends_current() -> None:
    sender = Sender(CODEC, 1, 1)
    for mark in (1, 2, 3):
        sender.update(entry(0, mark), 0.0)
    sender.update(entry(1), 0.0)
    sender.update(Event(EventType.DESTROY, entry(1)), 0.0)
    (msg,) = [m for m in decode(sender.on_tick(0.01)) if m.type == MsgType.DATA]
    assert marks(msg) == [3, None]
    assert msg.records[0].op == EventType.NEW


@given(st.lists(st.tuples(st.sampled_from(list(EventType)), st.integers(0, 5),
                          st.integers(0, 3)), max_size=60))  # fmt: skip
def test_records_path_sends_what_the_entry_path_sends(changes) -> None:
    """The live path (``update_records``, wire records from the kernel) and the entry path
    (``update``) put the same datagrams on the wire for any run of changes, including a
    DESTROY of something never held (an out-of-scope event) and NEW then DESTROY in one
    batch."""
    by_entry, by_record = Sender(CODEC, 1, 1, config=SMALL), Sender(CODEC, 1, 1, config=SMALL)
    a: list[Outgoing] = []
    for op, i, mark in changes:
        e = entry(i, mark)
        if op == EventType.DESTROY and e.key not in by_entry.state():
            continue  # the entry path's caller checks; the records path does it itself
        a += by_entry.update(Event(op, e), 0.0)
    b = by_record.update_records([(op, encode_upsert(entry(i, mark))) for op, i, mark in changes],
                                 0.0)  # fmt: skip
    a += by_entry.on_tick(1.0)
    b += by_record.on_tick(1.0)
    assert [o.data for o in a] == [o.data for o in b]
    assert by_entry.state() == by_record.state()


def test_sequence_wraps_on_the_wire() -> None:
    sender = Sender(CODEC, 1, 1, initial_seq=2**32 - 2)
    seqs = []
    for i in range(4):
        sender.update(entry(i), float(i))
        seqs += [m.seq for m in decode(sender.on_tick(i + 0.01)) if m.type == MsgType.DATA]
    assert seqs == [2**32 - 2, 2**32 - 1, 0, 1]


def test_alive_when_idle_carries_last_seq() -> None:
    sender = Sender(CODEC, 1, 1, initial_seq=41)
    assert decode(sender.start(0.0))[0].seq == 40
    sender.update(entry(0), 0.0)
    assert [m.type for m in decode(sender.on_tick(0.01))] == [MsgType.DATA]
    assert sender.on_tick(0.5) == []
    (alive,) = decode(sender.on_tick(1.01))
    assert (alive.type, alive.seq) == (MsgType.ALIVE, 41)


def _nack(sender: Sender, first: int, last: int, **kw) -> Message:
    fields = {"target_tag": sender.tag, "target_boot": sender.boot, "first": first, "last": last}
    return Message(MsgType.NACK, 2, 9, **{**fields, **kw})


def test_nack_resends_rebuilt_from_current_state() -> None:
    sender = Sender(CODEC, 1, 1)
    sender.update(entry(0, 1), 0.0)
    sender.update(entry(1, 1), 0.0)
    sender.on_tick(0.01)  # seq 0: key0@1 key1@1 (say it is lost)
    sender.update(entry(0, 2), 0.02)
    sender.update(Event(EventType.DESTROY, entry(1)), 0.02)
    sender.update(entry(2, 1), 0.02)  # pending, not flushed yet
    out = sender.on_message(_nack(sender, 0, 0), "R1", 0.03)
    msgs = decode(out)
    assert [m.seq for m in msgs] == [1, 0]  # the pending batch first, then the resend
    resend = msgs[1]
    assert resend.as_of == 2 and out[1].dest == "R1" and out[0].dest is None
    assert marks(resend) == [2, None]  # key0 as it is now, key1 destroyed: never stale


def test_nack_beyond_backlog_voids_and_resyncs() -> None:
    sender = Sender(CODEC, 1, 1, config=SenderConfig(mtu=200, backlog=2, resync_rate=1.0))
    for i in range(15):
        sender.update(entry(i), 0.0)  # 4 full datagrams (seq 0..3) and 3 records pending
    out = sender.on_message(_nack(sender, 0, 3), "R1", 0.1)
    msgs = decode(out)  # pending flushed first (seq 4): the backlog is now 3, 4
    begin = [m for m in msgs if m.type == MsgType.RESYNC_BEGIN]
    assert len(begin) == 2  # one to everybody, one with the void range to R1
    void = next(m for m in begin if m.void)
    assert (void.first, void.last, void.begin) == (0, 2, 5)
    assert [(m.seq, m.as_of) for m in msgs if m.type == MsgType.DATA] == [(4, None), (3, 5)]
    assert sender.resyncing and sender.counters["nack_void"] == 1
    # a request already covered by the running resync does not restart it
    req = Message(MsgType.RESYNC_REQUEST, 3, 9, target_tag=1, target_boot=1, first=5)
    assert sender.on_message(req, "R2", 0.2) == []
    # one from after its snapshot does, once resync_gap has passed since the last start
    sender.update(entry(20), 0.3)
    sender.on_tick(0.31)
    req = Message(MsgType.RESYNC_REQUEST, 3, 9, target_tag=1, target_boot=1, first=6)
    assert sender.on_message(req, "R2", 0.4) == [] and sender.counters["resync_deferred"] == 1
    started = [m for m in decode(sender.on_tick(1.2)) if m.type == MsgType.RESYNC_BEGIN]
    assert [m.begin for m in started] == [6] and sender.counters["resync_started"] == 2


def test_sender_ignores_what_is_not_its_business() -> None:
    sender = Sender(CODEC, 1, 1)
    sender.update(entry(0), 0.0)
    sender.on_tick(0.01)
    for msg in (
        _nack(sender, 0, 0, target_boot=2),  # an older boot of ours
        _nack(sender, 0, 0, target_tag=5),
        Message(MsgType.NACK, 2, 9, stream=3, target_tag=1, target_boot=1),
    ):
        assert sender.on_message(msg, "R", 1.0) == []
    assert sender.counters["not_for_me"] == 3
    assert sender.on_message(_nack(sender, 1, 5), "R", 1.0) == []  # never sent
    assert sender.on_message(_nack(sender, 0, SEQ_MOD - 1), "R", 1.0) == []  # backwards
    assert sender.counters["bad_nack"] == 2
    assert sender.on_message(Message(MsgType.ALIVE, 2, 9), "R", 1.0) == []
    assert sender.on_datagram(b"junk", "R", 1.0) == [] and sender.counters["truncated"] == 1


def test_scope_selects_a_guest_for_precopy() -> None:
    guest = ip_address("10.5.0.3")  # entry(2)
    sender = Sender(CODEC, 1, 1, stream=7, dest="D", scope=lambda e: guest in e.addresses())
    out = sender.update(entry(1), 0.0) + sender.update(entry(2), 0.0)
    out += sender.on_tick(0.01)
    assert {o.dest for o in out} == {"D"}
    (msg,) = [m for m in decode(out) if m.type == MsgType.DATA]
    assert msg.stream == 7 and [r.tuple_orig.src for r in msg.records] == [guest]
    moved = Entry(entry(2).tuple_orig, entry(2).tuple_reply)  # same key, same addresses
    assert sender.update(moved, 1.0) == [] and len(sender.state()) == 1
    node = Replicator(CODEC, Receiver(CODEC, 9, 9))
    rx_side = [node.on_datagram(o.data, "S", 0.1) for o in out]
    assert rx_side and dict(node.receiver.cache(1, 7)) == {entry(2).key: entry(2)}
    assert node.receiver.cache(1) == {}
    assert dict(node.receiver.forget(1, 7)) == {entry(2).key: entry(2)}
    assert node.receiver.senders() == [] and node.receiver.forget(1, 7) == {}


def test_unencodable_entries_are_counted_not_sent() -> None:
    sender = Sender(CODEC, 1, 1)
    assert (
        sender.update(
            Entry(Tuple.of("1.1.1.1", "2.2.2.2", 2), Tuple.of("2.2.2.2", "1.1.1.1", 2)), 0.0
        )
        == []
    )
    assert sender.counters["unencodable"] == 1 and not sender.state()


# --- receiver, alone -------------------------------------------------------------------------


class Feed:
    """A sender whose datagrams a test hands to one receiver in any order."""

    def __init__(self, rconf: ReceiverConfig | None = None, **kw) -> None:
        self.sender = Sender(CODEC, 1, kw.pop("boot", 100), config=SMALL, **kw)
        self.rx = Receiver(CODEC, 2, 200, config=rconf or ReceiverConfig())
        self.now = 0.0

    def data(self, *keys_marks: tuple[int, int]) -> bytes:
        """One DATA datagram carrying these (key, mark) upserts (mark < 0: destroy)."""
        for i, mark in keys_marks:
            e = entry(i, max(mark, 0))
            self.sender.update(Event(EventType.DESTROY, e) if mark < 0 else e, self.now)
        (out,) = [o for o in self.sender.on_tick(self.now + 1) if o.type == MsgType.DATA]
        self.now += 1
        return out.data

    def give(self, *datagrams: bytes) -> list[Message]:
        out: list[Outgoing] = []
        for data in datagrams:
            out += self.rx.on_datagram(data, "S", self.now)
        return decode(out)

    def marks(self) -> dict[int, int]:
        return {k[0].sport - 1024: e.mark for k, e in self.rx.cache(1).items()}


def test_applies_in_order_buffers_and_nacks_exact_gaps() -> None:
    f = Feed()
    d0, d1, d2, d3 = f.data((0, 1)), f.data((1, 1)), f.data((0, 2)), f.data((2, 1))
    f.give(d0)
    nacks = f.give(d3)
    assert [(m.type, m.first, m.last, m.target_tag, m.target_boot) for m in nacks] == [
        (MsgType.NACK, 1, 2, 1, 100)
    ]
    assert f.marks() == {0: 1}  # d3 waits for d1, d2
    assert f.give(d2) == [] and f.marks() == {0: 1}
    f.give(d1)
    assert f.marks() == {0: 2, 1: 1, 2: 1}
    f.give(d1, d3)
    assert f.rx.counters["old"] == 2
    f.give(f.data((5, 1)), d0)
    assert f.rx.counters["old"] == 3


def test_duplicate_inside_the_window_is_dropped() -> None:
    f = Feed()
    d0, _, d2 = f.data((0, 1)), f.data((1, 1)), f.data((2, 1))
    f.give(d0, d2, d2)
    assert f.rx.counters["duplicate"] == 1


def test_nack_retry_then_give_up_and_resync() -> None:
    f = Feed(ReceiverConfig(nack_retry=0.2, nack_retries=3))
    d0, _, d2 = f.data((0, 1)), f.data((1, 1)), f.data((2, 1))
    f.give(d0, d2)
    t = f.now
    assert f.rx.on_tick(t + 0.1) == []  # too early for a retry
    sent = [decode(f.rx.on_tick(t + n * 0.25)) for n in range(1, 5)]
    assert [[(m.type, m.first, m.last) for m in ms] for ms in sent[:3]] == [
        [(MsgType.NACK, 1, 1)]
    ] * 3
    assert [(m.type, m.first) for m in sent[3]] == [(MsgType.RESYNC_REQUEST, 3)]
    assert f.marks() == {0: 1, 2: 1} and f.rx.counters["gave_up"] == 1


def test_window_overrun_skips_and_asks_for_resync() -> None:
    f = Feed(ReceiverConfig(window=4))
    f.give(f.data((0, 1)))
    for i in range(5):
        f.data((1, i + 1))
    out = f.give(f.data((2, 1)))
    assert [(m.type, m.first) for m in out] == [(MsgType.RESYNC_REQUEST, 6)]
    assert f.rx.position(1) == 7 and f.rx.counters["overrun"] == 1


def test_stale_resend_never_overwrites_newer_state() -> None:
    """Key 0: mark 1 in seq 0, mark 2 in seq 1 (lost), mark 3 in seq 2 (held back). Key 1
    then changes to mark 5 (pending). The NACK for seq 1 flushes that (seq 3) and rebuilds
    seq 1 from the current table: marks 3 and 5, never the stale 2 and 1. The held-back
    original seq 2 (version 2 < as_of 4) cannot undo that; the late original seq 1 is old."""
    f = Feed()
    d0 = f.data((0, 1))
    d1 = f.data((0, 2), (1, 1))
    d2 = f.data((0, 3))
    f.sender.update(entry(1, 5), f.now)  # key 1 changes again, still pending
    out = f.sender.on_message(_nack(f.sender, 1, 1), "R", f.now)
    resend = next(o.data for o in out if o.dest == "R")
    assert marks(CODEC.decode(resend)) == [3, 5]
    assert CODEC.decode(resend).as_of == 4
    f.give(d0, resend)  # the resend fills seq 1: key 0 at 3, key 1 at 5
    assert f.marks() == {0: 3, 1: 5}
    f.give(d2)
    assert f.marks() == {0: 3, 1: 5} and f.rx.counters["superseded"] == 1
    f.give(d1)  # the delayed original seq 1: a duplicate now
    assert f.marks() == {0: 3, 1: 5} and f.rx.counters["old"] == 1


def test_versions_protect_against_older_originals_behind_a_resend() -> None:
    """Applied in seq order: resend(1) as_of 4 first, then original 2 (version 2) which
    carries an older state of a key the resend already moved ahead: superseded."""
    f = Feed()
    d0 = f.data((0, 1))
    f.data((1, 1))  # seq 1, lost
    d2 = f.data((1, 2))  # seq 2 (key 1 at 2), held back by the network
    f.data((1, 3))  # seq 3: key 1 at 3, lost too
    out = f.sender.on_message(_nack(f.sender, 1, 1), "R", f.now)
    resend = next(o.data for o in out if o.dest == "R")
    f.give(d0, resend)
    assert f.marks()[1] == 3
    f.give(d2)
    assert f.marks()[1] == 3 and f.rx.counters["superseded"] == 1
    # the tombstone case: destroyed after, the resend says gone, an older original says alive
    f2 = Feed()
    e0 = f2.data((0, 1))
    f2.data((1, 1))  # seq 1 lost
    e2 = f2.data((1, 2))  # seq 2 held back
    f2.data((1, -1))  # seq 3 destroys key 1, lost
    out = f2.sender.on_message(_nack(f2.sender, 1, 1), "R", f2.now)
    f2.give(e0, next(o.data for o in out if o.dest == "R"))
    f2.give(e2)
    assert 1 not in f2.marks()


def test_alive_reveals_a_lost_tail() -> None:
    f = Feed()
    f.give(f.data((0, 1)))
    f.data((1, 1))
    f.data((2, 1))
    alive = [o.data for o in f.sender.on_tick(f.now + 5) if o.type == MsgType.ALIVE]
    assert [(m.type, m.first, m.last) for m in f.give(*alive)] == [(MsgType.NACK, 1, 2)]


def test_void_skips_and_end_sweeps() -> None:
    f = Feed()
    f.give(f.data((0, 1), (1, 1)))
    # the sender sent up to seq 3, no longer has 1..3, and resyncs from seq 4
    begin = Message(MsgType.RESYNC_BEGIN, 1, 100, 3, begin=4, first=1, last=3, void=True)
    f.give(CODEC.encode(begin))
    assert f.rx.position(1) == 4 and f.rx.counters["void"] == 1
    f.sender._next = 4  # the sender's seq space moved on meanwhile (a test shortcut)
    f.give(f.data((0, 2)))  # seq 4: refreshed by the resync; key 1 gone at the sender
    end = Message(MsgType.RESYNC_END, 1, 100, 5, begin=4)
    f.give(CODEC.encode(end))
    assert f.marks() == {0: 2} and f.rx.counters["swept"] == 1
    # an END of a resync we only saw part of does not sweep
    f.sender._next = 6
    f.give(f.data((7, 1)))
    f.give(CODEC.encode(Message(MsgType.RESYNC_END, 1, 100, 7, begin=3)))
    assert f.marks() == {0: 2, 7: 1} and f.rx.counters["sweep_skipped"] == 1


def test_boot_ids_new_replayed_and_after_silence() -> None:
    f = Feed(boot=boot_id(1000, 5))
    f.give(f.data((0, 1)))
    hello = Message(MsgType.HELLO, 1, boot_id(1001, 9), 41)
    out = f.give(CODEC.encode(hello))
    assert [(m.type, m.target_boot, m.first) for m in out] == [
        (MsgType.RESYNC_REQUEST, boot_id(1001, 9), 42)
    ]
    assert f.rx.counters["new_boot"] == 1 and f.marks() == {0: 1}  # kept until the sweep
    # an old boot's datagram (a replay) is refused: retired
    assert f.give(f.data((0, 7))) == [] and f.rx.counters["stale_boot"] == 1
    assert f.marks() == {0: 1}
    # an older, never seen boot is refused, however long the current one has been silent
    older = CODEC.encode(Message(MsgType.ALIVE, 1, boot_id(999, 1), 3))
    assert f.give(older) == [] and f.rx.counters["stale_boot"] == 2
    f.now += 3600
    assert f.give(older) == [] and f.rx.counters["stale_boot"] == 3
    assert f.rx.boot_of(1) == boot_id(1001, 9) and f.rx.counters["new_boot"] == 1
    # ... also by the receiver's next life, handed what this one saw
    reborn = Receiver(CODEC, 2, 201, boots=f.rx.boots())
    assert reborn.on_datagram(f.data((0, 7)), "S", f.now) == []
    assert reborn.counters["stale_boot"] == 1 and reborn.senders() == []
    reborn.on_datagram(CODEC.encode(hello), "S", f.now)  # the newest is fine
    assert reborn.boot_of(1) == boot_id(1001, 9) and reborn.counters["stale_boot"] == 1


def test_fresh_sender_hello_needs_no_resync() -> None:
    f = Feed()
    assert f.give(*[o.data for o in f.sender.start(0.0)]) == []
    f.give(f.data((0, 1)))
    assert f.rx.counters["resync_requested"] == 0 and f.marks() == {0: 1}


def test_first_contact_mid_stream_asks_for_resync() -> None:
    f = Feed()
    f.data((0, 1))
    out = f.give(f.data((1, 1)))
    assert [(m.type, m.first) for m in out] == [(MsgType.RESYNC_REQUEST, 1)]


def test_followed_stream_nacks_a_lost_first_datagram_instead_of_resyncing() -> None:
    """A precopy stream announced out of band: even its first datagram lost is a plain gap,
    and the listener hears every change of the followed cache."""
    start = SEQ_MOD - 1  # wraps on the very next datagram
    sender = Sender(CODEC, 1, 100, stream=9, initial_seq=start, config=SMALL, dest="D")
    heard: list[Event] = []
    rx = Receiver(CODEC, 2, 200)
    rx.follow(1, 9, 100, start, "S", 0.0, heard.append)
    lost = sender.reconcile([entry(i) for i in range(5)], 0.0) + sender.flush(0.0)
    assert len(lost) == 2 and sender.flush(0.0) == []
    last = sender.last_seq % SEQ_MOD
    assert rx.expect(1, 9, start - 1, 0.1) == []  # nothing was sent before ``start``
    nacks = decode(rx.expect(1, 9, last, 0.1))
    assert [(m.type, m.first, m.last, m.stream) for m in nacks] == [
        (MsgType.NACK, start, last, 9)]  # fmt: skip
    for o in sender.on_message(nacks[0], "D", 0.1):
        rx.on_datagram(o.data, "S", 0.2)
    assert dict(rx.cache(1, 9)) == dict(sender.state())
    assert rx.position(1, 9) == start + 2 and rx.counters["resync_requested"] == 0
    assert [(ev.type, ev.entry) for ev in heard] == [(EventType.NEW, entry(i)) for i in range(5)]
    sender.update(Event(EventType.DESTROY, entry(0)), 1.0)
    for o in sender.flush(1.0):
        rx.on_datagram(o.data, "S", 1.0)
    assert heard[-1].type == EventType.DESTROY and len(rx.cache(1, 9)) == 4
    # the contrast: the same loss on a stream first met through its datagrams
    blind = Receiver(CODEC, 3, 300)
    assert blind.expect(1, 9, last, 0.1) == []
    fresh = Sender(CODEC, 1, 100, stream=9, initial_seq=start, config=SMALL)
    fresh.reconcile([entry(0)], 0.0)
    fresh.flush(0.0)  # lost
    fresh.update(entry(1), 0.0)
    (second,) = fresh.flush(0.0)
    assert [m.type for m in decode(blind.on_datagram(second.data, "S", 0.1))] == [
        MsgType.RESYNC_REQUEST]  # fmt: skip


def test_precopy_halves_carry_a_guest_through_loss() -> None:
    """PrecopySource on S, PrecopyFollower on D, a datagram lost each way: ``reach`` returns
    once D holds everything S flushed, and ``holds`` compares seqs across the wrap."""
    import asyncio

    from orchestrator.replicator.precopy import PrecopyFollower, PrecopySource

    clock = [0.0]
    sender = Sender(CODEC, 1, 100, stream=4, initial_seq=SEQ_MOD - 2, config=SMALL, dest="D")
    rx = Receiver(CODEC, 2, 200)
    to_d: list[Outgoing] = []
    src = PrecopySource(sender, to_d.extend, lambda: clock[0], lambda n: None)
    first = src.announce["seq"]
    rx.follow(1, 4, src.announce["boot"], first, "S", 0.0)
    closed: list[tuple[int, int]] = []

    def deliver(out: list[Outgoing]) -> None:  # D's NACKs reach S; S's answers reach D
        for o in out:
            for back in sender.on_datagram(o.data, "D", clock[0]):
                rx.on_datagram(back.data, "S", clock[0])

    follower = PrecopyFollower(rx, 1, 4, deliver, lambda: clock[0],
                               lambda t, s: closed.append((t, s)))  # fmt: skip
    src.put_snapshot([entry(i) for i in range(7)])
    last = src.flush()
    assert len(to_d) == 3 and not follower.holds(last)
    for o in to_d[1:]:  # the first datagram is lost; the gap's NACK is lost too
        assert [m.type for m in decode(rx.on_datagram(o.data, "S", 0.0))] in (
            [], [MsgType.NACK])  # fmt: skip
    asyncio.run(follower.reach(last, timeout=10.0))  # a bound, for a loaded machine
    assert follower.holds(last) and sorted(follower.entries(), key=str) == sorted(
        sender.state().values(), key=str)  # fmt: skip
    to_d.clear()
    src.put([Event(EventType.UPDATE, entry(3, mark=5)), Event(EventType.DESTROY, entry(6))])
    last = src.flush()
    assert (first, last) == (SEQ_MOD - 2, 1)  # four datagrams: the seqs wrapped past 2**32
    with pytest.raises(TimeoutError):  # the delta is lost and nobody answers NACKs
        asyncio.run(PrecopyFollower(rx, 1, 4, lambda out: None, lambda: 0.0,
                                    lambda t, s: None).reach(last, timeout=0.01))
    asyncio.run(follower.reach(last, timeout=10.0))  # a bound, for a loaded machine
    assert {e.key: e.mark for e in follower.entries()} == {
        entry(i).key: 5 if i == 3 else 0 for i in range(6)}  # fmt: skip
    follower.close()
    assert closed == [(1, 4)]


def test_silent_sender_is_not_pestered() -> None:
    f = Feed(ReceiverConfig(nack_retry=0.1, dead_after=3.0))
    d0, _, d2 = f.data((0, 1)), f.data((1, 1)), f.data((2, 1))
    f.give(d0, d2)
    assert f.rx.on_tick(f.now + 0.2) != []
    assert f.rx.on_tick(f.now + 10) == []


# --- security: dropped, counted, never applied ----------------------------------------------


def _tamper(data: bytes, at: int, value: int) -> bytes:
    import hashlib
    import hmac

    body = bytearray(data[:-16])
    body[at] = value
    return bytes(body) + hmac.new(KEY, bytes(body), hashlib.sha256).digest()[:16]


@pytest.mark.parametrize(
    ("make", "counter"),
    [
        (lambda d: Codec(b"w" * 32).encode(CODEC.decode(d)), "bad_hmac"),
        (lambda d: d[:-20], "bad_hmac"),
        (lambda d: d[:30], "truncated"),
        (lambda d: d + b"\0" * 2000, "oversized"),
        (lambda d: _tamper(d, 2, 2), "bad_version"),
        (lambda d: _tamper(d, 11, 9), "bad_length"),  # count 9
        (lambda d: _tamper(d, 11, 2), "record_bounds"),  # count 2, one record
        (lambda d: _tamper(d, 24, 7), "bad_record"),  # op 7
    ],
)
def test_bad_datagrams_are_counted_never_applied(make, counter: str) -> None:
    f = Feed()
    f.rx.codec = Codec(KEY, max_size=1500)
    f.give(f.data((0, 1)))
    bad = make(f.data((0, 2)))
    f.give(bad)
    assert f.rx.counters[counter] == 1, f.rx.counters
    assert f.marks() == {0: 1} and f.rx.position(1) == 1


def test_replayed_datagrams_are_counted_never_applied() -> None:
    f = Feed()
    d0, d1 = f.data((0, 1)), f.data((0, 2))
    f.give(d0, d1, f.data((0, 3)))
    f.give(d0, d1)
    assert f.marks() == {0: 3} and f.rx.counters["old"] == 2


def test_unknown_and_own_senders_are_dropped() -> None:
    rx = Receiver(CODEC, 2, 200, peers={1, 3})
    stranger = Sender(CODEC, 9, 9)
    stranger.update(entry(0), 0.0)
    for out in stranger.on_tick(1.0):
        rx.on_datagram(out.data, "X", 1.0)
    me = Sender(CODEC, 2, 200)
    me.update(entry(0), 0.0)
    for out in me.on_tick(1.0):
        rx.on_datagram(out.data, "me", 1.0)
    assert rx.counters["unknown_sender"] == 1 and rx.counters["own"] == 1
    assert rx.senders() == []


def test_replicator_dispatch() -> None:
    node = Replicator(CODEC, Receiver(CODEC, 1, 1), [Sender(CODEC, 1, 1)])
    with pytest.raises(ValueError):
        node.add_sender(Sender(CODEC, 1, 1))
    with pytest.raises(ValueError):
        node.add_sender(Sender(CODEC, 2, 1, stream=4))
    other = CODEC.encode(Message(MsgType.NACK, 3, 3, target_tag=5, target_boot=5))
    assert node.on_datagram(other, "R", 0.0) == []
    assert node.receiver.counters["not_for_me"] == 1
    assert node.on_datagram(b"\0" * 50, "R", 0.0) == []
    assert node.receiver.counters["bad_magic"] == 1
    assert node.remove_sender(0) is not None and node.remove_sender(0) is None


# --- the external cache ----------------------------------------------------------------------


def test_cache_view_is_keyed_by_entry_key() -> None:
    cache = ExternalCache()
    a, b = entry(0, 1), entry(1, 2, v6=True)
    for e in (a, b):
        cache.apply(Record.upsert(e), 1, 2)
    view = cache.entries
    assert view[a.key] == a and view.get(b.key) == b and len(view) == 2
    assert set(view) == {a.key, b.key} and set(cache) == set(view)
    assert sorted(e.mark for e in view.values()) == [1, 2]
    assert entry(2).key not in view and view.get(entry(2).key) is None
    odd = (Tuple.of("1.1.1.1", "2.2.2.2", 6), 1 << 20)  # a zone the wire cannot carry
    assert odd not in view
    with pytest.raises(KeyError):
        view[odd]


def test_cache_versions_tombstones_and_sweep() -> None:
    events: list[Event] = []
    cache = ExternalCache(events.append)
    a, b = entry(0, 1), entry(1, 1)
    assert cache.apply(Record.upsert(a), 5, 6) == Outcome.APPLIED
    assert cache.apply(Record.upsert(entry(0, 0)), 4, 6) == Outcome.SUPERSEDED
    assert cache.apply(Record.destroy(b.key), 9, 6) == Outcome.DESTROY_UNKNOWN  # tombstone @9
    assert cache.apply(Record.upsert(b), 8, 9) == Outcome.SUPERSEDED
    cache.prune(9)
    assert cache.apply(Record.upsert(b), 9, 10) == Outcome.APPLIED
    assert cache.sweep(9) == 1 and set(cache) == {b.key}
    cache.forget_versions()
    assert cache.apply(Record.upsert(entry(1, 2)), 0, 1) == Outcome.APPLIED
    assert [e.type for e in events] == [EventType.NEW, EventType.NEW, EventType.DESTROY,
                                        EventType.UPDATE]  # fmt: skip


def test_precopy_stream_numbers_go_round_and_skip_those_in_use() -> None:
    from orchestrator.config.schema import Topology
    from orchestrator.replicator.service import SyncError, SyncService

    nodes = [{"name": n, "tag": i, "mac_prefix": f"0a:00:0{i}", "pub_ip": f"192.168.122.1{i}",
              "guest_ip": f"10.5.5.25{i}", "pipes": ["pipe0"]} for i, n in ((1, "a"), (2, "b"))]
    t = Topology.model_validate({"cluster": {"guest_subnet": "10.5.5.0/24",
                                             "gateway": "10.5.5.254"}, "nodes": nodes})
    svc = SyncService(t, "a", KEY, state_path=False)
    first, second = svc.open_precopy("b"), svc.open_precopy("b")
    assert (first.number, second.number) == (1, 2)
    first.close()
    assert svc.open_precopy("b").number == 3  # a number just closed is not named again at once
    svc._last_stream = 0xFFFF  # the end of the range: round to the lowest free number
    assert svc.open_precopy("b").number == 1
    svc._precopy_sending.update(dict.fromkeys(range(1, 1 << 16), "b"))
    with pytest.raises(SyncError, match="every precopy stream number is in use"):
        svc.open_precopy("b")


# --- hostile but authenticated: replays and jumps cost nothing -------------------------------


def _node(tag: int, boot: int, *, addresses: dict[int, str] | None = None) -> Replicator:
    sender = Sender(CODEC, tag, boot, config=SMALL)
    for i in range(5):
        sender.update(entry(i), 0.0)
    sender.flush(0.0)
    return Replicator(CODEC, Receiver(CODEC, tag, boot), [sender], addresses)


def test_replayed_hello_and_resync_request_start_one_resync_at_most() -> None:
    node = _node(1, 100)
    hello = CODEC.encode(Message(MsgType.HELLO, 2, 200, 0))
    req = CODEC.encode(Message(MsgType.RESYNC_REQUEST, 2, 200, target_tag=1, target_boot=100,
                               first=0))  # fmt: skip
    node.on_datagram(hello, "n2", 0.0)  # n2 joined: it gets our table once
    sender = node.sender()
    assert sender.counters["resync_started"] == 1
    for k in range(20):  # captured and replayed, over minutes
        node.on_datagram(hello, "n2", 1.0 + 10 * k)
        node.on_datagram(req, "n2", 1.5 + 10 * k)
        node.on_tick(2.0 + 10 * k)
    assert sender.counters["resync_started"] == 1
    assert sender.counters["resync_covered"] == 20 and node.receiver.counters["new_boot"] == 0
    # a real new need (after the latest resync's snapshot) is served, once
    for _ in range(5):
        sender.update(entry(9, 1), 300.0)
        sender.flush(300.0)
    late = CODEC.encode(Message(MsgType.RESYNC_REQUEST, 2, 200, target_tag=1, target_boot=100,
                                first=sender.last_seq))  # fmt: skip
    for t in (301.0, 301.1, 301.2):
        node.on_datagram(late, "n2", t)
    assert sender.counters["resync_started"] == 2
    # one from the future is refused
    future = CODEC.encode(Message(MsgType.RESYNC_REQUEST, 2, 200, target_tag=1,
                                  target_boot=100, first=sender.last_seq + 1000))  # fmt: skip
    assert node.on_datagram(future, "n2", 400.0) == []
    assert sender.counters["bad_resync_request"] == 1 and sender.counters["resync_started"] == 2


def test_resyncs_are_rate_limited_and_one_covers_every_waiter() -> None:
    node = _node(1, 100)
    sender = node.sender()
    for tag in (2, 3, 4):  # three peers boot within a second, while we keep sending
        node.on_datagram(CODEC.encode(Message(MsgType.HELLO, tag, 200 + tag, 0)), "p", 0.1 * tag)
        sender.update(entry(10 + tag), 0.1 * tag)
        sender.flush(0.1 * tag)
    assert sender.counters["resync_started"] == 1 and sender.counters["resync_deferred"] == 2
    node.on_tick(0.9)
    assert sender.counters["resync_started"] == 1
    node.on_tick(1.3)  # the gap passed: one more, for both waiters
    node.on_tick(5.0)
    assert sender.counters["resync_started"] == 2


def test_a_seq_jump_no_sender_could_make_does_not_move_the_expectation() -> None:
    f = Feed()
    f.give(f.data((0, 1)), f.data((1, 1)))
    assert f.rx.position(1) == 2
    asked = f.rx.counters["resync_requested"]  # at first contact
    bogus = CODEC.encode(Message(MsgType.DATA, 1, 100, 2 + (1 << 30),
                                 records=(Record.upsert(entry(7, 7)),)))  # fmt: skip
    assert f.give(bogus) == [] and f.rx.counters["implausible"] == 1
    assert f.rx.position(1) == 2 and 7 not in f.marks()
    # the same for the seq an ALIVE, a void or an END names
    for msg in (Message(MsgType.ALIVE, 1, 100, 1 << 30),
                Message(MsgType.RESYNC_BEGIN, 1, 100, 2, begin=3, first=0, last=1 << 30,
                        void=True),
                Message(MsgType.RESYNC_END, 1, 100, 2, begin=1 << 30)):
        assert f.give(CODEC.encode(msg)) == []
    assert f.rx.counters["implausible"] == 4 and f.rx.position(1) == 2
    # the genuine stream goes on as if nothing happened: no skip, no resync
    f.give(f.data((2, 1)), f.data((3, 1)))
    assert f.rx.position(1) == 4 and f.marks() == {0: 1, 1: 1, 2: 1, 3: 1}
    assert f.rx.counters["skipped"] == 0 and f.rx.counters["resync_requested"] == asked
    # a receiver cut off for long enough does accept the genuine far jump (a plain overrun)
    f.sender._next += 50_000
    f.now += 60
    f.give(f.data((4, 1)))
    assert f.rx.counters["overrun"] == 1 and f.rx.position(1) == f.sender._next


def test_a_tag_speaks_only_from_its_address_and_is_answered_there() -> None:
    node = _node(1, 100, addresses={2: "n2-address"})
    other = Sender(CODEC, 2, 200, config=SMALL)
    other.update(entry(1), 0.0)
    (first,) = other.flush(0.0)
    other.update(entry(2), 0.0)
    other.flush(0.0)  # lost
    other.update(entry(3), 0.0)
    (third,) = other.flush(0.0)
    assert node.on_datagram(first.data, "stranger", 0.0) == []
    assert node.receiver.counters["wrong_source"] == 1 and node.receiver.senders() == []
    node.on_datagram(first.data, "n2-address", 0.0)
    nacks = node.on_datagram(third.data, "n2-address", 0.1)
    assert [(o.type, o.dest) for o in nacks] == [(MsgType.NACK, "n2-address")]
    # a NACK for our stream from the wrong address gets no resend
    nack = CODEC.encode(Message(MsgType.NACK, 2, 200, target_tag=1, target_boot=100,
                                first=0, last=0))  # fmt: skip
    assert node.on_datagram(nack, "stranger", 0.2) == []
    assert [o.dest for o in node.on_datagram(nack, "n2-address", 0.2)] == ["n2-address"]
