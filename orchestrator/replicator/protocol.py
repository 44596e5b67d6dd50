"""The replication protocol core of one node: its sender streams and its receiver.

conntrack-tools' split: this is the *mode* (ftfw-like: seq, NACK, backlog, resync); the
channel (multicast or unicast UDP, later) only moves bytes, and the external cache lives in
``cache``. A node is a sender (stream 0: its own conntrack table; stream n: a per-guest
precopy to one peer) and a receiver of every other node, so one socket feeds one
``Replicator``:

    out = node.on_datagram(data, peer, now)   # -> [Outgoing(dest, bytes, type)]
    out = node.on_tick(now)                   # every few ms: flush, ALIVE, retries, resync
    out = node.sender().update(event, now)    # a conntrack event

``dest`` None means every peer (the multicast group, or each unicast peer); otherwise the
channel sends to that peer, which is how NACK answers and NACKs travel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .receiver import Receiver, ReceiverConfig
from .sender import Sender, SenderConfig
from .wire import Codec, Message, MsgType, Outgoing, Peer, decode_counted

__all__ = ["Receiver", "ReceiverConfig", "Replicator", "Sender", "SenderConfig"]


class Replicator:
    """Dispatches decoded datagrams: NACK and RESYNC_REQUEST aimed at us go to the sender
    of that stream, the rest to the receiver. Decode failures count on the receiver."""

    def __init__(self, codec: Codec, receiver: Receiver, senders: Iterable[Sender] = (),
                 addresses: Mapping[int, Peer] | None = None) -> None:
        self.codec = codec
        self.receiver = receiver
        self.tag = receiver.tag
        self._senders: dict[int, Sender] = {}
        # sender tag -> the one address it may speak from (and the one we answer to)
        self._addresses = dict(addresses) if addresses is not None else None
        for sender in senders:
            self.add_sender(sender)

    def add_sender(self, sender: Sender) -> None:
        if sender.tag != self.tag or sender.stream in self._senders:
            raise ValueError(f"sender tag {sender.tag} stream {sender.stream} does not fit")
        self._senders[sender.stream] = sender

    def remove_sender(self, stream: int) -> Sender | None:
        return self._senders.pop(stream, None)

    def sender(self, stream: int = 0) -> Sender:
        return self._senders[stream]

    def on_datagram(self, data: bytes, peer: Peer, now: float) -> list[Outgoing]:
        msg = decode_counted(self.codec, data, self.receiver.counters)
        return [] if msg is None else self.on_message(msg, peer, now)

    def on_message(self, msg: Message, peer: Peer, now: float) -> list[Outgoing]:
        """A datagram the caller decoded itself (to attribute decode failures to a peer).
        A known tag speaks only from its configured address; a HELLO of a boot of a peer
        not met before is a peer that holds nothing of ours: one resync for it."""
        if self._addresses is not None:
            home = self._addresses.get(msg.tag)
            if home is not None and peer != home:
                self.receiver.counters["wrong_source"] += 1
                return []
        if msg.type not in (MsgType.NACK, MsgType.RESYNC_REQUEST):
            before = self.receiver.boot_of(msg.tag)
            out = self.receiver.on_message(msg, peer, now)
            own = self._senders.get(0)
            if (msg.type == MsgType.HELLO and msg.stream == 0 and own is not None
                    and before != msg.boot and self.receiver.boot_of(msg.tag) == msg.boot):
                out += own.peer_joined(now)
            return out
        sender = self._senders.get(msg.stream) if msg.target_tag == self.tag else None
        if sender is None:
            self.receiver.counters["not_for_me"] += 1  # another node's NACK, seen on multicast
            return []
        return sender.on_message(msg, peer, now)

    def on_tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for sender in self._senders.values():
            out += sender.on_tick(now)
        return out + self.receiver.on_tick(now)
