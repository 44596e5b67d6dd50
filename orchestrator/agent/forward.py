"""An operator's request run by another node's agent: ``convergent migrate`` and
``failover`` work from any node.

The CLI talks to the agent of the node it runs on. When the request belongs to another
node (the guest's owner runs its migration; the survivor runs a failover), this agent
forwards it over the authenticated peer channel (``peer_channel.PeerChannel``) to that
node's agent, which runs it exactly as if asked on its own socket.

One connection per request. The asking side sends ``{op: forward, request, args, by}``;
the serving side answers with any number of ``{op: progress, step}`` frames (each phase as
it happens), ``{op: alive}`` every ``KEEPALIVE_S`` while the request runs silently, then
one ``{op: result, result}`` or ``{op: error, error}``. The asking side gives up on a
silence longer than ``SILENCE_S`` (the remote agent hung or its node died), never on the
total time: a migration takes seconds to minutes. A connection that cannot be made is one
line naming the node and why; nothing was started there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from orchestrator.agent.peer_channel import (
    HANDSHAKE_TIMEOUT,
    MAX_FRAME,
    PeerChannel,
    PeerError,
)
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.migration.feed import FeedLost

log = structlog.get_logger("convergent.forward")
KEEPALIVE_S = 2.0  # the serving side says it is still at it this often
SILENCE_S = 15.0  # the asking side waits this long for any frame before giving up
RESULT_MAX = MAX_FRAME - 4096  # a result frame stays inside the channel's frame limit
Emit = Callable[[Any], Awaitable[None]]
Done = Callable[[str, str | None], Awaitable[None]]  # (outcome, error)


class Refused(ConvergentError):
    """The agent that runs the request said no: its one line, unchanged."""


class Unreachable(ConvergentError):
    """No answer from the other node's agent: it was not asked, or went silent."""


# --- who runs a request (pure) --------------------------------------------------------

def guest_owner(guest: str, owners: Iterable[str | None], known: Iterable[str]) -> str:
    """The node that runs ``guest``'s migration: the one owning its addresses in the store.
    One line when no node or several do, or the guest is unknown."""
    found = {o for o in owners if o}
    if not found:
        names = sorted(known)
        if guest not in names:
            raise ConvergentError(f"unknown guest {guest!r} (known: "
                                  f"{', '.join(names) or 'none'})")
        raise MigrationError(f"{guest} runs nowhere the store knows (no node owns it)")
    if len(found) > 1:
        raise MigrationError(f"{guest}'s addresses are owned by {', '.join(sorted(found))}")
    return found.pop()


def caller_of(uid: int | None, pid: int | None) -> str:
    """Who is on the other end of the API socket, for the audit log: ``uid 0 (root) pid
    42`` (from the kernel's SO_PEERCRED, not from anything the client says)."""
    if uid is None:
        return "an unknown caller"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"uid {uid} ({name})" + (f" pid {pid}" if pid else "")


def describe(request: str, args: dict[str, Any]) -> str:
    """One line for the audit log: ``guest.migrate guest1 to=n3``."""
    guest = args.get("guest") or args.get("from_node") or ""
    rest = " ".join(f"{k}={v}" for k, v in sorted(args.items())
                    if k not in ("guest", "from_node") and v not in (None, False, [], ""))
    return " ".join(p for p in (request, str(guest), rest) if p)


# --- frames (pure) ---------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What one frame from the serving side means to the asking side."""

    kind: str  # "progress", "alive", "result" or "error"
    value: Any = None


def read_frame(node: str, frame: dict[str, Any] | list[Any]) -> Outcome:
    """One frame of a forwarded request's answer; PeerError for anything else."""
    if isinstance(frame, dict):
        op = frame.get("op")
        if op == "progress":
            return Outcome("progress", frame.get("step"))
        if op == "alive":
            return Outcome("alive")
        if op == "result":
            return Outcome("result", frame.get("result"))
        if op == "error":
            return Outcome("error", str(frame.get("error") or "refused, no reason given"))
    raise PeerError(f"{node}'s agent answered a forwarded request with {_short(frame)}")


def result_frame(result: Any) -> dict[str, Any]:
    """The final frame; a result too large for one frame becomes an error saying so."""
    frame = {"op": "result", "result": result}
    size = len(json.dumps(frame, default=str))
    if size > RESULT_MAX:
        return {"op": "error", "error": f"the result ({size} bytes) does not fit in one "
                                        f"peer frame ({RESULT_MAX} bytes)"}
    return frame


def _short(frame: Any) -> str:
    text = json.dumps(frame, default=str) if isinstance(frame, dict) else type(frame).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# --- the asking side ------------------------------------------------------------------

async def ask(me: str, key: bytes, node: str, host: str, port: int, request: str,
              args: dict[str, Any], by: str, on_progress: Emit | None = None,
              silence_s: float = SILENCE_S) -> Any:
    """Have ``node``'s agent (at ``host:port``) run ``request``; its progress goes to
    ``on_progress``. Refused: the remote said no (its line). Unreachable: it could not be
    asked (nothing started), or went silent for ``silence_s`` (it may have started)."""
    where = f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                HANDSHAKE_TIMEOUT)
    except OSError as exc:  # TimeoutError included
        why = os.strerror(exc.errno) if exc.errno else (str(exc) or "timed out")
        raise Unreachable(f"{node}'s agent is unreachable at {where}: {why}; nothing was "
                          f"started on {node}") from None
    ch = PeerChannel(reader, writer, key, b"C")
    try:
        try:
            await ch.connect_as(me)
        except (FeedLost, PeerError, OSError) as exc:
            raise Unreachable(f"{node}'s agent at {where} did not let {me} in: {exc}; "
                              f"nothing was started on {node}") from None
        await ch.send({"op": "forward", "request": request, "args": args, "by": by})
        while True:
            try:
                frame = await asyncio.wait_for(ch.recv(), silence_s)
            except TimeoutError:
                raise Unreachable(f"{node}'s agent went silent for {silence_s:g} s during "
                                  f"{request}: see convergent status on {node}") from None
            except (FeedLost, OSError) as exc:
                raise Unreachable(f"{node}'s agent closed the connection during {request}: "
                                  f"{exc}") from None
            out = read_frame(node, frame)
            if out.kind == "progress" and on_progress is not None:
                with contextlib.suppress(Exception):  # our client gone: wait for the end
                    await on_progress(out.value)
            elif out.kind == "result":
                return out.value
            elif out.kind == "error":
                raise Refused(out.value)
    finally:
        ch.close()


# --- the serving side ------------------------------------------------------------------

async def serve(ch: PeerChannel, run: Callable[[Emit], Awaitable[Any]],
                keepalive_s: float = KEEPALIVE_S, done: Done | None = None
                ) -> tuple[str, str | None]:  # fmt: skip
    """Run one forwarded request, its progress and keep-alives going out as frames, then
    its answer. ``done(outcome, error)`` is awaited before the answer goes out (the audit
    record: written before the asker hears the end). The request runs to its end even if
    the asking side goes away (as it does for a client of the API socket)."""
    lock = asyncio.Lock()  # a progress frame and a keep-alive never interleave

    async def send(frame: dict[str, Any]) -> None:
        async with lock:
            with contextlib.suppress(Exception):  # the asker gone: the request goes on
                await asyncio.wait_for(ch.send(frame), keepalive_s * 4)

    async def emit(step: Any) -> None:
        await send({"op": "progress", "step": step})

    job = asyncio.ensure_future(run(emit))
    while not job.done():
        await asyncio.wait({job}, timeout=keepalive_s)
        if not job.done():
            await send({"op": "alive"})
    outcome, error, frame = _answer(job)
    if done is not None:
        await done(outcome, error)
    await send(frame)
    return outcome, error


def _answer(job: asyncio.Future[Any]) -> tuple[str, str | None, dict[str, Any]]:
    """(outcome, error, the final frame) of a finished request."""
    if job.cancelled():  # the agent is stopping
        line = "cancelled: the agent stopped before it finished"
        return "failed", line, {"op": "error", "error": line}
    exc = job.exception()
    if exc is None:
        return "ok", None, result_frame(job.result())
    if isinstance(exc, ConvergentError):
        return "refused", str(exc), {"op": "error", "error": str(exc)}
    log.error("forward.failed", error=repr(exc))
    line = f"failed: {type(exc).__name__}: {exc}"
    return "failed", line, {"op": "error", "error": line}


def check_request(frame: dict[str, Any], allowed: Iterable[str]) -> tuple[str, dict[str, Any],
                                                                          str]:
    """``(request, args, by)`` of a forward frame; PeerError when it is not one we run."""
    request, args, by = frame.get("request"), frame.get("args"), frame.get("by")
    names = sorted(allowed)
    if not isinstance(request, str) or request not in names:
        raise PeerError(f"forwarded request {request!r} is not one an agent runs for another "
                        f"(only {', '.join(names)})")
    if not isinstance(args, dict) or "emit" in args or "caller" in args:
        raise PeerError(f"forwarded {request}: args must be an object of the request's own "
                        "arguments")
    return request, args, str(by or "an unnamed caller")[:200]
