"""The agent's Unix-socket API: JSON lines in, JSON lines out (see ``client.py``).

Each request runs as its own task, so a slow migration call does not stall ``status``.
A refusal (ConvergentError) is a normal answer; anything else is logged and answered with
its one-line description, and the agent carries on.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from orchestrator.agent.client import MAX_LINE, encode
from orchestrator.errors import ConvergentError

log = structlog.get_logger("convergent.api")
Handler = Callable[..., Awaitable[Any]]


class ApiServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: asyncio.AbstractServer | None = None
        self.requests = 0
        self.errors = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # left by a killed agent; nobody else may own our path
        self.server = await asyncio.start_unix_server(self._client, str(self.path),
                                                      limit=MAX_LINE)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(encode(await self.dispatch(line)))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent an endless line
        finally:
            writer.close()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        self.requests += 1
        try:
            req = json.loads(line)
            op, args = req["op"], req.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            self.errors += 1
            return {"ok": False, "error": f"bad request: {exc}"}
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
