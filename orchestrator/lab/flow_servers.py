"""The guest's application servers for the live-flow harness (one asyncio process).

``python -m orchestrator.lab.flow_servers --ws PORT --http PORT --udp PORT``:
- websocket ``/echo`` echoes every message (client-push), ``/push`` sends a numbered line
  every ``--interval`` seconds and never reads (server-push: the guest speaks first);
- HTTP/1.1 keep-alive: every request is answered on the same connection with
  ``conn=<id> seq=<n>``, so the client can tell a reconnect from the same connection;
- UDP: every datagram is echoed to its sender.

It runs in lab guest namespaces with the project's websockets and, unchanged, inside the
libvirt lab's VM with Debian 12's python3-websockets 10.4 (the legacy API), stdlib otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import socket
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed

try:
    from websockets.asyncio.server import serve
except ImportError:  # websockets < 13: Debian 12's python3-websockets in the VM image
    from websockets.server import serve  # type: ignore[attr-defined,no-redef]

_conn_ids = itertools.count(1)


# websocket ----------------------------------------------------------------------------
def _path(ws: Any) -> str:
    request = getattr(ws, "request", None)  # websockets >= 13; older ones have .path
    return str(request.path if request is not None else getattr(ws, "path", ""))


async def _ws_handler(ws: Any, interval: float) -> None:
    path = _path(ws)
    with contextlib.suppress(ConnectionClosed):
        if path == "/push":
            await _push(ws, interval)
        else:
            async for message in ws:
                await ws.send(message)


async def _push(ws: Any, interval: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for seq in itertools.count():
        # on a fixed schedule: a stall must not shift every later line
        await asyncio.sleep(max(0.0, start + seq * interval - loop.time()))
        await ws.send(str(seq))


# HTTP keep-alive ----------------------------------------------------------------------
async def _http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = next(_conn_ids)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
            seq = parse_qs(urlsplit(target).query).get("seq", ["-1"])[0]
            body = f"conn={conn} seq={seq}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
    writer.close()


# UDP ----------------------------------------------------------------------------------
class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)


async def serve_all(ws_port: int, http_port: int, udp_port: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    # no pings: a keepalive would hide (or cause) the breakage we are measuring
    async with serve(lambda ws: _ws_handler(ws, interval), "0.0.0.0", ws_port,
                     ping_interval=None, compression=None):
        http = await asyncio.start_server(_http_handler, "0.0.0.0", http_port,
                                          reuse_address=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", udp_port))
        await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
        print(f"ready ws={ws_port} http={http_port} udp={udp_port}", flush=True)
        await http.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", type=int, required=True)
    ap.add_argument("--http", type=int, required=True)
    ap.add_argument("--udp", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.05)
    a = ap.parse_args()
    asyncio.run(serve_all(a.ws, a.http, a.udp, a.interval))


if __name__ == "__main__":
    main()
