"""An in-memory conntrack table for unit tests: :class:`FakeConntrack` is a :class:`Conntrack`.

It keeps what the kernel keeps and answers as the kernel answers where the core depends on
it (measured on Linux 6.x, and held there by ``tests/functional/test_conntrack_contract.py``,
which runs every case against this fake and against a real namespace):

- an entry is found by either of its tuples (with the zone); an add whose orig or reply
  tuple is already held fails with EEXIST; ``set`` changes the entry found, direction kept;
- an add needs ``CONFIRMED`` and refuses ``EXPECTED``/``DYING`` (EBUSY); NAT and the other
  bits userspace cannot set are dropped; ``set`` cannot clear ``SEEN_REPLY``, ``ASSURED``
  or ``CONFIRMED`` (EBUSY);
- TCP flags are written whole (mask 0xff); window scales only when both directions carry
  ``WINDOW_SCALE`` after the write;
- every successful add, change and delete is an event (NEW, UPDATE, DESTROY), also a change
  that changes nothing; a DESTROY carries ``DYING``.

Not modelled: timeouts do not tick, entries never expire. For tests, ``track`` stands in
for traffic (entries with NAT bindings, which only the kernel's own tracking makes) and
``inject_overrun`` for a kernel that dropped events; a stream whose ``rcvbuf`` holds fewer
events than are pending overruns too (at ~640 bytes per event, as the kernel's skbs cost).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from types import TracebackType
from typing import Any, Final

from orchestrator.model.conntrack import (
    Entry,
    Event,
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

from .base import (
    ALL_MARK,
    OVERRUN,
    POLICIES,
    AddressMatch,
    BatchResult,
    Conntrack,
    EntryError,
    Overrun,
    Policy,
    PushResult,
    key_of,
)
from .sockets import EVENTS_RCVBUF

# what ctnetlink never lets userspace set (IPS_UNCHANGEABLE_MASK)
UNCHANGEABLE: Final = (
    Status.SRC_NAT | Status.DST_NAT | Status.SRC_NAT_DONE | Status.DST_NAT_DONE
    | Status.EXPECTED | Status.CONFIRMED | Status.DYING | Status.SEQ_ADJUST | Status.TEMPLATE
    | Status.UNTRACKED | Status.OFFLOAD | Status.HW_OFFLOAD
)
NO_STATUS: Final = Status(0)
EVENT_BYTES: Final = 640  # receive buffer one queued event costs
_ONLY_SET: Final = Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED  # cannot be cleared


class FakeConntrack:
    """One table in memory. Thread-safe: the core calls it through ``asyncio.to_thread``."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._lock = threading.RLock()
        self._entries: dict[Key, Entry] = {}
        self._by_tuple: dict[Key, Key] = {}  # (either tuple, zone) -> the entry's key
        self._streams: list[FakeEvents] = []
        self._next_id = 1
        self.calls: list[str] = []  # the operations asked for, in order (for tests)
        self.track(entries)

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeConntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the kernel's primitives -----------------------------------------------------------

    def _find(self, t: Tuple, zone: int) -> Key | None:
        return self._by_tuple.get((t, zone))

    def _store(self, e: Entry) -> None:
        self._entries[e.key] = e
        self._by_tuple[(e.tuple_orig, e.zone)] = e.key
        self._by_tuple[(e.tuple_reply, e.zone)] = e.key

    def push_snat(self, entries: Iterable[Entry]) -> PushResult:
        result = PushResult()
        with self._lock:
            self.calls.append("push_snat")
            for e in entries:
                err = self._create(e, nat=Status.SRC_NAT | Status.SRC_NAT_DONE)
                if err and err != errno.EEXIST:
                    result.errors.append(EntryError(e, err))
                elif not err:
                    result.created += 1
        return result

    def _create(self, e: Entry, nat: Status = NO_STATUS) -> int:
        if not e.status & Status.CONFIRMED or e.status & (Status.EXPECTED | Status.DYING):
            return errno.EBUSY
        if self._find(e.tuple_orig, e.zone) or self._find(e.tuple_reply, e.zone):
            return errno.EEXIST
        tcp = None
        if e.tuple_orig.proto == Proto.TCP:
            fresh = TcpInfo(TcpState.NONE)
            tcp = _written(fresh, e.tcp or fresh)
        status = (e.status & ~UNCHANGEABLE) | Status.CONFIRMED | nat
        stored = replace(e, status=status, tcp=tcp, id=self._next_id)
        self._next_id += 1
        self._store(stored)
        self._emit(EventType.NEW, stored)
        return 0

    def _set(self, e: Entry) -> int:
        """``set``: the entry holding ``e``'s orig tuple takes its status, timeout, mark and
        TCP state (its tuples stay)."""
        key = self._find(e.tuple_orig, e.zone)
        if key is None:
            return errno.ENOENT
        old = self._entries[key]
        if (old.status & _ONLY_SET) & ~e.status:
            return errno.EBUSY
        status = (old.status & UNCHANGEABLE) | (e.status & ~UNCHANGEABLE)
        tcp = old.tcp
        if old.tcp is not None and e.tcp is not None and e.tuple_orig.proto == Proto.TCP:
            tcp = _written(old.tcp, e.tcp)
        return self._change(key, replace(old, status=status, timeout=e.timeout, mark=e.mark,
                                         tcp=tcp))  # fmt: skip

    def _change(self, key: Key, new: Entry) -> int:
        self._entries[key] = new
        self._emit(EventType.UPDATE, new)
        return 0

    def _delete(self, t: Tuple, zone: int) -> int:
        key = self._find(t, zone)
        if key is None:
            return errno.ENOENT
        gone = self._entries.pop(key)
        del self._by_tuple[(gone.tuple_orig, gone.zone)]
        del self._by_tuple[(gone.tuple_reply, gone.zone)]
        self._emit(EventType.DESTROY, replace(gone, status=gone.status | Status.DYING))
        return 0

    def _emit(self, kind: EventType, e: Entry) -> None:
        for s in list(self._streams):
            s._offer(Event(kind, e))

    # --- Conntrack -------------------------------------------------------------------------

    def push(self, entries: Iterable[Entry], policy: Policy = "update") -> PushResult:
        if policy not in POLICIES:
            raise ValueError(f"unknown push policy {policy!r}")
        items = list(entries)
        result = PushResult()
        with self._lock:
            self.calls.append("push")
            exists = []
            for e in items:
                err = self._create(e)
                if err == errno.EEXIST:
                    exists.append(e)
                elif err:
                    result.errors.append(EntryError(e, err))
                else:
                    result.created += 1
            if policy == "fail":
                result.errors += [EntryError(e, errno.EEXIST) for e in exists]
            elif policy == "update":
                self._update(exists, result)
            else:
                self._replace(exists, result)
        return result

    def _update(self, entries: list[Entry], result: PushResult) -> None:
        for e in entries:
            err = self._set(e)
            if err:
                result.errors.append(EntryError(e, errno.EEXIST if err == errno.ENOENT else err))
            else:
                result.updated += 1

    def _replace(self, entries: list[Entry], result: PushResult) -> None:
        same, recreate = [], []
        for e in entries:
            holders = {k for t in (e.tuple_orig, e.tuple_reply) if (k := self._find(t, e.zone))}
            if holders == {e.key} and self._entries[e.key].tuple_reply == e.tuple_reply:
                same.append(e)
                continue
            for k in holders:
                self._delete(*k)
            recreate.append(e)
        for e in recreate:
            if err := self._create(e):
                result.errors.append(EntryError(e, err))
            else:
                result.replaced += 1
        self._update(same, result)

    def _batch(self, op: str, entries: Iterable[Entry | Key], change: Any,
               ignore: int = 0) -> BatchResult:  # fmt: skip
        given = list(entries)
        errors = []
        with self._lock:
            self.calls.append(op)
            for e in given:
                t, zone = key_of(e)
                err = change(t, zone)
                if err and err != ignore:
                    errors.append(EntryError(e, err))
        return BatchResult(len(given) - len(errors), errors)

    def set_mark(self, entries: Iterable[Entry | Key], mark: int) -> BatchResult:
        def change(t: Tuple, zone: int) -> int:
            key = self._find(t, zone)
            if key is None:
                return errno.ENOENT
            return self._change(key, replace(self._entries[key], mark=mark))

        return self._batch("set_mark", entries, change)

    def set_liberal(self, entries: Iterable[Entry | Key]) -> BatchResult:
        def change(t: Tuple, zone: int) -> int:
            key = self._find(t, zone)
            if key is None:
                return errno.ENOENT
            old = self._entries[key]
            tcp = old.tcp or TcpInfo()
            lib = replace(tcp, flags_orig=tcp.flags_orig | TcpFlag.BE_LIBERAL,
                          flags_reply=tcp.flags_reply | TcpFlag.BE_LIBERAL)  # fmt: skip
            return self._change(key, replace(old, tcp=lib))

        tcp = [e for e in entries if key_of(e)[0].proto == Proto.TCP]
        return self._batch("set_liberal", tcp, change)

    def delete(self, entries: Iterable[Entry | Key], missing_ok: bool = True) -> BatchResult:
        return self._batch("delete", entries, self._delete, errno.ENOENT if missing_ok else 0)

    def flush(self, mark: int | None = None, mark_mask: int = ALL_MARK) -> None:
        with self._lock:
            self.calls.append("flush")
            for e in list(self._entries.values()):
                if mark is None or e.mark & mark_mask == mark:
                    self._delete(e.tuple_orig, e.zone)

    def get(self, entry: Entry | Key) -> Entry | None:
        t, zone = key_of(entry)
        with self._lock:
            key = self._find(t, zone)
            return None if key is None else self._entries[key]

    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def dump(self, addresses: Iterable[str | IPAddress] = (), mark: int | None = None,
             mark_mask: int = ALL_MARK, status: int | None = None,
             status_mask: int | None = None, zone: int | None = None,
             family: int = 0) -> list[Entry]:  # fmt: skip
        match = AddressMatch(addresses)
        smask = (status or 0) if status_mask is None else status_mask
        version = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}.get(family)
        with self._lock:
            self.calls.append("dump")
            return [
                e for e in self._entries.values()
                if (not match or match(e))
                and (mark is None or e.mark & mark_mask == mark)
                and (status is None or e.status & smask == status)
                and (zone is None or e.zone == zone)
                and (version is None or e.tuple_orig.family == version)
            ]  # fmt: skip

    def events(self, rcvbuf: int = EVENTS_RCVBUF, groups: int = 0b111,
               addresses: Iterable[str | IPAddress] = ()) -> FakeEvents:  # fmt: skip
        del groups  # every kind of event, as the core subscribes
        with self._lock:
            stream = FakeEvents(self, rcvbuf, addresses)
            self._streams.append(stream)
            return stream

    def subscribe_and_dump(self, addresses: Iterable[str | IPAddress] = (), **filters: Any
                           ) -> tuple[FakeEvents, list[Entry]]:  # fmt: skip
        addrs = list(addresses)
        with self._lock:
            return self.events(addresses=addrs), self.dump(addrs, **filters)

    # --- for tests ----------------------------------------------------------------------------

    def track(self, entries: Iterable[Entry], reported: bool = True) -> None:
        """Entries as traffic made them (NAT bindings and all, which ``push`` cannot
        write), each a NEW event (``reported=False``: events the kernel dropped; pair it
        with ``inject_overrun``)."""
        with self._lock:
            for e in entries:
                if self._find(e.tuple_orig, e.zone) or self._find(e.tuple_reply, e.zone):
                    raise ValueError(f"{e}: a tuple of it is already tracked")
                e = replace(e, id=self._next_id)
                self._next_id += 1
                self._store(e)
                if reported:
                    self._emit(EventType.NEW, e)

    def inject_overrun(self) -> None:
        """As if the kernel had dropped events on every open stream."""
        with self._lock:
            for s in self._streams:
                s._overflow()

    def _unsubscribe(self, stream: FakeEvents) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)


def _written(old: TcpInfo, new: TcpInfo) -> TcpInfo:
    """``old`` after a write of ``new``'s state and flags (mask 0xff); the window scales only
    when both directions then carry WINDOW_SCALE."""
    ws = TcpFlag.WINDOW_SCALE
    scaled = bool(new.flags_orig & ws and new.flags_reply & ws)
    return TcpInfo(
        state=new.state,
        wscale_orig=new.wscale_orig if scaled else old.wscale_orig,
        wscale_reply=new.wscale_reply if scaled else old.wscale_reply,
        flags_orig=new.flags_orig,
        flags_reply=new.flags_reply,
    )


class FakeEvents:
    """A :class:`~.base.Events` stream of a :class:`FakeConntrack`."""

    def __init__(self, table: FakeConntrack, rcvbuf: int,
                 addresses: Iterable[str | IPAddress]) -> None:  # fmt: skip
        self._table = table
        self._capacity = max(1, rcvbuf // EVENT_BYTES)
        self._only = AddressMatch(addresses)
        self._pending: deque[Event | Overrun] = deque()
        self._queued = 0  # events pending (what fills the receive buffer)
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.received = 0
        self.overruns = 0
        self.closed = False

    # fed by the table, under its lock, from any thread
    def _offer(self, ev: Event) -> None:
        if self._only and not self._only(ev.entry):
            return
        with self._cond:
            if self._queued >= self._capacity:
                self._overflow()
                return
            self.received += 1
            self._queued += 1
            self._pending.append(ev)
            self._wake()

    def _overflow(self) -> None:
        with self._cond:
            if not self._pending or self._pending[-1] is not OVERRUN:
                self.overruns += 1
                self._pending.append(OVERRUN)
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        wakers, self._wakers = self._wakers, []
        for loop, fut in wakers:
            loop.call_soon_threadsafe(_resolve, fut)

    # Events
    async def wait(self) -> None:
        while True:
            with self._cond:
                if self._pending:
                    return
                fut = asyncio.get_running_loop().create_future()
                self._wakers.append((asyncio.get_running_loop(), fut))
            await fut

    def take(self) -> list[Event | Overrun]:
        with self._cond:
            out = list(self._pending)
            self._pending.clear()
            self._queued = 0
            return out

    def read(self, timeout: float | None = None, limit: int = 65536) -> list[Event | Overrun]:
        del limit
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
        return self.take()

    async def batches(self) -> AsyncIterator[list[Event | Overrun]]:
        while True:
            await self.wait()
            if batch := self.take():
                yield batch

    def __aiter__(self) -> AsyncIterator[Event | Overrun]:
        return self._each()

    async def _each(self) -> AsyncIterator[Event | Overrun]:
        async for batch in self.batches():
            for ev in batch:
                yield ev

    def close(self) -> None:
        self.closed = True
        self._table._unsubscribe(self)

    def __enter__(self) -> FakeEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> FakeEvents:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_held_to_the_protocol: type[Conntrack] = FakeConntrack  # checked by mypy
