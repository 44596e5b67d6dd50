"""Channels: move replicator datagrams over UDP, IPv4 multicast or a unicast peer list.

conntrack-tools' ``channel_mcast.c`` / ``channel_udp.c`` split: a channel only moves bytes;
the protocol core (``protocol.Replicator``) decides what to send and to whom. ``dest`` None
means "everyone": the multicast group, or each unicast peer; any other dest is the
``(ip, port)`` a datagram came from (NACKs and their answers travel point to point).

Sockets are created inside the node's network namespace by a short-lived thread that
``setns``-es itself (a socket keeps the namespace it was born in), then read and written
from the asyncio loop without blocking: a readable socket is drained in one callback, a full
send buffer parks datagrams in a bounded queue until the socket is writable again. Errors on
this hot path are counters (``conntrackd -s`` style), never log lines.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Literal

from orchestrator.errors import ConvergentError
from orchestrator.netns import in_netns

Address = tuple[str, int]
Receive = Callable[[list[tuple[bytes, Address]]], None]

_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
_IP_MULTICAST_ALL: Final = 49
RCVBUF: Final = 32 << 20  # a 100k-entry burst is ~4k datagrams of ~2.3 KiB truesize each
SNDBUF: Final = 8 << 20
RECV_SIZE: Final = 65536  # any UDP payload fits: oversize is the decoder's verdict
READ_BATCH: Final = 512  # datagrams per readable callback: the loop stays fair
QUEUE_MAX: Final = 65536  # datagrams parked while the send buffer is full


class ChannelError(ConvergentError):
    """The channel's socket could not be set up."""


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """Where the datagrams go. ``local`` is this node's sync address (unicast binds to it;
    multicast uses ``interface``); ``peers`` the other nodes' (unicast only)."""

    transport: Literal["multicast", "unicast"]
    port: int
    interface: str | None = None
    group: IPv4Address | None = None
    ttl: int = 1
    local: IPv4Address | None = None
    peers: tuple[IPv4Address, ...] = ()
    rcvbuf: int = RCVBUF
    sndbuf: int = SNDBUF

    def everyone(self) -> list[Address]:
        if self.transport == "multicast":
            assert self.group is not None
            return [(str(self.group), self.port)]
        return [(str(p), self.port) for p in self.peers]


def _force_buf(sock: socket.socket, force_opt: int, plain_opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except PermissionError:  # without CAP_NET_ADMIN: capped by net.core.[rw]mem_max
        sock.setsockopt(socket.SOL_SOCKET, plain_opt, size)


def _new_socket(spec: ChannelSpec) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _force_buf(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, spec.rcvbuf)
        _force_buf(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, spec.sndbuf)
        if spec.interface:  # sync traffic only on the dedicated interface (ct_sync's syncdev)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, spec.interface.encode())
        if spec.transport == "multicast":
            _join(sock, spec)
            sock.bind(("0.0.0.0", spec.port))
        else:
            sock.bind((str(spec.local) if spec.local else "0.0.0.0", spec.port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _join(sock: socket.socket, spec: ChannelSpec) -> None:
    if spec.group is None or not spec.interface:
        raise ChannelError("multicast needs a group and an interface")
    ifindex = socket.if_nametoindex(spec.interface)  # resolved in this thread's namespace
    mreqn = struct.pack("=4s4si", spec.group.packed, bytes(4), ifindex)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    # send from our sync address whatever else the interface holds: receivers accept a
    # node's datagrams from its configured address only
    local = spec.local.packed if spec.local else bytes(4)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                    struct.pack("=4s4si", spec.group.packed, local, ifindex))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, spec.ttl)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)  # only the group we joined


def open_socket(spec: ChannelSpec, netns: str | None) -> socket.socket:
    """The channel's UDP socket, living in ``netns`` (the caller's thread does not move)."""
    try:
        got = in_netns(netns, _new_socket, spec)
    except Exception as exc:
        where = f" in netns {netns}" if netns else ""
        raise ChannelError(f"sync channel {spec.transport} port {spec.port}{where}: {exc}"
                           ) from None
    return got


class Channel:
    """One UDP socket on the running loop. ``on_receive`` gets every datagram available
    per wake-up as ``[(bytes, (ip, port))]``."""

    def __init__(self, spec: ChannelSpec, sock: socket.socket, on_receive: Receive) -> None:
        self.spec = spec
        self.counters: Counter[str] = Counter()
        self._sock = sock
        self._on_receive = on_receive
        self._everyone = spec.everyone()
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False

    @classmethod
    def open(cls, spec: ChannelSpec, netns: str | None, on_receive: Receive) -> Channel:
        return cls(spec, open_socket(spec, netns), on_receive)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            if self._writing:
                self._loop.remove_writer(self._sock.fileno())
        self._sock.close()

    @property
    def address(self) -> Address:
        host, port = self._sock.getsockname()
        return (host, port)

    # --- sending --------------------------------------------------------------------------

    def send(self, data: bytes, dest: Address | None = None) -> None:
        for addr in self._everyone if dest is None else (dest,):
            if self._queue:
                self._park(data, addr)
            else:
                self._send_one(data, addr)

    def _send_one(self, data: bytes, addr: Address) -> bool:
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._park(data, addr)
            return False
        except OSError as exc:  # unreachable peer, no route, message too long: count, go on
            self.counters[f"send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
            return True
        self.counters["sent"] += 1
        return True

    def _park(self, data: bytes, addr: Address) -> None:
        if len(self._queue) >= QUEUE_MAX:
            self.counters["send_queue_full"] += 1  # the protocol's NACKs recover it
            return
        self._queue.append((data, addr))
        self.counters["send_parked"] += 1
        if not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        queue = self._queue
        while queue:
            data, addr = queue.popleft()
            if not self._send_one(data, addr):  # parked again at the tail: put it back first
                queue.appendleft(queue.pop())
                return
        self._writing = False
        assert self._loop is not None
        self._loop.remove_writer(self._sock.fileno())

    # --- receiving ------------------------------------------------------------------------

    def _readable(self) -> None:
        batch: list[tuple[bytes, Address]] = []
        recv = self._sock.recvfrom
        for _ in range(READ_BATCH):
            try:
                data, addr = recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier unicast send
                self.counters[f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
                continue
            batch.append((data, addr))
        if batch:
            self.counters["received"] += len(batch)
            self._on_receive(batch)
