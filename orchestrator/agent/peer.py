"""The authenticated channel between two agents: the destination asks the source for a
migrating guest's entries (DESIGN §2 precopy), over TCP.

The connection itself (frames, the handshake's session, its MACs) is a
:class:`~orchestrator.agent.peer_channel.PeerChannel`. Unauthenticated connections are
capped per source address and in total; a malformed or refused handshake gets an error
frame and a counter (``PeerServer.counters``), never a traceback.

With ``[sync] precopy = "replicator"`` the entries ride a precopy stream of the replicator
instead (``replicator.precopy``) and this channel keeps the control: D asks with
``via: sync``; S names the stream ({op: sync, stream, boot, seq}); D follows it and says
``go``; S's "dumped" and every barrier echo carry the last seq sent, which D waits to have
applied. A source without replication answers as if ``via`` was not asked.

A failback uses the same channel the other way round (``orchestrator/failover/handback``):
the home asks the holder of its address with ``handback``; the holder's ``handback``
callable owns the connection from there.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import tenacity

from orchestrator.agent.handshake import HandshakeError
from orchestrator.agent.peer_channel import (
    HANDSHAKE_TIMEOUT,
    PeerChannel,
    PeerError,
    open_channel,
    quiet,
)
from orchestrator.errors import ConvergentError
from orchestrator.migration.feed import FeedBatch, FeedLost, SourceFeed, SourceSide
from orchestrator.model.conntrack import Entry, Event, EventType
from orchestrator.replicator.precopy import PrecopyFollower, PrecopySource
from orchestrator.replicator.wire import Record

log = structlog.get_logger("convergent.peer")
UNAUTHENTICATED_PER_SOURCE = 4  # connections still in their handshake, per source address
UNAUTHENTICATED_TOTAL = 32


def _records(batch: FeedBatch) -> list[Record]:
    if batch.snapshot is not None:
        return [Record.upsert(e) for e in batch.snapshot]
    return [Record.upsert(ev.entry, ev.type) if ev.type != EventType.DESTROY
            else Record.destroy(ev.entry.key) for ev in batch.events]


# --- the source side ----------------------------------------------------------------

Authorize = Callable[[str, dict[str, Any]], Awaitable[SourceSide]]
OpenPrecopy = Callable[[str], PrecopySource | None]  # destination node -> stream, if replicating
# (peer, the forward frame, the channel): runs an operator's request another node forwarded
OnForward = Callable[[str, dict[str, Any], PeerChannel], Awaitable[None]]
ServeHandback = Callable[[str, PeerChannel], Awaitable[None]]  # (home node, its connection)


class _TcpCarrier:
    """The guest's entries as E frames on the channel itself."""

    def __init__(self, ch: PeerChannel) -> None:
        self.ch = ch

    def start(self, entries: list[Entry]) -> None:
        self.ch.queue_records([Record.upsert(e) for e in entries])
        self.ch.queue({"op": "dumped"})

    def put(self, batch: FeedBatch) -> None:
        _queue_batch(self.ch, batch)

    def mark(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class _SyncCarrier:
    """The guest's entries on a replicator precopy stream; "dumped" and barrier echoes say
    up to which seq D must have applied."""

    def __init__(self, ch: PeerChannel, stream: PrecopySource) -> None:
        self.ch, self.stream = ch, stream

    def start(self, entries: list[Entry]) -> None:
        self.stream.put_snapshot(entries)
        self.ch.queue({"op": "dumped", **self.mark()})

    def put(self, batch: FeedBatch) -> None:
        if batch.snapshot is not None:
            self.stream.put_snapshot(batch.snapshot)  # only the differences go out
        else:
            self.stream.put(batch.events)
        self.stream.flush()

    def mark(self) -> dict[str, Any]:
        return {"seq": self.stream.flush()}

    def close(self) -> None:
        self.stream.close()


_Carrier = _TcpCarrier | _SyncCarrier


class PeerServer:
    """On every agent: serves ``stream`` requests from destination agents.

    ``authorize(peer, request)`` checks the request against the store (an active migration
    of that guest from this node to that peer) and returns the SourceSide to stream."""

    def __init__(self, me: str, key: bytes, authorize: Authorize,
                 on_released: Callable[[], None],
                 failpoint: Callable[[str], Awaitable[None]] | None = None,
                 open_precopy: OpenPrecopy | None = None,
                 addresses: dict[str, str] | None = None,
                 on_forward: OnForward | None = None,
                 handback: ServeHandback | None = None) -> None:
        self.me, self.key = me, key
        self.on_forward = on_forward  # requests other agents forward (forward.py)
        self.forwarded = 0
        self.addresses = addresses  # node -> the address its agent connects from
        self.counters: Counter[str] = Counter()  # refusals by reason
        self._unauthenticated: Counter[str] = Counter()  # per source address
        self.failpoint = failpoint
        self.open_precopy = open_precopy
        self.authorize = authorize
        self.on_released = on_released
        self.handback = handback
        self.server: asyncio.AbstractServer | None = None
        self.streams = 0
        self.refused = 0
        self.serving: dict[str, set[asyncio.Task[Any]]] = {}  # migration id -> connections

    async def start(self, host: str, port: int) -> None:
        try:
            self.server = await asyncio.start_server(self._serve, host, port,
                                                     reuse_address=True)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise PeerError(f"peer channel: cannot listen on {host}:{port}: {why}") from None

    def _serving(self, migration: str) -> set[asyncio.Task[Any]]:
        conns = self.serving.setdefault(migration, set())
        task = asyncio.current_task()
        if task is not None:
            conns.add(task)
        return conns

    def _done_serving(self, conns: set[asyncio.Task[Any]]) -> None:
        task = asyncio.current_task()
        if task is not None:
            conns.discard(task)
        for mid, c in list(self.serving.items()):
            if not c:
                del self.serving[mid]

    def end_migration(self, migration: str) -> int:
        """The source closes its part: end every stream still serving ``migration``."""
        conns = self.serving.pop(migration, set())
        for task in conns:
            task.cancel()
        return len(conns)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = PeerChannel(reader, writer, self.key, b"S")
        peer = await self._authenticate(ch)
        if peer is None:
            return
        side: SourceSide | None = None
        carrier: _Carrier | None = None
        pump: asyncio.Task[None] | None = None
        serving: set[asyncio.Task[Any]] | None = None
        lock = asyncio.Lock()
        try:
            while True:
                req = await ch.recv()
                if not isinstance(req, dict):
                    raise PeerError(f"peer {peer}: entries sent to the source")
                op = req.get("op")
                if op == "stream" and side is None:
                    side = await self.authorize(peer, req)
                    serving = self._serving(str(req.get("migration")))
                    self.streams += 1
                    carrier = await self._carrier(ch, peer, req)
                    carrier.start(await side.open())
                    await ch.flush()
                    pump = asyncio.create_task(_pump(ch, side, carrier, lock))
                elif op == "barrier" and side is not None and carrier is not None:
                    if self.failpoint is not None:
                        await self.failpoint("source.barrier")
                    async with lock:  # the pump is waiting, not sending
                        for batch in await side.drain():
                            carrier.put(batch)
                        ch.queue({"op": "barrier", "n": req.get("n"), **carrier.mark()})
                    await ch.flush()
                elif op == "released":
                    self.on_released()
                elif op == "forward" and side is None and self.on_forward is not None:
                    self.forwarded += 1
                    await self.on_forward(peer, req, ch)
                    break  # one request per connection
                elif op == "handback" and side is None and self.handback is not None:
                    await self.handback(peer, ch)
                    break  # the failback owns the connection
                else:
                    raise PeerError(f"peer {peer}: unexpected {op!r}")
        except (FeedLost, OSError, ValueError, KeyError, TypeError) as exc:
            # a peer gone (TimeoutError is an OSError), or an authenticated one that sent
            # something malformed: this connection ends, the agent carries on
            log.info("peer.closed", peer=ch.peer, reason=str(exc) or type(exc).__name__)
        except ConvergentError as exc:
            self.refused += 1
            self.counters["refused"] += 1
            log.warning("peer.refused", peer=ch.peer, error=str(exc))
            with quiet():
                await ch.send({"op": "error", "error": str(exc)})
        except asyncio.CancelledError:
            log.info("peer.ended", peer=ch.peer, reason="the source closed the migration")
        finally:
            if serving is not None:
                self._done_serving(serving)
            if pump is not None:
                async with lock:
                    pump.cancel()
                with quiet():
                    await pump
            if side is not None:
                side.close()
            if carrier is not None:
                carrier.close()
            ch.close()

    async def _authenticate(self, ch: PeerChannel) -> str | None:
        """The peer's node name, or None: refused with an error frame and a counter."""
        source = str((ch.writer.get_extra_info("peername") or ("?",))[0])
        pending = self._unauthenticated
        if (pending[source] >= UNAUTHENTICATED_PER_SOURCE
                or sum(pending.values()) >= UNAUTHENTICATED_TOTAL):
            self.counters["too_many_unauthenticated"] += 1
            ch.close()
            return None
        pending[source] += 1
        try:
            return await asyncio.wait_for(ch.accept_as(self.me, source, self.addresses),
                                          HANDSHAKE_TIMEOUT)
        except HandshakeError as exc:
            self._refuse_handshake(exc.reason, str(exc), source)
            await ch.refuse(str(exc))
        except TimeoutError:
            self._refuse_handshake("handshake_timeout", "handshake timed out", source)
        except (FeedLost, OSError):
            self.counters["handshake_closed"] += 1
        finally:
            pending[source] -= 1
            if not pending[source]:
                del pending[source]
        ch.close()
        return None

    def _refuse_handshake(self, reason: str, message: str, source: str) -> None:
        self.refused += 1
        self.counters[reason] += 1
        log.warning("peer.handshake_refused", source=source, reason=reason, error=message)

    async def _carrier(self, ch: PeerChannel, peer: str, req: dict[str, Any]) -> _Carrier:
        """A precopy stream if D asked for one and we replicate; else the channel itself."""
        stream = self.open_precopy(peer) if req.get("via") == "sync" and self.open_precopy \
            else None
        if stream is None:
            return _TcpCarrier(ch)
        carrier = _SyncCarrier(ch, stream)
        try:
            await ch.send({"op": "sync", **stream.announce})
            go = await ch.recv()
            if not isinstance(go, dict) or go.get("op") != "go":
                raise PeerError(f"peer {peer}: expected go, got {go!r}")
        except BaseException:
            carrier.close()
            raise
        return carrier


async def _pump(ch: PeerChannel, side: SourceSide, carrier: _Carrier, lock: asyncio.Lock) -> None:
    """S's events for the guest, forwarded as they happen."""
    while True:
        await side.wait()
        async with lock:
            for batch in await side.take():
                carrier.put(batch)
        await ch.flush()


def _queue_batch(ch: PeerChannel, batch: FeedBatch) -> None:
    if batch.snapshot is not None:
        ch.queue({"op": "snapshot"})
        ch.queue_records(_records(batch))
        ch.queue({"op": "dumped"})
    else:
        ch.queue_records(_records(batch))


# --- the destination side ------------------------------------------------------------


FollowPrecopy = Callable[[int, int, int, Callable[[Event], None]], PrecopyFollower]
# (stream, boot, first seq, listener) -> the receiver following S's precopy stream


class PeerFeed(SourceFeed):
    """The coordinator's view of a source agent's SourceSide. One reader task turns frames
    into whole batches (a snapshot only once its end arrived) and barrier echoes."""

    def __init__(self, me: str, key: bytes, host: str, port: int, request: dict[str, Any],
                 retry_s: float, follow: FollowPrecopy | None = None) -> None:
        self.me, self.key = me, key
        self.host, self.port = host, port
        self.request = request
        self.retry_s = retry_s
        self.follow = follow  # set: ask for the entries on a replicator precopy stream
        self.follower: PrecopyFollower | None = None
        self.following = False  # the first dump is applied: changes now go to ``ready``
        self.ch: PeerChannel | None = None
        self.reader: asyncio.Task[None] | None = None
        self.ready: list[FeedBatch] = []
        self.arrived = asyncio.Event()
        self.lost: Exception | None = None
        self.barriers = 0
        self.echoed = 0
        self.echo_seq: int | None = None  # the last seq S sent before its barrier echo

    async def _connect(self) -> PeerChannel:
        """Connect and authenticate, retrying a source agent that is (re)starting for up to
        ``retry_s`` (backing off 0.05 s to 0.5 s); then FeedLost."""
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type((OSError, FeedLost)),
            stop=tenacity.stop_before_delay(self.retry_s),
            wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
        )
        try:
            ch: PeerChannel = await retrying(self._connect_once)
        except tenacity.RetryError as exc:
            raise FeedLost(f"source agent {self.host}:{self.port} unreachable for "
                           f"{self.retry_s:g} s: {exc.last_attempt.exception()}") from None
        return ch

    async def _connect_once(self) -> PeerChannel:
        return await open_channel(self.host, self.port, self.key, self.me)

    async def open(self) -> list[Entry]:
        self.ch = await self._connect()
        via = {"via": "sync"} if self.follow is not None else {}
        await self.ch.send({"op": "stream", **self.request, **via})
        first = await self.ch.recv()
        if isinstance(first, dict) and first.get("op") == "sync":
            entries = await self._open_stream(first)
        else:
            entries = await self._until_dumped(first)
        self.reader = asyncio.create_task(self._read())
        return entries

    async def _until_dumped(self, msg: dict[str, Any] | list[Record] | None = None
                            ) -> list[Entry]:  # fmt: skip
        assert self.ch is not None
        out: list[Entry] = []
        while True:
            if msg is None:
                msg = await self.ch.recv()
            if isinstance(msg, list):
                out += [r.entry for r in msg if r.entry is not None]
            elif msg.get("op") == "dumped":
                return out
            elif msg.get("op") == "error":
                raise PeerError(f"source refused: {msg.get('error')}")
            msg = None

    async def _open_stream(self, announce: dict[str, Any]) -> list[Entry]:
        """Follow S's precopy stream, say go, wait until its first dump is applied."""
        assert self.ch is not None and self.follow is not None
        self.follower = self.follow(int(announce["stream"]), int(announce["boot"]),
                                    int(announce["seq"]), self._on_change)  # fmt: skip
        await self.ch.send({"op": "go"})
        dumped = await self.ch.recv()
        if not isinstance(dumped, dict) or dumped.get("op") != "dumped":
            await self._until_dumped(dumped)  # raises on an error reply
            raise PeerError("source sent entries on the channel after naming a stream")
        await self._reach(int(dumped["seq"]))
        self.following = True
        return self.follower.entries()

    def _on_change(self, ev: Event) -> None:
        """The precopy stream changed D's copy of S's entries (after the first dump)."""
        if not self.following:
            return  # part of the first dump, which ``open`` returns whole
        if self.ready and self.ready[-1].snapshot is None:
            self.ready[-1].events.append(ev)
        else:
            self.ready.append(FeedBatch(events=[ev]))
        self.arrived.set()

    async def _reach(self, seq: int) -> None:
        assert self.follower is not None
        try:
            await self.follower.reach(seq, self.retry_s, lambda: self.lost is not None)
        except TimeoutError as exc:
            raise FeedLost(str(self.lost or exc)) from None

    async def _read(self) -> None:
        assert self.ch is not None
        try:
            while True:
                msg = await self.ch.recv()
                if isinstance(msg, list):
                    self.ready.append(FeedBatch(events=[_event(r) for r in msg]))
                elif msg.get("op") == "snapshot":
                    self.ready.append(FeedBatch(snapshot=await self._until_dumped()))
                elif msg.get("op") == "barrier":
                    self.echoed = int(msg.get("n") or 0)
                    self.echo_seq = msg.get("seq")
                elif msg.get("op") == "error":
                    raise FeedLost(f"source: {msg.get('error')}")
                self.arrived.set()
        except (FeedLost, PeerError, ValueError) as exc:
            self.lost = exc
            self.arrived.set()

    async def wait(self) -> None:
        while not self.ready:
            if self.lost is not None:
                raise FeedLost(str(self.lost))
            self.arrived.clear()
            await self.arrived.wait()

    async def take(self) -> list[FeedBatch]:
        out, self.ready = self.ready, []
        return out

    async def drain(self) -> list[FeedBatch]:
        """Barrier: S flushes every event it has seen, then echoes the barrier."""
        assert self.ch is not None
        self.barriers += 1
        await self.ch.send({"op": "barrier", "n": self.barriers})
        while self.echoed < self.barriers:
            if self.lost is not None:
                raise FeedLost(str(self.lost))
            self.arrived.clear()
            await self.arrived.wait()
        if self.follower is not None and self.echo_seq is not None:
            await self._reach(int(self.echo_seq))  # the delta rode the stream: applied yet?
        return await self.take()

    async def close(self, released: bool = False) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with quiet():
                await self.reader
            self.reader = None
        if self.follower is not None:
            self.follower.close()
            self.follower = None
        if self.ch is None:
            return
        if released:
            with quiet():
                await self.ch.send({"op": "released"})
        self.ch.close()
        self.ch = None


def _event(r: Record) -> Event:
    if r.entry is not None:
        return Event(r.op, r.entry)
    # a DESTROY carries only the key; the coordinator needs just the orig tuple and zone
    return Event(EventType.DESTROY, Entry(r.tuple_orig, r.tuple_orig.reversed(), zone=r.zone))
