"""How a guest's entries flow from the source's kernel to the destination's coordinator.

The coordinator on D only sees a :class:`SourceFeed`: an initial snapshot, then batches of
changes, then a drain up to "now". :class:`SourceSide` is the part that runs where S's
kernel is (subscribe before dumping, make S's entries liberal, turn an event overrun into a
fresh snapshot). :class:`LocalFeed` is SourceSide used in-process (lab, benchmarks); the
agents carry the same batches over their authenticated peer channel
(``orchestrator.agent.peer``), and the replicator can carry them the same way.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import ConvergentError
from orchestrator.handover.planner import SourceKind, plan_source
from orchestrator.model.conntrack import Entry, Event, EventType
from orchestrator.netfilter.conntrack import Conntrack, Events, Overrun


@dataclass
class FeedBatch:
    """Live changes, or (``snapshot`` set) the whole truth again after a loss or reconnect."""

    events: list[Event] = field(default_factory=list)
    snapshot: list[Entry] | None = None


class FeedLost(ConvergentError):
    """The source cannot be reached any more (its agent is gone past the retry budget)."""


class SourceFeed(abc.ABC):
    """Consumed by one follower: ``wait`` (cancel-safe, consumes nothing) then ``take``.
    The coordinator only cancels the follower while it waits, so no batch is ever lost
    between the feed and D's kernel."""

    @abc.abstractmethod
    async def open(self) -> list[Entry]:
        """Subscribe on S, then dump G's entries there: nothing changes unseen from here."""

    @abc.abstractmethod
    async def wait(self) -> None:
        """Until ``take`` has something (raises FeedLost if S went away)."""

    @abc.abstractmethod
    async def take(self) -> list[FeedBatch]:
        """What S has reported so far, without waiting for more."""

    @abc.abstractmethod
    async def drain(self) -> list[FeedBatch]:
        """Every change S has seen until now (the cutover's final delta)."""

    @abc.abstractmethod
    async def close(self, released: bool = False) -> None:
        """Stop; ``released``: D owns the guest now, so S should reconcile at once."""


class SourceSide:
    """The source's half: runs next to S's conntrack table."""

    def __init__(self, table: Conntrack, topology: Topology, guest: str | Guest, src: str,
                 dst: str, addresses: Iterable[IPv4Address]) -> None:
        self.table = table
        self.topology = topology
        self.guest, self.src, self.dst = guest, src, dst
        self.addresses = list(addresses)
        self.stream: Events | None = None
        self.seen: dict[object, tuple[object, ...]] = {}  # key -> what D needs of it

    async def open(self) -> list[Entry]:
        self.stream, entries = await asyncio.to_thread(
            self.table.subscribe_and_dump, addresses=self.addresses)
        self.seen = {e.key: _shape(e) for e in entries}
        await self.make_liberal(entries)
        return entries

    async def make_liberal(self, entries: list[Entry]) -> None:
        """S stays on the return path of G's SNAT flows; its tracker must not judge the
        segments it now sees only half of (FACTS: without it the SNAT flow dies)."""
        if not entries:
            return
        actions = plan_source(entries, self.topology, self.guest)
        liberal = [a.origin for a in actions if a.kind is SourceKind.MAKE_LIBERAL]
        if liberal:
            await asyncio.to_thread(self.table.set_liberal, liberal)

    async def wait(self) -> None:
        assert self.stream is not None, "open() first"
        await self.stream.wait()

    async def take(self) -> list[FeedBatch]:
        """Pending events as a batch (not cancel-safe: call it where nobody cancels)."""
        if self.stream is None:
            return []
        raw = self.stream.take()
        return [await self._convert(raw)] if raw else []

    async def drain(self) -> list[FeedBatch]:
        if self.stream is None:
            return []
        raw = self.stream.take() + await asyncio.to_thread(self.stream.read, 0.0)
        return [await self._convert(raw)] if raw else []

    async def _convert(self, raw: list[Event | Overrun]) -> FeedBatch:
        if any(isinstance(e, Overrun) for e in raw):
            # events were lost: the dump is the truth again
            entries = await asyncio.to_thread(self.table.dump, addresses=self.addresses)
            await self.make_liberal(entries)
            return FeedBatch(snapshot=entries)
        events = [e for e in raw if isinstance(e, Event) and self._news(e)]
        await self.make_liberal([e.entry for e in events if e.type != EventType.DESTROY])
        return FeedBatch(events=events)

    def _news(self, ev: Event) -> bool:
        """False for an UPDATE that changes nothing D keeps: above all the echo of our own
        ``make_liberal`` (one UPDATE per entry, which would re-plan every entry again)."""
        if ev.type == EventType.DESTROY:
            self.seen.pop(ev.entry.key, None)
            return True
        shape = _shape(ev.entry)
        if self.seen.get(ev.entry.key) == shape:
            return False
        self.seen[ev.entry.key] = shape
        return True

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def _shape(e: Entry) -> tuple[object, ...]:
    """What the handover copies, less the TCP flags S sets on itself and the timeout."""
    tcp = (e.tcp.state, e.tcp.wscale_orig, e.tcp.wscale_reply) if e.tcp else None
    return (e.tuple_reply, int(e.status), e.mark, e.zone, tcp)


class LocalFeed(SourceFeed):
    """SourceSide in the coordinator's own process (both kernels reachable from here)."""

    def __init__(self, side: SourceSide) -> None:
        self.side = side

    async def open(self) -> list[Entry]:
        return await self.side.open()

    async def wait(self) -> None:
        await self.side.wait()

    async def take(self) -> list[FeedBatch]:
        return await self.side.take()

    async def drain(self) -> list[FeedBatch]:
        return await self.side.drain()

    async def close(self, released: bool = False) -> None:
        self.side.close()
