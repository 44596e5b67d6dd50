"""The live stream of one namespace's conntrack events.

A non-blocking socket on the ctnetlink groups, read from the asyncio loop, with a large
forced receive buffer; an overrun (ENOBUFS) is yielded as ``OVERRUN`` so the caller resyncs
with a dump. Measured in ``bench/conntrack.py``.
"""

from __future__ import annotations

import asyncio
import errno
import select
from collections import deque
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

from orchestrator.model.conntrack import Event, IPAddress
from orchestrator.netfilter import ctnetlink as nl

from .base import OVERRUN, AddressMatch, Overrun
from .sockets import EVENTS_RCVBUF, RECV_BYTES, open_socket


class EventStream:
    """Conntrack events of one namespace, as ``Event`` (or ``OVERRUN`` after a loss).

    Subscribed on construction. Async: ``async for ev in stream`` (reads on the running loop,
    never blocks it). Sync: ``read(timeout)``. An overrun does not end the stream: the socket
    keeps delivering, the caller resyncs with a dump and carries on."""

    # what one recv becomes; a subclass may decode to something else (the replicator's
    # ``RecordStream`` goes straight to wire records)
    decode_messages = staticmethod(nl.decode_events)

    def __init__(
        self,
        netns: str | None,
        rcvbuf: int = EVENTS_RCVBUF,
        groups: int = nl.ALL_CT_GROUPS,
        addresses: Iterable[str | IPAddress] = (),
    ) -> None:
        self.netns = netns
        self._sock = open_socket(netns, groups=groups, rcvbuf=rcvbuf)
        self._sock.setblocking(False)
        self._buf = bytearray(RECV_BYTES)
        self._pending: deque[Event | Overrun] = deque()
        self._only = AddressMatch(addresses)
        self.received = 0
        self.overruns = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Event | Overrun]:
        return self

    async def __anext__(self) -> Event | Overrun:
        while not self._pending:
            await self._readable()
            self._read_available()
        return self._pending.popleft()

    async def batches(self) -> AsyncIterator[list[Event | Overrun]]:
        """Everything available per wake-up: cheaper than one await per event."""
        while True:
            if not self._pending:
                await self._readable()
                self._read_available()
            if self._pending:
                batch = list(self._pending)
                self._pending.clear()
                yield batch

    async def wait(self) -> None:
        """Until events are pending. Cancel-safe: consumes nothing (``take`` does)."""
        while not self._pending:
            await self._readable()
            self._read_available()

    def take(self) -> list[Event | Overrun]:
        """What is pending now, without waiting."""
        batch = list(self._pending)
        self._pending.clear()
        return batch

    def read(self, timeout: float | None = None, limit: int = 65536) -> list[Event | Overrun]:
        """Sync: what is available now, waiting up to ``timeout`` for the first message."""
        if not self._pending:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if ready:
                self._read_available(limit)
        batch = list(self._pending)
        self._pending.clear()
        return batch

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self._sock.fileno(), wake)
        try:
            await fut
        finally:
            loop.remove_reader(self._sock.fileno())

    def _read_available(self, limit: int = 8192) -> None:
        """Drain up to ``limit`` datagrams without blocking (bounded: the loop stays fair)."""
        sock, buf = self._sock, self._buf
        got: list[Event] = []
        for _ in range(limit):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._flush(got)
                self.overruns += 1
                self._pending.append(OVERRUN)
                continue
            self.decode_messages(buf, n, got)
        self._flush(got)

    def _flush(self, got: list[Event]) -> None:
        self.received += len(got)
        if self._only:
            only = self._only
            got[:] = [ev for ev in got if only(ev.entry)]
        self._pending.extend(got)
        got.clear()
