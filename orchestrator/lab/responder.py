"""A tiny server for lab guests and the workstation: answers who it is and who asked.

TCP ports speak just enough HTTP for curl (one answer, then close); UDP ports answer each
datagram. The answer names the peer as the server saw it, which is what the acceptance
checks compare: stateless DNAT keeps the client's address, FULL-NAT shows the entry node,
SNAT shows the hosting node's public address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct


def answer(name: str, peer: tuple[str, int], local: tuple[str, int]) -> bytes:
    return f"name={name} peer={peer[0]}:{peer[1]} local={local[0]}:{local[1]}\n".encode()


async def _serve_tcp(name: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=2)
        body = answer(name, writer.get_extra_info("peername"), writer.get_extra_info("sockname"))
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        try:
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "0.0.0.0", port, reuse_address=True)


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr


class _Udp:
    """Answers each datagram from the address it was sent to, as a real service on a
    multi-address host does (IP_PKTINFO): a socket bound to 0.0.0.0 would answer from the
    interface's first address, and the reply would not match the flow's conntrack entry."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.setblocking(False)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                _data, ancdata, _flags, peer = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            dst = next((_PKTINFO.unpack(d[: _PKTINFO.size])[2] for lvl, kind, d in ancdata
                        if lvl == socket.IPPROTO_IP and kind == IP_PKTINFO), bytes(4))
            local = (socket.inet_ntoa(dst), self.port)
            info = _PKTINFO.pack(0, dst, bytes(4))  # spec_dst: the source of our reply
            with contextlib.suppress(OSError):
                self.sock.sendmsg([answer(self.name, peer, local)],
                                  [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, peer)


async def serve(name: str, tcp: list[int], udp: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await _serve_tcp(name, p) for p in tcp]
    for p in udp:
        _Udp(name, p).start(loop)
    print(f"ready tcp={tcp} udp={udp}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers), asyncio.Event().wait())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    a = ap.parse_args()
    asyncio.run(serve(a.name, a.tcp, a.udp))


if __name__ == "__main__":
    main()
