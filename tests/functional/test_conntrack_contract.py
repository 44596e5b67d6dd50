"""Contract suite for the conntrack seam: every case runs against the in-memory
``FakeConntrack`` and against the kernel's table in a throwaway namespace, read through the
``Conntrack`` protocol alone, so the fake the unit tests use cannot drift from the kernel.

What is pinned is what the core relies on (the coordinator, the source side of a
handover, the failover commit): how an add meets what exists, which status and TCP bits a
write keeps, which filters a dump applies, which changes become which events.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from ipaddress import ip_address

import pytest

from orchestrator.model.conntrack import (
    Entry,
    Event,
    EventType,
    Key,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.netfilter.conntrack import OVERRUN, Conntrack, ConntrackTable, Events
from orchestrator.netfilter.conntrack.fake import FakeConntrack
from tests.entries import PUSHED, WSCALE, tcp, udp

LIB = TcpFlag.BE_LIBERAL
G, PEER = "10.5.5.2", "198.51.100.7"


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.root)])
def table(request: pytest.FixtureRequest, netns: Callable[[str], str]) -> Iterator[Conntrack]:
    if request.param == "fake":
        yield FakeConntrack()
        return
    with ConntrackTable(netns("cc")) as t:
        yield t


def keys(entries: Iterable[Entry]) -> set[Key]:
    return {e.key for e in entries}


def held(table: Conntrack, e: Entry) -> Entry:
    got = table.get(e)
    assert got is not None, f"{e} is not in the table"
    return got


def same_but_timeout(got: Entry, want: Entry) -> bool:
    """Equal, the kernel's timeout having ticked by a few seconds at most."""
    return want.timeout - 5 <= got.timeout <= want.timeout and replace(
        got, timeout=want.timeout) == want


def events_of(stream: Events) -> list[Event]:
    got = stream.read(timeout=1.0)
    assert OVERRUN not in got
    return got


# --- adds --------------------------------------------------------------------------------


def test_pushed_entries_read_back_as_pushed(table: Conntrack) -> None:
    pushed = [tcp(G, PEER, 40000, mark=7, timeout=250), udp(G, PEER, 5353, zone=5),
              tcp("2001:db8::2", "2001:db8:1::7", 40001, mark=3)]
    result = table.push(pushed)
    assert (result.created, result.updated, result.errors) == (3, 0, [])
    assert table.count() == 3
    back = {e.key: e for e in table.dump()}
    assert all(same_but_timeout(back[e.key], e) for e in pushed)
    assert all(same_but_timeout(held(table, e), e) for e in pushed)


def test_an_entry_is_found_by_its_reply_tuple_too(table: Conntrack) -> None:
    e = tcp(G, PEER, 40000)
    table.push([e])
    assert held(table, (e.tuple_reply, 0)).key == e.key
    assert table.get((e.tuple_reply, 5)) is None  # another zone


def test_an_add_needs_confirmed_and_drops_what_userspace_cannot_set(table: Conntrack) -> None:
    refused = [tcp(G, PEER, 1, status=Status.SEEN_REPLY | Status.ASSURED),
               tcp(G, PEER, 2, status=PUSHED | Status.EXPECTED),
               tcp(G, PEER, 3, status=PUSHED | Status.DYING)]
    natted = tcp(G, PEER, 4, status=PUSHED | Status.SRC_NAT | Status.SRC_NAT_DONE)
    result = table.push([*refused, natted])
    assert [(err.entry, err.errno) for err in result.errors] == [
        (e, errno.EBUSY) for e in refused]
    assert result.created == 1 and table.count() == 1
    assert held(table, natted).status == PUSHED


def test_push_snat_keeps_the_binding(table: Conntrack) -> None:
    """The failover commit: an SNAT entry created with its binding holds the NATed reply
    (to the dead node's address and port) and the SRC_NAT bits; the replies find it by that
    tuple; a second commit creates nothing and is no error."""
    e = tcp(G, PEER, 40000, dport=443, mark=1, status=PUSHED | Status.SRC_NAT)
    e = replace(e, tuple_reply=replace(e.tuple_reply, dst=ip_address("192.168.122.11"),
                                       dport=61000))
    result = table.push_snat([e, udp(G, PEER, 5353, status=Status.SEEN_REPLY)])
    assert result.created == 1 and [err.errno for err in result.errors] == [errno.EBUSY]
    got = held(table, e)
    assert got.tuple_reply == e.tuple_reply and got.mark == 1
    assert got.status & (Status.SRC_NAT | Status.SRC_NAT_DONE) == (Status.SRC_NAT
                                                                  | Status.SRC_NAT_DONE)
    assert held(table, (e.tuple_reply, 0)).key == e.key
    again = table.push_snat([e])
    assert (again.created, again.errors) == (0, [])
    assert table.count() == 1


def test_one_bad_entry_in_a_batch_is_reported_alone(table: Conntrack) -> None:
    batch = [tcp("10.6.0.1", f"10.7.{i // 250}.{i % 250}", 20000 + i) for i in range(600)]
    batch[300] = bad = replace(batch[300], status=Status.SEEN_REPLY)
    result = table.push(batch)
    assert result.created == 599 and [err.entry for err in result.errors] == [bad]
    assert table.count() == 599


def test_tcp_flags_are_written_whole_window_scales_only_with_window_scale(
        table: Conntrack) -> None:  # fmt: skip
    e = tcp(G, PEER, 40000)
    table.push([e])
    table.push([replace(e, tcp=TcpInfo(TcpState.FIN_WAIT, 3, 2, LIB, LIB))])
    assert held(table, e).tcp == TcpInfo(TcpState.FIN_WAIT, 7, 6, LIB, LIB)  # scales kept
    table.push([replace(e, tcp=TcpInfo(TcpState.ESTABLISHED, 3, 2, WSCALE, WSCALE))])
    assert held(table, e).tcp == TcpInfo(TcpState.ESTABLISHED, 3, 2, WSCALE, WSCALE)
    bare = tcp(G, PEER, 40001, tcp=TcpInfo(TcpState.ESTABLISHED, 7, 6))
    table.push([bare])
    assert held(table, bare).tcp == TcpInfo(TcpState.ESTABLISHED, 0, 0)


# --- an add meeting what exists ------------------------------------------------------------


def test_existing_entries_per_policy(table: Conntrack) -> None:
    first = tcp(G, PEER, 40000, mark=1, timeout=100)
    again = replace(first, mark=2, timeout=900)
    table.push([first])
    failed = table.push([again], policy="fail")
    assert [(err.entry, err.errno) for err in failed.errors] == [(again, errno.EEXIST)]
    assert held(table, first).mark == 1
    result = table.push([again], policy="update")
    assert (result.created, result.updated, result.errors) == (0, 1, [])
    assert same_but_timeout(held(table, first), again)


def test_update_keeps_direction_replace_turns_it(table: Conntrack) -> None:
    ours = tcp(G, PEER, 40000, mark=5)
    # D saw the flow from the other side first: its entry's orig is our reply tuple
    theirs = Entry(ours.tuple_reply, ours.tuple_orig, PUSHED, 0, 300, 0, ours.tcp)
    same_way = tcp(G, PEER, 40001)
    table.push([theirs, same_way])
    assert table.push([ours], policy="update").updated == 1
    assert keys(table.dump()) == {theirs.key, same_way.key}
    assert held(table, theirs).mark == 5
    result = table.push([ours, replace(same_way, mark=9)], policy="replace")
    assert (result.created, result.replaced, result.updated, result.errors) == (0, 1, 1, [])
    assert keys(table.dump()) == {ours.key, same_way.key}
    assert held(table, same_way).mark == 9


def test_an_update_whose_reply_tuple_is_held_elsewhere_is_eexist(table: Conntrack) -> None:
    x = tcp(G, PEER, 40000)
    y = Entry(Tuple.of("10.9.9.9", G, 6, 1, 2), x.tuple_orig, PUSHED, 0, 300, 0, x.tcp)
    table.push([x])
    result = table.push([y], policy="update")
    assert [(err.entry, err.errno) for err in result.errors] == [(y, errno.EEXIST)]
    result = table.push([y], policy="replace")
    assert (result.replaced, result.errors) == (1, []) and keys(table.dump()) == {y.key}


def test_a_duplicate_in_one_batch_updates_the_first(table: Conntrack) -> None:
    e = tcp(G, PEER, 40000)
    result = table.push([e, replace(e, mark=3)])
    assert (result.created, result.updated) == (1, 1) and held(table, e).mark == 3


def test_a_set_cannot_clear_what_only_sets(table: Conntrack) -> None:
    e = tcp(G, PEER, 40000)
    table.push([e])
    for status in (Status.SEEN_REPLY | Status.CONFIRMED, Status.SEEN_REPLY | Status.ASSURED):
        [err] = table.push([replace(e, status=status, mark=4)]).errors
        assert err.errno == errno.EBUSY
    assert held(table, e).mark == 0  # refused whole
    assert table.push([replace(e, status=PUSHED | Status.DST_NAT)]).updated == 1
    assert held(table, e).status == PUSHED  # NAT bits cannot be set by a write


def test_unknown_policy_is_refused(table: Conntrack) -> None:
    with pytest.raises(ValueError, match="policy"):
        table.push([tcp(G, PEER, 1)], policy="merge")  # type: ignore[arg-type]
    assert table.count() == 0


# --- changes by key ------------------------------------------------------------------------


def test_set_mark_set_liberal_delete(table: Conntrack) -> None:
    flows = [tcp(G, PEER, 41000 + i) for i in range(4)] + [udp(G, PEER, 5000)]
    table.push(flows)
    assert table.set_mark([e.key for e in flows[:2]], 0x42).done == 2
    assert [held(table, e).mark for e in flows] == [0x42, 0x42, 0, 0, 0]
    assert table.set_liberal(flows).done == 4  # the UDP entry is skipped
    lib = LIB | WSCALE
    assert all(held(table, e).tcp == replace(e.tcp, flags_orig=lib, flags_reply=lib)  # type: ignore[arg-type]
               for e in flows[:4])
    assert held(table, flows[4]).tcp is None
    assert table.delete(flows[:2]).done == 2 and table.count() == 3
    again = table.delete(flows[:2], missing_ok=False)
    assert [err.errno for err in again.errors] == [errno.ENOENT] * 2
    assert table.delete(flows[:2]).ok  # idempotent by default
    gone = table.set_mark(flows[:1], 1)
    assert [err.errno for err in gone.errors] == [errno.ENOENT]


def test_changes_by_reply_tuple_reach_the_entry(table: Conntrack) -> None:
    e = tcp(G, PEER, 40000)
    table.push([e])
    assert table.set_mark([(e.tuple_reply, 0)], 9).done == 1
    assert held(table, e).mark == 9
    assert table.delete([(e.tuple_reply, 0)], missing_ok=False).ok and table.count() == 0


def test_flush_all_or_by_mark(table: Conntrack) -> None:
    table.push([tcp(G, PEER, 42000 + i, mark=0x40000000 * (i % 2) | 1) for i in range(10)])
    table.flush(mark=0x40000000, mark_mask=0x40000000)
    assert table.count() == 5 and {e.mark for e in table.dump()} == {1}
    table.flush()
    assert table.count() == 0


# --- dumps -----------------------------------------------------------------------------------


def test_dump_filters(table: Conntrack) -> None:
    bit = 0x40000000
    entries = [tcp(f"10.60.0.{i % 4}", f"10.61.0.{i % 5}", 30000 + i, mark=(i % 3) | bit * (i % 2),
                   zone=(i % 2) * 5) for i in range(40)]  # fmt: skip
    snat_like = udp("10.60.0.9", "198.51.100.9", 4000)
    reply_only = replace(snat_like, tuple_reply=Tuple.of("198.51.100.9", "10.77.0.5", 17, 53, 4000))
    v6 = tcp("2001:db8::2", "2001:db8:1::7", 40001)
    table.push([*entries, reply_only, v6])
    every = table.dump()
    assert len(every) == 42

    def expect(pred: Callable[[Entry], bool]) -> set[Key]:
        return keys(e for e in every if pred(e))

    a = ip_address("10.60.0.3")
    assert keys(table.dump(addresses=["10.60.0.3"])) == expect(lambda e: a in e.addresses())
    assert keys(table.dump(addresses=["10.77.0.5"])) == {reply_only.key}  # reply only
    assert keys(table.dump(addresses=["10.60.0.3", "10.77.0.5"])) == expect(
        lambda e: a in e.addresses()) | {reply_only.key}
    assert keys(table.dump(mark=2)) == expect(lambda e: e.mark == 2)
    assert keys(table.dump(mark=bit, mark_mask=bit)) == expect(lambda e: bool(e.mark & bit))
    assert keys(table.dump(mark=0, mark_mask=1)) == expect(lambda e: e.mark & 1 == 0)
    assert keys(table.dump(zone=5)) == expect(lambda e: e.zone == 5)
    assert keys(table.dump(zone=0)) == expect(lambda e: e.zone == 0)
    assert keys(table.dump(family=socket.AF_INET6)) == {v6.key}
    assert keys(table.dump(addresses=["10.60.0.3"], mark=bit, mark_mask=bit)) == expect(
        lambda e: a in e.addresses() and bool(e.mark & bit))
    assert table.dump(addresses=["10.99.9.9"]) == []
    assert keys(table.dump(status=Status.ASSURED)) == keys(every)
    assert table.dump(status=Status.SRC_NAT) == []


# --- events ----------------------------------------------------------------------------------


def test_every_change_is_one_event(table: Conntrack) -> None:
    e, other = tcp(G, PEER, 43000), tcp("10.5.5.3", PEER, 43001)
    with table.events(addresses=[G]) as stream:  # type: ignore[attr-defined]
        table.push([e, other])
        table.set_mark([e], 9)
        table.set_mark([e], 9)  # changes nothing: still an event
        table.set_liberal([e])
        table.push([e])  # an update
        table.delete([e])
        table.delete([e])  # nothing to delete: no event
        got = events_of(stream)
    assert [ev.type for ev in got] == [EventType.NEW, EventType.UPDATE, EventType.UPDATE,
                                       EventType.UPDATE, EventType.UPDATE, EventType.DESTROY]
    assert all(ev.entry.key == e.key for ev in got)
    assert got[1].entry.mark == 9 and got[3].entry.tcp.flags_orig & LIB  # type: ignore[union-attr]
    assert got[4].entry.tcp == e.tcp and got[5].entry.status & Status.DYING


def test_a_replace_is_a_destroy_and_a_new(table: Conntrack) -> None:
    ours = tcp(G, PEER, 40000)
    theirs = Entry(ours.tuple_reply, ours.tuple_orig, PUSHED, 0, 300, 0, ours.tcp)
    with table.events() as stream:  # type: ignore[attr-defined]
        table.push([theirs])  # (an entry made while nobody listens may never report)
        assert [ev.type for ev in events_of(stream)] == [EventType.NEW]
        table.push([ours], policy="replace")
        got = events_of(stream)
    assert [(ev.type, ev.entry.key) for ev in got] == [(EventType.DESTROY, theirs.key),
                                                      (EventType.NEW, ours.key)]


def test_subscribe_and_dump_misses_nothing_for_a_guest(table: Conntrack) -> None:
    before = [tcp(G, PEER, 47000 + i) for i in range(5)]
    table.push([*before, tcp("10.5.5.3", PEER, 47100)])
    stream, entries = table.subscribe_and_dump(iter([G]))  # an iterator: used twice
    try:
        assert keys(entries) == keys(before)
        later = tcp(G, "198.51.100.8", 47200)
        table.push([later, tcp("10.5.5.3", "198.51.100.8", 47201)])
        got = events_of(stream)
    finally:
        stream.close()
    assert [(ev.type, ev.entry.key) for ev in got] == [(EventType.NEW, later.key)]


def test_a_stream_too_small_for_a_burst_overruns_and_a_dump_resyncs(table: Conntrack) -> None:
    burst = [udp("10.8.0.1", f"10.9.{i // 250}.{i % 250}", 44000 + i) for i in range(1500)]
    small = table.events(8192)
    try:
        table.push(burst)
        got: list[object] = []
        while chunk := small.read(timeout=0.2):
            got += chunk
    finally:
        small.close()
    assert OVERRUN in got and small.overruns >= 1
    assert len([ev for ev in got if ev is not OVERRUN]) < len(burst)
    assert keys(table.dump()) == keys(burst)


def test_wait_wakes_on_a_change_from_another_thread_and_is_cancel_safe(
        table: Conntrack) -> None:  # fmt: skip
    e = tcp(G, PEER, 48000)

    async def scenario() -> list[object]:
        stream = table.events(addresses=[G])
        try:
            waiting = asyncio.create_task(stream.wait())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            threading.Thread(target=table.push, args=([e],)).start()
            await asyncio.wait_for(waiting, 5)
            cancelled = asyncio.create_task(stream.wait())
            cancelled.cancel()  # a cancelled wait consumes nothing
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            return stream.take()
        finally:
            stream.close()

    got = asyncio.run(scenario())
    assert [(ev.type, ev.entry.key) for ev in got] == [(EventType.NEW, e.key)]  # type: ignore[union-attr]
