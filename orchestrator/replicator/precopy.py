"""A handover's precopy carried by the replicator (DESIGN §2, §4): one guest's entries on a
sender stream of their own, unicast from S to D, with the same seq/NACK/resend machinery as
the node stream. The peer channel still carries the control: which stream, where it
starts, and at every barrier the seq up to which D must have applied to hold all S saw.

    S: src = service.open_precopy("n2")       D: f = service.follow_precopy("n1", ...)
       src.put(events); seq = src.flush()        await f.reach(seq, timeout)
       src.close()                               f.entries(); f.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from orchestrator.model.conntrack import Entry, Event

from .receiver import Receiver
from .sender import Sender
from .wire import SEQ_MOD, Outgoing, Peer

Emit = Callable[[list[Outgoing]], None]
Clock = Callable[[], float]
POLL_S = 0.001  # how often ``reach`` looks at the receiver's position


class PrecopySource:
    """S's half: feeds the guest's changes into its own Sender (stream ``number``)."""

    def __init__(self, sender: Sender, emit: Emit, clock: Clock,
                 on_close: Callable[[int], None]) -> None:  # fmt: skip
        self.sender, self._emit, self._clock, self._on_close = sender, emit, clock, on_close

    @property
    def number(self) -> int:
        return self.sender.stream

    @property
    def announce(self) -> dict[str, int]:
        """What D needs to follow the stream: its number, our boot, its first seq."""
        return {"stream": self.number, "boot": self.sender.boot,
                "seq": (self.sender.last_seq + 1) % SEQ_MOD}  # fmt: skip

    def put(self, events: Iterable[Event]) -> None:
        now = self._clock()
        for ev in events:
            self._emit(self.sender.update(ev, now))

    def put_snapshot(self, entries: Iterable[Entry]) -> None:
        """The guest's entries are exactly these now (first dump, or after lost events)."""
        self._emit(self.sender.reconcile(entries, self._clock()))

    def flush(self) -> int:
        """Send everything queued; returns the last seq sent (u32)."""
        self._emit(self.sender.flush(self._clock()))
        return self.sender.last_seq % SEQ_MOD

    def close(self) -> None:
        self._on_close(self.number)


class PrecopyFollower:
    """D's half: the receiver follows the announced stream into a cache of its own."""

    def __init__(self, receiver: Receiver, tag: int, stream: int, emit: Emit, clock: Clock,
                 on_close: Callable[[int, int], None]) -> None:  # fmt: skip
        self.receiver, self.tag, self.stream = receiver, tag, stream
        self._emit, self._clock, self._on_close = emit, clock, on_close

    def entries(self) -> list[Entry]:
        return list(self.receiver.cache(self.tag, self.stream).values())

    def holds(self, last: int) -> bool:
        """Everything up to seq ``last`` (u32) is applied."""
        pos = self.receiver.position(self.tag, self.stream)
        return pos is not None and (pos - 1 - last) % SEQ_MOD < SEQ_MOD // 2

    async def reach(self, last: int, timeout: float,
                    lost: Callable[[], bool] | None = None) -> None:  # fmt: skip
        """Until every datagram up to ``last`` is applied: NACK the missing ones now (the
        receiver's tick retries them); TimeoutError past ``timeout`` or once ``lost()``."""
        self._emit(self.receiver.expect(self.tag, self.stream, last, self._clock()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.holds(last):
            if loop.time() > deadline or (lost is not None and lost()):
                raise TimeoutError(f"precopy stream {self.stream}: seq {last} not reached")
            await asyncio.sleep(POLL_S)

    def close(self) -> None:
        self._on_close(self.tag, self.stream)


def precopy_sender(template: Sender, stream: int, dest: Peer, initial_seq: int) -> Sender:
    """A Sender for one precopy: the node's codec, tag, boot and config; its own stream."""
    return Sender(template.codec, template.tag, template.boot, stream=stream,
                  initial_seq=initial_seq, config=template.config, dest=dest)  # fmt: skip
