"""A forwarded operator request (orchestrator/agent/forward.py): who runs it (pure), its
frames (pure), and both ends over a real authenticated peer channel on loopback TCP."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from orchestrator.agent import forward
from orchestrator.agent.forward import Outcome, Refused, Unreachable
from orchestrator.agent.peer_channel import MAX_FRAME, PeerChannel, PeerError
from orchestrator.errors import ConvergentError, MigrationError

KEY = os.urandom(32)


# --- pure ----------------------------------------------------------------------------

def test_the_owner_is_the_one_node_owning_the_guests_addresses() -> None:
    assert forward.guest_owner("g", ["n1", "n1", None], ["g"]) == "n1"
    with pytest.raises(ConvergentError, match=r"^unknown guest 'x' \(known: a, g\)$"):
        forward.guest_owner("x", [], ["g", "a"])
    with pytest.raises(ConvergentError, match=r"known: none"):
        forward.guest_owner("x", [None], [])
    with pytest.raises(MigrationError, match="g runs nowhere the store knows"):
        forward.guest_owner("g", [None], ["g"])
    with pytest.raises(MigrationError, match="g's addresses are owned by n1, n2"):
        forward.guest_owner("g", ["n2", "n1"], ["g"])


def test_the_caller_is_named_from_its_credentials() -> None:
    assert forward.caller_of(0, 42) == "uid 0 (root) pid 42"
    assert forward.caller_of(0, None) == "uid 0 (root)"
    assert forward.caller_of(2**31 - 2, 7) == f"uid {2**31 - 2} (?) pid 7"
    assert forward.caller_of(None, None) == "an unknown caller"


def test_a_request_is_described_in_one_line() -> None:
    assert forward.describe("guest.migrate", {"guest": "g1", "to": "n3"}) == \
        "guest.migrate g1 to=n3"
    assert forward.describe("failover.run", {"from_node": "n1", "force": False,
                                             "dry_run": True, "skip": []}) == \
        "failover.run n1 dry_run=True"


@pytest.mark.parametrize(("frame", "want"), [
    ({"op": "progress", "step": {"phase": "memory"}}, Outcome("progress", {"phase": "memory"})),
    ({"op": "alive"}, Outcome("alive")),
    ({"op": "result", "result": {"to": "n3"}}, Outcome("result", {"to": "n3"})),
    ({"op": "result"}, Outcome("result", None)),
    ({"op": "error", "error": "unknown node 'n9'"}, Outcome("error", "unknown node 'n9'")),
    ({"op": "error"}, Outcome("error", "refused, no reason given")),
])
def test_each_answer_frame_means_one_thing(frame: dict[str, Any], want: Outcome) -> None:
    assert forward.read_frame("n1", frame) == want


@pytest.mark.parametrize("frame", [{"op": "stream"}, {}, [], {"op": "x" * 200}])
def test_any_other_frame_is_a_protocol_error_naming_the_node(frame: Any) -> None:
    with pytest.raises(PeerError, match=r"^n1's agent answered a forwarded request with "):
        forward.read_frame("n1", frame)


def test_a_result_too_large_for_a_frame_becomes_an_error() -> None:
    assert forward.result_frame({"a": 1}) == {"op": "result", "result": {"a": 1}}
    big = forward.result_frame({"a": "x" * MAX_FRAME})
    assert big["op"] == "error" and "does not fit in one peer frame" in big["error"]


def test_only_the_requests_an_agent_runs_for_another_are_taken() -> None:
    allowed = {"guest.migrate", "failover.run"}
    assert forward.check_request({"request": "guest.migrate", "args": {"guest": "g"},
                                  "by": "uid 0 (root) on n2"}, allowed) == (
        "guest.migrate", {"guest": "g"}, "uid 0 (root) on n2")
    assert forward.check_request({"request": "failover.run", "args": {}}, allowed)[2] == \
        "an unnamed caller"
    for frame in ({"request": "sync.commit", "args": {}}, {"args": {}},
                  {"request": "guest.migrate", "args": []},
                  {"request": "guest.migrate", "args": {"emit": 1}},
                  {"request": "guest.migrate", "args": {"caller": "root"}}):
        with pytest.raises(PeerError):
            forward.check_request(frame, allowed)


# --- both ends on a real channel ----------------------------------------------------

Run = Callable[[forward.Emit], Awaitable[Any]]


@asynccontextmanager
async def serving(run: Run | None, keepalive_s: float = forward.KEEPALIVE_S,
                  key: bytes = KEY) -> AsyncIterator[tuple[int, list[Any]]]:
    """An agent "n1" on loopback that runs ``run`` for each forward (None: it takes the
    request and never answers). Yields its port and what it returned."""
    served: list[Any] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = PeerChannel(reader, writer, key, b"S")
        try:
            await ch.accept_as("n1")
            frame = await ch.recv()
            assert isinstance(frame, dict)
            forward.check_request(frame, {"guest.migrate"})
            if run is None:
                await asyncio.sleep(30)
            served.append(await forward.serve(ch, run, keepalive_s))
        except Exception:
            pass
        finally:
            ch.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, served
    finally:
        server.close()


async def ask(port: int, seen: list[Any] | None = None, silence_s: float = 5.0) -> Any:
    async def progress(step: Any) -> None:
        if seen is not None:
            seen.append(step)
    return await forward.ask("n2", KEY, "n1", "127.0.0.1", port, "guest.migrate",
                             {"guest": "g1", "to": "n3"}, "uid 0 (root) on n2", progress,
                             silence_s)


def test_progress_comes_back_in_order_then_the_result() -> None:
    async def run(emit: forward.Emit) -> Any:
        for phase in ("starting", "memory", "paused", "resumed", "done"):
            await emit({"phase": phase})
        return {"from": "n1", "to": "n3"}

    async def main() -> tuple[Any, list[Any], list[Any]]:
        seen: list[Any] = []
        async with serving(run) as (port, served):
            return await ask(port, seen), seen, served
    result, seen, served = asyncio.run(main())
    assert result == {"from": "n1", "to": "n3"}
    assert [s["phase"] for s in seen] == ["starting", "memory", "paused", "resumed", "done"]
    assert served == [("ok", None)]


def test_a_long_silent_request_is_kept_alive_past_the_silence_limit() -> None:
    async def run(emit: forward.Emit) -> Any:
        await asyncio.sleep(1.0)  # a precopy with nothing to say, 4x the silence limit
        return "done"

    async def main() -> Any:
        async with serving(run, keepalive_s=0.05) as (port, _):
            return await ask(port, silence_s=0.25)
    assert asyncio.run(main()) == "done"


def test_a_remote_that_goes_silent_is_one_line_naming_it() -> None:
    async def main() -> None:
        async with serving(None) as (port, _):
            await ask(port, silence_s=0.3)
    with pytest.raises(Unreachable, match=r"^n1's agent went silent for 0.3 s during "
                                          r"guest.migrate: see convergent status on n1$"):
        asyncio.run(main())


def test_a_refusal_comes_back_unchanged_and_a_crash_as_one_line() -> None:
    async def refuse(emit: forward.Emit) -> Any:
        raise MigrationError("unknown node 'n9' (nodes: n1, n2, n3)")

    async def crash(emit: forward.Emit) -> Any:
        raise KeyError("oops")

    async def main(run: Run) -> tuple[str, list[Any]]:
        async with serving(run) as (port, served):
            with pytest.raises(Refused) as exc:
                await ask(port)
            return str(exc.value), served
    line, served = asyncio.run(main(refuse))
    assert line == "unknown node 'n9' (nodes: n1, n2, n3)"
    assert served == [("refused", line)]
    line, served = asyncio.run(main(crash))
    assert line == "failed: KeyError: 'oops'" and served == [("failed", line)]


def test_nobody_listening_is_one_line_naming_the_node_and_why() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(Unreachable, match=(
                rf"^n1's agent is unreachable at 127.0.0.1:{port}: Connection refused; "
                r"nothing was started on n1$")):
            asyncio.run(ask(port))


def test_an_agent_with_another_key_does_not_let_us_in() -> None:
    ran: list[bool] = []

    async def run(emit: forward.Emit) -> Any:
        ran.append(True)

    async def main() -> None:
        async with serving(run, key=os.urandom(32)) as (port, _):
            await ask(port)
    with pytest.raises(Unreachable, match=r"^n1's agent at 127.0.0.1:\d+ did not let n2 "
                                          r"in: .*nothing was started on n1$"):
        asyncio.run(main())
    assert not ran
