"""``SyncService``: the replicator's I/O runtime on one node, around the pure core.

It owns one channel (``channel``), one ``Replicator`` (the receiver of every other node and
this node's sender, stream 0), the clock (``loop.time``), a ticker (flush deadlines, ALIVE,
NACK retries, resync pacing) and the conntrack feed (``feed``: entries with the sync mark
bit or naming a tracked address). The agent calls::

    svc = SyncService(topology, "node1", key, netns=None)
    await svc.start(); svc.status(); svc.cache("node2"); await svc.commit("node2")
    await svc.track(addresses); await svc.untrack(addresses); await svc.stop()

Nothing here logs on the hot path: every drop is a counter in ``status()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import structlog

from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError
from orchestrator.model.conntrack import Entry, Event, IPAddress, Key
from orchestrator.netfilter.conntrack import ConntrackTable

from .channel import Address, Channel, ChannelSpec
from .commit import commit as commit_entries
from .kernel_feed import ConntrackFeed, Scope, close_quietly
from .precopy import PrecopyFollower, PrecopySource, precopy_sender
from .protocol import Replicator
from .receiver import Receiver, ReceiverConfig, StreamInfo
from .sender import Sender, SenderConfig
from .state import SyncState, load_state, save_state
from .wire import SEQ_MOD, Codec, DecodeError, DecodeReason, Outgoing, boot_id

log = structlog.get_logger("convergent.sync")
MTU = 1400  # UDP payload per datagram: fits a 1500-byte link with IP and UDP headers
MAX_IN = 9216  # larger datagrams are dropped unread (``oversized``): jumbo frames at most
IDLE_TICK = 0.01  # seconds between ticks with nothing queued (NACK retries are 50 ms)
_DROPS = frozenset(
    {r.value for r in DecodeReason}
    | {"own", "unknown_sender", "not_for_receiver", "not_for_me", "stale_boot", "old",
       "duplicate", "overrun", "implausible", "wrong_source"}
)  # fmt: skip


class SyncError(ConvergentError):
    pass


def new_boot_id() -> int:
    """Boot time in the high 32 bits; below it milliseconds (10 bits) then 22 random bits, so
    a restart within the same second still compares greater (receivers refuse an older boot
    id of a live sender as a replay)."""
    now = time.time()
    return boot_id(int(now), (int(now * 1000) % 1000) << 22 | secrets.randbits(22))


class SyncService:
    """``state_path``: where the boot ids live across restarts (default
    ``[agent] state_dir``/sync-NODE.json; False: nowhere, for benchmarks and tests)."""

    def __init__(
        self, topology: Topology, node_name: str, key: bytes, netns: str | None = None, *,
        sender_config: SenderConfig | None = None, receiver_config: ReceiverConfig | None = None,
        state_path: Path | Literal[False] | None = None,
    ) -> None:  # fmt: skip
        self.topology, self.netns = topology, netns
        self.node = topology.node(node_name)
        sync = topology.sync
        self.codec = Codec(key, max_size=MAX_IN)
        self.state_path = (topology.agent.state_dir / f"sync-{node_name}.json"
                           if state_path is None else state_path or None)  # fmt: skip
        remembered = load_state(self.state_path) if self.state_path else SyncState()
        self.boot = max(new_boot_id(), remembered.boot + 1)  # greater even if the clock stepped
        others = [n for n in topology.nodes if n.name != node_name]
        self.receiver = Receiver(self.codec, self.node.tag, self.boot,
                                 peers={n.tag for n in others}, config=receiver_config,
                                 boots=remembered.peers)  # fmt: skip
        self.sender = Sender(self.codec, self.node.tag, self.boot, config=sender_config or
                             SenderConfig(mtu=MTU, flush_after=sync.flush_ms / 1000,
                                          backlog=sync.backlog,
                                          resync_rate=float(sync.resync_rate)))  # fmt: skip
        self.spec = ChannelSpec(
            sync.transport, sync.port, sync.interface, sync.group, sync.ttl,
            local=self.node.peer_ip, peers=tuple(n.peer_ip for n in others),
        )  # fmt: skip
        # each peer speaks from its own sync address only, and is answered there: its
        # sync_ip (multicast leaves from it), or the address a unicast socket is bound to
        home = {n.tag: (str(n.peer_ip), sync.port) for n in others
                if n.sync_ip is not None or sync.transport == "unicast"}  # fmt: skip
        self.replicator = Replicator(self.codec, self.receiver, [self.sender], home)
        self.scope = Scope(sync.mark_bit)
        self._saved_boots = -1
        self._node_by_ip = {str(n.peer_ip): n.name for n in others}
        self._node_by_tag = {n.tag: n.name for n in topology.nodes}
        self._source_drops: dict[str, Counter[str]] = {}
        self.counters: Counter[str] = Counter()
        self.channel: Channel | None = None
        self.table: ConntrackTable | None = None
        self.feed: ConntrackFeed | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._precopy_sending: dict[int, str] = {}  # our precopy streams -> destination node
        self._precopy_following: dict[tuple[int, int], str] = {}  # (tag, stream) -> source
        self._last_stream = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            raise SyncError("sync service already started")
        self._loop = loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        try:
            self.channel = await asyncio.to_thread(Channel.open, self.spec, self.netns,
                                                   self._on_receive)  # fmt: skip
            self.channel.start()
            self._persist()  # our boot first: a restart after this one must pick a greater one
            self.table = ConntrackTable(self.netns)
            self.feed = ConntrackFeed(self.table, self.sender, self.scope, self._emit, loop.time)
            self._emit(self.sender.start(loop.time()))
            await self.feed.start()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self._ticker(), name=f"sync-tick-{self.node.name}"),
            asyncio.create_task(self.feed.run(), name=f"sync-feed-{self.node.name}"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        close_quietly(self.feed)
        if self.channel is not None:
            self.channel.close()
        if self.table is not None:
            self.table.close()
        self.channel = self.feed = self.table = None
        self._loop = None

    @property
    def running(self) -> bool:
        return self._loop is not None and bool(self._tasks)

    # --- what the agent calls --------------------------------------------------------------

    def cache(self, node_name: str) -> Mapping[Key, Entry]:
        """What ``node_name`` has told us (its external cache), live and read-only."""
        try:
            tag = self.topology.node(node_name).tag
        except KeyError:
            raise SyncError(f"unknown node {node_name!r}") from None
        return self.receiver.cache(tag)

    async def commit(self, from_node: str, guest: str | None = None) -> dict[str, Any]:
        """Push ``from_node``'s cached entries into our kernel as a handover would."""
        table = self._need(self.table)
        entries = list(self.cache(from_node).values())
        result = await commit_entries(table, self.topology, entries, from_node,
                                      self.node.name, guest)  # fmt: skip
        return result.as_dict()

    async def track(self, addresses: Iterable[str | IPAddress]) -> int:
        """Replicate entries naming these addresses too (a guest being migrated)."""
        return await self._need(self.feed).track(addresses)

    async def untrack(self, addresses: Iterable[str | IPAddress]) -> int:
        return await self._need(self.feed).untrack(addresses)

    async def resync(self) -> None:
        """Re-read our table and re-announce it to everyone (operator's hammer)."""
        await self._need(self.feed).resync()
        self._emit(self.sender.request_resync(self._now()))

    def open_precopy(self, dst_node: str) -> PrecopySource:
        """A stream of our own for one guest's precopy, unicast to ``dst_node``. Numbers go
        round 1..65535 so a stream closed a moment ago is not named again at once."""
        dst = self.topology.node(dst_node)
        after = ((self._last_stream + i - 1) % 0xFFFF + 1 for i in range(1, 1 << 16))
        stream = next((n for n in after if n not in self._precopy_sending), 0)
        if not stream:
            raise SyncError("every precopy stream number is in use")
        self._last_stream = stream
        sender = precopy_sender(self.sender, stream, (str(dst.peer_ip), self.spec.port),
                                secrets.randbits(32))  # fmt: skip
        self.replicator.add_sender(sender)
        self._precopy_sending[stream] = dst_node
        self.counters["precopy_sent"] += 1
        return PrecopySource(sender, self._emit, self._now, self._close_precopy)

    def follow_precopy(self, src_node: str, stream: int, boot: int, seq: int,
                       listener: Callable[[Event], None] | None = None) -> PrecopyFollower:
        """Follow ``src_node``'s precopy stream, announced to us over the peer channel."""
        src = self.topology.node(src_node)
        self.receiver.follow(src.tag, stream, boot, seq, (str(src.peer_ip), self.spec.port),
                             self._now(), listener)  # fmt: skip
        self._precopy_following[src.tag, stream] = src_node
        self.counters["precopy_followed"] += 1
        return PrecopyFollower(self.receiver, src.tag, stream, self._emit, self._now,
                               self._forget_precopy)  # fmt: skip

    def _close_precopy(self, stream: int) -> None:
        self.replicator.remove_sender(stream)
        self._precopy_sending.pop(stream, None)

    def _forget_precopy(self, tag: int, stream: int) -> None:
        self.receiver.forget(tag, stream)
        self._precopy_following.pop((tag, stream), None)

    def status(self) -> dict[str, Any]:
        infos = self.receiver.stream_info()
        streams = {i.tag: i for i in infos if i.stream == 0}
        now = self._now()
        return {
            "node": self.node.name, "tag": self.node.tag, "boot": self.boot,
            "seq": self.sender.last_seq % SEQ_MOD, "entries": len(self.sender),
            "resyncing": self.sender.resyncing, "transport": self.spec.transport,
            "tracked": [str(a) for a in self.scope.addresses],
            "uptime_s": round(now - self._started_at, 3) if self._loop else None,
            "sender": dict(self.sender.counters), "receiver": dict(self.receiver.counters),
            "channel": dict(self.channel.counters) if self.channel else {},
            "feed": dict(self.feed.counters) if self.feed else {},
            "service": dict(self.counters),
            "peers": [self._peer(n.name, n.tag, streams.get(n.tag), now)
                      for n in self.topology.nodes if n.name != self.node.name],
            "unattributed_drops": dict(self._source_drops.get("?", {})),
            "precopy": self._precopy_status(infos),
        }  # fmt: skip

    def _precopy_status(self, infos: list[StreamInfo]) -> dict[str, Any]:
        """Precopy streams in flight, both ways."""
        sending = [{"stream": n, "to": node, "seq": self.replicator.sender(n).last_seq % SEQ_MOD,
                    "entries": len(self.replicator.sender(n))}
                   for n, node in sorted(self._precopy_sending.items())]  # fmt: skip
        following = [{"stream": i.stream, "from": self._precopy_following[i.tag, i.stream],
                      "expected_seq": i.expected % SEQ_MOD, "lag": i.lag, "entries": i.entries,
                      "nacks": i.counters["nack_sent"]}
                     for i in infos if (i.tag, i.stream) in self._precopy_following]  # fmt: skip
        return {"sending": sending, "following": following}

    # --- internals -------------------------------------------------------------------------

    def _peer(self, name: str, tag: int, info: StreamInfo | None, now: float) -> dict[str, Any]:
        drops = Counter(self._source_drops.get(name, {}))
        if info is None:
            return {"node": name, "tag": tag, "boot": None, "expected_seq": None, "lag": None,
                    "entries": 0, "drops": dict(drops), "nacks": 0, "resyncs": 0}  # fmt: skip
        c = info.counters
        drops.update({k: v for k, v in c.items() if k in _DROPS})
        return {
            "node": name, "tag": tag, "boot": info.boot,
            "expected_seq": info.expected % SEQ_MOD, "lag": info.lag, "entries": info.entries,
            "last_heard_s": round(now - info.last_heard, 3), "resync_pending": info.resync_pending,
            "drops": dict(drops), "nacks": c["nack_sent"], "resyncs": c["resync_end"],
            "resync_requests": c["resync_requested"], "gaps": c["gap"], "skipped": c["skipped"],
        }  # fmt: skip

    def _need(self, thing: Any) -> Any:
        if thing is None:
            raise SyncError(f"sync service on {self.node.name} is not running")
        return thing

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _emit(self, out: list[Outgoing]) -> None:
        if out and self.channel is not None:
            send = self.channel.send
            for o in out:
                send(o.data, o.dest)  # type: ignore[arg-type]

    def _on_receive(self, batch: list[tuple[bytes, Address]]) -> None:
        now = self._now()
        decode, on_message = self.codec.decode, self.replicator.on_message
        out: list[Outgoing] = []
        for data, addr in batch:
            try:
                msg = decode(data)
            except DecodeError as exc:
                self.receiver.counters[exc.reason.value] += 1
                who = self._node_by_ip.get(addr[0], "?")
                self._source_drops.setdefault(who, Counter())[exc.reason.value] += 1
                continue
            out += on_message(msg, addr, now)
        self._emit(out)
        if self.receiver.boots_changed != self._saved_boots:
            self._persist()

    def _persist(self) -> None:
        """Save our boot and the newest boot of every peer (rare: a peer restarted)."""
        self._saved_boots = self.receiver.boots_changed
        if self.state_path is None:
            return
        try:
            save_state(self.state_path, SyncState(self.boot, self.receiver.boots()))
        except OSError as exc:
            self.counters["state_write_failed"] += 1
            log.warning("sync.state_not_saved", path=str(self.state_path),
                        error=exc.strerror or str(exc))

    async def _ticker(self) -> None:
        assert self._loop is not None
        loop, tick, sender = self._loop, self.replicator.on_tick, self.sender
        busy_every = self.sender.config.flush_after
        while True:
            self._emit(tick(loop.time()))
            await asyncio.sleep(busy_every if sender.busy else IDLE_TICK)
