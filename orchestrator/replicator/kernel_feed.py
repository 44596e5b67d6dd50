"""The sender's input: one namespace's conntrack table, as a dump and then its events.

What is replicated (DESIGN §4 "Scope", ct_sync's ``cmarkbit``): entries whose ct mark has
the configured sync bit, and entries naming an address registered with ``track`` (guests
being migrated). The dump of marked entries is filtered by the kernel; events cannot be, so
they are filtered here. Subscribing comes before dumping, so nothing falls between them; an
event overrun (the kernel dropped events) is repaired by a fresh dump that the sender
reconciles with what it holds (``Sender.reconcile``: only differences go out).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from ipaddress import ip_address

from orchestrator.model.conntrack import Entry, Event, EventType, IPAddress
from orchestrator.netfilter.conntrack import AddressMatch, ConntrackTable, Overrun

from .kernel import KernelRecord, RecordStream
from .sender import Sender
from .wire import Outgoing, record_addresses, record_mark

Emit = Callable[[list[Outgoing]], None]
CHUNK = 2000  # entries fed to the sender between two yields to the loop


class Scope:
    """Which entries are ours to replicate: the mark bit, or a tracked address (counted:
    two migrations may track the same address)."""

    def __init__(self, mark_bit: int) -> None:
        self.mark_bit = mark_bit
        self._tracked: Counter[IPAddress] = Counter()
        self._match = AddressMatch(())
        self._packed: frozenset[bytes] = frozenset()

    def __call__(self, e: Entry) -> bool:
        return bool(e.mark & self.mark_bit) or (bool(self._match) and self._match(e))

    def wants_record(self, record: bytes) -> bool:
        """``__call__`` for an encoded NEW/UPDATE record (the live path: no objects)."""
        if record_mark(record) & self.mark_bit:
            return True
        packed = self._packed
        return bool(packed) and not packed.isdisjoint(record_addresses(record))

    @property
    def addresses(self) -> list[IPAddress]:
        return sorted(self._tracked, key=lambda a: (a.version, int(a)))

    def track(self, addresses: Iterable[str | IPAddress]) -> list[IPAddress]:
        """Add addresses; returns the ones that were not tracked before."""
        new = []
        for a in map(ip_address, addresses):
            if not self._tracked[a]:
                new.append(a)
            self._tracked[a] += 1
        self._retracked()
        return new

    def untrack(self, addresses: Iterable[str | IPAddress]) -> list[IPAddress]:
        """Drop one registration of each; returns the ones no longer tracked at all."""
        gone = []
        for a in map(ip_address, addresses):
            if self._tracked[a] <= 1:
                self._tracked.pop(a, None)
                gone.append(a)
            else:
                self._tracked[a] -= 1
        self._retracked()
        return gone

    def _retracked(self) -> None:
        self._match = AddressMatch(self._tracked)
        self._packed = frozenset(a.packed for a in self._tracked)


class ConntrackFeed:
    """Feeds ``sender`` from ``table``; what the sender answers goes to ``emit``."""

    def __init__(
        self, table: ConntrackTable, sender: Sender, scope: Scope, emit: Emit,
        clock: Callable[[], float],
    ) -> None:  # fmt: skip
        self.table, self.sender, self.scope = table, sender, scope
        self.counters: Counter[str] = Counter()
        self._emit, self._clock = emit, clock
        self._stream: RecordStream | None = None
        self._lock = asyncio.Lock()  # one dump-and-reconcile at a time

    async def start(self) -> None:
        """Subscribe, dump the scope, hand every entry to the sender."""
        bit = self.scope.mark_bit
        # subscribed before the dump: together they miss no change
        self._stream = await asyncio.to_thread(RecordStream, self.table.netns)
        marked = await asyncio.to_thread(self.table.dump, mark=bit, mark_mask=bit)
        tracked = self.scope.addresses
        if tracked:
            marked += await asyncio.to_thread(self.table.dump, tracked)
        self.counters["dumped"] += len(marked)
        await self._feed(marked)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def run(self) -> None:
        """The live part: every event batch, until cancelled."""
        assert self._stream is not None, "start() first"
        async for batch in self._stream.records():
            await self._on_batch(batch)

    async def track(self, addresses: Iterable[str | IPAddress]) -> int:
        """Start replicating entries naming ``addresses``; returns how many were found."""
        new = self.scope.track(addresses)
        if not new:
            return 0
        found = await asyncio.to_thread(self.table.dump, new)
        await self._feed(found)
        return len(found)

    async def untrack(self, addresses: Iterable[str | IPAddress]) -> int:
        """Stop replicating what only these addresses brought in (receivers drop it)."""
        gone = self.scope.untrack(addresses)
        if not gone:
            return 0
        match = AddressMatch(gone)
        state = self.sender.state()
        dropped = [e for e in state.values() if match(e) and not self.scope(e)]
        now = self._clock()
        for e in dropped:
            self._emit(self.sender.update(Event(EventType.DESTROY, e), now))
        return len(dropped)

    async def resync(self) -> None:
        """Lost events: the dump is the truth again; only differences go out."""
        async with self._lock:
            self.counters["resyncs"] += 1
            bit = self.scope.mark_bit
            entries = await asyncio.to_thread(self.table.dump, mark=bit, mark_mask=bit)
            tracked = self.scope.addresses
            if tracked:
                entries += await asyncio.to_thread(self.table.dump, tracked)
            self._emit(self.sender.reconcile(entries, self._clock()))

    # --- internals ----------------------------------------------------------------------------

    async def _feed(self, entries: Sequence[Entry]) -> None:
        for i in range(0, len(entries), CHUNK):
            now = self._clock()
            update = self.sender.update
            for e in entries[i : i + CHUNK]:
                self._emit(update(e, now))
            await asyncio.sleep(0)  # let received NACKs and ticks run

    async def _on_batch(self, batch: list[KernelRecord | Overrun]) -> None:
        wants = self.scope.wants_record
        changes: list[KernelRecord] = []
        unencodable = 0
        for item in batch:
            if isinstance(item, Overrun):
                self._send(changes)
                changes = []
                self.counters["overruns"] += 1
                await self.resync()
                continue
            op, record = item
            if not record:
                unencodable += 1
            elif op == EventType.DESTROY or wants(record):
                changes.append(item)
            else:  # left the scope (mark bit cleared): a DESTROY for receivers, if we held it
                changes.append((EventType.DESTROY, record))
        self._send(changes)
        self.counters["events"] += len(batch)
        if unencodable:
            self.counters["unencodable"] += unencodable
        await asyncio.sleep(0)

    def _send(self, changes: list[KernelRecord]) -> None:
        if changes:
            self._emit(self.sender.update_records(changes, self._clock()))


def close_quietly(feed: ConntrackFeed | None) -> None:
    if feed is not None:
        with contextlib.suppress(OSError):
            feed.close()
