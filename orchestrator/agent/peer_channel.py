"""Frames and the session between two agents: :class:`PeerChannel`.

Frame: u32 length | u8 type | body | 16-byte MAC. Types: H handshake (before the session;
``handshake.py`` holds its rules), J control (JSON), E entries (a sealed replicator DATA
message: one encoding for both carriers). Once the handshake made a session key, every frame
carries HMAC-SHA256/128 under it and a per-direction counter, so a frame can be neither
forged, replayed into another connection, nor reordered. Before the session nothing big is
read (``HANDSHAKE_MAX`` a frame, the whole handshake within ``HANDSHAKE_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import struct
from typing import Any

from orchestrator.agent import handshake as hs
from orchestrator.agent.handshake import HandshakeError
from orchestrator.errors import ConvergentError
from orchestrator.migration.feed import FeedLost
from orchestrator.replicator.wire import Codec, Message, MsgType, Record

_LEN = struct.Struct("!I")
_CTR = struct.Struct("!Q")
MAC = 16
MAX_FRAME = 8 << 20
RECORDS_PER_FRAME = 2048  # the wire header counts records in 16 bits
HANDSHAKE_TIMEOUT = 5.0  # for the whole handshake, not per read


class PeerError(ConvergentError):
    """The other agent is not who it claims, or broke the protocol."""


async def open_channel(host: str, port: int, key: bytes, me: str) -> PeerChannel:
    """The connecting side's channel to the agent at ``host:port``, authenticated as
    ``me``; the connection is closed when the handshake fails."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                            HANDSHAKE_TIMEOUT)
    ch = PeerChannel(reader, writer, key, b"C")
    try:
        await ch.connect_as(me)
    except BaseException:
        ch.close()
        raise
    return ch


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()[:MAC]


class quiet:
    """Swallows whatever a best-effort step raises (an error frame to a peer going away)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


class PeerChannel:
    """One authenticated connection between two agents; ``role`` is b"C" (the side that
    connects) or b"S"."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: bytes, role: bytes) -> None:
        self.reader, self.writer = reader, writer
        self.key = key
        self.role = role
        self.session: bytes | None = None
        self.sent = self.received = 0
        self.peer = ""
        self.codec = Codec(key, max_size=MAX_FRAME)

    # framing ---------------------------------------------------------------------
    def _write(self, kind: bytes, body: bytes) -> None:
        mac = b"\0" * MAC
        if self.session is not None:
            mac = _mac(self.session, self.role, _CTR.pack(self.sent), kind, body)
            self.sent += 1
        self.writer.write(_LEN.pack(1 + len(body) + MAC) + kind + body + mac)

    async def _read(self) -> tuple[bytes, bytes]:
        limit = MAX_FRAME if self.session is not None else hs.HANDSHAKE_MAX
        try:
            (size,) = _LEN.unpack(await self.reader.readexactly(_LEN.size))
            if not 1 + MAC <= size <= limit:
                if self.session is None:
                    raise HandshakeError("frame_too_large", f"handshake frame of {size} bytes "
                                                            f"(at most {limit})")
                raise PeerError(f"peer {self.peer or '?'}: frame of {size} bytes")
            frame = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise FeedLost(f"peer {self.peer or '?'} closed the connection: {exc}") from None
        kind, body, mac = frame[:1], frame[1:-MAC], frame[-MAC:]
        if self.session is not None:
            other = b"S" if self.role == b"C" else b"C"
            want = _mac(self.session, other, _CTR.pack(self.received), kind, body)
            if not hmac.compare_digest(mac, want):
                raise PeerError(f"peer {self.peer or '?'}: frame {self.received} fails its MAC")
            self.received += 1
        return kind, body

    # queue_* write whole frames synchronously: a task cancelled in flush() never leaves
    # half a message on the stream
    def queue(self, obj: dict[str, Any]) -> None:
        self._write(b"J", json.dumps(obj, default=str).encode())

    def queue_records(self, records: list[Record]) -> None:
        for i in range(0, len(records), RECORDS_PER_FRAME):
            chunk = tuple(records[i:i + RECORDS_PER_FRAME])
            self._write(b"E", self.codec.encode(Message(MsgType.DATA, 0, 0, 0, records=chunk)))

    async def flush(self) -> None:
        await self.writer.drain()

    async def send(self, obj: dict[str, Any]) -> None:
        self.queue(obj)
        await self.flush()

    async def recv(self) -> dict[str, Any] | list[Record]:
        kind, body = await self._read()
        if kind == b"J":
            try:
                obj = json.loads(body)
            except RecursionError:
                raise PeerError(f"peer {self.peer}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise PeerError(f"peer {self.peer}: a control frame that is not an object")
            return obj
        if kind == b"E":
            return list(self.codec.decode(body).records)
        raise PeerError(f"peer {self.peer}: unexpected frame type {kind!r}")

    # handshake -------------------------------------------------------------------
    async def _hello(self, fields: dict[str, str]) -> None:
        self._write(b"H", hs.encode(fields))
        await self.writer.drain()

    async def _hello_reply(self, *want: str) -> dict[str, Any]:
        kind, body = await self._read()
        if kind != b"H":
            raise HandshakeError("bad_handshake", "handshake expected")
        return hs.parse(body, *want)

    async def refuse(self, reason: str) -> None:
        """Tell the other side why (an unauthenticated H frame), best effort."""
        with quiet():
            self._write(b"H", json.dumps({"error": reason}).encode())
            await asyncio.wait_for(self.writer.drain(), 1.0)

    async def connect_as(self, me: str) -> str:
        try:
            return await asyncio.wait_for(self._connect_as(me), HANDSHAKE_TIMEOUT)
        except HandshakeError as exc:
            raise PeerError(f"peer handshake with {self.peer or 'the source'}: {exc}") from None
        except TimeoutError:
            raise FeedLost(f"peer {self.peer or '?'}: handshake timed out") from None

    async def _connect_as(self, me: str) -> str:
        nc = secrets.token_bytes(hs.NONCE)
        await self._hello({"node": me, "nonce": nc.hex()})
        reply = await self._hello_reply("node", "nonce", "proof")
        peer, ns = reply["node"], reply["nonce"]
        self.peer = peer
        hs.check_proof(reply["proof"], hs.proof(self.key, b"S", nc, ns, me, peer),
                       f"peer {peer}")
        await self._hello({"proof": hs.proof(self.key, b"C", nc, ns, me, peer).hex()})
        self.session = hs.session_key(self.key, nc, ns, me, peer)
        return peer

    async def accept_as(self, me: str, source: str | None = None,
                        addresses: dict[str, str] | None = None) -> str:
        """The connecting agent's node name, once it proved the key (and, given
        ``addresses``, came from that node's address)."""
        hello = await self._hello_reply("node", "nonce")
        peer, nc = hello["node"], hello["nonce"]
        self.peer = peer
        if addresses is not None and addresses.get(peer) != source:
            raise HandshakeError("wrong_address", f"connection from {source} claims to be "
                                                  f"{peer}, which is at {addresses.get(peer)}")
        ns = secrets.token_bytes(hs.NONCE)
        proof = hs.proof(self.key, b"S", nc, ns, peer, me)
        await self._hello({"node": me, "nonce": ns.hex(), "proof": proof.hex()})
        final = await self._hello_reply("proof")
        hs.check_proof(final["proof"], hs.proof(self.key, b"C", nc, ns, peer, me),
                       f"connection claiming to be {peer}")
        self.session = hs.session_key(self.key, nc, ns, peer, me)
        return peer

    def close(self) -> None:
        self.writer.close()
