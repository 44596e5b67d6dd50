"""The operator's requests as the agent on the CLI's node takes them: ``convergent migrate``,
``migrate --abort``, ``failover`` and ``failback``, asked on this node, run by the node they
belong to.

A migration is run by the guest's owner (its hypervisor moves the guest), a failover by the
survivor (it adopts the dead node's address), a failback by the node coming back. When that
is this node the request runs here; else it is forwarded to that node's agent
(``forward.py``), which runs it as if asked on its own socket. Each forward leaves one audit
record on each side, naming the request, who asked (the uid and pid on this node's socket)
and from which node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.agent import forward
from orchestrator.agent.forward import Emit, Refused, guest_owner
from orchestrator.agent.peer_channel import PeerChannel
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, MigrationError
from orchestrator.store.base import Store

ABORT_WAIT_S = 15.0  # after the abort was asked: until the store shows the migration ended
# what an agent runs for another (each as on its own socket); only guest.migrate streams
STREAMING = frozenset({"guest.migrate"})
Local = Callable[..., Awaitable[Any]]


class OperatorRequests:
    """``local``: this node's own operations a forward may run (request name -> handler)."""

    def __init__(self, node: str, topology: Topology, store: Store, audit: AuditLog,
                 key: bytes, local: dict[str, Local]) -> None:
        self.node, self.topology, self.store, self.audit = node, topology, store, audit
        self.key, self.local = key, local
        self.silence_s = forward.SILENCE_S

    # the API's operations -----------------------------------------------------------
    async def migrate(self, guest: str, to: str, emit: Emit | None = None,
                      caller: str = "an unknown caller") -> Any:
        owner = await self._owner(guest)
        return await self.on(owner, "guest.migrate", {"guest": guest, "to": to}, caller, emit)

    async def abort(self, guest: str, caller: str = "an unknown caller") -> dict[str, Any]:
        """Cancel the source's move if its agent runs one; else the destination aborts its
        part. Then wait for the store to show the migration ended."""
        active = await self.store.list_migrations(active=True, guest=guest)
        if not active:
            raise MigrationError(f"{guest} is not migrating")
        m = active[0]
        try:
            await self.on(m.src, "guest.migrate_abort", {"guest": guest}, caller)
        except Refused:  # not moved by its agent (virsh migrate, xl migrate)
            await self.on(m.dst, "migration.abort", {
                "guest": guest, "reason": "aborted by the operator (convergent migrate "
                                          "--abort)"}, caller)
        deadline = time.monotonic() + ABORT_WAIT_S
        while (cur := await self.store.get_migration(m.id)) is not None and cur.active:
            if time.monotonic() > deadline:
                raise MigrationError(f"{guest}: migration {m.id} {m.src} -> {m.dst} is still "
                                     f"in phase {cur.phase} after {ABORT_WAIT_S:g} s")
            await asyncio.sleep(0.05)
        owners = sorted({str(o.node) for o in await self.store.list_ownership(guest=guest)})
        final = cur.phase.value if cur is not None else "gone"
        where = ", ".join(owners) or "no node"
        return {"guest": guest, "migration": m.id, "from": m.src, "to": m.dst, "phase": final,
                "owner": owners, "line": f"{guest}: migration {m.id} {m.src} -> {m.dst} "
                                         f"{final}; {guest} stays on {where}"}

    async def failover(self, from_node: str, force: bool = False, dry_run: bool = False,
                       skip: list[str] | None = None, to_node: str | None = None,
                       caller: str = "an unknown caller") -> Any:
        survivor = to_node or self.node
        self._known(survivor)
        return await self.on(survivor, "failover.run", {
            "from_node": from_node, "force": force, "dry_run": dry_run,
            "skip": list(skip or ())}, caller)

    async def failback(self, node: str, dry_run: bool = False, skip: list[str] | None = None,
                       caller: str = "an unknown caller") -> Any:
        """Run by ``node`` itself: it takes its address and flows back."""
        self._known(node)
        return await self.on(node, "failover.back", {
            "node": node, "dry_run": dry_run, "skip": list(skip or ())}, caller)

    # here, or there -------------------------------------------------------------------
    async def on(self, node: str, request: str, args: dict[str, Any], caller: str,
                 emit: Emit | None = None) -> Any:
        """``request`` run by ``node``'s agent: here directly, else forwarded. A refusal
        either way is :class:`Refused` with the line of the agent that said no."""
        if node == self.node:
            try:
                return await self._run_here(request, args, emit)
            except Refused:
                raise
            except ConvergentError as exc:
                raise Refused(str(exc)) from None
        peer = self._known(node)
        start = time.monotonic()
        what = forward.describe(request, args)
        try:
            result = await forward.ask(self.node, self.key, node, str(peer.peer_ip),
                                       self.topology.agent.peer_port, request, args,
                                       by=f"{caller} on {self.node}", on_progress=emit,
                                       silence_s=self.silence_s)
        except ConvergentError as exc:
            await self._record("forward.send", "refused" if isinstance(exc, Refused)
                               else "failed", args, self.node, node, start,
                               f"{what}, asked by {caller}: {exc}")
            raise
        await self._record("forward.send", "ok", args, self.node, node, start,
                           f"{what}, asked by {caller}")
        return result

    async def serve(self, peer: str, frame: dict[str, Any], ch: PeerChannel) -> None:
        """A request another agent forwarded: run here as if asked on our socket."""
        request, args, by = forward.check_request(frame, self.local)
        start = time.monotonic()

        async def run(emit: Emit) -> Any:
            return await self._run_here(request, args, emit)

        async def done(outcome: str, error: str | None) -> None:
            await self._record("forward.serve", outcome, args, peer, self.node, start,
                               f"{forward.describe(request, args)}, asked by {by}"
                               + (f": {error}" if error else ""))

        await forward.serve(ch, run, done=done)

    async def _run_here(self, request: str, args: dict[str, Any], emit: Emit | None) -> Any:
        handler = self.local[request]
        if request in STREAMING:
            return await handler(**args, emit=emit)
        return await handler(**args)

    # helpers --------------------------------------------------------------------------
    async def _owner(self, guest: str) -> str:
        owned = await self.store.list_ownership(guest=guest)
        return guest_owner(guest, (o.node for o in owned),
                           (g.name for g in self.topology.guests))

    def _known(self, node: str) -> Any:
        for n in self.topology.nodes:
            if n.name == node:
                return n
        names = ", ".join(n.name for n in self.topology.nodes)
        raise MigrationError(f"unknown node {node!r} (nodes: {names})")

    async def _record(self, action: str, outcome: str, args: dict[str, Any], from_node: str,
                      to_node: str, start: float, detail: str) -> None:
        guest = args.get("guest")
        with contextlib.suppress(Exception):  # a record, never a reason for it to fail
            await self.audit.arecord(action, outcome=outcome,
                                     guest=guest if isinstance(guest, str) else None,
                                     from_node=from_node, to_node=to_node, detail=detail,
                                     duration_ms=(time.monotonic() - start) * 1000)
