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
from typing import cast


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


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(answer(self.name, addr, self.transport.get_extra_info("sockname")),
                              addr)


async def serve(name: str, tcp: list[int], udp: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await _serve_tcp(name, p) for p in tcp]
    for p in udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", p))
        await loop.create_datagram_endpoint(lambda: _Udp(name), sock=sock)
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
