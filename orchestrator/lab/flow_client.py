"""The measuring end of the live-flow harness: one asyncio process drives many streams.

``python -m orchestrator.lab.flow_client --spec SPEC.json --result RESULT.json`` opens
every flow in the spec, prints ``ready {failures}`` once each one is connected (or has
failed to), then sends a line every ``interval`` and records when each echo arrives, until
SIGTERM; then it writes the per-flow record (counts, arrival times, first error) to
RESULT.json. A flow never reconnects: whatever ends its connection is its death.
With ``echo_port`` it also runs a line-echo server (the peer of guest-initiated flows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the VM guest runs this file with websockets 10.4
    from websockets.asyncio.client import ClientConnection, connect

HELLO = b"hello\n"


class FlowError(Exception):
    """The flow is dead; the message says how."""


@dataclass
class Stream:
    name: str
    kind: str
    entry_node: str
    sent: int = 0
    received: int = 0
    arrivals: list[float] = field(default_factory=list)
    connected_at: float | None = None
    error: str | None = None
    error_at: float | None = None
    udp_errors: int = 0

    def arrived(self) -> None:
        self.received += 1
        self.arrivals.append(round(time.time(), 4))

    def fail(self, message: str) -> None:
        if self.error is None:  # the first cause is the one that matters
            self.error, self.error_at = message, time.time()


@dataclass(frozen=True)
class Ctx:
    interval: float
    connect_timeout: float
    ssh_key: str | None


def describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip()
    if isinstance(exc, FlowError):
        return text
    said = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    # a library's summary hides what happened ("did not receive a valid HTTP response"):
    # the cause says whether the peer closed, reset or sent garbage
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return f"{said} ({describe(cause)})" if cause is not None else said


async def ticks(interval: float) -> AsyncIterator[int]:
    """Sequence numbers on a fixed schedule (a stall does not shift later lines)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for seq in itertools.count():
        await asyncio.sleep(max(0.0, start + seq * interval - loop.time()))
        yield seq


def expect(stream: Stream, got: int, want: int) -> None:
    if got != want:
        raise FlowError(f"got line {got}, expected {want} (stream corrupted or restarted)")
    stream.arrived()


# byte-stream line echo: ssh (remote cat) and guest-snat (TCP echo) ----------------------
async def line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    stream: Stream, ctx: Ctx) -> None:
    async def send() -> None:
        async for seq in ticks(ctx.interval):
            writer.write(b"%d\n" % seq)
            stream.sent += 1
            await writer.drain()

    async def receive() -> None:
        for want in itertools.count():
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise FlowError("connection closed by the peer (EOF)")
            expect(stream, int(line), want)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(send())
        tg.create_task(receive())


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                ctx: Ctx) -> None:
    writer.write(HELLO)
    line = await asyncio.wait_for(reader.readline(), ctx.connect_timeout)
    if line != HELLO:
        raise FlowError(f"handshake: got {line!r}")


def ssh_argv(key: str, host: str, port: int) -> list[str]:
    opts = {
        "StrictHostKeyChecking": "no", "UserKnownHostsFile": "/dev/null", "BatchMode": "yes",
        "IdentitiesOnly": "yes", "IdentityAgent": "none", "LogLevel": "ERROR",
        "ConnectTimeout": "10",
        # no keepalives of any kind: they would mask (or cause) the breakage we measure
        "ServerAliveInterval": "0", "TCPKeepAlive": "no",
    }
    argv = ["ssh", "-F", "/dev/null", "-T", "-i", key, "-p", str(port)]
    for k, v in opts.items():
        argv += ["-o", f"{k}={v}"]
    return [*argv, f"root@{host}", "exec cat"]


async def run_ssh(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    assert ctx.ssh_key, "ssh flows need ssh_key in the spec"
    proc = await asyncio.create_subprocess_exec(
        *ssh_argv(ctx.ssh_key, f["host"], f["port"]), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        await hello(proc.stdout, proc.stdin, ctx)
        stream.connected_at = time.time()
        await line_echo(proc.stdout, proc.stdin, stream, ctx)
    except Exception as exc:
        raise FlowError(f"{describe(exc)}; {await _ssh_exit(proc)}") from exc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _ssh_exit(proc: asyncio.subprocess.Process) -> str:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 1)
    err = b""
    if proc.stderr is not None:
        with contextlib.suppress(TimeoutError):
            err = await asyncio.wait_for(proc.stderr.read(2000), 0.5)
    return f"ssh rc={proc.returncode} stderr={err.decode(errors='replace').strip()!r}"


async def run_tcp_echo(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(f["host"], f["port"]), ctx.connect_timeout)
    try:
        await hello(reader, writer, ctx)
        stream.connected_at = time.time()
        await line_echo(reader, writer, stream, ctx)
    finally:
        writer.transport.abort()


# websocket --------------------------------------------------------------------------
def ws_connect(f: dict[str, Any], path: str, ctx: Ctx) -> connect:
    from websockets.asyncio.client import connect

    # no pings (they would mask or cause breakage), no proxy from the environment
    return connect(f"ws://{f['host']}:{f['port']}{path}", ping_interval=None,
                   open_timeout=ctx.connect_timeout, close_timeout=0.5, compression=None,
                   proxy=None)


async def ws_receive(ws: ClientConnection, stream: Stream, count_sent: bool) -> None:
    for want in itertools.count():
        try:
            message = await ws.recv()
        except Exception as exc:
            raise FlowError(f"websocket closed: {describe(exc)}") from exc
        expect(stream, int(message), want)
        if count_sent:  # server push: what arrived is all we know was sent
            stream.sent = want + 1


async def run_ws_client_push(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    async with ws_connect(f, "/echo", ctx) as ws:
        stream.connected_at = time.time()

        async def send() -> None:
            async for seq in ticks(ctx.interval):
                await ws.send(str(seq))
                stream.sent += 1

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            tg.create_task(ws_receive(ws, stream, count_sent=False))


async def run_ws_server_push(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    async with ws_connect(f, "/push", ctx) as ws:
        stream.connected_at = time.time()
        await ws_receive(ws, stream, count_sent=True)


# HTTP keep-alive --------------------------------------------------------------------
async def http_response(reader: asyncio.StreamReader) -> dict[str, str]:
    """One response; its body ``conn=<id> seq=<n>`` parsed."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (ln.partition(":") for ln in lines[1:] if ln)}
    if " 200 " not in lines[0] + " " or headers.get("connection", "").lower() == "close":
        raise FlowError(f"bad response: {lines[0]!r} {headers}")
    body = await reader.readexactly(int(headers["content-length"]))
    return dict(part.split("=", 1) for part in body.decode().split())


def http_request(seq: int | str) -> bytes:
    return (f"GET /?seq={seq} HTTP/1.1\r\nHost: guest\r\nConnection: keep-alive\r\n\r\n"
            .encode())


async def run_http_keepalive(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(f["host"], f["port"]), ctx.connect_timeout)
    try:
        writer.write(http_request("hello"))
        conn = (await asyncio.wait_for(http_response(reader), ctx.connect_timeout))["conn"]
        stream.connected_at = time.time()

        async def send() -> None:
            async for seq in ticks(ctx.interval):
                writer.write(http_request(seq))  # pipelined: the schedule never waits
                stream.sent += 1
                await writer.drain()

        async def receive() -> None:
            for want in itertools.count():
                try:
                    r = await http_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    raise FlowError(f"connection closed: {describe(exc)}") from exc
                if r["conn"] != conn:
                    raise FlowError(f"answered on connection {r['conn']}, not {conn}")
                expect(stream, int(r["seq"]), want)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            tg.create_task(receive())
    finally:
        writer.transport.abort()


# UDP request/response ---------------------------------------------------------------
class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.answered = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data == HELLO:
            self.answered.set()
        else:  # losses and reordering are UDP's right: count, don't judge
            self.stream.arrived()

    def error_received(self, exc: Exception) -> None:
        self.stream.udp_errors += 1


async def run_udp(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    loop = asyncio.get_running_loop()
    proto = _UdpClient(stream)
    # connected: only replies from the address we sent to count (a real client's view)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: proto, remote_addr=(f["host"], f["port"]))
    try:
        await _udp_hello(transport, proto, ctx)
        stream.connected_at = time.time()
        async for seq in ticks(ctx.interval):
            transport.sendto(b"%d\n" % seq)
            stream.sent += 1
    finally:
        transport.close()


async def _udp_hello(transport: asyncio.DatagramTransport, proto: _UdpClient,
                     ctx: Ctx) -> None:
    deadline = time.monotonic() + ctx.connect_timeout
    while not proto.answered.is_set():
        if time.monotonic() > deadline:
            raise FlowError("no UDP answer to hello")
        transport.sendto(HELLO)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proto.answered.wait(), 0.2)


RUNNERS: dict[str, Callable[[dict[str, Any], Stream, Ctx], Awaitable[None]]] = {
    "ssh": run_ssh,
    "ws-client-push": run_ws_client_push,
    "ws-server-push": run_ws_server_push,
    "http-keepalive": run_http_keepalive,
    "udp": run_udp,
    "guest-snat": run_tcp_echo,
}


async def run_flow(f: dict[str, Any], stream: Stream, ctx: Ctx) -> None:
    try:
        await RUNNERS[f["kind"]](f, stream, ctx)
        stream.fail("flow ended")  # runners only return when their connection did
    except Exception as exc:
        stream.fail(describe(exc))


# echo server (the workstation end of guest-initiated flows) ---------------------------
async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    writer.close()


# main -------------------------------------------------------------------------------
async def run(spec: dict[str, Any], result: Path, stop_on_eof: bool = False) -> None:
    ctx = Ctx(spec.get("interval", 0.05), spec.get("connect_timeout", 10.0),
              spec.get("ssh_key"))
    if spec.get("echo_port"):
        await asyncio.start_server(_echo, "0.0.0.0", spec["echo_port"], reuse_address=True)
        print(f"listening tcp={spec['echo_port']}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stop_on_eof:  # run over ssh (a VM's guest side): no signal reaches us, EOF does
        threading.Thread(target=_until_eof, args=(loop, stop), daemon=True).start()
    streams = [Stream(f["name"], f["kind"], f["entry_node"]) for f in spec["flows"]]
    started = time.time()
    tasks = [asyncio.create_task(run_flow(f, s, ctx)) for f, s in
             zip(spec["flows"], streams, strict=True)]
    await _announce_ready(streams, ctx, stop)
    await stop.wait()
    stopped = time.time()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    write_result(result, started, stopped, streams)


async def _announce_ready(streams: list[Stream], ctx: Ctx, stop: asyncio.Event) -> None:
    deadline = time.monotonic() + ctx.connect_timeout + 2
    while (any(s.connected_at is None and s.error is None for s in streams)
           and time.monotonic() < deadline and not stop.is_set()):
        await asyncio.sleep(0.02)
    failed = {s.name: s.error or "not connected in time" for s in streams
              if s.connected_at is None}
    print("ready " + json.dumps(failed), flush=True)


def write_result(path: Path, started: float, stopped: float, streams: list[Stream]) -> None:
    data = {"started_at": started, "stopped_at": stopped, "flows": [asdict(s) for s in streams]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: the reader never sees half a file


def _until_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    sys.stdin.buffer.read()
    loop.call_soon_threadsafe(stop.set)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--stop-on-eof", action="store_true", help="stop when stdin closes")
    a = ap.parse_args()
    asyncio.run(run(json.loads(a.spec.read_text()), a.result, a.stop_on_eof))


if __name__ == "__main__":
    main()
