"""The agent's Unix-socket API: JSON lines in, JSON lines out (see ``client.py``).

Each request runs as its own task, so a slow migration call does not stall ``status``.
A refusal (ConvergentError) is a normal answer; anything else is logged and answered with
its one-line description, and the agent carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from orchestrator.agent.client import MAX_LINE, encode
from orchestrator.agent.forward import caller_of
from orchestrator.errors import ConvergentError

log = structlog.get_logger("convergent.api")
Handler = Callable[..., Awaitable[Any]]


class ApiServer:
    """``streaming``: operations that report progress before their answer; they get an
    ``emit`` argument, and each ``emit(obj)`` sends a ``{"progress": obj}`` line first.
    ``identified``: operations told who called (``caller``: the uid and pid the kernel
    gives for the socket's other end), for their audit records.
    ``on_bad``: told of each line that is not a request (counted, and audited)."""

    def __init__(self, path: Path, handlers: dict[str, Handler],
                 streaming: frozenset[str] = frozenset(),
                 on_bad: Callable[[str], None] | None = None,
                 identified: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.handlers = handlers
        self.streaming = streaming
        self.identified = identified
        self.on_bad = on_bad
        self.server: asyncio.AbstractServer | None = None
        self.requests = 0
        self.errors = 0
        self._inode: int | None = None  # the socket file this process made

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a killed agent: the caller holds the node's lock
        try:
            self.server = await asyncio.start_unix_server(self._client, str(self.path),
                                                          limit=MAX_LINE)
        except OSError as exc:
            raise ConvergentError(f"API socket {self.path}: {exc.strerror or exc}") from None
        os.chmod(self.path, 0o660)
        self._inode = self.path.stat().st_ino

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self._remove_own_socket()

    def _remove_own_socket(self) -> None:
        """Unlink the socket only if it is still the one this process created."""
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async def emit(obj: Any) -> None:
                writer.write(encode({"progress": obj}))
                await writer.drain()

            caller = _caller(writer)
            while line := await reader.readline():
                writer.write(encode(await self.dispatch(line, emit, caller)))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent an endless line
        finally:
            writer.close()

    async def dispatch(self, line: bytes,
                       emit: Callable[[Any], Awaitable[None]] | None = None,
                       caller: str | None = None) -> dict[str, Any]:
        self.requests += 1
        try:
            op, args = parse_request(line)
        except ValueError as exc:
            self.errors += 1
            if self.on_bad is not None:
                self.on_bad(str(exc))
            return {"ok": False, "error": f"bad request: {exc}"}
        if op in self.streaming and emit is not None:
            args = {**args, "emit": emit}
        if op in self.identified:
            args = {**args, "caller": caller or "an unknown caller"}
        handler = self.handlers.get(op)
        if handler is None:
            self.errors += 1
            return {"ok": False, "error": f"unknown op {op!r} (known: "
                                          f"{', '.join(sorted(self.handlers))})"}
        try:
            return {"ok": True, "result": await handler(**args)}
        except ConvergentError as exc:
            self.errors += 1
            return {"ok": False, "error": str(exc)}
        except TypeError as exc:  # wrong or missing arguments
            self.errors += 1
            return {"ok": False, "error": f"{op}: {exc}"}
        except Exception as exc:
            self.errors += 1
            log.exception("api.error", op=op)
            return {"ok": False, "error": f"{op} failed: {type(exc).__name__}: {exc}"}


def _caller(writer: asyncio.StreamWriter) -> str:
    """Who the client is, from the kernel (SO_PEERCRED), never from what it says."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (AttributeError, OSError):
        return caller_of(None, None)
    return caller_of(uid, pid)


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """``(op, args)`` of one request line, or ValueError saying what is wrong with it."""
    try:
        req = json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(req, dict):
        raise ValueError(f"expected a JSON object, got {type(req).__name__}")
    op, args = req.get("op"), req.get("args") or {}
    if not isinstance(op, str):
        raise ValueError("'op' must be a string")
    if not isinstance(args, dict):
        raise ValueError("args must be an object")
    return op, args
