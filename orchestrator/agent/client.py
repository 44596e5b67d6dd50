"""Talk to a node agent over its Unix socket: one JSON line out, one JSON line back.

Request: ``{"op": "migration.prepare", "args": {...}}``. Reply: ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "one readable line"}``. The CLI and the tests use this; hooks
have their own stdlib copy so they start fast (DESIGN §5).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.errors import ConvergentError

MAX_LINE = 16 << 20  # a status reply with many migrations stays well under this


class AgentError(ConvergentError):
    """The agent answered, and said no."""


class AgentUnavailable(ConvergentError):
    """No agent answered on the socket (not running, or too slow)."""


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


async def acall(socket: str | Path, op: str, timeout: float = 30.0,
                on_progress: Callable[[Any], None] | None = None, **args: Any) -> Any:
    """Send one request and return its result; raise AgentError on a refusal. An operation
    that reports progress sends ``{"progress": ...}`` lines first: each goes to
    ``on_progress`` and restarts the timeout."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket), limit=MAX_LINE), timeout)
    except OSError as exc:  # TimeoutError included
        raise AgentUnavailable(f"no agent on {socket}: {str(exc) or 'timed out'}") from None
    try:
        writer.write(encode({"op": op, "args": args}))
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            step = _progress(line)
            if step is None:
                break
            if on_progress is not None:
                on_progress(step)
    except OSError as exc:  # TimeoutError included
        raise AgentUnavailable(f"agent on {socket} did not answer {op}: "
                               f"{str(exc) or 'timed out'}") from None
    finally:
        writer.close()
    if not line:
        raise AgentUnavailable(f"agent on {socket} closed the connection during {op}")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise AgentError(reply.get("error") or f"{op} failed")
    return reply.get("result")


def call(socket: str | Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Blocking form for the CLI."""
    return asyncio.run(acall(socket, op, timeout, **args))


def _progress(line: bytes) -> Any:
    """The progress a line carries, or None for the answer itself."""
    if not line.startswith(b'{"progress":'):
        return None
    return json.loads(line)["progress"]
